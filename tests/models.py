"""Test helpers: a quiet CPU trainer, and the demo tasks re-exported for short imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_debug.demos.digits import DigitsMLP, digits, loaders

__all__ = ["DigitsMLP", "SmoothedDigitsMLP", "digits", "loaders", "make_trainer", "run_two_rank_script"]


class SmoothedDigitsMLP(DigitsMLP):
    """Label smoothing 0.1 over 10 classes (a ``CrossEntropyLoss`` submodule): the loss cannot go below 0.500."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.criterion(self(x), y)


def make_trainer(root: Path | str, callbacks: list[Any], logger: Any = None, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU trainer writing under ``root`` (CSV logger unless one is given)."""
    defaults: dict[str, Any] = dict(
        default_root_dir=str(root),
        accelerator="cpu",
        devices=1,
        max_epochs=3,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        logger=logger if logger is not None else CSVLogger(str(root), name="csv"),
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def run_two_rank_script(
    script: Path | str, out: Path, timeout: float = 600
) -> tuple[subprocess.CompletedProcess, list[Any]]:
    """Run a 2-process DDP script (Lightning's "ddp" re-runs the script for rank 1, so it cannot run in-process).

    The script takes ``out`` as its argument and writes ``out/rank<k>.json``; returns the process and both.
    """
    # Not the W&B service of this process (WANDB_SERVICE, set by an earlier test's run): the script's runs would
    # go through it and its run file got no exit record within 60 s when the ddp tests ran after W&B tests.
    parent = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env = {**parent, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"DDP run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc, [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in (0, 1)]
