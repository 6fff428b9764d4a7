"""The sentences and evidence of the one-batch memorisation findings (``startup.*``, ``loss.floor_high``) of
:class:`~lightning_debug.callbacks.overfit.OverfitBatchCheck`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lightning_debug.findings import Finding
from lightning_debug.rules.loss import Floor, probability_input_floor
from lightning_debug.rules.overfit import STALL_FINDINGS, START_BUDGET, Memorisation, StartCost


@dataclass(frozen=True)
class Worded:
    """A finding to emit: its check id, sentence, evidence and severity (``None``: the catalogue's)."""

    check: str
    message: str
    data: dict[str, Any]
    severity: str | None = None


def deferred(max_steps: int, cost: StartCost) -> Worded:
    return Worded(
        "startup.overfit_deferred",
        f"One-batch memorisation test deferred: up to {max_steps} steps on one batch would be {cost.share:.0%} "
        f"of a {cost.steps:g}-step {cost.span} (budget {START_BUDGET:.0%}). It runs if the training loss stalls "
        f"({' or '.join(STALL_FINDINGS)}) or the run ends far from its floor.",
        {"max_steps": max_steps, "epoch_steps": cost.steps, "share": cost.share, "budget": START_BUDGET},
    )


def memorisation(
    m: Memorisation,
    curve: list[float],
    floor: Floor,
    first: float,
    seconds: float,
    trigger: Finding | None,
    step: int,
    settings: dict[str, Any],
) -> Worded:
    """The finding of one test: ``first`` is where progress is measured from (the run's start, when deferred),
    ``step`` the run's global step, ``settings`` the check's ``max_steps``, ``rel_tol`` and ``abs_tol``."""
    steps = len(curve) - 1
    model = "A copy of the model" if trigger is None else f"A copy of the model at step {step}"
    why = (
        f" (run because of {trigger.check}; progress measured from the run's start {first:.4g})"
        if trigger is not None
        else ""
    )
    finite = all(map(math.isfinite, curve))
    data = {
        "trigger": trigger.check if trigger is not None else None, "start": first, "steps": steps,
        "max_steps": settings["max_steps"], "seconds": seconds,
        "first_loss": curve[0], "final_loss": curve[-1], "best_loss": min(curve) if finite else math.nan,
        "floor": floor.value, "floor_source": floor.source, "rel_tol": settings["rel_tol"],
        "abs_tol": settings["abs_tol"], "curve": curve, "target": m.target, "closed": m.closed, "status": m.status,
    }  # fmt: skip
    change = f"loss {curve[0]:.4g} -> {curve[-1]:.4g}"
    if m.status in ("passed", "mostly"):
        how = "memorised one batch" if m.status == "passed" else f"closed {m.closed:.0%} of the gap on one batch"
        message = f"{model} {how}: {change} in {steps} steps (floor {floor.describe()}; {seconds:.2f} s){why}."
        return Worded("startup.overfit_ok", message, data)
    if m.status == "floor_high":
        return floor_high(m, f"{model} {change} in {steps} steps{why}", floor, data)
    slow = m.status == "slow"
    message = (
        f"{model} could not memorise one batch{why}: {change} after {steps} steps, {m.closed:.0%} of the "
        f"way to the floor {floor.describe()} (needed <= {m.target:.4g})"
        + ("; it learns, but slowly: raise the learning rate or `max_steps`" if slow else "")
        + f". Check took {seconds:.2f} s."
    )
    return Worded("startup.cannot_overfit", message, data, "warning" if slow else None)


def floor_high(m: Memorisation, what: str, floor: Floor, data: dict[str, Any]) -> Worded:
    """The curve learned, then levelled off far above the floor: the model cannot become confident. A warning
    when the level is the signature of probabilities fed to cross-entropy; else info, since label smoothing
    written into the loss call, soft targets or a data entropy the checks cannot see level off the same way."""
    c = m.probability_classes
    signature = (
        f" {m.level:.4g} is just above log(1 + (C-1)/e) = {probability_input_floor(c):.4g} for "
        f"C = {c}: the floor of {c}-class cross-entropy fed probabilities instead of logits."
        if c is not None
        else ""
    )
    unknown = "" if c is not None else " Or the loss has a floor the checks do not know (set `floor`)."
    return Worded(
        "loss.floor_high",
        f"{what}: it levelled off at {m.level:.4g}, {1 - m.closed:.0%} of the way from the floor "
        f"{floor.describe()} to where it started: the model cannot become confident on one batch."
        f"{signature}{unknown}",
        {**data, "level": m.level, "probability_classes": c},
        "warning" if c is not None else None,
    )
