"""The sentences, evidence and logged scalars of ``val.loss_metric_divergence`` and ``val.overfitting``
(:class:`~lightning_debug.callbacks.divergence.LossMetricDivergence`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning_debug.rules.divergence import DivergenceVerdict
from lightning_debug.stats import Trend


@dataclass(frozen=True)
class Window:
    """The trailing window a verdict was made over, and the best values it was judged against."""

    history: dict[str, list[float]]  # "loss", "metric", "train", "step": one value per validation check
    loss_min: float
    loss_min_step: int
    metric_best: float
    chance: float | None
    size: int  # validation checks in the window


def scalars(prefix: str, v: DivergenceVerdict) -> dict[str, float]:
    """The slopes and the rise logged at every judged check."""
    out = {
        prefix + "loss_slope": v.loss.slope,
        prefix + "loss_slope_low": v.loss.low,
        prefix + "metric_slope": v.metric.slope,
        prefix + "metric_slope_low": v.metric.low,
        prefix + "metric_slope_high": v.metric.high,
        prefix + "loss_rise": v.loss_rise,
        prefix + "diverging": float(v.diverging),
    }
    if v.train is not None:
        out[prefix + "train_loss_slope"] = v.train.slope
    return out


def _evidence(v: DivergenceVerdict, w: Window, loss: str) -> tuple[str, str, dict[str, Any]]:
    """The window, the loss rise in words, and the data both findings carry."""
    h = w.history
    steps = (int(h["step"][0]), int(h["step"][-1]))
    evidence = {
        "loss_trend": v.loss.as_dict(),
        "metric_trend": v.metric.as_dict(),
        "loss_rise": v.loss_rise,
        "loss_min": w.loss_min,
        "loss_min_step": w.loss_min_step,
        "metric_change": v.metric_change,
        "metric_best": w.metric_best,
        "metric_given_back": v.metric_given_back,
        "metric_first": h["metric"][0],
        "metric_last": h["metric"][-1],
        "chance": w.chance,
        "window": w.size,
        "steps": list(steps),
    }
    span = f"over the last {w.size} validation checks (steps {steps[0]}-{steps[1]})"
    rise = (
        f"{loss} rose {v.loss_rise:.0%} above its minimum {w.loss_min:.4g} (step {w.loss_min_step}), "
        f"slope {v.loss.slope:+.3g}/check (95% CI {v.loss.low:+.3g} to {v.loss.high:+.3g})"
    )
    return span, rise, evidence


def divergence(v: DivergenceVerdict, w: Window, loss: str, metric: str) -> tuple[str, dict[str, Any]]:
    span, rise, evidence = _evidence(v, w, loss)
    h = w.history
    chance = "" if w.chance is None else f", above chance {w.chance:.3g}"
    message = (
        f"{span}: {rise}, while {metric} held or improved "
        f"({h['metric'][0]:.4g} -> {h['metric'][-1]:.4g}, slope {v.metric.slope:+.3g}/check{chance}). "
        "The model is growing confident in its wrong answers; select and stop on the metric, not the loss."
    )
    return message, evidence


def overfitting(v: DivergenceVerdict, train: Trend, w: Window, loss: str, train_loss: str) -> tuple[str, dict]:
    span, rise, evidence = _evidence(v, w, loss)
    message = (
        f"{span}: {rise}, while {train_loss} kept falling "
        f"(slope {train.slope:+.3g}/check, 95% CI {train.low:+.3g} to {train.high:+.3g})."
    )
    return message, {**evidence, "train_loss_trend": train.as_dict()}
