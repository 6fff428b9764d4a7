"""OverfitBatchCheck with real models: healthy ones memorise a batch, broken losses cannot, and the real run is
bitwise unchanged by the check."""

import random

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_debug.callbacks.loss import LossConvergenceMonitor
from lightning_debug.callbacks.overfit import OverfitBatchCheck
from lightning_debug.findings import Severity

from models import DigitsMLP, SmoothedDigitsMLP, loaders, make_trainer


def check(tmp_path, module, batch_size=32, check=None, **trainer_kwargs):
    check = check or OverfitBatchCheck()
    train, _ = loaders(batch_size=batch_size)
    trainer_kwargs.setdefault("max_steps", 1)
    make_trainer(tmp_path, [check], **trainer_kwargs).fit(module, train)
    return check


@pytest.mark.parametrize(
    ("kwargs", "batch_size"),
    [
        pytest.param({}, 32, id="mlp"),
        pytest.param({"batchnorm": True}, 32, id="batchnorm"),
        pytest.param({"dropout": 0.5}, 32, id="dropout"),
        pytest.param({}, 8, id="batch-8"),
        pytest.param({"batchnorm": True}, 512, id="batchnorm-batch-512"),
    ],
)
def test_healthy_model_overfits_one_batch(tmp_path, kwargs, batch_size):
    (f,) = check(tmp_path, DigitsMLP(**kwargs), batch_size=batch_size).findings
    assert f.check == "startup.overfit_ok", f.message
    assert f.data["final_loss"] <= 0.05 * f.data["first_loss"] and f.data["steps"] < 100, f.data
    assert f.data["seconds"] > 0 and len(f.data["curve"]) == f.data["steps"] + 1


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"detach_logits": True}, id="detached-logits"),
        pytest.param({"shuffle_labels": True}, id="shuffled"),
    ],
)
def test_broken_loss_cannot_overfit(tmp_path, kwargs):
    (f,) = check(tmp_path, DigitsMLP(**kwargs)).findings
    assert f.check == "startup.cannot_overfit" and f.severity is Severity.ERROR, f.message
    assert f.data["steps"] == 100 and len(f.data["curve"]) == 101, f.data
    assert f.data["final_loss"] > 0.5 * f.data["first_loss"], f.data["curve"][::10]


def test_slow_learner_is_a_warning_not_an_error(tmp_path):
    """Plain SGD at 0.05 learns, but needs more than 100 steps: a warning naming the learning rate."""
    (f,) = check(tmp_path, DigitsMLP(optimizer="sgd", lr=0.05)).findings
    assert f.check == "startup.cannot_overfit" and f.severity is Severity.WARNING, f.message
    assert 0.25 <= f.data["closed"] < 0.95 and "learning rate" in f.message, f.data


def _stalled_run(tmp_path, module):
    stall, monitor = OverfitBatchCheck(when="stall"), LossConvergenceMonitor()
    train, _ = loaders(batch_size=32)
    make_trainer(tmp_path, [monitor, stall], max_steps=450, max_epochs=20).fit(module, train)
    return stall, monitor


def test_stall_mode_costs_nothing_while_the_loss_falls(tmp_path):
    stall, _ = _stalled_run(tmp_path, DigitsMLP())
    assert not stall.findings and not stall.done, [f.message for f in stall.findings]


def test_stall_mode_diagnoses_a_loss_that_does_not_fall(tmp_path):
    """The loss monitor reports `loss.not_decreasing` at step 200; at that epoch's end a copy of the model
    trained on one batch says why: it cannot memorise even that (a bug, here detached logits)."""
    stall, monitor = _stalled_run(tmp_path, DigitsMLP(detach_logits=True))
    assert [f.check for f in monitor.findings if f.severity is not Severity.INFO] == ["loss.not_decreasing"]
    (f,) = stall.findings
    assert f.check == "startup.cannot_overfit" and f.severity is Severity.ERROR, f.message
    assert f.data["trigger"] == "loss.not_decreasing" and "because of loss.not_decreasing" in f.message, f.message
    stalled = next(f.step for f in monitor.findings if f.check == "loss.not_decreasing")
    assert stalled <= f.step < stalled + 38, f"run at the end of the epoch holding step {stalled}, not at {f.step}"


