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
    in_range = (t >= 0) & (t < n_classes)
    valid = kept & in_range
    t = torch.where(valid, t, torch.zeros_like(t))
    x = torch.where(finite.unsqueeze(-1) if not binary else finite, x, torch.zeros_like(x))
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
        p_true = p.gather(-1, t.unsqueeze(-1)).squeeze(-1)
        nll = -logp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
        brier = (p * p).sum(-1) - 2 * p_true + 1
    nonfinite = ~finite
    if ignore_index is not None:
        nonfinite = nonfinite & (target.reshape(-1) != ignore_index)
    return conf, correct, nll, brier, valid, nonfinite, kept & ~in_range


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

    bin_count: Tensor
    bin_conf: Tensor
    bin_correct: Tensor
    fine_count: Tensor
    fine_conf: Tensor
    fine_correct: Tensor
    total: Tensor
    correct: Tensor
    conf_sum: Tensor
    brier_sum: Tensor
    nll_sum: Tensor
    gap_sq_sum: Tensor
    nonfinite: Tensor
    out_of_range: Tensor

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
        for name, size in (("bin", n_bins), ("fine", fine_bins)):
            for part in ("count", "conf", "correct"):
                self.add_state(f"{name}_{part}", torch.zeros(size, dtype=_SUM), dist_reduce_fx="sum")
        for name in ("total", "correct", "conf_sum", "brier_sum", "nll_sum", "gap_sq_sum", "nonfinite", "out_of_range"):
            self.add_state(name, torch.zeros((), dtype=_SUM), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        conf, correct, nll, brier, valid, nonfinite, out_of_range = per_prediction(
            preds, target, self.input_format, self.ignore_index
        )
        w = valid.to(_SUM)
        conf64 = conf.to(_SUM) * w
        correct64 = correct.to(_SUM) * w
        edges = torch.linspace(0, 1, self.n_bins + 1, dtype=conf.dtype, device=conf.device)
        # torchmetrics' binning, with 1.0 clamped into the last bin instead of a phantom (n_bins+1)-th one
        idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, self.n_bins - 1)
        fine = (conf * self.fine_bins).long().clamp(0, self.fine_bins - 1)
        for name, index in (("bin", idx), ("fine", fine)):
            getattr(self, f"{name}_count").index_add_(0, index, w)
            getattr(self, f"{name}_conf").index_add_(0, index, conf64)
            getattr(self, f"{name}_correct").index_add_(0, index, correct64)
        self.total += w.sum()
        self.correct += correct64.sum()
        self.conf_sum += conf64.sum()
        self.brier_sum += (brier.to(_SUM) * w).sum()
        self.nll_sum += (nll.to(_SUM) * w).sum()
        self.gap_sq_sum += ((conf64 - correct64) ** 2).sum()
        self.nonfinite += nonfinite.to(_SUM).sum()
        self.out_of_range += out_of_range.to(_SUM).sum()

    def compute(self) -> dict[str, Tensor]:
        total = self.total
        count = self.bin_count
        acc_b = torch.nan_to_num(self.bin_correct / count)
        conf_b = torch.nan_to_num(self.bin_conf / count)
        prop = count / total
        diff = acc_b - conf_b
        # equal-mass bins: each fine bin joins the adaptive bin its mid-point mass falls in
        mid = torch.cumsum(self.fine_count, 0) - self.fine_count / 2
        group = (mid / total * self.adaptive_bins).floor().long().clamp(0, self.adaptive_bins - 1)
        zeros = torch.zeros(self.adaptive_bins, dtype=_SUM, device=total.device)
        g_conf = zeros.index_add(0, group, self.fine_conf)
        g_correct = zeros.index_add(0, group, self.fine_correct)
        accuracy = self.correct / total
        confidence = self.conf_sum / total
        return {
            "ece": (diff.abs() * prop).sum(),
            "mce": diff.abs().max(),
            "rms_ce": ((diff**2) * prop).sum().sqrt(),
            "adaptive_ece": (g_correct - g_conf).abs().sum() / total,
            "brier": self.brier_sum / total,
            "nll": self.nll_sum / total,
            "accuracy": accuracy,
            "confidence": confidence,
            "gap": confidence - accuracy,
            "gap_se": ((self.gap_sq_sum / total - (confidence - accuracy) ** 2).clamp_min(0) / total).sqrt(),
            "count": total,
            "nonfinite": self.nonfinite,
            "out_of_range": self.out_of_range,
            "bin_count": count,
            "bin_confidence": conf_b,
            "bin_accuracy": acc_b,
            "bin_edges": torch.linspace(0, 1, self.n_bins + 1, dtype=_SUM, device=total.device),
            "fine_count": self.fine_count,
        }


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
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []
        self.kept = 0

    def reset(self) -> None:
        self.parts, self.kept = [], 0

    def _budget(self, width: int) -> int:
        return min(self.rows, self.max_elements // width)

    def add(self, logits: Tensor, target: Tensor) -> None:
        """Keep rows of ``logits`` (``target``-shaped or ``(..., 1)`` for binary, else ``(..., C)``)."""
        binary = logits.shape == target.shape or (logits.shape[-1] == 1 and logits.shape[:-1] == target.shape)
        width = 1 if binary else logits.shape[-1]
        budget = self._budget(width) - self.kept
        if budget <= 0:
            return
        x = logits.reshape(-1) if binary else logits.reshape(-1, width)
        t = target.reshape(-1)[:budget]
        x = x[:budget].float()
        finite = torch.isfinite(x) if binary else torch.isfinite(x).all(-1)
        valid = finite & (t >= 0) & (t < max(width, 2))
        if self.ignore_index is not None:
            valid &= t != self.ignore_index
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        x = torch.where(finite if binary else finite.unsqueeze(-1), x, zero)
        self.parts.append((x, torch.where(valid, t, torch.zeros_like(t)), valid.float()))
        self.kept += len(t)

    def temperature(self, all_gather: Any = None) -> float:
        """:func:`fit_temperature` on the sample (NaN when empty). ``all_gather`` (the strategy's, under DDP)
        pools every rank's sample first, so all ranks fit the same temperature on the whole validation set."""
        if not self.parts:
            return float("nan")
        x, t, w = (torch.cat(parts) for parts in zip(*self.parts, strict=True))
        if all_gather is not None:
            budget = self._budget(1 if x.dim() == 1 else x.shape[-1])
            x, t, w = (self._gather(all_gather, r, budget) for r in (x, t, w))
        return fit_temperature(x, t, w)

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
