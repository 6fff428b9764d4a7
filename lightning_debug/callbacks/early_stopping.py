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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_debug.base import DebugCallback
from lightning_debug.findings import CATALOGUE, Finding
from lightning_debug.rules import early_stopping as rules
from lightning_debug.signals import (
    ChanceLevel,
    infer_mode,
    lookup_metric,
    metric_value,
    resolve_mode,
    train_key,
    weight_norm,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl

_UNITS = ("checks", "steps")
_STOP_REASONS = {
    "nonfinite": EarlyStoppingReason.NON_FINITE_METRIC,
    "threshold": EarlyStoppingReason.STOPPING_THRESHOLD,
    "divergence": EarlyStoppingReason.DIVERGENCE_THRESHOLD,
    "patience": EarlyStoppingReason.PATIENCE_EXHAUSTED,
    "finding:loss.nonfinite": EarlyStoppingReason.NON_FINITE_METRIC,
}


class MisconfiguredArgument(MisconfigurationException, ValueError):
    """A bad argument: Lightning's exception type, and a ``ValueError``, so both ``except`` clauses catch it."""


class MonitorMissing(MisconfigurationException, RuntimeError):
    """``strict=True`` and the monitor is not logged: Lightning's ``RuntimeError``, raised through the hook guard."""


def _scalar(value: Tensor) -> Any:
    """A 0-d tensor as a numpy scalar of the same precision, so the rules round as torch does."""
    value = value.detach().cpu()
    return (value.float() if value.dtype == torch.bfloat16 else value).numpy()[()]


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
        if not isinstance(monitor, str) or not monitor:
            raise MisconfiguredArgument(f"MetricEarlyStopping: `monitor` must be a metric name, got {monitor!r}")
        if mode is not None and mode not in ("min", "max"):
            raise MisconfiguredArgument(f"MetricEarlyStopping: `mode` can be min, max, got {mode}")
        if mode is not None or infer_mode(monitor) is not None:  # a warning when the name says the opposite
            mode = resolve_mode(monitor, mode, where="MetricEarlyStopping")
        mode = mode or "min"  # Lightning's default for a name that says neither
        super().__init__(
            monitor,
            min_delta=min_delta,
            patience=patience,
            verbose=verbose,
            mode=mode,
            strict=strict,
            check_finite=check_finite,
            stopping_threshold=stopping_threshold,
            divergence_threshold=divergence_threshold,
            check_on_train_epoch_end=check_on_train_epoch_end,
            log_rank_zero_only=log_rank_zero_only,
        )
        _validate(locals())
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
        self.train_monitor = train_monitor or train_key(monitor)
        self.loss_monitor = loss_monitor
        self.best_possible = best_possible
        self.guard_tolerance = guard_tolerance
        self.guard_min_change = guard_min_change
        self.guard_window = guard_window
        self.max_deferral = max_deferral
        self.stop_on = list(stop_on)
        self.chance = ChanceLevel(chance, from_targets=mode == "max")
        # state (all in state_dict)
        self.seen_checks = 0  # check opportunities (validation checks, or step boundaries)
        self.judged = 0  # checks at which the metric was read and judged
        self.best_step = -1
        self.recent: list[float] = []  # raw monitored values for the median window
        self.ema: float | None = None
        self.guard_history: dict[str, list[float]] = {"train": [], "loss": [], "norm": []}
        self.in_unit_interval = True  # all observed values in [0, 1] (accuracy-like)
        self.deferred = 0
        self.stop_on_counts: dict[str, int] = {}
        self.stop_reason: str | None = None
        self.best_weights: dict[str, Tensor] | None = None
        self._pending: str | None = None  # a stop_on finding not acted on yet
        self._last_step_checked = -1
        self._verdict: rules.StopVerdict | None = None  # what the last `_evaluate_stopping_criteria` decided
        self._warming = False
        self._deferral_now: rules.Deferral | None = None
        self._validated = False  # a validation batch has run: a missing validation metric is then a warning

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
            self.chance.observe_outputs(outputs)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.chance.end_epoch(metric_value(trainer.callback_metrics, self._key(trainer.callback_metrics)))
        if self.unit == "checks" and not self._check_on_train_epoch_end and not self._should_skip_check(trainer):
            self._run_early_stopping_check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unit == "checks" and self._check_on_train_epoch_end and not self._should_skip_check(trainer):
            self._run_early_stopping_check(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # training batches run only while fitting, never in the sanity check
        if self.unit == "steps" and step % self.check_every == 0 and step != self._last_step_checked:
            self._last_step_checked = step  # several batches share a step under gradient accumulation
            self._run_early_stopping_check(trainer)
        elif self._pending is not None and trainer.world_size == 1:  # no collective needed: stop at once
            found, self._pending = self._pending, None
            trainer.should_stop = True
            self._stopped(trainer, f"finding:{found}", f"{found} reported by another debug callback")

    def on_finding(self, trainer: pl.Trainer, finding: Finding) -> None:
        """A ``stop_on`` finding of another debug callback, new or counted again, stops the run."""
        if finding.check in self.stop_on and finding.count > self.stop_on_counts.get(finding.check, 0):
            self.stop_on_counts[finding.check] = finding.count
            self._pending = self._pending or finding.check

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.restore_best_weights and self.best_weights is not None:
            pl_module.load_state_dict(self.best_weights)
            self._log_info(
                trainer,
                f"Restored the weights of the best {self.monitor} = {float(self.best_score):.4g} "
                f"(step {self.best_step}).",
                self.log_rank_zero_only,
            )

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint written with a stock ``EarlyStopping`` on the same monitor and mode resumes its state."""
        states = checkpoint.get("callbacks", {})
        if self.state_key not in states and self._stock_state_key in states:
            self.load_state_dict(states[self._stock_state_key])
            self._log_info(
                trainer, f"Resumed the state of {self._stock_state_key} (best {float(self.best_score):.4g}).", True
            )

    # ---- the check (Lightning's structure) -------------------------------------------------------------------
    def _key(self, logs: Any) -> str:
        found = lookup_metric(logs, self.monitor)
        return found.key or self.monitor

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        """Lightning's check, plus ``check_every``, ``stop_on`` findings, the guard's inputs and the findings."""
        if getattr(trainer, "fast_dev_run", False):  # disabled under fast_dev_run, as Lightning's
            return
        self.seen_checks += 1
        if self.unit == "checks" and self.seen_checks % self.check_every != 0:
            return
        code, reason, should_stop = None, None, False
        if self._pending is not None:
            found, self._pending = self._pending, None
            should_stop, code, reason = True, f"finding:{found}", f"{found} reported by another debug callback"
        else:
            current = self._current(trainer)
            if current is not None:
                should_stop, reason = self._evaluate(trainer, current)
                code = self._verdict.action if self._verdict is not None else ("stop" if should_stop else None)
        # stop every DDP process if any process decides to stop
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self._stopped(trainer, code if code not in (None, "improved", "wait") else "another rank", reason)
        elif reason and self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)

    def _current(self, trainer: pl.Trainer) -> Tensor | None:
        """The monitored value, under Lightning's naming; a missing one raises (``strict``) or is a warning."""
        logs = trainer.callback_metrics
        found = lookup_metric(logs, self.monitor)
        if found.key is None:
            if self.strict:  # Lightning's RuntimeError, which the hook guard lets through
                try:
                    self._validate_condition_metric(logs)
                except RuntimeError as err:
                    raise MonitorMissing(str(err)) from None
            if not self._validated and train_key(self.monitor) is not None:
                self.skip(trainer, f"`{self.monitor}` not judged: no validation batch has run", key=self.monitor)
                return None
            self.emit(
                trainer,
                "check.metric_missing",
                f"MetricEarlyStopping: `{self.monitor}` is not logged, so early stopping is off"
                + (f"; did you mean {' or '.join(repr(c) for c in found.close)}?" if found.close else "")
                + f" Logged: {sorted(logs)}.",
                data={"metric": self.monitor, "close": found.close, "logged": sorted(logs)},
                key=self.monitor,
            )
            return None
        if found.first_loader:
            self.emit(
                trainer,
                "check.metric_resolved",
                f"MetricEarlyStopping: several validation loaders; `{self.monitor}` is read from the first "
                f"one's `{found.key}`.",
                data={"metric": self.monitor, "key": found.key},
                key=self.monitor,
            )
        return logs[found.key].squeeze()

    def _evaluate(self, trainer: pl.Trainer, current: Tensor) -> tuple[bool, str | None]:
        """Record what the guard needs, decide (through the overridable Lightning hook) and act on the verdict."""
        pl_module = trainer.lightning_module
        self.judged += 1
        self._record_guard_inputs(trainer, pl_module)
        self._warming = rules.in_warmup(
            judged=self.judged,
            warmup=self.warmup,
            unit=self.unit,
            global_step=trainer.global_step,
            epoch=trainer.current_epoch,
            min_epochs=(trainer.min_epochs or 0) if self.respect_min_epochs else 0,
            min_steps=(trainer.min_steps or 0) if self.respect_min_epochs else 0,
        )
        self._verdict = None
        should_stop, reason = self._evaluate_stopping_criteria(current)
        verdict = self._verdict
        if verdict is not None and verdict.improved:
            self.best_step = trainer.global_step
            if self.restore_best_weights:
                self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        if verdict is not None and verdict.action == "deferred":
            self._report_deferral(trainer)
        return should_stop, reason

    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        """Lightning's hook, deciding with :func:`lightning_debug.rules.early_stopping.evaluate` (smoothing,
        relative ``min_delta``, warm-up, guard). Override it as you would Lightning's."""
        raw = _scalar(current)
        finite = math.isfinite(float(raw))
        if finite:
            smoothed = rules.smooth(raw, self.recent, self.ema, method=self.smoothing, window=self.smoothing_window)
            self.recent, self.ema = smoothed.recent, smoothed.ema
            value = np.asarray(smoothed.value, dtype=np.asarray(raw).dtype)[()]
        else:
            value = raw
        best = _scalar(self.best_score)
        deferral = self._deferral(float(value)) if finite else None
        self._deferral_now = deferral
        verdict = rules.evaluate(
            value,
            best,
            self.wait_count,
            mode=self.mode,
            min_delta=float(self.min_delta) * (1.0 if self.mode == "max" else -1.0),  # Lightning stores it signed
            relative=self.min_delta_mode == "rel",
            patience=self.patience,
            check_finite=self.check_finite,
            stopping_threshold=self.stopping_threshold,
            divergence_threshold=self.divergence_threshold,
            warming=self._warming,
            deferral=deferral.phase if deferral is not None else None,
        )
        self._verdict = verdict
        self.wait_count = verdict.wait_count
        if verdict.action in _STOP_REASONS:
            self.stopping_reason = _STOP_REASONS[verdict.action]
        if verdict.improved:
            previous = float(self.best_score)
            self.best_score = current.detach() if self.smoothing is None else torch.tensor(value)
            return False, self._improved_message(previous, float(value))
        return verdict.should_stop, self._reason(verdict, float(value))

    def _improved_message(self, previous: float, value: float) -> str:
        if not math.isfinite(previous):
            return f"Metric {self.monitor} improved. New best score: {value:.3f}"
        return (
            f"Metric {self.monitor} improved by {abs(previous - value):.3f} >= min_delta = {abs(self.min_delta)}. "
            f"New best score: {value:.3f}"
        )

    def _reason(self, verdict: rules.StopVerdict, value: float) -> str | None:
        order = {"min": "<", "max": ">"}[self.mode]
        if verdict.action == "nonfinite":
            return (
                f"Monitored metric {self.monitor} = {value} is not finite. Previous best value was "
                f"{float(self.best_score):.3f}. Signaling Trainer to stop."
            )
        if verdict.action == "threshold":
            return (
                f"Stopping threshold reached: {self.monitor} = {value} {order} {self.stopping_threshold}. "
                "Signaling Trainer to stop."
            )
        if verdict.action == "divergence":
            return (
                f"Divergence threshold reached: {self.monitor} = {value} {order} {self.divergence_threshold}. "
                "Signaling Trainer to stop."
            )
        if verdict.action == "patience":
            return (
                f"Monitored metric {self.monitor} did not improve in the last {self.wait_count} records. "
                f"Best score: {float(self.best_score):.3f}. Signaling Trainer to stop."
            )
        return None

    # ---- grokking guard --------------------------------------------------------------------------------------
    def _record_guard_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.grokking_guard or pl_module is None:
            return
        logs = trainer.callback_metrics
        train = metric_value(logs, self._key_of(logs, self.train_monitor)) if self.train_monitor else None
        loss = metric_value(logs, self._key_of(logs, self.loss_monitor))
        norm = float(weight_norm(pl_module))  # once per check: one host transfer
        for name, v in (("train", train), ("loss", loss), ("norm", norm)):
            if v is not None and math.isfinite(v):  # no NaN in the state: it must compare equal to itself
                self.guard_history[name] = [*self.guard_history[name], v][-self.guard_window :]
        dev = metric_value(logs, self._key(logs))
        if any(v is not None and not 0.0 <= v <= 1.0 for v in (train, dev)):
            self.in_unit_interval = False

    @staticmethod
    def _key_of(logs: Any, name: str) -> str:
        return lookup_metric(logs, name).key or name

    def _deferral(self, value: float) -> rules.Deferral | None:
        if not self.grokking_guard or (self.max_deferral is not None and self.deferred >= self.max_deferral):
            return None
        target = self.best_possible
        if target is None and self.mode == "max" and self.in_unit_interval:
            target = 1.0
        return rules.guard(
            value,
            self.guard_history["train"],
            mode=self.mode,
            chance=self.chance.level,
            target=target,
            tolerance=self.guard_tolerance,
            min_change=self.guard_min_change,
            loss=self.guard_history["loss"],
            norm=self.guard_history["norm"],
        )

    def _report_deferral(self, trainer: pl.Trainer) -> None:
        d = self._deferral_now
        if d is None:
            return
        self.deferred += 1
        best = float(self.best_score)
        if d.phase == "memorising":
            why = (
                f"{self.train_monitor} is still improving ({d.train_first:.3g} -> {d.train_last:.3g}) while "
                f"{self.monitor} is at chance ({self.chance.level:.3g}): the model is memorising its training data, "
                "and may generalise later"
            )
        else:
            labels = {"loss": self.loss_monitor, "norm": "the weight norm"}
            moving = " and ".join(f"{labels[k]} is falling {v:.1%}/check" for k, v in d.falling.items())
            why = (
                f"{self.train_monitor} is saturated ({d.train_last:.3g}) but {self.monitor} is far from "
                f"{d.target:g} while {moving}: the run may still generalise late (grokking)"
            )
        self.emit(
            trainer,
            "stop.deferred",
            f"Not counting patience for {self.monitor} (best {best:.4g}): {why}.",
            data={"phase": d.phase, "best": best, "deferred_checks": self.deferred},
            key=d.phase,
        )

    def _stopped(self, trainer: pl.Trainer, code: str, reason: str | None) -> None:
        self.stopped_epoch = trainer.current_epoch
        self.stop_reason = code
        self.stopping_reason_message = reason
        if code.startswith("finding:"):
            self.stopping_reason = _STOP_REASONS.get(code, EarlyStoppingReason.DIVERGENCE_THRESHOLD)
        best = float(self.best_score)
        if math.isfinite(best):
            where = f"Best {self.monitor} = {best:.4g} at step {self.best_step}."
        else:
            where = f"No {self.monitor} had been recorded yet."
        self.emit(
            trainer,
            "stop.early",
            f"Stopped at step {trainer.global_step} ({code}): {reason or ''} {where}".replace("  ", " "),
            data={
                "reason": code,
                "monitor": self.monitor,
                "best": best if math.isfinite(best) else None,
                "best_step": self.best_step if math.isfinite(best) else None,
                "wait_count": self.wait_count,
                "patience": self.patience,
                "deferred_checks": self.deferred,
            },
            key=code,
        )
        if reason and self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)

    # ---- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **EarlyStopping.state_dict(self),
            **DebugCallback.state_dict(self),
            "seen_checks": self.seen_checks,
            "judged": self.judged,
            "best_step": self.best_step,
            "recent": [float(v) for v in self.recent],
            "ema": self.ema,
            "guard_history": {k: list(v) for k, v in self.guard_history.items()},
            "in_unit_interval": self.in_unit_interval,
            "deferred": self.deferred,
            "stop_on_counts": dict(self.stop_on_counts),
            "stop_reason": self.stop_reason,
            "chance": self.chance.state_dict(),
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        EarlyStopping.load_state_dict(self, state_dict)
        DebugCallback.load_state_dict(self, state_dict)
        self.seen_checks = state_dict.get("seen_checks", 0)
        self.judged = state_dict.get("judged", 0)
        self.best_step = state_dict.get("best_step", -1)
        self.recent = list(state_dict.get("recent", []))
        self.ema = state_dict.get("ema")
        self.guard_history = {k: list(v) for k, v in state_dict.get("guard_history", self.guard_history).items()}
        self.in_unit_interval = state_dict.get("in_unit_interval", True)
        self.deferred = state_dict.get("deferred", 0)
        self.stop_on_counts = dict(state_dict.get("stop_on_counts", {}))
        self.stop_reason = state_dict.get("stop_reason")
        self.chance.load_state_dict(state_dict.get("chance", {}))
        self.best_weights = state_dict.get("best_weights")


def _validate(args: dict[str, Any]) -> None:
    """The additions' arguments; each error names the argument (a ``MisconfiguredArgument``)."""
    checks = [
        ("min_delta_mode", args["min_delta_mode"] in ("abs", "rel"), "must be 'abs' or 'rel'"),
        ("min_delta", args["min_delta_mode"] != "rel" or args["min_delta"] >= 0, "must be >= 0 with 'rel'"),
        ("warmup", args["warmup"] >= 0, "must be >= 0"),
        ("unit", args["unit"] in _UNITS, f"must be one of {_UNITS}"),
        ("check_every", args["check_every"] >= 1, "must be >= 1"),
        ("smoothing", args["smoothing"] in rules.SMOOTHING, f"must be one of {rules.SMOOTHING}"),
        ("smoothing_window", args["smoothing_window"] >= 1, "must be >= 1"),
        ("guard_window", args["guard_window"] >= 3, "must be >= 3 checks (a robust slope needs 3 points)"),
        ("guard_tolerance", args["guard_tolerance"] >= 0, "must be >= 0"),
        ("guard_min_change", args["guard_min_change"] >= 0, "must be >= 0"),
        ("max_deferral", args["max_deferral"] is None or args["max_deferral"] >= 0, "must be >= 0 or None"),
    ]
    for name, ok, rule in checks:
        if not ok:
            raise MisconfiguredArgument(f"MetricEarlyStopping: `{name}` {rule}, got {args[name]!r}")
    unknown = [c for c in args["stop_on"] if c not in CATALOGUE]
    if unknown:
        raise MisconfiguredArgument(
            f"MetricEarlyStopping: `stop_on` has unknown finding ids {unknown}; see `python -m lightning_debug checks`"
        )
