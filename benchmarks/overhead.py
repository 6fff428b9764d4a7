"""Overhead of the default suite, as a ratio against the bare run in the same process.

    python benchmarks/overhead.py                 # all cases, 5 repetitions each
    python benchmarks/overhead.py --case mlp --reps 3 --json out/overhead.json

For each case the same training run (fixed seed, same data) is timed bare and with
``debug_callbacks(metric="val_acc")``, alternating bare/suite to cancel drift. Reported per case:

- ``step_ratio``: median over repetitions of (median suite training-step time) / (median bare step time). A
  step is timed from one ``on_train_batch_start`` to the next within an epoch, so it holds the forward,
  backward, optimizer, data loading and every callback's per-batch hooks; epoch boundaries (validation and
  epoch-end work) and the one-off startup checks are excluded;
- ``epoch_ratio``: the same for whole epochs from the second on, validation and epoch-end work (calibration
  figures, trend tests) included: what per-epoch work costs on a model whose epoch takes well under a second;
- ``startup_ratio``: time of the startup checks (everything the suite adds before the first training batch)
  as a fraction of one bare epoch.

Targets (issue 7): step ratio <= 1.03 on the MLP (the worst case: a cheap model shows callback cost) and
<= 1.02 on the tiny GPT-2; startup <= 5% of one epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_debug import debug_callbacks


class StepClock(Callback):
    """Wall-clock of training steps, of whole epochs, and of what happens before the first batch."""

    def __init__(self) -> None:
        self.fit_start = 0.0
        self.first_batch = 0.0
        self.step_seconds: list[float] = []
        self.epoch_seconds: list[float] = []
        self._last_batch_start: float | None = None
        self._epoch_start = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch >= 1:
            self.epoch_seconds.append(time.perf_counter() - self._epoch_start)
        self._epoch_start = time.perf_counter()
        self._last_batch_start = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        now = time.perf_counter()
        self.first_batch = self.first_batch or now
        if self._last_batch_start is not None:
            self.step_seconds.append(now - self._last_batch_start)
        self._last_batch_start = now

    @property
    def seconds_per_step(self) -> float:
        return statistics.median(self.step_seconds)


@dataclass
class Case:
    name: str
    build: Callable[[], tuple[pl.LightningModule, Any, Any]]
    metric: str
    mode: str
    epochs: int


def _mlp() -> tuple[pl.LightningModule, Any, Any]:
    from lightning_debug.demos.digits import DigitsMLP, loaders

    train, val = loaders(batch_size=32)
    return DigitsMLP(hidden=(128,), lr=3e-3), train, val


def _gpt2() -> tuple[pl.LightningModule, Any, Any]:
    from lightning_debug.demos.lm import TinyGPT2LM, lm_loaders

    train, val = lm_loaders(n_train=2048)
    return TinyGPT2LM(), train, val


CASES = {
    "mlp": Case("mlp", _mlp, "val_acc", "max", epochs=4),
    "gpt2": Case("gpt2", _gpt2, "val_loss", "min", epochs=3),
}


def run_once(case: Case, with_suite: bool, root: str) -> StepClock:
    pl.seed_everything(0, verbose=False)
    module, train, val = case.build()
    clock = StepClock()
    callbacks: list[Callback] = [clock]
    if with_suite:
        callbacks += debug_callbacks(metric=case.metric, mode=case.mode, report={"print_table": False})
    trainer = pl.Trainer(
        max_epochs=case.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=callbacks,
    )
    trainer.fit(module, train, val)
    return clock


def measure(case: Case, reps: int, root: str) -> dict[str, Any]:
    bare, suite = [], []
    run_once(case, False, root)  # warm-up: imports, allocator, data caches
    for _ in range(reps):
        bare.append(run_once(case, False, root))
        suite.append(run_once(case, True, root))
    ratios = [s.seconds_per_step / b.seconds_per_step for b, s in zip(bare, suite, strict=True)]
    epoch_ratios = [
        statistics.median(s.epoch_seconds) / statistics.median(b.epoch_seconds)
        for b, s in zip(bare, suite, strict=True)
    ]
    bare_startup = statistics.median(b.first_batch - b.fit_start for b in bare)
    suite_startup = statistics.median(s.first_batch - s.fit_start for s in suite)
    bare_epoch = statistics.median(e for b in bare for e in b.epoch_seconds)
    return {
        "case": case.name,
        "reps": reps,
        "step_ratio": statistics.median(ratios),
        "step_ratios": ratios,
        "epoch_ratio": statistics.median(epoch_ratios),
        "bare_ms_per_step": 1e3 * statistics.median(b.seconds_per_step for b in bare),
        "suite_ms_per_step": 1e3 * statistics.median(s.seconds_per_step for s in suite),
        "startup_seconds": suite_startup - bare_startup,
        "startup_ratio": (suite_startup - bare_startup) / bare_epoch,
        "bare_epoch_seconds": bare_epoch,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--root", default="out/overhead")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    results = [measure(CASES[name], args.reps, args.root) for name in args.case or sorted(CASES)]
    for r in results:
        print(
            f"{r['case']:>6}: step ratio {r['step_ratio']:.3f} (bare {r['bare_ms_per_step']:.2f} ms/step, "
            f"suite {r['suite_ms_per_step']:.2f}); epoch ratio {r['epoch_ratio']:.3f} (bare epoch "
            f"{r['bare_epoch_seconds']:.2f} s); startup {r['startup_seconds']:.2f} s = "
            f"{100 * r['startup_ratio']:.1f}% of one epoch"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
