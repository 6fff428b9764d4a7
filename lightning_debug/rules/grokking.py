"""Grokking phases from a run's evaluations (``grokking.*`` findings): memorised, generalised, stalled.

Pure: floats in, booleans and a :class:`StallVerdict` out; plus the log-step axis the phases are read on.
Used by :class:`~lightning_debug.callbacks.grokking.GrokkingMonitor`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_debug.stats import Trend, trend


def log10_step(step: int) -> float:
    """The log-x coordinate: log10(step + 1), so step 0 sits at 0 and the axis stays monotonic."""
    return math.log10(step + 1)


def log_spaced_steps(per_decade: int, max_step: int) -> set[int]:
    """Integer steps spaced evenly in log10 (``per_decade`` per factor of ten), from 1 to ``max_step``."""
    n = int(per_decade * math.log10(max(max_step, 1))) + 1
    return {round(10 ** (k / per_decade)) for k in range(n + 1)} & set(range(1, max_step + 1))


def sum_values(
    stage: str, correct: float, tokens: float, nll: float, seq_correct: float, seqs: float
) -> dict[str, float]:
    """A stage's accuracy and mean loss per scored token from its prediction sums (and, when targets are
    sequences, token and whole-sequence accuracy); nothing when no token was scored."""
    out: dict[str, float] = {}
    if tokens > 0:
        out[f"{stage}_acc"], out[f"{stage}_loss"] = correct / tokens, nll / tokens
        if seqs > 0:
            out[f"{stage}_token_acc"], out[f"{stage}_seq_acc"] = correct / tokens, seq_correct / seqs
    return out


def is_memorized(train: float, val: float, *, threshold: float, val_threshold: float, min_gap: float) -> bool:
    """The training metric reached ``threshold`` while the dev metric is at least ``min_gap`` lower and not yet
    at ``val_threshold``: the training set is memorised, the dev set not learnt."""
    return train >= threshold and val <= train - min_gap and val < val_threshold


def is_generalized(val: float, *, val_threshold: float) -> bool:
    """The dev metric reached ``val_threshold``."""
    return val >= val_threshold


@dataclass(frozen=True)
class StallVerdict:
    """``stalled``: long enough after memorisation, the dev metric shows no significant rise and the weight
    norm no significant fall (Theil-Sen 95% CI) over the last ``len(steps)`` evaluations."""

    stalled: bool
    val: Trend
    norm: Trend
    evaluations: int


def assess_stall(
    steps: Sequence[float],
    val: Sequence[float],
    norm: Sequence[float],
    *,
    memorized_step: int,
    step: int,
    stall_factor: float,
    stall_window: int,
) -> StallVerdict | None:
    """Judge the evaluations since memorisation (aligned ``steps`` / ``val`` / ``norm``, oldest first); ``None``
    until ``step`` is ``stall_factor`` x ``memorized_step`` and there are ``stall_window`` evaluations."""
    if step < stall_factor * max(memorized_step, 1) or len(steps) < stall_window:
        return None
    x = list(steps[-stall_window:])
    val_trend = trend(list(val[-stall_window:]), x)
    norm_trend = trend(list(norm[-stall_window:]), x)
    stalled = not val_trend.rising and not norm_trend.falling
    return StallVerdict(stalled=stalled, val=val_trend, norm=norm_trend, evaluations=len(x))
