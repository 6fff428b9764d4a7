"""Early-stopping decisions over plain numbers: smoothing, improvement, patience, warm-up and the grokking guard.

:class:`~lightning_debug.callbacks.early_stopping.MetricEarlyStopping` feeds these one value per check and
words what they return. With the extras off (no smoothing, ``relative=False``, no warm-up, no deferral) they
are Lightning's ``EarlyStopping._evaluate_stopping_criteria``: the same order (non-finite, stopping threshold,
divergence threshold, improvement, patience), the same ``min_delta`` sign semantics (a negative ``min_delta``
lets a worsening of up to ``|min_delta|`` count as an improvement) and the same arithmetic (values keep their
dtype: pass ``numpy.float32`` scalars for float32 metrics and the comparisons round as torch's do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_debug.stats import median, theil_sen_slope

SMOOTHING = (None, "median", "ema")


def _sign(mode: str) -> float:
    return 1.0 if mode == "max" else -1.0


def improved(value: Any, best: Any, *, mode: str, min_delta: float, relative: bool = False) -> bool:
    """Lightning's test ``monitor_op(value - signed_min_delta, best)``, where the signed ``min_delta`` is
    ``+min_delta`` for ``"max"`` and ``-min_delta`` for ``"min"``: a positive ``min_delta`` is a margin to beat,
    a negative one a tolerated worsening. ``relative``: the margin is ``min_delta * |best|`` (``min_delta >= 0``;
    like ``ReduceLROnPlateau(threshold_mode="rel")``), none while ``best`` is not finite yet."""
    delta = min_delta
    if relative:
        delta = min_delta * abs(float(best)) if math.isfinite(float(best)) else 0.0
    shifted = value - _sign(mode) * delta
    return bool(shifted > best) if mode == "max" else bool(shifted < best)


def beats_threshold(value: Any, threshold: float | None, *, mode: str) -> bool:
    """``stopping_threshold`` reached: strictly better than it (Lightning's ``monitor_op(value, threshold)``)."""
    return threshold is not None and (bool(value > threshold) if mode == "max" else bool(value < threshold))


def past_divergence(value: Any, threshold: float | None, *, mode: str) -> bool:
    """``divergence_threshold`` crossed: strictly worse than it (Lightning's ``monitor_op(-value, -threshold)``)."""
    return threshold is not None and (bool(value < threshold) if mode == "max" else bool(value > threshold))


@dataclass(frozen=True)
class Smoothed:
    """A smoothed value and the smoother's new state (the raw window and the EMA)."""

    value: Any  # a float, or a numpy scalar of the raw value's dtype (`smoothed`)
    recent: list[float]
    ema: float | None


def smooth(value: float, recent: list[float], ema: float | None, *, method: str | None, window: int) -> Smoothed:
    """``None``: ``value`` itself; ``"median"``: the lower median of the last ``window`` raw values (an observed
    value, never an average of two); ``"ema"``: exponential moving average with span ``window``."""
    recent = [*recent, float(value)][-window:]
    if method == "median":
        return Smoothed(sorted(recent)[(len(recent) - 1) // 2], recent, ema)
    if method == "ema":
        alpha = 2.0 / (window + 1)
        ema = float(value) if ema is None else alpha * float(value) + (1 - alpha) * ema
        return Smoothed(ema, recent, ema)
    return Smoothed(value, recent, ema)


def smoothed(raw: Any, recent: list[float], ema: float | None, *, method: str | None, window: int) -> Smoothed:
    """:func:`smooth` for a raw check value of any float dtype: the smoothed value keeps ``raw``'s dtype (so the
    comparisons round as before), and a non-finite ``raw`` passes through unsmoothed, leaving the state as it was
    (a NaN would poison the window and the EMA)."""
    if not math.isfinite(float(raw)):
        return Smoothed(raw, recent, ema)
    s = smooth(raw, recent, ema, method=method, window=window)
    return Smoothed(np.asarray(s.value, dtype=np.asarray(raw).dtype)[()], s.recent, s.ema)


@dataclass(frozen=True)
class StopVerdict:
    """What one check decided. ``action`` is one of ``nonfinite``, ``threshold``, ``divergence`` (stops),
    ``improved``, ``warmup`` (not counted), ``deferred`` (the guard held patience), ``wait`` (counted) and
    ``patience`` (counted and exhausted: stops)."""

    action: str
    should_stop: bool
    wait_count: int

    @property
    def improved(self) -> bool:
        return self.action == "improved"


def evaluate(
    value: Any,
    best: Any,
    wait_count: int,
    *,
    mode: str,
    min_delta: float = 0.0,
    relative: bool = False,
    patience: int = 3,
    check_finite: bool = True,
    stopping_threshold: float | None = None,
    divergence_threshold: float | None = None,
    warming: bool = False,
    deferral: str | None = None,
) -> StopVerdict:
    """One check in Lightning's order. ``warming``: no threshold stop and no patience counted (the best is still
    tracked); ``deferral``: the guard's phase, if it would hold patience now. ``patience`` is taken as
    Lightning takes it (any int: ``wait_count >= patience`` after counting, so 0 or less stops at the first
    check without improvement)."""
    if check_finite and not math.isfinite(float(value)):
        return StopVerdict("nonfinite", True, wait_count)
    if not warming and beats_threshold(value, stopping_threshold, mode=mode):
        return StopVerdict("threshold", True, wait_count)
    if not warming and past_divergence(value, divergence_threshold, mode=mode):
        return StopVerdict("divergence", True, wait_count)
    if improved(value, best, mode=mode, min_delta=min_delta, relative=relative):
        return StopVerdict("improved", False, 0)
    if warming:
        return StopVerdict("warmup", False, wait_count)
    if deferral is not None:
        return StopVerdict("deferred", False, wait_count)
    return StopVerdict("patience" if wait_count + 1 >= patience else "wait", wait_count + 1 >= patience, wait_count + 1)


def in_warmup(
    *, judged: int, warmup: int, unit: str, global_step: int, epoch: int, min_epochs: int, min_steps: int
) -> bool:
    """Before ``warmup`` checks (``unit="checks"``) or steps, or while ``Trainer(min_epochs, min_steps)`` would not
    let the run stop yet (Lightning #19966; pass 0 for both to leave that out)."""
    before = judged <= warmup if unit == "checks" else global_step < warmup
    return before or epoch + 1 < min_epochs or global_step < min_steps


# ---- the grokking guard ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Deferral:
    """Why patience should not be counted now: ``phase`` is ``memorising`` or ``saturated``."""

    phase: str
    train_first: float
    train_last: float
    target: float | None
    falling: dict[str, float]  # series name -> relative fall per check (saturated phase)


def guard_target(best_possible: float | None, *, mode: str, in_unit_interval: bool) -> float | None:
    """The best value the monitored metric can take: ``best_possible``, else 1.0 for a ``"max"`` metric whose
    values all lay in [0, 1] (accuracy-like), else unknown (the saturation half of the guard is then off)."""
    if best_possible is None and mode == "max" and in_unit_interval:
        return 1.0
    return best_possible


def relative_slope(series: list[float]) -> float | None:
    """Robust (Theil-Sen) slope per check relative to the series' median level; ``None`` under 3 finite points."""
    finite = [v for v in series if math.isfinite(v)]
    if len(finite) < 3:
        return None
    level = abs(median(finite))
    return theil_sen_slope(finite) / level if level > 0 else 0.0


def guard(
    value: float,
    train: list[float],
    *,
    mode: str,
    chance: float | None,
    target: float | None,
    tolerance: float,
    min_change: float,
    loss: list[float] | None = None,
    norm: list[float] | None = None,
) -> Deferral | None:
    """The phases that precede late generalisation (grokking), from the dev ``value`` and the training metric's
    recent ``train`` values (oldest first):

    - ``memorising``: the training metric improved by more than ``tolerance`` over the window and is clearly
      better than chance, while the dev metric is within ``tolerance`` of chance. A model at chance on its
      training data too is learning nothing yet: not deferred;
    - ``saturated``: the training metric is within ``tolerance`` of ``target`` (its best possible value), the dev
      metric is not, and the dev ``loss`` or the weight ``norm`` falls by more than ``min_change`` per check.

    ``None`` when neither holds, or the dev metric is already within ``tolerance`` of ``target``."""
    train = [v for v in train if math.isfinite(v)]
    if not train:
        return None
    sign = _sign(mode)
    if target is not None and sign * (target - value) <= tolerance:
        return None
    if (
        chance is not None
        and sign * (value - chance) <= tolerance
        and sign * (train[-1] - train[0]) > tolerance
        and sign * (train[-1] - chance) > tolerance
    ):
        return Deferral("memorising", train[0], train[-1], target, {})
    if target is not None and sign * (target - train[-1]) <= tolerance:
        slopes = {name: relative_slope(s or []) for name, s in (("loss", loss), ("norm", norm))}
        falling = {name: -s for name, s in slopes.items() if s is not None and s < -min_change}
        if falling:
            return Deferral("saturated", train[0], train[-1], target, falling)
    return None
