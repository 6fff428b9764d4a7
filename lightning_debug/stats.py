"""Noise-aware trend statistics: ``scipy.stats``' numbers, computed directly where its wrappers cost more than the work.

Point-to-point comparisons (step s vs s-k) are what produces false alarms in existing tools. Decisions here
use a robust slope with a confidence interval (Theil-Sen) and a rank trend test (Mann-Kendall, i.e. Kendall's
tau of the series against time), which ignore isolated spikes and do not assume normal noise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _st
from scipy.special import ndtr

MIN_TREND_POINTS = 6  # the smallest n at which an exact two-sided Kendall test can reach p < 0.01 (0.0028)


@dataclass(frozen=True)
class Trend:
    """Theil-Sen slope with its confidence interval, and the Mann-Kendall test of the same series."""

    slope: float
    low: float
    high: float
    intercept: float
    tau: float
    p_value: float
    n: int

    @property
    def rising(self) -> bool:
        """The whole confidence interval of the slope is above zero."""
        return self.low > 0

    @property
    def falling(self) -> bool:
        return self.high < 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def trend(
    y: Sequence[float] | np.ndarray, x: Sequence[float] | np.ndarray | None = None, confidence: float = 0.95
) -> Trend:
    """Robust trend of ``y`` against ``x`` (default: 0..n-1). Needs at least 3 finite points."""
    x_arr, y_arr = _finite(y, x)
    slopes, _ = _pairwise_slopes(x_arr, y_arr)
    slope, intercept = _sen_line(x_arr, y_arr, slopes)
    low, high = _sen_interval(slopes, _kendall_variance(len(y_arr), _tie_counts(x_arr), _tie_counts(y_arr)), confidence)
    if np.ptp(y_arr) == 0:
        tau, p = 0.0, 1.0
    else:  # scipy's p-value: its exact null distribution up to 33 points without ties
        kt = _kendalltau(x_arr, y_arr)
        tau, p = float(kt.statistic), float(kt.pvalue)
    return Trend(
        slope=slope,
        low=low,
        high=high,
        intercept=intercept,
        tau=tau if math.isfinite(tau) else 0.0,
        p_value=p if math.isfinite(p) else 1.0,
        n=len(y_arr),
    )


def _sen_line(x: np.ndarray, y: np.ndarray, slopes: np.ndarray) -> tuple[float, float]:
    """The Theil-Sen line (slope, intercept) through finite points, from their sorted pairwise ``slopes``."""
    slope = _sorted_median(slopes)
    return slope, float(median(y) - slope * median(x))


def theil_sen_slope(y: Sequence[float] | np.ndarray) -> float:
    """The Theil-Sen slope of ``y`` against 0..n-1 over its finite points (at least 3): :func:`trend`'s slope
    without its interval and test, for callers that use nothing else (~20x cheaper)."""
    x_arr, y_arr = _finite(y, None)
    return _sorted_median(_pairwise_slopes(x_arr, y_arr)[0])


def _tau_b(s: float, x_ties: np.ndarray, y_ties: np.ndarray, n: int) -> float:
    """Kendall's tau-b of ``n`` points from S and the sizes of their groups of tied ``x`` and ``y``:
    ``scipy.stats.kendalltau``'s statistic, same operations (so the same bits), without its test."""
    total = n * (n - 1) // 2
    x_pairs, y_pairs = (int((c * (c - 1) // 2).sum()) for c in (x_ties, y_ties))
    if x_pairs == total or y_pairs == total:
        return math.nan
    return float(np.minimum(1.0, max(-1.0, s / np.sqrt(total - x_pairs) / np.sqrt(total - y_pairs))))


def median(a: Sequence[float] | np.ndarray) -> float:
    """``np.median`` of a 1-D array (the same number: NaN if any value is, NaN when empty) without its ~9 us of
    generality, for the few-value windows a check judges."""
    s = np.sort(np.asarray(a, dtype=float))
    return math.nan if len(s) == 0 or np.isnan(s[-1]) else _sorted_median(s)  # np.sort puts NaN last


def _sorted_median(a: np.ndarray) -> float:
    """``np.median`` of an already sorted, finite 1-D array (the same number), without its ~9 us of generality."""
    return float(_middle(a))


def _middle(s: np.ndarray) -> np.ndarray:
    """The middle of ``s``, sorted along its last axis, as ``np.median`` takes it (the mean of the two middles)."""
    n = s.shape[-1]
    return s[..., n // 2] if n % 2 else (s[..., n // 2 - 1] + s[..., n // 2]) / 2.0


def _tie_counts(v: np.ndarray) -> np.ndarray:
    """The sizes of the groups of equal values in ``v`` that have more than one member."""
    v = np.sort(v)
    same = v[1:] == v[:-1]
    if not same.any():
        return _NO_TIES
    counts = np.diff(np.flatnonzero(np.concatenate(([True], ~same, [True]))))
    return counts[counts > 1]


_NO_TIES = np.zeros(0, dtype=np.int64)


# The same numbers as ``scipy.stats.theilslopes`` / ``kendalltau`` / ``median_abs_deviation``, computed directly:
# their input-validation wrappers cost ~0.15 ms a call, several times the work on a window of evaluations, and a
# debugger runs these on every validation of runs whose epochs last 0.1 s.
_kendalltau = getattr(_st.kendalltau, "__wrapped__", _st.kendalltau)
_NORMAL_MAD = float(_st.norm.ppf(0.75))  # median_abs_deviation(scale="normal") divides by this


@functools.lru_cache(maxsize=8)
def two_sided_z(confidence: float) -> float:
    """The normal quantile of a two-sided ``confidence`` interval (1.96 for 0.95), computed once per level."""
    return float(_st.norm.ppf(0.5 + confidence / 2))


def _finite(y: Sequence[float] | np.ndarray, x: Sequence[float] | np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    y_arr = np.asarray(y, dtype=float)
    x_arr = np.arange(len(y_arr), dtype=float) if x is None else np.asarray(x, dtype=float)
    keep = np.isfinite(y_arr) & np.isfinite(x_arr)
    if keep.sum() < 3:
        raise ValueError(f"trend needs at least 3 finite points, got {int(keep.sum())}")
    return x_arr[keep], y_arr[keep]


def _pairwise_slopes(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Sorted slopes of every pair with ``x_i > x_j``, and Kendall's S (sum of the signs of their ``y`` steps)."""
    dx = x[:, None] - x
    dy = y[:, None] - y
    forward = dx > 0
    return np.sort(dy[forward] / dx[forward]), float(np.sign(dy[forward]).sum())


def _kendall_variance(n: int, x_ties: np.ndarray, y_ties: np.ndarray) -> float:
    """Variance of Kendall's S of ``n`` points under no trend, with the sizes of their groups of tied ``x`` and
    ``y`` (Sen 1968, eq. 2.6)."""
    x_term, y_term = (float(np.sum(c * (c - 1) * (2 * c + 5))) for c in (x_ties, y_ties))
    return (n * (n - 1) * (2 * n + 5) - x_term - y_term) / 18.0


def _sen_interval(slopes: np.ndarray, var_s: float, confidence: float) -> tuple[float, float]:
    """Sen's (1968) confidence interval of the median slope: order statistics of the pairwise slopes."""
    sigma, nt = math.sqrt(max(var_s, 0.0)), len(slopes)
    lo_i = max(int(np.round((nt - two_sided_z(confidence) * sigma) / 2.0)) - 1, 0)
    hi_i = min(int(np.round((nt + two_sided_z(confidence) * sigma) / 2.0)), nt - 1)
    return float(slopes[lo_i]), float(slopes[hi_i])


def finite_median(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """Median of the finite values along ``axis`` (NaN where there are none): ``np.nanmedian``'s numbers with
    infinities left out, without its masked arrays, which made it ~50x slower on the few-row arrays a check
    judges (a loss check spent most of its 1.3 ms there)."""
    a = np.moveaxis(np.asarray(a, dtype=float), axis, -1)
    n = a.shape[-1]
    if n == 0:
        return np.full(a.shape[:-1], np.nan)
    finite = np.isfinite(a)
    if finite.all():  # the common case: the middle positions are fixed (the same sort and sum as below)
        s = np.sort(a, axis=-1)
        return np.asarray((s[..., (n - 1) // 2] + s[..., n // 2]) / 2)
    k = finite.sum(axis=-1)
    s = np.sort(np.where(finite, a, np.nan), axis=-1)  # NaNs last
    lo = np.take_along_axis(s, np.maximum((k - 1) // 2, 0)[..., None], axis=-1)[..., 0]
    hi = np.take_along_axis(s, np.minimum(k // 2, a.shape[-1] - 1)[..., None], axis=-1)[..., 0]
    with np.errstate(invalid="ignore"):
        return np.where(k > 0, (lo + hi) / 2, np.nan)


def row_medians(a: np.ndarray) -> np.ndarray:
    """``np.median(a, axis=-1)``'s numbers (NaN for a row with a NaN) for many short rows, without its partition and
    mean machinery (~45 us on the (n, 3) levels of a gradient check)."""
    a = np.asarray(a, dtype=float)
    n = a.shape[-1]
    if n == 0:
        return np.full(a.shape[:-1], np.nan)
    s = np.sort(a, axis=-1)  # NaNs last
    return np.where(np.isnan(s[..., -1]), np.nan, _middle(s))


def robust_scale(y: Sequence[float] | np.ndarray) -> float:
    """Noise level of a series: the median absolute deviation of its first differences, scaled to a sigma.

    Differencing removes the trend, so this measures step-to-step noise, not the trend's own spread.
    """
    d = np.diff(np.asarray(y, dtype=float))
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return 0.0
    return median(np.abs(d - median(d))) / _NORMAL_MAD / math.sqrt(2)


def trend_autocorrelated(
    y: Sequence[float] | np.ndarray, x: Sequence[float] | np.ndarray | None = None, confidence: float = 0.95
) -> Trend:
    """:func:`trend` with its interval and p-value widened for autocorrelated noise.

    Successive evaluations of one model are not independent (consecutive checkpoints are similar), which
    makes the plain Theil-Sen interval and Mann-Kendall p-value over-confident. Following Yue & Wang (2004),
    the variance of Kendall's S is inflated by ``1 + 2 * sum_k (1 - k/n) rho^k``, with ``rho`` the lag-1
    autocorrelation of the detrended series (clipped at 0: negative correlation never narrows the interval),
    and Sen's (1968) interval is recomputed with that variance.
    """
    x_arr, y_arr = _finite(y, x)
    slopes, s = _pairwise_slopes(x_arr, y_arr)
    slope, intercept = _sen_line(x_arr, y_arr, slopes)
    x_ties, y_ties = _tie_counts(x_arr), _tie_counts(y_arr)
    n = len(y_arr)
    resid = y_arr - (intercept + slope * x_arr)
    resid = resid - resid.mean()
    denom = float(np.dot(resid, resid))
    rho = float(np.dot(resid[:-1], resid[1:]) / denom) if denom > 0 else 0.0
    rho = min(max(rho, 0.0), 0.95)
    k = np.arange(1, n)
    inflation = 1.0 + 2.0 * float(np.sum((1 - k / n) * rho**k))
    var_s = _kendall_variance(n, x_ties, y_ties) * inflation
    low, high = _sen_interval(slopes, var_s, confidence)
    sigma = math.sqrt(max(var_s, 0.0))
    z_s = (s - math.copysign(1.0, s)) / sigma if s != 0 and sigma > 0 else 0.0
    tau = _tau_b(s, x_ties, y_ties, n)
    return Trend(
        slope=slope,
        low=low,
        high=high,
        intercept=intercept,
        tau=tau if math.isfinite(tau) else 0.0,
        p_value=float(2 * ndtr(-abs(z_s))),
        n=n,
    )
