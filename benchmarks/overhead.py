"""Overhead of the default suite, as a ratio against the bare run in the same process.

    python benchmarks/overhead.py                 # all cases, 5 repetitions each
    python benchmarks/overhead.py --case mlp --reps 3 --json out/overhead.json
    python benchmarks/overhead.py --case mlp --reps 1 --examples   # + a one-epoch run of each example
    python benchmarks/overhead.py --health --reps 3               # ModelHealthCheck alone (issue 15)
    python benchmarks/overhead.py --errors --reps 3  # ErrorAnalysis against no ErrorAnalysis on two examples

For each case the same training run (fixed seed, same data) is timed bare and with
``debug_callbacks(metric="val_acc")``, alternating bare/suite to cancel drift. A step is timed from one
``on_train_batch_start`` to the next within an epoch, so it holds the forward, backward, optimizer, data
loading and every callback's per-batch hooks; epoch boundaries (validation and epoch-end work) and the one-off
startup checks are excluded. Reported per case:

- ``step_ratio``: median over repetitions of (median suite step time) / (median bare step time), both from
  one run in which the suite is on the trainer for a random half of the training steps (``Interleave``).
  Run-to-run speed on a shared 2-core machine drifts by 5-10%, three times the effect to measure; step-by-step
  interleaving cancels the drift. The typical step: periodic work (a sampled step every 10th-20th, a check every
  20th-200th) is not in a median;
- ``step_mean_ratio``: the same with means: the typical step plus the periodic work spread over the steps.
  (Until 2026-12 the arms strictly alternated; a period of 10 or 100 then fell always in one arm, which put
  a fifth of that arm's steps on sampled steps, or none, and moved its median with the phase);
- ``separate_runs_step_ratio``: the same from separate bare and suite runs (the noisy way, for comparison);
- ``epoch_ratio``: the same for whole epochs from the second on, validation and epoch-end work (calibration
  figures, trend tests) included: what per-epoch work costs on a model whose epoch takes well under a second;
- ``startup_ratio``: time of the startup checks (everything the suite adds before the first training batch)
  as a fraction of one bare epoch;
- ``deferred``: startup checks that did not run at start (``OverfitBatchCheck`` in epochs under 2000 steps);
- ``checks``: each startup check's own time (from its finding's ``data``), as a fraction of one bare epoch
  and of a bare one-epoch run (``Trainer.fit`` with ``max_epochs=1``: sanity check, the epoch and its
  validation);
- with ``--examples``: a one-epoch run of each example that uses the suite, as its user runs it (its W&B
  offline logger included), and each startup check's share of it;
- with ``--whole-run``: the whole run's cost (issue 16): ``Trainer.fit`` wall time, sanity check, validation,
  startup checks, epoch-end and fit-end work included, suite vs bare on the same script, alternating runs in
  one process; for the quickstart run (38-step epochs with validation) and for 22-step epochs without
  validation. ``--whole-seconds S`` scales the epochs so a bare run lasts about S seconds (default: the
  quickstart's 15 epochs, and as many 22-step epochs). Early stopping runs with an endless patience, so both
  runs train the same epochs (it only ever shortens a run). Also the suite's costliest hooks (Lightning's
  ``SimpleProfiler`` on one extra, untimed suite run): what dominates. ``--phases EPOCHS`` instead splits
  ``Trainer.fit`` of that many epochs at Lightning's hooks (``PhaseClock``: start, training steps, validation,
  epoch end, end) and gives the suite's extra time per phase, per epoch or once;
- with ``--without NAME`` (repeatable; per-step and whole-run modes): the same with that suite component left
  out (``debug_callbacks(..., NAME=False)``): what a component costs, or what a cost line would be without it.
  With every component left out the "suite" is empty and the ratio is the measurement's own noise (a null run).

The cases are the runs of the examples that use ``debug_callbacks``: ``mlp`` is ``examples/quickstart.py``
(digits, 38 steps per epoch), ``divergence`` is ``examples/loss_metric_divergence.py`` (a 512x512 MLP on 300
digits: 19 steps per epoch) and ``gpt2`` is ``examples/transformer_lm.py`` (128 steps per epoch, with the
example's loss floors).

Targets (issue 7): step ratio <= 1.03 on the MLP (the worst case: a cheap model shows callback cost) and
<= 1.02 on the tiny GPT-2; startup <= 5% of one epoch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_debug import debug_callbacks
from lightning_debug.base import debug_callbacks_of
from lightning_debug.suite import SUITE_COMPONENTS

STARTUP_CHECKS = ("OverfitBatchCheck", "BatchConsistencyCheck", "DecodingConsistencyCheck")


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
    suite_options: dict[str, Any] = field(default_factory=dict)  # what the example passes to debug_callbacks
    threads: int | None = None  # torch intra-op threads (None: torch's default)


def _mlp() -> tuple[pl.LightningModule, Any, Any]:
    from lightning_debug.demos.digits import DigitsMLP, loaders

    train, val = loaders(batch_size=32)
    return DigitsMLP(hidden=(128,), lr=3e-3), train, val


def _divergence() -> tuple[pl.LightningModule, Any, Any]:
    from lightning_debug.demos.digits import DigitsMLP, loaders

    train, val = loaders(batch_size=16, n_train=300)
    return DigitsMLP(hidden=(512, 512), lr=1e-3), train, val


def _gpt2() -> tuple[pl.LightningModule, Any, Any]:
    from lightning_debug.demos.lm import TinyGPT2LM, lm_loaders

    train, val = lm_loaders(n_train=4096)
    return TinyGPT2LM(), train, val


CASES = {
    # A second thread buys a 32x64 MLP nothing, and its scheduling noise (+-5% per run) drowns a 3% effect.
    "mlp": Case("mlp", _mlp, "val_acc", "max", epochs=4, threads=1),
    "divergence": Case(
        "divergence", _divergence, "val_acc", "max", epochs=4, threads=1, suite_options={"early_stopping": False}
    ),
    "gpt2": Case(
        "gpt2", _gpt2, "val_loss", "min", epochs=3, suite_options={"overfit": {"floor": 0.3}, "loss": {"floor": 1.32}}
    ),
}


class Interleave(Callback):
    """Puts the suite on the trainer for a random half of the training steps (a coin of its own: strict
    alternation aliases with the suite's periods) and times both kinds of step.

    The arm is chosen in ``on_train_batch_start`` (this callback is first on the trainer) and the full list is
    back at ``on_train_batch_end``, so validation and epoch-end hooks always see every callback. Lightning
    iterates the list it read when a hook's dispatch began, so a swap takes effect from the next hook on.
    """

    def __init__(self, suite: list[Callback]) -> None:
        self.suite = suite
        self.seconds: dict[bool, list[float]] = {True: [], False: []}
        self._coin = random.Random(0)  # own generator: the run's RNG stays the bare run's
        self._full: list[Callback] = []
        self._bare: list[Callback] = []
        self._last: float | None = None
        self._on = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._full = list(trainer.callbacks)  # type: ignore[attr-defined]
        self._bare = [cb for cb in self._full if cb not in self.suite]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.seconds[self._on].append(now - self._last)
        self._last = now
        self._on = self._coin.random() < 0.5
        trainer.callbacks = self._full if self._on else self._bare  # type: ignore[attr-defined]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        trainer.callbacks = self._full  # type: ignore[attr-defined]

    @property
    def ratio(self) -> float:
        return statistics.median(self.seconds[True]) / statistics.median(self.seconds[False])

    @property
    def mean_ratio(self) -> float:
        return statistics.fmean(self.seconds[True]) / statistics.fmean(self.seconds[False])


@dataclass
class Run:
    clock: StepClock
    fit_seconds: float
    check_seconds: dict[str, float]  # startup check -> its own time
    deferred: list[str]  # startup checks deferred until the loss stalls
    interleave: Interleave | None  # set for an interleaved run


def _deferred(trainer: pl.Trainer) -> list[str]:
    """Startup checks that did not run at start (the overfit check in short epochs)."""
    return sorted(
        {f.source for cb in debug_callbacks_of(trainer) for f in cb.findings if f.check == "startup.overfit_deferred"}
    )


def _check_seconds(trainer: pl.Trainer) -> dict[str, float]:
    out = {}
    for cb in debug_callbacks_of(trainer):
        for f in cb.findings:
            if f.source in STARTUP_CHECKS and f.source not in out:
                seconds = f.data.get("seconds", f.data.get("cost", {}).get("seconds"))
                if seconds is not None:
                    out[f.source] = float(seconds)
    return out


def run_once(case: Case, with_suite: bool, root: str, epochs: int | None = None, interleave: bool = False) -> Run:
    pl.seed_everything(0, verbose=False)
    module, train, val = case.build()
    clock = StepClock()
    callbacks: list[Callback] = [clock]
    alternator = None
    if with_suite:
        options = {"report": {"print_table": False}, **case.suite_options}
        suite = debug_callbacks(metric=case.metric, mode=case.mode, **options)
        alternator = Interleave(suite) if interleave else None
        callbacks = [alternator or clock, *suite]
    trainer = pl.Trainer(
        max_epochs=epochs or case.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(module, train, val)
    return Run(clock, time.perf_counter() - start, _check_seconds(trainer), _deferred(trainer), alternator)


def measure(case: Case, reps: int, root: str) -> dict[str, Any]:
    threads = torch.get_num_threads()
    if case.threads is not None:
        torch.set_num_threads(case.threads)
    try:
        return _measure(case, reps, root)
    finally:
        torch.set_num_threads(threads)


def _measure(case: Case, reps: int, root: str) -> dict[str, Any]:
    bare_runs, suite_runs, one_epoch_runs, interleaved, interleaved_means = [], [], [], [], []
    run_once(case, False, root)  # warm-up: imports, allocator, data caches
    for _ in range(reps):
        bare_runs.append(run_once(case, False, root))
        suite_runs.append(run_once(case, True, root))
        one_epoch_runs.append(run_once(case, False, root, epochs=1).fit_seconds)
        alternating = run_once(case, True, root, epochs=2 * case.epochs, interleave=True).interleave
        assert alternating is not None
        interleaved.append(alternating.ratio)
        interleaved_means.append(alternating.mean_ratio)
    bare, suite = [r.clock for r in bare_runs], [r.clock for r in suite_runs]
    ratios = [s.seconds_per_step / b.seconds_per_step for b, s in zip(bare, suite, strict=True)]
    epoch_ratios = [
        statistics.median(s.epoch_seconds) / statistics.median(b.epoch_seconds)
        for b, s in zip(bare, suite, strict=True)
    ]
    bare_startup = statistics.median(b.first_batch - b.fit_start for b in bare)
    suite_startup = statistics.median(s.first_batch - s.fit_start for s in suite)
    bare_epoch = statistics.median(e for b in bare for e in b.epoch_seconds)
    one_epoch_run = statistics.median(one_epoch_runs)
    checks = {}
    for name in STARTUP_CHECKS:
        seconds = [r.check_seconds[name] for r in suite_runs if name in r.check_seconds]
        if seconds:
            s = statistics.median(seconds)
            checks[name] = {"seconds": s, "epoch_ratio": s / bare_epoch, "one_epoch_run_ratio": s / one_epoch_run}
    return {
        "case": case.name,
        "reps": reps,
        "threads": torch.get_num_threads(),
        "step_ratio": statistics.median(interleaved),
        "step_ratios": interleaved,
        "step_mean_ratio": statistics.median(interleaved_means),
        "step_mean_ratios": interleaved_means,
        "separate_runs_step_ratio": statistics.median(ratios),
        "separate_runs_step_ratios": ratios,
        "epoch_ratio": statistics.median(epoch_ratios),
        "bare_ms_per_step": 1e3 * statistics.median(b.seconds_per_step for b in bare),
        "suite_ms_per_step": 1e3 * statistics.median(s.seconds_per_step for s in suite),
        "startup_seconds": suite_startup - bare_startup,
        "startup_ratio": (suite_startup - bare_startup) / bare_epoch,
        "bare_epoch_seconds": bare_epoch,
        "one_epoch_run_seconds": one_epoch_run,
        "checks": checks,
        "deferred": sorted({name for r in suite_runs for name in r.deferred}),
    }


def _time_hooks(
    callback: Callback, hooks: tuple[str, ...], clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Wrap ``callback``'s hooks (on the instance) to add their time by ``clock`` to the returned dict."""
    spent = dict.fromkeys(hooks, 0.0)
    for name in hooks:
        hook = getattr(callback, name)

        def timed(*args: Any, _hook: Callable[..., Any] = hook, _name: str = name, **kwargs: Any) -> Any:
            began = clock()
            try:
                return _hook(*args, **kwargs)
            finally:
                spent[_name] += clock() - began

        setattr(callback, name, timed)
    return spent


class CpuStepClock(StepClock):
    """Also the thread's CPU time per step: unlike wall time, it does not count the time another process holds
    the core (on a shared machine one preemption inside a hook adds milliseconds to a sum of microseconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu_step_seconds: list[float] = []
        self._last_cpu: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._last_cpu = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, i)
        now = time.thread_time()
        if self._last_cpu is not None:
            self.cpu_step_seconds.append(now - self._last_cpu)
        self._last_cpu = now


PERIODIC_HOOKS = ("on_before_optimizer_step_due", "on_train_batch_end_due")  # what Lightning calls on sampled steps


HEALTH_INTERVALS = 4  # check intervals a periodic-cost run lasts, so its per-step average holds whole checks


def _health_run(case: Case, root: str) -> tuple[Any, CpuStepClock, dict[str, float], dict[str, float]]:
    """One run with ``ModelHealthCheck`` alone: the check, its clock, wall and CPU time in its hooks."""
    from lightning_debug.callbacks.health import ModelHealthCheck

    pl.seed_everything(0, verbose=False)
    module, train, val = case.build()
    check = ModelHealthCheck(verbose=False)
    wall = _time_hooks(check, (*PERIODIC_HOOKS, "on_train_end"))
    cpu = _time_hooks(check, PERIODIC_HOOKS, time.thread_time)
    clock = CpuStepClock()
    trainer = pl.Trainer(  # whole check intervals: the per-step average holds its share of the checks
        max_steps=HEALTH_INTERVALS * check.check_every_n_steps, max_epochs=-1, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=root, callbacks=[clock, check],
    )  # fmt: skip
    trainer.fit(module, train, val)
    return check, clock, wall, cpu


def health_cost(case: Case, reps: int, root: str) -> dict[str, Any]:
    """``ModelHealthCheck`` alone (issue 15): its startup against one bare epoch, and its periodic part per step.

    The startup checks watch the run's own first step (no extra forward or backward): their cost is that step's
    time with the check minus its time bare (``startup_seconds``: medians over repetitions, so the probe's
    ``TorchFunctionMode`` inside the forward is counted), and the time inside the check's first-step hooks
    (``startup_hook_seconds``, the check's ``startup_seconds``).
    The periodic part is the time inside its hooks (``on_before_optimizer_step`` and ``on_train_batch_end``,
    which Lightning finds only on sampled steps: sampling every 20th step (10th in the first 200), the pull,
    verdicts and logging every 10 samples) summed over a run of ``HEALTH_INTERVALS`` whole check intervals,
    divided by the summed step times of the same run, in wall time (preemption on
    a shared machine inflates both, but a single one inside a hook weighs heavily) and in the thread's CPU
    time (blind to preemption); what Lightning pays to find them is added from ``--hook-dispatch-us``: two
    property reads every step (0.18 us in a warm loop, taken as 1 us between steps) and two hook calls every
    20th step (~2.5 us each, see ``LeanCallback``), rounded up to 1.5 us a step. ``end_seconds``: its end-of-fit work
    (last check, the table and the heat-map PNG; no logger here, so the PNG is drawn). Medians over
    repetitions."""
    threads = torch.get_num_threads()
    if case.threads is not None:
        torch.set_num_threads(case.threads)
    startup, periodic, periodic_cpu, end, bare_epochs, bare_steps = [], [], [], [], [], []
    first_bare, first_checked = [], []
    try:
        run_once(case, False, root)  # warm-up
        _health_run(case, root)  # warm-up: first-call costs (the activation probe's mode, matplotlib's import)
        for _ in range(reps):
            bare = run_once(case, False, root).clock
            first_bare.append(bare.step_seconds[0])
            bare_epochs.append(statistics.median(bare.epoch_seconds))
            bare_steps.append(bare.seconds_per_step)
            check, clock, wall, cpu = _health_run(case, root)
            startup.append(check.startup_seconds)
            first_checked.append(clock.step_seconds[0])
            periodic.append(sum(wall[h] for h in PERIODIC_HOOKS) / sum(clock.step_seconds))
            periodic_cpu.append(sum(cpu.values()) / sum(clock.cpu_step_seconds))
            end.append(wall["on_train_end"])
    finally:
        torch.set_num_threads(threads)
    epoch = statistics.median(bare_epochs)
    first_step_extra = statistics.median(first_checked) - statistics.median(first_bare)
    return {
        "case": case.name,
        "reps": reps,
        "startup_seconds": first_step_extra,
        "startup_epoch_ratio": first_step_extra / epoch,
        "startup_epoch_ratios": [(c - b) / e for b, c, e in zip(first_bare, first_checked, bare_epochs, strict=True)],
        "startup_hook_seconds": statistics.median(startup),
        "first_step_seconds": {"bare": first_bare, "checked": first_checked},
        "periodic_step_share": statistics.median(periodic),
        "periodic_step_shares": periodic,
        "periodic_cpu_share": statistics.median(periodic_cpu),
        "periodic_cpu_shares": periodic_cpu,
        "end_seconds": statistics.median(end),
        "bare_epoch_seconds": epoch,
        "bare_ms_per_step": 1e3 * statistics.median(bare_steps),
    }


# One epoch of each example that runs the startup checks, run as its user runs it (W&B offline logger included).
EXAMPLE_RUNS = {
    "quickstart": ["--epochs", "1"],
    "loss_metric_divergence": ["--epochs", "1"],
    "transformer_lm": ["--steps", "128"],  # 4096 sentences in batches of 32
}


def example_run(name: str, root: str) -> dict[str, Any]:
    """Wall time of a one-epoch run of ``examples/<name>.py`` and each startup check's share of it."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    start = time.perf_counter()
    result = module.main([*EXAMPLE_RUNS[name], "--out", f"{root}/{name}"])
    seconds = time.perf_counter() - start
    import wandb

    wandb.finish()  # an example may leave its run open; the next example's WandbLogger would reuse it
    checks = _check_seconds(getattr(result, "trainer", result))
    without = seconds - sum(checks.values())
    return {
        "example": name,
        "run_seconds": seconds,
        "checks": {k: {"seconds": v, "run_ratio": v / without} for k, v in checks.items()},
    }


@dataclass
class WholeRun:
    name: str
    build: Callable[[], tuple[pl.LightningModule, Any, Any]]
    epochs: int
    validation: bool
    wandb: bool = False  # a WandbLogger (offline), as the example runs it
    suite_options: dict[str, Any] = field(default_factory=dict)  # e.g. the components ``--without`` leaves out


def _mlp_22_steps() -> tuple[pl.LightningModule, Any, Any]:
    from lightning_debug.demos.digits import DigitsMLP, loaders

    train, val = loaders(batch_size=32, n_train=700)  # 22 steps per epoch
    return DigitsMLP(hidden=(128,), lr=3e-3), train, val


WHOLE_RUNS = {
    "quickstart": WholeRun("quickstart", _mlp, epochs=15, validation=True, wandb=True),  # examples/quickstart.py
    "no_val_22": WholeRun("no_val_22", _mlp_22_steps, epochs=15, validation=False),
}


def _fit_seconds(
    run: WholeRun, epochs: int, with_suite: bool, root: str, profiler: Any = None, clock: PhaseClock | None = None
) -> tuple[float, float]:
    """Wall and CPU seconds of ``Trainer.fit`` (CPU time of this process: on a shared machine the other
    processes' load inflates wall time, not CPU time); ``clock`` goes first on the trainer."""
    pl.seed_everything(0, verbose=False)
    module, train, val = run.build()
    # early stopping's hooks all run, but its patience never ends the run: both runs train the same epochs
    options = {"report": {"print_table": False}, "early_stopping": {"patience": 10**9}, **run.suite_options}
    callbacks: list[Callback] = [clock] if clock is not None else []
    callbacks += debug_callbacks(metric="val_acc", **options) if with_suite else []
    logger: Any = False
    if run.wandb:
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(project="lightning-debug-overhead", save_dir=root, offline=True)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
        profiler=profiler,
        limit_val_batches=None if run.validation else 0,
    )
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, train, val if run.validation else None)
    if run.wandb:
        import wandb

        wandb.finish()  # the run's files are flushed inside the timed span, as the example does
    if clock is not None:
        clock.switch("end")
    return time.perf_counter() - start, time.process_time() - cpu


