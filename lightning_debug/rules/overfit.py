"""The one-batch memorisation verdict: a pure function of the loss curve the test produced.

A correct model of reasonable size drives the loss on one batch to its floor. What the curve says otherwise:
``stuck`` (closed under a quarter of the gap: a bug or no capacity), ``slow`` (still falling when the budget
ran out: learning rate or optimizer), ``floor_high`` (it learned, then levelled off far above the floor: the
model cannot become confident, e.g. probabilities fed to cross-entropy), ``mostly`` (three quarters or more)
and ``passed``. The floor is the batch's own when examples with identical contexts carry different targets
(:func:`batch_floor`): no model can tell them apart, so it cannot go below the entropy of their targets.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lightning_debug.rules.loss import Floor, classes_of_probability_floor

SLOW_BUT_LEARNING = 0.25  # a failed check that closed at least this much of the gap learns, if slowly
MOSTLY_MEMORISED = 0.75  # ...and this much is a pass: a healthy small transformer gets ~90% of the way in 100 steps
LEVELLED_TAIL = 0.2  # the last fifth of the curve...
LEVELLED_MOVE = 0.02  # ...moving less than this share of the starting gap has levelled off


@dataclass(frozen=True)
class Memorisation:
    status: str  # passed, mostly, floor_high, slow, stuck
    closed: float  # share of the starting gap closed by the last step
    target: float  # the loss that passes
    level: float  # where the curve ended
    probability_classes: int | None  # the class count whose probability-input floor matches the level


def reference_start(first: float, start: float | None) -> float:
    """The loss the test's progress is measured from: the run's start when known and higher, else the curve's."""
    return max(first, start) if start is not None and math.isfinite(start) and math.isfinite(first) else first


def passes(loss: float, first: float, floor: float, rel_tol: float, abs_tol: float) -> bool:
    gap, gap0 = loss - floor, first - floor
    return gap <= abs_tol or (gap0 > 0 and gap <= rel_tol * gap0)


def assess_memorisation(
    curve: list[float],
    floor: float,
    rel_tol: float,
    abs_tol: float,
    classes: int | None = None,
    start: float | None = None,
) -> Memorisation:
    """The verdict on a one-batch curve (the loss before each step, the last after the last step); ``classes``,
    if known, to recognise the floor of probabilities fed to cross-entropy. ``start``: where the run began, for
    a test on a model already trained (deferred): its gap to close is the run's, not what is left of it."""
    first, last = reference_start(curve[0], start), curve[-1]
    gap0 = first - floor
    target = max(abs_tol, rel_tol * gap0) + floor if math.isfinite(gap0) else math.nan
    closed = 1 - (last - floor) / gap0 if gap0 > 0 and math.isfinite(last) else 0.0
    tail = curve[-max(2, math.ceil(LEVELLED_TAIL * len(curve))) :]
    levelled = all(map(math.isfinite, tail)) and gap0 > 0 and (max(tail) - min(tail)) < LEVELLED_MOVE * gap0
    if passes(last, first, floor, rel_tol, abs_tol):
        status = "passed"
    elif closed >= MOSTLY_MEMORISED:
        status = "mostly"
    elif closed >= SLOW_BUT_LEARNING and levelled and len(curve) > 10:
        status = "floor_high"
    elif closed >= SLOW_BUT_LEARNING:
        status = "slow"
    else:
        status = "stuck"
    return Memorisation(status, closed, target, last, classes_of_probability_floor(last, classes))


@dataclass(frozen=True)
class BatchFloor:
    value: float  # the lowest mean loss any model reaches on the batch
    shared: int  # targets whose context also carries a different target
    targets: int


def batch_floor(pairs: Iterable[tuple[Hashable, int]], smoothing: tuple[int, float] | None = None) -> BatchFloor:
    """The lowest mean cross-entropy on one batch of ``(context, target)`` pairs. Pairs with the same context
    must share one prediction, so a group costs the entropy of its target mix (smoothed by ``(classes, eps)``
    label smoothing): a language model's first word after BOS, duplicated inputs with different labels. With
    every context unique it is label smoothing's floor (0 without)."""
    groups: defaultdict[Hashable, Counter[int]] = defaultdict(Counter)
    for context, target in pairs:
        groups[context][target] += 1
    classes, eps = smoothing if smoothing is not None else (0, 0.0)
    total = shared = 0
    loss = 0.0
    for counts in groups.values():
        n = sum(counts.values())
        total += n
        shared += n if len(counts) > 1 else 0
        mix = [(1 - eps) * c / n + (eps / classes if eps else 0.0) for c in counts.values()]
        entropy = -sum(t * math.log(t) for t in mix)
        if eps:
            off = eps / classes
            entropy -= (classes - len(counts)) * off * math.log(off)
        loss += n * entropy
    return BatchFloor(loss / total if total else 0.0, shared, total)


STALL_FINDINGS = ("loss.not_decreasing", "loss.plateau")  # with when="stall"/"auto", the findings that run the test
START_BUDGET = 0.05  # with when="auto", run at start only if max_steps is at most this share of an epoch's steps


def asks_why(check: str, data: Mapping[str, Any]) -> bool:
    """A loss finding that runs a deferred test: a stall, or a run that ended (or levelled off) far from its
    floor (its data says ``stalled``)."""
    return check in STALL_FINDINGS or (check.startswith("loss.") and data.get("stalled") is True)


@dataclass(frozen=True)
class StartCost:
    """What the test costs at the start: ``share`` of the ``steps`` of the first ``span`` (epoch, or run)."""

    steps: float
    share: float
    span: str

    @property
    def affordable(self) -> bool:
        return self.share <= START_BUDGET


def start_cost(max_steps: int, run_steps: int, epoch_batches: float) -> StartCost:
    """The test's ``max_steps`` against the first epoch (or the whole run, if shorter: ``run_steps`` < 0 is
    unbounded)."""
    run = run_steps if run_steps >= 0 else math.inf
    steps = min(epoch_batches, run)
    share = max_steps / steps if steps > 0 else math.inf
    return StartCost(steps, share, "run" if run < epoch_batches else "epoch")


def memorisation_floor(
    floor: Floor, pairs: Iterable[tuple[Hashable, int]] | None, smoothing: tuple[int, float] | None
) -> Floor:
    """The evidence ``floor``, raised to the batch's own where targets share their context (:func:`batch_floor`)."""
    if not pairs:
        return floor
    own = batch_floor(pairs, smoothing)
    if own.shared == 0 or own.value <= floor.value:
        return floor
    return Floor(own.value, f"this batch's own: {own.shared} of {own.targets} targets share their context with another")
