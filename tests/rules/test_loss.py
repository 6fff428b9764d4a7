"""The loss rules without a Trainer: schedules, floors, the jump and trend verdicts, and their Monte-Carlo
false-alarm rates and powers on simulated curves (``simulate.py``: heavy-tailed, autocorrelated noise, spikes,
warm-up + cosine, pauses that resume, label-smoothing and entropy floors).

Bounds asserted (10,000 curves per length and fault in the ``slow`` run; 1,000 healthy and 300 faulty curves of
30-1000 steps in the default run; the measured rates are in ``docs/callbacks/loss_convergence.md``):

- ``loss.diverging`` on a healthy curve: <= 1.5% at every run length (measured 0-1.0%, the most at 3000 steps);
- ``loss.not_decreasing``: <= 2.0% (measured 0.1-1.4%); ``loss.plateau``: <= 1.5% (measured 0.1-0.7%, nearly
  all on curves that pause for up to a quarter of the run: until it resumes, a pause is a plateau);
- power: a jump (lr far too high) >= 99% of runs of 60+ steps, a growing lr >= 95%, a flat loss >= 80% of
  runs of 30+ steps and >= 99% from 200 steps, a capacity plateau >= 45% at 60 steps and >= 85% from 1000.
"""

import math

import numpy as np
import pytest

from lightning_debug.rules import loss as R
from lightning_debug.rules.overfit import assess_memorisation
from rules import simulate

LENGTHS = (30, 60, 200, 1000, 3000)


# ---------------------------------------------------------------------------------------------- small rules
@pytest.mark.parametrize(
    ("planned", "expected"),
    [
        (30, R.Schedule(bin_steps=1, check_every=20, warmup=30, stuck_after=30)),
        (380, R.Schedule(bin_steps=9, check_every=36, warmup=38, stuck_after=190)),
        (3000, R.Schedule(bin_steps=10, check_every=200, warmup=200, stuck_after=500)),
        (None, R.Schedule(bin_steps=10, check_every=200, warmup=200, stuck_after=200)),
        (math.inf, R.Schedule(bin_steps=10, check_every=200, warmup=200, stuck_after=200)),
    ],
)
def test_schedule_scales_with_the_planned_run(planned, expected):
    assert R.schedule_for(planned) == expected
    assert R.schedule_for(planned).probes() == [p for p in (1, 2, 4, 8, 16, 32, 64, 128) if p < expected.check_every]


def test_label_smoothing_floor_is_the_entropy_of_the_smoothed_target():
    assert R.label_smoothing_floor(10, 0.1) == pytest.approx(0.5003, abs=1e-4)  # the "0.50"
    assert R.label_smoothing_floor(2, 0.0) == 0.0
    eps, c = 0.2, 7
    q = np.full(c, eps / c)
    q[0] += 1 - eps
    assert R.label_smoothing_floor(c, eps) == pytest.approx(float(-(q * np.log(q)).sum()))


def test_probability_input_floor_and_its_signature():
    assert R.probability_input_floor(10) == pytest.approx(1.4611, abs=1e-4)
    assert R.classes_of_probability_floor(1.4611) == 10
    assert R.classes_of_probability_floor(R.probability_input_floor(2)) == 2
    assert R.classes_of_probability_floor(1.2) is None  # 7 classes would be 1.165: 3% off
    assert R.classes_of_probability_floor(1.52, classes=10) == 10  # approached from above, within 5%
    assert R.classes_of_probability_floor(1.40, classes=10) is None  # below the floor: not this signature
    assert R.classes_of_probability_floor(float("nan")) is None


def test_choose_floor_takes_the_strongest_evidence_and_names_it():
    assert R.choose_floor(0.3, (10, 0.1)) == R.Floor(0.3, "set by `floor`")
    assert R.choose_floor(None).value == 0.0
    smoothed = R.choose_floor(None, (10, 0.1))
    assert smoothed.value == pytest.approx(0.5, abs=1e-3) and "label smoothing 0.1 over 10 classes" in smoothed.source
    entropy = R.choose_floor(None, (10, 0.1), train_val=(1.9, 1.95))
    assert entropy.value == 1.9 and "validation" in entropy.source
    assert R.agrees(1.9, 1.95, start=4.2) and not R.agrees(0.1, 0.6, start=2.3)


