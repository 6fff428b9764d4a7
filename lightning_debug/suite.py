"""``debug_callbacks``: the default suite, zero-config."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_debug.callbacks.batch_consistency import BatchConsistencyCheck
from lightning_debug.callbacks.calibration import CalibrationMonitor
from lightning_debug.callbacks.decoding import DecodingConsistencyCheck
from lightning_debug.callbacks.divergence import LossMetricDivergence
from lightning_debug.callbacks.early_stopping import MetricEarlyStopping
from lightning_debug.callbacks.errors import ErrorAnalysis
from lightning_debug.callbacks.grokking import GrokkingMonitor
from lightning_debug.callbacks.health import ModelHealthCheck
from lightning_debug.callbacks.loss import LossConvergenceMonitor
from lightning_debug.callbacks.overfit import OverfitBatchCheck
from lightning_debug.report import DebugReport
from lightning_debug.signals import close_names, loss_key, resolve_mode, train_key

Linked = Callable[[str, str], dict[str, Any]]  # (metric, mode) -> the arguments debug_callbacks sets itself


@dataclass(frozen=True)
class Component:
    """One callback of the suite: its class, the arguments taken from ``metric``/``mode`` (``None``: it needs
    no metric), the key names derived from ``metric`` and the suite's own defaults (overrides replace both)."""

    cls: type[Callback]
    linked: Linked | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    names: Callable[[str], dict[str, Any]] | None = None


def _grokking_metrics(metric: str, mode: str) -> dict[str, Any]:
    return {"val_metric": metric}


def _grokking_names(metric: str) -> dict[str, Any]:
    loss = loss_key(metric)
    return {"train_metric": train_key(metric) or f"train_{metric}", "val_loss": loss, "train_loss": train_key(loss)}


# Order = order on the trainer; the report last. Early stopping: Lightning's patience of 3 checks stops noisy
# runs too eagerly for a default that is always on, so 10; patience waits for Trainer(min_epochs/min_steps).
_SUITE: dict[str, Component] = {
    "overfit": Component(OverfitBatchCheck),
    "batch": Component(BatchConsistencyCheck),
    "decoding": Component(DecodingConsistencyCheck),
    "loss": Component(LossConvergenceMonitor),
    "health": Component(ModelHealthCheck),
    "calibration": Component(CalibrationMonitor),
    "errors": Component(ErrorAnalysis),
    "divergence": Component(
        LossMetricDivergence,
        lambda metric, mode: {"metric": metric, "mode": mode},
        names=lambda m: {"loss": loss_key(m)},
    ),
    "grokking": Component(GrokkingMonitor, _grokking_metrics, names=_grokking_names),
    "early_stopping": Component(
        MetricEarlyStopping,
        lambda metric, mode: {"monitor": metric, "mode": mode},
        {"patience": 10, "strict": False, "respect_min_epochs": True},
        names=lambda m: {"loss_monitor": loss_key(m)},
    ),
    "report": Component(DebugReport),
}

SUITE_COMPONENTS = tuple(_SUITE)
_METRIC_COMPONENTS = tuple(name for name, c in _SUITE.items() if c.linked is not None)


def debug_callbacks(metric: str | None = None, mode: str | None = None, **overrides: Any) -> list[Callback]:
    """Every monitor of the package plus :class:`DebugReport`, with defaults that stay silent on a healthy run.

    Args:
        metric: the evaluation metric the module logs (e.g. ``"val_acc"``, ``"val/acc"``). Callbacks that need
            one (divergence, grokking, early stopping) are left out when it is ``None``.
        mode: ``"max"`` if a larger ``metric`` is better, ``"min"`` otherwise; by default inferred from the
            name (loss, error, perplexity, mse/mae, wer/cer -> min; acc, f1, bleu, rouge, auc, precision,
            recall, exact_match -> max). A name that says neither needs ``mode``.
        **overrides: per component, keyword arguments for its constructor, or ``False`` to leave it out,
            e.g. ``debug_callbacks("val_acc", loss={"floor": 0.1}, overfit=False)``.
            Components: see :data:`SUITE_COMPONENTS`.

    Early stopping is on (``MetricEarlyStopping``, patience 10 validation checks, grokking guard on, counting
    only once ``Trainer(min_epochs/min_steps)`` allow a stop); ``early_stopping=False`` leaves it out.
    """
    _check_call(metric, mode, overrides)
    resolved = resolve_mode(metric, mode, where="debug_callbacks") if metric is not None else None
    callbacks: list[Callback] = []
    for name, component in _SUITE.items():
        options = overrides.get(name, {})
        if options is False or (component.linked is not None and metric is None):
            continue
        linked, names = {}, {}
        if component.linked is not None and metric is not None and resolved is not None:
            linked = component.linked(metric, resolved)
            names = component.names(metric) if component.names is not None else {}
        callbacks.append(component.cls(**{**component.defaults, **names, **options, **linked}))
    return callbacks


def _check_call(metric: Any, mode: Any, overrides: dict[str, Any]) -> None:
    """Misuse of ``debug_callbacks`` as a ``ValueError`` naming the argument and suggesting the fix."""
    if metric is not None and (not isinstance(metric, str) or not metric.strip()):
        raise ValueError(
            f"debug_callbacks: `metric` must be the name of one metric your LightningModule logs, as a string "
            f"(e.g. 'val_acc'), or None; got {metric!r}"
        )
    if mode is not None and mode not in ("min", "max"):
        raise ValueError(f"debug_callbacks: `mode` must be 'min', 'max' or None (inferred), got {mode!r}")
    for name, options in overrides.items():
        if name not in _SUITE:
            near = close_names(name, _SUITE)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(f"debug_callbacks: unknown component {name!r}; {hint}components: {list(_SUITE)}")
        if options is not False and not isinstance(options, dict):
            raise ValueError(
                f"debug_callbacks: `{name}=` takes a dict of keyword arguments for "
                f"{_SUITE[name].cls.__name__}, or False to leave it out; got {options!r}"
            )
        if options is not False:
            _check_options(name, options, metric)


def _check_options(name: str, options: dict[str, Any], metric: str | None) -> None:
    component = _SUITE[name]
    cls = component.cls.__name__
    if component.linked is not None:
        if metric is None:
            raise ValueError(
                f"debug_callbacks: `{name}=` configures {cls}, which needs a metric, but `metric` is None; pass "
                f"the metric your module logs, e.g. debug_callbacks('val_acc', {name}={{...}})"
            )
        linked = sorted(set(options) & set(component.linked("m", "max")))
        if linked:
            raise ValueError(
                f"debug_callbacks: `{name}={{{linked[0]!r}: ...}}`: {cls}'s {linked} come from debug_callbacks' "
                f"own `metric` and `mode` arguments; pass them there (e.g. debug_callbacks('val_loss', mode='min'))"
            )
    params = inspect.signature(component.cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    known = [p for p in params if p != "self"]
    for key in options:
        if key not in known:
            near = close_names(key, known)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(f"debug_callbacks: `{name}=` has no argument {key!r} for {cls}; {hint}arguments: {known}")
