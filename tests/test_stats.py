"""Property tests of the trend statistics every decision rests on.

Floats are drawn without subnormals: the test session flushes denormals (torch.set_flush_denormal).
"""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_debug.stats import (
    MIN_TREND_POINTS,
    finite_median,
    median,
    robust_scale,
    row_medians,
    theil_sen_slope,
    trend,
    trend_autocorrelated,
)

series_len = st.integers(min_value=MIN_TREND_POINTS, max_value=60)


@settings(max_examples=100, deadline=None)
@given(
    n=series_len,
    slope=st.floats(0.01, 10.0, allow_subnormal=False),
    noise_frac=st.floats(0.0, 0.45, allow_subnormal=False),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_falling_series_with_noise_below_its_step_is_never_rising_or_flat(n, slope, noise_frac, seed):
    """Bounded noise smaller than half the per-step fall keeps the series strictly decreasing."""
    rng = np.random.default_rng(seed)
    y = 100.0 - slope * np.arange(n) + rng.uniform(-noise_frac, noise_frac, n) * slope
    t = trend(y)
    assert t.falling and not t.rising, f"slope CI [{t.low:.4g}, {t.high:.4g}] for a strictly falling series"
    assert t.tau == pytest.approx(-1.0)


@settings(max_examples=100, deadline=None)
@given(n=series_len, level=st.floats(-1e3, 1e3, allow_subnormal=False), seed=st.integers(0, 2**31 - 1))
def test_pure_noise_is_rarely_called_a_trend(n, level, seed):
    """The 95% slope interval covers 0 for i.i.d. noise; with a fixed seed this is a deterministic check."""
    rng = np.random.default_rng(seed)
    t = trend(level + rng.normal(0, 1, n))
    assert t.low <= t.high
    assert not (t.rising and t.p_value > 0.05), "a CI that excludes 0 must come with a significant rank test"


def test_noise_rate_of_false_trends_is_near_the_nominal_level():
    rng = np.random.default_rng(0)
    flagged = sum((t := trend(rng.normal(0, 1, 20))).rising or t.falling for _ in range(2000))
    assert flagged / 2000 < 0.08, f"{flagged / 2000:.3f} of pure-noise series flagged at 95% confidence"


def test_a_single_spike_does_not_make_a_trend():
    y = np.full(20, 1.0) + np.random.default_rng(1).normal(0, 0.01, 20)
    y[-1] = 50.0
    t = trend(y)
    assert not t.rising, f"one spike moved the robust slope CI to [{t.low:.4g}, {t.high:.4g}]"


@given(st.lists(st.floats(-1e6, 1e6, allow_subnormal=False), min_size=0, max_size=2))
def test_too_short_is_a_clear_error(y):
    with pytest.raises(ValueError, match="at least 3 finite points"):
        trend(y)


def test_robust_scale_measures_step_noise_not_the_trend():
    rng = np.random.default_rng(0)
    y = np.linspace(10, 0, 400) + rng.normal(0, 0.5, 400)
    assert robust_scale(y) == pytest.approx(0.5, rel=0.15)
    assert robust_scale([1.0]) == 0.0


def test_trend_gives_scipys_numbers_exactly():
    """The direct computations are the same numbers as ``scipy.stats`` (bitwise), ties and gaps in x included."""
    from scipy import stats as sp

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(3, 40))
        y = np.round(rng.normal(size=n).cumsum(), 1 if trial % 2 else 6)
        x = np.sort(rng.choice(np.arange(100.0), size=n, replace=trial % 3 == 0))
        if np.ptp(x) == 0:
            continue
        got, ref = trend(y, x), sp.theilslopes(y, x, alpha=0.95)
        assert (got.slope, got.intercept, got.low, got.high) == (
            ref.slope, ref.intercept, ref.low_slope, ref.high_slope
        ), trial  # fmt: skip
        if np.ptp(y) > 0:
            kt = sp.kendalltau(x, y)
            assert (got.tau, got.p_value) == (kt.statistic, kt.pvalue), trial
        d = np.diff(y)
        assert robust_scale(y) == sp.median_abs_deviation(d, scale="normal") / np.sqrt(2), trial


