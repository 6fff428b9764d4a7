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

import numpy as np

from lightning_debug.rules.loss import Floor, classes_of_probability_floor, label_smoothing_floor
from lightning_debug.stats import finite_median

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


RECOGNISED_SMOOTHING = 0.1  # the label smoothing whose floor a settled curve is recognised at (the common value)
SETTLED_STEPS = 10  # a curve settled at its lowest level: reached at least this many steps before its end...
SETTLED_TOLERANCE = 0.03  # ...within this share above the smoothing's floor
PROBABILITY_MARGIN = 0.1  # a level within this share above the probability-input floor is that fault's first


def settled_level(curve: list[float]) -> float:
    """The lowest level of a one-batch curve, robust to single spikes (the minimum of its running median of 5),
    if the curve settled there: reached at least :data:`SETTLED_STEPS` steps before its end (a curve still
    falling at its end has not settled, however slowly it falls). NaN otherwise."""
    if len(curve) < 2 * SETTLED_STEPS or not all(map(math.isfinite, curve)):
        return math.nan
    running = finite_median(np.lib.stride_tricks.sliding_window_view(np.asarray(curve, dtype=float), 5), -1)
    low = int(np.argmin(running))  # the first of equal minima: a flat curve settled at its start
    return float(running[low]) if low <= len(running) - 1 - SETTLED_STEPS else math.nan


def recognised_smoothing_floor(curve: list[float], classes: int | None) -> Floor | None:
    """The floor of label smoothing 0.1 when the curve settled on it (from above, within
    :data:`SETTLED_TOLERANCE`), for a module that does not declare its smoothing (``F.cross_entropy(...,
    label_smoothing=0.1)`` inline): a loss cannot go below the entropy of its smoothed target, so a memorising
    curve that stops exactly there has reached its floor. ``None`` without the class count, or when the level is
    within :data:`PROBABILITY_MARGIN` above the floor of probabilities fed to cross-entropy (a fault: for 2
    classes 0.313, against smoothing 0.2's 0.325). Only 0.1: each value recognised is a level at which a
    bottleneck's curve could be mistaken for a smoothed one."""
    level = settled_level(curve)
    if classes is None or classes < 2 or not math.isfinite(level):
        return None
    if classes_of_probability_floor(level, classes, tolerance=PROBABILITY_MARGIN):
        return None
    floor = label_smoothing_floor(classes, RECOGNISED_SMOOTHING)
    if floor <= level <= floor * (1 + SETTLED_TOLERANCE):
        where = "where one-batch memorisation settled"
        return Floor(floor, f"label smoothing {RECOGNISED_SMOOTHING:g} over {classes} classes, {where}")
    return None


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
