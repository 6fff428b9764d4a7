"""What :class:`~lightning_debug.callbacks.errors.ErrorAnalysis` collects on the device during one validation run.

A :class:`Collection` keeps fixed-size tensors whatever the validation set: the rows of every selection
(:data:`SELECTIONS`, merged batch by batch by :func:`~lightning_debug.rules.errors.merge_selections`) and the
per-slice sums (one ``index_add_`` per batch for every example-level column, one for the target-frequency
buckets). Nothing is read back until :meth:`Collection.pull`, one transfer at the end of the run. Also here:
how a batch is read (targets, token inputs, per-example metadata) and the training-label token counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_debug.rules import errors as rules
from lightning_debug.signals import find_predictions

SELECTIONS = ("random_error", "highest_loss", "confident_error", "near_miss")
SCALAR_FIELDS = (
    "position",
    "loss",
    "confidence",
    "correct",
    "prediction",
    "target",
    "length",
    "token_accuracy",
    "first_diff",
)
NOT_METADATA = {"input_ids", "attention_mask", "labels", "target", "token_type_ids", "position_ids", "preds"}


Found = tuple[Tensor, Tensor, str, Tensor | None]  # scores, target, "logits" | "probs", the user's preds


class Pulled(NamedTuple):
    """A collection's tensors on the host, as numpy arrays."""

    slices: Any  # (columns * (cap + 1), 5): units, tokens, correct, loss sum, exact
    frequency: Any  # (FREQUENCY_BUCKETS, 5), same fields
    keys: Any  # (K, len(SELECTIONS)); -inf: slot empty or not eligible
    rows: Any  # (K, F): SCALAR_FIELDS, metadata codes, input / reference / prediction ids (-1: none)


