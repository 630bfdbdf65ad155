"""Statistics for honest comparisons: bootstrap intervals, McNemar's paired test (also over several training
seeds), Holm's correction for testing several defences at once, calibration error.

The evaluation protocol (docs/evaluation.md) asks for bootstrap 95% confidence intervals over
test samples, a paired test between two defences on the *same* test samples (McNemar 1947), and the
expected calibration error of Guo et al. (2017, "On Calibration of Modern Neural Networks", eq. 3).
The paper being reproduced reports none of these; they are what make a one-point difference between
two defences interpretable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from robustlab.errors import InputError

#: Below this many discordant pairs McNemar's test uses the exact binomial distribution, above it
#: the chi-square approximation with continuity correction (Edwards 1948), the usual textbook rule.
EXACT_MCNEMAR_BELOW = 25


def _array(values: object, name: str, ndim: int, shape: str) -> np.ndarray:
    """``values`` (tensor, list or array) as a float64 array of ``ndim`` dimensions, or one clear error."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim or array.size == 0:
        raise InputError(f"{name} must be a non-empty {shape}, got shape {array.shape}")
    return array


def _vector(values: object, name: str) -> np.ndarray:
    array = _array(values, name, 1, "1-D vector")
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
        raise InputError(f"{name} must hold per-sample correctness in [0, 1] (booleans or fractions)")
    return array


