"""Test helpers: a quiet CPU trainer, and the demo tasks re-exported for short imports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from lightning_debug.demos.digits import DigitsMLP, digits, loaders

__all__ = ["DigitsMLP", "digits", "loaders", "make_trainer"]


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
