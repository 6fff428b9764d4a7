"""``LossConvergenceMonitor``: is the training loss going down, and towards a good value?

The debugging lecture's first rule: before looking at dev accuracy, look at the training loss. This adapter
keeps the loss of every step on its own device (no host-device sync), pulls it to the host at a few probes
and checks, bins it (medians of a few steps) and asks the rules of :mod:`lightning_debug.rules.loss` for a
verdict, which it words and emits:

``loss.nonfinite``, ``loss.diverging`` (a jump that stays up, or a significant rise), ``loss.not_decreasing``,
``loss.plateau``, ``loss.converged`` and, at the end, ``loss.still_decreasing``. Intervals scale with the
planned run, and every run of at least 30 batches ends with a verdict (at the end of fit, an early stop,
``max_steps`` or an interruption). Every finding names its floor and where it comes from
(:func:`~lightning_debug.rules.loss.choose_floor`), and cites a model-health finding (``setup.*``, ``init.*``,
``grad.*``) that explains it. Collection: :mod:`lightning_debug.loss_series`; wording:
:mod:`lightning_debug.wording.loss`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_debug.base import DebugCallback
from lightning_debug.findings import Finding
from lightning_debug.loss_series import LossRecorder, Rows, Unreadable, first_param_group, step_values
from lightning_debug.rules import loss as rules
from lightning_debug.signals import global_step_counter
from lightning_debug.sinks import Sink
from lightning_debug.wording import loss as words

if TYPE_CHECKING:
    import lightning.pytorch as pl

EXPLAINING_PREFIXES = ("setup.", "init.", "grad.")  # model-health findings that explain a loss finding


class LossConvergenceMonitor(DebugCallback, LossRecorder):
    """Watches the training loss for NaN/Inf, divergence, no progress, plateaus and convergence.

    Zero-config: it reads the loss ``training_step`` returns and the ``val_loss`` the module logs (if any).

    Args:
        key: read this logged metric (from ``trainer.callback_metrics``) instead of the returned loss.
        components: ``{name: logged_key}`` of loss parts to track too; a total that is flat while a component
            still falls significantly is not called a plateau (regularisation keeps the total up).
        floor: the best achievable loss. ``None`` (default): from evidence, see :func:`rules.choose_floor`.
        val_key: the logged validation loss; where train and validation agree at a flat level, that level is
            the data's floor (irreducible entropy), not a plateau.
        check_every_n_steps / warmup_steps: ``None`` scales them to the planned run (a tenth of it, 20-200 and
            30-200 batches); an int fixes them.
        window: batches the trend is fitted over; ``None`` uses the last half of the batches seen.
        min_drop, min_progress, plateau_level, converged_level, diverge_margin, confidence: see
            :class:`rules.LossRules` (fractions of the starting gap, first loss minus floor).
        diverge_factor: a level this many times further from the floor than the best level diverges.
    """

    def __init__(
        self,
        *,
        key: str | None = None,
        components: Mapping[str, str] | None = None,
        floor: float | None = None,
        val_key: str = "val_loss",
        check_every_n_steps: int | None = None,
        window: int | None = None,
        warmup_steps: int | None = None,
        min_drop: float = 0.1,
        min_progress: float = 0.2,
        plateau_level: float = 0.2,
        converged_level: float = 0.05,
        diverge_factor: float = 3.0,
        diverge_margin: float = 0.25,
        confidence: float = 0.95,
        raise_errors: bool = False,
        print_findings: bool = True,
        strict: bool | None = None,
        verbose: bool | None = None,
    ) -> None:
        super().__init__(raise_errors=raise_errors, print_findings=print_findings, strict=strict, verbose=verbose)
        rules.validate_arguments(floor, check_every_n_steps, window, warmup_steps, diverge_factor, components)
        self.rules = rules.LossRules(  # validates the thresholds
            min_drop=min_drop, min_progress=min_progress, plateau_level=plateau_level,
            converged_level=converged_level, diverge_margin=diverge_margin, confidence=confidence,
        )  # fmt: skip
        self.key = key
        self.components = dict(components or {})
        self._logged_keys = ([key] if key is not None else []) + list(self.components.values())  # read every step
        self.floor = floor
        self.val_key = val_key
        self.check_every_n_steps = check_every_n_steps
        self.window = window
        self.warmup_steps = warmup_steps
        self.diverge_factor = diverge_factor
        self._init_recorder([key or "loss", *self.components], check_every_n_steps, warmup_steps)
        self.plateau_checks = 0  # consecutive checks at which the plateau condition held
        self.logged_step = -1  # the global step of the last logged point (-1: none yet)
        self.smoothing: tuple[int, float] | None = None  # (classes, eps) of declared label smoothing
        self.finished = False  # the final verdict was given

    @functools.cached_property
    def state_key(self) -> str:
        return self._generate_state_key(key=self.key, components=sorted(self.components.items()))  # built once

    # ------------------------------------------------------------------ per step: device only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        Sink(trainer).define_metric("debug/loss/smoothed", summary="min,last")
        self.smoothing = rules.declared_label_smoothing(pl_module)
        self.finished = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step_counter = global_step_counter(trainer)
        self._lr_group = first_param_group(trainer)
        self._step = trainer.global_step  # after a resume has restored it
        self._plan(trainer, self.check_every_n_steps, self.warmup_steps)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        counter = self._step_counter
        now = counter.completed if counter is not None else trainer.global_step
        step, self._step = self._step, now  # the step training_step saw; the next batch sees this
        loss = outputs.get("loss") if type(outputs) is dict else None
        if (  # the usual case inline, not in step_values: the call costs ~2.5 us here, a third of the hook
            type(loss) is torch.Tensor
            and not self._logged_keys
            and trainer.accumulate_grad_batches == 1
            and not loss.requires_grad
            and loss.dim() == 0
        ):
            values = loss
        else:
            try:
                values = step_values(trainer, pl_module, outputs, self.key, self._logged_keys)
            except Unreadable as why:
                self.skip(trainer, str(why), key=why.key)
                return
        group = self._lr_group
        self._record(values, step, group.get("lr") if group is not None else None)
        every = self.schedule.check_every
        if self.batches % every == 0:
            self._check(trainer)
        elif self.batches < every and self.batches & (self.batches - 1) == 0:
            self._check(trainer, probe=True)

    # ------------------------------------------------------------------ checks: host
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read_validation(trainer, self.val_key)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """An interrupted run still gets its verdict (hooks of this kind are not guarded by the base class)."""
        try:
            self._finish(trainer)
        except Exception as err:
            if self.raise_errors:
                raise
            self.emit(trainer, "check.error", f"LossConvergenceMonitor.on_exception failed: {err!r}", key="exception")
        super().on_exception(trainer, pl_module, exception)

    def _finish(self, trainer: pl.Trainer) -> None:
        if not self.finished:
            self.finished = True
            self._check(trainer, final=True)

    def _check(self, trainer: pl.Trainer, *, probe: bool = False, final: bool = False) -> None:
        """The new rows: NaN/Inf, then a jump in their bins; at a check (not a probe), the trend verdict, and at the
        end always (the last periodic check may have taken every row)."""
        b = self.schedule.bin_steps
        rows = self._take_rows(b, final)
        if rows is not None:
            self._report_nonfinite(trainer, rows)
            if rows.binned:
                self._check_jump(trainer, rows.steps[rows.binned - 1], new=-(-rows.binned // b))
        if (rows is not None or final) and not probe and self.series[0].start is not None:
            self._evaluate(trainer, final)

    def _report_nonfinite(self, trainer: pl.Trainer, rows: Rows) -> None:
        """``loss.nonfinite`` for the first NaN/Inf of each series among rows not tested before."""
        for j, i in rules.first_nonfinite(rows.values, rows.fresh):
            name = self.series[j].name
            message, data = words.nonfinite(name, j == 0, rows.values[i, j], rows.steps[i], rows.first_batch + i + 1)
            self.emit(trainer, "loss.nonfinite", message, data=data, key=name)

    def _check_jump(self, trainer: pl.Trainer, step: int, new: int) -> None:
        if (total := self.series[0]).start is None:
            return
        floor, bins = self._floor(trainer), np.asarray(total.values)
        v = rules.assess_jump(
            bins, min(new, len(bins)), total.start, floor.value, bin_steps=self.schedule.bin_steps,
            factor=self.diverge_factor, margin=self.rules.diverge_margin,
        )  # fmt: skip
        if v.fired.any():
            message, data = words.jump_message(v, int(np.argmax(v.fired)), floor, total.start, step)
            self._emit_loss(trainer, "loss.diverging", message, floor, data)

    # ------------------------------------------------------------------ verdicts
    def _floor(self, trainer: pl.Trainer, with_val: bool = False) -> rules.Floor:
        """The floor from evidence; ``with_val``: also where train ~= validation (asked only of a flat loss)."""
        memorised = next((f.data.get("level") for f in self.findings_on(trainer, "loss.floor_high")), None)
        bins, start, val_level = (
            self.series[0].finite()[0],
            self.series[0].start,
            self.val_level if with_val else math.nan,
        )
        return rules.evidence_floor(self.floor, self.smoothing, memorised, bins, start, val_level)

    def _evaluate(self, trainer: pl.Trainer, final: bool) -> None:
        """Log the smoothed loss and components; the trend verdict (against the data's floor if flat above it)."""
        total = self.series[0]
        start: float = total.start  # type: ignore[assignment]
        bins, xs = total.finite()
        metrics = {"debug/loss/smoothed": float(rules.level_of(bins)) if len(bins) else math.nan}
        metrics.update({f"debug/loss/{s.name}": s.last() for s in self.series[1:]})
        span = self.window if self.window is not None else self.batches / 2
        lr, before = self._lr_at_check(trainer)
        warming = lr is not None and bool(rules.warming_up(lr, before))
        components = [s.finite(self.batches - span) for s in self.series[1:]]
        excused = rules.plateau_excused(lr, self.peak_lr, components, self.batches, self.rules)

        def assess(floor: rules.Floor) -> rules.LossVerdicts | None:
            return rules.assess_check(
                bins, xs, start, floor.value, self.batches, span, schedule=self.schedule, rules=self.rules,
                final=final, warming=warming, excused=excused, plateau_checks=self.plateau_checks,
            )  # fmt: skip

        floor = self._floor(trainer)
        v = assess(floor)
        if v is not None and int(v.plateau_checks) > 0:  # flat far above the floor: is it the data's?
            data_floor = self._floor(trainer, with_val=True)
            if data_floor.value > floor.value:
                floor, v = data_floor, assess(data_floor)
        if v is not None:
            self.plateau_checks, code = int(v.plateau_checks), int(v.code)
            metrics["debug/loss/slope"] = float(v.trend.slope)
            if code != rules.NONE:
                message = words.verdict_message(code, v, floor, start, span, self.batches)
                evidence = words.verdict_evidence(v, floor, start, span, self.batches, lr, self.peak_lr, self.rules)
                self._emit_loss(trainer, f"loss.{rules.VERDICTS[code]}", message, floor, evidence, final=final)
        step, every = trainer.global_step, getattr(trainer, "log_every_n_steps", 0)  # set by Lightning at init
        if final or self.logged_step < 0 or step - self.logged_step >= every:
            self.logged_step = step  # no denser than the trainer logs training metrics: each W&B row costs ~1 ms
            Sink(trainer).log_scalars({k: val for k, val in metrics.items() if math.isfinite(val)})

    def _emit_loss(
        self, trainer: pl.Trainer, check: str, message: str, floor: rules.Floor, data: dict, final: bool = True
    ) -> Finding:
        """Emit a loss finding naming its floor, citing model-health findings that explain it; a mid-run stall
        is provisional (:func:`~lightning_debug.rules.loss.provisional_stall`)."""
        provisional = rules.provisional_stall(
            check,
            final,
            self.watched_on(trainer, "startup.overfit_ok"),
            self.findings_on(trainer, "startup.cannot_overfit"),
        )
        explaining = [f for f in self.findings_on(trainer) if f.check.startswith(EXPLAINING_PREFIXES)]
        data = {**data, "floor": floor.value, "floor_source": floor.source}
        data["explained_by"] = [f.check for f in explaining]
        hint, key = words.explained_hint(check, explaining), self.series[0].name
        message += words.PROVISIONAL_STALL if provisional else ""
        return self.emit(
            trainer, check, message, data=data, hint=hint, key=key, severity="info" if provisional else None
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), **self._recorder_state(), "plateau_checks": self.plateau_checks}
        return {**state, "logged_step": self.logged_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._load_recorder_state(state_dict)
        self.plateau_checks = int(state_dict.get("plateau_checks", 0))
        self.logged_step = int(state_dict.get("logged_step", -1))
