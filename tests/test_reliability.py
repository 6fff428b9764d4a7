"""The default suite never breaks the user's run: odd trainer settings, odd data, failing loggers.

Each case trains for real with ``debug_callbacks(metric="val_acc")`` and asserts that training completes and
that nothing the suite reports is a warning or error it should not be (a `check.error` here is a bug).
"""

import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import DataLoader, IterableDataset

from lightning_debug import DebugReport, debug_callbacks
from lightning_debug.base import debug_callbacks_of

from models import DigitsMLP, digits, loaders, make_trainer


def _findings(trainer):
    return [f for cb in debug_callbacks_of(trainer) for f in cb.findings]


def _no_check_errors(trainer):
    errors = [f for f in _findings(trainer) if f.check == "check.error"]
    assert not errors, "\n".join(f.message for f in errors)


@pytest.mark.parametrize(
    "trainer_kwargs",
    [
        pytest.param({"fast_dev_run": True}, id="fast_dev_run"),
        pytest.param({"limit_val_batches": 0}, id="no_validation"),
        pytest.param({"num_sanity_val_steps": 2}, id="sanity_check"),
        pytest.param({"accumulate_grad_batches": 4}, id="grad_accumulation"),
        pytest.param({"logger": False}, id="logger_false"),
        pytest.param({"precision": "bf16-mixed"}, id="bf16_mixed"),
    ],
)
def test_trainer_settings_run_to_the_end(tmp_path, trainer_kwargs):
    train, val = loaders(n_train=320, n_val=128)
    trainer = make_trainer(tmp_path, debug_callbacks(metric="val_acc"), max_epochs=2, **trainer_kwargs)
    trainer.fit(DigitsMLP(), train, val)
    assert trainer.state.finished
    _no_check_errors(trainer)


def test_validate_and_test_alone(tmp_path):
    _, val = loaders(n_val=128)
    for fn in ("validate", "test"):
        module = DigitsMLP()
        module.test_step = module.validation_step
        trainer = make_trainer(tmp_path, debug_callbacks(metric="val_acc"))
        getattr(trainer, fn)(module, val)
        _no_check_errors(trainer)


class _Stream(IterableDataset):
    def __init__(self, data):
        self.data = data

    def __iter__(self):
        return iter(self.data)


def test_iterable_dataset(tmp_path):
    train, val = digits(n_train=320, n_val=128)
    trainer = make_trainer(tmp_path, debug_callbacks(metric="val_acc"), max_epochs=2)
    trainer.fit(DigitsMLP(), DataLoader(_Stream(train), batch_size=32), DataLoader(_Stream(val), batch_size=64))
    assert trainer.global_step == 20
    _no_check_errors(trainer)


class TwoOptimizers(DigitsMLP):
    """Manual optimisation with one optimizer per layer group (GAN-style training loops)."""

    def __init__(self):
        super().__init__(hidden=(32,))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(self(x), y)
            self.manual_backward(loss)
            opt.step()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        first, last = self.net[0], self.net[-1]
        return torch.optim.Adam(first.parameters(), 1e-2), torch.optim.Adam(last.parameters(), 1e-2)


def test_manual_optimisation_with_two_optimizers(tmp_path):
    train, val = loaders(n_train=320, n_val=128)
    trainer = make_trainer(tmp_path, debug_callbacks(metric="val_acc"), max_epochs=2)
    trainer.fit(TwoOptimizers(), train, val)
    assert trainer.state.finished
    _no_check_errors(trainer)


def test_a_failing_wandb_never_stops_training(tmp_path, monkeypatch):
    """Every W&B call the suite makes raises; Lightning's own logging keeps working."""
    import wandb.sdk.wandb_run as wandb_run

    original_log = wandb_run.Run.log

    def broken(*args, **kwargs):
        raise ConnectionError("W&B is down")

    def log(self, data, *args, **kwargs):
        if any(k.startswith("debug/") for k in data):
            broken()
        return original_log(self, data, *args, **kwargs)

    monkeypatch.setattr(wandb_run.Run, "alert", broken)
    monkeypatch.setattr(wandb_run.Run, "log", log)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path))
    train, val = loaders(n_train=320, n_val=128)
    report = DebugReport(print_table=False)
    trainer = make_trainer(tmp_path, [*debug_callbacks(metric="val_acc", report=False), report], logger=logger)
    trainer.fit(DigitsMLP(lr=5.0, optimizer="sgd"), train, val)
    assert trainer.state.finished
    assert report.path is not None and report.path.exists()
    import wandb

    wandb.finish()


def test_unknown_suite_component_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown component 'los'; did you mean 'loss'"):
        debug_callbacks("val_acc", los={"floor": 0.1})
    with pytest.raises(ValueError, match="`mode` must be 'min', 'max' or None"):
        debug_callbacks("val_acc", mode="maximum")
