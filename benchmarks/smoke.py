"""The detection benchmark's smoke set: the 15 fixed scenarios the defaults were first tuned on.

    python benchmarks/detection.py --smoke                    # every fixed scenario (~70 s on 2 CPU cores)
    python benchmarks/detection.py --smoke --only lr_too_high healthy_mlp --json out/detection.json

These runs were used to tune the defaults, so they measure nothing about new runs (the generated benchmark in
``detection.py`` does); they only guard against regressions. Each scenario is a small real training run with a
known fault (or known healthy), trained with
``debug_callbacks(metric=...)`` and default settings. Printed: a detection matrix (scenario x finding ids),
faults detected / total, healthy runs with any warning or error / total, and the detection latency (steps from
fault onset to the first expected finding). The same goes to ``--json``.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_debug import debug_callbacks
from lightning_debug.base import debug_callbacks_of
from lightning_debug.demos.digits import DigitsMLP, loaders
from lightning_debug.demos.lm import GreedyGPT2LM, TinyGPT2LM, lm_loaders
from lightning_debug.demos.modular import ModularAdditionMLP, modular_addition_loaders
from lightning_debug.demos.text import AttentionPoolingClassifier, text_loaders
from lightning_debug.findings import Finding, Severity

Built = tuple[pl.LightningModule, Any, Any]


@dataclass
class Scenario:
    name: str
    build: Callable[[], Built]
    expect: frozenset[str] = frozenset()  # any one of these ids = detected; empty = a healthy run
    metric: str = "val_acc"
    mode: str = "max"
    trainer: dict[str, Any] = field(default_factory=dict)
    onset_step: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return not self.expect


def _digits(batch_size: int = 32, **module_kwargs: Any) -> Callable[[], Built]:
    def build() -> Built:
        train, val = loaders(batch_size=batch_size)
        return DigitsMLP(**module_kwargs), train, val

    return build


def _memorising(label_noise: float = 0.0) -> Callable[[], Built]:
    def build() -> Built:
        train, val = loaders(batch_size=16, n_train=300, label_noise=label_noise)
        return DigitsMLP(hidden=(512, 512), lr=1e-3), train, val

    return build


def _text(bug: str | None = None) -> Callable[[], Built]:
    def build() -> Built:
        train, val = text_loaders()
        return AttentionPoolingClassifier(bug=bug), train, val

    return build


def _gpt2(off_by_one: bool | None = None) -> Callable[[], Built]:
    """A tiny GPT-2 LM; ``off_by_one`` set: its hand-written greedy decoder (with or without the score bug)."""

    def build() -> Built:

        train, val = lm_loaders(n_train=4096)
        module = WarmupCosineGPT2() if off_by_one is None else GreedyGPT2LM(off_by_one=off_by_one)
        return module, train, val

    return build


class WarmupCosineGPT2(TinyGPT2LM):
    """The healthy transformer recipe: AdamW, linear warm-up, cosine decay."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"], weight_decay=0.01)
        total, warmup = self.trainer.estimated_stepping_batches, 50
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0)))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _grokking() -> Built:
    train, val = modular_addition_loaders()
    return ModularAdditionMLP(), train, val


