"""Plumbing of :class:`~lightning_debug.callbacks.early_stopping.MetricEarlyStopping`, so the callback reads as
an adapter: its arguments (Lightning's passed through, the additions validated), the grokking guard's inputs
and state (:class:`GrokkingGuard`), the callback's own state fields, and the wording of its messages and
findings. The decisions stay in :mod:`lightning_debug.rules.early_stopping`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_debug.arguments import require
from lightning_debug.findings import CATALOGUE
from lightning_debug.rules import early_stopping as rules
from lightning_debug.signals import (
    ChanceLevel,
    MetricLookup,
    infer_mode,
    lookup_metric,
    metric_value,
    resolve_mode,
    train_key,
)
from lightning_debug.signals import weight_norm as global_weight_norm

if TYPE_CHECKING:
    import lightning.pytorch as pl

UNITS = ("checks", "steps")
STOCK_ARGUMENTS = tuple(inspect.signature(EarlyStopping.__init__).parameters)[1:]  # Lightning's, in its order
STOP_REASONS = {
    "nonfinite": EarlyStoppingReason.NON_FINITE_METRIC,
    "threshold": EarlyStoppingReason.STOPPING_THRESHOLD,
    "divergence": EarlyStoppingReason.DIVERGENCE_THRESHOLD,
    "patience": EarlyStoppingReason.PATIENCE_EXHAUSTED,
    "finding:loss.nonfinite": EarlyStoppingReason.NON_FINITE_METRIC,
}
# the callback's own state besides Lightning's and the guard's: attribute = state_dict key, and its initial value
STATE_DEFAULTS: dict[str, Any] = {
    "seen_checks": 0,  # check opportunities (validation checks, or step boundaries)
    "judged": 0,  # checks at which the metric was read and judged
    "best_step": -1,
    "recent": [],  # raw monitored values for the median window
    "ema": None,
    "stop_on_counts": {},
    "stop_reason": None,
    "best_weights": None,
}


class MisconfiguredArgument(MisconfigurationException, ValueError):
    """A bad argument: Lightning's exception type, and a ``ValueError``, so both ``except`` clauses catch it."""


class MonitorMissing(MisconfigurationException, RuntimeError):
    """``strict=True`` and the monitor is not logged: Lightning's ``RuntimeError``, raised through the hook guard."""


# ---- arguments ---------------------------------------------------------------------------------------------------
def monitor_mode(monitor: Any, mode: str | None) -> str:
    """``mode`` checked, or what the metric's name implies (a warning when the name says the opposite), or
    Lightning's ``"min"`` for a name that says neither."""
    if not isinstance(monitor, str) or not monitor:
        raise MisconfiguredArgument(f"MetricEarlyStopping: `monitor` must be a metric name, got {monitor!r}")
    if mode is not None and mode not in ("min", "max"):
        raise MisconfiguredArgument(f"MetricEarlyStopping: `mode` can be min, max, got {mode}")
    if mode is not None or infer_mode(monitor) is not None:
        mode = resolve_mode(monitor, mode, where="MetricEarlyStopping")
    return mode or "min"


def stock_arguments(args: dict[str, Any]) -> dict[str, Any]:
    """The arguments ``EarlyStopping.__init__`` takes, picked from the callback's ``locals()``."""
    return {name: args[name] for name in STOCK_ARGUMENTS}


def validate_additions(args: dict[str, Any]) -> None:
    """The additions' arguments (``args``: the callback's ``locals()``); each error names the argument."""
    unknown = [c for c in args["stop_on"] if c not in CATALOGUE]
    checks = [
        ("min_delta_mode", args["min_delta_mode"] in ("abs", "rel"), "must be 'abs' or 'rel'"),
        ("min_delta", args["min_delta_mode"] != "rel" or args["min_delta"] >= 0, "must be >= 0 with 'rel'"),
        ("warmup", args["warmup"] >= 0, "must be >= 0"),
        ("unit", args["unit"] in UNITS, f"must be one of {UNITS}"),
        ("check_every", args["check_every"] >= 1, "must be >= 1"),
        ("smoothing", args["smoothing"] in rules.SMOOTHING, f"must be one of {rules.SMOOTHING}"),
        ("smoothing_window", args["smoothing_window"] >= 1, "must be >= 1"),
        ("guard_window", args["guard_window"] >= 3, "must be >= 3 checks (a robust slope needs 3 points)"),
        ("guard_tolerance", args["guard_tolerance"] >= 0, "must be >= 0"),
        ("guard_min_change", args["guard_min_change"] >= 0, "must be >= 0"),
        ("max_deferral", args["max_deferral"] is None or args["max_deferral"] >= 0, "must be >= 0 or None"),
        ("stop_on", not unknown, f"has unknown finding ids {unknown}; see `python -m lightning_debug checks`"),
    ]
    rows = [(name, args[name], ok, rule) for name, ok, rule in checks]
    require(*rows, error=MisconfiguredArgument, where="MetricEarlyStopping: ")


