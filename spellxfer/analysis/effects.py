"""Across-configuration statistics: position–count correlations and hyperparameter effects, with intervals.

The unit here is the *configuration*: one row per sampled hyperparameter setting, its metrics the
mean over the seeds it was trained with (one seed: the run itself). A configuration's mean already
carries its item-sampling and seed noise, so the spread between configurations includes both.

- ``correlations``: Pearson and Spearman correlation of position and count accuracy across
  configurations, and of their base → fine-tuned deltas, each with a percentile bootstrap interval
  over configurations (``scipy.stats.bootstrap``, ``n_boot`` resamples from
  ``np.random.default_rng(seed)``: same inputs and seed, same interval) and the usual p-value.
- ``marginal_means``: the mean of each metric over the configurations that share a hyperparameter
  value (values binned into quartiles when a numeric hyperparameter has more than 6 distinct
  values), with a bootstrap interval over those configurations.
- ``importance``: an ordinary least-squares regression of each metric on all numeric
  hyperparameters and training patterns at once (statsmodels ``OLS``; scale parameters such as
  ``learning_rate`` or ``lora_r`` on a log2 scale) with HC3 heteroskedasticity-robust standard
  errors and t intervals. The training patterns enter as regressors too (``_design``):
  ``variants`` and ``separator`` as treatment-coded dummies against a reference level
  (``REFERENCE``: spell; any), one row per dummy named ``variants=all`` with ``reference``
  ``variants=spell``, and ``distinct_words`` on a log2 scale with null meaning every training word
  (``all_words``, 22,873 in the ``full`` build with seed 0). ``slope`` is the change in the metric
  per doubling (log2 scale), per unit (linear) or against the reference level (dummy);
  ``estimate`` is the standardized coefficient, the change per standard deviation of the
  regressor across the sweep, and regressors are ranked by its absolute value. ``p_adj`` is
  Holm's adjustment across the slopes of ONE endpoint and scoring (the pre-registered family,
  ``family`` = ``<scoring>/slopes/<metric>``), so "its interval excludes 0" and "significant" are
  different claims: the report uses ``p_adj``. With too few configurations for a joint fit (fewer
  than regressors + 3) each regressor gets its own one-variable regression instead, and
  ``method`` says so.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import statsmodels.api as sm
from scipy import stats

from spellxfer.evaluation.stats import holm

SECONDARY = ("position_accuracy", "count_accuracy")
"""Secondary endpoints: the two task totals (each mixes two subtasks that can move apart)."""
SUMMARY = ("transfer_score",)
"""Reported, never tested: the mean of the two totals."""
# hyperparameter_effects.csv: marginal means and importance rows share these columns (blank where n/a),
# and keep them when a sweep has nothing to estimate (one run, or no hyperparameter that varies).
COLUMNS = [
    "kind",
    "scoring",
    "hyperparameter",
    "reference",
    "value",
    "metric",
    "endpoint",
    "scale",
    "estimate",
    "ci_low",
    "ci_high",
    "slope",
    "slope_ci_low",
    "slope_ci_high",
    "p_value",
    "p_adj",
    "family",
    "rank",
    "n_configs",
    "n_runs",
    "method",
]
MAX_LEVELS = 6  # more distinct values than this → quartile bins
REFERENCE = {"variants": "spell", "separator": "any"}
"""Text training patterns → the reference level their treatment-coded dummies are measured against
(the plainest pattern: spelling only, any separator)."""
ALL_WORDS = 22_873
"""Training words of the ``full`` build with seed 0: what ``distinct_words: null`` (every word) means."""
NULL_MEANS_ALL = ("distinct_words",)


def with_all_words(units: pd.DataFrame, all_words: int = ALL_WORDS) -> pd.DataFrame:
    """``params.distinct_words`` null (every training word) as the number ``all_words``."""
    units = units.copy()
    for name in NULL_MEANS_ALL:
        col = f"params.{name}"
        if col in units:
            units[col] = pd.to_numeric(units[col], errors="coerce").fillna(all_words)
    return units


def endpoint_of(metric: str) -> str:
    """``primary`` (a subtask), ``secondary`` (a task total) or ``summary`` (transfer_score)."""
    return "primary" if "/" in metric else "secondary" if metric in SECONDARY else "summary"


def metrics_of(table: pd.DataFrame) -> list[str]:
    """The endpoints a table carries, primary (subtasks) first, then the totals and transfer_score."""
    subtasks = sorted(
        c
        for c in table.columns
        if "/" in c and c.endswith("_accuracy") and not c.startswith(("val/", "test/"))
    )
    return [*subtasks, *(m for m in (*SECONDARY, *SUMMARY) if m in table.columns)]


def bootstrap_ci(
    statistic, columns: list[np.ndarray], n_boot: int, seed: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of ``statistic(*columns)`` when units (rows, shared by all columns) are resampled.

    ``scipy.stats.bootstrap`` with ``paired=True``: ``statistic`` is vectorised over the last
    axis. Resamples where it is undefined (nan, e.g. a correlation of a constant) are dropped;
    with fewer than 2 units, or more than half the resamples undefined, the interval is nan.
    """
    columns = [np.asarray(c, dtype=float) for c in columns]
    if len(columns[0]) < 2:
        return (math.nan, math.nan)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about nan endpoints; handled below
        res = stats.bootstrap(
            columns,
            lambda *c, axis=-1: statistic(*c),
            paired=True,
            vectorized=True,
            n_resamples=n_boot,
            confidence_level=confidence,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    low, high = res.confidence_interval
    if np.isfinite(low) and np.isfinite(high):
        return (float(low), float(high))
    values = res.bootstrap_distribution[np.isfinite(res.bootstrap_distribution)]
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


def correlations(units: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Position vs count across configurations: accuracies and base → fine-tuned deltas.

    Both Pearson and Spearman correlations, each with its interval and p-value.
    """
    rows = []
    for quantity, suffix in (("accuracy", ""), ("delta", "_delta")):
        x = units[f"position_accuracy{suffix}"].to_numpy(float)
        y = units[f"count_accuracy{suffix}"].to_numpy(float)
        for method, stat, test in (
            ("pearson", _pearson, stats.pearsonr),
            ("spearman", _spearman, stats.spearmanr),
        ):
            defined = len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0
            r, p = (float(v) for v in test(x, y)) if defined else (math.nan, math.nan)
            low, high = bootstrap_ci(stat, [x, y], n_boot, seed) if defined else (math.nan, math.nan)
            rows.append(
                {
                    "x_metric": "position_accuracy",
                    "y_metric": "count_accuracy",
                    "quantity": quantity,
                    "method": method,
                    "estimate": r,
                    "ci_low": low,
                    "ci_high": high,
                    "p_value": p,
                    "n_configs": len(x),
                    "n_runs": int(units["n_seeds"].sum()) if "n_seeds" in units else len(x),
                }
            )
    return pd.DataFrame(rows)


def hyperparameters(units: pd.DataFrame) -> list[str]:
    """The ``params.*`` columns that vary across configurations (a constant cannot have an effect)."""
    return [
        c for c in units.columns if c.startswith("params.") and units[c].astype(str).nunique(dropna=True) >= 2
    ]


def _levels(values: pd.Series) -> pd.Series:
    """One label per configuration: the value itself.

    A numeric hyperparameter with many values is binned into quartiles instead.
    """
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all() and numeric.nunique() > MAX_LEVELS:
        bins = pd.qcut(numeric, 4, duplicates="drop")
        return bins.map(lambda iv: f"{iv.left:.3g}–{iv.right:.3g}").astype(str)
    return values.map(_fmt_value)


def _fmt_value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _level_order(labels: pd.Series, values: pd.Series) -> list[str]:
    """Levels sorted by the hyperparameter's value (numerically when it is a number)."""
    first = pd.DataFrame(
        {"label": labels, "v": pd.to_numeric(values, errors="coerce"), "s": values.astype(str)}
    )
    first = first.groupby("label", sort=False).min(numeric_only=False)
    key = "v" if first["v"].notna().all() else "s"
    return list(first.sort_values(key).index)


def _n_runs(group: pd.DataFrame) -> int:
    return int(group["n_seeds"].sum()) if "n_seeds" in group else len(group)


def marginal_means(
    units: pd.DataFrame, n_boot: int, seed: int, scoring: str = "generation", all_words: int = ALL_WORDS
) -> pd.DataFrame:
    """Mean of each metric per hyperparameter value.

    Each mean carries a bootstrap interval over the configurations at that value
    (``distinct_words`` null counted as ``all_words``).
    """
    units = with_all_words(units, all_words)
    rows = []
    for col in hyperparameters(units):
        present = units[units[col].notna()]
        labels = _levels(present[col])
        for level in _level_order(labels, present[col]):
            group = present[labels == level]
            for metric in metrics_of(units):
                y = group[metric].to_numpy(float)
                low, high = bootstrap_ci(_mean, [y], n_boot, seed)
                rows.append(
                    {
                        "kind": "marginal_mean",
                        "scoring": scoring,
                        "hyperparameter": col.removeprefix("params."),
                        "value": level,
                        "metric": metric,
                        "endpoint": endpoint_of(metric),
                        "estimate": float(y.mean()),
                        "ci_low": low,
                        "ci_high": high,
                        "n_configs": len(y),
                        "n_runs": _n_runs(group),
                        "method": (
                            f"mean over configurations; percentile bootstrap over configurations ({n_boot})"
                        ),
                    }
                )
    return pd.DataFrame(rows, columns=COLUMNS)


LOG_SCALE = {
    "learning_rate",
    "lora_r",
    "lora_alpha",
    "batch_size",
    "accumulate_grad_batches",
    "max_steps",
    "distinct_words",
}
"""Hyperparameters searched on doubling grids: effects are reported per doubling, whatever the range."""
MIN_RUNS_FOR_INTERVALS = 5
"""Fewer configurations than this: a regression across them cannot give a meaningful interval (HC3
needs each point's leverage below 1), so importance intervals are left empty (nan)."""


def _design(units: pd.DataFrame) -> tuple[list[str], np.ndarray, list[str], list[str | None]]:
    """Regression columns: names, matrix (configurations × regressors), scales and references.

    Numeric hyperparameters are one column each (log2 on doubling grids); the text training
    patterns in ``REFERENCE`` are one 0/1 column per non-reference level (``variants=all``);
    any other text hyperparameter, or one missing in some configurations, gets marginal means only.
    """
    names, cols, scales, refs = [], [], [], []
    for col in hyperparameters(units):
        name = col.removeprefix("params.")
        values = units[col]
        if name in REFERENCE and values.notna().all():
            ref = REFERENCE[name]
            levels = sorted(set(values.astype(str)) - {ref})
            if ref not in set(values.astype(str)):  # no configuration at the reference: the first level is it
                ref, levels = levels[0], levels[1:]
            for level in levels:
                names.append(f"{name}={level}")
                cols.append((values.astype(str) == level).to_numpy(float))
                scales.append("indicator")
                refs.append(f"{name}={ref}")
            continue
        if values.map(lambda v: isinstance(v, bool)).all():
            values = values.astype(int)
        x = pd.to_numeric(values, errors="coerce")
        if x.isna().any():
            continue  # categorical or missing in some configurations: marginal means only
        x = x.to_numpy(float)
        log = bool((x > 0).all() and (x.max() / x.min() >= 4 or name in LOG_SCALE))
        names.append(name)
        cols.append(np.log2(x) if log else x)
        scales.append("log2" if log else "linear")
        refs.append(None)
    return names, (np.column_stack(cols) if cols else np.empty((len(units), 0))), scales, refs


def _ols_hc3(
    x: np.ndarray, y: np.ndarray, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slopes (no intercept), their HC3 t intervals (k × 2) and p-values, by statsmodels OLS."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        # leverage 1 (a point that alone fixes a slope) warns and gives nan intervals, said below
        warnings.simplefilter("ignore")
        fit = sm.OLS(y, sm.add_constant(x, has_constant="add")).fit(cov_type="HC3", use_t=True)
        ci = np.asarray(fit.conf_int(alpha=1 - confidence))[1:]
        p = np.asarray(fit.pvalues)[1:]
    return np.asarray(fit.params)[1:], ci, p


def importance(units: pd.DataFrame, scoring: str = "generation", all_words: int = ALL_WORDS) -> pd.DataFrame:
    """Regression importance ranking of the hyperparameters and training patterns, per metric.

    The model and its assumptions are in the module docstring.
    """
    names, x, scales, refs = _design(with_all_words(units, all_words))
    if not names:
        return pd.DataFrame(columns=COLUMNS)
    n, p = x.shape
    joint = n >= p + 3
    method = (
        "joint OLS on all numeric hyperparameters and training-pattern dummies"
        if joint
        else "one-variable OLS regressions (too few configurations for a joint fit)"
    )
    method += (
        "; HC3 robust standard errors, t intervals (statsmodels); "
        "Holm across the slopes of one endpoint and scoring"
    )
    sd = x.std(axis=0, ddof=1)
    rows = []
    for metric in metrics_of(units):
        y = units[metric].to_numpy(float)
        if joint:
            est, ci, pv = _ols_hc3(x, y)
        else:
            fits = [_ols_hc3(x[:, [j]], y) for j in range(p)]
            est = np.array([f[0][0] for f in fits])
            ci = np.array([f[1][0] for f in fits])
            pv = np.array([f[2][0] for f in fits])
        if n < MIN_RUNS_FOR_INTERVALS:
            ci, pv = np.full((p, 2), np.nan), np.full(p, np.nan)
        order = np.argsort(-np.abs(est * sd))
        for rank, j in enumerate(order, 1):
            lo, hi = ci[j]
            rows.append(
                {
                    "kind": "importance",
                    "scoring": scoring,
                    "hyperparameter": names[j],
                    "reference": refs[j],
                    "metric": metric,
                    "endpoint": endpoint_of(metric),
                    "scale": scales[j],
                    "estimate": float(est[j] * sd[j]),
                    "ci_low": float(lo * sd[j]),
                    "ci_high": float(hi * sd[j]),
                    "slope": float(est[j]),
                    "slope_ci_low": float(lo),
                    "slope_ci_high": float(hi),
                    "p_value": float(pv[j]),
                    "rank": rank,
                    "n_configs": n,
                    "n_runs": _n_runs(units),
                    "method": method,
                }
            )
    out = pd.DataFrame(rows, columns=COLUMNS)
    out["family"] = out["family"].astype(object)
    # the pre-registered family: the slopes of one endpoint under one scoring
    for metric, g in out[out["endpoint"].isin(["primary", "secondary"]) & out["p_value"].notna()].groupby(
        "metric"
    ):
        out.loc[g.index, "p_adj"] = holm(g["p_value"].clip(0, 1).tolist())
        out.loc[g.index, "family"] = f"{scoring}/slopes/{metric}"
    return out
