"""The lecture's experiment: dev loss rises while dev accuracy holds or rises, so stop on the metric.

    python examples/loss_metric_divergence.py               # 60 epochs, ~15 s on 2 CPU cores
    python examples/loss_metric_divergence.py --epochs 30   # shorter

A wide MLP (512-512) trained with Adam on 300 digits memorises its training set within a few epochs. From then
on it grows ever more confident: the few dev examples it gets wrong cost more and more loss, so the dev loss
climbs while the dev accuracy stays where it was or still creeps up. The default suite reports
`val.loss_metric_divergence` (and `val.overfitting`), and the calibration monitor shows the overconfidence
(expected calibration error rising, reliability diagrams). Early stopping is left out so the run goes on; the
example then replays Lightning's `EarlyStopping` rule on the logged history to show where stopping on the
metric and stopping on the loss would have ended the run, and what dev accuracy each would have kept.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from lightning_debug import debug_callbacks
from lightning_debug.base import debug_callbacks_of
from lightning_debug.demos.digits import DigitsMLP, loaders
from lightning_debug.findings import Finding


class History(Callback):
    """Records the logged validation metrics once per validation epoch (sanity check excluded)."""

    def __init__(self, keys: tuple[str, ...] = ("val_acc", "val_loss")) -> None:
        self.keys = keys
        self.values: dict[str, list[float]] = {k: [] for k in keys}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for k in self.keys:
            self.values[k].append(float(trainer.callback_metrics[k]))


@dataclass
class StopPoint:
    """Where Lightning's ``EarlyStopping(monitor, mode, patience, min_delta=0)`` would have stopped."""

    monitor: str
    stop_epoch: int | None  # None: it would have run to the end
    best_epoch: int
    best_value: float
    val_acc_at_best: float


def would_stop(values: list[float], mode: str, patience: int) -> tuple[int | None, int]:
    """Lightning's rule: stop once the value has not strictly improved on its best for ``patience`` checks."""
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    best, wait = 0, 0
    for epoch in range(1, len(values)):
        if better(values[epoch], values[best]):
            best, wait = epoch, 0
        else:
            wait += 1
            if wait >= patience:
                return epoch, best
    return None, best


def stop_points(history: dict[str, list[float]], patience: int) -> list[StopPoint]:
    points = []
    for monitor, mode in (("val_acc", "max"), ("val_loss", "min")):
        values = history[monitor]
        stop, best = would_stop(values, mode, patience)
        # the checkpoint each would keep is its own best epoch up to the stop
        points.append(StopPoint(monitor, stop, best, values[best], history["val_acc"][best]))
    return points


@dataclass
class Result:
    trainer: pl.Trainer
    findings: list[Finding]
    history: dict[str, list[float]]
    stops: list[StopPoint]


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--patience", type=int, default=5, help="patience of the replayed EarlyStopping rule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/loss_metric_divergence")
    args = parser.parse_args(argv)

    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_flush_denormal(True)
    pl.seed_everything(args.seed, verbose=False)
    train, val = loaders(batch_size=16, n_train=args.n_train, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    logger = WandbLogger(project="lightning-debug-divergence", save_dir=args.out, offline=True)
    history = History()
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=[
            history,
            # every 10th epoch: drawing a reliability diagram costs ~0.5 s, as much as an epoch of this run
            *debug_callbacks(metric="val_acc", early_stopping=False, calibration={"plot_every_n_epochs": 10}),
        ],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        default_root_dir=args.out,
    )
    trainer.fit(DigitsMLP(hidden=(512, 512), lr=1e-3), train, val)
    findings = [f for cb in debug_callbacks_of(trainer) for f in cb.findings]
    stops = stop_points(history.values, args.patience)

    print(f"\nWhere EarlyStopping(patience={args.patience}) would have stopped this {args.epochs}-epoch run:")
    for p in stops:
        stop = "never (ran to the end)" if p.stop_epoch is None else f"after epoch {p.stop_epoch}"
        print(
            f"  on {p.monitor:8s}: {stop}; best epoch {p.best_epoch} ({p.monitor} {p.best_value:.4g}), "
            f"dev accuracy kept {p.val_acc_at_best:.3f}"
        )
    print(f"  full run: dev accuracy {history.values['val_acc'][-1]:.3f} at the last epoch")
    run_dir = logger.experiment.dir.removesuffix("/files") if logger.experiment.dir else args.out
    import wandb

    wandb.finish()
    print(
        f"\nW&B offline run: {run_dir}\n"
        f"  view it: `wandb sync {run_dir}`; compare val_loss with val_acc, and see `debug/calibration` "
        "(ECE, reliability diagrams) and `debug/findings`."
    )
    return Result(trainer, findings, history.values, stops)


if __name__ == "__main__":
    main()