def test_auto_defers_on_a_short_epoch_and_diagnoses_the_stall(tmp_path):
    """The default `when="auto"`: up to 100 steps would be 263% of a 38-step epoch, over the 5% budget, so the
    check says so at start and runs when the loss monitor reports the stall, as in `when="stall"`."""
    auto, monitor = OverfitBatchCheck(), LossConvergenceMonitor()
    train, _ = loaders(batch_size=32)
    make_trainer(tmp_path, [monitor, auto], max_steps=450, max_epochs=20).fit(DigitsMLP(detach_logits=True), train)
    deferred, diagnosis = auto.findings
    assert deferred.check == "startup.overfit_deferred" and deferred.step == 0, deferred.message
    assert deferred.data["epoch_steps"] == 38 and deferred.data["share"] == pytest.approx(100 / 38), deferred.data
    assert "263% of a 38-step epoch" in deferred.message, deferred.message
    assert diagnosis.check == "startup.cannot_overfit" and diagnosis.data["trigger"] == "loss.not_decreasing"
    stalled = next(f.step for f in monitor.findings if f.check == "loss.not_decreasing")
    assert stalled <= diagnosis.step < stalled + 38, (stalled, diagnosis.step)


class StopAfterOneStep(Callback):
    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = True


def test_auto_runs_at_start_when_the_epoch_is_long(tmp_path):
    """Batch 1: 1200 steps per epoch, so 50 steps are 4.2% of it, within the 5% budget: run before step 1."""
    auto = OverfitBatchCheck(max_steps=50)
    train, _ = loaders(batch_size=1)
    callbacks = [LossConvergenceMonitor(), auto, StopAfterOneStep()]
    make_trainer(tmp_path, callbacks, max_epochs=1).fit(DigitsMLP(), train)
    (f,) = auto.findings
    assert f.check == "startup.overfit_ok" and f.step == 0 and f.data["trigger"] is None, f.message


def test_auto_runs_at_start_without_a_loss_monitor_to_wait_for(tmp_path):
    """Nothing on the trainer would ever report a stall: the check runs at start whatever it costs."""
    (f,) = check(tmp_path, DigitsMLP()).findings
    assert f.check == "startup.overfit_ok" and f.step == 0, f.message


class Snapshot(Callback):
    """Everything the check must leave untouched, captured at on_train_start (before or after the check)."""

    def on_train_start(self, trainer, pl_module):
        loader = trainer.train_dataloader
        self.params = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.grads = [p.grad for p in pl_module.parameters()]
        self.optimizer = trainer.optimizers[0].state_dict()
        self.rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
        self.loader_rng = loader.generator.get_state()
        self.modes = [m.training for m in pl_module.modules()]
        self.metrics = (dict(trainer.callback_metrics), dict(trainer.logged_metrics))


def test_leaves_no_trace(tmp_path):
    before, after = Snapshot(), Snapshot()
    ovf = OverfitBatchCheck()
    train, _ = loaders(batch_size=32)
    trainer = make_trainer(tmp_path / "checked", [before, ovf, after], max_steps=30)
    trainer.fit(DigitsMLP(batchnorm=True, dropout=0.2), train)
    assert ovf.has_finding("startup.overfit_ok")
    for k, v in before.params.items():
        assert torch.equal(v, after.params[k]), f"parameter/buffer {k} changed"
    assert all(g is None for g in after.grads), "the real model's .grad must stay unset"
    assert before.optimizer == after.optimizer, "optimizer state changed"
    assert torch.equal(before.rng[0], after.rng[0]) and (before.rng[1] == after.rng[1]).all(), "torch/numpy RNG"
    assert before.rng[2] == after.rng[2], "python RNG changed"
    assert torch.equal(before.loader_rng, after.loader_rng), "the dataloader's shuffling generator advanced"
    assert before.modes == after.modes and before.metrics == after.metrics, "modes or logged metrics changed"

    # and the whole run is bitwise the same as a run without the check
    train, _ = loaders(batch_size=32)
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    checked = DigitsMLP(batchnorm=True, dropout=0.2)
    make_trainer(tmp_path / "a", [OverfitBatchCheck()], max_steps=30).fit(checked, train)
    train, _ = loaders(batch_size=32)
    pl.seed_everything(0, verbose=False)
    bare = DigitsMLP(batchnorm=True, dropout=0.2)
    trainer = make_trainer(tmp_path / "b", [], max_steps=30)
    trainer.fit(bare, train)
    for (k, a), b in zip(checked.state_dict().items(), bare.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{k} differs after 30 steps with vs without the check"


def test_warmup_scheduler_does_not_starve_the_copy(tmp_path):
    """A linear warm-up scheduler sets lr to 0 when built; the copy trains at the base lr."""

    class WarmedUp(DigitsMLP):
        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=1e-2)
            warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 1000))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    (f,) = check(tmp_path, WarmedUp()).findings
    assert f.check == "startup.overfit_ok", f.message


