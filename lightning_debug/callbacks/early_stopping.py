"""``MetricEarlyStopping``: Lightning's ``EarlyStopping`` plus what its users keep asking for.

A drop-in subclass (same arguments, DDP-reduced stop decision, ``state_dict``, ``stopping_reason``) that adds
relative ``min_delta``, a warm-up that respects ``Trainer(min_epochs/min_steps)`` (Lightning #19966), smoothing
of noisy evaluations, step-based checks, restoring the best weights without a checkpoint, a guard that does
not kill a run in its memorisation phase before it generalises (grokking), and stopping when another debug
callback reports a dead run (``loss.nonfinite``, ``loss.diverging``). Every stop is a ``stop.early`` finding.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from lightning_debug.base import DebugCallback, debug_callbacks_of
from lightning_debug.findings import CATALOGUE
from lightning_debug.signals import ChanceLevel, metric_value
from lightning_debug.stats import trend

if TYPE_CHECKING:
    import lightning.pytorch as pl

_UNITS = ("checks", "steps")
_SMOOTHING = (None, "median", "ema")
_FINDING_REASON = {"loss.nonfinite": EarlyStoppingReason.NON_FINITE_METRIC}


def train_key(monitor: str) -> str | None:
    """``val_acc`` -> ``train_acc``, ``val/acc`` -> ``train/acc``; ``None`` if ``monitor`` is no validation key."""
    key, n = re.subn(r"^(val|valid|validation)(?=[_/.\-])", "train", monitor)
    return key if n else None


class MetricEarlyStopping(EarlyStopping, DebugCallback):
    r"""Stop when the monitored metric stops improving, without stopping too early.

    Accepts every argument of :class:`~lightning.pytorch.callbacks.EarlyStopping` with the same meaning
    (``strict`` also governs the callback's own errors: raise rather than report), plus:

    Args:
        min_delta_mode: ``"abs"`` (Lightning's) or ``"rel"``: an improvement must beat the best by
            ``min_delta * |best|``, like ``ReduceLROnPlateau(threshold_mode="rel")``.
        warmup: no patience counted and no threshold stop before this many checks (``unit="checks"``) or
            global steps (``unit="steps"``); ``Trainer(min_epochs, min_steps)`` extend it, so patience never
            runs out while the trainer cannot stop yet. Non-finite values and ``stop_on`` findings still stop.
        unit: ``"checks"``: judge at validation checks, as ``EarlyStopping`` does; ``"steps"``: judge every
            ``check_every`` global steps, reading the current ``trainer.callback_metrics``.
        check_every: judge every N-th validation check, or every N steps.
        smoothing: ``None``, ``"median"`` (median of the last ``smoothing_window`` values) or ``"ema"``
            (exponential moving average with span ``smoothing_window``); the best value, ``min_delta`` and
            thresholds apply to the smoothed value, so one lucky or unlucky evaluation decides nothing.
        smoothing_window: values in the median window, or the EMA span.
        restore_best_weights: copy the weights (on CPU) at every new best and load them into the module when
            training ends; the copy is part of the callback state, so it survives a resume.
        grokking_guard: do not count patience while the run is in a phase that precedes late
            generalisation: the training metric still improving while the dev metric sits at chance
            (memorisation), or the training metric saturated while the dev metric is far from its best
            possible value and the dev loss is falling or the weight norm shrinking. Emits ``stop.deferred``.
        train_monitor: the training counterpart of ``monitor``; default: ``monitor`` with its ``val`` prefix
            replaced by ``train`` (``val_acc`` -> ``train_acc``).
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
    """

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
        *,
        min_delta_mode: str = "abs",
        warmup: int = 0,
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
    ) -> None:
        if mode not in ("min", "max"):  # Lightning raises a MisconfigurationException; ours are ValueErrors
            raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}")
        if patience < 0:
            raise ValueError(f"`patience` must be >= 0, got {patience}")
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
        self.raise_errors = strict  # Lightning's `strict`: a missing monitor stops the run (DebugCallback's own
        # name for this is `raise_errors`; wired separately by the early-stopping owner)
        if min_delta_mode not in ("abs", "rel"):
            raise ValueError(f"`min_delta_mode` must be 'abs' or 'rel', got {min_delta_mode!r}")
        if min_delta_mode == "rel" and min_delta < 0:
            raise ValueError(f"`min_delta` must be >= 0 with min_delta_mode='rel', got {min_delta}")
        if warmup < 0:
            raise ValueError(f"`warmup` must be >= 0, got {warmup}")
        if unit not in _UNITS:
            raise ValueError(f"`unit` must be one of {_UNITS}, got {unit!r}")
        if check_every < 1:
            raise ValueError(f"`check_every` must be >= 1, got {check_every}")
        if smoothing not in _SMOOTHING:
            raise ValueError(f"`smoothing` must be one of {_SMOOTHING}, got {smoothing!r}")
        if smoothing_window < 1:
            raise ValueError(f"`smoothing_window` must be >= 1, got {smoothing_window}")
        if guard_window < 3:
            raise ValueError(f"`guard_window` must be >= 3 checks (a robust slope needs 3 points), got {guard_window}")
        if guard_tolerance < 0 or guard_min_change < 0:
            raise ValueError("`guard_tolerance` and `guard_min_change` must be >= 0")
        if max_deferral is not None and max_deferral < 0:
            raise ValueError(f"`max_deferral` must be >= 0 or None, got {max_deferral}")
        unknown = [c for c in stop_on if c not in CATALOGUE]
        if unknown:
            raise ValueError(f"`stop_on` has unknown finding ids {unknown}; see `python -m lightning_debug checks`")
        self.min_delta_mode = min_delta_mode
        self.warmup = warmup
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
        self.judged = 0  # checks actually judged (every `check_every`-th)
        self.best_step = -1
        self.recent: list[float] = []  # raw monitored values for the median window
        self.ema: float | None = None
        self.guard_history: dict[str, list[float]] = {"train": [], "loss": [], "norm": []}
        self.in_unit_interval = True  # all observed values in [0, 1] (accuracy-like)
        self.deferred = 0
        self.stop_on_counts: dict[str, int] = {}
        self.stop_reason: str | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self._last_step_checked = -1
        self._emissions_seen = -1

    @functools.cached_property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)  # built once: read on every hook

    # ---- hooks ---------------------------------------------------------------------------------------------
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.grokking_guard:
            self.chance.observe_outputs(outputs)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.chance.end_epoch(metric_value(trainer.callback_metrics, self.monitor))
        if self.unit == "checks" and not self._check_on_train_epoch_end and not self._should_skip_check(trainer):
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unit == "checks" and self._check_on_train_epoch_end and not self._should_skip_check(trainer):
            self._check(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # training batches run only while fitting, never in the sanity check
        if self.unit == "steps" and step % self.check_every == 0 and step != self._last_step_checked:
            self._last_step_checked = step  # several batches share a step under gradient accumulation
            self._check(trainer, pl_module, every=1)
        elif trainer.world_size == 1:  # no collective needed: react to a dead run at the next batch
            found = self._new_stop_finding(trainer)
            if found is not None:
                trainer.should_stop = True
                self._stopped(trainer, f"finding:{found}", f"{found} reported by another debug callback")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.restore_best_weights and self.best_weights is not None:
            pl_module.load_state_dict(self.best_weights)
            self._log_info(
                trainer,
                f"Restored the weights of the best {self.monitor} = {float(self.best_score):.4g} "
                f"(step {self.best_step}).",
                self.log_rank_zero_only,
            )

    # ---- the check -------------------------------------------------------------------------------------------
    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, every: int | None = None) -> None:
        self.seen_checks += 1
        if self.seen_checks % (every or self.check_every) != 0 or getattr(trainer, "fast_dev_run", False):
            return
        logs = trainer.callback_metrics
        found = self._new_stop_finding(trainer)
        if found is not None:
            should_stop, code, reason = True, f"finding:{found}", f"{found} reported by another debug callback"
        elif not self._validate_condition_metric(logs):  # raises when strict
            self.emit(
                trainer,
                "check.skipped",
                f"MetricEarlyStopping: `{self.monitor}` is not logged; available: {sorted(logs)}",
                data={"missing": self.monitor},
            )
            should_stop, code, reason = False, None, None
        else:
            self.judged += 1
            self._record_guard_inputs(trainer, pl_module)
            should_stop, code, reason = self._judge(trainer, pl_module, logs[self.monitor].squeeze())
        # stop every DDP process if any process decides to stop
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self._stopped(trainer, code or "another rank", reason or "another process requested the stop")
        elif reason and self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)

    def _judge(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, raw: torch.Tensor
    ) -> tuple[bool, str | None, str | None]:
        """Lightning's order (non-finite, thresholds, improvement, patience), with smoothing, warm-up, guard."""
        raw = raw.detach().float().cpu()
        if self.check_finite and not torch.isfinite(raw):
            should_stop, reason = self._evaluate_stopping_criteria(raw)
            return should_stop, "nonfinite", reason
        value = self._smooth(float(raw))
        current = torch.tensor(value)
        warming = self._in_warmup(trainer)
        threshold = self.stopping_threshold is not None and self.monitor_op(current, self.stopping_threshold)
        divergence = self.divergence_threshold is not None and self.monitor_op(-current, -self.divergence_threshold)
        if (threshold or divergence) and not warming:
            should_stop, reason = self._evaluate_stopping_criteria(current)
            return should_stop, "threshold" if threshold else "divergence", reason
        if self._improved(value):
            previous = float(self.best_score)
            self.best_score, self.best_step, self.wait_count = current, trainer.global_step, 0
            if self.restore_best_weights:
                self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
            return False, None, f"Metric {self.monitor} improved from {previous:.4g} to {value:.4g}."
        if warming:
            return False, None, None
        deferral = self._guard_reason(value)
        if deferral is not None:
            phase, why = deferral
            self.deferred += 1
            self.emit(
                trainer,
                "stop.deferred",
                f"Not counting patience for {self.monitor} ({value:.4g}, best {float(self.best_score):.4g}): {why}.",
                data={"phase": phase, "value": value, "best": float(self.best_score), "deferred_checks": self.deferred},
                key=phase,
            )
            return False, None, None
        self.wait_count += 1
        if self.wait_count < self.patience:
            return False, None, None
        self.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
        return (
            True,
            "patience",
            f"Monitored metric {self.monitor} did not improve in the last {self.wait_count} records. "
            f"Best score: {float(self.best_score):.4g}. Signaling Trainer to stop.",
        )

    def _smooth(self, value: float) -> float:
        self.recent = [*self.recent, value][-self.smoothing_window :]
        if self.smoothing == "median":
            return float(torch.tensor(self.recent).median())  # lower median: a real observed value
        if self.smoothing == "ema":
            alpha = 2.0 / (self.smoothing_window + 1)
            self.ema = value if self.ema is None else alpha * value + (1 - alpha) * self.ema
            return self.ema
        return value

    def _improved(self, value: float) -> bool:
        best = float(self.best_score)
        if not math.isfinite(best):
            return math.isfinite(value)
        margin = abs(self.min_delta) * (abs(best) if self.min_delta_mode == "rel" else 1.0)
        sign = 1.0 if self.mode == "max" else -1.0
        return sign * (value - best) > margin

    def _in_warmup(self, trainer: pl.Trainer) -> bool:
        """Before ``warmup``, or before the trainer may stop at all (``min_epochs``/``min_steps``, #19966)."""
        before = self.judged <= self.warmup if self.unit == "checks" else trainer.global_step < self.warmup
        min_epochs, min_steps = trainer.min_epochs or 0, trainer.min_steps or 0
        return before or trainer.current_epoch + 1 < min_epochs or trainer.global_step < min_steps

    # ---- grokking guard --------------------------------------------------------------------------------------
    def _record_guard_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.grokking_guard:
            return
        logs = trainer.callback_metrics
        train = metric_value(logs, self.train_monitor) if self.train_monitor else None
        loss = metric_value(logs, self.loss_monitor)
        with torch.no_grad():
            norms = [p.detach().float().norm() for p in pl_module.parameters()]
            norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else float("nan")
        for name, v in (("train", train), ("loss", loss), ("norm", norm)):
            value = float("nan") if v is None else v
            self.guard_history[name] = [*self.guard_history[name], value][-self.guard_window :]
        dev = metric_value(logs, self.monitor)
        for v in (train, dev):
            if v is not None and not 0.0 <= v <= 1.0:
                self.in_unit_interval = False

    def _target(self) -> float | None:
        if self.best_possible is not None:
            return self.best_possible
        return 1.0 if self.mode == "max" and self.in_unit_interval else None

    def _falling(self, name: str) -> str | None:
        """``"<name> falling x%/check"`` when the robust relative slope is below ``-guard_min_change``."""
        series = [v for v in self.guard_history[name] if math.isfinite(v)]
        if len(series) < 3:
            return None
        level = abs(float(torch.tensor(series).median()))
        rel = trend(series).slope / level if level > 0 else 0.0
        label = self.loss_monitor if name == "loss" else "the weight norm"
        return f"{label} is falling {-rel:.1%}/check" if rel < -self.guard_min_change else None

    def _guard_reason(self, value: float) -> tuple[str, str] | None:
        """``(phase, explanation)`` when patience should not be counted now, else ``None``."""
        if not self.grokking_guard or (self.max_deferral is not None and self.deferred >= self.max_deferral):
            return None
        train = [v for v in self.guard_history["train"] if math.isfinite(v)]
        if not train:
            return None
        target, chance, tol = self._target(), self.chance.level, self.guard_tolerance
        sign = 1.0 if self.mode == "max" else -1.0
        if target is not None and sign * (target - value) <= tol:
            return None  # the dev metric is already as good as it gets
        saturated = target is not None and sign * (target - train[-1]) <= tol
        if chance is not None and sign * (value - chance) <= tol and sign * (train[-1] - train[0]) > tol:
            return "memorising", (
                f"{self.train_monitor} is still improving ({train[0]:.3g} -> {train[-1]:.3g}) while {self.monitor} is "
                f"at chance ({chance:.3g}): the model is memorising, and may generalise later"
            )
        if saturated:
            moving = [m for m in (self._falling("loss"), self._falling("norm")) if m]
            if moving:
                return "saturated", (
                    f"{self.train_monitor} is saturated ({train[-1]:.3g}) but {self.monitor} is far from {target:g} "
                    f"while {' and '.join(moving)}: the run may still generalise late (grokking)"
                )
        return None

    # ---- stop on other findings ------------------------------------------------------------------------------
    def _new_stop_finding(self, trainer: pl.Trainer) -> str | None:
        """The first ``stop_on`` id whose count on another debug callback grew since the last look."""
        if DebugCallback.total_emissions == self._emissions_seen:  # per batch: nothing was emitted, nothing to scan
            return None
        self._emissions_seen = DebugCallback.total_emissions
        others = [cb for cb in debug_callbacks_of(trainer) if cb is not self]
        found = None
        for check in self.stop_on:
            count = sum(f.count for cb in others for f in cb.findings if f.check == check)
            if count > self.stop_on_counts.get(check, 0) and found is None:
                found = check
            self.stop_on_counts[check] = count
        return found

    def _stopped(self, trainer: pl.Trainer, code: str, reason: str) -> None:
        self.stopped_epoch = trainer.current_epoch
        self.stop_reason = code
        self.stopping_reason_message = reason
        if code.startswith("finding:"):
            self.stopping_reason = _FINDING_REASON.get(code[8:], EarlyStoppingReason.DIVERGENCE_THRESHOLD)
        best = float(self.best_score)
        self.emit(
            trainer,
            "stop.early",
            f"Stopped at step {trainer.global_step} ({code}): {reason} Best {self.monitor} = {best:.4g} "
            f"at step {self.best_step}.",
            data={
                "reason": code,
                "monitor": self.monitor,
                "best": best,
                "best_step": self.best_step,
                "wait_count": self.wait_count,
                "patience": self.patience,
                "deferred_checks": self.deferred,
            },
            key=code,
        )
        if self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)

    # ---- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **EarlyStopping.state_dict(self),
            **DebugCallback.state_dict(self),
            "seen_checks": self.seen_checks,
            "judged": self.judged,
            "best_step": self.best_step,
            "recent": list(self.recent),
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