SCENARIOS: list[Scenario] = [
    Scenario("lr_too_high", _digits(lr=10.0, optimizer="sgd"), frozenset({"loss.diverging", "loss.nonfinite"})),
    Scenario("lr_too_low", _digits(lr=1e-6, optimizer="sgd"), frozenset({"loss.not_decreasing", "loss.plateau"})),
    # a 1-unit bottleneck either plateaus or (when its unit dies) never moves: both are the capacity finding
    Scenario("too_little_capacity", _digits(hidden=(1,)), frozenset({"loss.plateau", "loss.not_decreasing"})),
    Scenario("broken_loss", _digits(detach_logits=True), frozenset({"startup.cannot_overfit"})),
    # The fault here is training on past the best dev metric. With the suite's MetricEarlyStopping the run stops
    # at its best val_acc (epoch ~30) before the dev loss turns: prevented, not detected. These two scenarios turn
    # it off to measure detection of the run a user trains for a fixed number of epochs.
    Scenario(
        "memorising_overconfident",
        _memorising(),
        frozenset({"val.loss_metric_divergence", "calibration.overconfident"}),
        trainer={"max_epochs": 60},
        overrides={"early_stopping": False},
    ),
    Scenario(
        "label_noise",
        _memorising(label_noise=0.15),
        frozenset({"calibration.overconfident", "val.overfitting", "val.loss_metric_divergence"}),
        trainer={"max_epochs": 60},
        overrides={"early_stopping": False},
    ),
    Scenario(
        "grokking",
        _grokking,
        frozenset({"grokking.memorized"}),
        trainer={"max_steps": 1200},
    ),
    Scenario("padding_leak", _text("mask_ignored"), frozenset({"batch.loss_mismatch", "batch.padding_dependence"})),
    Scenario("batch_mixing", _text("batch_softmax"), frozenset({"batch.cross_sample_dependence"})),
    Scenario(
        "decode_score_bug",
        _gpt2(off_by_one=True),
        frozenset({"decode.score_mismatch"}),
        metric="val_loss",
        mode="min",
        trainer={"max_epochs": 1, "limit_train_batches": 64},
    ),
    Scenario("healthy_mlp", _digits(hidden=(128,), lr=3e-3)),
    Scenario("healthy_text_attention", _text(), trainer={"max_epochs": 4}),
    Scenario("healthy_transformer_warmup_cosine", _gpt2(), metric="val_loss", mode="min", trainer={"max_epochs": 4}),
    Scenario("healthy_batchnorm", _digits(hidden=(128, 128), lr=3e-3, batchnorm=True)),
    Scenario("healthy_dropout_small_batches", _digits(batch_size=8, hidden=(128,), lr=1e-3, dropout=0.3)),
]


def run(scenario: Scenario, root: str) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    module, train, val = scenario.build()
    callbacks = debug_callbacks(
        metric=scenario.metric, mode=scenario.mode, report={"print_table": False}, **scenario.overrides
    )
    kwargs: dict[str, Any] = {"max_epochs": 15, **scenario.trainer}
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
        **kwargs,
    )
    start = time.perf_counter()
    trainer.fit(module, train, val)
    findings: list[Finding] = [f for cb in debug_callbacks_of(trainer) for f in cb.findings]
    hits = [f for f in findings if f.check in scenario.expect]
    alarms = [f for f in findings if f.severity.rank >= Severity.WARNING.rank]
    return {
        "scenario": scenario.name,
        "healthy": scenario.healthy,
        "expected": sorted(scenario.expect),
        "found": sorted({f.check for f in findings}),
        "detected": bool(hits) if not scenario.healthy else None,
        "latency_steps": min(f.step for f in hits) - scenario.onset_step if hits else None,
        "false_alarms": sorted({f.check for f in alarms}) if scenario.healthy else [],
        "steps": trainer.global_step,
        "seconds": round(time.perf_counter() - start, 1),
    }


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    faults = [r for r in results if not r["healthy"]]
    healthy = [r for r in results if r["healthy"]]
    return {
        "faults_detected": sum(bool(r["detected"]) for r in faults),
        "faults_total": len(faults),
        "healthy_with_alarm": sum(bool(r["false_alarms"]) for r in healthy),
        "healthy_total": len(healthy),
    }


def print_matrix(results: list[dict[str, Any]]) -> None:
    ids = sorted({i for r in results for i in r["found"]})
    width = max(len(r["scenario"]) for r in results)
    print(" " * width + "  " + "  ".join(f"{i:>{max(len(i), 3)}}" for i in ids))
    for r in results:
        cells = []
        for i in ids:
            mark = ("X" if i in r["expected"] else "x") if i in r["found"] else "."
            cells.append(f"{mark:>{max(len(i), 3)}}")
        status = "healthy" if r["healthy"] else ("DETECTED" if r["detected"] else "MISSED")
        extra = f" false alarms: {r['false_alarms']}" if r["false_alarms"] else ""
        lat = f" latency {r['latency_steps']} steps" if r["latency_steps"] is not None else ""
        print(f"{r['scenario']:<{width}}  " + "  ".join(cells) + f"   {status}{lat}{extra}")
    print("(X: expected finding present, x: other finding present, .: absent)")


def main(only: list[str] | None = None, json_path: str | None = None) -> dict[str, Any]:
    torch.set_flush_denormal(True)
    chosen = [s for s in SCENARIOS if not only or s.name in only]
    with tempfile.TemporaryDirectory() as root:
        results = [run(s, root) for s in chosen]
    summary = summarise(results)
    print_matrix(results)
    print(
        f"faults detected: {summary['faults_detected']}/{summary['faults_total']}; "
        f"healthy runs with a warning or error: {summary['healthy_with_alarm']}/{summary['healthy_total']}"
    )
    out = {"summary": summary, "results": results}
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(out, fh, indent=2)
    return out
