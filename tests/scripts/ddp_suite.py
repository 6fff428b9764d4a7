"""Run the default suite under 2-process CPU DDP (gloo); each rank writes what it saw to <out>/rank<k>.json.

Launched by tests/test_ddp.py as a script, because Lightning's "ddp" strategy re-runs the script for rank 1.
"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

from lightning_debug import DebugCallback, debug_callbacks
from lightning_debug.demos.digits import DigitsMLP, loaders


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
    callbacks = [OneRankProbe(), *debug_callbacks(metric="val_acc")]
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=4,
        logger=WandbLogger(project="ddp", save_dir=out, offline=True),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out,
    )
    trainer.fit(DigitsMLP(lr=lr), train, val)
    seen = {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "should_stop": trainer.should_stop,
        "findings": [f.to_dict() for cb in callbacks if isinstance(cb, DebugCallback) for f in cb.findings],
    }
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as fh:
        json.dump(seen, fh)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 3e-3)
