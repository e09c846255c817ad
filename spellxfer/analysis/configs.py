"""Configurations across seeds: aggregate the runs of one configuration and test its effect.

A sweep with ``replicates: N`` trains every sampled configuration with N seeds; its trials share a
``config_id`` (trial.json). A run is one draw of the training noise, so a configuration's effect is
judged across its seeds:

- ``config_table``: one row per configuration and scoring with the mean over seeds of every
  endpoint, its base → fine-tuned delta, the between-seed standard deviation, and the mean
  validation objective and steps trained.
- ``config_effects``: per configuration, scoring and tested endpoint, the mean delta over seeds
  with its interval and p-value. With two or more seeds the test is a one-sample t-test of the
  per-seed deltas against 0 (``scipy.stats.ttest_1samp``; its interval is the t interval), so
  the seed-to-seed spread is the error; with one seed it is the run's own word-clustered paired
  bootstrap interval and exact McNemar p. p-values are Holm-adjusted within pre-specified
  families (``families``): for each scoring, the primary endpoints (the subtasks) of every
  configuration form one family and the secondary endpoints (the two task totals) another.

Trained on spelling, evaluated on position and count only.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from spellxfer.analysis.effects import endpoint_of, metrics_of
from spellxfer.evaluation.stats import holm

ALPHA = 0.05


def config_label(config_id) -> str:
    return f"config-{int(config_id):04d}"


def config_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (scoring, configuration): means over seeds, between-seed SDs, the params, the runs."""
    metrics = metrics_of(runs)
    value_cols = [c for m in metrics for c in (m, f"{m}_delta", f"{m}_base") if c in runs]
    objective_cols = [c for c in runs.columns if c.startswith("val/")]
    params = [c for c in runs.columns if c.startswith("params.")]
    rows = []
    for (scoring, config_id), g in runs.groupby(["scoring", "config_id"], sort=True):
        row = {
            "scoring": scoring,
            "config_id": int(config_id),
            "run": config_label(config_id),
            "n_seeds": len(g),
            "runs": " ".join(g["run"]),
            "trial": int(g["trial"].min()) if g["trial"].notna().any() else None,
        }
        row |= {c: g[c].mean() for c in value_cols + objective_cols}
        row |= {f"{m}_seed_sd": g[m].std(ddof=1) if len(g) > 1 else math.nan for m in metrics}
        row |= {"steps_trained": g["steps_trained"].mean() if g["steps_trained"].notna().any() else math.nan}
        row |= {c: g[c].iloc[0] for c in params}
        rows.append(row)
    return pd.DataFrame(rows)


def _seed_test(deltas: np.ndarray, run_rows: pd.DataFrame) -> dict:
    """The test of one configuration's mean delta across its seeds (see the module docstring)."""
    if len(deltas) >= 2 and np.std(deltas) > 0:
        t = stats.ttest_1samp(deltas, 0.0)
        ci = t.confidence_interval(confidence_level=0.95)
        return {
            "delta_ci_low": float(ci.low),
            "delta_ci_high": float(ci.high),
            "p_value": float(t.pvalue),
            "test": f"one-sample t-test across {len(deltas)} seeds",
            "ci_method": "t interval across seeds",
        }
    # one seed, or seeds that agree exactly (nothing to learn from their spread): the item-level test
    first = run_rows.iloc[0]
    return {
        "delta_ci_low": float(first["delta_ci_low"]),
        "delta_ci_high": float(first["delta_ci_high"]),
        "p_value": float(first["mcnemar_p"]),
        "test": "exact McNemar (one run)",
        "ci_method": "paired bootstrap over words",
    }


def config_effects(per_run: pd.DataFrame, decoding: str) -> pd.DataFrame:
    """Per (scoring, configuration, endpoint): mean delta over seeds, interval, test, Holm p.

    The tests and families are described in the module docstring.
    """
    tested = per_run[per_run["endpoint"].isin(["primary", "secondary"])]
    rows = []
    for (scoring, config_id, metric), g in tested.groupby(["scoring", "config_id", "metric"], sort=True):
        deltas = g["delta"].to_numpy(float)
        rows.append(
            {
                "scoring": scoring,
                "config_id": int(config_id),
                "run": config_label(config_id),
                "metric": metric,
                "endpoint": endpoint_of(metric),
                "n_seeds": len(g),
                "base_accuracy": float(g["base_accuracy"].mean()),
                "tuned_accuracy": float(g["tuned_accuracy"].mean()),
                "tuned_seed_sd": float(g["tuned_accuracy"].std(ddof=1)) if len(g) > 1 else math.nan,
                "delta": float(deltas.mean()),
                "delta_seed_sd": float(deltas.std(ddof=1)) if len(g) > 1 else math.nan,
                **_seed_test(deltas, g),
                "n_items": int(g["n_items"].median()),
            }
        )
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    for (scoring, endpoint), family in out.groupby(["scoring", "endpoint"]):
        out.loc[family.index, "p_adj"] = holm(family["p_value"].tolist())
        out.loc[family.index, "family"] = family_name(decoding, scoring, endpoint)
    out["significant"] = out["p_adj"] <= ALPHA
    return out


def family_name(decoding: str, scoring: str, endpoint: str) -> str:
    return f"{decoding}/{scoring}/{endpoint}"


def selected_family(effects: pd.DataFrame, config_id: int, decoding: str) -> list[dict]:
    """The validation-selected configuration's tests as their own Holm families (primary and
    secondary, per scoring): the configuration the sweep would ship is judged on its own, not
    diluted by the configurations it beat on validation."""
    out = []
    mine = effects[effects["config_id"] == config_id]
    for (scoring, endpoint), g in mine.groupby(["scoring", "endpoint"]):
        adj = holm(g["p_value"].tolist())
        for (_, r), p in zip(g.iterrows(), adj):
            out.append(
                {
                    "scoring": scoring,
                    "metric": r["metric"],
                    "endpoint": endpoint,
                    "n_seeds": int(r["n_seeds"]),
                    "base_accuracy": r["base_accuracy"],
                    "tuned_accuracy": r["tuned_accuracy"],
                    "delta": r["delta"],
                    "delta_ci_low": r["delta_ci_low"],
                    "delta_ci_high": r["delta_ci_high"],
                    "p_value": r["p_value"],
                    "test": r["test"],
                    "p_adj": p,
                    "significant": bool(p <= ALPHA),
                    "family": f"{decoding}/{scoring}/{endpoint}/validation-selected",
                }
            )
    return out