class Collection:
    """One analysed validation run. Widths and columns are fixed by the first batch (:meth:`_start`): later
    batches are padded or cut to them; string metadata get integer codes in order of appearance."""

    token_task: bool
    meta: list[tuple[str, str]]  # (name, "int" | "str") per metadata column
    codes: dict[str, dict[str, int]]  # string value -> code, per "str" column
    in_width: int  # input ids kept per row (0: the input is not token ids)
    out_width: int  # reference / prediction ids kept per row (0: classification)
    summary: str  # what a non-token input is (dtype and shape)
    columns: list[str]  # the example-level slice columns ("all" first)
    keys: Tensor
    rows: Tensor
    slices: Tensor
    frequency: Tensor
    freq_of_token: Tensor | None

    def __init__(
        self,
        sizes: tuple[int, ...],
        max_tokens: int,
        cap: int,
        ignore_index: int | None,
        seed: int,
        evaluation: int,
        token_counts: Tensor | None,
        rank: int = 0,
    ) -> None:
        self.sizes, self.max_tokens, self.cap, self.ignore_index = sizes, max_tokens, cap, ignore_index
        self.seed, self.evaluation, self.token_counts, self.rank = seed, evaluation, token_counts, rank
        self.started = False
        self.offset = 0  # examples seen: the next one's position in validation order
        self.missing: str | None = None  # why a batch had nothing to analyse

    def add(self, found: Found | str, batch: Any, outputs: Any, batch_idx: int) -> None:
        """One validation batch: ``found`` is what :func:`predictions` returned (a string: why nothing was)."""
        if isinstance(found, str):
            self.missing = found
            return
        ex = rules.per_example(*found, self.ignore_index)
        n, dev = ex.loss.shape[0], ex.loss.device
        inputs = batch_inputs(batch)
        if not self.started:
            self._start(ex, inputs, batch, outputs)
        lengths = inputs[1] if inputs is not None else torch.full((n,), -1, device=dev)
        meta = [self._meta_values(name, kind, values_of(batch, outputs, name), n, dev) for name, kind in self.meta]
        rows = self._rows(ex, inputs, lengths, [m for m, _ in meta])
        keys = self._keys(ex, batch_idx)
        self.keys, self.rows = rules.merge_selections(self.keys, self.rows, keys, rows, self.sizes)
        self._add_to_slices(ex, lengths if inputs is not None else None, [c for _, c in meta])
        self.offset += n

    def _start(self, ex: rules.Examples, inputs: Any, batch: Any, outputs: Any) -> None:
        dev = ex.loss.device
        self.started = True
        self.token_task = ex.reference.shape[1] > 1
        self.meta = metadata_fields(batch, outputs, ex.loss.shape[0])
        self.codes = {name: {} for name, kind in self.meta if kind == "str"}
        self.in_width = self.max_tokens if inputs is not None else 0
        self.summary = input_summary(batch)
        self.out_width = self.max_tokens if self.token_task else 0
        width = len(SCALAR_FIELDS) + len(self.meta) + self.in_width + 2 * self.out_width
        self.keys, self.rows = rules.empty_selection(self.sizes, width, dev)
        columns = ["all"] + ([] if self.token_task else ["label"]) + (["input_length"] if inputs is not None else [])
        self.columns = columns + [name for name, _ in self.meta]
        self.slices = torch.zeros((len(self.columns) * (self.cap + 1), 5), dtype=torch.float64, device=dev)
        counts = self.token_counts if self.token_task else None
        self.freq_of_token = None if counts is None else rules.frequency_bucket(counts.to(dev))
        self.frequency = torch.zeros((rules.FREQUENCY_BUCKETS, 5), dtype=torch.float64, device=dev)

    def _rows(self, ex: rules.Examples, inputs: Any, lengths: Tensor, meta: list[Tensor]) -> Tensor:
        """``(B, F)`` float64: the scalar fields, the metadata values, then input / reference / prediction ids."""
        n, dev = ex.loss.shape[0], ex.loss.device
        scalars = [
            torch.arange(self.offset, self.offset + n, device=dev),
            ex.loss,
            ex.confidence,
            ex.exact,
            ex.prediction[:, 0],
            ex.reference[:, 0],
            lengths,
            ex.correct_tokens / ex.tokens.clamp_min(1),
            ex.first_diff,
        ]
        parts = [torch.stack([s.double() for s in scalars + meta], 1)]
        if self.in_width and inputs is not None:
            parts.append(rules.compact(inputs[0], inputs[2], self.in_width).double())
        if self.out_width:
            parts += [rules.compact(t, ex.token_valid, self.out_width).double() for t in (ex.reference, ex.prediction)]
        return torch.cat(parts, 1)

    def _keys(self, ex: rules.Examples, batch_idx: int) -> Tensor:
        """One key column per selection (:data:`SELECTIONS`); ``-inf``: not eligible."""
        n, dev = ex.loss.shape[0], ex.loss.device
        scored = ex.tokens > 0
        error = scored & ~ex.exact
        none = torch.full_like(ex.loss, -math.inf, dtype=torch.float64)
        token_acc = ex.correct_tokens.double() / ex.tokens.clamp_min(1)
        columns = [
            torch.where(error, rules.sample_keys(self.seed, self.evaluation, batch_idx, n, dev, self.rank), none),
            torch.where(scored, ex.loss.double(), none),
            torch.where(error, ex.confidence.double(), none),
            torch.where(error & (ex.tokens > 1), token_acc, none),
        ]
        return torch.stack(columns, 1)

    def _add_to_slices(self, ex: rules.Examples, lengths: Tensor | None, meta: list[Tensor]) -> None:
        """One ``index_add_`` for every example-level column, one for the token-frequency buckets."""
        n, dev = ex.loss.shape[0], ex.loss.device
        codes = [torch.zeros(n, dtype=torch.long, device=dev)]
        if not self.token_task:
            codes.append(ex.reference[:, 0].clamp(0, self.cap))
        if lengths is not None:
            codes.append(rules.length_bucket(lengths).clamp_max(self.cap))
        codes += meta
        scored = ex.tokens > 0
        values = torch.stack([scored, ex.tokens, ex.correct_tokens, ex.loss, ex.exact], 1).double() * scored[:, None]
        index = (torch.stack(codes, 1) + torch.arange(len(codes), device=dev) * (self.cap + 1)).flatten()
        self.slices.index_add_(0, index, values.repeat_interleave(len(codes), 0))
        if self.freq_of_token is not None:
            bucket = self.freq_of_token[ex.reference.clamp_min(0) % self.freq_of_token.shape[0]]
            v, ok = ex.token_valid.double(), ex.token_ok.double()
            per_token = torch.stack([v, v, ok, ex.token_nll.double(), ok], -1)
            self.frequency.index_add_(0, bucket.flatten(), per_token.reshape(-1, 5))

    def _meta_values(self, name: str, kind: str, values: Any, n: int, dev: Any) -> tuple[Tensor, Tensor]:
        """``(row value, slice code)`` per example: strings get codes in order of appearance (host side)."""
        if kind == "int":
            v = values.detach().long() if isinstance(values, Tensor) else torch.tensor(list(values), device=dev)
            v = v.to(dev)
            return v, torch.where((v >= 0) & (v < self.cap), v, self.cap)
        table = self.codes[name]
        codes = [table.setdefault(str(s), len(table)) for s in values] if values is not None else [-1] * n
        c = torch.tensor(codes, device=dev)
        return c, torch.where((c >= 0) & (c < self.cap), c, self.cap)

    def pull(self) -> Pulled:
        """Every kept tensor on the host, in one transfer."""
        parts = (self.slices, self.frequency, self.keys, self.rows)
        flat = torch.cat([t.flatten() for t in parts]).cpu()
        pieces = flat.split([t.numel() for t in parts])
        return Pulled(*(p.reshape(t.shape).numpy() for p, t in zip(pieces, parts, strict=True)))


