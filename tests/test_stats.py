"""orchestrator.report.stats: intervals, the seed x clip paired test, Holm, detectable difference.

Expected numbers are computed by hand (closed forms for Student t with df = 2, two-way ANOVA of small
matrices written out below), never by calling the function under test twice.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sp

from orchestrator.report.stats import (Interval, PairedComparison, VarianceComponents, adjust, components,
                                       detectable_difference, holm, mean_squares, paired_test, power_of, t_interval)


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


def test_t_interval_equal_values_have_no_interval():
    # Three equal accuracies are no evidence of zero spread: no interval rather than "0.1 +/- 0.000".
    iv = t_interval([0.1, 0.1, 0.1])
    assert iv.mean == 0.1 and iv.n == 3 and math.isnan(iv.low) and math.isnan(iv.high)
    assert "3 equal values" in iv.method


def test_t_interval_is_cut_to_bounds():
    # [0.85, 0.80]: mean 0.825, half-width 12.7062 * 0.0353553 / sqrt(2) = 0.317655 -> [0.507, 1.143], cut at 1.
    iv = t_interval([0.85, 0.80], bounds=(0.0, 1.0))
    assert iv.low == pytest.approx(0.825 - 0.317655, abs=1e-6) and iv.high == 1.0
    assert t_interval([0.85, 0.80]).high == pytest.approx(0.825 + 0.317655, abs=1e-6)


def test_t_interval_rejects_bad_confidence():
    with pytest.raises(ValueError):
        t_interval([1, 2, 3], confidence=1.0)


# --- paired_test: the seed x clip paired t ---------------------------------------------------------

# d = a - b on 3 seeds x 2 clips. Grand mean 1/2; seed means 1/2, 0, 1; clip means 2/3, 1/3.
# MS_seed = C * sum (r - m)^2 / (S - 1) = 2 * (0 + 1/4 + 1/4) / 2 = 1/2.
# MS_clip = S * sum (c - m)^2 / (C - 1) = 3 * (1/36 + 1/36) = 1/6.
# Residuals d - r - c + m: [1/3, -1/3], [-1/6, 1/6], [-1/6, 1/6]: SS = 1/3 over (S-1)(C-1) = 2 df: MS_resid = 1/6.
SEED_ONLY = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
# Grand mean 2/3; seed means 1/2, 1/2, 1; clip means 1, 1/3.
# MS_seed = 2 * (1/36 + 1/36 + 4/36) / 2 = 1/6; MS_clip = 3 * (1/9 + 1/9) = 2/3;
# residuals [1/6, -1/6], [1/6, -1/6], [-1/3, 1/3]: SS = 4/36 + 2/9 = 1/3, MS_resid = 1/6.
WITH_CLIPS = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])


def test_mean_squares_by_hand():
    assert mean_squares(SEED_ONLY) == pytest.approx((1 / 2, 1 / 6, 1 / 6), rel=1e-12)
    assert mean_squares(WITH_CLIPS) == pytest.approx((1 / 6, 2 / 3, 1 / 6), rel=1e-12)


def test_paired_test_without_a_clip_term_is_the_paired_t_over_seed_means():
    # MS_clip is not above MS_resid: SE^2 = MS_seed / (S C) = 1/12, df = 2: t = 0.5 / sqrt(1/12) = sqrt(3).
    res = paired_test(SEED_ONLY, np.zeros((3, 2)))
    t = math.sqrt(3)
    assert res.difference == 0.5 and res.df == 2 and res.standard_error == pytest.approx(math.sqrt(1 / 12), rel=1e-12)
    assert res.p_value == pytest.approx(2 * (1 - t2_cdf(t)), rel=1e-9)
    half = 4.302652729749462 * math.sqrt(1 / 12)
    assert (res.low, res.high) == pytest.approx((max(-1.0, 0.5 - half), min(1.0, 0.5 + half)), rel=1e-9)
    # The same as a paired t on the seeds' mean differences (0.5, 0, 1).
    t_over_seeds = sp.ttest_1samp([0.5, 0.0, 1.0], 0.0)
    assert res.p_value == pytest.approx(t_over_seeds.pvalue, rel=1e-9)
    assert (res.n_seeds, res.n_clips) == (3, 2) and res.method == "seed x clip paired t over 3 seeds and 2 clips"


def test_paired_test_adds_the_clip_term_when_clips_disagree_beyond_the_residual():
    # MS_clip 2/3 > MS_resid 1/6: SE^2 = (1/6 + 2/3 - 1/6) / 6 = 1/9, df = S - 1 = 2: t = (2/3) / (1/3) = 2.
    res = paired_test(WITH_CLIPS, np.zeros((3, 2)))
    assert res.standard_error == pytest.approx(1 / 3, rel=1e-12) and res.df == 2
    assert res.p_value == pytest.approx(2 * (1 - t2_cdf(2.0)), rel=1e-9)
    # Variance components: seed max(0, (1/6 - 1/6) / 2) = 0, clip (2/3 - 1/6) / 3 = 1/6, residual 1/6.
    assert components(WITH_CLIPS) == VarianceComponents(0.0, pytest.approx(1 / 6), pytest.approx(1 / 6))


def test_one_value_per_seed_is_the_paired_t():
    res = paired_test([0.5, 0.6, 0.7], [0.4, 0.4, 0.6])
    # diffs [0.1, 0.2, 0.1]: mean 2/15, s = sqrt(1/300) = 0.057735, t = (2/15) / (s / sqrt(3)) = 4.
    mean, s = 2 / 15, math.sqrt(1 / 300)
    half = 4.302652729749462 * s / math.sqrt(3)
    assert res.difference == pytest.approx(mean, rel=1e-12)
    assert (res.low, res.high) == pytest.approx((mean - half, mean + half), rel=1e-9)
    assert res.p_value == pytest.approx(2 * (1 - t2_cdf(4.0)), rel=1e-9) == pytest.approx(0.0571910, abs=1e-6)
    assert not res.distinguishable
    assert (res.n_seeds, res.n_clips, res.method) == (3, 1, "paired t over 3 seeds")


def test_no_verdict_from_fewer_than_three_seeds():
    res = paired_test(np.ones((2, 50)), np.zeros((2, 50)))
    assert res.difference == 1.0 and math.isnan(res.p_value) and math.isnan(res.low)
    assert not res.testable and not res.distinguishable and "needs at least 3 seeds" in res.method


def test_a_constant_difference_gives_no_p_of_zero():
    # Every seed one clip apart, every clip the same: no spread to measure noise by, so no test (not p = 0).
    res = paired_test([0.51, 0.61, 0.71], [0.5, 0.6, 0.7])
    assert not res.testable and math.isnan(res.p_value) and "no spread" in res.method
    res = paired_test(np.ones((3, 40)), np.zeros((3, 40)))
    assert not res.testable and res.difference == 1.0
    # Identical outcomes: no difference on this data, p = 1 (a verdict: not distinguishable).
    same = paired_test(np.eye(3), np.eye(3))
    assert (same.difference, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0) and not same.distinguishable


def test_intervals_stay_within_minus_one_and_one():
    a = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    res = paired_test(a, np.zeros((3, 3)))
    assert -1.0 <= res.low and res.high <= 1.0


def test_paired_test_rejects_bad_input():
    with pytest.raises(ValueError, match=r"a and b.*a \(3, 5\).*b \(3, 4\)"):
        paired_test(np.zeros((3, 5)), np.zeros((3, 4)))
    b = np.zeros((3, 3))
    b[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"^b \(shape \(3, 3\)\).*a and b"):
        paired_test(np.zeros((3, 3)), b)
    with pytest.raises(ValueError, match=r"a must be 1-D.*\(1, 2, 3\)"):
        paired_test(np.zeros((1, 2, 3)), np.zeros((1, 2, 3)))


# --- holm -----------------------------------------------------------------------------------------

def test_holm_by_hand():
    # m = 3 tested: sorted 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04, raised to 0.06 to stay monotone).
    adjusted = holm([0.01, 0.04, math.nan, 0.03])
    assert adjusted[[0, 1, 3]] == pytest.approx([0.03, 0.06, 0.06], rel=1e-12) and math.isnan(adjusted[2])
    assert holm([0.5, 0.9]).tolist() == [1.0, 1.0]
    assert holm([]).size == 0


def test_adjust_sets_the_verdict_from_the_adjusted_p():
    # Raw p 0.03 and 0.04: each alone "distinguishable" at 5%; Holm over the two: 0.06 and 0.06, neither.
    first = PairedComparison(0.1, 0.01, 0.2, 0.03, 3, 10, 0.95, "t")
    second = PairedComparison(0.1, 0.01, 0.2, 0.04, 3, 10, 0.95, "t")
    assert first.distinguishable and second.distinguishable
    a, b, none = adjust([first, second, None])
    assert none is None and (a.p_adjusted, b.p_adjusted) == pytest.approx((0.06, 0.06))
    assert not a.distinguishable and not b.distinguishable and a.p_value == 0.03


# --- detectable_difference ------------------------------------------------------------------------

def test_power_and_detectable_difference_by_hand():
    # Seeds only (one value per seed): SE^2 = sigma2_seed / S. With many seeds the t test is the z test:
    # detectable = (z_0.975 + z_0.8) * sqrt(0.01 / 2000).
    big = detectable_difference(VarianceComponents(0.01, 0.0, 0.0), 2000, 1)
    assert big == pytest.approx((1.959963984540054 + 0.8416212335729143) * math.sqrt(0.01 / 2000), rel=2e-3)
    # 3 seeds: the noncentral t with df 2 at the detectable difference has power 0.8 exactly.
    parts = VarianceComponents(0.004, 0.0, 0.3)
    d = detectable_difference(parts, 3, 100, alpha=0.05)
    se = math.sqrt((0.3 + 100 * 0.004) / 300)  # E MS_seed / (S C)
    critical = t2_quantile(0.975)
    assert sp.nct.sf(critical, 2, d / se) + sp.nct.cdf(-critical, 2, d / se) == pytest.approx(0.8, abs=1e-6)
    assert power_of(d, parts, 3, 100, 0.05) == pytest.approx(0.8, abs=1e-6)
    # A stricter level (Holm's first step over 36 tests) or fewer seeds need a larger difference.
    assert detectable_difference(parts, 5, 100, alpha=0.05 / 36) > detectable_difference(parts, 5, 100, alpha=0.05)
    assert detectable_difference(parts, 3, 100) > detectable_difference(parts, 10, 100)


def test_detectable_difference_edges():
    parts = VarianceComponents(0.01, 0.0, 0.3)
    assert math.isnan(detectable_difference(parts, 2, 100))  # no verdict from 2 seeds
    assert math.isinf(detectable_difference(VarianceComponents(0.5, 0.0, 0.3), 3, 100, alpha=0.05 / 36))
    assert math.isnan(detectable_difference(VarianceComponents(0.0, 0.0, 0.0), 3, 100))


@pytest.mark.parametrize("args", [(0, 3), (3, 0), (3.5, 10), (True, 10)])
def test_detectable_difference_rejects_bad_counts(args):
    with pytest.raises(ValueError):
        detectable_difference(VarianceComponents(0.01, 0.0, 0.3), *args)


def test_detectable_difference_rejects_bad_levels():
    with pytest.raises(ValueError):
        detectable_difference(VarianceComponents(0.01, 0.0, 0.3), 3, 10, alpha=0.0)
    with pytest.raises(ValueError):
        detectable_difference(VarianceComponents(0.01, 0.0, 0.3), 3, 10, power=1.0)


def test_pooled_components_pool_one_design_only():
    """Linear-probe rows (one value per seed) are not pooled with per-clip comparisons: their mean squares
    are of seed means, and at "1 clip" they turned the detectable difference into nonsense."""
    import pandas as pd

    from orchestrator.report.comparisons import pooled_components
    from orchestrator.report.stats import components_from

    def row(config, ms, clips):
        return {"family": "vs_normal", "group": "", "metric": "acc_visual", "config": config, "n_seeds": 5,
                "n_clips": clips, "ms_seed": ms[0], "ms_clip": ms[1], "ms_residual": ms[2]}

    tests = pd.DataFrame([row("a", (0.30, 0.20, 0.10), 96), row("b", (0.10, 0.40, 0.20), 96),
                          row("probe", (0.003, 0.0, 0.0), 1)])
    parts, n_seeds, n_clips = pooled_components(tests, "", "acc_visual")
    assert (n_seeds, n_clips) == (5, 96)
    expected = components_from((0.20, 0.30, 0.15), 5, 96)
    assert (parts.seed, parts.clip, parts.residual) == pytest.approx((expected.seed, expected.clip, expected.residual))


# --- fieller_ratio / headroom_recovered -----------------------------------------------------------
# t(0.975, 2)^2 from the df = 2 closed form: 0.95^2 / (2 * 0.975 * 0.025) = 0.9025 / 0.04875 = 722 / 39.
T2_975_SQUARED = 722 / 39


def test_t_squared_constant_matches_the_closed_form():
    assert T2_975_SQUARED == pytest.approx(t2_quantile(0.975) ** 2, rel=1e-12)


def test_fieller_interval_by_hand():
    """x = (1, 2, 3), y = (6, 5, 7): xbar 2, ybar 6, s_xx 1, s_yy 1, s_xy ((-1)(0) + 0(-1) + 1(1)) / 2 = 0.5, n 3.
    (xbar - r ybar)^2 <= t^2 (s_xx - 2 r s_xy + r^2 s_yy) / n, times 117 / t^2-free integers:
    a = 36 - t^2/3 = 3490/117, b = 12 - t^2/6 = 1043/117, c = 4 - t^2/3 = -254/117, so the roots are
    (1043 -+ sqrt(1043^2 + 3490 * 254)) / 3490 = (1043 -+ sqrt(1974309)) / 3490. Dropping s_xy (treating the
    means as independent) would give b = 12, other ends: the covariance matters."""
    from orchestrator.report.stats import fieller_ratio

    ratio = fieller_ratio([1, 2, 3], [6, 5, 7])
    root = math.sqrt(1043 ** 2 + 3490 * 254)
    assert root == pytest.approx(math.sqrt(1974309))
    assert ratio.status == "bounded" and ratio.n == 3
    assert ratio.estimate == pytest.approx(1 / 3)
    assert (ratio.low, ratio.high) == pytest.approx(((1043 - root) / 3490, (1043 + root) / 3490), rel=1e-12)
    assert (ratio.low, ratio.high) == pytest.approx((-0.1037539, 0.7014616), abs=1e-7)
    # Each end solves the equality: x - r y has a mean exactly on the t-test's edge.
    for r in (ratio.low, ratio.high):
        assert (2 - 6 * r) ** 2 == pytest.approx(T2_975_SQUARED * (1 - 2 * r * 0.5 + r * r) / 3, rel=1e-9)


def test_fieller_unbounded_no_headroom_and_too_few_seeds():
    from orchestrator.report.stats import fieller_ratio

    # y = (4, 5, 9): ybar 6, s_yy 7; ybar^2 = 36 < t^2 s_yy / n = (722/39) 7 / 3 = 43.2: not significantly non-zero.
    unbounded = fieller_ratio([1, 2, 3], [4, 5, 9])
    assert unbounded.status == "unbounded" and unbounded.estimate == pytest.approx(1 / 3)
    assert math.isnan(unbounded.low) and math.isnan(unbounded.high)
    # Normal at or above the reference on average: no ratio at all.
    none = fieller_ratio([0.01, 0.02, 0.0], [0.01, -0.02, 0.0])
    assert none.status == "no headroom" and math.isnan(none.estimate)
    # Two seeds: the ratio, no interval (stats.MIN_SEEDS).
    two = fieller_ratio([0.02, 0.04], [0.1, 0.1])
    assert two.status == "no interval" and two.estimate == pytest.approx(0.3) and math.isnan(two.low)


def test_headroom_recovered_against_a_constant_ceiling_by_hand():
    """normal (0.80, 0.82, 0.78), the configuration (0.83, 0.86, 0.80), ceiling 0.95: x = (0.03, 0.04, 0.02),
    y = (0.15, 0.13, 0.17); xbar 0.03, ybar 0.15 -> 0.2. s_xx 1e-4, s_yy 4e-4, s_xy (0.01(-0.02) - 0.01(0.02)) / 2
    = -2e-4. Times 3 / 1e-4: a = 675 - 4 t^2, b = 135 + 2 t^2, c = 27 - t^2; ends (b -+ sqrt(b^2 - a c)) / a."""
    from orchestrator.report.stats import headroom_recovered

    ratio = headroom_recovered([0.83, 0.86, 0.80], [0.80, 0.82, 0.78], 0.95)
    a, b, c = 675 - 4 * T2_975_SQUARED, 135 + 2 * T2_975_SQUARED, 27 - T2_975_SQUARED
    root = math.sqrt(b * b - a * c)
    assert ratio.status == "bounded" and ratio.estimate == pytest.approx(0.2)
    assert (ratio.low, ratio.high) == pytest.approx(((b - root) / a, (b + root) / a), rel=1e-9)
    assert (ratio.low, ratio.high) == pytest.approx((0.025834, 0.546685), abs=1e-5)
