"""Per-step overhead of ``LossConvergenceMonitor``, as a ratio against the same run without it.

    python benchmarks/loss_overhead.py                    # 7 repetitions, 12 epochs of a small MLP on digits
    python benchmarks/loss_overhead.py --reps 3 --epochs 4 --json out/loss_overhead.json

One process; after a warm-up run, bare, no-op and monitored runs alternate (same seed, data and CSV logger) to
cancel drift. The no-op arm (a do-nothing ``Callback``) shows what Lightning's hook dispatch alone costs any
callback. Steps are timed from the start of the second epoch to the end of training (so the monitor's final
check is included), in wall-clock time and in this process's CPU time (one torch thread): CPU time is what the
callback costs and is far less disturbed by other processes on a shared machine. Reported: the median over
repetitions of (time per step) / (bare time per step). Target (issue 3): <= 1.02 on a small MLP on CPU (the
model of ``benchmarks/overhead.py``). A cheap model is the worst case: a bigger one hides a fixed per-step cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_debug.callbacks.loss import LossConvergenceMonitor
from lightning_debug.demos.digits import DigitsMLP, loaders


class Clock(Callback):
    """Wall-clock and process CPU seconds per training step, from the second epoch to the end of training."""

    def __init__(self) -> None:
        self.start = (0.0, 0.0)
        self.steps = 0
        self.per_step = (0.0, 0.0)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.steps += trainer.current_epoch >= 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wall, cpu = time.perf_counter() - self.start[0], time.process_time() - self.start[1]
        self.per_step = (wall / max(self.steps, 1), cpu / max(self.steps, 1))


ARMS: dict[str, Callable[[], list[Callback]]] = {
    "bare": list,
    "noop": lambda: [Callback()],  # what any callback costs: Lightning dispatches ~8 hooks per step to it
    "monitored": lambda: [LossConvergenceMonitor(verbose=False)],
}


def run_once(arm: str, epochs: int, root: str) -> tuple[float, float]:
    """(wall, CPU) seconds per training step of one run."""
    pl.seed_everything(0, verbose=False)
    train, _ = loaders(batch_size=32)
    clock = Clock()
    callbacks = ARMS[arm]()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=CSVLogger(root, name="loss_overhead"),
        log_every_n_steps=50,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=[*callbacks, clock],  # the clock last: its on_train_end runs after the monitor's final check
    )
    trainer.fit(DigitsMLP(hidden=(128,), lr=3e-3), train)  # the model of benchmarks/overhead.py
    return clock.per_step


def measure(reps: int = 7, epochs: int = 12, root: str | None = None) -> dict[str, Any]:
    root = root or tempfile.mkdtemp(prefix="loss_overhead_")
    run_once("bare", epochs, root)  # warm-up: imports, allocator, data caches
    times: dict[str, list[tuple[float, float]]] = {arm: [] for arm in ARMS}
    for _ in range(reps):
        for arm in ARMS:
            times[arm].append(run_once(arm, epochs, root))
    out: dict[str, Any] = {"reps": reps, "epochs": epochs}
    for i, clock in enumerate(("wall", "cpu")):
        bare = times["bare"]
        out[clock] = {"bare_ms_per_step": 1e3 * statistics.median(b[i] for b in bare)}
        for arm in ("noop", "monitored"):
            ratios = [t[i] / b[i] for b, t in zip(bare, times[arm], strict=True)]
            out[clock][arm] = {"ratio": statistics.median(ratios), "ratios": ratios}
        out[clock]["ratio"] = out[clock]["monitored"]["ratio"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--root")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)  # steadier timings; the ratio is what matters
    result = measure(args.reps, args.epochs, args.root)
    for clock in ("cpu", "wall"):
        r = result[clock]
        print(
            f"{clock:>4}: LossConvergenceMonitor step ratio {r['ratio']:.3f}, "
            f"a no-op Callback {r['noop']['ratio']:.3f} "
            f"(medians of {args.reps}; bare {r['bare_ms_per_step']:.2f} ms/step; monitor per rep "
            f"{', '.join(f'{x:.3f}' for x in r['monitored']['ratios'])})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
