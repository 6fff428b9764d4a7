"""Is a batch just its examples side by side? (``batch.*`` findings)

Pure: losses, token counts, padding amounts and dependency matrices in (tensors and lists, no model), fits and
verdicts out. Used by :class:`~lightning_debug.callbacks.batch_consistency.BatchConsistencyCheck`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from scipy.stats import kendalltau

# Aggregations tried, in the order reported when several match (equal weights make them indistinguishable).
TOKEN_RULES = ("labels_shifted", "labels", "attention_mask_shifted", "attention_mask")


@dataclass
class Fit:
    """How well one aggregation rule explains the batched loss: ``total ≈ Σ coef_i · loss_i``."""

    name: str
    coef: torch.Tensor
    predicted: float
    residual: float
    tol: float

    @property
    def ratio(self) -> float:
        return self.residual / self.tol if self.tol > 0 else float("inf")


def aggregation_fits(
    total: float, losses: torch.Tensor, counts: Sequence[Mapping[str, int]], rtol: float, atol: float
) -> list[Fit]:
    """Every aggregation rule the data supports (mean, sum, token-weighted means by each counting rule in
    ``counts``), best first. Tolerance per example ``rtol·|loss_i| + atol·n_i``, aggregated like the losses,
    plus ``rtol·|total|``."""
    ones = torch.ones_like(losses)
    rules: dict[str, tuple[torch.Tensor, bool]] = {"mean": (ones, True), "sum": (ones, False)}
    for rule in TOKEN_RULES:
        if all(c.get(rule, 0) > 0 for c in counts):
            rules[f"token_mean:{rule}"] = (torch.tensor([float(c[rule]) for c in counts]), True)
    tokens = torch.tensor([float(max(c.values(), default=1)) for c in counts])
    tol_i = rtol * losses.abs() + atol * tokens
    fits = []
    for name, (w, normalized) in rules.items():
        coef = w / w.sum() if normalized else w
        predicted = float((coef * losses).sum())
        tol = float((coef * tol_i).sum()) + rtol * abs(total)
        fits.append(Fit(name, coef, predicted, abs(total - predicted), tol))
    return sorted(fits, key=lambda f: f.ratio)


def rejudged(fits64: list[Fit], fits: list[Fit]) -> list[Fit]:
    """The float64 fits judged against the working-precision tolerances (noise shrinks, a bug stays), best first."""
    for f64 in fits64:
        f64.tol = next(f.tol for f in fits if f.name == f64.name)
    return sorted(fits64, key=lambda f: f.ratio)


@dataclass(frozen=True)
class PaddingProbe:
    """The pair that exercises padding: the most ``padded`` example next to the longest unpadded one (``ref``)."""

    ref: int
    padded: int


def padding_probe(pads: Sequence[int], sizes: Sequence[int]) -> PaddingProbe | None:
    """The longest unpadded example (by ``sizes``) and the most padded one; ``None`` when no example is padded
    or every example is."""
    ref = max(range(len(pads)), key=lambda i: (pads[i] == 0, sizes[i]))
    padded = max(range(len(pads)), key=lambda i: pads[i])
    return PaddingProbe(ref, padded) if pads[padded] > 0 and pads[ref] == 0 else None


def all_within(fits: Sequence[Fit], rows: Sequence[Mapping[str, Any]]) -> bool:
    """The best aggregation and every pair row within tolerance: nothing to re-run in float64."""
    return fits[0].ratio <= 1 and all(r["ratio"] <= 1 for r in rows)


def is_leaking(rel: torch.Tensor, rel64: torch.Tensor | None, threshold: float) -> bool:
    """Outputs depend on other examples' inputs: the float64 matrix (when there is one, else the working
    precision's) has an off-diagonal entry above ``threshold``."""
    return float((rel64 if rel64 is not None else rel).max()) > threshold


def pair_rows(
    totals: Mapping[int, float],
    losses: torch.Tensor,
    fit: Fit,
    ref: int,
    pads: Sequence[int],
    counts: Sequence[Mapping[str, int]],
    rtol: float,
    atol: float,
) -> list[dict[str, Any]]:
    """Per example ``i``, its loss difference ``Δ_i`` in the pair ``[i, ref]`` (total ``totals[i]``) under
    ``fit``'s aggregation, with its tolerance and ``ratio = |Δ_i| / tolerance``."""
    rows = []
    for i, pair_total in totals.items():
        w = (fit.coef / fit.coef.max())[[i, ref]]
        coef = w if fit.name == "sum" else w / w.sum()
        predicted = float(coef[0] * losses[i] + coef[1] * losses[ref])
        delta = (pair_total - predicted) / float(coef.sum() if i == ref else coef[0])
        tol = rtol * abs(float(losses[i])) + atol * max(counts[i].values(), default=1)
        ratio = abs(delta) / tol if tol > 0 else float("inf")
        rows.append({"index": i, "padding": pads[i], "loss_alone": float(losses[i]), "delta": delta, "tol": tol})
        rows[-1]["ratio"] = ratio
    return rows


