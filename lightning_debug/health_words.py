"""How ``ModelHealthCheck`` words its verdicts: each function turns a verdict of
:mod:`lightning_debug.rules.health` into the findings to emit (id, message, evidence), naming layers and numbers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_debug.rules import health as rules
from lightning_debug.stats import median


@dataclass(frozen=True)
class Words:
    """One finding to emit."""

    check: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    key: str | None = None


def _capitalised(text: str) -> str:
    return f"{text[0].upper()}{text[1:]}"


def coverage(cov: rules.Coverage) -> list[Words]:
    n, held = cov.grad_tensors, cov.grad_tensors_in_optimizer
    out = []
    if cov.not_in_optimizer:
        modules = rules.modules_of(cov.not_in_optimizer)
        cause = f"the optimizer holds {'none' if held == 0 else held} of the {n} tensors that receive gradients"
        message = (
            f"{_capitalised(cause)}: {len(cov.not_in_optimizer)} tensors ({cov.not_in_optimizer_elements:,} elements) "
            f"in {', '.join(modules)} get gradients but are never updated."
        )
        data = {
            "cause": cause,
            "tensors": list(cov.not_in_optimizer),
            "elements": cov.not_in_optimizer_elements,
            "modules": modules,
            "grad_tensors": n,
            "grad_tensors_in_optimizer": held,
        }
        out.append(Words("setup.params_not_in_optimizer", message, data))
    if cov.unused:
        modules = rules.modules_of(cov.unused)
        cause = f"{len(cov.unused)} tensors the optimizer holds get no gradient ({', '.join(modules)})"
        message = (
            f"{len(cov.unused)} optimizer tensors ({cov.unused_elements:,} elements) in {', '.join(modules)} "
            f"get no gradient in a backward of the training loss: the forward never uses them."
        )
        data = {"cause": cause, "tensors": list(cov.unused), "elements": cov.unused_elements, "modules": modules}
        out.append(Words("setup.optimizer_params_unused", message, data))
    return out


def init_loss(v: rules.InitLoss, output_layer: str | None) -> list[Words]:
    if not v.off:
        return []
    explained = v.scale_explains_gap
    why = (
        f"the logits' spread (std {v.logit_std:.3g} across classes) alone gives {v.scale_loss:.3g} on random "
        "labels, so the logit scale explains the gap"
        if explained
        else f"the logit scale alone would give {v.scale_loss:.3g}, so it does not explain the gap"
    )
    cause = f"the loss at initialisation is {v.loss:.3g}, {v.gap:+.2f} nats from ln {v.num_classes} = {v.chance:.3g}"
    message = (
        f"{_capitalised(cause)} (label-prior entropy {v.prior_entropy:.3g}; output layer {output_layer or '?'}): {why}."
    )
    data = {
        "cause": cause,
        "loss": v.loss,
        "num_classes": v.num_classes,
        "ln_c": v.chance,
        "prior_entropy": v.prior_entropy,
        "gap": v.gap,
        "logit_std": v.logit_std,
        "scale_loss": v.scale_loss,
        "scale_explains_gap": explained,
        "layer": output_layer,
    }
    return [Words("init.loss_off_chance", message, data)]


def feeding_layer(site: str, layers: Sequence[str]) -> str | None:
    """The parameterised layer that feeds an activation module, when its name says so (``net.1`` <- ``net.0``)."""
    head, _, last = site.partition(":")[0].rpartition(".")
    if not last.isdigit():
        return None
    before = [
        layer
        for layer in layers
        if layer.rpartition(".")[0] == head
        and layer.rpartition(".")[2].isdigit()
        and int(layer.rpartition(".")[2]) < int(last)
    ]
    return before[-1] if before else None


def units(v: rules.UnitVerdict, stats: Sequence[rules.UnitStats], layers: Sequence[str]) -> list[Words]:
    out = []
    for check, bad in (("init.dead_units", v.dead), ("init.saturated_units", v.saturated)):
        for s in bad:
            if s.kind == "relu":
                cause = f"{s.share:.0%} of the ReLU units of {s.layer} are zero for every example at init"
                text = f"{s.flat} of {s.units} ReLU units ({s.share:.0%}) are zero for every example"
            else:
                cause = f"{s.share:.0%} of the {s.kind} outputs of {s.layer} are saturated at init"
                text = f"{s.share:.0%} of the {s.kind} outputs are saturated ({s.flat} of {s.units} units always)"
            after = feeding_layer(s.layer, layers)
            data = {
                "cause": cause,
                "layer": s.layer,
                "after": after,
                "kind": s.kind,
                "units": s.units,
                "flat_units": s.flat,
                "share": s.share,
                "value_share": s.value_share,
                "all_layers": {x.layer: round(x.share, 4) for x in stats},
            }
            where = f"{s.layer} (after {after})" if after else s.layer
            message = f"{where}: {text} on the first batch; they pass (almost) no gradient."
            out.append(Words(check, message, data, key=s.layer))
    return out


def gradients(v: rules.GradientVerdict, steps: Sequence[int], total: np.ndarray, clip_val: float | None) -> list[Words]:
    """The findings of one check window over sampled ``steps`` (``total``: its global norms)."""
    span = f"steps {steps[0]}-{steps[-1]} ({len(steps)} samples)"
    out = _vanishing(v.vanishing, steps, span) + _exploding(v.exploding, v.largest, steps)
    out += _update_ratio(v.update_ratio, span)
    if v.clipping is not None and v.clipping.fires:
        out += _clipping(v.clipping, clip_val, median(total), span)
    return out


def _vanishing(van: rules.Vanishing, steps: Sequence[int], span: str) -> list[Words]:
    if not van.fires:
        return []
    cause = f"the gradient of {van.bottom} is 10^{van.log10_ratio:.1f} times that of {van.top}"
    data = {
        "cause": cause,
        "layer": van.bottom,
        "top_layer": van.top,
        "log10_ratio": van.log10_ratio,
        "steps": [steps[0], steps[-1]],
    }
    message = f"Vanishing gradients: {cause} (median RMS ratio over {span}), not recovering."
    return [Words("grad.vanishing", message, data)]


def _exploding(exp: rules.Exploding, largest: str | None, steps: Sequence[int]) -> list[Words]:
    if not exp.fires:
        return []
    cause = (
        "the gradient norm became NaN/Inf"
        if exp.nonfinite
        else f"the global gradient norm grew {exp.growth:.3g}x while the loss went {exp.loss_before:.3g} -> "
        f"{exp.loss_now:.3g}"
    )
    data = {
        "cause": cause,
        "growth": exp.growth,
        "nonfinite": exp.nonfinite,
        "layer": largest,
        "loss_before": exp.loss_before,
        "loss_now": exp.loss_now,
    }
    return [Words("grad.exploding", f"Exploding gradients by step {steps[-1]}: {cause}; largest in {largest}.", data)]


def _update_ratio(upd: rules.UpdateRatio, span: str) -> list[Words]:
    out = []
    for layer, value in upd.too_high[:1]:
        cause = f"one optimizer step changed {layer} by {value:.3g} times its norm (usual ~1e-3)"
        message = (
            f"Updates far too large over {span}: {cause}; {len(upd.too_high)} layer(s) above "
            f"{rules.UPDATE_RATIO_HIGH:g}x. The learning rate is too high."
        )
        data = {
            "cause": cause,
            "direction": "high",
            "layer": layer,
            "ratio": value,
            "layers": dict(upd.too_high),
            "median": upd.median,
        }
        out.append(Words("grad.update_ratio", message, data, key="high"))
    if upd.too_low:
        low = min(upd.per_layer, key=upd.per_layer.__getitem__)
        cause = f"the median layer changes by {upd.median:.2g} of its norm per step (usual ~1e-3)"
        message = (
            f"Updates far too small over {span}: {cause}, {low} least ({upd.per_layer[low]:.2g}); the learning rate "
            "is too low for this model."
        )
        data = {
            "cause": cause,
            "direction": "low",
            "layer": low,
            "ratio": upd.median,
            "layers": upd.per_layer,
            "median": upd.median,
        }
        out.append(Words("grad.update_ratio", message, data, key="low"))
    return out


def _clipping(clip: rules.Clipping, clip_val: float | None, median_norm: float, span: str) -> list[Words]:
    cause = f"gradient clipping at {clip_val:g} was active on {clip.share:.0%} of sampled steps"
    message = (
        f"{_capitalised(cause)} ({span}; pre-clip global norm median {median_norm:.3g}): clipping is doing the "
        "learning rate's job."
    )
    data = {
        "cause": cause,
        "share": clip.share,
        "samples": clip.samples,
        "clip_val": clip_val,
        "median_norm": median_norm,
    }
    return [Words("grad.clipping_always", message, data)]
