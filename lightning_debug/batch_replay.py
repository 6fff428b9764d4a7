"""Replaying a batch for :class:`~lightning_debug.callbacks.batch_consistency.BatchConsistencyCheck`.

The user's ``training_step`` on the batch, on each example alone and on pairs re-collated next to the longest
example, and the module's forward for the dependency matrix: first in the working precision, then, for what
fails there, again in float64 on the CPU (:func:`lightning_debug.precision.float64_on_cpu`), where float noise
shrinks by ~1e8 and a bug stays O(0.1). What to conclude from the numbers is :mod:`lightning_debug.rules.batch`.
Anything that cannot run this way raises :class:`~lightning_debug.batching.CannotCheck`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_debug.batching import CannotCheck, Examples, ForwardFn, output_dependence, padding_of, tensors_of
from lightning_debug.batching import token_counts as count_tokens
from lightning_debug.integrations.hf import position_gradient_norms
from lightning_debug.precision import float64_on_cpu
from lightning_debug.rules.batch import (
    Fit,
    TargetVisibility,
    aggregation_fits,
    all_within,
    best_attribution,
    padding_probe,
    pair_rows,
    rejudged,
    relative_dependence,
    target_visibility,
)


@dataclass
class Cost:
    """What the check ran, for the findings' ``cost``."""

    forwards: int = 0
    vjps: int = 0
    float64_forwards: int = 0

    def as_dict(self, seconds: float) -> dict[str, Any]:
        return {
            "forward_passes": self.forwards,
            "batched_vjps": self.vjps,
            "float64_forward_passes": self.float64_forwards,
            "seconds": round(seconds, 4),
        }


def _identity(batch: Any) -> Any:
    return batch


def _usable(rel: torch.Tensor | str) -> torch.Tensor:
    if isinstance(rel, str):
        raise CannotCheck(rel)
    return rel


def step_loss(module: nn.Module, batch: Any) -> float:
    """The scalar loss ``training_step`` returns for ``batch`` (a tensor, or a mapping's ``"loss"``)."""
    return float(training_loss(module, batch))


def training_loss(module: nn.Module, batch: Any) -> torch.Tensor:
    """:func:`step_loss` as the tensor ``training_step`` returned (differentiable when gradients are on)."""
    try:
        out = module.training_step(batch, 0)  # type: ignore[operator]
    except Exception as err:  # the user's code cannot run this way (e.g. BatchNorm on a batch of 1)
        raise CannotCheck(f"`training_step` raised {type(err).__name__}: {err}") from err
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise CannotCheck(f"`training_step` returned {type(out).__name__}, not a scalar loss")
    return loss


def batch_and_single_losses(module: nn.Module, batch: Any, singles: list[Any]) -> tuple[float, torch.Tensor]:
    """The batch's loss and each example's loss alone (float64)."""
    with torch.no_grad():
        total = step_loss(module, batch)
        return total, torch.tensor([step_loss(module, s) for s in singles], dtype=torch.float64)


def pair_total(module: nn.Module, ex: Examples, i: int, ref: int, convert: Callable[[Any], Any]) -> float:
    """The loss of example ``i`` re-collated next to example ``ref`` (with the padding it then gets)."""
    assert ex.items is not None and ex.collate is not None
    with torch.no_grad():
        pair = ex.collate([ex.items[i], ex.items[ref]])
        return step_loss(module, convert(ex.move(pair)))


@dataclass
class LossReplay:
    """The loss decomposition: ``fits`` of the aggregations (best first) to the batch ``total``, each example's
    ``pads``, the padding ``probe`` rows; after a float64 re-run also ``fits64``, the ``attribution`` (the
    aggregation and its pair rows) and whether the failure stayed (``failed``)."""

    fits: list[Fit]
    total: float
    rtol: float
    pads: list[int]
    probe: list[dict[str, Any]]
    counts: list[dict[str, int]]
    ref: int | None  # the longest unpadded example, when pairs can be re-collated next to it
    fits64: list[Fit] | None = None
    attribution: tuple[str, list[dict[str, Any]]] | None = None
    failed: bool = False