class PhaseClock(Callback):
    """Wall time of ``Trainer.fit``'s phases, switched at Lightning's hooks (first on the trainer, so each phase
    holds the other callbacks' hooks that follow its switch): ``start`` (to the first batch), ``steps`` (the
    training batches and what runs between them), ``validation`` (its start to its end, sanity check excluded),
    ``epoch end`` (from a validation's end to the next batch: the hooks after it, the epoch's end) and ``end``
    (the end of training, of fit, and the logger's flush)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._phase, self._since = "start", time.perf_counter()

    def switch(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[self._phase] = self.seconds.get(self._phase, 0.0) + now - self._since
        self._phase, self._since = phase, now

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if self._phase != "steps":
            self.switch("steps")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.switch("validation")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.switch("epoch end")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.switch("epoch end")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.switch("end")


def _arms(reps: int) -> list[bool]:
    """The order of ``reps`` bare (False) / suite (True) pairs of whole runs: bare first, then suite first, and so
    on, so that what a run leaves to the next (its garbage, the logger's files) falls on both arms alike. With
    bare always first the null run (every component left out) measured 0.976x (0.965-0.994, 3 pairs);
    alternating, 0.998x (0.982-1.019, 4 pairs)."""
    return [arm for i in range(reps) for arm in ((False, True) if i % 2 == 0 else (True, False))]


def whole_run_phases(run: WholeRun, epochs: int, reps: int, root: str) -> dict[str, Any]:
    """Where the suite's extra whole-run time goes: :class:`PhaseClock`'s phases, suite against bare in
    alternating runs; medians over ``reps`` pairs, in ms per epoch (and ms once for ``start`` and ``end``)."""
    torch.set_num_threads(1)
    _fit_seconds(run, 1, False, root)  # warm-up
    _fit_seconds(run, 1, True, root)
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for with_suite in _arms(reps):
        clock = PhaseClock()
        _fit_seconds(run, epochs, with_suite, root, clock=clock)
        runs[with_suite].append(clock.seconds)
    phases = {}
    for name in ("start", "steps", "validation", "epoch end", "end"):
        once = name in ("start", "end")
        per = 1 if once else epochs
        bare, suite = (1e3 / per * statistics.median(r.get(name, 0.0) for r in runs[w]) for w in (False, True))
        phases[name] = {
            "bare_ms": bare,
            "suite_ms": suite,
            "extra_ms": suite - bare,
            "per": "run" if once else "epoch",
        }
    return {"run": run.name, "epochs": epochs, "reps": reps, "phases": phases}


def _costliest_hooks(run: WholeRun, epochs: int, root: str, top: int = 5) -> list[tuple[str, float]]:
    """The suite's hooks with the largest total time in one profiled suite run (seconds)."""
    from lightning.pytorch.profilers import SimpleProfiler

    profiler = SimpleProfiler(dirpath=root, filename="whole_run_profile")
    _fit_seconds(run, epochs, True, root, profiler=profiler)
    suite = {type(cb).__name__ for cb in debug_callbacks(metric="val_acc")}
    totals = {
        key.removeprefix("[Callback]"): sum(times)
        for key, times in profiler.recorded_durations.items()
        if key.startswith("[Callback]") and key.removeprefix("[Callback]").split("{")[0].split(".")[0] in suite
    }
    return sorted(totals.items(), key=lambda kv: -kv[1])[:top]


def whole_run(run: WholeRun, reps: int, root: str, seconds: float | None = None) -> dict[str, Any]:
    """``Trainer.fit`` wall time with the suite over without, alternating bare/suite runs ``reps`` times."""
    torch.set_num_threads(1)
    _fit_seconds(run, 1, False, root)  # warm-up: imports, allocator, data caches
    epochs = run.epochs
    if seconds is not None:
        epochs = max(1, round(seconds / _fit_seconds(run, 1, False, root)[0]))
    timed: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for with_suite in _arms(reps):
        timed[with_suite].append(_fit_seconds(run, epochs, with_suite, root))
    bare, suite = timed[False], timed[True]
    wall = {"bare": [b[0] for b in bare], "suite": [s[0] for s in suite]}
    cpu = {"bare": [b[1] for b in bare], "suite": [s[1] for s in suite]}
    return {
        "run": run.name,
        "without": [name for name, option in run.suite_options.items() if option is False],
        "epochs": epochs,
        "validation": run.validation,
        "bare_seconds": statistics.median(wall["bare"]),
        "suite_seconds": statistics.median(wall["suite"]),
        "ratio": statistics.median(wall["suite"]) / statistics.median(wall["bare"]),
        "ratios": [s / b for b, s in zip(wall["bare"], wall["suite"], strict=True)],
        "cpu_ratio": statistics.median(cpu["suite"]) / statistics.median(cpu["bare"]),
        "cpu_ratios": [s / b for b, s in zip(cpu["bare"], cpu["suite"], strict=True)],
        "costliest_hooks": _costliest_hooks(run, epochs, root),
    }


# ErrorAnalysis on the runs of examples/quickstart.py and examples/transformer_lm.py, with their W&B offline logger.
ERRORS_RUNS: dict[str, dict[str, Any]] = {
    "quickstart": {"case": "mlp", "trainer": {"max_epochs": 15}},
    "transformer_lm": {"case": "gpt2", "trainer": {"max_steps": 300, "max_epochs": -1, "val_check_interval": 50}},
}


class ValidationClock(Callback):
    """Wall time of each validation loop (``on_validation_start`` to ``on_validation_end``: every callback's
    validation hooks included), sanity check excluded."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.seconds.append(time.perf_counter() - self._start)


def errors_run(name: str, root: str, options: dict[str, Any] | None) -> tuple[float, dict[str, float]]:
    """One run of an example (same model, data, schedule and W&B offline logger, no other callback): its total
    validation time, and ErrorAnalysis' ``cost`` (``options`` None: without ErrorAnalysis)."""
    from lightning.pytorch.loggers import WandbLogger

    from lightning_debug.callbacks.errors import ErrorAnalysis

    spec = ERRORS_RUNS[name]
    case = CASES[spec["case"]]
    threads = torch.get_num_threads()
    if case.threads is not None:
        torch.set_num_threads(case.threads)
    try:
        pl.seed_everything(0, verbose=False)
        module, train, val = case.build()
        clock = ValidationClock()
        analysis = None if options is None else ErrorAnalysis(verbose=False, **options)
        logger = WandbLogger(project="lightning-debug-overhead-errors", save_dir=root, offline=True)
        trainer = pl.Trainer(
            accelerator="cpu",
            logger=logger,
            callbacks=[clock] + ([analysis] if analysis else []),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=root,
            **spec["trainer"],
        )
        trainer.fit(module, train, val)
        import wandb

        wandb.finish()
    finally:
        torch.set_num_threads(threads)
    return sum(clock.seconds), dict(analysis.cost) if analysis else {}


def errors_share(name: str, root: str, reps: int, **options: Any) -> dict[str, Any]:
    """ErrorAnalysis against the same run without it, alternating ``reps`` times in one process (after one
    untimed warm-up run): ``own_share`` is the callback's own time (its hooks, timed inside it) over the bare
    run's validation time; ``side_by_side`` is (validation time with it) / (without it) - 1, which also holds
    what the hooks' timing misses (dispatch, garbage collection, the W&B logger's work); ``own_loop_share`` is
    the callback's own time over the validation loop alone (first to last batch, Lightning's end-of-validation
    logging excluded: the smaller denominator). Medians and per-rep."""
    errors_run(name, root, None)
    bare, runs = [], []
    for _ in range(reps):
        bare.append(errors_run(name, root, None)[0])
        runs.append(errors_run(name, root, options))
    own = [c["seconds"] / b for b, (_, c) in zip(bare, runs, strict=True)]
    side = [v / b - 1 for b, (v, _) in zip(bare, runs, strict=True)]
    loop = [c["seconds"] / c["validation_seconds"] for _, c in runs]  # over the loop alone (epoch start to end)
    cost = runs[-1][1]
    return {
        "example": name,
        "options": options,
        "reps": reps,
        "evaluations": cost["evaluations"],
        "analysed": [c["analysed"] for _, c in runs],
        "published": [c["published"] for _, c in runs],
        "bare_validation_seconds": bare,
        "own_share": statistics.median(own),
        "own_shares": own,
        "own_loop_share": statistics.median(loop),
        "own_loop_shares": loop,
        "side_by_side": statistics.median(side),
        "side_by_sides": side,
        "analysis_seconds": [
            (c["seconds"] - c["publish_seconds"]) / c["analysed"] if c["analysed"] else 0.0 for _, c in runs
        ],
        "publish_seconds": [c["publish_seconds"] / c["published"] if c["published"] else 0.0 for _, c in runs],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--root", default="out/overhead")
    parser.add_argument("--json")
    parser.add_argument("--examples", action="store_true", help="also time a one-epoch run of each example")
    parser.add_argument("--whole-run", choices=sorted(WHOLE_RUNS), action="append", help="whole-run cost only")
    parser.add_argument("--whole-seconds", type=float, help="scale the whole runs' epochs to about this long")
    parser.add_argument("--phases", type=int, metavar="EPOCHS", help="with --whole-run: where the extra time goes")
    parser.add_argument("--health", action="store_true", help="only ModelHealthCheck's startup and periodic cost")
    parser.add_argument("--hook-dispatch-us", type=float, default=1.5, help="Lightning's dispatch per step")
    parser.add_argument("--errors", action="store_true", help="only ErrorAnalysis' share of validation time")
    parser.add_argument(
        "--without",
        choices=SUITE_COMPONENTS,
        action="append",
        default=[],
        help="leave this suite component out (per-step and whole-run modes; every one of them: the null ratio)",
    )
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    left_out = dict.fromkeys(args.without, False)
    if args.without:
        print(f"the suite without {', '.join(args.without)}")
    if args.whole_run:
        whole_runs = [replace(WHOLE_RUNS[name], suite_options=left_out) for name in args.whole_run]
        return {"whole_runs": _print_whole_runs(args, whole_runs)}
    cases = {name: replace(case, suite_options={**case.suite_options, **left_out}) for name, case in CASES.items()}
    if args.health:
        health = [health_cost(cases[name], args.reps, args.root) for name in args.case or sorted(cases)]
        for h in health:
            dispatch = args.hook_dispatch_us * 1e-3 / h["bare_ms_per_step"]
            print(
                f"{h['case']:>10} ModelHealthCheck: startup (the first step's extra time) "
                f"{1e3 * h['startup_seconds']:.1f} ms = {100 * h['startup_epoch_ratio']:.1f}% of one bare epoch "
                f"({h['bare_epoch_seconds']:.3f} s; reps "
                + ", ".join(f"{100 * x:.1f}%" for x in h["startup_epoch_ratios"])
                + f"; {1e3 * h['startup_hook_seconds']:.1f} ms in its hooks); periodic "
                f"{100 * h['periodic_step_share']:.2f}% of a {h['bare_ms_per_step']:.2f} ms step in its hooks "
                f"(+{100 * dispatch:.2f}% hook dispatch; reps "
                + ", ".join(f"{100 * x:.2f}%" for x in h["periodic_step_shares"])
                + f"), CPU time {100 * h['periodic_cpu_share']:.2f}% (reps "
                + ", ".join(f"{100 * x:.2f}%" for x in h["periodic_cpu_shares"])
                + f"); end of fit {1e3 * h['end_seconds']:.0f} ms"
            )
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"health": health}, fh, indent=2)
        return {"health": health}
    if args.errors:
        return {"errors": errors_report(args.root, args.reps, args.json)}
    results = [measure(cases[name], args.reps, args.root) for name in args.case or sorted(cases)]
    for r in results:
        print(
            f"{r['case']:>6}: step ratio {r['step_ratio']:.3f} ({', '.join(f'{x:.3f}' for x in r['step_ratios'])}), "
            f"mean {r['step_mean_ratio']:.3f} ({', '.join(f'{x:.3f}' for x in r['step_mean_ratios'])}); "
            f"separate runs {r['separate_runs_step_ratio']:.3f} (bare {r['bare_ms_per_step']:.2f} ms/step, "
            f"suite {r['suite_ms_per_step']:.2f}); epoch ratio {r['epoch_ratio']:.3f} (bare epoch "
            f"{r['bare_epoch_seconds']:.2f} s); startup {r['startup_seconds']:.2f} s = "
            f"{100 * r['startup_ratio']:.1f}% of one epoch"
        )
        for name, c in r["checks"].items():
            print(
                f"{'':>8}{name}: {c['seconds']:.3f} s = {100 * c['epoch_ratio']:.1f}% of one epoch, "
                f"{100 * c['one_epoch_run_ratio']:.1f}% of a one-epoch run ({r['one_epoch_run_seconds']:.2f} s)"
            )
        for name in r["deferred"]:
            print(f"{'':>8}{name}: deferred until the loss stalls (nothing at start)")
    examples = [example_run(name, args.root) for name in EXAMPLE_RUNS] if args.examples else []
    for e in examples:
        shares = ", ".join(
            f"{name} {c['seconds']:.3f} s = {100 * c['run_ratio']:.1f}%" for name, c in e["checks"].items()
        )
        print(f"{e['example']}: one-epoch run {e['run_seconds']:.1f} s; {shares}")
    out = {"cases": results, "examples": examples, "without": args.without}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


