"""The metric whitelist, applied to every table the analysis writes and the report shows.

Each column of a table is one of:

- an identifier or hyperparameter column (``run``, ``trial``, ``params.lora_r``, …);
- a generic statistic column (``estimate``, ``ci_low``, …) of the metric its row names in a
  ``metric`` / ``x_metric`` / ``y_metric`` column — whose *values* must then be allowed metrics;
- a metric column, ``<metric>`` or ``<metric>_<statistic>`` (``position_accuracy_delta_ci_low``),
  whose metric must pass :func:`~spellxfer.tasks.metric_names.check_metric_name`.

Anything else is refused with :class:`~spellxfer.core.errors.SpellxferError` before it is written or
shown: only position, count and transfer metrics appear in an analysis or a report.
"""

from __future__ import annotations

import pandas as pd

from spellxfer.core.errors import SpellxferError
from spellxfer.tasks.metric_names import check_metric_name

IDENTIFIERS = frozenset(
    {
        "rank",
        "run",
        "trial",
        "study",
        "run_dir",
        "status",
        "reason",
        "objective_name",
        "kind",
        "hyperparameter",
        "value",
        "scale",
        "method",
        "breakdown",
        "bucket",
        "quantity",
        "n",
        "n_runs",
        "n_items",
        "significant",
        "scoring",
        "endpoint",
        "family",
        "config_id",
        "replicate",
        "seed",
        "n_seeds",
        "n_configs",
        "steps_trained",
        "runs",
        "test",
        "ci_method",
        "reference",
        "arm",
        "contrast",
        "seeds_same_direction",
        "control_runs",
    }
)
STATISTICS = frozenset(
    {
        "estimate",
        "ci_low",
        "ci_high",
        "p_value",
        "p_adj",
        "mcnemar_p",
        "base_accuracy",
        "base_ci_low",
        "base_ci_high",
        "tuned_accuracy",
        "tuned_ci_low",
        "tuned_ci_high",
        "delta",
        "delta_ci_low",
        "delta_ci_high",
        "slope",
        "slope_ci_low",
        "slope_ci_high",
        "importance",
        "tuned_seed_sd",
        "delta_seed_sd",
        "reference_accuracy",
        "delta_adj_ci_low",
        "delta_adj_ci_high",
        "best_trivial",
    }
)
METRIC_VALUE_COLUMNS = ("metric", "x_metric", "y_metric")
# Suffixes a metric column may carry, longest first so `_delta_ci_low` wins over `_ci_low`.
METRIC_SUFFIXES = (
    "_delta_ci_low",
    "_delta_ci_high",
    "_constant_answer",
    "_no_answer_rate",
    "_beats_trivial",
    "_best_trivial",
    "_mcnemar_p",
    "_seed_sd",
    "_ci_low",
    "_ci_high",
    "_p_adj",
    "_delta",
    "_base",
    "_n",
    "",
)


def check_columns(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """Return ``table`` unchanged if every column and every named metric is allowed; else raise."""
    for col in table.columns:
        col = str(col)
        if col in IDENTIFIERS or col in STATISTICS or col.startswith("params."):
            continue
        if col in METRIC_VALUE_COLUMNS:
            for value in table[col].dropna().unique():
                _check(str(value), f"{name}: {col} value")
            continue
        _check(metric_of_column(col), f"{name}: column {col!r}")
    return table


def metric_of_column(col: str) -> str:
    """``position_accuracy_delta_ci_low`` → ``position_accuracy`` (the metric a column describes)."""
    for suffix in METRIC_SUFFIXES:
        if suffix and col.endswith(suffix):
            return col[: -len(suffix)]
    return col


def _check(metric: str, where: str) -> None:
    try:
        check_metric_name(metric)
    except SpellxferError as e:
        raise SpellxferError(f"{where}: {e}") from None
