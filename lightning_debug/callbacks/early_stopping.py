"""``MetricEarlyStopping``: Lightning's ``EarlyStopping`` plus what its users keep asking for.

A drop-in subclass: Lightning's arguments with Lightning's meaning, its hooks (``_run_early_stopping_check``,
``_evaluate_stopping_criteria``) called where Lightning calls them, so a subclass that overrides them keeps
working, and a checkpoint written by a stock ``EarlyStopping`` on the same monitor resumes here. It adds
relative ``min_delta``, a warm-up, waiting for ``Trainer(min_epochs/min_steps)`` (Lightning #19966), smoothing,
step-based checks, restoring the best weights, a guard that does not kill a run in its memorisation phase
before it generalises (grokking), and stopping when another debug callback reports a dead run. The decisions
are the pure functions of :mod:`lightning_debug.rules.early_stopping`; this class feeds and words them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from torch import Tensor

from lightning_debug import stopping
from lightning_debug.base import DebugCallback
from lightning_debug.findings import Finding
from lightning_debug.rules import early_stopping as rules
from lightning_debug.signals import lookup_metric, metric_value, train_key
from lightning_debug.stopping import MisconfiguredArgument, MonitorMissing

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["MetricEarlyStopping", "MisconfiguredArgument", "MonitorMissing"]


class MetricEarlyStopping(EarlyStopping, DebugCallback):
    r"""Stop when the monitored metric stops improving, without stopping too early.

    Accepts every argument of :class:`~lightning.pytorch.callbacks.EarlyStopping` with its meaning (``strict``:
    a missing monitor raises; ``verbose``: log each check's outcome), except that ``mode`` defaults to what the
    metric's name implies (``val_acc`` -> ``"max"``, ``val_loss`` -> ``"min"``; Lightning's ``"min"`` for a name
    that says neither). Additions (keyword-only):

    Args:
        min_delta_mode: ``"abs"`` (Lightning's) or ``"rel"``: an improvement must beat the best by
            ``min_delta * |best|``, like ``ReduceLROnPlateau(threshold_mode="rel")``.
        warmup: no patience counted and no threshold stop before this many checks (``unit="checks"``) or
            global steps (``unit="steps"``). Non-finite values and ``stop_on`` findings still stop.
        respect_min_epochs: also count no patience while ``Trainer(min_epochs, min_steps)`` would not let the
            run stop (Lightning #19966: otherwise patience runs out before ``min_epochs`` and the run stops the
            moment it is reached). Off by default, as in Lightning.
        unit: ``"checks"``: judge at validation checks, as ``EarlyStopping`` does; ``"steps"``: judge every
            ``check_every`` global steps, reading the current ``trainer.callback_metrics``.
        check_every: judge every N-th validation check, or every N steps.
        smoothing: ``None``, ``"median"`` (lower median of the last ``smoothing_window`` values) or ``"ema"``
            (span ``smoothing_window``); best, ``min_delta`` and thresholds apply to the smoothed value.
        smoothing_window: values in the median window, or the EMA span.
        restore_best_weights: copy the weights (on CPU) at every new best and load them into the module when
            training ends; the copy is part of the callback state, so it survives a resume.
        grokking_guard: do not count patience while the run is in a phase that precedes late generalisation
            (see :func:`lightning_debug.rules.early_stopping.guard`). Emits ``stop.deferred``.
        train_monitor: the training counterpart of ``monitor``; default: ``val`` replaced by ``train``.
        loss_monitor: the dev loss the guard watches.
        best_possible: the best value the metric can take; default 1.0 for a ``"max"`` metric whose values
            lie in [0, 1] (accuracy-like); without it the saturation half of the guard is off.
        chance: the dev metric's chance level; default inferred as in :class:`LossMetricDivergence`.
        guard_tolerance: how close (absolute) to ``best_possible`` / ``chance`` counts as "at" it.
        guard_min_change: the relative change per check that counts as "still moving" (dev loss, norm).
        guard_window: checks over which the guard measures movement.
        max_deferral: checks the guard may defer in total (``None``: unbounded), so a run that never
            generalises still stops.
        stop_on: finding ids of other debug callbacks on the trainer that stop the run at once.
        raise_errors / print_findings: the debug-callback behaviour (re-raise the callback's own failures
            instead of reporting ``check.error``; print findings as they happen).
    """

    # the callback's own state, set from `stopping.STATE_DEFAULTS` (and saved and loaded by that table)
    seen_checks: int
    judged: int
    best_step: int
    recent: list[float]
    ema: float | None
    stop_on_counts: dict[str, int]
    stop_reason: str | None
    best_weights: dict[str, Tensor] | None

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str | None = None,
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
        *,
        min_delta_mode: str = "abs",
        warmup: int = 0,
        respect_min_epochs: bool = False,
        unit: str = "checks",
        check_every: int = 1,
        smoothing: str | None = None,
        smoothing_window: int = 3,
        restore_best_weights: bool = False,
        grokking_guard: bool = True,
        train_monitor: str | None = None,
        loss_monitor: str = "val_loss",
        best_possible: float | None = None,
        chance: float | None = None,
        guard_tolerance: float = 0.02,
        guard_min_change: float = 0.005,
        guard_window: int = 5,
        max_deferral: int | None = 50,
        stop_on: Sequence[str] = ("loss.nonfinite", "loss.diverging"),
        raise_errors: bool = False,
        print_findings: bool = True,
    ) -> None:
        """Over 50 lines for a reason: Lightning's arguments in Lightning's order (a drop-in), then the additions,
        each stored under its own name (the CLI and the tests read them back)."""
        mode = stopping.monitor_mode(monitor, mode)
        super().__init__(**stopping.stock_arguments(locals()))
        stopping.validate_additions(locals())
        self.raise_errors = raise_errors
        self.print_findings = print_findings
        self.min_delta_mode = min_delta_mode
        self.warmup = warmup
        self.respect_min_epochs = respect_min_epochs
        self.unit = unit
        self.check_every = check_every
        self.smoothing = smoothing
        self.smoothing_window = smoothing_window
        self.restore_best_weights = restore_best_weights
        self.grokking_guard = grokking_guard
        self.stop_on = list(stop_on)
        self.guard = stopping.GrokkingGuard.from_arguments(locals())
        self._load_own_state({})  # the STATE_DEFAULTS fields, declared above
        self._pending: str | None = None  # a stop_on finding not acted on yet
        self._last_step_checked = -1
        self._verdict: rules.StopVerdict | None = None  # what the last `_evaluate_stopping_criteria` decided
        self._warming = False
        self._deferral_now: rules.Deferral | None = None
        self._validated = False  # a validation batch has run: a missing validation metric is then a warning

    # the guard's settings and state, under the names they had on the callback
    train_monitor = property(lambda self: self.guard.train_monitor)
    guard_history = property(lambda self: self.guard.history)
    deferred = property(lambda self: self.guard.deferred)

    @functools.cached_property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)  # built once: read on every hook

    @property
    def _stock_state_key(self) -> str:
        """The key a stock ``EarlyStopping`` on the same monitor and mode saves its state under."""
        return f"EarlyStopping{ {'monitor': self.monitor, 'mode': self.mode}!r}"

    # ---- hooks (Lightning's dispatch: they call `_run_early_stopping_check`, as EarlyStopping's do) ----------
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._validated = True
        if self.grokking_guard and dataloader_idx == 0:
            self.guard.chance.observe_outputs(outputs)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logs = trainer.callback_metrics
        self.guard.chance.end_epoch(metric_value(logs, stopping.key_of(logs, self.monitor)))
        if self.unit == "checks" and not self._check_on_train_epoch_end and not self._should_skip_check(trainer):
            self._run_early_stopping_check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unit == "checks" and self._check_on_train_epoch_end and not self._should_skip_check(trainer):
            self._run_early_stopping_check(trainer)

    @property
    def on_train_batch_end(self) -> Callable[..., None] | None:  # type: ignore[override]
        """Lightning's hook, there only when it has work (checks counted in steps, or a stop to act on): ``None``
        (not dispatched) otherwise, as a hook that returns at once still costs ~2.5 us of dispatch per step."""
        return self.on_train_batch_end_due if self.unit == "steps" or self._pending is not None else None

    def on_train_batch_end_due(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # training batches run only while fitting, never in the sanity check
        if self.unit == "steps" and step % self.check_every == 0 and step != self._last_step_checked:
            self._last_step_checked = step  # several batches share a step under gradient accumulation
            self._run_early_stopping_check(trainer)
        elif self._pending is not None and trainer.world_size == 1:  # no collective needed: stop at once
            trainer.should_stop = True
            self._stopped(trainer, *self._take_pending())

    def on_finding(self, trainer: pl.Trainer, finding: Finding) -> None:
        """A ``stop_on`` finding of another debug callback, new or counted again, stops the run."""
        if finding.check in self.stop_on and finding.count > self.stop_on_counts.get(finding.check, 0):
            self.stop_on_counts[finding.check] = finding.count
            self._pending = self._pending or finding.check

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.restore_best_weights and self.best_weights is not None:
            pl_module.load_state_dict(self.best_weights)
            best = f"{self.monitor} = {float(self.best_score):.4g} (step {self.best_step})"
            self._log_info(trainer, f"Restored the weights of the best {best}.", self.log_rank_zero_only)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint written with a stock ``EarlyStopping`` on the same monitor and mode resumes its state."""
        states = checkpoint.get("callbacks", {})
        if self.state_key not in states and self._stock_state_key in states:
            self.load_state_dict(states[self._stock_state_key])
            resumed = f"Resumed the state of {self._stock_state_key} (best {float(self.best_score):.4g})."
            self._log_info(trainer, resumed, True)

    # ---- the check (Lightning's structure) -------------------------------------------------------------------
    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        """Lightning's check, plus ``check_every``, ``stop_on`` findings, the guard's inputs and the findings."""
        if getattr(trainer, "fast_dev_run", False):  # disabled under fast_dev_run, as Lightning's
            return
        self.seen_checks += 1
        if self.unit == "checks" and self.seen_checks % self.check_every != 0:
            return
        code, reason, should_stop = None, None, False
        if self._pending is not None:
            should_stop, (code, reason) = True, self._take_pending()
        elif (current := self._current(trainer, logs := trainer.callback_metrics)) is not None:
            should_stop, reason = self._evaluate(trainer, current, logs)
            code = self._verdict.action if self._verdict is not None else ("stop" if should_stop else None)
        # stop every DDP process if any process decides to stop
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self._stopped(trainer, code if code not in (None, "improved", "wait") else "another rank", reason)
        elif reason and self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)

    def _take_pending(self) -> tuple[str, str]:
        """The pending ``stop_on`` finding as a stop code and reason, no longer pending."""
        found, self._pending = self._pending, None
        return f"finding:{found}", f"{found} reported by another debug callback"

    def _current(self, trainer: pl.Trainer, logs: Mapping[str, Any]) -> Tensor | None:
        """The monitored value in ``logs`` (the check's one read of ``trainer.callback_metrics``, which Lightning
        recomputes on every read: ~50 us after a training epoch), under Lightning's naming; a missing one raises
        (``strict``) or is a warning."""
        found = lookup_metric(logs, self.monitor)
        if found.key is not None:
            if found.first_loader:
                message, data = stopping.first_loader_message(self.monitor, found.key)
                self.emit(trainer, "check.metric_resolved", message, data=data, key=self.monitor)
            return logs[found.key].squeeze()
        stopping.require_monitor(self, logs)
        if not self._validated and train_key(self.monitor) is not None:
            self.skip(trainer, f"`{self.monitor}` not judged: no validation batch has run", key=self.monitor)
        else:
            message, data = stopping.missing_monitor_message(self.monitor, found, logs)
            self.emit(trainer, "check.metric_missing", message, data=data, key=self.monitor)
        return None

    def _evaluate(self, trainer: pl.Trainer, current: Tensor, logs: Mapping[str, Any]) -> tuple[bool, str | None]:
        """Record what the guard needs, decide (through the overridable Lightning hook) and act on the verdict."""
        pl_module = trainer.lightning_module
        self.judged += 1
        self.guard.record(logs, pl_module)
        self._warming = stopping.warming(
            trainer, judged=self.judged, warmup=self.warmup, unit=self.unit, respect_min_epochs=self.respect_min_epochs
        )
        self._verdict = None
        should_stop, reason = self._evaluate_stopping_criteria(current)
        if self._verdict is not None and self._verdict.improved:
            self.best_step = trainer.global_step
            if self.restore_best_weights:
                self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        if self._verdict is not None and self._verdict.action == "deferred" and self._deferral_now is not None:
            message, data = self.guard.deferred_finding(self._deferral_now, float(self.best_score))
            self.emit(trainer, "stop.deferred", message, data=data, key=self._deferral_now.phase)
        return should_stop, reason

    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        """Lightning's hook, deciding with :func:`lightning_debug.rules.early_stopping.evaluate` (smoothing,
        relative ``min_delta``, warm-up, guard). Override it as you would Lightning's."""
        smoothed = rules.smoothed(
            stopping.scalar(current), self.recent, self.ema, method=self.smoothing, window=self.smoothing_window
        )
        value, self.recent, self.ema = smoothed.value, smoothed.recent, smoothed.ema
        self._deferral_now = self.guard.deferral(float(value), self.mode) if math.isfinite(float(value)) else None
        self._verdict = verdict = rules.evaluate(
            value,
            stopping.scalar(self.best_score),
            self.wait_count,
            **stopping.criteria(self, relative=self.min_delta_mode == "rel"),
            warming=self._warming,
            deferral=self._deferral_now.phase if self._deferral_now is not None else None,
        )
        self.wait_count = verdict.wait_count
        self.stopping_reason = stopping.STOP_REASONS.get(verdict.action, self.stopping_reason)
        if verdict.improved:
            previous = float(self.best_score)
            self.best_score = current.detach() if self.smoothing is None else torch.tensor(value)
            return False, stopping.improved_message(self, previous, float(value))
        return verdict.should_stop, stopping.stop_message(self, verdict.action, float(value))

    def _stopped(self, trainer: pl.Trainer, code: str, reason: str | None) -> None:
        self.stopped_epoch = trainer.current_epoch
        self.stop_reason = code
        self.stopping_reason_message = reason
        if code.startswith("finding:"):
            self.stopping_reason = stopping.STOP_REASONS.get(code, EarlyStoppingReason.DIVERGENCE_THRESHOLD)
        message, data = stopping.stopped_finding(
            self, step=trainer.global_step, code=code, reason=reason, best_step=self.best_step, deferred=self.deferred
        )
        self.emit(trainer, "stop.early", message, data=data, key=code)
        if reason and self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)

    # ---- state: Lightning's, the debug callback's, the guard's and `stopping.STATE_DEFAULTS` -------------------
    def state_dict(self) -> dict[str, Any]:
        own = {name: stopping.plain_copy(getattr(self, name)) for name in stopping.STATE_DEFAULTS}
        return {**EarlyStopping.state_dict(self), **DebugCallback.state_dict(self), **own, **self.guard.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        EarlyStopping.load_state_dict(self, state_dict)
        DebugCallback.load_state_dict(self, state_dict)
        self.guard.load_state_dict(state_dict)
        self._load_own_state(state_dict)

    def _load_own_state(self, state_dict: dict[str, Any]) -> None:
        for name, default in stopping.STATE_DEFAULTS.items():
            setattr(self, name, stopping.plain_copy(state_dict.get(name, default)))