def bootstrap_ci(
    correct: object, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of a per-sample correctness vector.

    ``correct`` holds one value per test sample (bool, or a fraction for a random defence measured over
    several forward passes). Samples are resampled with replacement ``n_boot`` times; the interval is the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled means.
    """
    values = _vector(correct, "correct")
    if n_boot < 1:
        raise InputError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise InputError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    n = values.size
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // n)  # bound memory to ~16 MB of indices per chunk
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test on paired correctness: ``b`` = only A correct, ``c`` = only B correct."""

    b: int
    c: int
    statistic: float
    p_value: float
    method: str  # "exact" (binomial) or "chi2-cc" (chi-square with continuity correction)


def _chi2_one_dof_p(statistic: float) -> float:
    """Chi-square survival with one degree of freedom: ``P(Z^2 > s) = erfc(sqrt(s / 2))``."""
    return float(math.erfc(math.sqrt(statistic / 2)))


def _binomial_two_sided(k: int, n: int) -> float:
    """Two-sided exact p-value of ``k`` successes in ``n`` fair coin flips (symmetric, so 2 x tail)."""
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def mcnemar(a_correct: object, b_correct: object, exact: bool | None = None) -> McNemarResult:
    """McNemar's test of whether two classifiers have the same accuracy on the same test samples.

    Only discordant samples matter: ``b`` where A is right and B wrong, ``c`` the reverse. Under the null
    hypothesis ``b ~ Binomial(b + c, 1/2)``. ``exact=None`` picks the exact binomial test when
    ``b + c < 25`` and the chi-square statistic ``(|b - c| - 1)^2 / (b + c)`` (1 dof) otherwise.
    """
    a = _vector(a_correct, "a_correct")
    b_vec = _vector(b_correct, "b_correct")
    if a.shape != b_vec.shape:
        raise InputError(f"paired vectors differ in length: {a.size} vs {b_vec.size}")
    if not (np.isin(a, (0, 1)).all() and np.isin(b_vec, (0, 1)).all()):
        raise InputError("McNemar's test needs boolean per-sample correctness (one prediction per sample)")
    b = int(np.sum((a == 1) & (b_vec == 0)))
    c = int(np.sum((a == 0) & (b_vec == 1)))
    n = b + c
    use_exact = n < EXACT_MCNEMAR_BELOW if exact is None else exact
    if n == 0:
        return McNemarResult(b, c, 0.0, 1.0, "exact" if use_exact else "chi2-cc")
    if use_exact:
        return McNemarResult(b, c, float(min(b, c)), _binomial_two_sided(b, n), "exact")
    statistic = (abs(b - c) - 1) ** 2 / n
    return McNemarResult(b, c, float(statistic), _chi2_one_dof_p(statistic), "chi2-cc")


def _correctness_matrix(values: object, name: str) -> np.ndarray:
    array = _array(values, name, 2, "(seeds, samples) matrix")
    if not np.isin(array, (0, 1)).all():
        raise InputError(f"{name} must hold boolean per-sample correctness (one prediction per sample)")
    return array


def clustered_mcnemar(a_correct: object, b_correct: object) -> McNemarResult:
    """McNemar's test pooled over several training seeds evaluated on the same test samples.

    ``a_correct`` and ``b_correct`` are ``(seeds, samples)`` matrices: row ``s`` holds the correctness of
    A's and B's seed-``s`` models on the same test images. Pooling the ``seeds x samples`` pairs into one
    ordinary McNemar test would treat an image's pairs as independent; they are not (an image that is hard
    for one seed is hard for the others), and the pooled p-value would be too small. The test of Durkalski,
    Palesch, Lipsitz & Rust (2003, "Analysis of clustered matched-pair data", Statistics in Medicine 22)
    makes each test image a cluster: with ``d_k = b_k - c_k`` the difference between image ``k``'s
    counts of seeds where only A / only B was right, ``X^2 = (sum_k d_k)^2 / sum_k d_k^2`` is chi-square with
    one degree of freedom under the null. With one seed it is McNemar's statistic without continuity
    correction; ``b`` and ``c`` are the pooled counts.

    With fewer than ``EXACT_MCNEMAR_BELOW`` discordant pairs the chi-square approximation is too coarse
    (as for :func:`mcnemar`), and the p-value is the exact sign-flip (randomisation) test of the same
    clusters instead (method ``clustered-exact``): under the null each image's ``d_k`` is as likely
    ``-d_k``, so ``p = P(|sum_k s_k |d_k|| >= |sum_k d_k|)`` over independent random signs ``s_k``. When
    every ``|d_k|`` is 1 (no image discordant in two seeds) that is McNemar's exact binomial test.
    """
    a = _correctness_matrix(a_correct, "a_correct")
    b_mat = _correctness_matrix(b_correct, "b_correct")
    if a.shape != b_mat.shape:
        raise InputError(f"paired matrices differ in shape: {a.shape} vs {b_mat.shape}")
    only_a = ((a == 1) & (b_mat == 0)).sum(axis=0)
    only_b = ((a == 0) & (b_mat == 1)).sum(axis=0)
    difference = only_a - only_b
    denominator = float(np.sum(difference.astype(np.float64) ** 2))
    b, c = int(only_a.sum()), int(only_b.sum())
    if denominator == 0:
        return McNemarResult(b, c, 0.0, 1.0, "clustered")
    statistic = float(difference.sum()) ** 2 / denominator
    if b + c < EXACT_MCNEMAR_BELOW:
        return McNemarResult(b, c, statistic, _sign_flip_two_sided(difference), "clustered-exact")
    return McNemarResult(b, c, statistic, _chi2_one_dof_p(statistic), "clustered")


def _sign_flip_two_sided(differences: np.ndarray) -> float:
    """``P(|sum_k s_k |d_k|| >= |sum_k d_k|)`` over independent fair signs ``s_k``, computed exactly by
    convolving the integer distribution of the signed sum one cluster at a time."""
    sizes = np.abs(differences[differences != 0]).astype(np.int64)
    total = int(sizes.sum())
    probability = np.zeros(2 * total + 1)  # index: the signed sum + total
    probability[total] = 1.0
    for size in sizes:  # a partial sum never exceeds the sizes so far, so nothing rolls past either end
        probability = (np.roll(probability, size) + np.roll(probability, -size)) / 2
    observed = abs(int(differences.sum()))
    sums = np.arange(-total, total + 1)
    return float(min(1.0, probability[np.abs(sums) >= observed].sum()))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's (1979) step-down adjusted p-values, in the order given.

    Comparing one defence with nine others is nine tests: at p < 0.05 each, one "significant" difference
    is expected by chance alone about a third of the time. Holm's adjustment bounds the chance of *any*
    false rejection in the family by the level, whatever the dependence between the tests: the i-th
    smallest of m p-values is multiplied by (m - i + 1), then made non-decreasing and capped at 1.
    """
    values = [float(p) for p in p_values]
    if any(not 0 <= p <= 1 for p in values):
        raise InputError(f"p-values must lie in [0, 1], got {values}")
    m = len(values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=values.__getitem__)):
        running = max(running, min(1.0, (m - rank) * values[index]))
        adjusted[index] = running
    return adjusted


def calibration_error(confidence: object, correct: object, bins: int = 15) -> float:
    """ECE from per-sample top-1 confidence and correctness: sum_b |B|/N * |acc(B) - conf(B)|.

    Bins are equal-width over [0, 1], right-closed (a confidence of exactly 1 falls in the last bin).
    """
    conf = _vector(confidence, "confidence")
    hit = _vector(correct, "correct")
    if conf.shape != hit.shape:
        raise InputError(f"confidence and correct differ in length: {conf.size} vs {hit.size}")
    if bins < 1:
        raise InputError(f"bins must be >= 1, got {bins}")
    index = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.sum() / conf.size * abs(hit[members].mean() - conf[members].mean())
    return float(total)


def expected_calibration_error(probs: object, labels: object, bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017, eq. 3) of class probabilities ``probs`` (N, C).

    The confidence of a sample is its largest probability and it counts as correct when that class is
    the label. 0 is perfect calibration; an overconfident model scores close to conf - acc.
    """
    p = torch.as_tensor(probs, dtype=torch.float64)
    y = torch.as_tensor(labels)
    if p.dim() != 2 or y.dim() != 1 or p.shape[0] != y.shape[0] or p.shape[0] == 0:
        raise InputError(f"probs must be (N, C) and labels (N,), got {tuple(p.shape)} and {tuple(y.shape)}")
    if not torch.isfinite(p).all() or p.min() < 0 or (p.sum(1) - 1).abs().max() > 1e-3:
        raise InputError("probs must be finite probabilities whose rows sum to 1 (apply softmax first)")
    confidence, predicted = p.max(1)
    return calibration_error(confidence.numpy(), (predicted == y).double().numpy(), bins)
