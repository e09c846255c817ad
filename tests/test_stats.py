"""Intervals, paired tests and p-value adjustment against closed forms and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from spellxfer.evaluation.stats import (
    accuracy_summary,
    benjamini_hochberg,
    holm,
    paired_comparison,
    wilson_interval,
)


def wilson_closed_form(correct: int, total: int, confidence: float) -> tuple[float, float]:
    """(p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n), written out independently of scipy."""
    z = norm.ppf(1 - (1 - confidence) / 2)
    p, n = correct / total, total
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return ((centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n))


# --- wilson_interval -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("correct", "total", "confidence"),
    [(7, 10, 0.95), (0, 10, 0.95), (10, 10, 0.95), (37, 120, 0.90)],
)
def test_wilson_matches_closed_form(correct, total, confidence):
    assert wilson_interval(correct, total, confidence) == pytest.approx(
        wilson_closed_form(correct, total, confidence), abs=1e-12
    )


def test_wilson_7_of_10_reference_numbers():
    # z = 1.959964: (0.7 + 0.192073 ± 0.342874) / 1.384146
    assert wilson_interval(7, 10) == pytest.approx((0.396778, 0.892209), abs=1e-6)


def test_wilson_with_no_trials_is_nan():
    low, high = wilson_interval(0, 0)
    assert math.isnan(low) and math.isnan(high)


def test_wilson_rejects_impossible_counts():
    with pytest.raises(ValueError, match="correct=11, total=10"):
        wilson_interval(11, 10)


# --- accuracy_summary ------------------------------------------------------------------------


def test_one_sample_per_item_is_the_wilson_interval():
    outcomes = [[True]] * 7 + [[False]] * 3
    summary = accuracy_summary(outcomes)
    low, high = wilson_interval(7, 10)
    assert summary == {
        "accuracy": 0.7,
        "ci_low": low,
        "ci_high": high,
        "n": 10,
        "n_samples": 10,
        "ci_method": "wilson",
    }
    # A 1-D array and an items × 1 array mean the same thing.
    assert accuracy_summary(np.array([1] * 7 + [0] * 3)) == summary
    assert accuracy_summary(np.array([[1]] * 7 + [[0]] * 3)) == summary


def test_k_samples_use_item_bootstrap_around_the_point_estimate():
    rng = np.random.default_rng(1)
    outcomes = rng.random((50, 3)) < 0.6
    summary = accuracy_summary(outcomes)
    assert summary["ci_method"] == "item_bootstrap"
    assert summary["n"] == 50 and summary["n_samples"] == 150
    assert summary["accuracy"] == pytest.approx(outcomes.mean())
    assert summary["ci_low"] < summary["accuracy"] < summary["ci_high"]


def test_accuracy_averages_items_not_samples():
    # Item means 1.0 and 0.0 -> 0.5; pooling the 4 samples would give 0.25.
    summary = accuracy_summary([[True], [False, False, False]])
    assert summary["accuracy"] == 0.5
    assert summary["n"] == 2 and summary["n_samples"] == 4
    assert summary["ci_method"] == "item_bootstrap"


def test_duplicating_samples_within_items_changes_nothing_but_the_sample_count():
    outcomes = [[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0], [1, 0, 0]]
    doubled = [item + item for item in outcomes]
    once, twice = accuracy_summary(outcomes), accuracy_summary(doubled)
    assert twice["accuracy"] == once["accuracy"] == pytest.approx(7 / 15)
    # Same per-item means and seed -> the same resamples, so the same interval.
    assert (twice["ci_low"], twice["ci_high"]) == (once["ci_low"], once["ci_high"])
    assert (once["n_samples"], twice["n_samples"]) == (15, 30)


def test_item_bootstrap_is_wider_than_treating_samples_as_independent():
    # Every item is answered the same way on all 3 samples: there are really 40 observations,
    # not 120, and the interval must reflect 40.
    outcomes = [[True] * 3] * 20 + [[False] * 3] * 20
    summary = accuracy_summary(outcomes, n_boot=4000)
    item_width = summary["ci_high"] - summary["ci_low"]
    pooled_low, pooled_high = wilson_interval(60, 120)
    per_item_low, per_item_high = wilson_interval(20, 40)
    assert item_width > 1.5 * (pooled_high - pooled_low)
    assert item_width == pytest.approx(per_item_high - per_item_low, rel=0.15)


def test_accuracy_summary_rejects_empty_items_and_fractional_outcomes():
    with pytest.raises(ValueError, match="item 1"):
        accuracy_summary([[True], []])
    with pytest.raises(ValueError, match="item 0: outcomes must be 0/1"):
        accuracy_summary([[0.5]])


def test_accuracy_summary_of_no_items_is_nan():
    summary = accuracy_summary([])
    assert summary["n"] == 0 and summary["n_samples"] == 0
    assert all(math.isnan(summary[key]) for key in ("accuracy", "ci_low", "ci_high"))


# --- paired_comparison -----------------------------------------------------------------------


def test_paired_comparison_on_a_constructed_improvement():
    # a right on items 0-39; b right on the same 40 plus items 40-59.
    a = [1] * 40 + [0] * 60
    b = [1] * 60 + [0] * 40
    result = paired_comparison(a, b)
    assert result["n"] == 100
    assert result["acc_a"] == 0.4 and result["acc_b"] == 0.6
    assert result["diff"] == pytest.approx(0.2)
    assert (result["b_only"], result["a_only"]) == (20, 0)
    # All 20 discordant items favour b: two-sided exact p = 2 * 0.5**20.
    assert result["mcnemar_p"] == pytest.approx(2 * 0.5**20, rel=1e-12)
    assert 0 < result["ci_low"] < 0.2 < result["ci_high"]
    assert result["ci_method"] == "paired_bootstrap" and result["test"] == "exact McNemar"


def test_mcnemar_with_discordance_both_ways():
    # 8 items only b gets right, 2 only a: p = 2 * (C(10,0) + C(10,1) + C(10,2)) / 2**10 = 112/1024.
    a = [1] * 2 + [0] * 8 + [1] * 5 + [0] * 5
    b = [0] * 2 + [1] * 8 + [1] * 5 + [0] * 5
    result = paired_comparison(a, b)
    assert (result["b_only"], result["a_only"]) == (8, 2)
    assert result["mcnemar_p"] == pytest.approx(112 / 1024, rel=1e-12)
    assert result["diff"] == pytest.approx(0.3)


def test_identical_systems_have_zero_difference_and_p_one():
    scores = [1, 0, 1, 1, 0, 0.5, 1 / 3]
    result = paired_comparison(scores, scores)
    assert result["diff"] == 0.0
    assert (result["ci_low"], result["ci_high"]) == (0.0, 0.0)
    assert (result["b_only"], result["a_only"]) == (0, 0)
    assert result["mcnemar_p"] == 1.0


def test_bootstrap_interval_separates_a_large_effect_from_a_null_one():
    rng = np.random.default_rng(7)
    a = (rng.random(300) < 0.4).astype(float)
    better = np.where(rng.random(300) < 0.5, 1.0, a)  # b fixes about half the misses
    large = paired_comparison(a, better)
    assert large["ci_low"] > 0 and large["mcnemar_p"] < 1e-6

    # Same accuracy, different items: 15 items flip each way.
    a_null = np.array([1] * 15 + [0] * 15 + [1] * 35 + [0] * 35, dtype=float)
    b_null = np.array([0] * 15 + [1] * 15 + [1] * 35 + [0] * 35, dtype=float)
    null = paired_comparison(a_null, b_null)
    assert null["diff"] == 0.0
    assert null["ci_low"] < 0 < null["ci_high"]
    assert null["mcnemar_p"] == 1.0  # 15 vs 15 is the most balanced split possible


def test_fractional_scores_keep_their_mean_but_binarise_at_one_half_for_mcnemar():
    # Per-item means over K=3 samples. Item 0: 1/3 -> 2/3 (wrong -> right); item 1: 1/2 counts as
    # right in both; item 2: 2/3 -> 1/3 (right -> wrong); item 3: 0 -> 1/3 (wrong in both).
    a = [1 / 3, 0.5, 2 / 3, 0.0]
    b = [2 / 3, 0.5, 1 / 3, 1 / 3]
    result = paired_comparison(a, b)
    assert result["diff"] == pytest.approx((1 / 3 + 0 - 1 / 3 + 1 / 3) / 4)
    assert (result["b_only"], result["a_only"]) == (1, 1)
    assert result["mcnemar_p"] == 1.0


def test_paired_comparison_rejects_mismatched_lengths_and_out_of_range_scores():
    with pytest.raises(ValueError, match=r"len\(a\)=3, len\(b\)=2"):
        paired_comparison([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match=r"b\[1\] = 2.0"):
        paired_comparison([1, 0], [1, 2])


# --- determinism ---------------------------------------------------------------------------


def test_same_seed_same_interval_different_seed_different_interval():
    rng = np.random.default_rng(3)
    outcomes = rng.random((80, 4)) < 0.55
    # Continuous per-item scores: with 0/1 scores the percentile endpoints sit on a 1/n grid and
    # two seeds can land on the same grid points.
    a = rng.random(80)
    b = np.clip(a + rng.normal(0.1, 0.2, 80), 0, 1)

    assert accuracy_summary(outcomes, seed=11) == accuracy_summary(outcomes, seed=11)
    assert paired_comparison(a, b, seed=11) == paired_comparison(a, b, seed=11)

    # The seed is really used: another seed moves the bootstrap endpoints.
    assert accuracy_summary(outcomes, seed=11) != accuracy_summary(outcomes, seed=12)
    assert paired_comparison(a, b, seed=11) != paired_comparison(a, b, seed=12)


# --- multiple-comparison adjustment --------------------------------------------------------

PVALUES = [0.01, 0.04, 0.03, 0.20]


def test_holm_by_hand():
    # Sorted: 0.01, 0.03, 0.04, 0.20 times 4, 3, 2, 1 -> 0.04, 0.09, 0.08, 0.20;
    # running max -> 0.04, 0.09, 0.09, 0.20; back to input order.
    assert holm(PVALUES) == pytest.approx([0.04, 0.09, 0.09, 0.20], abs=1e-12)


def test_benjamini_hochberg_by_hand():
    # Sorted: 0.01*4/1, 0.03*4/2, 0.04*4/3, 0.20*4/4 -> 0.04, 0.06, 0.0533, 0.20;
    # running min from the top -> 0.04, 0.0533, 0.0533, 0.20; back to input order.
    assert benjamini_hochberg(PVALUES) == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.20], abs=1e-12)


def test_adjustments_clip_to_one_and_handle_edge_cases():
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    assert benjamini_hochberg([0.9, 0.95]) == pytest.approx([0.95, 0.95])
    assert holm([]) == [] and benjamini_hochberg([]) == []
    assert holm([0.03]) == [0.03] and benjamini_hochberg([0.03]) == [0.03]
    with pytest.raises(ValueError, match="p-value 1 is nan"):
        holm([0.1, float("nan")])


# --- word clusters (analyze resamples words, not items) ------------------------------------


def test_one_item_per_cluster_is_the_item_bootstrap_exactly():
    rng = np.random.default_rng(5)
    a, b = rng.random(120), rng.random(120)
    labels = [f"w{i:04d}" for i in range(120)]  # sorted like the items: the same resamples
    assert paired_comparison(a, b, clusters=labels)["ci_low"] == paired_comparison(a, b)["ci_low"]
    outcomes = (rng.random(120) < 0.4).tolist()
    items = accuracy_summary([[o] for o in outcomes], clusters=labels)
    assert items["ci_method"] == "cluster_bootstrap" and items["accuracy"] == pytest.approx(np.mean(outcomes))


def test_clusters_of_identical_items_widen_the_interval_by_about_the_square_root_of_their_size():
    rng = np.random.default_rng(9)
    per_word = (rng.random(150) < 0.3).astype(float)
    items = np.repeat(per_word, 4)  # four questions per word, all answered alike
    words = np.repeat(np.arange(150), 4)
    naive = accuracy_summary(items[:, None], n_boot=4000)  # Wilson, as if 600 independent items
    clustered = accuracy_summary([[v] for v in items], n_boot=4000, clusters=words)
    ratio = (clustered["ci_high"] - clustered["ci_low"]) / (naive["ci_high"] - naive["ci_low"])
    assert 1.6 < ratio < 2.4  # sqrt(4) = 2: 150 independent words, not 600 items
    d = paired_comparison(np.zeros(600), items, n_boot=4000, clusters=words)
    assert d["ci_method"] == "paired_cluster_bootstrap" and d["ci_low"] < d["diff"] < d["ci_high"]


def test_clusters_must_label_every_item():
    with pytest.raises(ValueError, match="one label per item"):
        paired_comparison([0, 1, 1], [1, 1, 0], clusters=["a", "b"])


def test_the_cluster_bootstrap_interval_is_scipys_percentile_bootstrap_of_the_same_ratio():
    # bootstrap_sums draws resample counts itself (once per units × n_boot × seed, then reused);
    # with many resamples its interval must agree with scipy.stats.bootstrap's on the same statistic
    from scipy import stats as sps

    rng = np.random.default_rng(3)
    words = rng.integers(0, 150, size=600)
    correct = (rng.random(600) < 0.3 + 0.4 * (words % 2)).astype(float)
    ours = accuracy_summary(correct[:, None], n_boot=20_000, seed=1, clusters=words)
    _, index = np.unique(words, return_inverse=True)
    sums, counts = np.bincount(index, weights=correct), np.bincount(index).astype(float)
    ref = sps.bootstrap(
        (sums, counts), lambda s, c, axis=-1: s.sum(axis) / c.sum(axis), paired=True, vectorized=True,
        n_resamples=20_000, method="percentile", rng=np.random.default_rng(2),
    ).confidence_interval
    assert ours["ci_low"] == pytest.approx(ref.low, abs=0.006)
    assert ours["ci_high"] == pytest.approx(ref.high, abs=0.006)
    assert ours["ci_low"] < correct.mean() < ours["ci_high"]


def test_reused_resample_counts_give_the_interval_drawn_afresh_bit_for_bit(monkeypatch):
    from spellxfer.evaluation import stats as st

    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 2, 500).astype(float), rng.integers(0, 2, 500).astype(float)
    words = rng.integers(0, 200, 500)
    st._resample_cache.clear()
    first = paired_comparison(a, b, n_boot=3000, seed=7, clusters=words)
    assert st._resample_cache  # kept for the next bootstrap of as many words
    again = paired_comparison(a, b, n_boot=3000, seed=7, clusters=words)
    monkeypatch.setattr(st, "_RESAMPLE_CACHE_ELEMENTS", 0)  # too large to keep: drawn block by block
    monkeypatch.setattr(st, "_BOOTSTRAP_BLOCK_ELEMENTS", 1_000)
    st._resample_cache.clear()
    fresh = paired_comparison(a, b, n_boot=3000, seed=7, clusters=words)
    assert not st._resample_cache
    for key in ("ci_low", "ci_high"):
        assert first[key] == again[key]
        assert fresh[key] == first[key]  # smaller blocks draw the same stream, row after row
    counts = np.vstack(list(st._resample_counts(200, 50, 0)))
    assert counts.shape == (50, 200) and (counts.sum(axis=1) == 200).all()  # each resample draws 200