def test_the_cheap_paths_give_the_full_trends_numbers_bitwise():
    """``trend_autocorrelated``'s tau (computed from S, without scipy's test) is ``scipy.stats.kendalltau``'s
    statistic, and ``theil_sen_slope`` is ``trend``'s slope: ties, gaps and constant series included."""
    from scipy import stats as sp

    rng = np.random.default_rng(1)
    for trial in range(300):
        n = int(rng.integers(3, 40))
        y = np.round(rng.normal(size=n).cumsum(), 0 if trial % 3 == 0 else 6)
        if trial % 25 == 0:
            y[:] = 1.0
        y[rng.random(n) < 0.1] = np.nan
        if np.isfinite(y).sum() < 3:
            continue
        finite = y[np.isfinite(y)]
        expected_tau = sp.kendalltau(np.arange(len(finite)), finite).statistic if np.ptp(finite) > 0 else 0.0
        assert trend_autocorrelated(y).tau == expected_tau, trial
        assert theil_sen_slope(y) == trend(y).slope, trial


def test_median_gives_np_medians_numbers_bitwise():
    """The checks' 1-D medians: np.median's exact numbers, odd and even lengths, ties, infinities, a NaN
    anywhere (NaN), and the empty window (NaN)."""
    rng = np.random.default_rng(1)
    for _ in range(2000):
        a = rng.standard_normal(int(rng.integers(1, 30))) * 10 ** rng.uniform(-8, 8)
        if rng.random() < 0.3:
            a = np.round(a, 1)  # ties
        for mark, share in ((np.inf, 0.1), (-np.inf, 0.1), (np.nan, 0.05)):
            a[rng.random(len(a)) < share] = mark
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # inf - inf in the middle pair
            expected = float(np.median(a))
        got = median(a)
        assert got == expected or (math.isnan(got) and math.isnan(expected)), (a, got, expected)
    assert math.isnan(median(np.array([])))


def test_finite_median_gives_nanmedians_numbers_bitwise():
    """The checks' medians of bins with gaps: np.nanmedian's exact numbers (ties of two middles averaged, an
    all-NaN slice NaN), along any axis, and infinities counted as gaps."""
    rng = np.random.default_rng(0)
    for _ in range(1000):
        shape = tuple(int(n) for n in rng.integers(1, 7, size=rng.integers(1, 4)))
        a = rng.standard_normal(shape) * 10 ** rng.uniform(-8, 8)
        if rng.random() < 0.3:
            a = np.round(a, 1)  # ties
        a[rng.random(shape) < rng.choice([0.0, 0.2])] = np.nan  # no gap at all: the fast path
        axis = int(rng.integers(-len(shape), len(shape)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy warns on an all-NaN slice
            expected = np.nanmedian(a, axis=axis)
        got = finite_median(a, axis=axis)
        assert np.array_equal(got, expected, equal_nan=True), (a, axis, got, expected)
    assert finite_median(np.array([1.0, np.inf, 3.0, -np.inf])) == 2.0
    assert np.isinf(finite_median(np.array([1e308, 1.5e308]))) == np.isinf(np.nanmedian(np.array([1e308, 1.5e308])))
    assert finite_median(np.zeros((3, 0))).shape == (3,)


def test_row_medians_give_np_medians_numbers_bitwise():
    """The gradient check's levels: np.median(axis=-1)'s exact numbers for rows of odd and even length, ties,
    infinities (inf - inf in an even middle pair: NaN), and a NaN anywhere in a row (NaN)."""
    rng = np.random.default_rng(2)
    for _ in range(2000):
        shape = (int(rng.integers(1, 12)), int(rng.integers(1, 6)))
        a = rng.standard_normal(shape) * 10 ** rng.uniform(-8, 8)
        if rng.random() < 0.3:
            a = np.round(a, 1)
        for mark, share in ((np.inf, 0.1), (-np.inf, 0.1), (np.nan, 0.05)):
            a[rng.random(shape) < share] = mark
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            expected = np.median(a, axis=-1)
            got = row_medians(a)
        assert np.array_equal(got, expected, equal_nan=True), (a, got, expected)