# ---- the rules' inputs -------------------------------------------------------------------------------------------
def criteria(es: EarlyStopping, *, relative: bool) -> dict[str, Any]:
    """Lightning's stopping settings as :func:`rules.evaluate` takes them, read at each check (they are public
    attributes a user may change). Lightning stores ``min_delta`` signed by mode: the rule wants it as given."""
    return {
        "mode": es.mode,
        "min_delta": float(es.min_delta) * (1.0 if es.mode == "max" else -1.0),
        "relative": relative,
        "patience": es.patience,
        "check_finite": es.check_finite,
        "stopping_threshold": es.stopping_threshold,
        "divergence_threshold": es.divergence_threshold,
    }


def warming(trainer: pl.Trainer, *, judged: int, warmup: int, unit: str, respect_min_epochs: bool) -> bool:
    """:func:`rules.in_warmup` at this check, ``Trainer(min_epochs, min_steps)`` included if respected."""
    return rules.in_warmup(
        judged=judged,
        warmup=warmup,
        unit=unit,
        global_step=trainer.global_step,
        epoch=trainer.current_epoch,
        min_epochs=(trainer.min_epochs or 0) if respect_min_epochs else 0,
        min_steps=(trainer.min_steps or 0) if respect_min_epochs else 0,
    )


def require_monitor(es: EarlyStopping, logs: Any) -> None:
    """With ``strict``, Lightning's error for a monitor that is not logged, as a :class:`MonitorMissing`
    (a ``MisconfigurationException``: the hook guard lets it through)."""
    if es.strict:
        try:
            es._validate_condition_metric(logs)
        except RuntimeError as err:
            raise MonitorMissing(str(err)) from None


# ---- values and state --------------------------------------------------------------------------------------------
def scalar(value: Tensor) -> Any:
    """A 0-d tensor as a numpy scalar of the same precision, so the rules round as torch does."""
    value = value.detach().cpu()
    return (value.float() if value.dtype == torch.bfloat16 else value).numpy()[()]


def plain_copy(value: Any) -> Any:
    """A state value copied one level deep (lists and dicts), so the saved state does not alias the live one."""
    if isinstance(value, list):
        return list(value)
    return dict(value) if isinstance(value, dict) else value


def key_of(logs: Any, name: str) -> str:
    """The logged key ``name`` is found under (``name/dataloader_idx_0`` with several loaders), else ``name``."""
    return lookup_metric(logs, name).key or name


