"""The divergence rule on hand-made series: no Trainer, lists of floats in, a verdict out."""

import numpy as np
import pytest

from lightning_debug.rules.divergence import assess_divergence
from lightning_debug.rules.persistence import streak
from lightning_debug.stats import trend

N = 15
RISING_LOSS = [0.30 + 0.01 * i for i in range(N)]  # +47% over the window, a clean rise
FLAT_ACC = [0.90, 0.91, 0.90, 0.91, 0.90, 0.91, 0.90, 0.91, 0.90, 0.91, 0.90, 0.91, 0.90, 0.91, 0.90]


def _assess(loss, metric, **kwargs):
    defaults = dict(mode="max", loss_min=min(loss), metric_best=max(metric), chance=0.1, min_rise=0.03)
    return assess_divergence(loss, metric, **{**defaults, **kwargs})


def test_rising_loss_with_flat_metric_is_divergence():
    v = _assess(RISING_LOSS, FLAT_ACC)
    assert v.diverging and v.loss.rising, v
    assert v.loss_rise == pytest.approx(0.44 / 0.30 - 1, rel=1e-6), "trend line at the last check vs the best loss"
    assert not v.overfitting and v.train is None, "no training loss given: overfitting is not judged"


def test_flat_loss_is_not_divergence():
    flat = [0.30, 0.31, 0.30, 0.29, 0.30, 0.31, 0.30, 0.29, 0.30, 0.31, 0.30, 0.29, 0.30, 0.31, 0.30]
    v = _assess(flat, FLAT_ACC)
    assert not v.diverging and not v.loss.rising, v


def test_a_rise_smaller_than_min_rise_is_not_divergence():
    small = [0.300 + 0.0005 * i for i in range(N)]  # +2.3%, below the 3% default
    v = _assess(small, FLAT_ACC)
    assert v.loss.rising and not v.diverging, (v.loss_rise, v)


def test_metric_that_fell_and_plateaued_is_overfitting_not_divergence():
    fell = [0.9] * 3 + [0.7] * 12  # gave back 25% of its gain over chance 0.1, beyond max_metric_drop 0.1
    v = _assess(RISING_LOSS, fell, metric_best=0.9)
    assert v.metric_given_back > 0.1 and not v.diverging, v


def test_metric_below_chance_is_memorisation_not_divergence():
    at_chance = [0.01] * N
    v = _assess(RISING_LOSS, at_chance, metric_best=0.01, chance=1 / 97)
    assert not v.diverging, v


def test_falling_training_loss_with_rising_dev_loss_is_overfitting():
    train = [1.0 - 0.05 * i for i in range(N)]
    v = _assess(RISING_LOSS, FLAT_ACC, train_loss=train)
    assert v.overfitting and v.train is not None and v.train.falling, v


def test_min_mode_metric_improving_downwards_is_divergence():
    wer = [0.30 - 0.001 * i for i in range(N)]  # a "min" metric getting better
    v = _assess(RISING_LOSS, wer, mode="min", metric_best=min(wer), chance=1.0)
    assert v.diverging, v


def test_streak_counts_consecutive_checks_and_resets():
    s = 0
    for holds in (True, True, False, True):
        s = streak(s, holds)
    assert s == 1
    assert streak(2, True) == 3


@pytest.mark.slow
@pytest.mark.parametrize(("rho", "max_rate"), [(0.0, 0.02), (0.3, 0.1)])
def test_false_alarm_rate_on_flat_autocorrelated_series(rho, max_rate):
    """A flat dev loss with AR(1) noise (sd 0.01 on 0.3) and flat accuracy, 200 runs of 40 checks: the default
    rule (window 15, persistence 3) alarms in at most ``max_rate`` of runs; the i.i.d. Theil-Sen interval with
    the same persistence alarms several times as often."""
    rng = np.random.default_rng(0)
    window, runs, alarms, naive = 15, 200, 0, 0
    for _ in range(runs):
        e = np.zeros(40)
        for t in range(1, 40):
            e[t] = rho * e[t - 1] + rng.normal(scale=0.01)
        loss, acc = 0.3 + e, 0.9 + rng.normal(scale=0.005, size=40)
        run_streak = naive_streak = 0
        fired = naive_fired = False
        for end in range(window, 41):
            lw, aw = list(loss[end - window : end]), list(acc[end - window : end])
            v = _assess(lw, aw, loss_min=float(loss[:end].min()), metric_best=float(acc[:end].max()))
            run_streak = streak(run_streak, v.diverging)
            fired |= run_streak >= 3
            naive_streak = streak(naive_streak, trend(lw).low > 0 and v.loss_rise > 0.03)
            naive_fired |= naive_streak >= 3
        alarms += fired
        naive += naive_fired
    assert alarms / runs <= max_rate, f"false-alarm rate {alarms / runs:.3f} (i.i.d. interval: {naive / runs:.3f})"
    assert naive >= 2 * alarms, (naive, alarms)


def test_a_new_best_metric_follows_the_mode_and_the_first_finite_value_counts():
    from lightning_debug.rules.divergence import is_new_best

    assert is_new_best(0.9, float("nan"), "max") and is_new_best(0.95, 0.9, "max") and not is_new_best(0.8, 0.9, "max")
    assert is_new_best(0.3, 0.4, "min") and not is_new_best(float("nan"), 0.4, "min")


def test_arguments_the_rule_cannot_work_with_are_named():
    from lightning_debug.rules.divergence import validate_arguments

    with pytest.raises(ValueError, match="at least 6"):
        validate_arguments(5, None, 3, 0.03, 0.1, 0.95)
    with pytest.raises(ValueError, match="`persistence`"):
        validate_arguments(15, None, 1, 0.03, 0.1, 0.95)
    validate_arguments(15, None, 3, 0.03, 0.1, 0.95)
