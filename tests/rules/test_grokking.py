"""Grokking phases on hand-made evaluations: no Trainer, floats in, verdicts out."""

import math

from lightning_debug.rules.grokking import (
    assess_stall,
    is_generalized,
    is_memorized,
    log10_step,
    log_spaced_steps,
    sum_values,
)

LIMITS = dict(threshold=0.99, val_threshold=0.99, min_gap=0.2)


def test_memorized_needs_train_saturated_and_dev_far_behind():
    assert is_memorized(1.0, 0.01, **LIMITS)
    assert not is_memorized(0.95, 0.01, **LIMITS), "training set not yet memorised"
    assert not is_memorized(1.0, 0.85, **LIMITS), "dev within min_gap: an ordinary run, not memorisation"
    assert not is_memorized(1.0, 0.995, **LIMITS), "dev already generalised"


def test_generalized_is_the_dev_threshold():
    assert is_generalized(0.99, val_threshold=0.99) and not is_generalized(0.98, val_threshold=0.99)


def _stall(val, norm, step=5000):
    steps = [1000.0 + 100 * i for i in range(len(val))]
    return assess_stall(steps, val, norm, memorized_step=400, step=step, stall_factor=10, stall_window=10)


def test_flat_dev_metric_and_flat_norm_is_a_stall():
    v = _stall([0.01, 0.02] * 5, [30.0, 30.1] * 5)
    assert v is not None and v.stalled and v.evaluations == 10, v


def test_a_rising_dev_metric_or_a_shrinking_norm_is_progress():
    rising = _stall([0.01 * i for i in range(10)], [30.0] * 10)
    shrinking = _stall([0.01] * 10, [30.0 - i for i in range(10)])
    assert rising is not None and not rising.stalled and rising.val.rising
    assert shrinking is not None and not shrinking.stalled and shrinking.norm.falling


def test_too_early_or_too_few_evaluations_is_no_verdict():
    assert _stall([0.01] * 10, [30.0] * 10, step=3000) is None, "before stall_factor x the memorisation step"
    assert _stall([0.01] * 5, [30.0] * 5) is None, "fewer than stall_window evaluations"


def test_log_spaced_steps_are_even_in_log10():
    assert sorted(log_spaced_steps(5, 1000)) == [1, 2, 3, 4, 6, 10, 16, 25, 40, 63, 100, 158, 251, 398, 631, 1000]
    assert max(log_spaced_steps(10, 350)) <= 350
    assert log10_step(0) == 0.0 and math.isclose(log10_step(99), 2.0)


def test_sum_values_are_per_scored_token_with_sequence_accuracy_only_for_sequences():
    assert sum_values("val", 3.0, 4.0, 2.0, 0.0, 0.0) == {"val_acc": 0.75, "val_loss": 0.5}
    seq = sum_values("train", 3.0, 4.0, 2.0, 1.0, 2.0)
    assert seq["train_token_acc"] == 0.75 and seq["train_seq_acc"] == 0.5
    assert sum_values("val", 0.0, 0.0, 0.0, 0.0, 0.0) == {}, "no scored token: nothing to report"
