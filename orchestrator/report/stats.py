"""Uncertainty of sweep results: confidence intervals over seeds and paired comparisons of two configurations.

Pure numpy / scipy, no MLflow: callers pass plain numbers (one final accuracy per seed) or per-clip
outcomes (shape ``(seeds, clips)``, e.g. 1.0 correct / 0.0 wrong).

* ``t_interval``: Student-t interval of a mean over independent values (one per seed).
* ``paired_bootstrap``: difference of two configurations evaluated on the same seeds and the same clips,
  with a two-level (seeds x clips) bootstrap interval and p-value.
* ``paired_seed_t_interval``: the fallback when only one number per seed is known (paired t).
* ``detectable_difference``: the smallest accuracy difference a paired comparison of a given size detects.

Bootstrap draws (so a reference implementation can reproduce them exactly): with
``rng = np.random.default_rng(seed)``, S seeds, C clips and R resamples, the module draws
``rows = rng.integers(0, S, size=(R, S))`` first, then ``cols = rng.integers(0, C, size=(R, C))``
(the latter possibly in consecutive blocks of resamples, which yields the same numbers: numpy's
bit generator continues its stream across calls). Resample r is the mean of ``d[rows[r]][:, cols[r]]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

# Elements (resamples x max(seeds, clips)) per bootstrap block: bounds memory to ~100 MB whatever
# the number of clips, while keeping blocks large enough that the Python loop over blocks is cheap.
_CHUNK_ELEMENTS = 2**21


@dataclass(frozen=True)
class Interval:
    """A mean with its confidence interval; ``low``/``high`` are nan when ``n < 2``."""

    mean: float
    low: float
    high: float
    n: int
    method: str


@dataclass(frozen=True)
class PairedComparison:
    """Difference ``a - b`` of two configurations measured on the same seeds (and clips), with its interval."""

    difference: float
    low: float
    high: float
    p_value: float
    n_seeds: int
    n_clips: int
    confidence: float
    method: str

    @property
    def distinguishable(self) -> bool:
        """True when the interval excludes 0 (``low > 0`` or ``high < 0``); False for a nan interval."""
        return bool(self.low > 0 or self.high < 0)


def _check_confidence(confidence: float, name: str = "confidence") -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {confidence!r}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def t_interval(values: Any, confidence: float = 0.95) -> Interval:
    """Mean and two-sided Student-t interval over independent values (e.g. one final accuracy per seed).

    ``mean ± t_{(1+confidence)/2, n-1} * s / sqrt(n)``, ``s`` the sample standard deviation (ddof=1).
    NaNs are dropped first. ``n == 0`` -> mean nan; ``n == 1`` -> ``low = high = nan``;
    all values equal -> ``low = high = mean``.
    """
    _check_confidence(confidence)
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "no values")
    if n == 1:
        return Interval(float(x[0]), math.nan, math.nan, 1, "single seed, no interval")
    method = f"t-interval over {_plural(n, 'seed')}"
    if np.all(x == x[0]):
        # Exactly zero width: np.mean/np.std of equal floats can be off by an ulp.
        m = float(x[0])
        return Interval(m, m, m, n, method)
    mean = float(x.mean())
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, method)


def _as_outcomes(x: Any, name: str) -> np.ndarray:
    """``x`` as a float (seeds, clips) array; a 1-D input is one seed."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D (seeds, clips), got shape {arr.shape}")
    return arr


def _validate_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape (same seeds and clips), got a {a.shape} and b {b.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"a and b need at least 1 seed and 1 clip, got a {a.shape} and b {b.shape}")
    for name, arr in (("a", a), ("b", b)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} (shape {arr.shape}) holds non-finite values; a and b must be finite")


def _counts(idx: np.ndarray, size: int) -> np.ndarray:
    """Per row of ``idx`` (k, m), how often each of ``size`` indices was drawn: shape (k, size)."""
    k = idx.shape[0]
    # Offsetting each row by row*size lets one bincount count all rows at once.
    flat = (idx + (np.arange(k) * size)[:, None]).ravel()
    return np.bincount(flat, minlength=k * size).reshape(k, size).astype(float)


