"""Decoder scores vs teacher-forced likelihood, and beam monotonicity (``decode.*`` findings).

Pure: per-beam-size score tensors (float64, CPU) in, dict-shaped verdicts out (they go into the findings'
``data`` as they are). Used by :class:`~lightning_debug.callbacks.decoding.DecodingConsistencyCheck`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from scipy.stats import binomtest


@dataclass
class Scores:
    """Scores of every hypothesis, per beam size: the decoder's, the model's (teacher-forced) and the number of
    scored tokens."""

    decoder: dict[int, torch.Tensor] = field(default_factory=dict)
    model: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)


def difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b|, with equal infinities counting as equal and any NaN as an infinite difference."""
    diff = torch.where(a == b, torch.zeros_like(a), (a - b).abs())
    return torch.nan_to_num(diff, nan=float("inf"))


def _row(
    k: int, i: int, dec: torch.Tensor, mod: torch.Tensor, diff: torch.Tensor, tol: torch.Tensor, n: torch.Tensor
) -> dict[str, Any]:
    return {
        "beam": k,
        "example": i,
        "decoder": float(dec[i]),
        "model": float(mod[i]),
        "diff": float(diff[i]),
        "tolerance": float(tol[i]),
        "n_tokens": int(n[i]),
    }


def score_mismatches(scores: Scores, rtol: float, atol: float) -> dict[str, Any]:
    """Hypotheses whose |decoder - model| exceeds ``rtol·|model| + atol·n_tokens``: their ``count`` of
    ``total``, the ``beams`` they occur at, the ``worst`` three (by |Δ| / tolerance), ``max_abs`` and
    ``max_rel`` over all hypotheses."""
    rows = []
    for k in scores.decoder:
        dec, mod, n = scores.decoder[k], scores.model[k], scores.tokens[k].double()
        diff = difference(dec, mod)
        tol = rtol * mod.abs().nan_to_num(posinf=0.0) + atol * n
        for i in torch.nonzero(diff > tol).flatten().tolist():
            ratio = float(diff[i] / tol[i]) if tol[i] > 0 else float("inf")
            rows.append((ratio, _row(k, i, dec, mod, diff, tol, n)))
    rows.sort(key=lambda r: r[0], reverse=True)
    diffs = torch.cat([difference(scores.decoder[k], scores.model[k]) for k in scores.decoder])
    refs = torch.cat([scores.model[k].abs() for k in scores.decoder]).clamp(min=1e-12)
    return {
        "count": len(rows),
        "total": len(diffs),
        "beams": sorted({r[1]["beam"] for r in rows}),
        "worst": [r[1] for r in rows[:3]],
        "max_abs": float(diffs.max()),
        "max_rel": float((diffs / refs).max()),
    }


def beam_monotonicity(scores: Scores, rtol: float, atol: float, violation_rate: float) -> dict[str, Any]:
    """Per example: does a beam's best hypothesis score worse (beyond the tolerance) than the best of all
    smaller beams? ``worse`` of ``examples``, per beam size, the worst drop, and the one-sided binomial
    ``p_value`` that the share exceeds ``violation_rate`` (beam search's own non-monotonicity)."""
    beams = sorted(scores.model)
    stats: dict[str, Any] = {"examples": 0, "worse": 0, "fraction": 0.0, "p_value": 1.0, "per_beam": {}}
    if len(beams) < 2:
        return stats
    model = torch.stack([scores.model[k] for k in beams], 1)  # [B, beams]
    lengths = torch.stack([scores.tokens[k].double() for k in beams], 1)
    worse = torch.zeros(len(model), dtype=torch.bool)
    worst: dict[str, Any] = {"drop": 0.0, "beam": None, "than": None, "example": None}
    for j in range(1, len(beams)):
        best, arg = model[:, :j].max(1)
        ref_len = lengths.gather(1, arg[:, None]).squeeze(1)
        drop = best - model[:, j]
        bad = drop > rtol * best.abs() + atol * ref_len
        stats["per_beam"][str(beams[j])] = int(bad.sum())
        worse |= bad
        i = int(drop.argmax())
        if bool(bad[i]) and float(drop[i]) > worst["drop"]:
            worst = {"drop": float(drop[i]), "beam": beams[j], "than": beams[int(arg[i])], "example": i}
    n, k = len(model), int(worse.sum())
    stats.update(examples=n, worse=k, fraction=k / n, worst=worst)
    if k / n > violation_rate:
        stats["p_value"] = float(binomtest(k, n, violation_rate, alternative="greater").pvalue)
    stats["mean_score"] = {str(b): float(model[:, j].mean()) for j, b in enumerate(beams)}
    return stats
