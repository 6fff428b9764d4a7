"""Run the default suite under 2-process CPU DDP (gloo); each rank writes what it saw to <out>/rank<k>.json.

Launched by tests/test_ddp.py as a script, because Lightning's "ddp" strategy re-runs the script for rank 1.
MetricEarlyStopping gets a ``stopping_threshold`` so the run stops early: the ranks see different local
``val_acc`` values (the module logs it without ``sync_dist``), so they must agree on the stop through a
collective. Rank 0 also saves the final weights, so the test can recompute calibration in one process.
"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

from lightning_debug import CalibrationMonitor, DebugCallback, MetricEarlyStopping, debug_callbacks
from lightning_debug.demos.digits import DigitsMLP, loaders

MAX_EPOCHS = 8
STOP_AT = 0.9  # val_acc; the digits MLP passes it after a few epochs


class OneRankProbe(DebugCallback):
    """Emits a finding on rank 1 only: the other rank must not wait for it."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.global_rank == 1:
            self.emit(trainer, "loss.plateau", f"seen on rank {trainer.global_rank} only")


def main(out: str, lr: float) -> None:
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    train, val = loaders(batch_size=32, n_train=640, n_val=320)
    callbacks = [
        OneRankProbe(),
        *debug_callbacks(metric="val_acc", early_stopping={"stopping_threshold": STOP_AT}, overfit={"when": "start"}),
    ]
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=MAX_EPOCHS,
        logger=WandbLogger(project="ddp", save_dir=out, offline=True),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out,
    )
    model = DigitsMLP(lr=lr)
    trainer.fit(model, train, val)
    calibration = next(cb for cb in callbacks if isinstance(cb, CalibrationMonitor))
    stopper = next(cb for cb in callbacks if isinstance(cb, MetricEarlyStopping))
    seen = {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
        "should_stop": trainer.should_stop,
        "stopped_epoch": stopper.stopped_epoch,
        "stop_reason": stopper.stop_reason,
        "val_acc": float(trainer.callback_metrics["val_acc"]),
        "calibration": calibration.history[-1],
        "findings": [f.to_dict() for cb in callbacks if isinstance(cb, DebugCallback) for f in cb.findings],
    }
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), os.path.join(out, "final_weights.pt"))
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as fh:
        json.dump(seen, fh)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 3e-3)
