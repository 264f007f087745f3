"""orchestrator.report.stats: intervals, paired bootstrap, paired t, detectable difference.

Expected numbers are computed by hand (closed forms for Student t with df = 2) or by a slow explicit
reference implementation of the bootstrap, never by calling the function under test twice.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.report import stats
from orchestrator.report.stats import (Interval, PairedComparison, detectable_difference, paired_bootstrap,
                                       paired_seed_t_interval, t_interval)


def t2_quantile(p: float) -> float:
    """Student t quantile for df = 2, closed form: (2p - 1) / sqrt(2 p (1 - p))."""
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


def t2_cdf(t: float) -> float:
    """Student t CDF for df = 2, closed form: 1/2 + t / (2 sqrt(2 + t^2))."""
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


def test_closed_forms_match_tables():
    # Guards the helpers themselves against the printed t table values.
    assert t2_quantile(0.975) == pytest.approx(4.302652729749462, rel=1e-12)
    assert t2_quantile(0.95) == pytest.approx(2.9199855803537242, rel=1e-12)


# --- t_interval -----------------------------------------------------------------------------------

def test_t_interval_three_values():
    iv = t_interval([1, 2, 3])
    half = 4.302652729749462 * 1.0 / math.sqrt(3)  # s = 1 for [1, 2, 3]
    assert isinstance(iv, Interval)
    assert iv.mean == 2.0 and iv.n == 3
    assert iv.low == pytest.approx(2.0 - half, rel=1e-12)
    assert iv.high == pytest.approx(2.0 + half, rel=1e-12)
    assert iv.low == pytest.approx(-0.4841377, abs=1e-6)
    assert "t-interval over 3 seeds" in iv.method


def test_t_interval_confidence_90_uses_t_095():
    iv = t_interval([1, 2, 3], confidence=0.9)
    half = 2.9199855803537242 / math.sqrt(3)
    assert iv.low == pytest.approx(2.0 - half, rel=1e-12)
    assert iv.high == pytest.approx(2.0 + half, rel=1e-12)


def test_t_interval_single_value_has_nan_bounds():
    iv = t_interval([0.7])
    assert iv.mean == 0.7 and iv.n == 1
    assert math.isnan(iv.low) and math.isnan(iv.high)


def test_t_interval_empty_is_nan():
    iv = t_interval([])
    assert iv.n == 0 and math.isnan(iv.mean) and math.isnan(iv.low) and math.isnan(iv.high)
    assert t_interval([math.nan]).n == 0


def test_t_interval_drops_nans():
    iv = t_interval([1.0, math.nan, 2.0, 3.0, math.nan])
    assert iv.n == 3 and iv.mean == 2.0
    assert iv.high == pytest.approx(2.0 + 4.302652729749462 / math.sqrt(3), rel=1e-12)


def test_t_interval_equal_values_zero_width():
    # 0.1 is not exact in binary: the width must still be exactly 0.
    iv = t_interval([0.1, 0.1, 0.1])
    assert iv.mean == iv.low == iv.high == 0.1


def test_t_interval_rejects_bad_confidence():
    with pytest.raises(ValueError):
        t_interval([1, 2, 3], confidence=1.0)


# --- paired_bootstrap -----------------------------------------------------------------------------

def reference_bootstrap(a, b, n_resamples, confidence, seed):
    """Slow explicit bootstrap with the module's documented draws: all seed draws, then all clip draws."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n_seeds, n_clips = d.shape
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))
    cols = rng.integers(0, n_clips, size=(n_resamples, n_clips))
    means = []
    for r in range(n_resamples):
        total = 0.0
        for i in rows[r]:
            for j in cols[r]:  # the same clip draw for every drawn seed
                total += d[i, j]
        means.append(total / (n_seeds * n_clips))
    means = np.array(means)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    below = (np.sum(means <= 0) + 1) / (n_resamples + 1)
    above = (np.sum(means >= 0) + 1) / (n_resamples + 1)
    return d.mean(), low, high, min(1.0, 2 * min(below, above))


