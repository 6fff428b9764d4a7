"""The sentences and evidence of the ``loss.*`` findings (:class:`~lightning_debug.callbacks.loss.
LossConvergenceMonitor`): every one names the floor the loss was judged against and where it comes from."""

from __future__ import annotations

import math
from typing import Any

from lightning_debug.findings import Finding, check_info
from lightning_debug.rules import loss as rules

PROVISIONAL_STALL = (
    " Info until the run ends (a warning then if it is still flat): the one-batch memorisation test tells now "
    "whether the model can learn at all."
)


def verdict_message(code: int, v: rules.LossVerdicts, floor: rules.Floor, start: float, span: float, t: int) -> str:
    """One sentence with the numbers for a trend verdict."""
    tr, level, w = v.trend, float(v.level), int(span)
    slope = f"slope {float(tr.slope):.2g}/batch, 95% CI [{float(tr.low):.2g}, {float(tr.high):.2g}]"
    progress = describe_progress(start, level, floor)
    if code == rules.DIVERGING:
        rise = float(tr.slope) * span
        return (
            f"The training loss is rising: {rise:+.3g} over the last {w} batches ({slope});"
            f" now {level:.4g}, {progress}."
        )
    if code == rules.NOT_DECREASING:
        return f"After {t} batches the training loss is still {level:.4g}: {progress}; its trend is flat ({slope})."
    if code == rules.PLATEAU:
        return (
            f"The training loss has plateaued at {level:.4g}, {progress}: over the last {w} batches its {slope}; "
            f"at the fastest plausible rate another {t} batches would lower it by at most {float(v.reachable):.3g}."
        )
    if code == rules.CONVERGED:
        return f"The training loss reached {level:.4g}, close to its floor: {progress}."
    how = "still falling" if float(tr.high) < 0 else "neither flat nor significantly falling"
    return f"The run ended after {t} batches with the training loss {how} ({slope}): {level:.4g}, {progress}."


def verdict_evidence(
    v: rules.LossVerdicts, floor: rules.Floor, start: float, span: float, batches: int, lr: Any, peak_lr: float,
    loss_rules: rules.LossRules,
) -> dict[str, Any]:  # fmt: skip
    """The data of a trend verdict's finding (``stalled``: :func:`rules.stalled`)."""
    code, tr = int(v.code), v.trend
    evidence = {
        "lr": lr, "peak_lr": peak_lr, "level": float(v.level), "start": start, "window": int(span),
        "slope": float(tr.slope), "slope_low": float(tr.low), "slope_high": float(tr.high),
        "p_value": float(tr.p_value), "confidence": loss_rules.confidence, "batches": batches,
        "reachable_drop": float(v.reachable), "drop": float(v.drop),
        "stalled": rules.stalled(code, bool(v.far), floor.value, start, loss_rules),
    }  # fmt: skip
    if code == rules.DIVERGING:
        evidence["rule"] = "rising"
    return evidence


def describe_progress(start: float, level: float, floor: rules.Floor) -> str:
    """How far the loss went from its start towards the floor, in words a blow-up cannot turn absurd."""
    gap0 = start - floor.value
    where = f"started at {start:.4g}, floor {floor.describe()}"
    if not math.isfinite(level):
        return f"not finite ({where})"
    if level > start:
        return f"above where it started ({where})"
    closed = (start - level) / gap0 if gap0 > 0 else math.nan
    if not 0 <= closed <= 1:
        return f"below the floor ({where})"
    return f"{closed:.0%} of the way from its start to the floor ({where})"


def jump_message(v: rules.JumpVerdict, i: int, floor: rules.Floor, start: float, step: int) -> tuple[str, dict]:
    """The sentence and evidence of ``loss.diverging`` by a jump (the ``i``-th new bin)."""
    level, best, held, spread = float(v.level[i]), float(v.best[i]), float(v.held[i]), float(v.spread)
    message = (
        f"The training loss jumped to a level of {level:.4g} and stayed up ({held:.4g} over the next steps, by "
        f"step {step}): {(level - floor.value) / max(best - floor.value, 1e-12):.3g}x further from the floor "
        f"{floor.describe()} than its best level {best:.4g} (it started at {start:.4g}; the run's spread of a "
        f"level is {spread:.3g})."
    )
    data = {"rule": "jump", "level": level, "held": held, "best": best, "start": start, "spread": spread, "step": step}
    return message, data


def nonfinite(name: str, total: bool, value: float, step: int, batch: int) -> tuple[str, dict[str, Any]]:
    """``loss.nonfinite``: its message and evidence."""
    what = "loss" if total else f"loss component {name!r}"
    message = f"The training {what} is {value} at step {step} (first non-finite value)."
    return message, {"series": name, "step": step, "batch": batch, "value": value}


def explained_hint(check: str, explaining: list[Finding]) -> str | None:
    """The hint of a loss finding that model-health findings explain (``None``: the catalogue's own)."""
    if not explaining:
        return None
    cited = "; ".join(f"{f.check}: {f.message}" for f in explaining)
    return f"Likely explained by {cited}. {check_info(check).hint}"
