"""The early-stopping rules on plain numbers: Lightning's min_delta semantics, patience, warm-up, smoothing, guard."""

import numpy as np
import pytest

from lightning_debug.rules.early_stopping import evaluate, guard, guard_target, improved, in_warmup, smooth, smoothed


def run(values, **kw):
    """Feed ``values`` one check at a time; return the 1-based check that stopped (or None) and the best."""
    mode = kw.setdefault("mode", "min")
    best, wait = np.float32(np.inf if mode == "min" else -np.inf), 0
    for i, v in enumerate(values, 1):
        verdict = evaluate(np.float32(v), best, wait, **kw)
        wait = verdict.wait_count
        if verdict.improved:
            best = np.float32(v)
        if verdict.should_stop:
            return i, float(best), verdict.action
    return None, float(best), None


@pytest.mark.parametrize(
    ("mode", "min_delta", "value", "best", "expected"),
    [
        ("min", 0.1, 0.95, 1.0, False),  # better, but not by min_delta
        ("min", 0.1, 0.85, 1.0, True),
        ("max", 0.1, 0.55, 0.5, False),
        ("max", 0.1, 0.65, 0.5, True),
        ("max", -0.1, 0.45, 0.5, True),  # Lightning: a negative min_delta tolerates a worsening of |min_delta|
        ("max", -0.1, 0.35, 0.5, False),
        ("min", -0.1, 1.05, 1.0, True),
        ("max", 0.0, 0.5, 0.5, False),  # equal is no improvement
    ],
)
def test_improvement_follows_lightnings_min_delta_sign(mode, min_delta, value, best, expected):
    assert improved(value, best, mode=mode, min_delta=min_delta) is expected


def test_negative_min_delta_stops_where_lightning_does():
    """The issue's case: a metric drifting down 0.05 per check, mode max, min_delta -0.1: every check counts as an
    improvement (within |min_delta|), so patience 3 never runs out; abs() of it would stop at check 4."""
    acc = [0.9 - 0.05 * i for i in range(8)]
    assert run(acc, mode="max", min_delta=-0.1, patience=3)[0] is None
    assert run(acc, mode="max", min_delta=0.1, patience=3)[0] == 4


def test_relative_min_delta():
    assert improved(98.5, 100.0, mode="min", min_delta=0.01, relative=True)
    assert not improved(99.5, 100.0, mode="min", min_delta=0.01, relative=True)
    assert improved(5.0, float("inf"), mode="min", min_delta=0.01, relative=True)  # no best yet: any finite value


@pytest.mark.parametrize(("patience", "stop"), [(3, 4), (1, 2), (0, 2), (-1, 2)])
def test_patience_as_lightning_takes_it(patience, stop):
    """``wait_count >= patience`` after counting: 0 and negative patience stop at the first non-improvement."""
    assert run([1.0, 1.0, 1.0, 1.0, 1.0], patience=patience)[0] == stop


def test_order_nonfinite_thresholds_then_improvement():
    assert evaluate(float("nan"), 1.0, 0, mode="min").action == "nonfinite"
    assert evaluate(float("nan"), 1.0, 0, mode="min", check_finite=False).action == "wait"
    assert evaluate(0.1, 1.0, 0, mode="min", stopping_threshold=0.2).action == "threshold"
    assert evaluate(5.0, 1.0, 0, mode="min", divergence_threshold=4.0).action == "divergence"
    assert evaluate(0.1, 1.0, 0, mode="min", stopping_threshold=0.2, warming=True).action == "improved"


def test_warmup_tracks_the_best_but_counts_no_patience():
    verdict = evaluate(2.0, 1.0, 2, mode="min", patience=3, warming=True)
    assert (verdict.action, verdict.should_stop, verdict.wait_count) == ("warmup", False, 2)
    assert evaluate(0.5, 1.0, 2, mode="min", warming=True).improved


def test_in_warmup_respects_min_epochs_and_steps():
    base = dict(judged=5, warmup=2, unit="checks", global_step=50, epoch=3)
    assert not in_warmup(**base, min_epochs=0, min_steps=0)
    assert in_warmup(**base, min_epochs=5, min_steps=0)  # epoch 3 is the 4th epoch: the trainer cannot stop yet
    assert in_warmup(**base, min_epochs=0, min_steps=60)
    assert in_warmup(judged=2, warmup=2, unit="checks", global_step=0, epoch=0, min_epochs=0, min_steps=0)


def test_smoothing():
    s = smooth(0.9, [0.5, 0.6], None, method="median", window=3)
    assert s.value == 0.6 and s.recent == [0.5, 0.6, 0.9]
    s = smooth(0.5, [0.5, 0.9], None, method="median", window=4)  # lower median: an observed value
    assert s.value == 0.5
    e = smooth(1.0, [], None, method="ema", window=3)
    e = smooth(0.0, e.recent, e.ema, method="ema", window=3)
    assert e.value == pytest.approx(0.5)


def test_guard_memorising_only_when_training_data_is_learnt():
    """Dev metric at chance while the training metric rises well above chance: memorising. The same dev metric
    with a training metric that rises but is still at chance too: the model learns nothing yet, no deferral."""
    kw = dict(mode="max", chance=0.1, target=1.0, tolerance=0.02, min_change=0.005)
    found = guard(0.1, [0.2, 0.4, 0.6], **kw)
    assert found is not None and found.phase == "memorising"
    assert guard(0.1, [0.09, 0.1, 0.115], **kw) is None  # +0.025 over the window, but within 0.015 of chance
    assert guard(0.5, [0.2, 0.4, 0.6], **kw) is None  # dev above chance


def test_guard_saturated_needs_a_falling_loss_or_norm():
    kw = dict(mode="max", chance=0.01, target=1.0, tolerance=0.02, min_change=0.005)
    train = [1.0, 1.0, 1.0]
    falling = guard(0.3, train, loss=[3.0, 2.9, 2.8, 2.7], norm=[10, 10, 10], **kw)
    assert falling is not None and falling.phase == "saturated" and set(falling.falling) == {"loss"}
    assert guard(0.3, train, loss=[2.7, 2.8, 2.9, 3.0], norm=[10, 10, 10], **kw) is None  # plain overfitting
    assert guard(0.99, train, loss=[3.0, 2.9, 2.8], **kw) is None  # dev already at its best possible value


def test_smoothed_keeps_the_raw_dtype_and_passes_a_non_finite_value_through():
    s = smoothed(np.float32(0.5), [0.1, 0.2], None, method="median", window=3)
    assert s.value == np.float32(0.2) and s.value.dtype == np.float32 and s.recent == [0.1, 0.2, 0.5]
    nan = smoothed(np.float32("nan"), [0.1], 0.5, method="ema", window=3)
    assert np.isnan(nan.value) and nan.recent == [0.1] and nan.ema == 0.5  # the state is not poisoned


@pytest.mark.parametrize(
    ("best_possible", "mode", "in_unit_interval", "expected"),
    [(None, "max", True, 1.0), (None, "max", False, None), (None, "min", True, None), (0.5, "min", True, 0.5)],
)
def test_guard_target_is_one_only_for_an_accuracy_like_max_metric(best_possible, mode, in_unit_interval, expected):
    assert guard_target(best_possible, mode=mode, in_unit_interval=in_unit_interval) == expected