def binary_pair(seed, shape, rate_a, rate_b):
    g = np.random.default_rng(seed)
    return (g.random(shape) < rate_a).astype(float), (g.random(shape) < rate_b).astype(float)


def test_bootstrap_identical_arrays():
    a = binary_pair(0, (3, 20), 0.6, 0.6)[0]
    res = paired_bootstrap(a, a.copy(), n_resamples=500)
    assert isinstance(res, PairedComparison)
    assert (res.difference, res.low, res.high, res.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert not res.distinguishable


def test_bootstrap_all_right_vs_all_wrong():
    n = 1000
    res = paired_bootstrap(np.ones((3, 50)), np.zeros((3, 50)), n_resamples=n)
    assert res.difference == res.low == res.high == 1.0
    # No resample is <= 0: p = 2 * (0 + 1) / (n + 1).
    assert res.p_value == min(1.0, 2 / (n + 1))
    assert res.distinguishable
    assert (res.n_seeds, res.n_clips, res.confidence) == (3, 50, 0.95)
    assert res.method == "paired bootstrap over 3 seeds and 50 clips (1000 resamples)"


@pytest.mark.parametrize("confidence,seed", [(0.95, 0), (0.8, 7)])
def test_bootstrap_matches_reference_loop(confidence, seed):
    a, b = binary_pair(3, (3, 7), 0.7, 0.5)
    diff, low, high, p = reference_bootstrap(a, b, 300, confidence, seed)
    res = paired_bootstrap(a, b, n_resamples=300, confidence=confidence, seed=seed)
    # 0/1 data: every resampled mean is an exact integer / 21, so equality is exact.
    assert (res.difference, res.low, res.high, res.p_value) == (diff, low, high, p)


def test_bootstrap_chunked_matches_reference(monkeypatch):
    # Blocks of 2 resamples: the clip draws come in pieces and must still equal one (R, C) draw.
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 15)
    a, b = binary_pair(4, (2, 7), 0.6, 0.4)
    diff, low, high, p = reference_bootstrap(a, b, 101, 0.95, 5)
    res = paired_bootstrap(a, b, n_resamples=101, seed=5)
    assert (res.difference, res.low, res.high, res.p_value) == (diff, low, high, p)


def test_bootstrap_real_valued_outcomes_match_reference():
    g = np.random.default_rng(8)
    a, b = g.normal(0.2, 1.0, (4, 6)), g.normal(0.0, 1.0, (4, 6))
    diff, low, high, p = reference_bootstrap(a, b, 200, 0.9, 1)
    res = paired_bootstrap(a, b, n_resamples=200, confidence=0.9, seed=1)
    assert res.difference == pytest.approx(diff, rel=1e-12)
    assert res.low == pytest.approx(low, rel=1e-9) and res.high == pytest.approx(high, rel=1e-9)
    assert res.p_value == pytest.approx(p, rel=1e-12)


def test_bootstrap_deterministic_for_seed():
    a, b = binary_pair(5, (3, 40), 0.6, 0.5)
    assert paired_bootstrap(a, b, n_resamples=400, seed=3) == paired_bootstrap(a, b, n_resamples=400, seed=3)


def test_bootstrap_one_dimensional_is_one_seed():
    a, b = binary_pair(6, (25,), 0.7, 0.4)
    res = paired_bootstrap(a, b, n_resamples=300, seed=2)
    assert (res.n_seeds, res.n_clips) == (1, 25)
    assert res == paired_bootstrap(a[None, :], b[None, :], n_resamples=300, seed=2)
    assert res.method == "paired bootstrap over 1 seed and 25 clips (300 resamples)"


def test_bootstrap_real_difference_is_distinguishable():
    # Paired: the same uniform draw decides both, so a is right wherever b is (80% vs 50%).
    u = np.random.default_rng(1).random((3, 100))
    res = paired_bootstrap((u < 0.8).astype(float), (u < 0.5).astype(float))
    assert res.difference == pytest.approx(0.30333333333333334, abs=1e-12)
    assert res.distinguishable and res.low > 0.2
    assert res.p_value == 2 / 10001


