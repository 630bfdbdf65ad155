"""Statistics checked against scipy and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from robustlab.errors import InputError
from robustlab.stats import (
    bootstrap_ci,
    calibration_error,
    clustered_mcnemar,
    expected_calibration_error,
    holm,
    mcnemar,
)


def _paired(b: int, c: int, both: int = 7, neither: int = 3) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1] * b + [0] * c + [1] * both + [0] * neither, dtype=bool)
    other = np.array([0] * b + [1] * c + [1] * both + [0] * neither, dtype=bool)
    return a, other


@pytest.mark.parametrize(("b", "c"), [(0, 5), (3, 3), (2, 9), (12, 4), (1, 0)])
def test_mcnemar_exact_matches_scipy_binomtest(b, c):
    result = mcnemar(*_paired(b, c))
    assert (result.b, result.c, result.method) == (b, c, "exact")
    assert result.p_value == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)


@pytest.mark.parametrize(("b", "c"), [(30, 12), (20, 20), (60, 41)])
def test_mcnemar_chi2_matches_scipy(b, c):
    result = mcnemar(*_paired(b, c))
    expected_stat = (abs(b - c) - 1) ** 2 / (b + c)
    assert result.method == "chi2-cc"
    assert result.statistic == pytest.approx(expected_stat)
    assert result.p_value == pytest.approx(scipy_stats.chi2.sf(expected_stat, 1), rel=1e-9)


def test_mcnemar_no_discordant_pairs_and_bad_input():
    assert mcnemar([1, 0, 1], [1, 0, 1]).p_value == 1.0
    with pytest.raises(InputError, match="differ in length"):
        mcnemar([1, 0], [1, 0, 1])
    with pytest.raises(InputError, match="boolean"):
        mcnemar([0.5, 1.0], [1.0, 1.0])


def test_clustered_mcnemar_of_one_seed_is_mcnemar_without_continuity_correction():
    a, other = _paired(30, 12)
    result = clustered_mcnemar(a[None], other[None])
    assert (result.b, result.c, result.method) == (30, 12, "clustered")
    assert result.statistic == pytest.approx((30 - 12) ** 2 / 42)
    assert result.p_value == pytest.approx(scipy_stats.chi2.sf((30 - 12) ** 2 / 42, 1), rel=1e-9)


def test_clustered_mcnemar_does_not_count_a_repeated_seed_as_new_evidence():
    """Three identical seeds are one seed's evidence: the pooled counts triple, the statistic must not
    (an ordinary McNemar test on the pooled pairs would triple it)."""
    a, other = _paired(30, 12)
    one = clustered_mcnemar(a[None], other[None])
    three = clustered_mcnemar(np.stack([a] * 3), np.stack([other] * 3))
    assert (three.b, three.c) == (90, 36)
    assert three.statistic == pytest.approx(one.statistic)
    assert mcnemar(np.tile(a, 3), np.tile(other, 3)).statistic > 2.5 * one.statistic


def test_clustered_mcnemar_keeps_its_level_when_images_are_correlated_across_seeds():
    """Under the null (A and B equally good) with images hard or easy for every seed alike, the clustered
    test rejects at about 5%; the naive pooled McNemar test rejects far more often."""
    rng = np.random.default_rng(0)
    trials, seeds, images = 400, 3, 300
    clustered = naive = 0
    for _ in range(trials):
        # per image a shared chance that "only A" or "only B" happens; both equally likely (the null)
        discordant = rng.random(images) < 0.15
        a = np.ones((seeds, images), dtype=bool)
        b = np.ones((seeds, images), dtype=bool)
        who = rng.random(images) < 0.5  # the image's direction, shared by every seed
        flip = discordant[None] & (rng.random((seeds, images)) < 0.9)
        a[flip & ~who[None]] = False
        b[flip & who[None]] = False
        clustered += clustered_mcnemar(a, b).p_value < 0.05
        naive += mcnemar(a.ravel(), b.ravel()).p_value < 0.05
    assert clustered / trials < 0.09
    assert naive / trials > 2 * clustered / trials


def test_clustered_mcnemar_is_exact_with_few_discordant_pairs():
    """The chi-square approximation is too coarse for few discordant pairs: 16 vs 6 pairs, none of them an
    image discordant in two seeds, is McNemar's exact binomial test (p = 0.052, not the approximation's
    0.033); images discordant in several seeds get the exact sign-flip test of their differences."""
    a, other = _paired(16, 6)
    both_seeds_a, both_seeds_other = np.ones((2, a.size), dtype=bool), np.ones((2, a.size), dtype=bool)
    both_seeds_a[0], both_seeds_other[0] = a, other  # seed 0: the 22 discordant images; seed 1: none
    result = clustered_mcnemar(both_seeds_a, both_seeds_other)
    assert (result.b, result.c, result.method) == (16, 6, "clustered-exact")
    assert result.p_value == pytest.approx(scipy_stats.binomtest(6, 22).pvalue, rel=1e-9)
    assert result.p_value > 0.05 > _chi2_sf((16 - 6) ** 2 / 22)

    # image 0 discordant for A in both seeds (d = 2), images 1-4 for A once, image 5 for B once: the sum is
    # 5 = 2 + 4 - 1. Of the 2^6 sign choices, |sum| >= 5 needs the 2 and the five 1s to sum to 3 or 5 with
    # the same sign as the 2 (5 + 1 ways), or the mirror image of one of those: 12 of 64
    a = np.ones((2, 6), dtype=bool)
    b = np.ones((2, 6), dtype=bool)
    b[:, 0] = False
    b[0, 1:5] = False
    a[0, 5] = False
    result = clustered_mcnemar(a, b)
    assert (result.b, result.c) == (6, 1)
    assert result.p_value == pytest.approx(12 / 64)


def _chi2_sf(statistic: float) -> float:
    return float(scipy_stats.chi2.sf(statistic, 1))


def test_clustered_mcnemar_rejects_bad_input():
    with pytest.raises(InputError, match="matrix"):
        clustered_mcnemar([1, 0, 1], [1, 0, 1])
    with pytest.raises(InputError, match="differ in shape"):
        clustered_mcnemar([[1, 0]], [[1, 0], [0, 1]])
    with pytest.raises(InputError, match="boolean"):
        clustered_mcnemar([[0.5, 1.0]], [[1.0, 1.0]])
    assert clustered_mcnemar([[1, 0], [0, 1]], [[1, 0], [0, 1]]).p_value == 1.0


def test_holm_matches_a_hand_computed_family():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == [] and holm([0.2]) == [0.2]
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        holm([0.1, 1.5])


@given(st.lists(st.floats(0, 1), min_size=1, max_size=12))
def test_holm_lies_between_the_raw_p_values_and_bonferroni_and_keeps_their_order(p_values):
    adjusted = holm(p_values)
    m = len(p_values)
    for raw, adj in zip(p_values, adjusted, strict=True):
        assert raw <= adj <= min(1.0, m * raw) + 1e-12
    for i in range(m):
        for j in range(m):
            if p_values[i] < p_values[j]:
                assert adjusted[i] <= adjusted[j]


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = rng.random(100) < 0.7
    large = rng.random(10_000) < 0.7
    lo_s, hi_s = bootstrap_ci(small, n_boot=2000, seed=0)
    lo_l, hi_l = bootstrap_ci(large, n_boot=500, seed=0)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < hi_s - lo_s
    # normal approximation of a binomial proportion: half-width ~ 1.96 * sqrt(p (1 - p) / n)
    half = 1.96 * np.sqrt(large.mean() * (1 - large.mean()) / large.size)
    assert (hi_l - lo_l) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_ci(small, n_boot=300, seed=3) == bootstrap_ci(small, n_boot=300, seed=3)
    assert bootstrap_ci(np.ones(50), n_boot=100) == (1.0, 1.0)


def test_bootstrap_rejects_bad_input():
    with pytest.raises(InputError):
        bootstrap_ci([])
    with pytest.raises(InputError):
        bootstrap_ci([0.0, 2.0])


def test_ece_of_calibrated_toy_is_near_zero_and_overconfident_toy_is_large():
    rng = np.random.default_rng(0)
    n = 20_000
    confidence = rng.uniform(0.1, 1.0, n)
    calibrated = rng.random(n) < confidence  # correct with probability equal to the confidence
    assert calibration_error(confidence, calibrated) < 0.02
    overconfident = rng.random(n) < 0.5  # 50% accurate, 99% confident
    assert calibration_error(np.full(n, 0.99), overconfident) == pytest.approx(0.49, abs=0.02)


def test_expected_calibration_error_from_probabilities_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1, 1])
    # bins of width 1/15: 0.9 -> bin 13, 0.8 -> bin 11, 0.7 -> bin 10, 0.6 -> bin 8: each holds one sample
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(1 - 0.6)) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    # one bin: |mean accuracy - mean confidence|
    assert expected_calibration_error(probs, labels, bins=1) == pytest.approx(abs(0.75 - 0.75))
    with pytest.raises(InputError, match="softmax"):
        expected_calibration_error(torch.tensor([[2.0, 3.0]]), torch.tensor([0]))