def _print_whole_runs(args: argparse.Namespace, runs: list[WholeRun]) -> list[dict[str, Any]]:
    if args.phases:
        key = "phases"
        results = [whole_run_phases(run, args.phases, args.reps, args.root) for run in runs]
        for r in results:
            print(f"{r['run']}: {r['epochs']} epochs, medians of {r['reps']} pairs (suite - bare)")
            for name, p in r["phases"].items():
                print(
                    f"  {name:>10}: bare {p['bare_ms']:7.2f} ms, suite {p['suite_ms']:7.2f} ms, "
                    f"extra {p['extra_ms']:+6.2f} ms per {p['per']}"
                )
    else:
        key = "whole_runs"
        results = [whole_run(run, args.reps, args.root, args.whole_seconds) for run in runs]
        for r in results:
            hooks = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in r["costliest_hooks"])
            print(
                f"{r['run']}: whole run {r['ratio']:.3f}x wall ({', '.join(f'{x:.3f}' for x in r['ratios'])}), "
                f"{r['cpu_ratio']:.3f}x CPU ({', '.join(f'{x:.3f}' for x in r['cpu_ratios'])}); bare "
                f"{r['bare_seconds']:.1f} s, suite {r['suite_seconds']:.1f} s, {r['epochs']} epochs"
                f"{'' if r['validation'] else ', no validation'}; costliest suite hooks: {hooks}"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({key: results}, fh, indent=2)
    return results


def errors_report(root: str, reps: int, json_path: str | None) -> list[dict[str, Any]]:
    """Default budget and every evaluation (``budget=None``), on both example runs."""
    results = [
        errors_share(name, f"{root}/errors-{name}-{label}", reps, **options)
        for name in ERRORS_RUNS
        for label, options in (("default", {}), ("every", {"budget": None}))
    ]
    for r in results:
        mode = "every evaluation" if r["options"] else "default budget 2%"

        def spread(xs: list[float]) -> str:
            return ", ".join(f"{100 * x:+.1f}%" for x in xs)

        print(
            f"ErrorAnalysis on {r['example']} ({mode}), {r['reps']} reps: analysed {r['analysed']}, published "
            f"{r['published']} of {r['evaluations']} evaluations; own time {100 * r['own_share']:.1f}% of the bare "
            f"validation time ({spread(r['own_shares'])}), {100 * r['own_loop_share']:.1f}% of the validation loop "
            f"alone ({spread(r['own_loop_shares'])}); side by side {100 * r['side_by_side']:+.1f}% "
            f"({spread(r['side_by_sides'])}); bare validation "
            + ", ".join(f"{s:.2f}" for s in r["bare_validation_seconds"])
            + " s; per analysis "
            + ", ".join(f"{1e3 * s:.1f}" for s in r["analysis_seconds"])
            + " ms, per publication "
            + ", ".join(f"{1e3 * s:.1f}" for s in r["publish_seconds"])
            + " ms"
        )
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
