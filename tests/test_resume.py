"""A run interrupted and resumed from its last checkpoint reports exactly what the uninterrupted run reports.

The full default suite trains the digits MLP with fixed seeds and an unshuffled train loader (Lightning does not
checkpoint a DataLoader generator, so a shuffled loader would see other batches after the resume, and the
runs would legitimately differ). MetricEarlyStopping (patience 2, min_delta 0.01) stops the uninterrupted run
at epoch 7; the interrupted run (same ``max_epochs``, so the same planned length the loss monitor scales its
checks to) gets a KeyboardInterrupt after epoch ``INTERRUPT_AFTER`` and is resumed with ``ckpt_path``.
"""

import contextlib
import csv
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_debug import MetricEarlyStopping, debug_callbacks
from lightning_debug.base import debug_callbacks_of

from models import DigitsMLP, digits, make_trainer

MAX_EPOCHS = 20
INTERRUPT_AFTER = 4  # epochs; the uninterrupted run stops at epoch 7


class Interrupt(pl.Callback):
    """Ctrl-C as the next epoch starts (after the last one's checkpoint: Lightning runs checkpointing last):
    the run keeps the plan (``max_epochs``) the loss monitor scales its checks to."""

    def __init__(self, after_epochs):
        self.after_epochs = after_epochs

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.after_epochs:
            raise KeyboardInterrupt


def _fit(root, name, max_epochs, ckpt_path=None, interrupt_after=None):
    pl.seed_everything(0, verbose=False)
    train, val = digits(n_train=640, n_val=320)
    callbacks = [
        *debug_callbacks(metric="val_acc", early_stopping={"patience": 2, "min_delta": 0.01}, report=False),
        ModelCheckpoint(dirpath=root / name / "ckpt", save_last=True, save_top_k=-1),  # last.ckpt every epoch
    ]
    if interrupt_after is not None:
        callbacks.append(Interrupt(interrupt_after))
    trainer = make_trainer(
        root, callbacks, logger=CSVLogger(str(root), name=name), max_epochs=max_epochs, enable_checkpointing=True
    )
    with contextlib.suppress(KeyboardInterrupt, SystemExit):  # Lightning shuts down gracefully, then may exit
        trainer.fit(DigitsMLP(), DataLoader(train, batch_size=32), DataLoader(val, batch_size=64), ckpt_path=ckpt_path)
    return trainer


def _curves(trainer):
    """{(key, step): value} of every `debug/` scalar the CSV logger wrote."""
    out = {}
    with open(f"{trainer.logger.log_dir}/metrics.csv") as fh:
        for row in csv.DictReader(fh):
            for key, value in row.items():
                if key.startswith("debug/") and value != "":
                    out[(key, int(row["step"]))] = float(value)
    return out


def _findings(trainer):
    return {
        type(cb).__name__: [(f.check, f.step, f.epoch, f.count) for f in cb.findings]  # messages hold timings
        for cb in debug_callbacks_of(trainer)
    }


def _stopper(trainer):
    return next(cb for cb in trainer.callbacks if isinstance(cb, MetricEarlyStopping))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    whole = _fit(root, "whole", MAX_EPOCHS)
    first = _fit(root, "first", MAX_EPOCHS, interrupt_after=INTERRUPT_AFTER)
    last = root / "first" / "ckpt" / "last.ckpt"
    resumed = _fit(root, "resumed", MAX_EPOCHS, ckpt_path=str(last))
    return whole, first, resumed, last


def test_resumed_run_reports_the_same_findings(runs):
    whole, first, resumed, _ = runs
    assert first.global_step == INTERRUPT_AFTER * 20 and not first.should_stop, "interrupt before the stop"
    assert resumed.global_step == whole.global_step, (resumed.global_step, whole.global_step)
    expected, got = _findings(whole), _findings(resumed)
    for name in expected:
        assert got[name] == expected[name], f"{name}:\nresumed {got[name]}\nwhole   {expected[name]}"


def test_resumed_run_stops_at_the_same_epoch_for_the_same_reason(runs):
    whole, _, resumed, _ = runs
    a, b = _stopper(whole), _stopper(resumed)
    assert whole.should_stop and whole.current_epoch < MAX_EPOCHS - 1, "the uninterrupted run must stop early"
    got = (b.stopped_epoch, b.stop_reason, b.wait_count, float(b.best_score), b.best_step)
    want = (a.stopped_epoch, a.stop_reason, a.wait_count, float(a.best_score), a.best_step)
    assert got == want, f"resumed {got} vs whole {want}"
    assert a.stopped_epoch > INTERRUPT_AFTER, "the stop must be decided after the resume"


def test_resumed_run_logs_the_same_debug_curves(runs):
    whole, first, resumed, _ = runs
    expected = _curves(whole)
    got = {**_curves(first), **_curves(resumed)}  # the resumed logger starts at the checkpoint's step
    assert expected, "no debug/ curve was logged"
    assert not expected.keys() - got.keys(), sorted(expected.keys() - got.keys())
    # The interrupted run gives its final verdict (after the last checkpoint), which adds points at the
    # checkpoint's step that the uninterrupted run never logged; nothing else may be extra.
    extra = got.keys() - expected.keys()
    assert {step for _, step in extra} <= {first.global_step}, sorted(extra)
    bad = {
        k: (got[k], v)
        for k, v in expected.items()
        if not (math.isclose(got[k], v, rel_tol=1e-6, abs_tol=1e-9) or (math.isnan(got[k]) and math.isnan(v)))
    }
    assert not bad, f"{len(bad)} of {len(expected)} points differ (resumed, whole): {dict(list(bad.items())[:10])}"


def test_every_callback_state_loads_with_weights_only(runs):
    *_, last = runs
    checkpoint = torch.load(last, weights_only=True)
    states = checkpoint["callbacks"]
    names = {key.split("{")[0] for key in states}
    expected = {type(cb).__name__ for cb in debug_callbacks(metric="val_acc", report=False)}
    assert expected <= names, f"missing from the checkpoint: {expected - names}"
