"""Run the user's code for a check without leaving a trace.

Startup checks call ``training_step`` and friends on the real module or a copy. What they must not change:
RNG streams (so the run is reproducible with or without the checks), ``self.log`` results, train/eval
modes, and ``requires_grad`` / ``.grad`` of parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the torch, numpy and Python RNG states on exit."""
    states = _collect_rng_states()
    try:
        yield
    finally:
        _set_rng_states(states)


@contextlib.contextmanager
def silenced_logging(module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` become no-ops, so a check leaves no logged metrics behind."""

    def _no_log(*args: Any, **kwargs: Any) -> None:
        return None

    saved = {name: module.__dict__.get(name) for name in ("log", "log_dict")}
    module.log = _no_log  # type: ignore[method-assign]
    module.log_dict = _no_log  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value


@contextlib.contextmanager
def preserved_modes(module: torch.nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag on exit."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def preserved_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` flag and its ``.grad`` (the same tensor, or ``None``) on exit.

    A check that freezes parameters or runs ``backward()`` must not leave a gradient for the next optimizer
    step; the values are not copied, so a check must never write into an existing ``.grad`` in place.
    """
    saved = [(p, p.requires_grad, p.grad) for p in module.parameters()]
    try:
        yield
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad


_isolated_depth = 0  # isolated() blocks running now


def isolating() -> bool:
    """Whether a check's own run of user code is under way (inside :func:`isolated`): what watches the run's
    own steps (``health_probes.FirstStep``) must not count it."""
    return _isolated_depth > 0


@contextlib.contextmanager
def isolated(module: pl.LightningModule) -> Iterator[None]:
    """All of the above together: what every startup check wraps its work in."""
    global _isolated_depth
    _isolated_depth += 1
    try:
        with preserved_rng(), silenced_logging(module), preserved_modes(module), preserved_parameters(module):
            yield
    finally:
        _isolated_depth -= 1


def batch_stat_modules(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Submodules that use batch statistics in train mode (they mix examples by design)."""
    kinds = torch.nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d and SyncBatchNorm
    return [(name, m) for name, m in module.named_modules() if isinstance(m, kinds)]