def test_bins_are_medians_and_ignore_nan():
    values = np.array([[1.0], [100.0], [2.0], [np.nan], [3.0]])
    assert R.bin_medians(values, 3)[:, 0].tolist() == [2.0, 3.0]
    assert R.level_of(np.array([5.0, 1.0, 1.2, 0.8, 1.0])) == pytest.approx(0.9)  # the last two bins, not one


def test_bins_levels_and_trends_give_np_medians_numbers_bitwise():
    """The loss rules' medians (bins of finite rows, the current level, Theil-Sen's slope and intercept) are
    np.median's exact numbers: odd and even bins, a short last bin, several series, ties."""
    rng = np.random.default_rng(3)
    for _ in range(300):
        rows, series, steps = int(rng.integers(1, 40)), int(rng.integers(1, 4)), int(rng.integers(1, 12))
        values = np.round(rng.standard_normal((rows, series)) * 10 ** rng.uniform(-3, 3), int(rng.integers(1, 6)))
        full = rows // steps * steps
        expected = [np.median(values[:full].reshape(-1, steps, series), axis=1)]
        if full < rows:
            expected.append(np.median(values[full:], axis=0)[None])
        assert np.array_equal(R.bin_medians(values, steps), np.concatenate(expected))
        bins = values.T
        k = int(min(8, max(2, math.ceil(rows / 10)))) if rows >= 2 else 1
        assert np.array_equal(R.level_of(bins), np.median(bins[..., rows - k :], axis=-1))
        if rows >= 3:
            x = np.arange(rows, dtype=float)
            i, j = np.triu_indices(rows, 1)
            slope = np.median((bins[..., j] - bins[..., i]) / (x[j] - x[i]), axis=-1)
            assert np.array_equal(R.trend(bins, x).slope, slope)


def test_trend_matches_scipy_theil_sen_on_independent_noise():
    from scipy.stats import theilslopes

    rng = np.random.default_rng(0)
    x = np.arange(30.0)
    y = 2.0 - 0.05 * x + rng.standard_t(3, 30) * 0.1
    ours = R.trend(y[None], x)
    ref = theilslopes(y, x, alpha=0.95)
    assert float(ours.slope[0]) == pytest.approx(ref.slope)
    assert float(ours.low[0]) <= ref.low_slope + 1e-12 and float(ours.high[0]) >= ref.high_slope - 1e-12  # widened


def test_a_single_bin_never_raises_a_jump():
    bins = np.array([2.3, 2.0, 1.8, 1.7, 50.0, 1.6, 1.5, 1.5])
    assert not R.assess_jump(bins, len(bins), 2.3, 0.0).fired.any()
    held = np.array([2.3, 2.0, 1.8, 1.7, 50.0, 9.0, 1.5, 1.5])  # the blow-up holds for the next bin: a level
    verdict = R.assess_jump(held, len(held), 2.3, 0.0)
    assert verdict.fired.tolist() == [False] * 5 + [True, False, False], verdict


def test_the_reference_is_a_level_not_the_best_bin():
    """Small-batch noise: bins swing between 0.1 and 0.9 around 0.45. The old rule compared with the best bin
    (0.1); against the lowest 50-step level (~0.4) a bin pair at 1.0 is not 3x further from the floor."""
    rng = np.random.default_rng(1)
    bins = np.clip(0.45 + 0.2 * rng.standard_t(3, 300), 0.1, None)
    bins[200:202] = 1.3
    assert not R.assess_jump(bins, 300, 1.4, 0.0).fired.any()


def test_assess_loss_batch_priorities():
    x = np.arange(10.0) * 10 + 5
    flat = np.full((1, 10), 2.3) + np.linspace(0, 1e-3, 10)
    v = R.assess_loss_batch(flat, x, np.array([2.3]), 2.3, 0.0, 100, 50, judging=True)
    assert R.VERDICTS[int(v.code[0])] == "not_decreasing"
    falling = np.linspace(2.0, 1.0, 10)[None]
    v = R.assess_loss_batch(falling, x, np.array([1.0]), 2.3, 0.0, 100, 50, final=True)
    assert R.VERDICTS[int(v.code[0])] == "still_decreasing" and bool(v.far[0])
    v = R.assess_loss_batch(flat, x, np.array([2.3]), 2.3, 0.0, 100, 50, judging=False)
    assert int(v.code[0]) == R.NONE  # warm-up: no verdict yet


