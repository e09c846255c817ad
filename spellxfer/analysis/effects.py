"""Across-run statistics: position–count correlations and hyperparameter effects, with intervals.

The unit here is the *run* (one trial's fine-tuned model), so every interval is a percentile
bootstrap over runs: ``n_boot`` resamples (default 2,000) of the runs with replacement, drawn from
``np.random.default_rng(seed)`` — same inputs and seed, same interval. A run's own accuracy already
carries its item-sampling noise, so the spread between runs includes it.

- ``correlations``: Pearson and Spearman correlation of position and count accuracy across runs,
  and of their base → fine-tuned deltas, each with its bootstrap interval and the usual p-value.
- ``marginal_means``: the mean of each metric over the runs that share a hyperparameter value
  (values binned into quartiles when a numeric hyperparameter has more than 6 distinct values).
- ``importance``: a linear regression of each metric on all numeric hyperparameters at once
  (scale parameters such as ``learning_rate`` or ``lora_r`` on a log2 scale), fitted by least
  squares. ``slope`` is the change in the metric per doubling (log2 scale) or per unit (linear);
  ``estimate`` is the standardized coefficient, the change per standard deviation of the
  hyperparameter across the sweep, and hyperparameters are ranked by its absolute value. With too
  few runs for a joint fit (fewer than parameters + 3) each hyperparameter gets its own
  one-variable regression instead, and ``method`` says so.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

METRICS = ("position_accuracy", "count_accuracy", "transfer_score")
# hyperparameter_effects.csv: marginal means and importance rows share these columns (blank where n/a),
# and keep them when a sweep has nothing to estimate (one run, or no hyperparameter that varies).
COLUMNS = ["kind", "hyperparameter", "value", "metric", "scale", "estimate", "ci_low", "ci_high", "slope",
           "slope_ci_low", "slope_ci_high", "rank", "n_runs", "method"]  # fmt: skip
MAX_LEVELS = 6  # more distinct values than this → quartile bins


def bootstrap_ci(statistic, columns: list[np.ndarray], n_boot: int, seed: int,
                 confidence: float = 0.95) -> tuple[float, float]:  # fmt: skip
    """Percentile interval of ``statistic(*columns)`` when runs (rows, shared by all columns) are resampled.

    ``statistic`` is vectorised: it gets arrays of shape ``(n_boot, n_runs)`` and returns
    ``(n_boot,)``. Resamples where it is undefined (nan, e.g. a correlation of a constant) are
    dropped; with fewer than 2 runs, or more than half the resamples undefined, the interval is nan.
    """
    n = len(columns[0])
    if n < 2:
        return (math.nan, math.nan)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.asarray(statistic(*[np.asarray(c, dtype=float)[idx] for c in columns]), dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < n_boot / 2:
        return (math.nan, math.nan)
    alpha = 1 - confidence
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))


def _mean(x):
    return x.mean(axis=-1)


def _pearson(x, y):
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    return (xc * yc).sum(-1) / np.sqrt((xc**2).sum(-1) * (yc**2).sum(-1))


def _spearman(x, y):
    return _pearson(stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1))


def correlations(runs: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Position vs count across runs: accuracies and base → fine-tuned deltas, Pearson and Spearman."""
    rows = []
    for quantity, suffix in (("accuracy", ""), ("delta", "_delta")):
        x = runs[f"position_accuracy{suffix}"].to_numpy(float)
        y = runs[f"count_accuracy{suffix}"].to_numpy(float)
        for method, stat, test in (("pearson", _pearson, stats.pearsonr), ("spearman", _spearman, stats.spearmanr)):
            defined = len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0
            r, p = (float(v) for v in test(x, y)) if defined else (math.nan, math.nan)
            low, high = bootstrap_ci(stat, [x, y], n_boot, seed) if defined else (math.nan, math.nan)
            rows.append({"x_metric": "position_accuracy", "y_metric": "count_accuracy", "quantity": quantity,
                         "method": method, "estimate": r, "ci_low": low, "ci_high": high, "p_value": p,
                         "n_runs": len(x)})  # fmt: skip
    return pd.DataFrame(rows)


def hyperparameters(runs: pd.DataFrame) -> list[str]:
    """The ``params.*`` columns that vary across runs (a constant cannot have an effect)."""
    return [c for c in runs.columns if c.startswith("params.") and runs[c].astype(str).nunique(dropna=True) >= 2]


def _levels(values: pd.Series) -> pd.Series:
    """One label per run: the value itself, or its quartile bin for a many-valued numeric hyperparameter."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all() and numeric.nunique() > MAX_LEVELS:
        bins = pd.qcut(numeric, 4, duplicates="drop")
        return bins.map(lambda iv: f"{iv.left:.3g}–{iv.right:.3g}").astype(str)
    return values.map(_fmt_value)


def _fmt_value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _level_order(labels: pd.Series, values: pd.Series) -> list[str]:
    """Levels sorted by the hyperparameter's value (numerically when it is a number)."""
    first = pd.DataFrame({"label": labels, "v": pd.to_numeric(values, errors="coerce"), "s": values.astype(str)})
    first = first.groupby("label", sort=False).min(numeric_only=False)
    key = "v" if first["v"].notna().all() else "s"
    return list(first.sort_values(key).index)


