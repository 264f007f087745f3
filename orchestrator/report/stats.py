"""Uncertainty of sweep results: intervals over seeds, paired comparisons of two configurations, the
family's multiple-comparison adjustment and the difference a comparison can detect.

Pure numpy / scipy, no MLflow: callers pass plain numbers (one final accuracy per seed) or per-clip
outcomes (shape ``(seeds, clips)``, e.g. 1.0 correct / 0.0 wrong).

The trained model (seed) is the unit of inference. A paired comparison looks at ``d = a - b`` on the
same seeds and clips and asks whether its mean differs from 0 for new seeds *and* new clips: a
crossed random-effects model ``d[s, c] = mu + seed_s + clip_c + e[s, c]`` fitted by the two-way ANOVA
method of moments. Its standard error never falls below the paired t's over the seeds' mean differences
(the seed term is not estimated away on 3 seeds, where a test that drops it when it looks small is no
longer calibrated); the clip term is added when the clips disagree more than the residual says they
should; the degrees of freedom are the seeds' (S - 1). Checked by simulation in tests/test_calibration.py.

* ``t_interval``: Student-t interval of a mean over independent values (one per seed).
* ``paired_test``: the paired comparison above; one value per seed (``clips == 1``) is the paired t.
* ``holm``: Holm's step-down adjustment of a family's p-values.
* ``detectable_difference``: the smallest difference ``paired_test`` finds with a given power.
* ``fieller_ratio``: a ratio of two correlated means over seeds with Fieller's interval;
  ``headroom_recovered`` applies it to (acc - normal) / (reference - normal).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import optimize, stats

# No verdict from fewer trained models than this (a t with 1 degree of freedom has no usable power and
# one seed cannot tell a method from the luck of its initialisation).
MIN_SEEDS = 3


@dataclass(frozen=True)
class Interval:
    """A mean with its confidence interval; ``low``/``high`` are nan when there is no spread to estimate
    an interval from (one value, or all values equal)."""

    mean: float
    low: float
    high: float
    n: int
    method: str


@dataclass(frozen=True)
class VarianceComponents:
    """Variances of the crossed model ``d[s, c] = mu + seed_s + clip_c + e[s, c]`` of a paired difference:
    between trained models (seeds), between clips, and what is left (seed x clip)."""

    seed: float
    clip: float
    residual: float


@dataclass(frozen=True)
class PairedComparison:
    """Difference ``a - b`` of two configurations on the same seeds (and clips), with its interval and test.

    ``p_value`` is the comparison's own; ``p_adjusted`` the family's (``holm``), nan until adjusted. The
    verdict (``distinguishable``) comes from ``p_adjusted`` when set, else from ``p_value``."""

    difference: float
    low: float
    high: float
    p_value: float
    n_seeds: int
    n_clips: int
    confidence: float
    method: str
    df: float = math.nan
    standard_error: float = math.nan
    components: VarianceComponents | None = None
    mean_squares: tuple[float, float, float] | None = None
    p_adjusted: float = math.nan

    @property
    def testable(self) -> bool:
        return not math.isnan(self.p_value)

    @property
    def distinguishable(self) -> bool:
        """True when the (adjusted) p-value is at most ``1 - confidence``; False without a test."""
        p = self.p_adjusted if not math.isnan(self.p_adjusted) else self.p_value
        return bool(p <= 1.0 - self.confidence)


def _check_confidence(confidence: float, name: str = "confidence") -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {confidence!r}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def t_interval(values: Any, confidence: float = 0.95, bounds: tuple[float, float] | None = None) -> Interval:
    """Mean and two-sided Student-t interval over independent values (e.g. one final accuracy per seed).

    ``mean ± t_{(1+confidence)/2, n-1} * s / sqrt(n)``, ``s`` the sample standard deviation (ddof=1),
    cut to ``bounds`` (an accuracy stays in [0, 1]). NaNs are dropped first. ``n == 0`` -> mean nan;
    ``n == 1`` or all values equal -> ``low = high = nan``: no spread to estimate an interval from (three
    equal accuracies do not make a zero-width interval).
    """
    _check_confidence(confidence)
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "no values")
    if n == 1:
        return Interval(float(x[0]), math.nan, math.nan, 1, "single seed, no interval")
    if np.all(x == x[0]):
        return Interval(float(x[0]), math.nan, math.nan, n, f"{n} equal values, no spread to estimate an interval from")
    mean = float(x.mean())
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(mean, low, high, n, f"t-interval over {_plural(n, 'seed')}")


def _as_outcomes(x: Any, name: str) -> np.ndarray:
    """``x`` as a float (seeds, clips) array; a 1-D input is one value per seed."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 1-D (one value per seed) or 2-D (seeds, clips), got shape {arr.shape}")
    return arr


