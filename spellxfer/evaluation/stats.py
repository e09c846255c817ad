"""Uncertainty for evaluation accuracies: 95% intervals, paired base-vs-tuned tests, p-value adjustment.

Every accuracy spellxfer reports is a mean of correct/incorrect verdicts, one or more per item
(K generations per item when sampling). Three facts shape this module:

- With one verdict per item the count of correct items is binomial, so the Wilson score interval
  is exact enough and needs no resampling (``wilson_interval``).
- With K > 1 samples per item the samples of one item are correlated (an easy word is easy every
  time), so treating all samples as independent draws would make the interval too narrow. The
  unit of independence is the item, so ``accuracy_summary`` bootstraps items, not samples.
- Base and fine-tuned models answer the same items, so their comparison is paired:
  ``paired_comparison`` bootstraps per-item differences and runs an exact McNemar test on the
  discordant items, which is far more sensitive than comparing two unpaired intervals.
- Questions about the same word share its difficulty. With ``clusters`` (the item's word) both
  bootstraps resample whole words instead of items (``analyze`` does; ``evaluate`` keeps the
  item-level intervals of its own files).

Resampling is a percentile bootstrap (``bootstrap_sums`` and ``percentile_interval``, what
``scipy.stats.bootstrap(method="percentile")`` computes): a resample is a vector of draw counts,
one per unit, so every statistic here is a ratio of sums, one matrix product per bootstrap. The
counts depend only on the number of units, ``n_boot`` and the seed, and ``analyze`` bootstraps
the same words thousands of times, so they are drawn once and reused (scipy drew them again for
each of those calls: about two thirds of an analysis's time). Adjustment is statsmodels' ``multipletests``
(``holm``) and scipy's ``false_discovery_control`` (``benjamini_hochberg``), for several such
comparisons (one per task or per model) so that the family as a whole keeps its error rate. All
resampling draws from ``np.random.default_rng(seed)``: the same inputs and seed give the same
interval, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests

# Resamples are drawn in blocks of at most this many draws (8-byte indices while drawn, ~80 MB):
# 5000 resamples of a 50 000-item evaluation would otherwise need 2 GB at once.
_BOOTSTRAP_BLOCK_ELEMENTS = 10_000_000
# Draw-count matrices kept for reuse (float32, 4 bytes an element: ~480 MB in all at most); a
# larger one is drawn again block by block on each use.
_RESAMPLE_CACHE_ELEMENTS = 120_000_000
_resample_cache: dict[tuple[int, int, int], list[np.ndarray]] = {}


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``correct / total``.

    Unlike the normal-approximation ("Wald") interval it stays inside [0, 1] and keeps close to its
    nominal coverage at accuracies near 0 or 1 and at small ``total``, both common here.

    Args:
        correct: number of correct verdicts, ``0 <= correct <= total``.
        total: number of verdicts. ``0`` gives ``(nan, nan)``: there is nothing to estimate.
        confidence: two-sided confidence level in (0, 1).

    Returns:
        ``(low, high)`` as floats.
    """
    if total < 0 or not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total, got correct={correct}, total={total}")
    if total == 0:
        return (math.nan, math.nan)
    ci = stats.binomtest(int(correct), int(total)).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def accuracy_summary(
    correct_by_item: Sequence[Sequence[bool]] | np.ndarray,
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    clusters: Sequence | None = None,
) -> dict:
    """Accuracy over items with a confidence interval that respects repeated samples per item.

    Accuracy is the mean over items of each item's fraction of correct samples, so every item
    weighs the same however many samples it has (K may vary between items).

    The interval is Wilson's when every item has exactly one sample. Otherwise it is a percentile
    bootstrap that resamples whole items (a cluster bootstrap): the K samples of one item are not
    independent, and resampling them individually would understate the uncertainty.

    Args:
        correct_by_item: one sequence of 0/1 (or bool) sample outcomes per item. A 2-D array is read
            as items × samples; a 1-D array as one sample per item.
        confidence: two-sided confidence level in (0, 1).
        n_boot: bootstrap resamples (only used when some item has K > 1).
        seed: seed for ``np.random.default_rng``; same inputs and seed give the same interval.
        clusters: one label per item (the item's word): resample whole clusters instead of items,
            since questions about one word are not independent. Always a bootstrap.

    Returns:
        ``{"accuracy", "ci_low", "ci_high", "n", "n_samples", "ci_method"}`` where ``n`` counts
        items, ``n_samples`` counts all samples, and ``ci_method`` is ``"wilson"``,
        ``"item_bootstrap"`` or ``"cluster_bootstrap"``. With no items, accuracy and interval are
        nan and the method is ``"wilson"`` (as ``wilson_interval(0, 0)``).
    """
    items = _as_items(correct_by_item)
    n_samples = sum(len(item) for item in items)
    if clusters is not None:
        per_item = np.array([item.mean() for item in items])
        accuracy = float(per_item.mean()) if items else math.nan
        groups = _as_clusters(clusters, len(items))
        low, high = _percentile_bootstrap_mean(per_item, confidence, n_boot, seed, groups)
        method = "cluster_bootstrap"
    elif all(len(item) == 1 for item in items):
        correct = int(sum(item[0] for item in items))
        low, high = wilson_interval(correct, len(items), confidence)
        accuracy = correct / len(items) if items else math.nan
        method = "wilson"
    else:
        per_item = np.array([item.mean() for item in items])
        accuracy = float(per_item.mean())
        low, high = _percentile_bootstrap_mean(per_item, confidence, n_boot, seed)
        method = "item_bootstrap"
    return {
        "accuracy": float(accuracy),
        "ci_low": low,
        "ci_high": high,
        "n": len(items),
        "n_samples": n_samples,
        "ci_method": method,
    }


