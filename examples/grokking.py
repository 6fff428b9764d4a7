"""Grokking on modular addition, watched by GrokkingMonitor and logged to W&B offline.

    python examples/grokking.py                 # half the pairs for training: groks near step 900, ~40 s
    python examples/grokking.py --frac 0.3      # 30%: memorised by step ~300, groks near 13k (~3 min)

The model (embedding + MLP, AdamW, weight decay 1.0, full batch) memorises the training pairs within ~100
steps while dev accuracy sits at zero, then generalises hundreds to thousands of steps later. The monitor logs
train/dev accuracy and loss and the weight norm against `debug/grokking/log10_step`, so W&B draws them on a
log-step axis with no setup, and reports `grokking.memorized` and `grokking.generalized` with the delay.
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

from lightning_debug import DebugReport
from lightning_debug.callbacks.grokking import GrokkingMonitor
from lightning_debug.demos.modular import ModularAdditionMLP, modular_addition_loaders

# the fast CI fixture and the dramatic log-x demo of shared/reference (p=97, d=128, h=256, weight decay 1.0)
PRESETS = {0.5: {"lr": 3e-3, "steps": 1200}, 0.3: {"lr": 1e-3, "steps": 15000}}


def main(argv: list[str] | None = None) -> pl.Trainer:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frac", type=float, default=0.5, help="fraction of the 97x97 pairs used for training")
    parser.add_argument("--lr", type=float, default=None, help="default: 3e-3 for --frac 0.5, else 1e-3")
    parser.add_argument("--steps", type=int, default=None, help="default: 1200 for --frac 0.5, else 15000")
    parser.add_argument("--weight-decay", type=float, default=1.0)
    parser.add_argument("--evals-per-decade", type=int, default=10, help="extra log-spaced evaluations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/grokking")
    args = parser.parse_args(argv)
    preset = PRESETS.get(args.frac, PRESETS[0.3])
    lr = args.lr if args.lr is not None else preset["lr"]
    steps = args.steps if args.steps is not None else preset["steps"]

    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_flush_denormal(True)  # denormal floats slow CPU steps 5x once the training loss is ~1e-6
    pl.seed_everything(args.seed, verbose=False)
    train, val = modular_addition_loaders(train_frac=args.frac, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    logger = WandbLogger(project="lightning-debug-grokking", save_dir=args.out, offline=True)
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        logger=logger,
        callbacks=[GrokkingMonitor(evals_per_decade=args.evals_per_decade), DebugReport()],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=50,
        default_root_dir=args.out,
    )
    trainer.fit(ModularAdditionMLP(lr=lr, weight_decay=args.weight_decay), train, val)
    run_dir = logger.experiment.dir.removesuffix("/files") if logger.experiment.dir else args.out
    import wandb

    wandb.finish()
    print(
        f"\nW&B offline run: {run_dir}\n"
        f"  view it: `wandb sync {run_dir}`, then open the run's workspace: section `debug/grokking` holds\n"
        "  train/val accuracy, losses and weight norm on the log10(step + 1) axis, `accuracy_curves` and\n"
        "  `loss_curves` (native charts) and `curves` (the log-x figure); the findings are in `debug/findings`."
    )
    return trainer


if __name__ == "__main__":
    main()