def _validate_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape (same seeds and clips), got a {a.shape} and b {b.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"a and b need at least 1 seed and 1 clip, got a {a.shape} and b {b.shape}")
    for name, arr in (("a", a), ("b", b)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} (shape {arr.shape}) holds non-finite values; a and b must be finite")


def mean_squares(d: np.ndarray) -> tuple[float, float, float]:
    """Two-way ANOVA (no replication) of ``d`` (S, C): mean squares of seeds (df S-1), clips (df C-1) and
    residual (df (S-1)(C-1)); clips and residual are 0 when C == 1."""
    s, c = d.shape
    grand = d.mean()
    rows, cols = d.mean(axis=1), d.mean(axis=0)
    ms_seed = c * float(np.sum((rows - grand) ** 2)) / (s - 1)
    if c == 1:
        return ms_seed, 0.0, 0.0
    ms_clip = s * float(np.sum((cols - grand) ** 2)) / (c - 1)
    resid = d - rows[:, None] - cols[None, :] + grand
    ms_resid = float(np.sum(resid ** 2)) / ((s - 1) * (c - 1))
    return ms_seed, ms_clip, ms_resid


def _variance_of_mean(ms: tuple[float, float, float], s: int, c: int) -> tuple[float, float]:
    """(variance of the grand mean, degrees of freedom) from the mean squares.

    Var(mean) = sigma2_seed/S + sigma2_clip/C + sigma2_e/(SC) = (E MS_seed + E MS_clip - E MS_resid) / (SC).
    The clip part ``MS_clip - MS_resid`` enters only when positive (a negative variance estimate is 0);
    the seed part ``MS_seed`` always does: with it alone the test is the paired t over the seeds' mean
    differences, calibrated whatever the clips do when clips add nothing. Degrees of freedom S - 1, the
    seed term's: Satterthwaite's df for the sum (seed term plus a clip term with thousands of df) was
    measured anti-conservative in the tail Holm's first step uses (p <= 0.0014: 3x the nominal rate on
    3 seeds x 1,000 clips), while S - 1 keeps the test at or below its level."""
    ms_seed, ms_clip, ms_resid = ms
    total = ms_seed + (ms_clip - ms_resid if c > 1 and ms_clip > ms_resid else 0.0)
    return total / (s * c), float(s - 1)


def components_from(ms: tuple[float, float, float], s: int, c: int) -> VarianceComponents:
    """Method-of-moments variance components from the mean squares of an (S, C) difference, each at least 0
    (E MS_seed = sigma2_e + C sigma2_seed, E MS_clip = sigma2_e + S sigma2_clip, E MS_resid = sigma2_e)."""
    ms_seed, ms_clip, ms_resid = ms
    if c == 1:
        return VarianceComponents(ms_seed, 0.0, 0.0)
    return VarianceComponents(max(0.0, (ms_seed - ms_resid) / c), max(0.0, (ms_clip - ms_resid) / s), ms_resid)


def components(d: Any) -> VarianceComponents:
    """Method-of-moments variance components of a paired difference ``d`` (S, C), each at least 0."""
    d = _as_outcomes(d, "d")
    s, c = d.shape
    if s < 2:
        raise ValueError(f"variance components need at least 2 seeds, got {s}")
    return components_from(mean_squares(d), s, c)