def best_attribution(
    fits: list[Fit],
    totals: Mapping[int, float],
    losses: torch.Tensor,
    ref: int,
    pads: Sequence[int],
    counts: Sequence[Mapping[str, int]],
    rtol: float,
    atol: float,
) -> tuple[str, list[dict[str, Any]]]:
    """The aggregation that explains the most pairs (then the smallest median ratio), and its pair rows."""
    candidates = [(f.name, pair_rows(totals, losses, f, ref, pads, counts, rtol, atol)) for f in fits]
    return max(
        candidates,
        key=lambda nr: (
            sum(r["ratio"] <= 1 for r in nr[1]),
            -float(torch.tensor([r["ratio"] for r in nr[1]]).median()),
        ),
    )


@dataclass(frozen=True)
class PaddingVerdict:
    """Only padded examples change their loss next to the longest one (and outputs do not leak): padding
    dependence rather than a plain loss mismatch. ``tau``: Kendall's tau of |Δ| against the padding amount."""

    padding_only: bool
    amounts: list[int]
    tau: float | None


def padding_verdict(rows: Sequence[Mapping[str, Any]], leaking: bool) -> PaddingVerdict:
    bad = [r for r in rows if r["ratio"] > 1]
    tau = kendalltau([r["padding"] for r in rows], [abs(r["delta"]) for r in rows]).statistic
    return PaddingVerdict(
        padding_only=bool(bad) and all(r["padding"] > 0 for r in bad) and not leaking,
        amounts=sorted({r["padding"] for r in bad}),
        tau=float(tau) if tau == tau else None,
    )


def relative_dependence(matrix: torch.Tensor) -> torch.Tensor | str:
    """The dependency matrix relative to the largest self-gradient, diagonal zeroed; or why it is unusable."""
    scale = float(matrix.diagonal().max())
    finite = bool(torch.isfinite(matrix).all())
    if not scale > 0 or not finite:
        return f"the dependency matrix is degenerate (largest self-gradient {scale}, finite: {finite})"
    rel = matrix / scale
    rel.fill_diagonal_(0.0)
    return rel


def leaking_pairs(rel: torch.Tensor, rel64: torch.Tensor, threshold: float) -> list[dict[str, Any]]:
    """(output i, input j) pairs whose float64 relative dependence exceeds ``threshold``, strongest first."""
    flagged = (rel64 > threshold).nonzero().tolist()
    flagged.sort(key=lambda ij: -float(rel64[ij[0], ij[1]]))
    return [
        {"output": i, "input": j, "relative": float(rel[i, j]), "relative_float64": float(rel64[i, j])}
        for i, j in flagged
    ]


@dataclass(frozen=True)
class TargetVisibility:
    """Does a causal LM's loss read the input at the last position? ``ratio``: the largest last-position gradient
    norm over the median non-zero gradient norm of the earlier positions (NaN: nothing to compare with)."""

    ratio: float
    visible: bool


def target_visibility(norms: torch.Tensor, rtol: float = 0.1) -> TargetVisibility:
    """``norms[b, t]``: norm of the loss's gradient with respect to the input embedding at position ``t``.

    With labels shifted against the inputs, nothing reads the last position: its logits would predict the token
    after the sequence (dropped by the shift) and causal attention hides it from the earlier positions, so its
    gradient is exactly 0 (a masked softmax weight is an exact 0, not a small number: no noise to model). Scored on
    unshifted labels, each position predicts the token it reads and the last one's gradient is of the order of the
    others' (0.7-1.6 of their median on the benchmark's tiny GPT-2s). ``rtol`` leaves room for auxiliary terms
    that read every position (a mixture-of-experts router loss) at a small weight."""
    earlier = norms[:, :-1].flatten()
    earlier = earlier[earlier > 0]
    if earlier.numel() == 0:
        return TargetVisibility(float("nan"), False)
    ratio = float(norms[:, -1].max() / earlier.median())
    return TargetVisibility(ratio, ratio > rtol)