def paired_comparison(
    a: Sequence[float],
    b: Sequence[float],
    confidence: float = 0.95,
    n_boot: int = 5000,
    seed: int = 0,
    clusters: Sequence | None = None,
) -> dict:
    """Compare two systems scored on the same items: accuracy difference, its interval, McNemar p.

    ``a`` is typically the base model and ``b`` the fine-tuned one, so a positive ``diff`` means
    fine-tuning helped.

    - ``diff = mean(b) - mean(a)`` uses the scores as given (fractional scores keep their
      information). Its interval is a paired percentile bootstrap: items are resampled and each
      keeps its (a, b) pair, which is the same as bootstrapping the mean of ``b - a`` per item.
    - The exact McNemar test needs right/wrong per item, so each score is binarised as
      right when ``score >= 0.5`` (with K samples: at least half of them correct). ``b_only``
      counts items right in b and wrong in a, ``a_only`` the reverse; under "no difference" each
      discordant item is equally likely to fall either way, so
      ``p = binomtest(b_only, b_only + a_only, 0.5)``, two-sided, and 1.0 when no item is
      discordant. With fractional scores the test and the interval can therefore disagree at the
      margin; with 0/1 scores they describe the same items.

    Args:
        a, b: per-item scores in [0, 1] (0/1 verdicts or per-item mean over K samples), same items
            in the same order.
        confidence: two-sided confidence level in (0, 1) for the interval on ``diff``.
        n_boot: bootstrap resamples.
        seed: seed for ``np.random.default_rng``; same inputs and seed give the same interval.
        clusters: one label per item (its word): resample whole clusters, keeping each item's
            (a, b) pair, since questions about one word are not independent.

    Returns:
        ``{"n", "acc_a", "acc_b", "diff", "ci_low", "ci_high", "b_only", "a_only", "mcnemar_p",
        "ci_method": "paired_bootstrap" | "paired_cluster_bootstrap", "test": "exact McNemar"}``.
        With no items the accuracies, difference and interval are nan and ``mcnemar_p`` is 1.0.

    Raises:
        ValueError: if ``a`` and ``b`` differ in length, are not 1-D, or hold scores outside [0, 1].
    """
    a_arr = _as_scores(a, "a")
    b_arr = _as_scores(b, "b")
    if len(a_arr) != len(b_arr):
        raise ValueError(
            f"paired comparison needs one score per item from each system on the same items; "
            f"got len(a)={len(a_arr)}, len(b)={len(b_arr)}"
        )
    n = len(a_arr)
    differences = b_arr - a_arr
    groups = None if clusters is None else _as_clusters(clusters, n)
    low, high = _percentile_bootstrap_mean(differences, confidence, n_boot, seed, groups)

    a_right = a_arr >= 0.5
    b_right = b_arr >= 0.5
    b_only = int(np.sum(b_right & ~a_right))
    a_only = int(np.sum(a_right & ~b_right))
    discordant = b_only + a_only
    # binomtest rejects n=0; with no discordant items there is no evidence either way.
    p = float(stats.binomtest(b_only, discordant, 0.5).pvalue) if discordant else 1.0

    return {
        "n": n,
        "acc_a": float(a_arr.mean()) if n else math.nan,
        "acc_b": float(b_arr.mean()) if n else math.nan,
        "diff": float(differences.mean()) if n else math.nan,
        "ci_low": low,
        "ci_high": high,
        "b_only": b_only,
        "a_only": a_only,
        "mcnemar_p": p,
        "ci_method": "paired_bootstrap" if clusters is None else "paired_cluster_bootstrap",
        "test": "exact McNemar",
    }


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (family-wise error rate), in the input order.

    ``statsmodels.stats.multitest.multipletests(method="holm")``: reject at level alpha exactly
    where the adjusted p-value is <= alpha.
    """
    p = _as_pvalues(pvalues)
    if len(p) == 0:
        return []
    return multipletests(p, method="holm")[1].tolist()


def benjamini_hochberg(pvalues: Sequence[float]) -> list[float]:
    """Benjamini–Hochberg adjusted p-values (false discovery rate), in the input order.

    Sorted ascending, the i-th smallest (1-based) becomes ``m * p / i``; a running minimum from
    the largest keeps them monotone, and values are clipped to 1. Computed by
    ``scipy.stats.false_discovery_control(method="bh")``.
    """
    p = _as_pvalues(pvalues)
    if len(p) == 0:
        return []
    return np.asarray(stats.false_discovery_control(p, method="bh"), dtype=float).tolist()


def _percentile_bootstrap_mean(
    values: np.ndarray, confidence: float, n_boot: int, seed: int, clusters: np.ndarray | None = None
) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` when its entries (items) are resampled, or,
    with ``clusters`` (one label per entry, e.g. the word), when whole clusters are resampled.

    A cluster's entries move together (the questions about one word share its difficulty), so the
    statistic is the ratio of resampled sums to resampled counts: the mean over entries again.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if len(values) == 0:
        return (math.nan, math.nan)
    if clusters is None:
        sums, counts = values, np.ones(len(values))
    else:
        labels, index = np.unique(np.asarray(clusters), return_inverse=True)
        sums = np.bincount(index, weights=values, minlength=len(labels))
        counts = np.bincount(index, minlength=len(labels)).astype(float)
    if len(sums) == 1:  # one unit: its mean is all there is to resample
        return (float(values.mean()), float(values.mean()))
    resampled = bootstrap_sums(np.column_stack([sums, counts]), n_boot, seed)
    return percentile_interval(resampled[:, 0] / resampled[:, 1], confidence)


def bootstrap_sums(columns: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Each column's sum over resampled units: ``n_boot × k`` for ``columns`` of ``units × k``.

    A resample draws ``units`` units with replacement (``np.random.default_rng(seed)``, in blocks
    of :data:`_BOOTSTRAP_BLOCK_ELEMENTS` draws) and weighs each by how often it was drawn; a unit's
    columns stay together, so several columns give a paired (or clustered) bootstrap.
    """
    columns = np.asarray(columns, dtype=np.float32)
    out = np.empty((n_boot, columns.shape[1]))
    start = 0
    for weights in _resample_counts(columns.shape[0], n_boot, seed):
        out[start : start + len(weights)] = weights @ columns
        start += len(weights)
    return out


