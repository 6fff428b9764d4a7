"""``ModelHealthCheck``: name the cause when the loss does not move (parameters, gradients, initialisation).

From the run's own first training step, watched while it runs (``health_probes.FirstStep``: no extra forward or
backward):
``setup.params_not_in_optimizer`` / ``setup.optimizer_params_unused`` (gradient receivers vs param groups),
``init.loss_off_chance`` (a C-class cross-entropy at init vs ``ln C``), ``init.dead_units`` /
``init.saturated_units`` (ReLU/tanh/sigmoid outputs per layer). During training, every ``sample_every_n_steps``
optimizer steps, gradient norms before clipping and one-step updates go to device tensors
(``health_probes.GradientSampler``); every ``check_every_n_steps`` steps they are pulled in one transfer, logged
under ``debug/grad/<layer>/`` and judged (``grad.vanishing``, ``grad.exploding``, ``grad.update_ratio``,
``grad.clipping_always``); both twice as often during the first ``check_every_n_steps``. Under sharded
parameters (FSDP, DeepSpeed) nothing is gathered: ``check.skipped``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_debug import health_words as words
from lightning_debug.base import DebugCallback
from lightning_debug.health_probes import FirstStep, GradientSampler, StartupEvidence, columns, optimized, unscaled_loss
from lightning_debug.health_probes import sharded as sharding_strategy
from lightning_debug.rules import health as rules
from lightning_debug.rules.loss import declared_label_smoothing, label_smoothing_floor
from lightning_debug.signals import global_step_counter
from lightning_debug.sinks import Sink
from lightning_debug.stats import median

if TYPE_CHECKING:
    import lightning.pytorch as pl

PREFIX = "debug/grad/"
MAX_HISTORY = 4096  # sampled steps kept on the host (for the heat map and the exploding rule); older are thinned


class ModelHealthCheck(DebugCallback):
    """Parameters, gradients and initialisation: the causes behind a loss that does not move.

    Args:
        sample_every_n_steps: optimizer steps between gradient / update samples (the only steps that do work);
            half that during the first ``check_every_n_steps`` steps, when most faults show.
        check_every_n_steps: optimizer steps between pulls of the samples to the host (one transfer) and
            verdicts (half that at first: a check comes every ``check_every_n_steps / sample_every_n_steps``
            samples); at least ``MIN_SAMPLES`` times ``sample_every_n_steps``.
        startup: run the one-batch startup checks at the start of fit.
    """

    def __init__(
        self,
        *,
        sample_every_n_steps: int = 20,
        check_every_n_steps: int = 200,
        startup: bool = True,
        strict: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__(strict=strict, verbose=verbose)
        if sample_every_n_steps < 1:
            raise ValueError(f"`sample_every_n_steps` must be >= 1, got {sample_every_n_steps}")
        if check_every_n_steps < sample_every_n_steps * rules.MIN_SAMPLES:
            raise ValueError(
                f"`check_every_n_steps` must be >= {rules.MIN_SAMPLES} * sample_every_n_steps "
                f"(= {rules.MIN_SAMPLES * sample_every_n_steps}) so a check sees enough samples, "
                f"got {check_every_n_steps}"
            )
        self.sample_every_n_steps = sample_every_n_steps
        self.check_every_n_steps = check_every_n_steps
        self.startup = startup
        self.startup_done = False
        self.startup_seconds = math.nan
        self.disabled: str | None = None
        self.evidence: dict[str, Any] = {}  # startup measurements, findings or not (for threshold studies)
        self.sampler: GradientSampler | None = None
        self.history: dict[str, list[Any]] = {k: [] for k in ("step", "lr", "row", "total", "loss")}  # pulled samples
        self.checked = 0  # history entries already judged
        self.peak_lr = 0.0
        self._step_counter: Any = None  # its `completed` is trainer.global_step, once training started
        self._floor = 0.0  # the loss's lowest reachable value: a declared label smoothing's, else 0
        self._first: FirstStep | None = None  # the first step, while it is watched

    @property
    def layers(self) -> list[str]:
        """Modules with trainable parameters, input to output (known from the start of fit)."""
        return self.sampler.layers if self.sampler is not None else []

    def _say(self, trainer: pl.Trainer, found: list[words.Words]) -> None:
        for w in found:
            self.emit(trainer, w.check, w.message, data=w.data, key=w.key)

    # ------------------------------------------------------------------ startup: the first step, watched
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = sharding_strategy(trainer)
        if strategy is not None:
            self.disabled = f"parameters are sharded by {strategy}; gathering them would cost a full copy per check"
            self.emit(trainer, "check.skipped", f"ModelHealthCheck: {self.disabled}.", data={"reason": self.disabled})
            return
        self.sampler = GradientSampler(pl_module, trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
        smoothing = declared_label_smoothing(pl_module)
        self._floor = label_smoothing_floor(*smoothing) if smoothing else 0.0
        self._step_counter = global_step_counter(trainer)
        if self.startup and not self.startup_done and trainer.global_rank == 0:
            self.startup_seconds = 0.0
            # hooks dispatched for the first step only (instance attributes over the class's ``None``)
            self.on_train_batch_start = self.on_first_batch_start  # type: ignore[method-assign,assignment]

    def on_first_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        """Watch this step: activations during its forward, its loss, its gradients."""
        began = time.perf_counter()
        del self.on_train_batch_start
        assert self.sampler is not None
        self._first = FirstStep(pl_module, self.sampler.params, batch)
        self.on_before_backward = self.on_first_before_backward  # type: ignore[method-assign]
        self.on_after_backward = self.on_first_after_backward  # type: ignore[method-assign]
        self.startup_seconds += time.perf_counter() - began

    def on_first_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        began = time.perf_counter()
        del self.on_before_backward
        if self._first is not None:
            self._first.forward_done(unscaled_loss(trainer, pl_module, loss))
        self.startup_seconds += time.perf_counter() - began

    def on_first_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Automatic optimization: judged now (step 0). Manual: every backward of the step counts, judged at
        its end (a GAN's second loss gives other parameters their gradients)."""
        began = time.perf_counter()
        if self._first is not None:
            self._first.backward_done()
            if pl_module.automatic_optimization:
                self._end_startup(trainer)
        self.startup_seconds += time.perf_counter() - began

    def _stop_watching(self) -> FirstStep | None:
        """The first step's evidence, its probe closed and its hooks gone (``None`` if none is watched)."""
        first, self._first = self._first, None
        for hook in ("on_train_batch_start", "on_before_backward", "on_after_backward"):
            self.__dict__.pop(hook, None)
        if first is not None:
            first.close()
        return first

    def _end_startup(self, trainer: pl.Trainer) -> None:
        """Judge the first step's evidence (or say why there is none) and stop watching."""
        first = self._stop_watching()
        if first is None:
            return
        self.startup_done = True
        if not first.backwards:
            why = "the first training step ran no backward through Lightning (`manual_backward`), so it shows nothing"
            self.emit(trainer, "check.skipped", f"ModelHealthCheck startup: {why}.", data={"reason": why})
            return
        self._startup(trainer, trainer.lightning_module, first.evidence())

    def _startup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, seen: StartupEvidence) -> None:
        self._say(trainer, words.coverage(rules.optimizer_coverage(seen.with_grad, optimized(trainer, pl_module))))
        self.evidence["units"] = {u.layer: u.share for u in seen.units}
        if seen.logits is not None and seen.class_counts is not None:
            verdict = rules.init_loss(seen.loss, seen.logits, seen.class_counts)
            self.evidence["init_gap"] = verdict.gap
            self._say(trainer, words.init_loss(verdict, self.layers[-1] if self.layers else None))
        self._say(trainer, words.units(rules.unit_health(seen.units), seen.units, self.layers))

    # ------------------------------------------------------------------ periodic: device only
    @property
    def on_before_optimizer_step(self) -> Callable[..., None] | None:  # type: ignore[override]
        """Lightning's hook, there only on the sampled steps (every ``sample_every_n_steps``-th optimizer step,
        while no sample waits for its update): ``None`` (not dispatched) on the others."""
        sampler, counter = self.sampler, self._step_counter
        if sampler is None or sampler.waiting is not None:
            return None
        if counter is None:
            return self.on_before_optimizer_step_due
        step = counter.completed
        return self.on_before_optimizer_step_due if step % self._interval(step) == 0 else None

    def _interval(self, step: int) -> int:
        """Steps between samples at ``step``: half ``sample_every_n_steps`` during the first check interval (a
        young run is where NaNs and explosions come, and a run stopped after 50 steps still has the samples a
        verdict needs), ``sample_every_n_steps`` after it."""
        every = self.sample_every_n_steps
        return max(1, every // 2) if step < self.check_every_n_steps else every

    def on_before_optimizer_step_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Samples this optimizer step: norms and a snapshot before it, the update after it."""
        step = trainer.global_step
        if self.sampler is None or step % self._interval(step):
            return
        lr = optimizer.param_groups[0]["lr"]
        lr = float(lr) if not isinstance(lr, torch.Tensor) else math.nan
        if self.sampler.before_step(step, lr):
            self.peak_lr = max(self.peak_lr, lr) if math.isfinite(lr) else self.peak_lr

    @property
    def on_train_batch_end(self) -> Callable[..., None] | None:  # type: ignore[override]
        """Lightning's hook, there only while a sampled step waits for its update or the first step is watched:
        ``None`` (not dispatched) on the other steps, whose dispatch alone would cost ~2.5 us each."""
        sampler = self.sampler
        due = sampler is not None and sampler.waiting is not None
        return self.on_train_batch_end_due if due or self._first is not None else None

    def on_train_batch_end_due(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._first is not None:
            began = time.perf_counter()
            self._end_startup(trainer)
            self.startup_seconds += time.perf_counter() - began
        sampler = self.sampler
        if sampler is None or sampler.waiting is None or trainer.global_step == sampler.waiting.step:
            return  # the sampled step's optimizer step has not run yet (gradient accumulation)
        sampler.after_step(outputs.get("loss") if isinstance(outputs, Mapping) else outputs)
        unchecked = len(self.history["step"]) - self.checked + len(sampler.pending)
        if rules.check_due(unchecked, self.sample_every_n_steps, self.check_every_n_steps):
            self._check(trainer)

    # ------------------------------------------------------------------ every check: one transfer
    def _pull(self) -> None:
        if self.sampler is None:
            return
        steps, lrs, rows = self.sampler.pull()
        n = len(self.layers)
        self.history["step"] += steps
        self.history["lr"] += lrs
        self.history["row"] += rows.tolist()
        self.history["total"] += rows[:, n].tolist()
        self.history["loss"] += rows[:, -1].tolist()

    def _check(self, trainer: pl.Trainer, final: bool = False) -> None:
        """Judge and log the samples since the last check; ``final``: the end of fit (a partial window, logged at
        the trainer's step, after any checkpoint of this run)."""
        self._pull()
        end = len(self.history["step"])
        if end - self.checked >= rules.MIN_SAMPLES:
            steps = self.history["step"][self.checked : end]
            w = columns(np.asarray(self.history["row"][self.checked : end]), len(self.layers))
            w["lr"] = np.asarray(self.history["lr"][self.checked : end])
            # a window's point at its end (the step after its last sample's): loss checks and samples land there
            self._log(trainer, trainer.global_step if final else steps[-1] + self._interval(steps[-1]), w)
            assert self.sampler is not None
            run = {k: np.asarray(self.history[k]) for k in ("total", "loss")}
            clip = trainer.gradient_clip_val
            verdict = rules.judge_gradients(
                w, run, self.layers, self.sampler.numel, self.sampler.sparse, self.peak_lr, bool(clip), self._floor
            )
            self._say(trainer, words.gradients(verdict, steps, w["total"], clip))
            if not final:  # windows stay aligned to the run's start, whether or not a checkpoint follows
                self.checked = end
        if end > MAX_HISTORY:  # thin the older half; memory and state stay bounded
            for k, v in self.history.items():
                self.history[k] = v[: end // 2 : 2] + v[end // 2 :]
            self.checked = len(self.history["step"])

    def _log(self, trainer: pl.Trainer, step: int, w: dict[str, np.ndarray]) -> None:
        """One point per check and series: the window's medians (every sample is in the end-of-fit table)."""
        if not trainer.loggers:
            return
        norm, ratio = rules.column_medians(w["norm"]), rules.column_medians(w["ratio"])
        metrics = {f"{PREFIX}{layer}/norm": norm[j] for j, layer in enumerate(self.layers)}
        metrics.update({f"{PREFIX}{layer}/update_ratio": ratio[j] for j, layer in enumerate(self.layers)})
        metrics[PREFIX + "global_norm"] = median(w["total"])
        if trainer.gradient_clip_val:
            metrics[PREFIX + "clip_active"] = np.mean(w["clip"])
        Sink(trainer).log_scalars({k: float(v) for k, v in metrics.items() if math.isfinite(v)}, step=step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sampler is None:
            return
        self._check(trainer, final=True)
        if not self.history["step"] or trainer.global_rank != 0:
            return
        c = columns(np.asarray(self.history["row"]), len(self.layers))
        steps = self.history["step"]
        sink = Sink(trainer)
        sink.log_table(
            PREFIX + "table",
            ["step", "layer", "grad_norm", "update_ratio"],
            [
                [s, layer, c["norm"][i, j], c["ratio"][i, j]]
                for i, s in enumerate(steps)
                for j, layer in enumerate(self.layers)
            ],
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            panels = {"log10 gradient norm": np.log10(c["norm"].T), "log10 update / weight": np.log10(c["ratio"].T)}
        sink.log_heatmap(PREFIX + "heatmap", panels, self.layers, steps)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_watching()  # a step that raised inside its forward leaves no mode or hook behind
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_watching()
        super().teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Plain types only (``torch.load(weights_only=True)``). Samples not yet pulled are pulled now (one
        transfer per checkpoint), so a resumed run checks and logs at the same steps as an uninterrupted one."""
        self._pull()
        return {
            **super().state_dict(),
            "startup_done": self.startup_done,
            "history": self.history,
            "checked": self.checked,
            "peak_lr": self.peak_lr,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.startup_done = bool(state_dict.get("startup_done", False))
        self.history = {k: list(v) for k, v in state_dict.get("history", self.history).items()}
        self.checked = int(state_dict.get("checked", 0))
        self.peak_lr = float(state_dict.get("peak_lr", 0.0))