def paired_test(a: Any, b: Any, confidence: float = 0.95) -> PairedComparison:
    """Paired comparison of ``mean(a - b)``: ``a``, ``b`` the outcomes of two configurations on the SAME
    seeds (rows) and the SAME clips (columns), shape (seeds, clips), e.g. 1.0 correct / 0.0 wrong; a 1-D
    input is one value per seed (the paired t over seeds).

    Statistic ``t = mean(d) / SE`` with ``SE^2`` and its df (seeds - 1) from ``_variance_of_mean``;
    two-sided p from Student t; interval ``mean ± t_{(1+confidence)/2, df} SE`` cut to [-1, 1]. No test
    (p, low, high nan) with fewer than ``MIN_SEEDS`` seeds, or when ``d`` has no spread at all but is not 0
    (every seed and clip the same nonzero difference: nothing to measure its noise by); ``d`` all 0
    (identical outcomes) is difference 0, p = 1.
    """
    _check_confidence(confidence)
    a_arr, b_arr = _as_outcomes(a, "a"), _as_outcomes(b, "b")
    _validate_pair(a_arr, b_arr)
    d = a_arr - b_arr
    s, c = d.shape
    mean = float(d.mean())
    over = f"{_plural(s, 'seed')}" + (f" and {_plural(c, 'clip')}" if c > 1 else "")
    if s < MIN_SEEDS:
        return PairedComparison(mean, math.nan, math.nan, math.nan, s, c, confidence,
                                f"paired on {over}: no test, a verdict needs at least {MIN_SEEDS} seeds")
    ms = mean_squares(d)
    variance, df = _variance_of_mean(ms, s, c)
    parts = components_from(ms, s, c)
    if not variance > 0 and not np.any(d):
        # Right and wrong on exactly the same clips for every seed: no difference on this data.
        return PairedComparison(0.0, 0.0, 0.0, 1.0, s, c, confidence,
                                f"paired on {over}: identical outcomes on every seed and clip",
                                components=parts, mean_squares=ms)
    if not variance > 0:
        return PairedComparison(mean, math.nan, math.nan, math.nan, s, c, confidence,
                                f"paired on {over}: the same difference everywhere, no spread to test against",
                                components=parts, mean_squares=ms)
    se = math.sqrt(variance)
    p = float(2.0 * stats.t.sf(abs(mean) / se, df))
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, df)) * se
    method = f"paired t over {_plural(s, 'seed')}" if c == 1 else f"seed x clip paired t over {over}"
    return PairedComparison(mean, max(-1.0, mean - half), min(1.0, mean + half), p, s, c, confidence, method,
                            df=df, standard_error=se, components=parts, mean_squares=ms)


def holm(p_values: Any) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control under any dependence between the
    tests: every comparison of a report shares the normal model's runs). NaN (untested) entries stay
    NaN and do not count in the family size. ``p_(i)`` sorted ascending among m: adjusted
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``."""
    p = np.asarray(p_values, dtype=float).ravel()
    out = np.full(p.shape, math.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = tested.size
    if m == 0:
        return out
    order = tested[np.argsort(p[tested], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def adjust(comparisons: list[PairedComparison | None]) -> list[PairedComparison | None]:
    """The family's comparisons with ``p_adjusted`` set by ``holm`` over all of them that were tested."""
    adjusted = holm([c.p_value if c is not None else math.nan for c in comparisons])
    return [replace(c, p_adjusted=float(p)) if c is not None else None for c, p in zip(comparisons, adjusted)]


def power_of(difference: float, parts: VarianceComponents, n_seeds: int, n_clips: int, alpha: float) -> float:
    """Power of ``paired_test`` at level ``alpha`` (two-sided) against a true ``difference``, from the
    expected mean squares: SE^2 and df as ``_variance_of_mean`` gives them, the statistic noncentral t."""
    s, c = n_seeds, n_clips
    expected = (parts.residual + c * parts.seed, parts.residual + s * parts.clip, parts.residual)
    variance, df = _variance_of_mean(expected, s, c)
    if not variance > 0 or math.isnan(df):
        return math.nan
    shift = difference / math.sqrt(variance)
    critical = float(stats.t.ppf(1.0 - alpha / 2.0, df))
    power = float(stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift))
    if math.isnan(power):
        # scipy's noncentral t gives up far in the tails: the normal approximation of P(T > c)
        # (Abramowitz & Stegun 26.7.10) is exact enough there.
        spread = math.sqrt(1.0 + critical * critical / (2.0 * df))
        power = float(stats.norm.sf((critical * (1.0 - 1.0 / (4.0 * df)) - abs(shift)) / spread))
    return power


def detectable_difference(parts: VarianceComponents, n_seeds: int, n_clips: int, alpha: float = 0.05,
                          power: float = 0.8) -> float:
    """Smallest true difference ``paired_test`` detects with probability ``power`` at two-sided level
    ``alpha`` on ``n_seeds`` x ``n_clips`` (``power_of`` solved for the difference); nan when the
    components give no spread or fewer than ``MIN_SEEDS`` seeds."""
    for name, count in (("n_seeds", n_seeds), ("n_clips", n_clips)):
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise ValueError(f"{name} must be a positive integer, got {count!r}")
    _check_confidence(1.0 - alpha, "1 - alpha")
    _check_confidence(power, "power")
    if n_seeds < MIN_SEEDS:
        return math.nan
    # An accuracy difference is at most 1: beyond that, no difference is detected with that power (inf).
    at_most = power_of(1.0, parts, n_seeds, n_clips, alpha)
    if math.isnan(at_most):
        return math.nan
    if at_most < power:
        return math.inf
    return float(optimize.brentq(lambda x: power_of(x, parts, n_seeds, n_clips, alpha) - power, 0.0, 1.0,
                                 xtol=1e-9))