def _bootstrap_means(d: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Resampled means of ``d`` (S, C): seeds and clips drawn with replacement, independently.

    The mean over drawn rows i_1..i_S and columns j_1..j_C is ``w_row @ d @ w_col / (S*C)``
    with ``w_row``, ``w_col`` the draw counts, so no (S x C) block is gathered per resample.
    """
    s, c = d.shape
    rows = rng.integers(0, s, size=(n_resamples, s))
    means = np.empty(n_resamples)
    block = max(1, _CHUNK_ELEMENTS // max(s, c))
    for start in range(0, n_resamples, block):
        stop = min(n_resamples, start + block)
        # Drawn after all of `rows`, block by block: the stream equals one (R, C) draw.
        cols = rng.integers(0, c, size=(stop - start, c))
        weighted = _counts(rows[start:stop], s) @ d  # (k, C): per resample, drawn seeds summed
        means[start:stop] = np.sum(weighted * _counts(cols, c), axis=1) / (s * c)
    return means


def paired_bootstrap(a: Any, b: Any, n_resamples: int = 10000, confidence: float = 0.95,
                     seed: int = 0) -> PairedComparison:
    """Paired two-level bootstrap of ``mean(a - b)`` over seeds (rows) and clips (columns).

    ``a``, ``b``: per-clip outcomes (e.g. 1.0 correct / 0.0 wrong) of two configurations on the SAME
    seeds and the SAME clips, shape (seeds, clips); a 1-D input is one seed. Statistic: the mean of
    ``d = a - b``. Each resample draws seeds with replacement and, independently, clips with
    replacement (one clip draw shared by all drawn seeds, since every seed sees the same clips), and
    takes the mean of ``d`` over the drawn rows and columns (draw order: module docstring).
    Interval: percentiles ``(1-confidence)/2`` and ``(1+confidence)/2`` (linear interpolation) of the
    resampled means ``m``. Two-sided p-value:
    ``min(1, 2 * min((#{m <= 0} + 1) / (R + 1), (#{m >= 0} + 1) / (R + 1)))``, R = ``n_resamples``.
    Deterministic for a given ``seed``.
    """
    _check_confidence(confidence)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples!r}")
    a_arr, b_arr = _as_outcomes(a, "a"), _as_outcomes(b, "b")
    _validate_pair(a_arr, b_arr)
    d = a_arr - b_arr
    n_seeds, n_clips = d.shape
    means = _bootstrap_means(d, n_resamples, np.random.default_rng(seed))
    low, high = np.quantile(means, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0], method="linear")
    # +1 in numerator and denominator counts the observed data as one resample: p is never 0.
    below = (np.count_nonzero(means <= 0) + 1) / (n_resamples + 1)
    above = (np.count_nonzero(means >= 0) + 1) / (n_resamples + 1)
    method = (f"paired bootstrap over {_plural(n_seeds, 'seed')} and {_plural(n_clips, 'clip')} "
              f"({n_resamples} resamples)")
    return PairedComparison(float(d.mean()), float(low), float(high), float(min(1.0, 2.0 * min(below, above))),
                            n_seeds, n_clips, confidence, method)


def paired_seed_t_interval(a_per_seed: Any, b_per_seed: Any, confidence: float = 0.95) -> PairedComparison:
    """Paired t over seeds, the fallback when per-clip outcomes are missing.

    Differences ``d_i = a_i - b_i`` of one number per seed (same seed i); the difference is their mean,
    the interval ``t_interval(d)``; p-value from the two-sided paired t-test (``t = mean(d) / (s/sqrt(n))``,
    df = n - 1; ``scipy.stats.ttest_1samp``). Pairs with a NaN on either side are dropped (a pair needs
    both). p = 1.0 when all differences are 0, 0.0 when they are all equal and nonzero (t is infinite),
    nan when n < 2. ``n_clips`` is 0.
    """
    _check_confidence(confidence)
    a = np.asarray(a_per_seed, dtype=float).ravel()
    b = np.asarray(b_per_seed, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a and b must hold one value per seed for the same seeds, got a {a.shape} and b {b.shape}")
    d = (a - b)[~(np.isnan(a) | np.isnan(b))]
    n = int(d.size)
    interval = t_interval(d, confidence)
    if n < 2:
        p = math.nan
    elif np.all(d == d[0]):
        # ttest_1samp would divide by a zero (or round-off) standard deviation here.
        p = 1.0 if d[0] == 0 else 0.0
    else:
        p = float(stats.ttest_1samp(d, 0.0).pvalue)
    return PairedComparison(interval.mean, interval.low, interval.high, p, n, 0, confidence,
                            f"paired t over {_plural(n, 'seed')}")


def detectable_difference(n_clips: int, n_seeds: int, discordant_rate: float, confidence: float = 0.95,
                          power: float = 0.8) -> float:
    """Smallest accuracy difference a paired comparison on ``n_clips`` x ``n_seeds`` detects.

    Normal approximation, clip outcomes treated as independent, two-sided level ``1 - confidence``:
    ``(z_{(1+confidence)/2} + z_{power}) * sqrt(discordant_rate / (n_clips * n_seeds))``.
    ``discordant_rate`` is the share of (clip, seed) pairs on which exactly one configuration is right;
    it bounds the variance of a paired 0/1 difference (E[d^2] = discordant rate >= Var d).
    """
    for name, count in (("n_clips", n_clips), ("n_seeds", n_seeds)):
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise ValueError(f"{name} must be a positive integer, got {count!r}")
    if not 0.0 < discordant_rate <= 1.0:
        raise ValueError(f"discordant_rate must be in (0, 1], got {discordant_rate!r}")
    _check_confidence(confidence)
    _check_confidence(power, "power")
    z = float(stats.norm.ppf((1.0 + confidence) / 2.0)) + float(stats.norm.ppf(power))
    return z * math.sqrt(discordant_rate / (n_clips * n_seeds))
