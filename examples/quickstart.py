"""Quick start: a digits MLP with the default debug suite, logging to W&B offline.

    python examples/quickstart.py            # ~10 s on 2 CPU cores
    python examples/quickstart.py --lr 3.0   # a learning rate far too high: watch the findings

Prints the findings report at the end; the W&B run is under ./out/quickstart/wandb (offline: `wandb sync` it
to see the dashboard).
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
import wandb
from lightning.pytorch.loggers import WandbLogger

from lightning_debug import debug_callbacks
from lightning_debug.demos.digits import DigitsMLP, loaders


def main(argv: list[str] | None = None) -> pl.Trainer:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", default="out/quickstart")
    args = parser.parse_args(argv)

    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_flush_denormal(True)
    pl.seed_everything(0, verbose=False)
    train, val = loaders(batch_size=32)
    os.makedirs(args.out, exist_ok=True)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=WandbLogger(project="lightning-debug-quickstart", save_dir=args.out, offline=True),
        callbacks=debug_callbacks(metric="val_acc"),
        enable_progress_bar=False,
        default_root_dir=args.out,
    )
    trainer.fit(DigitsMLP(hidden=(128,), lr=args.lr), train, val)
    wandb.finish()  # flush the offline run; a later WandbLogger in this process starts a new one
    print(f"W&B offline run: {os.path.abspath(args.out)}/wandb/latest-run  (view with `wandb sync` + the web UI)")
    return trainer


if __name__ == "__main__":
    main()