def percentile_interval(statistics: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile bootstrap interval of ``statistics`` (one value per resample)."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(statistics, [tail, 100 - tail])
    return (float(low), float(high))


def _resample_counts(n: int, n_boot: int, seed: int):
    """Blocks of the ``n_boot × n`` draw counts (float32): row b, column j is how often resample b
    drew unit j. Kept for the next call with the same ``(n, n_boot, seed)`` when small enough."""
    key = (n, n_boot, seed)
    if key in _resample_cache:
        yield from _resample_cache[key]
        return
    keep = n * n_boot <= _RESAMPLE_CACHE_ELEMENTS
    blocks, rng, rows = [], np.random.default_rng(seed), max(1, _BOOTSTRAP_BLOCK_ELEMENTS // n)
    for start in range(0, n_boot, rows):
        r = min(rows, n_boot - start)
        drawn = rng.integers(0, n, size=(r, n)) + np.arange(r)[:, None] * n
        block = np.bincount(drawn.ravel(), minlength=r * n).reshape(r, n).astype(np.float32)
        if keep:
            blocks.append(block)
        yield block
    if keep:
        while _resample_cache and sum(b.size for v in _resample_cache.values() for b in v) + n * n_boot \
                > _RESAMPLE_CACHE_ELEMENTS:
            _resample_cache.pop(next(iter(_resample_cache)))  # the oldest first
        _resample_cache[key] = blocks


def _as_items(correct_by_item: Sequence[Sequence[bool]] | np.ndarray) -> list[np.ndarray]:
    """One float array of 0/1 outcomes per item; rejects empty items and non-0/1 outcomes."""
    if isinstance(correct_by_item, np.ndarray):
        if correct_by_item.ndim == 1:
            rows = [correct_by_item[i : i + 1] for i in range(len(correct_by_item))]
        elif correct_by_item.ndim == 2:
            rows = list(correct_by_item)
        else:
            raise ValueError(
                f"correct_by_item array must be 1-D (one sample per item) or 2-D (items × samples), "
                f"got shape {correct_by_item.shape}"
            )
    else:
        rows = list(correct_by_item)
    items = []
    for index, row in enumerate(rows):
        outcomes = np.asarray(row, dtype=float)
        if outcomes.ndim != 1 or outcomes.size == 0:
            raise ValueError(f"item {index}: expected a non-empty sequence of sample outcomes, got {row!r}")
        # Fractional values here are almost always per-item means passed by mistake; averaging
        # them again would silently give a different (unweighted) number.
        if not np.all((outcomes == 0) | (outcomes == 1)):
            raise ValueError(f"item {index}: outcomes must be 0/1 or bool, got {row!r}")
        items.append(outcomes)
    return items


def _as_clusters(clusters: Sequence, n: int) -> np.ndarray:
    """One cluster label per item, as text (labels may mix words and ids)."""
    labels = np.asarray([str(c) for c in clusters])
    if len(labels) != n:
        raise ValueError(f"clusters: need one label per item, got {len(labels)} labels for {n} items")
    return labels


def _as_scores(scores: Sequence[float], name: str) -> np.ndarray:
    """A 1-D float array of per-item scores in [0, 1]."""
    arr = np.asarray(scores, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of per-item scores, got shape {arr.shape}")
    bad = np.flatnonzero(~((arr >= 0) & (arr <= 1)))
    if bad.size:
        raise ValueError(f"{name}[{bad[0]}] = {float(arr[bad[0]])}: per-item scores must be in [0, 1]")
    return arr


def _as_pvalues(pvalues: Sequence[float]) -> np.ndarray:
    """A 1-D float array of p-values in [0, 1] (nan rejected: it would break the ordering)."""
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"p-values must be a 1-D sequence, got shape {p.shape}")
    bad = np.flatnonzero(~((p >= 0) & (p <= 1)))
    if bad.size:
        raise ValueError(f"p-value {bad[0]} is {float(p[bad[0]])}; p-values must be in [0, 1]")
    return p
