"""The wording of :class:`~lightning_debug.callbacks.batch_consistency.BatchConsistencyCheck`'s findings
(``batch.*``): each finding's message, and the evidence it carries in its ``data`` (the callback logs no
scalars: the findings are the evidence). The numbers come from :mod:`lightning_debug.batch_replay`, the
verdicts from :mod:`lightning_debug.rules.batch`.
"""

from __future__ import annotations

from typing import Any

from lightning_debug.batch_replay import LossReplay
from lightning_debug.rules.batch import Fit, TargetVisibility, leaking_pairs, padding_verdict

WORST = 5  # examples / pairs named in a finding


def dependence_evidence(
    dep: dict[str, Any], data: dict[str, Any], *, leaking: bool, threshold: float, mixing: list[str]
) -> str | None:
    """Fill ``data["dependence"]``; the ``batch.cross_sample_dependence`` message if examples leak into each
    other (``mixing``: batch-statistics layers that mix examples even in eval mode, named as the likely cause)."""
    rel = dep["rel"]
    data["dependence"] = {
        "method": dep["method"],
        "max_off_diagonal": float(rel.max()),
        "rtol": threshold,
        "max_off_diagonal_float64": float(dep["rel64"].max()) if "rel64" in dep else None,
    }
    if not leaking:
        return None
    rel64 = dep["rel64"]
    pairs = leaking_pairs(rel, rel64, threshold)
    data["dependence"].update(
        pairs=pairs[: WORST * 4],
        n_pairs=len(pairs),
        rows_affected=sorted({p["output"] for p in pairs}),
        matrix_float64=rel64,
        batch_stat_layers_mixing_in_eval=mixing,
    )
    shown = ", ".join(f"output {p['output']} ← input {p['input']} ({p['relative_float64']:.2g})" for p in pairs[:3])
    cause = f"; {mixing} use batch statistics even in eval mode (track_running_stats=False)" if mixing else ""
    return (
        f"Example outputs depend on other examples' inputs in {len(pairs)} of {rel.numel() - len(rel)} pairs "
        f"(relative gradient in float64): {shown}{cause}."
    )


def loss_evidence(loss: LossReplay, data: dict[str, Any], *, atol: float) -> None:
    """Fill ``data["max_padding"]`` and ``data["loss"]``: the aggregation found, and the float64 re-run's."""
    fits, best = loss.fits, loss.fits[0]
    data["max_padding"] = max(loss.pads)
    matches = [f.name for f in fits if f.ratio <= 1]
    data["loss"] = {
        "aggregation": best.name if best.ratio <= 1 else None,
        "also_matches": matches[1:],
        "batch_loss": loss.total,
        "difference": best.residual,
        "tolerance": best.tol,
        "rtol": loss.rtol,
        "atol_per_token": atol,
        "candidates": {f.name: f.residual for f in fits},
        "padding": loss.pads,
        "padding_probe": loss.probe[0] if loss.probe else None,
    }
    if loss.fits64 is None:
        return
    best64 = loss.fits64[0]
    data["loss"].update(
        difference_float64=best64.residual,
        aggregation_float64=best64.name if best64.ratio <= 1 else None,
        candidates_float64={f.name: f.residual for f in loss.fits64},
    )
    if not loss.failed:
        data["loss"]["aggregation"] = best64.name
        data["loss"]["note"] = "the working-precision difference vanished in float64: float noise"


def loss_finding(loss: LossReplay, data: dict[str, Any], *, leaking: bool) -> tuple[str, str]:
    """The finding of a failed decomposition (``loss.failed``): its id and message."""
    assert loss.fits64 is not None
    fits, best64 = loss.fits, loss.fits64[0]
    check, detail = attribution(loss, data, leaking) if loss.attribution else ("batch.loss_mismatch", "")
    if leaking:
        detail += " Consistent with the cross-sample dependence reported alongside."
    if best64.ratio <= 1:
        head = (
            f"Batched loss {loss.total:.6g} matches {best64.name} of the single-example losses in total "
            f"(float64 difference {best64.residual:.3g}), but not example by example."
        )
    else:
        head = (
            f"Batched loss {loss.total:.6g} matches no aggregation of the single-example losses "
            f"(closest: {fits[0].name} = {fits[0].predicted:.6g}; difference {fits[0].residual:.3g} in "
            f"working precision, {best64.residual:.3g} in float64, tolerance {fits[0].tol:.2g})."
        )
    return check, head + detail


def attribution(loss: LossReplay, data: dict[str, Any], leaking: bool) -> tuple[str, str]:
    """Which finding the pair re-runs point to (padding dependence or a plain mismatch), and its detail."""
    assert loss.attribution is not None
    data["loss"]["attribution_aggregation"], rows = loss.attribution
    rows.sort(key=lambda r: -r["ratio"])
    data["loss"]["worst_examples"] = rows[:WORST]
    padding = padding_verdict(rows, leaking)
    data["loss"]["padding_kendall_tau"] = padding.tau
    worst = ", ".join(
        f"#{r['index']} (padding {r['padding']}: alone {r['loss_alone']:.4g}, difference {r['delta']:.3g})"
        for r in rows[:3]
    )
    if not padding.padding_only:
        return "batch.loss_mismatch", " Worst examples: " + worst
    tau = padding.tau if padding.tau is not None else float("nan")
    return "batch.padding_dependence", (
        f" Re-collated next to the longest example, only padded examples change their loss (padding "
        f"{padding.amounts} positions; unpadded ones match; Kendall tau of |difference| vs padding "
        f"{tau:.2f}): worst " + worst
    )


def ok_message(n: int, fit: Fit | None, dep: dict[str, Any] | None, data: dict[str, Any]) -> str:
    """The ``batch.ok`` message: the aggregation found (``fit``) over ``n`` examples, no leak, and the cost."""
    parts = []
    if fit is not None:
        parts.append(
            f"batched loss = {fit.name} of the {n} single-example losses "
            f"(difference {fit.residual:.2g}, tolerance {fit.tol:.2g}"
            + (", padding not exercised: no example was padded)" if not data["max_padding"] else ")")
        )
    if dep is not None:
        parts.append(
            f"no cross-sample dependence (largest off-diagonal {float(dep['rel'].max()):.2g} "
            "of the largest self-gradient)"
        )
    cost = data["cost"]
    summary = "; ".join(parts)
    return (
        summary[0].upper()
        + summary[1:]
        + f". Cost: {cost['forward_passes']} loss forward passes + {cost['batched_vjps']} batched VJP, "
        f"{cost['seconds']:.2f} s."
    )


def target_visible(verdict: TargetVisibility, norms: Any) -> tuple[str, dict[str, Any]]:
    """``batch.target_visible``: its message and evidence."""
    message = (
        f"The loss reads the input token at the last position of the sequence (its gradient there is "
        f"{verdict.ratio:.2g}x the median of the earlier positions'; with labels shifted against the inputs it "
        "is exactly 0): each position is scored on the token it already sees."
    )
    return message, {"ratio": verdict.ratio, "positions": norms.shape[1], "examples": norms.shape[0]}
