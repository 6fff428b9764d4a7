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
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from lightning_debug.rules.loss import classes_of_probability_floor

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
