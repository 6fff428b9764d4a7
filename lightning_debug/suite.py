"""``debug_callbacks``: the default suite, zero-config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_debug.callbacks.batch_consistency import BatchConsistencyCheck
from lightning_debug.callbacks.calibration import CalibrationMonitor
from lightning_debug.callbacks.decoding import DecodingConsistencyCheck
from lightning_debug.callbacks.divergence import LossMetricDivergence
from lightning_debug.callbacks.early_stopping import MetricEarlyStopping, train_key
from lightning_debug.callbacks.errors import ErrorAnalysis
from lightning_debug.callbacks.grokking import GrokkingMonitor
from lightning_debug.callbacks.loss import LossConvergenceMonitor
from lightning_debug.callbacks.overfit import OverfitBatchCheck
from lightning_debug.report import DebugReport


def _grokking(metric: str, mode: str, **kw: Any) -> Callback:
    return GrokkingMonitor(**{"val_metric": metric, "train_metric": train_key(metric) or f"train_{metric}", **kw})


def _early_stopping(metric: str, mode: str, **kw: Any) -> Callback:
    # Lightning's patience of 3 checks stops noisy runs too eagerly for a default that is always on.
    return MetricEarlyStopping(**{"monitor": metric, "mode": mode, "patience": 10, "strict": False, **kw})


# name -> (factory(metric, mode, **overrides), needs a metric). Order = order on the trainer; the report last.
_SUITE: dict[str, tuple[Callable[..., Callback], bool]] = {
    "overfit": (lambda metric, mode, **kw: OverfitBatchCheck(**kw), False),
    "batch": (lambda metric, mode, **kw: BatchConsistencyCheck(**kw), False),
    "decoding": (lambda metric, mode, **kw: DecodingConsistencyCheck(**kw), False),
    "loss": (lambda metric, mode, **kw: LossConvergenceMonitor(**kw), False),
    "calibration": (lambda metric, mode, **kw: CalibrationMonitor(**kw), False),
    "errors": (lambda metric, mode, **kw: ErrorAnalysis(**kw), False),
    "divergence": (lambda metric, mode, **kw: LossMetricDivergence(**{"metric": metric, "mode": mode, **kw}), True),
    "grokking": (_grokking, True),
    "early_stopping": (_early_stopping, True),
    "report": (lambda metric, mode, **kw: DebugReport(**kw), False),
}

SUITE_COMPONENTS = tuple(_SUITE)


def debug_callbacks(metric: str | None = None, mode: str = "max", **overrides: Any) -> list[Callback]:
    """Every monitor of the package plus :class:`DebugReport`, with defaults that stay silent on a healthy run.

    Args:
        metric: the evaluation metric the module logs (e.g. ``"val_acc"``). Callbacks that need one are
            left out when it is ``None``.
        mode: ``"max"`` if a larger ``metric`` is better, ``"min"`` otherwise.
        **overrides: per component, keyword arguments for its constructor, or ``False`` to leave it out,
            e.g. ``debug_callbacks("val_acc", loss={"floor": 0.1}, overfit=False)``.
            Components: see :data:`SUITE_COMPONENTS`.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}")
    unknown = set(overrides) - set(_SUITE)
    if unknown:
        raise ValueError(f"Unknown component(s) {sorted(unknown)}; known: {list(_SUITE)}")
    callbacks: list[Callback] = []
    for name, (factory, needs_metric) in _SUITE.items():
        options = overrides.get(name, {})
        if options is False or (needs_metric and metric is None):
            continue
        if not isinstance(options, dict):
            raise ValueError(f"Override for {name!r} must be a dict of keyword arguments or False")
        callbacks.append(factory(metric, mode, **options))
    return callbacks