class LogitsCapture:
    """The ``.logits`` of the last output of the module's children, for a ``validation_step`` that calls a
    Hugging Face model and returns nothing. Forward hooks only while a run is analysed."""

    def __init__(self) -> None:
        self._hooks: list[Any] = []
        self._logits: Tensor | None = None

    def attach(self, module: torch.nn.Module) -> None:
        self._hooks = [child.register_forward_hook(self._hook) for child in module.children()]

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._logits = [], None

    def take(self) -> Tensor | None:
        """The captured logits, forgotten on the way (each batch captures its own)."""
        logits, self._logits = self._logits, None
        return logits

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
        if isinstance(logits, Tensor):
            self._logits = logits


def predictions(outputs: Any, batch: Any, captured: Tensor | None, causal: bool) -> Found | str:
    """``(scores, target, format, preds)`` of a validation step, or why there are none. ``captured``: the logits
    a forward hook saw (used when the step returned no scores); ``causal``: shift targets from
    ``batch["labels"]`` by one (logits at t score the label at t + 1)."""
    if captured is not None and not has_scores(outputs):
        outputs = {"logits": captured}
    found = find_predictions(outputs, batch)
    if isinstance(found, str):
        return found
    scores, target, fmt = found
    preds = outputs.get("preds") if isinstance(outputs, Mapping) else None
    from_batch = not (isinstance(outputs, Mapping) and outputs.get("target") is not None)
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if causal and from_batch and scores.dim() == 3 and isinstance(ids, Tensor) and ids.shape == target.shape:
        scores, target = scores[:, :-1], target[:, 1:]
    return scores.detach(), target.detach(), fmt, preds if isinstance(preds, Tensor) else None


def has_scores(outputs: Any) -> bool:
    if isinstance(outputs, Mapping):
        return outputs.get("logits") is not None or outputs.get("probs") is not None
    return isinstance(getattr(outputs, "logits", None), Tensor)


def count_tokens(counts: Tensor | None, labels: Tensor, module: torch.nn.Module) -> Tensor:
    """Add a training batch's target tokens to ``counts`` (on the labels' device; sized by the module's
    largest embedding when new). Negative labels (``-100``) are not counted."""
    if counts is None:
        sizes = [m.num_embeddings for m in module.modules() if isinstance(m, torch.nn.Embedding)]
        counts = torch.zeros(max(sizes, default=1 << 16), dtype=torch.long, device=labels.device)
    flat = labels.detach().flatten()
    counts = counts.to(flat.device)
    counts.index_add_(0, flat.clamp_min(0) % counts.shape[0], (flat >= 0).long())
    return counts


def batch_target(batch: Any) -> Tensor | None:
    """The integer target of a training batch: ``labels`` / ``target`` of a dict, or ``y`` of ``(x, y)``."""
    if isinstance(batch, Mapping):
        y = batch.get("labels", batch.get("target"))
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        y = batch[1]
    else:
        y = None
    return y if isinstance(y, Tensor) else None


def batch_inputs(batch: Any) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(token ids, lengths, kept positions)`` of a token batch (``input_ids`` and ``attention_mask``,
    or an integer ``x`` of ``(x, y)``); ``None`` for other inputs (features, images)."""
    ids: Any = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if ids is None and isinstance(batch, (tuple, list)) and len(batch) == 2:
        ids = batch[0]
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
        return None
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    keep = mask.bool() if isinstance(mask, Tensor) else torch.ones_like(ids, dtype=torch.bool)
    return ids, keep.sum(1), keep


def input_summary(batch: Any) -> str:
    """What a non-token input is, per example: ``"float32 [64]"`` for features, ``"float32 [3, 32, 32]"``."""
    x = batch.get("pixel_values", batch.get("x")) if isinstance(batch, Mapping) else None
    if x is None and isinstance(batch, (tuple, list)) and batch:
        x = batch[0]
    return f"{str(x.dtype).removeprefix('torch.')} {list(x.shape[1:])}" if isinstance(x, Tensor) else ""


def metadata_fields(batch: Any, outputs: Any, n: int) -> list[tuple[str, str]]:
    """Per-example fields: lists of ``n`` strings or ints, or 1-D integer tensors of length ``n``."""
    found: dict[str, str] = {}
    sources = [batch, outputs.get("metadata") if isinstance(outputs, Mapping) else None]
    for source in sources:
        if not isinstance(source, Mapping):
            continue
        for name, v in source.items():
            if name in NOT_METADATA or name in found:
                continue
            if isinstance(v, Tensor) and v.dim() == 1 and len(v) == n and not v.is_floating_point():
                found[str(name)] = "int"
            elif isinstance(v, (list, tuple)) and len(v) == n and all(isinstance(x, (str, int)) for x in v):
                found[str(name)] = "str" if any(isinstance(x, str) for x in v) else "int"
    return list(found.items())


def values_of(batch: Any, outputs: Any, name: str) -> Any:
    meta = outputs.get("metadata") if isinstance(outputs, Mapping) else None
    for source in (batch, meta):
        if isinstance(source, Mapping) and name in source:
            return source[name]
    return None