@dataclass
class GrokkingGuard:
    """What the guard watches (training metric, dev loss, weight norm over the last ``window`` checks), the
    chance level, and how many checks it deferred; :func:`rules.guard` decides from them. A dataclass: pickled
    copies compare equal, as Lightning's callbacks' ``vars`` do."""

    enabled: bool
    monitor: str
    train_monitor: str | None
    loss_monitor: str
    best_possible: float | None
    chance: ChanceLevel
    tolerance: float
    min_change: float
    window: int
    max_deferral: int | None
    history: dict[str, list[float]] = field(default_factory=lambda: {"train": [], "loss": [], "norm": []})
    in_unit_interval: bool = True  # all observed values in [0, 1] (accuracy-like)
    deferred: int = 0

    @classmethod
    def from_arguments(cls, args: dict[str, Any]) -> GrokkingGuard:
        """The guard ``MetricEarlyStopping.__init__`` configures (from its ``locals()``, ``mode`` resolved)."""
        return cls(
            enabled=args["grokking_guard"],
            monitor=args["monitor"],
            train_monitor=args["train_monitor"] or train_key(args["monitor"]),
            loss_monitor=args["loss_monitor"],
            best_possible=args["best_possible"],
            chance=ChanceLevel(args["chance"], from_targets=args["mode"] == "max"),
            tolerance=args["guard_tolerance"],
            min_change=args["guard_min_change"],
            window=args["guard_window"],
            max_deferral=args["max_deferral"],
        )

    def record(self, logs: Any, pl_module: pl.LightningModule | None) -> None:
        """One check's inputs: the training metric, the dev loss and the weight norm (one host transfer)."""
        if not self.enabled or pl_module is None:
            return
        train = metric_value(logs, key_of(logs, self.train_monitor)) if self.train_monitor else None
        loss = metric_value(logs, key_of(logs, self.loss_monitor))
        norm = float(global_weight_norm(pl_module))
        for name, v in (("train", train), ("loss", loss), ("norm", norm)):
            if v is not None and math.isfinite(v):  # no NaN in the state: it must compare equal to itself
                self.history[name] = [*self.history[name], v][-self.window :]
        dev = metric_value(logs, key_of(logs, self.monitor))
        if any(v is not None and not 0.0 <= v <= 1.0 for v in (train, dev)):
            self.in_unit_interval = False

    def deferral(self, value: float, mode: str) -> rules.Deferral | None:
        """Whether the guard would hold patience at this dev ``value`` (``None`` once ``max_deferral`` is spent)."""
        if not self.enabled or (self.max_deferral is not None and self.deferred >= self.max_deferral):
            return None
        return rules.guard(
            value,
            self.history["train"],
            mode=mode,
            chance=self.chance.level,
            target=rules.guard_target(self.best_possible, mode=mode, in_unit_interval=self.in_unit_interval),
            tolerance=self.tolerance,
            min_change=self.min_change,
            loss=self.history["loss"],
            norm=self.history["norm"],
        )

    def deferred_finding(self, d: rules.Deferral, best: float) -> tuple[str, dict[str, Any]]:
        """Count one deferred check; the ``stop.deferred`` message and data."""
        self.deferred += 1
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
        message = f"Not counting patience for {self.monitor} (best {best:.4g}): {why}."
        return message, {"phase": d.phase, "best": best, "deferred_checks": self.deferred}

    def state_dict(self) -> dict[str, Any]:
        return {
            "guard_history": {k: list(v) for k, v in self.history.items()},
            "in_unit_interval": self.in_unit_interval,
            "deferred": self.deferred,
            "chance": self.chance.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {k: list(v) for k, v in state.get("guard_history", self.history).items()}
        self.in_unit_interval = state.get("in_unit_interval", True)
        self.deferred = state.get("deferred", 0)
        self.chance.load_state_dict(state.get("chance", {}))


# ---- wording -----------------------------------------------------------------------------------------------------
def improved_message(es: EarlyStopping, previous: float, value: float) -> str:
    """Lightning's wording of a new best."""
    if not math.isfinite(previous):
        return f"Metric {es.monitor} improved. New best score: {value:.3f}"
    return (
        f"Metric {es.monitor} improved by {abs(previous - value):.3f} >= min_delta = {abs(es.min_delta)}. "
        f"New best score: {value:.3f}"
    )


def stop_message(es: EarlyStopping, action: str, value: float) -> str | None:
    """Lightning's wording of a stop (``None`` for a check that does not stop)."""
    order = {"min": "<", "max": ">"}[es.mode]
    messages = {
        "nonfinite": f"Monitored metric {es.monitor} = {value} is not finite. Previous best value was "
        f"{float(es.best_score):.3f}. Signaling Trainer to stop.",
        "threshold": f"Stopping threshold reached: {es.monitor} = {value} {order} {es.stopping_threshold}. "
        "Signaling Trainer to stop.",
        "divergence": f"Divergence threshold reached: {es.monitor} = {value} {order} {es.divergence_threshold}. "
        "Signaling Trainer to stop.",
        "patience": f"Monitored metric {es.monitor} did not improve in the last {es.wait_count} records. "
        f"Best score: {float(es.best_score):.3f}. Signaling Trainer to stop.",
    }
    return messages.get(action)


def first_loader_message(monitor: str, key: str) -> tuple[str, dict[str, Any]]:
    """The ``check.metric_resolved`` message and data: the monitor is read from the first validation loader."""
    message = f"MetricEarlyStopping: several validation loaders; `{monitor}` is read from the first one's `{key}`."
    return message, {"metric": monitor, "key": key}


def missing_monitor_message(monitor: str, found: MetricLookup, logs: Any) -> tuple[str, dict[str, Any]]:
    """The ``check.metric_missing`` message (with the close names) and data."""
    names = found.close
    close = f"; did you mean {' or '.join(repr(c) for c in names)}?" if names else ""
    message = f"MetricEarlyStopping: `{monitor}` is not logged, so early stopping is off{close} Logged: {sorted(logs)}."
    return message, {"metric": monitor, "close": names, "logged": sorted(logs)}


def stopped_finding(
    es: EarlyStopping, *, step: int, code: str, reason: str | None, best_step: int, deferred: int
) -> tuple[str, dict[str, Any]]:
    """The ``stop.early`` message and data: why, and where the best value was."""
    best = float(es.best_score)
    finite = math.isfinite(best)
    where = (
        f"Best {es.monitor} = {best:.4g} at step {best_step}." if finite else f"No {es.monitor} had been recorded yet."
    )
    data = {
        "reason": code,
        "monitor": es.monitor,
        "best": best if finite else None,
        "best_step": best_step if finite else None,
        "wait_count": es.wait_count,
        "patience": es.patience,
        "deferred_checks": deferred,
    }
    return f"Stopped at step {step} ({code}): {reason or ''} {where}".replace("  ", " "), data
