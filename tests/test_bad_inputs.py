"""Bad inputs give one clear message, never a crash of the user's run.

- a ``metric`` the module does not log: a ``check.skipped`` naming the logged keys (the suite's default),
  or one error naming them with ``strict=True``;
- an invalid argument of any callback: ``ValueError`` at construction, naming the argument;
- NaN/Inf logits or out-of-range targets handed to CalibrationMonitor: reported, left out, training goes on;
- an empty validation set: training goes on, nothing is judged on nothing.
"""

import math

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_debug import (
    BatchConsistencyCheck,
    CalibrationMonitor,
    DebugReport,
    DecodingConsistencyCheck,
    GrokkingMonitor,
    LossConvergenceMonitor,
    LossMetricDivergence,
    MetricEarlyStopping,
    OverfitBatchCheck,
    debug_callbacks,
)
from lightning_debug.base import debug_callbacks_of

from models import DigitsMLP, loaders, make_trainer


def _findings(trainer, check=None):
    return [f for cb in debug_callbacks_of(trainer) for f in cb.findings if check is None or f.check == check]


def _no_check_errors(trainer):
    errors = _findings(trainer, "check.error")
    assert not errors, "\n".join(f.message for f in errors)


# ---- a metric name the module does not log ---------------------------------------------------------------
def test_unknown_metric_with_suite_defaults_is_a_warning_naming_the_logged_keys(tmp_path):
    train, val = loaders(n_train=320, n_val=128)
    trainer = make_trainer(tmp_path, debug_callbacks(metric="val_accuracy"), max_epochs=2)
    trainer.fit(DigitsMLP(), train, val)
    assert trainer.state.finished and trainer.current_epoch == 2
    _no_check_errors(trainer)
    skipped = [f for f in _findings(trainer, "check.metric_missing") if f.source == "MetricEarlyStopping"]
    assert len(skipped) == 1 and skipped[0].count == 2, [(f.message, f.count) for f in skipped]
    assert skipped[0].severity.value == "warning"
    assert "`val_accuracy` is not logged" in skipped[0].message and "'val_acc'" in skipped[0].message, skipped[0]


def test_unknown_metric_with_strict_is_one_clear_error(tmp_path):
    train, val = loaders(n_train=320, n_val=128)
    trainer = make_trainer(tmp_path, debug_callbacks(metric="val_accuracy", early_stopping={"strict": True}))
    with pytest.raises(RuntimeError, match=r"`val_accuracy` which is not available.*`val_acc`"):
        trainer.fit(DigitsMLP(), train, val)


# ---- invalid constructor arguments -----------------------------------------------------------------------
INVALID = [
    (OverfitBatchCheck, {"max_steps": 0}, "max_steps"),
    (OverfitBatchCheck, {"rel_tol": 1.5}, "rel_tol"),
    (OverfitBatchCheck, {"abs_tol": -1.0}, "abs_tol"),
    (OverfitBatchCheck, {"floor": math.nan}, "floor"),
    (BatchConsistencyCheck, {"batch_size": 1}, "batch_size"),
    (BatchConsistencyCheck, {"atol": -1.0}, "atol"),
    (BatchConsistencyCheck, {"dependence_rtol": 2.0}, "dependence_rtol"),
    (DecodingConsistencyCheck, {"n_examples": 0}, "n_examples"),
    (DecodingConsistencyCheck, {"beam_sizes": (4, 1)}, "beam_sizes"),
    (DecodingConsistencyCheck, {"confidence": 0.2}, "confidence"),
    (LossConvergenceMonitor, {"check_every_n_steps": 1}, "check_every_n_steps"),
    (LossConvergenceMonitor, {"window": 1}, "window"),
    (LossConvergenceMonitor, {"warmup_steps": -1}, "warmup_steps"),
    (LossConvergenceMonitor, {"diverge_factor": 0.5}, "diverge_factor"),
    (CalibrationMonitor, {"patience": 0}, "patience"),
    (CalibrationMonitor, {"ece_threshold": 1.5}, "ece_threshold"),
    (CalibrationMonitor, {"min_samples": 0}, "min_samples"),
    (CalibrationMonitor, {"n_bins": 0}, "n_bins"),
    (LossMetricDivergence, {"mode": "maximum"}, "mode"),
    (LossMetricDivergence, {"window": 1}, "window"),
    (LossMetricDivergence, {"persistence": 1}, "persistence"),
    (LossMetricDivergence, {"confidence": 1.5}, "confidence"),
    (GrokkingMonitor, {"stall_window": 2}, "stall_window"),
    (GrokkingMonitor, {"threshold": 0.0}, "threshold"),
    (GrokkingMonitor, {"eval_batches": 0}, "eval_batches"),
    (MetricEarlyStopping, {"monitor": "val_acc", "mode": "maximum"}, "mode"),
    (MetricEarlyStopping, {"monitor": "val_acc", "unit": "epochs"}, "unit"),
    (MetricEarlyStopping, {"monitor": "val_acc", "warmup": -1}, "warmup"),
    (MetricEarlyStopping, {"monitor": "val_acc", "guard_window": 2}, "guard_window"),
    (MetricEarlyStopping, {"monitor": "val_acc", "smoothing": "mean"}, "smoothing"),
    (MetricEarlyStopping, {"monitor": "val_acc", "stop_on": ("loss.nope",)}, "stop_on"),
    (DebugReport, {"min_severity": "fatal"}, "min_severity"),
]