@dataclass(frozen=True)
class Ratio:
    """``mean(x) / mean(y)`` over paired values (one per seed) with its Fieller interval.

    ``status``: "bounded" (``low``/``high`` set); "unbounded" (``mean(y)`` is not significantly non-zero, so
    the confidence set is not an interval: ``low``/``high`` nan); "no interval" (fewer than ``MIN_SEEDS``
    seeds, or no spread at all); "no headroom" (``mean(y) <= 0``: ``estimate`` nan, no ratio is stated);
    "no values"."""

    estimate: float
    low: float
    high: float
    n: int
    status: str
    mean_x: float = math.nan
    mean_y: float = math.nan


def fieller_ratio(x: Any, y: Any, confidence: float = 0.95) -> Ratio:
    """``mean(x) / mean(y)`` of paired values (``x[i]``, ``y[i]`` from the same seed) with the interval of
    Fieller's theorem for a ratio of two correlated means (E. C. Fieller, "Some problems in interval
    estimation", J. R. Stat. Soc. B 16(2):175-185, 1954).

    With ``n`` pairs, means ``xbar``, ``ybar``, sample (co)variances ``s_xx``, ``s_yy``, ``s_xy`` (ddof=1) and
    ``t = t_{(1+confidence)/2, n-1}``, the confidence set is every ``r`` with
    ``(xbar - r ybar)^2 <= t^2 (s_xx - 2 r s_xy + r^2 s_yy) / n``: the ``r`` for which ``x - r y`` has a
    mean the t-test does not reject. It is the bounded interval between the roots of that quadratic only
    when ``ybar`` is significantly non-zero (``ybar^2 > t^2 s_yy / n``); otherwise it is unbounded and
    no interval is stated. ``mean(y) <= 0`` is "no headroom" (no ratio); fewer than ``MIN_SEEDS`` pairs or
    no spread at all: the ratio without an interval. NaN pairs are dropped first.
    """
    _check_confidence(confidence)
    xs, ys = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if xs.shape != ys.shape:
        raise ValueError(f"x and y must be paired (same length), got {xs.size} and {ys.size}")
    keep = ~(np.isnan(xs) | np.isnan(ys))
    xs, ys = xs[keep], ys[keep]
    n = int(xs.size)
    if n == 0:
        return Ratio(math.nan, math.nan, math.nan, 0, "no values")
    xbar, ybar = float(xs.mean()), float(ys.mean())
    if not ybar > 0:
        return Ratio(math.nan, math.nan, math.nan, n, "no headroom", xbar, ybar)
    estimate = xbar / ybar
    if n < MIN_SEEDS:
        return Ratio(estimate, math.nan, math.nan, n, "no interval", xbar, ybar)
    cov = np.cov(np.stack([xs, ys]), ddof=1)
    s_xx, s_yy, s_xy = float(cov[0, 0]), float(cov[1, 1]), float(cov[0, 1])
    if s_xx == 0.0 and s_yy == 0.0:
        return Ratio(estimate, math.nan, math.nan, n, "no interval", xbar, ybar)
    t2 = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) ** 2
    # The quadratic a r^2 - 2 b r + c <= 0 from expanding the inequality above.
    a = ybar * ybar - t2 * s_yy / n
    b = xbar * ybar - t2 * s_xy / n
    c = xbar * xbar - t2 * s_xx / n
    if not a > 0:
        return Ratio(estimate, math.nan, math.nan, n, "unbounded", xbar, ybar)
    # a > 0 and the estimate itself satisfies the inequality, so the discriminant is >= 0 (up to rounding).
    half = math.sqrt(max(0.0, b * b - a * c))
    return Ratio(estimate, (b - half) / a, (b + half) / a, n, "bounded", xbar, ybar)


def headroom_recovered(acc: Any, normal: Any, reference: Any, confidence: float = 0.95) -> Ratio:
    """Share of the headroom above normal that a configuration recovers, seed by seed:
    ``x_s = acc_s - normal_s``, ``y_s = reference_s - normal_s`` (``reference`` one value per seed, or one
    constant such as a dataset's best achievable accuracy), ``mean(x) / mean(y)`` with Fieller's interval
    (``fieller_ratio``). 1 = as good as the reference, 0 = no better than normal."""
    acc_arr, normal_arr = np.asarray(acc, dtype=float).ravel(), np.asarray(normal, dtype=float).ravel()
    reference_arr = np.broadcast_to(np.asarray(reference, dtype=float), normal_arr.shape)
    return fieller_ratio(acc_arr - normal_arr, reference_arr - normal_arr, confidence)
