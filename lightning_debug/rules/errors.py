"""Error analysis decisions: which rows to keep, how good each slice is, which slice is weak or regressed.

Pure functions over plain counts and tensors (no trainer, no emit). The callback
:class:`~lightning_debug.callbacks.errors.ErrorAnalysis` collects the counts on the device and calls these.

- Selection (:func:`sample_keys`, :func:`merge_selections`): every kept list is a top-k by a key, so one rule
  covers the uniform sample of errors (keys uniform in [0, 1): the k largest of n i.i.d. keys are a uniform
  sample without replacement, the "random keys" form of reservoir sampling), the highest-loss rows and the most
  confident errors. Keys come from a generator seeded by ``(seed, evaluation, batch)``, so the sample is a
  function of the data and the seed: the same after a resume.
- Slices (:func:`slice_statistics`): accuracy with a Wilson 95% interval; a slice is *weak* when a one-sided
  Fisher exact test against the rest of its column is significant after Holm's correction over every slice
  tested (family-wise error ``alpha``), the slice and the rest both have ``min_size`` units, and the gap is at
  least ``min_gap``.
- Regressions (:func:`slice_regressions`): a slice significantly worse than at the previous evaluation (same
  test and correction) while the overall accuracy improved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import stats as _st
from torch import Tensor

Z95 = 1.959963984540054
ALPHA = 0.005  # family-wise; Holm bounds the false-alarm rate by alpha under any dependence: half the 1% target
MIN_SIZE = 30
MIN_GAP = 0.05
FREQUENCY_BUCKETS = 8  # unseen, 1-9, 10-99, ..., >= 10^6 occurrences in the training data seen


# -- selection (device tensors) -----------------------------------------------------------------------------------
def sample_keys(seed: int, evaluation: int, batch_idx: int, n: int, device: torch.device, rank: int = 0) -> Tensor:
    """``n`` uniform keys in [0, 1) from a generator seeded by ``(seed, evaluation, batch_idx)`` (and the DDP
    ``rank`` past zero: each rank's batch ``i`` draws its own keys).

    Drawn on the CPU (the same numbers on every device) and moved once; nothing is read back.
    """
    stream = (seed, evaluation, batch_idx) + ((rank,) if rank else ())
    g = torch.Generator().manual_seed(hash(stream) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.rand(n, generator=g, dtype=torch.float64).to(device, non_blocking=True)


def merge_selections(
    kept_keys: Tensor, kept_rows: Tensor, new_keys: Tensor, new_rows: Tensor, sizes: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Keep, for each selection ``s``, the ``sizes[s]`` rows with the largest key in column ``s``.

    ``kept_keys`` is ``(K, S)`` with ``K = sum(sizes)``: the slots of selection ``s`` hold ``-inf`` in every other
    column, so a row kept by two selections is counted once in each. ``-inf`` marks "not eligible" (and empty
    slots). Returns the new ``(K, S)`` keys and ``(K, F)`` rows; fixed sizes, no host sync.
    """
    keys = torch.cat([kept_keys, new_keys])
    rows = torch.cat([kept_rows, new_rows])
    index = torch.cat([keys[:, s].topk(k).indices for s, k in enumerate(sizes)])
    slot = torch.repeat_interleave(  # output_size given: no device-to-host sync on an accelerator
        torch.arange(len(sizes), device=keys.device), torch.tensor(sizes, device=keys.device), output_size=sum(sizes)
    )
    own = slot.unsqueeze(1) == torch.arange(len(sizes), device=keys.device)
    picked = keys[index]
    return torch.where(own, picked, torch.full_like(picked, -math.inf)), rows[index]


def empty_selection(sizes: Sequence[int], width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Keys (all ``-inf``) and zero rows for :func:`merge_selections` to start from."""
    k = sum(sizes)
    return torch.full((k, len(sizes)), -math.inf, dtype=torch.float64, device=device), torch.zeros(
        (k, width), dtype=torch.float64, device=device
    )


class Examples(NamedTuple):
    """Per-example results of one batch (all ``(B,)`` unless noted), on the scores' device."""

    loss: Tensor  # mean NLL over the example's scored positions
    confidence: Tensor  # mean top-label probability
    exact: Tensor  # every scored position right (the example's correctness for classification)
    tokens: Tensor  # scored positions (0: nothing to score)
    correct_tokens: Tensor
    first_diff: Tensor  # index, among scored positions, of the first wrong one; -1 when none
    prediction: Tensor  # (B, T) predicted ids, -1 where not scored
    reference: Tensor  # (B, T) target ids, -1 where not scored
    token_nll: Tensor  # (B, T), 0 where not scored
    token_ok: Tensor  # (B, T) bool
    token_valid: Tensor  # (B, T) bool


def per_example(
    scores: Tensor, target: Tensor, input_format: str, preds: Tensor | None, ignore_index: int | None
) -> Examples:
    """Loss, confidence and correctness per example from ``(B, C)`` / ``(B, T, C)`` scores (logits or
    probabilities; binary ``(B,)`` scores are the class-1 logit/probability) and ``(B,)`` / ``(B, T)`` targets.
    ``preds`` (same shape as ``target``) replaces the argmax: the user's own decoding. No host sync."""
    binary = scores.shape == target.shape
    x = scores.detach().float()
    if binary:
        x = torch.stack([torch.zeros_like(x), x], -1) if input_format == "logits" else torch.stack([1 - x, x], -1)
    if target.dim() == 1:
        x, target = x.unsqueeze(1), target.unsqueeze(1)
        preds = None if preds is None else preds.reshape(target.shape)
    logp = torch.log_softmax(x, -1) if input_format == "logits" else x.clamp_min(1e-12).log()
    n_classes = x.shape[-1]
    valid = (target >= 0) & (target < n_classes) & torch.isfinite(logp).all(-1)
    if ignore_index is not None:
        valid &= target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    nll = torch.where(valid, -logp.gather(-1, t.unsqueeze(-1)).squeeze(-1), torch.zeros_like(logp[..., 0]))
    top, argmax = logp.max(-1)
    pred = argmax if preds is None else preds.detach().long()
    ok = (pred == t) & valid
    tokens = valid.sum(1)
    denom = tokens.clamp_min(1)
    wrong = valid & ~ok
    positions = torch.arange(t.shape[1], device=t.device).expand_as(t)
    first = torch.where(wrong, positions, t.shape[1]).min(1).values
    rank = valid.long().cumsum(1) - 1
    first_diff = torch.where(first < t.shape[1], rank.gather(1, first.clamp_max(t.shape[1] - 1).unsqueeze(1))[:, 0], -1)
    missing = torch.full_like(t, -1)
    return Examples(
        loss=nll.sum(1) / denom,
        confidence=(top.exp() * valid).sum(1) / denom,
        exact=(~wrong).all(1) & (tokens > 0),
        tokens=tokens,
        correct_tokens=ok.sum(1),
        first_diff=first_diff,
        prediction=torch.where(valid, pred, missing),
        reference=torch.where(valid, t, missing),
        token_nll=nll,
        token_ok=ok,
        token_valid=valid,
    )


def compact(ids: Tensor, keep: Tensor, width: int) -> Tensor:
    """The kept entries of each row moved to the front, then cut or padded with -1 to ``width`` columns."""
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    out = torch.where(keep, ids, torch.full_like(ids, -1)).gather(1, order)[:, :width]
    return torch.nn.functional.pad(out, (0, width - out.shape[1]), value=-1)


def length_bucket(lengths: Tensor) -> Tensor:
    """Bucket ``b`` holds lengths in ``(2^(b-1), 2^b]`` (bucket 0: length <= 1), on the device."""
    return torch.log2(lengths.double().clamp_min(1)).ceil().long()


def length_bucket_label(bucket: int) -> str:
    if bucket <= 0:
        return "1"
    lo, hi = 2 ** (bucket - 1) + 1, 2**bucket
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def frequency_bucket(counts: Tensor) -> Tensor:
    """0 for a token never seen in training, else ``1 + floor(log10(count))``, capped."""
    return (
        (torch.log10(counts.double().clamp_min(1)).floor().long() + 1)
        .where(counts > 0, 0)
        .clamp_max(FREQUENCY_BUCKETS - 1)
    )


def frequency_bucket_label(bucket: int) -> str:
    if bucket == 0:
        return "unseen"
    if bucket == FREQUENCY_BUCKETS - 1:
        return f">={10 ** (bucket - 1)}"
    return f"{10 ** (bucket - 1)}-{10**bucket - 1}"


NO_COST = {
    "seconds": 0.0,  # the callback's own time, publishing included
    "validation_seconds": 0.0,  # the validation loops' time without the callback's
    "publish_seconds": 0.0,  # the part of ``seconds`` spent building and logging tables
    "analysed": 0,
    "published": 0,
    "evaluations": 0,
}
FIRST_COST = 0.3  # seconds assumed for a first analysis (tables aside)
FIRST_PUBLISH_COST = 1.0  # seconds assumed for a first publication: up to 1.5 s measured on a loaded machine


def affordable(spent: float, expected: float, validation_seconds: float, budget: float) -> bool:
    """Whether ``expected`` more seconds keep a callback's time (``spent`` so far) within ``budget`` times
    ``validation_seconds`` (nothing is affordable before any validation time is measured)."""
    return spent + expected <= budget * validation_seconds


def analysis_due(cost: dict[str, float], budget: float) -> bool:
    """Analyse the coming evaluation when the expected cost of an analysis (the mean of past ones, tables aside;
    :data:`FIRST_COST` before any) is affordable within the validation time so far plus this evaluation's
    expected share (their mean): never at the first evaluation, when no validation time is measured yet.
    ``cost`` is :attr:`ErrorAnalysis.cost <lightning_debug.callbacks.errors.ErrorAnalysis>`."""
    spent = cost["seconds"] - cost["publish_seconds"]
    expected = spent / cost["analysed"] if cost["analysed"] else FIRST_COST
    validation = cost["validation_seconds"] * (1 + 1 / max(cost["evaluations"], 1))
    return affordable(cost["seconds"], expected, validation, budget)


def publication_due(cost: dict[str, float], spent: float, budget: float) -> bool:
    """Publish the tables of an analysed evaluation when the expected cost of publishing (the mean of past
    publications, :data:`FIRST_PUBLISH_COST` before any) is affordable after ``spent`` seconds (this analysis
    included), within the validation time so far (this evaluation's included)."""
    expected = cost["publish_seconds"] / cost["published"] if cost["published"] else FIRST_PUBLISH_COST
    return affordable(spent, expected, cost["validation_seconds"], budget)


# -- slice statistics (host) --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SliceCounts:
    """What was summed for one slice: ``units`` are examples (tokens for a token-level column); ``tokens``
    scored positions (= units for classification), ``correct`` correct positions, ``loss_sum`` the sum of the
    units' mean losses, ``exact`` units entirely right."""

    column: str
    value: str
    units: int
    tokens: float
    correct: float
    loss_sum: float
    exact: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens > 0 else math.nan

    @property
    def effective(self) -> tuple[int, int]:
        """``(successes, trials)`` for tests: the token accuracy over the slice's units (tokens of one example
        are not independent, so a token-level accuracy counts as many trials as there are examples)."""
        return round(self.accuracy * self.units) if self.tokens > 0 else 0, self.units


@dataclass(frozen=True)
class SliceStat:
    column: str
    value: str
    count: int
    accuracy: float
    low: float
    high: float
    loss: float
    rest_count: int
    rest_accuracy: float
    gap: float  # rest - slice: > 0 means the slice is worse
    p_value: float
    p_adjusted: float
    weak: bool

    COLUMNS = (
        "column",
        "value",
        "count",
        "accuracy",
        "low",
        "high",
        "loss",
        "rest_count",
        "rest_accuracy",
        "gap",
        "p_value",
        "p_adjusted",
        "weak",
    )

    def row(self) -> list[object]:
        return [getattr(self, c) for c in self.COLUMNS]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (NaNs for n = 0)."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def fisher_worse(k1: Any, n1: Any, k2: Any, n2: Any) -> Any:
    """One-sided Fisher exact p-value that group 1 (k1 of n1 right) is worse than group 2 (k2 of n2).
    Element-wise over arrays (one scipy call for a whole table)."""
    p = _st.hypergeom.cdf(k1, np.add(n1, n2), np.add(k1, k2), n1)
    return float(p) if np.ndim(p) == 0 else p


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (valid under any dependence between the tests)."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def slice_statistics(
    counts: Sequence[SliceCounts], *, min_size: int = MIN_SIZE, alpha: float = ALPHA, min_gap: float = MIN_GAP
) -> list[SliceStat]:
    """Every slice's accuracy, interval and loss, compared with the rest of its column; weak slices marked.

    A slice is tested only when it and the rest of its column both hold ``min_size`` units. One Holm
    correction covers all tests of the call (all columns), so a table of 40 metadata values does not find a
    weak slice by chance more often than ``alpha``.
    """
    effective = np.array([c.effective for c in counts], dtype=np.int64).reshape(-1, 2)
    k, n = effective[:, 0], effective[:, 1]
    columns = [c.column for c in counts]
    totals: dict[str, Any] = {}
    for col, row in zip(columns, effective, strict=True):
        totals[col] = totals.get(col, 0) + row
    total = np.array([totals[col] for col in columns], dtype=np.int64).reshape(-1, 2)
    rk, rn = total[:, 0] - k, total[:, 1] - n
    tested = (n >= min_size) & (rn >= min_size)
    p = np.full(len(counts), math.nan)
    if tested.any():
        p[tested] = fisher_worse(k[tested], n[tested], rk[tested], rn[tested])
    p_adj = np.full(len(counts), math.nan)
    p_adj[tested] = holm(p[tested].tolist())
    out = []
    for i, c in enumerate(counts):
        low, high = wilson_interval(int(k[i]), int(n[i]))
        rest = float(rk[i] / rn[i]) if rn[i] else math.nan
        gap = rest - c.accuracy
        weak = bool(p_adj[i] < alpha and gap >= min_gap)
        loss = c.loss_sum / c.units if c.units else math.nan
        out.append(
            SliceStat(
                c.column,
                c.value,
                int(n[i]),
                c.accuracy,
                low,
                high,
                loss,
                int(rn[i]),
                rest,
                gap,
                float(p[i]),
                float(p_adj[i]),
                weak,
            )
        )
    return out


@dataclass(frozen=True)
class SliceRegression:
    column: str
    value: str
    before: float
    after: float
    count: int
    p_adjusted: float
    overall_before: float
    overall_after: float


def slice_regressions(
    before: Sequence[SliceStat],
    after: Sequence[SliceStat],
    overall_before: float,
    overall_after: float,
    *,
    min_size: int = MIN_SIZE,
    alpha: float = ALPHA,
    min_gap: float = MIN_GAP,
) -> list[SliceRegression]:
    """Slices significantly worse than at the previous evaluation while the overall accuracy went up.

    The two evaluations score the same examples, so their results are positively correlated; the test treats
    them as independent samples, which only makes it more conservative. Holm-corrected over the slices compared.
    """
    if not overall_after > overall_before:
        return []
    previous = {(s.column, s.value): s for s in before}
    pairs = [
        (previous[(s.column, s.value)], s)
        for s in after
        if (s.column, s.value) in previous and min(s.count, previous[(s.column, s.value)].count) >= min_size
    ]
    if not pairs:
        return []
    k = np.array([[round(a.accuracy * a.count), a.count, round(b.accuracy * b.count), b.count] for b, a in pairs])
    adjusted = holm(np.atleast_1d(fisher_worse(k[:, 0], k[:, 1], k[:, 2], k[:, 3])).tolist())
    return [
        SliceRegression(a.column, a.value, b.accuracy, a.accuracy, a.count, p_adj, overall_before, overall_after)
        for (b, a), p_adj in zip(pairs, adjusted, strict=True)
        if p_adj < alpha and b.accuracy - a.accuracy >= min_gap
    ]
