"""Streaming calibration statistics in O(bins) memory, and temperature fitting.

torchmetrics' ``CalibrationError`` keeps every confidence and correctness flag until ``compute()`` (two floats
per prediction: a language model's validation set is millions of tokens) and puts a confidence of exactly 1.0
into a phantom extra bin (torchmetrics issue #3510; float32 softmax saturates to 1.0 exactly in the
overconfident regime). :class:`StreamingCalibration` keeps per-bin sums instead, so its state has the same size
after a thousand predictions as after a billion, and clamps 1.0 into the last bin. Otherwise it bins exactly as
torchmetrics does (``bucketize(right=True)`` on ``linspace(0, 1, n_bins + 1)``), so ECE / MCE / RMS CE agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lightning_debug.signals import InputFormat

_SUM = torch.float64  # sums of up to ~1e15 confidences stay exact to ~1e-9


def per_prediction(
    preds: Tensor, target: Tensor, input_format: InputFormat, ignore_index: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Flattened top-label confidence, correctness, NLL, Brier, validity weight, and the non-finite and
    out-of-range flags (rows left out because their scores are NaN/Inf, or their target is not a class).

    ``preds`` is ``(..., C)`` for C >= 2 classes, or ``target``-shaped (or ``(..., 1)``) for a binary task
    (probability or logit of class 1). Nothing here reads a value on the host: masked-out rows get weight 0.
    """
    if preds.shape[:-1] == target.shape and preds.shape[-1] == 1:
        preds = preds.squeeze(-1)
    binary = preds.shape == target.shape
    if not binary and preds.shape[:-1] != target.shape:
        raise ValueError(f"preds of shape {tuple(preds.shape)} do not match target of shape {tuple(target.shape)}")
    x = preds.float().reshape(-1) if binary else preds.float().reshape(-1, preds.shape[-1])
    t = target.reshape(-1).long()
    finite = torch.isfinite(x) if binary else torch.isfinite(x).all(-1)
    kept = finite if ignore_index is None else finite & (t != ignore_index)
    n_classes = 2 if binary else x.shape[-1]
    clamped = t.clamp(0, n_classes - 1)  # any class will do for a row left out: its weight is 0
    in_range = clamped == t
    valid = kept & in_range
    t = clamped
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # a row left out must not turn the sums NaN
    if binary:
        p1 = torch.sigmoid(x) if input_format == "logits" else x.clamp(0, 1)
        conf = torch.maximum(p1, 1 - p1)
        correct = (p1 > 0.5).long() == t
        y = t.to(p1.dtype)
        if input_format == "logits":
            nll = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        else:
            nll = F.binary_cross_entropy(p1, y, reduction="none")
        brier = (p1 - y) ** 2
    else:
        if input_format == "logits":
            logp = torch.log_softmax(x, dim=-1)
            p = logp.exp()
        else:
            p = x.clamp(0, 1)
            logp = p.clamp_min(torch.finfo(p.dtype).tiny).log()
        conf, pred = p.max(dim=-1)
        correct = pred == t
        index = t.unsqueeze(-1)
        p_true = p.gather(-1, index).squeeze(-1)
        nll = logp.gather(-1, index).squeeze(-1).neg_()
        brier = p.square().sum(-1).sub_(p_true, alpha=2).add_(1)  # (p * p).sum(-1) - 2 * p_true + 1
    nonfinite = ~finite
    if ignore_index is not None:
        nonfinite = nonfinite & (target.reshape(-1) != ignore_index)
    return conf, correct, nll, brier, valid, nonfinite, kept & ~in_range


def looks_like_probabilities(scores: Tensor, target: Tensor) -> bool:
    """Whether ``scores`` are probabilities, as torchmetrics decides it (it applies sigmoid / softmax to scores
    with a value outside [0, 1]), and for multiclass scores also every row summing to 1 (so a batch of small
    logits is not taken for probabilities). One host transfer: call it once, not per batch."""
    binary = scores.shape == target.shape or (scores.shape[-1] == 1 and scores.shape[:-1] == target.shape)
    x = scores.detach().float()
    finite = torch.isfinite(x)
    in_range = ((x >= 0) & (x <= 1) | ~finite).all()
    if binary:
        return bool(in_range)
    rows = torch.isfinite(x).all(-1)
    sums = torch.where(rows, x.sum(-1), torch.ones_like(x[..., 0]))
    return bool(in_range & ((sums - 1).abs() <= 1e-3).all())