def marginal_means(runs: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Mean of each metric per hyperparameter value, with a bootstrap interval over the runs at that value."""
    rows = []
    for col in hyperparameters(runs):
        present = runs[runs[col].notna()]
        labels = _levels(present[col])
        for level in _level_order(labels, present[col]):
            group = present[labels == level]
            for metric in METRICS:
                y = group[metric].to_numpy(float)
                low, high = bootstrap_ci(_mean, [y], n_boot, seed)
                rows.append({"kind": "marginal_mean", "hyperparameter": col.removeprefix("params."), "value": level,
                             "metric": metric, "estimate": float(y.mean()), "ci_low": low, "ci_high": high,
                             "n_runs": len(y), "method": f"mean over runs; percentile bootstrap over runs ({n_boot})"})  # fmt: skip
    return pd.DataFrame(rows, columns=COLUMNS)


LOG_SCALE = {"learning_rate", "lora_r", "lora_alpha", "batch_size", "accumulate_grad_batches", "max_steps"}
"""Hyperparameters searched on doubling grids: effects are reported per doubling, whatever the range."""
MIN_RUNS_FOR_INTERVALS = 5
"""Fewer complete runs than this: a bootstrap over runs cannot give a meaningful interval (with
3 runs most resamples repeat one run), so importance intervals are left empty (nan)."""


def _design(runs: pd.DataFrame) -> tuple[list[str], np.ndarray, list[str]]:
    """Numeric hyperparameters as regression columns: names, matrix (runs × params), scales."""
    names, cols, scales = [], [], []
    for col in hyperparameters(runs):
        values = runs[col]
        if values.map(lambda v: isinstance(v, bool)).all():
            values = values.astype(int)
        x = pd.to_numeric(values, errors="coerce")
        if x.isna().any():
            continue  # categorical or missing in some runs: marginal means only
        x = x.to_numpy(float)
        name = col.removeprefix("params.")
        if (x > 0).all() and (x.max() / x.min() >= 4 or name in LOG_SCALE):
            names.append(col.removeprefix("params."))
            cols.append(np.log2(x))
            scales.append("log2")
        else:
            names.append(col.removeprefix("params."))
            cols.append(x)
            scales.append("linear")
    return names, (np.column_stack(cols) if cols else np.empty((len(runs), 0))), scales


def _slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slopes (no intercept column in the result), batched over a leading axis.

    ``x``: (..., n, p), ``y``: (..., n). Resamples where a column is constant give nan.
    """
    xc = x - x.mean(axis=-2, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    beta = (np.linalg.pinv(xc) @ yc[..., None])[..., 0]
    constant = np.ptp(x, axis=-2) == 0
    return np.where(constant, np.nan, beta)


def importance(runs: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Regression importance ranking of the numeric hyperparameters, per metric (see module docstring)."""
    names, x, scales = _design(runs)
    if not names:
        return pd.DataFrame(columns=COLUMNS)
    n, p = x.shape
    joint = n >= p + 3
    method = ("joint least-squares regression on all numeric hyperparameters" if joint
              else "one-variable least-squares regressions (too few runs for a joint fit)")  # fmt: skip
    method += f"; percentile bootstrap over runs ({n_boot})"
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    sd = x.std(axis=0, ddof=1)
    rows = []
    for metric in METRICS:
        y = runs[metric].to_numpy(float)
        if joint:
            est = _slopes(x, y)
            with np.errstate(invalid="ignore"):
                boot = _slopes(x[idx], y[idx])
        else:
            est = np.array([_slopes(x[:, [j]], y)[0] for j in range(p)])
            with np.errstate(invalid="ignore"):
                boot = np.column_stack([_slopes(x[idx][..., [j]], y[idx])[..., 0] for j in range(p)])
        order = np.argsort(-np.abs(est * sd))
        for rank, j in enumerate(order, 1):
            lo, hi = np.nanquantile(boot[:, j], [0.025, 0.975]) if n >= MIN_RUNS_FOR_INTERVALS else (np.nan, np.nan)
            rows.append({"kind": "importance", "hyperparameter": names[j], "metric": metric, "scale": scales[j],
                         "estimate": float(est[j] * sd[j]), "ci_low": float(lo * sd[j]), "ci_high": float(hi * sd[j]),
                         "slope": float(est[j]), "slope_ci_low": float(lo), "slope_ci_high": float(hi),
                         "rank": rank, "n_runs": n, "method": method})  # fmt: skip
    return pd.DataFrame(rows, columns=COLUMNS)
