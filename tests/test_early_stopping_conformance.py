"""Conformance: the same scenarios through Lightning's ``EarlyStopping`` and ``MetricEarlyStopping`` with the extras
off (``grokking_guard=False``, the other additions at their defaults) stop at the same step, with the same best
score, wait count, stopping reason and Lightning state."""

import math

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from test_divergence import Scripted, fit_scripted, scripted_loaders

from lightning_debug.callbacks.early_stopping import MetricEarlyStopping

from models import make_trainer

FLAT = [1.0] * 12
FALLING_THEN_FLAT = [1.0, 0.8, 0.79, 0.795, 0.7, 0.71, 0.72, 0.73, 0.74, 0.75, 0.76, 0.77]
DRIFTING_DOWN = [0.9 - 0.05 * i for i in range(12)]

SCENARIOS = {
    "patience": ({"val_loss": FALLING_THEN_FLAT}, dict(monitor="val_loss", patience=3, mode="min"), {}),
    "min_delta": ({"val_loss": FALLING_THEN_FLAT}, dict(monitor="val_loss", min_delta=0.02, patience=3), {}),
    "negative_min_delta": ({"val_acc": DRIFTING_DOWN}, dict(monitor="val_acc", mode="max", min_delta=-0.1), {}),
    "positive_min_delta_max": ({"val_acc": DRIFTING_DOWN}, dict(monitor="val_acc", mode="max", min_delta=0.1), {}),
    "patience_0": ({"val_loss": FLAT}, dict(monitor="val_loss", patience=0), {}),
    "patience_-1": ({"val_loss": FLAT}, dict(monitor="val_loss", patience=-1), {}),
    "stopping_threshold": ({"val_loss": FALLING_THEN_FLAT}, dict(monitor="val_loss", stopping_threshold=0.75), {}),
    "divergence_threshold": (
        {"val_loss": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]},
        dict(monitor="val_loss", divergence_threshold=5.0, patience=10),
        {},
    ),
    "nonfinite": ({"val_loss": [1.0, 0.9, math.nan, 0.8]}, dict(monitor="val_loss", patience=10), {}),
    "train_metric": (
        {"train_loss_m": FALLING_THEN_FLAT},
        dict(monitor="train_loss_m", patience=2, check_on_train_epoch_end=True),
        {},
    ),
    "min_epochs": ({"val_loss": FLAT}, dict(monitor="val_loss", patience=2), {"min_epochs": 6}),
    "min_steps": ({"val_loss": FLAT}, dict(monitor="val_loss", patience=2), {"min_steps": 5}),
    "every_2_epochs": ({"val_loss": FLAT}, dict(monitor="val_loss", patience=2), {"check_val_every_n_epoch": 2}),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_same_stop_as_lightning(tmp_path, name):
    script, kwargs, trainer_kwargs = SCENARIOS[name]
    stock, ours = EarlyStopping(**kwargs), MetricEarlyStopping(**kwargs, grokking_guard=False)
    t_stock, _ = fit_scripted(tmp_path / "stock", script, [stock], **trainer_kwargs)
    t_ours, _ = fit_scripted(tmp_path / "ours", script, [ours], **trainer_kwargs)
    seen = {
        "global_step": (t_stock.global_step, t_ours.global_step),
        "stopped_epoch": (stock.stopped_epoch, ours.stopped_epoch),
        "wait_count": (stock.wait_count, ours.wait_count),
        "stopping_reason": (stock.stopping_reason, ours.stopping_reason),
        "best_score": (float(stock.best_score), float(ours.best_score)),
    }
    for what, (theirs, mine) in seen.items():
        same = theirs == mine or (isinstance(theirs, float) and math.isclose(theirs, mine, rel_tol=0, abs_tol=0))
        assert same, f"{name}: {what} differs: EarlyStopping {theirs!r}, MetricEarlyStopping {mine!r}; all: {seen}"
    lightning_state = stock.state_dict()
    our_state = {k: ours.state_dict()[k] for k in lightning_state}
    assert torch.equal(torch.as_tensor(our_state.pop("best_score")), torch.as_tensor(lightning_state.pop("best_score")))
    assert our_state == lightning_state, name


def test_patched_decision_hooks_are_honoured(tmp_path):
    """A subclass overriding Lightning's hooks decides, as with EarlyStopping: ``_evaluate_stopping_criteria``
    gets every check and its answer stops the run; ``_run_early_stopping_check`` is what the hooks call."""
    calls = []

    class StopAtThird(MetricEarlyStopping):
        def _evaluate_stopping_criteria(self, current):
            calls.append(float(current))
            return len(calls) == 3, "third check"

    es = StopAtThird("val_loss", patience=100)
    trainer, _ = fit_scripted(tmp_path, {"val_loss": FLAT}, [es])
    assert len(calls) == 3 and trainer.current_epoch == 3 and es.stopping_reason_message == "third check"

    class CountChecks(MetricEarlyStopping):
        checks = 0

        def _run_early_stopping_check(self, trainer):
            CountChecks.checks += 1

    fit_scripted(tmp_path / "b", {"val_loss": FLAT[:4]}, [CountChecks("val_loss")])
    assert CountChecks.checks == 4


def test_resumes_the_state_of_a_stock_early_stopping(tmp_path):
    """A checkpoint written with Lightning's EarlyStopping on the same monitor: MetricEarlyStopping resumes its
    wait count and best score (they differ in state key: both can be on one trainer)."""
    script = {"val_loss": [1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1]}
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    stock = EarlyStopping("val_loss", patience=10)
    fit_scripted(tmp_path / "a", script, [stock, ckpt], epochs=4, enable_checkpointing=True)
    assert stock.wait_count == 2
    ours = MetricEarlyStopping("val_loss", patience=10, grokking_guard=False)
    trainer = make_trainer(tmp_path / "b", [ours], max_epochs=5, logger=False)
    trainer.fit(Scripted(script), *scripted_loaders(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert float(ours.best_score) == pytest.approx(0.5) and ours.wait_count == 3, (ours.best_score, ours.wait_count)