def test_bootstrap_same_rate_is_not_distinguishable():
    # Two independent draws at 60% on 3 x 30 clips (fixed data; outcome checked once by running).
    a, b = binary_pair(0, (3, 30), 0.6, 0.6)
    res = paired_bootstrap(a, b)
    assert res.difference == pytest.approx(1 / 90, abs=1e-12)
    assert res.low < 0 < res.high
    assert not res.distinguishable
    assert res.p_value > 0.5


def test_bootstrap_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"a and b.*a \(3, 5\).*b \(3, 4\)"):
        paired_bootstrap(np.zeros((3, 5)), np.zeros((3, 4)))


def test_bootstrap_rejects_nan():
    b = np.zeros((2, 3))
    b[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"^b \(shape \(2, 3\)\).*a and b"):
        paired_bootstrap(np.zeros((2, 3)), b)


def test_bootstrap_rejects_3d_and_empty():
    with pytest.raises(ValueError, match=r"a must be 1-D or 2-D.*\(1, 2, 3\)"):
        paired_bootstrap(np.zeros((1, 2, 3)), np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match=r"a and b"):
        paired_bootstrap(np.zeros((0, 3)), np.zeros((0, 3)))


# --- paired_seed_t_interval -----------------------------------------------------------------------

def test_paired_seed_t_interval_hand_computed():
    res = paired_seed_t_interval([0.5, 0.6, 0.7], [0.4, 0.4, 0.6])
    # diffs [0.1, 0.2, 0.1]: mean 2/15, s = sqrt(1/300) = 0.057735, t = (2/15) / (s / sqrt(3)) = 4.
    mean, s = 2 / 15, math.sqrt(1 / 300)
    half = 4.302652729749462 * s / math.sqrt(3)
    assert half == pytest.approx(0.1434217, abs=1e-6)
    assert res.difference == pytest.approx(mean, rel=1e-12)
    assert res.low == pytest.approx(mean - half, rel=1e-9)
    assert res.high == pytest.approx(mean + half, rel=1e-9)
    assert res.p_value == pytest.approx(2 * (1 - t2_cdf(4.0)), rel=1e-9)
    assert res.p_value == pytest.approx(0.0571910, abs=1e-6)
    assert not res.distinguishable
    assert (res.n_seeds, res.n_clips, res.method) == (3, 0, "paired t over 3 seeds")


def test_paired_seed_t_interval_degenerate_cases():
    zero = paired_seed_t_interval([0.5, 0.6], [0.5, 0.6])
    assert (zero.difference, zero.low, zero.high, zero.p_value) == (0.0, 0.0, 0.0, 1.0)
    one = paired_seed_t_interval([0.5], [0.4])
    assert one.difference == pytest.approx(0.1)
    assert math.isnan(one.low) and math.isnan(one.p_value) and not one.distinguishable
    # A pair with a missing side is dropped.
    assert paired_seed_t_interval([0.5, math.nan, 0.6], [0.4, 0.3, 0.6]).n_seeds == 2


def test_paired_seed_t_interval_rejects_length_mismatch():
    with pytest.raises(ValueError, match=r"a and b.*a \(3,\).*b \(2,\)"):
        paired_seed_t_interval([1, 2, 3], [1, 2])


# --- detectable_difference ------------------------------------------------------------------------

def test_detectable_difference_hand_computed():
    expected = (1.959963984540054 + 0.8416212335729143) * math.sqrt(0.2 / 300)
    assert detectable_difference(100, 3, 0.2) == pytest.approx(expected, rel=1e-12)
    assert detectable_difference(100, 3, 0.2) == pytest.approx(0.072336, abs=1e-6)


@pytest.mark.parametrize("args", [(0, 3, 0.2), (100, 0, 0.2), (100, 3, 0.0), (100, 3, 1.5), (100, 3, math.nan),
                                  (100.5, 3, 0.2), (True, 3, 0.2)])
def test_detectable_difference_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        detectable_difference(*args)


def test_detectable_difference_rejects_bad_levels():
    with pytest.raises(ValueError):
        detectable_difference(100, 3, 0.2, confidence=0.0)
    with pytest.raises(ValueError):
        detectable_difference(100, 3, 0.2, power=1.0)