def replay_losses(
    module: nn.Module, ex: Examples, *, rtol: float, atol: float, ignore_index: int, cost: Cost
) -> LossReplay:
    """The loss decomposition in the working precision, with the padding probe: the most padded example next to
    the longest, where per-example differences cannot cancel in the batch total. Raises ``CannotCheck``."""
    counts = [count_tokens(s, ignore_index) for s in ex.singles]
    pads = [padding_of(s, ex.batch) for s in ex.singles]
    probe = padding_probe(pads, [tensors_of(s)[0].numel() for s in ex.singles])
    if ex.items is None or ex.collate is None:
        probe = None
    total, losses = batch_and_single_losses(module, ex.batch, ex.singles)
    pair_totals = {probe.padded: pair_total(module, ex, probe.padded, probe.ref, _identity)} if probe else {}
    cost.forwards += 1 + len(ex.singles) + len(pair_totals)
    fits = aggregation_fits(total, losses, counts, rtol, atol)
    ref = probe.ref if probe else None
    rows = pair_rows(pair_totals, losses, fits[0], ref or 0, pads, counts, rtol, atol)
    return LossReplay(fits, total, rtol, pads, rows, counts, ref)


def rejudge_in_float64(module: nn.Module, ex: Examples, loss: LossReplay, *, atol: float, cost: Cost) -> None:
    """When the working precision fails, the same computation in float64 on the CPU, judged against the
    working-precision tolerance (noise can only shrink, a bug stays); with a reference example, every example
    next to it (itself as the unpadded control), judged with the aggregation that explains the most pairs."""
    if all_within(loss.fits, loss.probe):
        return
    with float64_on_cpu(module) as convert:
        total64, losses64 = batch_and_single_losses(module, convert(ex.batch), [convert(s) for s in ex.singles])
        cost.float64_forwards += 1 + len(ex.singles)
        loss.fits64 = rejudged(aggregation_fits(total64, losses64, loss.counts, loss.rtol, atol), loss.fits)
        loss.failed = loss.fits64[0].ratio > 1
        if loss.ref is not None:
            assert ex.items is not None
            totals = {i: pair_total(module, ex, i, loss.ref, convert) for i in range(len(ex.items))}
            cost.float64_forwards += len(totals)
            args = (loss.ref, loss.pads, loss.counts, loss.rtol, atol)
            loss.attribution = best_attribution(loss.fits64, totals, losses64, *args)
            loss.failed = loss.failed or any(r["ratio"] > 1 for r in loss.attribution[1])


def replay_dependence(
    module: nn.Module, ex: Examples, forward_fn: ForwardFn, *, seed: int, threshold: float, cost: Cost
) -> dict[str, Any]:
    """The relative dependency matrix ``rel`` (and the ``method`` that built it); above ``threshold`` also
    ``rel64``, the same in float64 on the CPU. Raises ``CannotCheck``."""
    b = len(ex.singles)
    matrix, method = output_dependence(module, ex.batch, b, forward_fn, seed)
    cost.vjps += 1  # one forward with gradients and one batched backward
    result: dict[str, Any] = {"rel": _usable(relative_dependence(matrix)), "method": method}
    if float(result["rel"].max()) > threshold:
        with float64_on_cpu(module) as convert:
            matrix64, _ = output_dependence(module, convert(ex.batch), b, forward_fn, seed)
        cost.float64_forwards += 1
        result["rel64"] = _usable(relative_dependence(matrix64))
    return result


def replay_target_visibility(module: nn.Module, ex: Examples, cost: Cost) -> tuple[TargetVisibility, Any] | None:
    """For a module holding a causal LM: does its training loss read the input at the last position
    (:func:`~lightning_debug.rules.batch.target_visibility`)? The verdict and the ``(B, T)`` gradient norms;
    ``None`` for other modules, or when the training step cannot run (the loss decomposition says why)."""
    try:
        norms = position_gradient_norms(module, ex.batch, lambda batch: training_loss(module, batch))
    except CannotCheck:
        return None
    if norms is None:
        return None
    cost.vjps += 1
    return target_visibility(norms), norms
