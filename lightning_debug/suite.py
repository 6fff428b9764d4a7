"""``debug_callbacks``: the default suite, zero-config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_debug.report import DebugReport

# name -> (factory(metric, mode, **kwargs), needs a metric). Order = order on the trainer; the report last.
_Factory = Callable[..., Callback]
_SUITE: dict[str, tuple[_Factory, bool]] = {
    "report": (lambda metric, mode, **kw: DebugReport(**kw), False),
}


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


SUITE_COMPONENTS = tuple(_SUITE)