class StreamingCalibration(Metric):
    """Top-label calibration statistics from per-bin sums, summed across processes.

    ``update(preds, target)`` takes logits (default) or probabilities: ``(N, C)`` / ``(N, T, C)`` with integer
    targets ``(N,)`` / ``(N, T)``, or binary ``(N,)`` scores (class-1 probability or logit; the confidence is
    that of the predicted label, ``max(p, 1 - p)``; torchmetrics' binary metric instead calibrates P(y=1)).
    Rows whose target is ``ignore_index`` are skipped; rows with NaN/Inf scores, and rows whose target is not
    one of the classes (e.g. a padding label other than ``ignore_index``), are skipped and counted.

    ``compute()`` returns a dict of tensors: ``ece``, ``mce``, ``rms_ce`` (equal-width ``n_bins``, as Guo et al.
    and torchmetrics), ``adaptive_ece``, ``brier`` (binary: ``(p - y)^2``; multiclass: summed over classes),
    ``nll``, ``accuracy``, ``confidence``, ``gap`` (mean confidence - accuracy: > 0 is overconfident) and its
    standard error ``gap_se``, ``count``, ``nonfinite``, ``out_of_range``, and the per-bin ``bin_count`` /
    ``bin_confidence`` / ``bin_accuracy`` / ``bin_edges`` and ``fine_count`` (the confidence histogram).

    Adaptive (equal-mass) ECE is approximated in bounded memory: confidences are also counted in ``fine_bins``
    equal-width bins, and the equal-mass bins are unions of consecutive fine bins, so their edges are quantised
    to ``1 / fine_bins`` (a pile of predictions inside one fine bin is never split). Exact equal-mass bins need
    every prediction sorted, which is what this metric avoids.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    bins: Tensor  # (n_bins, 3): weight, confidence, correct per equal-width bin
    fine: Tensor  # (fine_bins, 3): the same per fine bin (for the equal-mass bins)
    sums: Tensor  # (8,): in the order of SUMS

    SUMS = ("total", "conf_sum", "correct", "brier_sum", "nll_sum", "gap_sq_sum", "nonfinite", "out_of_range")

    def __init__(
        self,
        n_bins: int = 15,
        adaptive_bins: int | None = None,
        fine_bins: int = 1000,
        ignore_index: int | None = None,
        input_format: InputFormat = "logits",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
        if adaptive_bins is not None and (not isinstance(adaptive_bins, int) or adaptive_bins < 1):
            raise ValueError(f"adaptive_bins must be a positive integer or None, got {adaptive_bins!r}")
        if not isinstance(fine_bins, int) or fine_bins < (adaptive_bins or n_bins):
            raise ValueError(f"fine_bins must be an integer >= the number of adaptive bins, got {fine_bins!r}")
        if input_format not in ("logits", "probs"):
            raise ValueError(f"input_format must be 'logits' or 'probs', got {input_format!r}")
        self.n_bins = n_bins
        self.adaptive_bins = adaptive_bins or n_bins
        self.fine_bins = fine_bins
        self.ignore_index = ignore_index
        self.input_format: InputFormat = input_format
        # three states, not one per sum: a state is an op per update and an attribute per reset
        self.add_state("bins", torch.zeros(n_bins, 3, dtype=_SUM), dist_reduce_fx="sum")
        self.add_state("fine", torch.zeros(fine_bins, 3, dtype=_SUM), dist_reduce_fx="sum")
        self.add_state("sums", torch.zeros(len(self.SUMS), dtype=_SUM), dist_reduce_fx="sum")
        self._edges: Tensor | None = None

    def update(self, preds: Tensor, target: Tensor) -> None:
        conf, correct, nll, brier, valid, nonfinite, out_of_range = per_prediction(
            preds, target, self.input_format, self.ignore_index
        )
        w = valid.to(_SUM).unsqueeze(-1)
        weighted = torch.stack([conf, correct.to(conf.dtype), brier, nll], -1).to(_SUM).mul_(w)
        gap_sq = (weighted[:, 0] - weighted[:, 1]).square_().unsqueeze(-1)
        flags = torch.stack([nonfinite, out_of_range], -1).to(_SUM)
        rows = torch.cat([w, weighted, gap_sq, flags], -1)  # per prediction, in the order of SUMS
        edges = self._edges
        if edges is None or edges.dtype != conf.dtype or edges.device != conf.device:
            edges = self._edges = torch.linspace(0, 1, self.n_bins + 1, dtype=conf.dtype, device=conf.device)
        # torchmetrics' binning, with 1.0 clamped into the last bin instead of a phantom (n_bins+1)-th one
        idx = torch.bucketize(conf, edges, right=True).sub_(1).clamp_(0, self.n_bins - 1)
        fine = (conf * self.fine_bins).long().clamp_(0, self.fine_bins - 1)
        self.bins.index_add_(0, idx, rows[:, :3])
        self.fine.index_add_(0, fine, rows[:, :3])
        self.sums += rows.sum(0)

    def compute(self) -> dict[str, Tensor]:
        total, conf_sum, correct_sum, brier_sum, nll_sum, gap_sq_sum, nonfinite, out_of_range = self.sums
        count, bin_conf, bin_correct = self.bins.unbind(-1)
        fine_count, fine_conf, fine_correct = self.fine.unbind(-1)
        acc_b = torch.nan_to_num(bin_correct / count)
        conf_b = torch.nan_to_num(bin_conf / count)
        prop = count / total
        diff = acc_b - conf_b
        # equal-mass bins: each fine bin joins the adaptive bin its mid-point mass falls in
        mid = torch.cumsum(fine_count, 0) - fine_count / 2
        group = (mid / total * self.adaptive_bins).floor().long().clamp(0, self.adaptive_bins - 1)
        zeros = torch.zeros(self.adaptive_bins, dtype=_SUM, device=total.device)
        g_conf = zeros.index_add(0, group, fine_conf)
        g_correct = zeros.index_add(0, group, fine_correct)
        accuracy = correct_sum / total
        confidence = conf_sum / total
        return {
            "ece": (diff.abs() * prop).sum(),
            "mce": diff.abs().max(),
            "rms_ce": ((diff**2) * prop).sum().sqrt(),
            "adaptive_ece": (g_correct - g_conf).abs().sum() / total,
            "brier": brier_sum / total,
            "nll": nll_sum / total,
            "accuracy": accuracy,
            "confidence": confidence,
            "gap": confidence - accuracy,
            "gap_se": ((gap_sq_sum / total - (confidence - accuracy) ** 2).clamp_min(0) / total).sqrt(),
            "count": total,
            "nonfinite": nonfinite,
            "out_of_range": out_of_range,
            "bin_count": count,
            "bin_confidence": conf_b,
            "bin_accuracy": acc_b,
            "bin_edges": torch.linspace(0, 1, self.n_bins + 1, dtype=_SUM, device=total.device),
            "fine_count": fine_count,
        }


class HeldPredictions:
    """Validation predictions held on their device as rows and passed to ``consume(scores, target, fmt)``
    together: when ``max_elements`` scores are held, when the format or the row width changes, and at
    :meth:`flush` (the end of the evaluation). :class:`StreamingCalibration`'s update is ~50 small ops whatever
    the batch: on a small model two batches' worth took 1.3 ms of a 75 ms epoch. Rows keep their order, so
    :class:`LogitSample` still keeps the evaluation's first rows. Scores whose shape does not match the target's
    are passed on at once (``update`` says what is wrong)."""

    def __init__(self, consume: Callable[[Tensor, Tensor, InputFormat], None], max_elements: int = 1 << 22) -> None:
        self.consume = consume
        self.max_elements = max_elements
        self.parts: list[tuple[Tensor, Tensor]] = []
        self.held = 0
        self._kind: tuple[Any, ...] | None = None  # (format, row width, dtype, device) of the held rows

    def add(self, scores: Tensor, target: Tensor, fmt: InputFormat) -> None:
        binary = scores.shape == target.shape or (scores.shape[-1:] == (1,) and scores.shape[:-1] == target.shape)
        if not binary and scores.shape[:-1] != target.shape:
            self.flush()
            self.consume(scores, target, fmt)
            return
        rows = scores.reshape(-1) if binary else scores.reshape(-1, scores.shape[-1])
        kind = (fmt, rows.shape[1:], rows.dtype, rows.device, target.dtype)
        if self._kind != kind:
            self.flush()
            self._kind = kind
        self.parts.append((rows, target.reshape(-1)))
        self.held += rows.numel()
        if self.held >= self.max_elements:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        parts, self.parts, self.held = self.parts, [], 0
        assert self._kind is not None
        if len(parts) == 1:
            scores, target = parts[0]
        else:
            scores, target = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        self.consume(scores, target, self._kind[0])


def fit_temperature(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> float:
    """The temperature T minimising the (weighted) NLL of ``logits / T`` (Guo et al.'s temperature scaling).

    ``logits`` is ``(N, C)`` or binary ``(N,)``. T > 1 means the model is overconfident (softening helps),
    T < 1 underconfident. A bounded scalar search over log T in [1/50, 50]: ~25 forward evaluations, no
    autograd (so it also runs inside Lightning's inference mode).
    """
    from scipy.optimize import minimize_scalar

    x = logits.detach().float()
    t = target.detach().long()
    w = torch.ones(len(t), device=x.device) if weight is None else weight.detach().float()
    w_sum = float(w.sum())
    if w_sum == 0:
        return float("nan")

    def nll(log_t: float) -> float:
        z = x / math.exp(log_t)
        if z.ndim == 1:
            per = F.binary_cross_entropy_with_logits(z, t.float(), reduction="none")
        else:
            per = F.cross_entropy(z, t, reduction="none")
        return float((per * w).sum()) / w_sum

    bound = math.log(50.0)
    res = minimize_scalar(nll, bounds=(-bound, bound), method="bounded", options={"xatol": 1e-3})
    return math.exp(float(res.x))


class LogitSample:
    """The first rows of logits (and targets) of an evaluation, up to a budget, kept on the device to fit a
    temperature: the same rows every epoch, so temperatures compare across epochs.

    ``rows``: predictions kept (0: none); a wide vocabulary keeps fewer, so at most ``max_elements`` floats are
    held (4M floats, 16 MiB by default). Rows with non-finite scores, targets outside the classes or equal to
    ``ignore_index`` are kept with weight 0.
    """

    def __init__(self, rows: int, ignore_index: int | None, max_elements: int = 1 << 22) -> None:
        self.rows = rows
        self.ignore_index = ignore_index
        self.max_elements = max_elements
        self.parts: list[tuple[Tensor, Tensor]] = []  # (rows of scores, targets) as added
        self.kept = 0

    def reset(self) -> None:
        self.parts, self.kept = [], 0

    def _budget(self, width: int) -> int:
        return min(self.rows, self.max_elements // width)

    def add(self, logits: Tensor, target: Tensor, *, probs: bool = False) -> None:
        """Keep rows of ``logits`` (``target``-shaped or ``(..., 1)`` for binary, else ``(..., C)``), as copies
        (two ops: which rows count is decided only when a temperature is fitted, which most epochs do not do).
        ``probs``: the scores are probabilities, kept as logits: ``log(p / (1 - p))`` of a binary task's class-1
        probability, ``log p`` of C classes' (their logits up to a per-row constant, which a softmax ignores)."""
        binary = logits.shape == target.shape or (logits.shape[-1] == 1 and logits.shape[:-1] == target.shape)
        width = 1 if binary else logits.shape[-1]
        budget = self._budget(width) - self.kept
        if budget <= 0:
            return
        x = (logits.reshape(-1) if binary else logits.reshape(-1, width))[:budget].to(torch.float32, copy=True)
        if probs:
            x = torch.logit(x, eps=1e-7) if binary else x.clamp_min_(1e-12).log_()
        self.parts.append((x, target.reshape(-1)[:budget].clone()))
        self.kept += len(x)

    def temperature(self, all_gather: Any = None) -> float:
        """:func:`fit_temperature` on the sample (NaN when empty). ``all_gather`` (the strategy's, under DDP)
        pools every rank's sample first, so all ranks fit the same temperature on the whole validation set."""
        if not self.parts:
            return float("nan")
        x, t, w = self._weighted(*(torch.cat(parts) for parts in zip(*self.parts, strict=True)))
        if all_gather is not None:
            budget = self._budget(1 if x.dim() == 1 else x.shape[-1])
            x, t, w = (self._gather(all_gather, r, budget) for r in (x, t, w))
        return fit_temperature(x, t, w)

    def _weighted(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The kept rows with weight 0 (and harmless values) where the scores are not finite or the target is
        not a class or is ``ignore_index``."""
        binary = x.dim() == 1
        finite = torch.isfinite(x) if binary else torch.isfinite(x).all(-1)
        valid = finite & (t >= 0) & (t < max(1 if binary else x.shape[-1], 2))
        if self.ignore_index is not None:
            valid &= t != self.ignore_index
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        x = torch.where(finite if binary else finite.unsqueeze(-1), x, zero)
        return x, torch.where(valid, t, torch.zeros_like(t)), valid.float()

    @staticmethod
    def _gather(all_gather: Any, rows: Tensor, budget: int) -> Tensor:
        """Padded with weight-0 rows to the budget so ``all_gather`` can stack ranks that kept different counts."""
        padded = torch.cat([rows, rows.new_zeros((budget - rows.shape[0], *rows.shape[1:]))])
        return all_gather(padded).reshape(-1, *rows.shape[1:])


def prediction_sums(scores: Tensor, target: Tensor, fmt: InputFormat, ignore_index: int | None) -> Tensor:
    """On-device ``[correct, tokens, nll, seq_correct, seqs]``; sequences when ``target`` has a time axis."""
    _, correct, nll, _, valid, _, _ = per_prediction(scores, target, fmt, ignore_index)
    w = valid.to(torch.float64)
    rows = target.reshape(target.shape[0], -1) if target.ndim >= 2 else None
    if rows is None:
        seq_correct = seqs = torch.zeros((), dtype=torch.float64, device=w.device)
    else:
        ok = (correct | ~valid).reshape(rows.shape)
        has = valid.reshape(rows.shape).any(-1)
        seq_correct, seqs = (ok.all(-1) & has).sum().double(), has.sum().double()
    return torch.stack([(correct.double() * w).sum(), w.sum(), (nll.double() * w).sum(), seq_correct, seqs])