def test_memorisation_verdicts():
    assert assess_memorisation([2.3, 1.0, 0.05], 0.0, 0.05, 0.02).status == "passed"
    stuck = assess_memorisation([2.3] * 101, 0.0, 0.05, 0.02)
    assert stuck.status == "stuck" and stuck.closed == 0.0
    slow = assess_memorisation(list(np.linspace(2.3, 1.3, 101)), 0.0, 0.05, 0.02)
    assert slow.status == "slow"
    probs = [1.4611 + 0.84 * math.exp(-k / 5) for k in range(101)]  # softmax outputs fed to cross-entropy
    high = assess_memorisation(probs, 0.0, 0.05, 0.02)
    assert high.status == "floor_high" and high.probability_classes == 10, high


# ---------------------------------------------------------------------------------------------- Monte Carlo
def _rates(replay: simulate.Replay) -> dict[str, float]:
    return {name: float(replay.codes[:, k].mean()) for k, name in enumerate(R.VERDICTS)}


def _false_alarms(n_curves: int, lengths: tuple[int, ...] = LENGTHS) -> None:
    for n in lengths:
        rates = _rates(simulate.replay(simulate.healthy(n_curves, n, seed=n)))
        assert rates["diverging"] <= 0.015, (n, rates)
        assert rates["not_decreasing"] <= 0.020, (n, rates)
        assert rates["plateau"] <= 0.015, (n, rates)


def _power(n_curves: int, lengths: tuple[int, ...] = LENGTHS) -> None:
    floors = {  # minimum detection rate per fault and run length
        "jump": {30: 0.6, 60: 0.99, 200: 0.99, 1000: 0.99, 3000: 0.99},
        "growing": {30: 0.9, 60: 0.95, 200: 0.95, 1000: 0.99, 3000: 0.99},
        "flat": {30: 0.8, 60: 0.85, 200: 0.97, 1000: 0.99, 3000: 0.99},
        "plateau": {30: 0.3, 60: 0.45, 200: 0.6, 1000: 0.85, 3000: 0.95},
    }
    expected = {"jump": "diverging", "growing": "diverging", "flat": "not_decreasing", "plateau": "plateau"}
    for fault, by_length in floors.items():
        for n, minimum in by_length.items():
            if n not in lengths:
                continue
            rates = _rates(simulate.replay(simulate.faulty(fault, n_curves, n, seed=n + 1)))
            assert rates[expected[fault]] >= minimum, (fault, n, rates)


def test_false_alarm_rates_on_simulated_healthy_curves():
    _false_alarms(1000, lengths=(30, 60, 200, 1000))


def test_power_on_simulated_faults():
    _power(300, lengths=(30, 60, 200, 1000))


@pytest.mark.slow
def test_false_alarm_rates_on_ten_thousand_curves_per_length():
    _false_alarms(10_000)


@pytest.mark.slow
def test_power_on_ten_thousand_faulty_curves():
    _power(10_000)


def test_a_slow_significant_fall_is_not_stuck_mid_run():
    """An RNN before its drop: 2% of the gap in 84 batches, but significantly falling. Mid-run that is a wait;
    at the end of the run the same curve is not_decreasing (a fall too slow to matter)."""
    from lightning_debug.rules.loss import NOT_DECREASING, assess_loss_batch

    rng = np.random.default_rng(0)
    xs = np.arange(5.0, 85.0, 10.0)
    window = 0.693 - 0.00034 * xs + rng.normal(0, 0.002, len(xs))
    kwargs = dict(level=float(window[-1]), start=0.693, floor=0.0, batches=84, span=84)
    assert int(assess_loss_batch(window, xs, **kwargs).code) != NOT_DECREASING
    assert int(assess_loss_batch(window, xs, final=True, **kwargs).code) == NOT_DECREASING