def test_runs_once_and_remembers_it(tmp_path):
    ovf = check(tmp_path, DigitsMLP())
    assert ovf.state_dict()["done"] is True
    check(tmp_path, DigitsMLP(), check=ovf)
    assert len(ovf.findings) == 1 and ovf.findings[0].count == 1
    fresh = OverfitBatchCheck()
    fresh.load_state_dict(ovf.state_dict())
    assert fresh.done and fresh.findings == ovf.findings


def test_manual_optimization_is_skipped(tmp_path):
    class Manual(DigitsMLP):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    (f,) = check(tmp_path, Manual()).findings
    assert f.check == "check.skipped" and "manual optimization" in f.message


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_steps": 0}, "max_steps"),
        ({"floor": float("inf")}, "floor"),
        ({"rel_tol": 1}, "rel_tol"),
        ({"abs_tol": -1}, "abs_tol"),
        ({"when": "later"}, "when"),
    ],
)
def test_arguments_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=name):
        OverfitBatchCheck(**kwargs)


class ProbabilitiesIntoCrossEntropy(DigitsMLP):
    """The classic bug: softmax outputs passed to cross_entropy, which applies log-softmax again."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x).softmax(-1), y)


def test_probabilities_fed_to_cross_entropy_are_a_high_floor(tmp_path):
    """The loss cannot go below log(1 + 9/e) = 1.461 for 10 classes, however well the model memorises."""
    (f,) = check(tmp_path, ProbabilitiesIntoCrossEntropy(), check=OverfitBatchCheck(when="start")).findings
    assert f.check == "loss.floor_high" and f.severity is Severity.WARNING, f.message
    assert 1.4611 <= f.data["level"] < 1.4611 * 1.05 and f.data["probability_classes"] == 10, f.data
    assert "log(1 + (C-1)/e) = 1.461 for C = 10" in f.message and "probabilities instead of logits" in f.message


def test_label_smoothing_floor_is_not_a_high_floor(tmp_path):
    """Label smoothing 0.1 over 10 classes: the exact floor is 0.500, and memorising reaches it."""
    (f,) = check(tmp_path, SmoothedDigitsMLP(), check=OverfitBatchCheck(when="start")).findings
    assert f.check == "startup.overfit_ok", f.message
    assert abs(f.data["floor"] - 0.5003) < 1e-3 and "label smoothing 0.1 over 10 classes" in f.message, f.message


def test_a_run_that_ends_far_from_its_floor_gets_the_deferred_test(tmp_path):
    """A short run (30 batches) that ends still falling, far from 0: the deferred test runs at the end of fit."""
    auto, monitor = OverfitBatchCheck(), LossConvergenceMonitor()
    train, _ = loaders(batch_size=32)
    make_trainer(tmp_path, [auto, monitor], max_steps=30).fit(DigitsMLP(optimizer="sgd", lr=0.05), train)
    verdict = [f for f in monitor.findings if f.check.startswith("loss.")]
    assert verdict and verdict[-1].data["stalled"], [(f.check, f.data.get("stalled")) for f in monitor.findings]
    deferred, diagnosis = auto.findings
    assert deferred.check == "startup.overfit_deferred" and diagnosis.data["trigger"] == verdict[-1].check
    assert diagnosis.step == 30, diagnosis.step


def test_language_models_first_word_is_the_batch_floor(tmp_path):
    """A tiny GPT-2 on a Markov language: every sentence starts after the same BOS, so no model can go below the
    entropy of the batch's first words. The test judges against that floor and memorises down to it."""
    from lightning_debug.demos.lm import TinyGPT2LM, lm_loaders

    torch.manual_seed(0)
    train, _ = lm_loaders(batch_size=32)
    check = OverfitBatchCheck(when="start")
    make_trainer(tmp_path, [check], max_steps=1).fit(TinyGPT2LM(), train)
    (f,) = check.findings
    assert "this batch's own" in f.data["floor_source"] and f.data["floor"] > 0.1, f.data["floor_source"]
    assert f.check == "startup.overfit_ok", (f.message, f.data["floor"])
