"""LossMetricDivergence on real small trainings (the rule alone: tests/rules/test_divergence.py)."""

import io

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_debug.callbacks.divergence import LossMetricDivergence

from models import DigitsMLP, loaders, make_trainer


class Scripted(pl.LightningModule):
    """A real (tiny) model whose logged metrics follow a script indexed by epoch, so a test controls the curves.

    ``script`` maps metric names to per-epoch values; keys starting with ``train`` are logged from
    ``training_step`` (epoch aggregate), the others from ``validation_step``.
    """

    def __init__(self, script: dict[str, list[float]], lr: float = 1e-2) -> None:
        super().__init__()
        self.script = script
        self.lr = lr
        self.layer = nn.Linear(4, 2)

    def _value(self, key: str) -> float:
        series = self.script[key]
        return series[min(self.current_epoch, len(series) - 1)]

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.layer(x), y)
        for key in self.script:
            if key.startswith("train"):
                self.log(key, self._value(key), on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        for key in self.script:
            if not key.startswith("train"):
                self.log(key, self._value(key))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def scripted_loaders(n: int = 8) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g))
    return DataLoader(data, batch_size=n), DataLoader(data, batch_size=n)


def fit_scripted(tmp_path, script, callbacks, epochs=None, **trainer_kwargs):
    epochs = epochs or len(next(iter(script.values())))
    model = Scripted(script)
    trainer = make_trainer(tmp_path, callbacks, max_epochs=epochs, **trainer_kwargs)
    trainer.fit(model, *scripted_loaders())
    return trainer, model


def checks(cb):
    return {f.check: f for f in cb.findings}


def test_memorising_mlp_dev_loss_rises_while_accuracy_holds(tmp_path):
    """300 digits, 2x512 MLP, Adam 1e-3, batch 16, 60 epochs: the dev loss climbs from its minimum while
    accuracy stays flat -> val.loss_metric_divergence (and, separately, val.overfitting)."""
    train, val = loaders(batch_size=16, n_train=300)
    cb = LossMetricDivergence(metric="val_acc", train_loss="train_loss")
    make_trainer(tmp_path, [cb], max_epochs=60, num_sanity_val_steps=2).fit(
        DigitsMLP(hidden=(512, 512), lr=1e-3), train, val
    )
    found = checks(cb)
    assert "val.loss_metric_divergence" in found, f"no divergence; findings={cb.findings}, history={cb.history}"
    d = found["val.loss_metric_divergence"].data
    assert d["loss_rise"] > 0.03 and d["loss_trend"]["low"] > 0, d
    assert d["metric_trend"]["slope"] >= 0 and d["metric_given_back"] <= 0.1, d
    assert 0.08 < d["chance"] < 0.2, f"chance inferred from the targets should be ~0.1-0.13, got {d['chance']}"
    assert "val.overfitting" in found
    # the trends reached the loggers
    logged = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "debug/divergence/loss_slope" in logged and "debug/divergence/loss_rise" in logged


def test_healthy_run_is_silent(tmp_path):
    """A small MLP on 1200 digits, 40 epochs: the dev loss keeps falling; nothing to report."""
    train, val = loaders(batch_size=32)
    cb = LossMetricDivergence(metric="val_acc", train_loss="train_loss")
    make_trainer(tmp_path, [cb], max_epochs=40).fit(DigitsMLP(hidden=(64,), lr=3e-3), train, val)
    assert cb.checks == 40
    assert not cb.findings, f"false alarm on a healthy run: {cb.findings}"


def test_plain_overfitting_is_not_divergence(tmp_path):
    """30% label noise: accuracy peaks early, falls, then plateaus while the dev loss soars. That is
    overfitting (reported as such), not a loss-metric divergence."""
    train, val = loaders(batch_size=16, n_train=300, label_noise=0.3)
    cb = LossMetricDivergence(metric="val_acc", train_loss="train_loss")
    make_trainer(tmp_path, [cb], max_epochs=60).fit(DigitsMLP(hidden=(512, 512), lr=1e-3), train, val)
    found = checks(cb)
    assert "val.overfitting" in found
    assert "val.loss_metric_divergence" not in found, found["val.loss_metric_divergence"].message


def _grokking_script() -> dict[str, list[float]]:
    """The measured shape of the modular-addition run (validation every 10 steps): dev loss rises 4.8 -> 12.6
    while dev accuracy falls below chance (memorisation), then both improve."""
    loss = [4.8, 5.5, 6.5, 7.5, 8.7, 9.9, 11.2, 12.1, 12.5, 12.6, 12.5, 12.3, 12.1, 11.9, 11.7, 11.5]
    loss += [11.3 - 0.5 * i for i in range(20)]
    acc = [4e-4, 0, 0, 0, 0, 0, 2e-4, 2e-4, 2e-4, 2e-4, 2e-4, 2e-4, 2e-4, 2e-4, 2e-4, 2e-4]
    acc += [min(1.0, 4e-4 * 1.6**i) for i in range(20)]
    train = [0.03, 0.1, 0.2, 0.42, 0.71, 0.91, 0.99] + [1.0] * 29
    train_loss = [4.5 * 0.6**i for i in range(36)]
    return {"val_loss": loss, "val_acc": acc, "train_acc": train, "train_loss": train_loss}


def test_grokking_memorisation_phase_is_not_divergence(tmp_path):
    """Dev loss rising with accuracy at/below chance (1/97) is memorisation, not overconfidence."""
    cb = LossMetricDivergence(metric="val_acc", train_loss="train_loss", chance=1 / 97, window=8)
    fit_scripted(tmp_path, _grokking_script(), [cb])
    assert "val.loss_metric_divergence" not in checks(cb), cb.findings
    assert "val.overfitting" in checks(cb)  # the generalisation gap did grow during memorisation


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"window": 5}, "window"),
        ({"persistence": 1}, "persistence"),
        ({"mode": "up"}, "mode"),
        ({"min_rise": -0.1}, "min_rise"),
        ({"max_metric_drop": 2.0}, "max_metric_drop"),
    ],
)
def test_arguments_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        LossMetricDivergence(**kwargs)


def test_window_error_states_the_minimum():
    with pytest.raises(ValueError, match="at least 6"):
        LossMetricDivergence(window=4)


def test_missing_metric_is_skipped_or_raises(tmp_path):
    script = {"val_loss": [1.0] * 3, "val_acc": [0.5] * 3}
    cb = LossMetricDivergence(metric="val_f1", window=6)
    fit_scripted(tmp_path, script, [cb])
    skipped = checks(cb)["check.skipped"]
    assert "val_f1" in skipped.message and "val_acc" in skipped.message and skipped.count == 3

    with pytest.raises(RuntimeError, match=r"val_f1.*available.*val_acc"):
        fit_scripted(tmp_path, script, [LossMetricDivergence(metric="val_f1", window=6, strict=True)])


def test_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    script = _grokking_script()
    cb = LossMetricDivergence(metric="val_acc", train_loss="train_loss", window=8)
    fit_scripted(tmp_path, script, [cb], epochs=12)
    buf = io.BytesIO()
    torch.save({"state": cb.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["state"]
    fresh = LossMetricDivergence(metric="val_acc", train_loss="train_loss", window=8)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == cb.state_dict()
    assert fresh.checks == 12 and fresh.history["loss"] == cb.history["loss"]