# ---------------------------------------------------------------------------------------------- one check
def _flat(n_bins: int, level: float = 2.3, noise: float = 0.01, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return level + rng.normal(0, noise, n_bins), np.arange(n_bins) * 10 + 5.5


def test_a_check_needs_enough_bins_and_a_long_enough_run():
    schedule = R.schedule_for(1000)
    bins, xs = _flat(4)
    assert R.assess_check(bins, xs, 2.3, 0.0, 40, 20, schedule=schedule) is None, "too few bins for a trend"
    bins, xs = _flat(3)
    short = R.schedule_for(25)
    assert R.assess_check(bins, xs, 2.3, 0.0, 25, 12.5, schedule=short, final=True) is None, "under 30 batches"


def test_a_flat_run_is_stuck_past_the_warmup_but_not_while_the_rate_warms_up():
    schedule = R.schedule_for(1000)
    bins, xs = _flat(60)
    stuck = R.assess_check(bins, xs, 2.3, 0.0, 600, 300, schedule=schedule)
    assert stuck is not None and int(stuck.code) == R.NOT_DECREASING, stuck
    warming = R.assess_check(bins, xs, 2.3, 0.0, 600, 300, schedule=schedule, warming=True)
    assert warming is not None and int(warming.code) == R.NONE
    final = R.assess_check(bins, xs, 2.3, 0.0, 600, 300, schedule=schedule, warming=True, final=True)
    assert final is not None and int(final.code) == R.NOT_DECREASING, "the end judges whatever the rate does"


def test_the_trend_window_is_the_last_span_and_the_whole_run_at_a_short_end():
    bins, xs = _flat(20)
    window, wxs = R.trend_window(bins, xs, 200, 100, final=False)
    assert wxs.min() >= 100 and len(window) == 10
    bins, xs = _flat(8)
    window, _ = R.trend_window(bins, xs, 80, 20, final=True)
    assert len(window) == 8, "too short a window at the end: the whole run"


def test_learning_rate_guards():
    assert R.warming_up(2e-3, 1e-3) and not R.warming_up(1e-3, 1e-3)
    assert R.annealed(1e-4, 1e-3) and not R.annealed(8e-4, 1e-3)
    assert R.plateau_excused(1e-4, 1e-3, [], 500)
    assert not R.plateau_excused(None, 1e-3, [], 500)


def test_a_falling_component_excuses_a_flat_total():
    xs = np.arange(30) * 10 + 5.5
    falling = 2.0 - 0.002 * xs
    assert R.falls_meaningfully(falling, xs, 300)
    assert R.plateau_excused(1e-3, 1e-3, [(falling, xs)], 300)
    flat, _ = _flat(30, level=2.0)
    assert not R.falls_meaningfully(flat, xs, 300)
    assert not R.falls_meaningfully(falling[:5], xs[:5], 300), "too few points for a trend"


def test_first_nonfinite_per_series_from_the_fresh_rows():
    values = np.array([[1.0, np.nan], [np.inf, 2.0], [np.nan, np.nan]])
    assert R.first_nonfinite(values) == [(0, 1), (1, 0)]
    assert R.first_nonfinite(values, fresh=1) == [(0, 1), (1, 2)]
    assert R.first_nonfinite(np.ones((3, 2))) == []


def test_stalled_verdicts_ask_why():
    assert not R.stalled(R.DIVERGING, True, 0.0, 2.3), "a rise is no stall"
    assert R.stalled(R.PLATEAU, True, 0.0, 2.3) and not R.stalled(R.STILL_DECREASING, False, 0.0, 2.3)
    assert R.stalled(R.CONVERGED, False, 1.0, 2.3), "converged at a floor far above 0: can the model fit?"
    assert not R.stalled(R.CONVERGED, False, 0.1, 2.3)


def test_train_equal_to_validation_is_a_floor_only_once_the_model_learned():
    learned = np.full(10, 1.0)
    floor = R.evidence_floor(None, None, None, learned, 2.3, val_level=1.02)
    assert floor.value == 1.0 and "train ~= validation" in floor.source, floor
    assert R.evidence_floor(None, None, None, learned, 2.3).value == 0.0, "no validation loss: no such floor"
    chance = np.full(10, 2.29)
    assert R.evidence_floor(None, None, None, chance, 2.3, val_level=2.3).value == 0.0, "stuck at chance"
    assert R.evidence_floor(0.4, None, None, learned, 2.3, val_level=1.0).source == "set by `floor`"


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"min_drop": 0}, "min_drop"), ({"confidence": 1.0}, "confidence"), ({"converged_level": 0.5}, "converged_level")],
)
def test_thresholds_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=name):
        R.LossRules(**kwargs)


def test_a_mid_run_stall_is_provisional_only_while_a_one_batch_test_can_answer():
    assert R.provisional_stall("loss.not_decreasing", False, True, [])
    assert not R.provisional_stall("loss.not_decreasing", True, True, [])  # the end of the run: a verdict
    assert not R.provisional_stall("loss.not_decreasing", False, False, [])  # no test on the trainer
    assert not R.provisional_stall("loss.not_decreasing", False, True, ["startup.cannot_overfit"])
    assert not R.provisional_stall("loss.plateau", False, True, [])