@pytest.mark.parametrize(("cls", "kwargs", "name"), INVALID, ids=lambda v: getattr(v, "__name__", None))
def test_invalid_argument_is_a_value_error_naming_it(cls, kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b") as err:
        cls(**kwargs)
    # MetricEarlyStopping raises Lightning's exception type as EarlyStopping does (and a ValueError)
    assert isinstance(err.value, MisconfigurationException) == (cls is MetricEarlyStopping)


def test_invalid_suite_override_fails_at_construction():
    with pytest.raises(ValueError, match="smoothing"):
        debug_callbacks("val_acc", early_stopping={"smoothing": "mean"})


# ---- non-finite predictions -----------------------------------------------------------------------------
class PoisonedPredictions(DigitsMLP):
    """Validation returns NaN/Inf logits for some rows and out-of-range targets for others."""

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        logits, target = out["logits"].clone(), out["target"].clone()
        logits[0] = math.nan
        logits[1, 0] = math.inf
        target[2] = 99  # not a class
        return {"logits": logits, "target": target}


def test_nonfinite_logits_are_reported_not_propagated(tmp_path):
    train, val = loaders(n_train=320, n_val=256)  # val: one batch of 256
    calibration = CalibrationMonitor()
    trainer = make_trainer(tmp_path, [*debug_callbacks(metric="val_acc", calibration=False), calibration])
    trainer.fit(PoisonedPredictions(), train, val)
    assert trainer.state.finished and trainer.current_epoch == 3
    _no_check_errors(trainer)
    skipped = [f for f in calibration.findings if f.check == "check.skipped"]
    (nonfinite,) = [f for f in skipped if "nonfinite" in f.data]
    (out_of_range,) = [f for f in skipped if "out_of_range" in f.data]
    assert len(skipped) == 2, [f.message for f in skipped]
    assert nonfinite.data["nonfinite"] == 2.0 and out_of_range.data["out_of_range"] == 1.0
    assert nonfinite.count == out_of_range.count == 3  # reported every epoch, printed once
    last = calibration.history[-1]
    assert len(calibration.history) == 3
    for key in ("ece", "mce", "brier", "nll", "accuracy", "confidence", "temperature"):
        assert math.isfinite(last[key]), (key, last[key])
    assert last["count"] == 256 - 3, last["count"]  # the two non-finite rows and the out-of-range target are out


# ---- empty validation set -------------------------------------------------------------------------------
def test_empty_validation_set_does_not_break_the_run(tmp_path):
    train, _ = loaders(n_train=320)
    empty = DataLoader(TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)), batch_size=32)
    trainer = make_trainer(tmp_path, debug_callbacks(metric="val_acc"), max_epochs=2)
    trainer.fit(DigitsMLP(), train, empty)
    assert trainer.state.finished and trainer.global_step == 20
    _no_check_errors(trainer)
    assert not [f for f in _findings(trainer) if f.severity.value != "info"], [f.message for f in _findings(trainer)]
