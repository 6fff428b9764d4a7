"""Loss-metric divergence and overfitting over a window of validation checks (``val.*`` findings).

Pure: lists of floats in, a :class:`DivergenceVerdict` out. Used by
:class:`~lightning_debug.callbacks.divergence.LossMetricDivergence`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lightning_debug.signals import mode_sign
from lightning_debug.stats import MIN_TREND_POINTS, Trend, median, robust_scale, trend_autocorrelated

NOISE_MULTIPLE = 2.0  # the loss rise must also exceed this many step-to-step noise sigmas


@dataclass(frozen=True)
class DivergenceVerdict:
    """One window's evidence; ``diverging`` / ``overfitting`` are the per-check conditions (before persistence).

    ``loss_rise``: the dev loss's trend line now, relative to its best value; ``metric_change``: the metric's
    trend over the window; ``metric_given_back``: the share of its best gain over chance the metric lost.
    """

    loss: Trend
    metric: Trend
    train: Trend | None
    loss_rise: float
    metric_change: float
    metric_given_back: float
    diverging: bool
    overfitting: bool


def assess_divergence(
    loss: list[float],
    metric: list[float],
    *,
    mode: str,
    loss_min: float,
    metric_best: float,
    chance: float | None,
    min_rise: float,
    max_metric_drop: float = 0.1,
    train_loss: list[float] | None = None,
    confidence: float = 0.95,
) -> DivergenceVerdict:
    """The per-check rule over one window (``loss``, ``metric`` aligned, oldest first).

    Divergence needs all of: the dev loss slope's (autocorrelation-widened) interval above zero; the
    metric's robust slope flat or improving; the metric's trend line within ``max_metric_drop`` of its best
    (as a fraction of its best gain over chance: a metric that fell, then plateaued, is plain overfitting);
    the dev loss's trend line at least ``min_rise`` (relative) above its best value; and the metric better
    than chance. Overfitting needs the same dev-loss rise and a training loss whose slope interval is below
    zero.
    """
    sign = mode_sign(mode)
    lt = trend_autocorrelated(loss, confidence=confidence)
    mt = trend_autocorrelated(metric, confidence=confidence)
    tt = None
    if train_loss is not None and int(np.isfinite(np.asarray(train_loss, dtype=float)).sum()) >= MIN_TREND_POINTS:
        tt = trend_autocorrelated(train_loss, confidence=confidence)
    loss_now = lt.intercept + lt.slope * (len(loss) - 1)
    rise = (loss_now - loss_min) / max(abs(loss_min), 1e-12)
    metric_change = mt.slope * (len(metric) - 1)
    metric_now = mt.intercept + mt.slope * (len(metric) - 1)
    gain = abs(metric_best - (chance if chance is not None else 0.0))
    given_back = sign * (metric_best - metric_now) / gain if gain > 0 else 0.0
    above = chance is None or sign * (median(metric) - chance) > 0
    noise = robust_scale(loss) / max(abs(loss_min), 1e-12)  # evaluation noise, relative to the best loss
    loss_up = lt.rising and rise > max(min_rise, NOISE_MULTIPLE * noise)
    return DivergenceVerdict(
        loss=lt,
        metric=mt,
        train=tt,
        loss_rise=rise,
        metric_change=metric_change,
        metric_given_back=given_back,
        diverging=loss_up and sign * mt.slope >= 0 and given_back <= max_metric_drop and above,
        overfitting=loss_up and tt is not None and tt.falling,
    )


def validate_arguments(
    window: int, min_checks: int | None, persistence: int, min_rise: float, max_metric_drop: float, confidence: float
) -> None:
    """``ValueError`` naming the argument for a window, persistence or threshold the rule cannot work with."""
    if window < MIN_TREND_POINTS:
        raise ValueError(
            f"`window` must be at least {MIN_TREND_POINTS} validation checks (the minimum for a trend test "
            f"to reach p < 0.01), got {window}"
        )
    if min_checks is not None and min_checks < 1:
        raise ValueError(f"`min_checks` must be >= 1, got {min_checks}")
    if persistence < 2:
        raise ValueError(f"`persistence` must be >= 2 consecutive checks, got {persistence}")
    if not min_rise >= 0:
        raise ValueError(f"`min_rise` must be >= 0, got {min_rise}")
    if not 0 <= max_metric_drop <= 1:
        raise ValueError(f"`max_metric_drop` must be in [0, 1], got {max_metric_drop}")
    if not 0.5 < confidence < 1:
        raise ValueError(f"`confidence` must be in (0.5, 1), got {confidence}")


def is_new_best(metric: float, best: float, mode: str) -> bool:
    """A finite ``metric`` better than ``best`` in ``mode`` (a NaN ``best``: none yet, so any finite one)."""
    return bool(np.isfinite(metric)) and not mode_sign(mode) * (best - metric) >= 0
