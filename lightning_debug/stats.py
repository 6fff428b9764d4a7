"""Noise-aware trend statistics: thin wrappers over ``scipy.stats``.

Point-to-point comparisons (step s vs s-k) are what produces false alarms in existing tools. Decisions here
use a robust slope with a confidence interval (Theil-Sen) and a rank trend test (Mann-Kendall, i.e. Kendall's
tau of the series against time), which ignore isolated spikes and do not assume normal noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _st

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
    y_arr = np.asarray(y, dtype=float)
    x_arr = np.arange(len(y_arr), dtype=float) if x is None else np.asarray(x, dtype=float)
    keep = np.isfinite(y_arr) & np.isfinite(x_arr)
    y_arr, x_arr = y_arr[keep], x_arr[keep]
    if len(y_arr) < 3:
        raise ValueError(f"trend needs at least 3 finite points, got {len(y_arr)}")
    res = _st.theilslopes(y_arr, x_arr, alpha=confidence)
    if np.ptp(y_arr) == 0:
        tau, p = 0.0, 1.0
    else:
        kt = _st.kendalltau(x_arr, y_arr)
        tau, p = float(kt.statistic), float(kt.pvalue)
    return Trend(
        slope=float(res.slope),
        low=float(res.low_slope),
        high=float(res.high_slope),
        intercept=float(res.intercept),
        tau=tau if math.isfinite(tau) else 0.0,
        p_value=p if math.isfinite(p) else 1.0,
        n=len(y_arr),
    )


def robust_scale(y: Sequence[float] | np.ndarray) -> float:
    """Noise level of a series: the median absolute deviation of its first differences, scaled to a sigma.

    Differencing removes the trend, so this measures step-to-step noise, not the trend's own spread.
    """
    d = np.diff(np.asarray(y, dtype=float))
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return 0.0
    return float(_st.median_abs_deviation(d, scale="normal") / math.sqrt(2))


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
    y_arr = np.asarray(y, dtype=float)
    x_arr = np.arange(len(y_arr), dtype=float) if x is None else np.asarray(x, dtype=float)
    keep = np.isfinite(y_arr) & np.isfinite(x_arr)
    y_arr, x_arr = y_arr[keep], x_arr[keep]
    base = trend(y_arr, x_arr, confidence)
    n = base.n
    resid = y_arr - (base.intercept + base.slope * x_arr)
    resid = resid - resid.mean()
    denom = float(np.dot(resid, resid))
    rho = float(np.dot(resid[:-1], resid[1:]) / denom) if denom > 0 else 0.0
    rho = min(max(rho, 0.0), 0.95)
    k = np.arange(1, n)
    inflation = 1.0 + 2.0 * float(np.sum((1 - k / n) * rho**k))

    dx = x_arr[:, None] - x_arr
    dy = y_arr[:, None] - y_arr
    slopes = np.sort(dy[dx > 0] / dx[dx > 0])

    def tie_term(v: np.ndarray) -> float:
        _, counts = np.unique(v, return_counts=True)
        return float(sum(c * (c - 1) * (2 * c + 5) for c in counts if c > 1))

    var_s = (n * (n - 1) * (2 * n + 5) - tie_term(x_arr) - tie_term(y_arr)) / 18.0 * inflation
    z = float(_st.norm.ppf(0.5 + confidence / 2))
    sigma = math.sqrt(max(var_s, 0.0))
    nt = len(slopes)
    lo_i = max(int(np.round((nt - z * sigma) / 2.0)) - 1, 0)
    hi_i = min(int(np.round((nt + z * sigma) / 2.0)), nt - 1)
    s = float(np.sum(np.sign(dy[dx > 0])))
    z_s = (s - math.copysign(1.0, s)) / sigma if s != 0 and sigma > 0 else 0.0
    return Trend(
        slope=base.slope,
        low=float(slopes[lo_i]),
        high=float(slopes[hi_i]),
        intercept=base.intercept,
        tau=base.tau,
        p_value=float(2 * _st.norm.sf(abs(z_s))),
        n=n,
    )
