"""``ErrorAnalysis``: look at the errors, not only the score (the lecture's "sample 100 outputs, look at them").

Each analysed validation run keeps, on the device and in memory bounded by the sample size, a seeded uniform
sample of errors, the highest-loss examples, the most confident errors and (token tasks) the near misses whose
token accuracy is high but the sequence is wrong; and per-slice sums (label, input length, every per-example
metadata field of the batch, target-token frequency). One transfer at the end; then a samples table with
decoded text, a slices table with 95% intervals, per-slice scalars, and the findings ``eval.weak_slice`` and
``eval.slice_regression``. The decisions are in :mod:`lightning_debug.rules.errors`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_debug.base import DebugCallback
from lightning_debug.integrations.hf import is_causal_lm
from lightning_debug.rules import errors as rules
from lightning_debug.signals import find_predictions
from lightning_debug.sinks import Sink

if TYPE_CHECKING:
    import lightning.pytorch as pl

PREFIX = "debug/errors/"
SLICE_PREFIX = "debug/slices/"
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
MAX_SLICE_SCALARS = 100
FIRST_COST = 1.0  # seconds assumed for a first analysis: measured 0.1 s (idle) to 1.5 s (loaded 2-core machine)


class ErrorAnalysis(DebugCallback):
    """Sampled dev errors, slices with intervals, weak and regressed slices, every analysed evaluation.

    Works with what ``validation_step`` returns (``logits``/``probs`` and ``target``, as the calibration
    monitor reads them), with a Hugging Face model called inside it (its output's ``.logits`` are captured by a
    forward hook on the module's children, targets from ``batch["labels"]``), and with this protocol: the step
    output may add ``preds`` (your decoded ids, same shape as the target: used instead of the argmax) and
    ``metadata`` (a dict of per-example columns). Per-example fields of a dict batch (lists of strings or
    ints, 1-D integer tensors) become metadata columns too.

    Args:
        sample_size: errors kept by the seeded uniform sample.
        top_k: rows kept by each of the other selections.
        max_tokens: tokens kept per input / reference / prediction row.
        budget: share of validation time the callback may use during ``fit``: an evaluation is analysed when its
            time so far plus the expected cost stays within it (the first never is: nothing is measured yet;
            ``trainer.validate`` always is). ``None``: every ``every_n_evaluations``.
        every_n_evaluations: analyse every N-th evaluation when ``budget`` is ``None``.
        min_slice_size / alpha / min_gap: a slice is weak when it has ``min_slice_size`` examples, is worse than
            the rest of its column by ``min_gap`` and a one-sided Fisher test is significant at family-wise
            ``alpha`` (Holm over all slices).
        max_slice_values: a column with more distinct values (an ``id``) is a row column, not sliced.
        ignore_index / shift_labels: as :class:`~lightning_debug.callbacks.calibration.CalibrationMonitor`; the
            automatic shift applies only to targets taken from ``batch["labels"]``.
        tokenizer: decodes ids to text; by default the module's or datamodule's ``tokenizer`` or any attribute
            with ``decode`` and ``batch_decode``.
        plot_every_n_evaluations: the slice bar chart every N analysed evaluations (0: never).
        seed: seeds the sample (with the evaluation and batch index: reproducible after a resume).
    """

    def __init__(
        self,
        *,
        sample_size: int = 100,
        top_k: int = 10,
        max_tokens: int = 64,
        budget: float | None = 0.02,
        every_n_evaluations: int = 1,
        min_slice_size: int = rules.MIN_SIZE,
        alpha: float = rules.ALPHA,
        min_gap: float = rules.MIN_GAP,
        max_slice_values: int = 64,
        ignore_index: int | None = -100,
        shift_labels: bool | None = None,
        tokenizer: Any = None,
        plot_every_n_evaluations: int = 5,
        seed: int = 0,
        dataloader_idx: int = 0,
        strict: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__(strict=strict, verbose=verbose)
        for name, value in (("sample_size", sample_size), ("top_k", top_k), ("max_tokens", max_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if budget is not None and not 0 < budget <= 1:
            raise ValueError(f"`budget` must be in (0, 1] or None (use every_n_evaluations), got {budget!r}")
        if every_n_evaluations < 1 or min_slice_size < 1 or max_slice_values < 2:
            raise ValueError("`every_n_evaluations` and `min_slice_size` must be >= 1, `max_slice_values` >= 2")
        if not 0 < alpha < 1:
            raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}")
        self.sizes = (sample_size, top_k, top_k, top_k)
        self.max_tokens = max_tokens
        self.budget = budget
        self.every_n_evaluations = every_n_evaluations
        self.min_slice_size, self.alpha, self.min_gap = min_slice_size, alpha, min_gap
        self.cap = max_slice_values
        self.ignore_index = ignore_index
        self.shift_labels = shift_labels
        self.tokenizer = tokenizer
        self.plot_every_n_evaluations = plot_every_n_evaluations
        self.seed = seed
        self.dataloader_idx = dataloader_idx
        self.evaluation = 0  # validation runs seen (sanity checks excluded)
        self.history: list[dict[str, Any]] = []  # one row per analysed evaluation
        self.last_slices: list[dict[str, Any]] = []
        self.token_counts: Tensor | None = None  # target-token frequencies in the training data seen
        self.cost = {"seconds": 0.0, "validation_seconds": 0.0, "analysed": 0, "evaluations": 0}
        self.last_files: list[Any] = []
        self._causal = False
        self._run: dict[str, Any] | None = None  # state of the validation run being analysed
        self._hooks: list[Any] = []
        self._captured: Tensor | None = None
        self._clock = 0.0

    # -- set-up and training-data frequencies ----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._causal = is_causal_lm(pl_module) if self.shift_labels is None else self.shift_labels
        if self.tokenizer is None:
            self.tokenizer = find_tokenizer(pl_module, trainer.datamodule if hasattr(trainer, "datamodule") else None)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        labels = batch_target(batch)
        if labels is None or labels.dim() < 2 or labels.is_floating_point():
            setattr(self, "on_train_batch_end", None)  # noqa: B010  not a token task: Lightning skips the hook
            return
        if self.token_counts is None:
            sizes = [m.num_embeddings for m in pl_module.modules() if isinstance(m, torch.nn.Embedding)]
            self.token_counts = torch.zeros(max(sizes, default=1 << 16), dtype=torch.long, device=labels.device)
        flat = labels.detach().flatten()
        size = self.token_counts.shape[0]
        self.token_counts = self.token_counts.to(flat.device)
        self.token_counts.index_add_(0, flat.clamp_min(0) % size, (flat >= 0).long())

    # -- collecting (device only) ------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._clock = time.perf_counter()
        self._run = {"own": 0.0, "active": self._due(trainer), "offset": 0, "missing": None, "rows": None}
        if self._run["active"]:
            self._hooks = [child.register_forward_hook(self._capture) for child in pl_module.children()]

    def _due(self, trainer: pl.Trainer) -> bool:
        """Outside ``fit`` always; with a budget, when the callback's time so far plus the expected cost of this
        analysis (the mean of past ones, :data:`FIRST_COST` before any) stays within ``budget`` times the
        validation time so far plus this run's expected share (so the first evaluation of a fit is never analysed
        by default: no validation time has been measured yet)."""
        if trainer.state.fn != "fit":
            return True
        if self.budget is None:
            return self.evaluation % self.every_n_evaluations == 0
        c = self.cost
        expected = c["seconds"] / c["analysed"] if c["analysed"] else FIRST_COST
        val = c["validation_seconds"]
        return c["seconds"] + expected <= self.budget * (val + val / max(c["evaluations"], 1))

    def _capture(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
        if isinstance(logits, Tensor):
            self._captured = logits

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        run = self._run
        if run is None or not run["active"] or dataloader_idx != self.dataloader_idx:
            return
        start = time.perf_counter()
        try:
            self._collect(run, outputs, batch, batch_idx)
        finally:
            self._captured = None
            run["own"] += time.perf_counter() - start

    def _collect(self, run: dict[str, Any], outputs: Any, batch: Any, batch_idx: int) -> None:
        found = self._predictions(outputs, batch)
        if isinstance(found, str):
            run["missing"] = found
            return
        scores, target, fmt, preds = found
        ex = rules.per_example(scores, target, fmt, preds, self.ignore_index)
        n, dev = ex.loss.shape[0], ex.loss.device
        inputs = batch_inputs(batch)
        if run["rows"] is None:
            self._start_run(run, ex, inputs, batch, outputs)
        lengths = inputs[1] if inputs is not None else torch.full((n,), -1, device=dev)
        meta = [
            self._meta_values(run, name, kind, values_of(batch, outputs, name), n, dev) for name, kind in run["meta"]
        ]
        rows = self._rows(run, ex, inputs, lengths, [m for m, _ in meta])
        keys = self._keys(ex, batch_idx)
        run["keys"], run["rows"] = rules.merge_selections(run["keys"], run["rows"], keys, rows, self.sizes)
        self._add_to_slices(run, ex, lengths if inputs is not None else None, [c for _, c in meta])
        run["offset"] += n

    def _rows(
        self, run: dict[str, Any], ex: rules.Examples, inputs: Any, lengths: Tensor, meta: list[Tensor]
    ) -> Tensor:
        """``(B, F)`` float64: the scalar fields, the metadata values, then input / reference / prediction ids."""
        n, dev = ex.loss.shape[0], ex.loss.device
        scalars = [
            torch.arange(run["offset"], run["offset"] + n, device=dev),
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
        if run["in_width"] and inputs is not None:
            parts.append(rules.compact(inputs[0], inputs[2], run["in_width"]).double())
        if run["out_width"]:
            parts += [
                rules.compact(t, ex.token_valid, run["out_width"]).double() for t in (ex.reference, ex.prediction)
            ]
        return torch.cat(parts, 1)

    def _keys(self, ex: rules.Examples, batch_idx: int) -> Tensor:
        """One key column per selection (:data:`SELECTIONS`); ``-inf``: not eligible."""
        n, dev = ex.loss.shape[0], ex.loss.device
        scored = ex.tokens > 0
        error = scored & ~ex.exact
        none = torch.full_like(ex.loss, -math.inf, dtype=torch.float64)
        token_acc = ex.correct_tokens.double() / ex.tokens.clamp_min(1)
        columns = [
            torch.where(error, rules.sample_keys(self.seed, self.evaluation, batch_idx, n, dev), none),
            torch.where(scored, ex.loss.double(), none),
            torch.where(error, ex.confidence.double(), none),
            torch.where(error & (ex.tokens > 1), token_acc, none),
        ]
        return torch.stack(columns, 1)

    def _add_to_slices(
        self, run: dict[str, Any], ex: rules.Examples, lengths: Tensor | None, meta: list[Tensor]
    ) -> None:
        """One ``index_add_`` for every example-level column, one for the token-frequency buckets."""
        n, dev = ex.loss.shape[0], ex.loss.device
        codes = [torch.zeros(n, dtype=torch.long, device=dev)]
        if not run["token_task"]:
            codes.append(ex.reference[:, 0].clamp(0, self.cap))
        if lengths is not None:
            codes.append(rules.length_bucket(lengths).clamp_max(self.cap))
        codes += meta
        scored = ex.tokens > 0
        values = torch.stack([scored, ex.tokens, ex.correct_tokens, ex.loss, ex.exact], 1).double() * scored[:, None]
        index = (torch.stack(codes, 1) + torch.arange(len(codes), device=dev) * (self.cap + 1)).flatten()
        run["slices"].index_add_(0, index, values.repeat_interleave(len(codes), 0))
        if run["freq_of_token"] is not None:
            bucket = run["freq_of_token"][ex.reference.clamp_min(0) % run["freq_of_token"].shape[0]]
            v, ok = ex.token_valid.double(), ex.token_ok.double()
            per_token = torch.stack([v, v, ok, ex.token_nll.double(), ok], -1)
            run["frequency"].index_add_(0, bucket.flatten(), per_token.reshape(-1, 5))

    def _predictions(self, outputs: Any, batch: Any) -> tuple[Tensor, Tensor, str, Tensor | None] | str:
        if self._captured is not None and not _has_scores(outputs):
            outputs = {"logits": self._captured}
        found = find_predictions(outputs, batch)
        if isinstance(found, str):
            return found
        scores, target, fmt = found
        preds = outputs.get("preds") if isinstance(outputs, Mapping) else None
        from_batch = not (isinstance(outputs, Mapping) and outputs.get("target") is not None)
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if self._causal and from_batch and scores.dim() == 3 and isinstance(ids, Tensor) and ids.shape == target.shape:
            scores, target = scores[:, :-1], target[:, 1:]
        return scores.detach(), target.detach(), fmt, preds if isinstance(preds, Tensor) else None

    def _start_run(self, run: dict[str, Any], ex: rules.Examples, inputs: Any, batch: Any, outputs: Any) -> None:
        """Widths and columns are fixed by the first batch: later batches are padded or cut to them."""
        dev = ex.loss.device
        run["token_task"] = ex.reference.shape[1] > 1
        run["meta"] = metadata_fields(batch, outputs, ex.loss.shape[0])
        run["codes"] = {name: {} for name, kind in run["meta"] if kind == "str"}
        run["in_width"] = self.max_tokens if inputs is not None else 0
        run["summary"] = input_summary(batch)
        run["out_width"] = self.max_tokens if run["token_task"] else 0
        width = len(SCALAR_FIELDS) + len(run["meta"]) + run["in_width"] + 2 * run["out_width"]
        run["keys"], run["rows"] = rules.empty_selection(self.sizes, width, dev)
        columns = ["all"] + ([] if run["token_task"] else ["label"]) + (["input_length"] if inputs is not None else [])
        run["columns"] = columns + [name for name, _ in run["meta"]]
        run["slices"] = torch.zeros((len(run["columns"]) * (self.cap + 1), 5), dtype=torch.float64, device=dev)
        counts = self.token_counts if run["token_task"] else None
        run["freq_of_token"] = None if counts is None else rules.frequency_bucket(counts.to(dev))
        run["frequency"] = torch.zeros((rules.FREQUENCY_BUCKETS, 5), dtype=torch.float64, device=dev)

    def _meta_values(
        self, run: dict[str, Any], name: str, kind: str, values: Any, n: int, dev: Any
    ) -> tuple[Tensor, Tensor]:
        """``(row value, slice code)`` per example: strings get codes in order of appearance (host side)."""
        if kind == "int":
            v = values.detach().long() if isinstance(values, Tensor) else torch.tensor(list(values), device=dev)
            v = v.to(dev)
            return v, torch.where((v >= 0) & (v < self.cap), v, self.cap)
        table: dict[str, int] = run["codes"][name]
        codes = [table.setdefault(str(s), len(table)) for s in values] if values is not None else [-1] * n
        c = torch.tensor(codes, device=dev)
        return c, torch.where((c >= 0) & (c < self.cap), c, self.cap)

    # -- judging and publishing (once per analysed evaluation) -------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        start = time.perf_counter()
        try:
            if run["active"]:
                self._finish(trainer, run)
        finally:
            own = run["own"] + time.perf_counter() - start
            c = self.cost
            c["validation_seconds"] += time.perf_counter() - self._clock - own
            c["seconds"] += own
            c["analysed"] += int(run["active"])
            c["evaluations"] += 1
            self.evaluation += 1

    def _finish(self, trainer: pl.Trainer, run: dict[str, Any]) -> None:
        if run["rows"] is None:
            reason = run["missing"] or "no validation batches"
            self.emit(trainer, "check.skipped", f"ErrorAnalysis found nothing to analyse: {reason}.", key="errors:none")
            return
        shapes = [run["slices"].shape, run["frequency"].shape, run["keys"].shape, run["rows"].shape]
        flat = torch.cat([run[k].flatten() for k in ("slices", "frequency", "keys", "rows")]).cpu()  # one transfer
        slices, frequency, keys, rows = (
            t.reshape(s).numpy() for t, s in zip(flat.split([math.prod(s) for s in shapes]), shapes, strict=True)
        )
        counts = self._slice_counts(run, slices, frequency)
        overall = counts.pop(0)
        stats = rules.slice_statistics(counts, min_size=self.min_slice_size, alpha=self.alpha, min_gap=self.min_gap)
        accuracy = overall.accuracy
        units = overall.units or math.nan
        summary = {
            "accuracy": float(accuracy),
            "sequence_accuracy": float(overall.exact / units),
            "loss": float(overall.loss_sum / units),
            "count": float(overall.units),
        }
        sink = Sink(trainer)
        scalars = {PREFIX + k: v for k, v in summary.items() if math.isfinite(v)}
        tested = [s for s in stats if s.count >= self.min_slice_size][:MAX_SLICE_SCALARS]
        scalars.update({f"{SLICE_PREFIX}{s.column}/{s.value}/acc": s.accuracy for s in tested})
        sink.log_scalars(scalars)
        epoch = trainer.current_epoch
        columns, table = self._sample_rows(run, keys, rows)
        self.last_files = [
            sink.log_frame(PREFIX + "samples", f"errors/epoch={epoch}", columns, table),
            sink.log_frame(
                PREFIX + "slices", f"errors/slices_epoch={epoch}", rules.SliceStat.COLUMNS, [s.row() for s in stats]
            ),
        ]
        n = len(self.history)
        if self.plot_every_n_evaluations and n % self.plot_every_n_evaluations == 0 and tested:
            labels = [f"{s.column}={s.value}" for s in tested]
            title = f"Accuracy per slice, epoch {epoch} (overall {accuracy:.3f})"
            self.last_files.append(
                sink.log_interval_bars(
                    PREFIX + "slice_accuracy",
                    labels,
                    [s.accuracy for s in tested],
                    [(s.low, s.high) for s in tested],
                    title,
                )
            )
        self._judge(trainer, stats, accuracy)
        self.history.append({"evaluation": self.evaluation, "epoch": epoch, "step": trainer.global_step, **summary})
        self.last_slices = [s.as_dict() for s in stats]

    def _slice_counts(self, run: dict[str, Any], slices: Any, frequency: Any) -> list[rules.SliceCounts]:
        """Overall first, then every slice of every column that has no overflow (too many values)."""
        names = {name: {code: value for value, code in table.items()} for name, table in run["codes"].items()}
        found: list[tuple[str, str, list[float]]] = []
        for column, block in zip(run["columns"], slices.reshape(-1, self.cap + 1, 5).tolist(), strict=True):
            if column != "all" and block[self.cap][0] > 0:
                continue  # more than max_slice_values values: an id-like column, not a slice
            found += [(column, self._value(column, code, names), v) for code, v in enumerate(block[: self.cap])]
        found += [("target_frequency", rules.frequency_bucket_label(b), v) for b, v in enumerate(frequency.tolist())]
        return [rules.SliceCounts(c, value, int(v[0]), *v[1:]) for c, value, v in found if v[0] > 0]

    @staticmethod
    def _value(column: str, code: int, names: dict[str, dict[int, str]]) -> str:
        if column == "input_length":
            return rules.length_bucket_label(code)
        return names[column].get(code, str(code)) if column in names else str(code)

    def _sample_rows(self, run: dict[str, Any], keys: Any, rows: Any) -> tuple[list[str], list[list[Any]]]:
        """One row per kept example and selection, texts decoded in one call."""
        meta = [name for name, _ in run["meta"]]
        token = run["token_task"]
        columns = ["selection", "position", *meta, "input", "reference", "prediction", "correct", "loss"]
        columns += ["confidence", "length"] + (["token_accuracy", "first_difference"] if token else [])
        names = {name: {code: value for value, code in table.items()} for name, table in run["codes"].items()}
        base, w_in, w_out = len(SCALAR_FIELDS), run["in_width"], run["out_width"]
        slot = torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes)).tolist()
        kept = [(i, s) for i, s in enumerate(slot) if math.isfinite(keys[i, s])]
        table = rows[[i for i, _ in kept]].tolist() if kept else []
        start = base + len(meta)
        blocks = [(start, w_in)] if w_in else []
        blocks += [(start + w_in, w_out), (start + w_in + w_out, w_out)] if token else []
        texts = self._texts([r[a : a + w] for r in table for a, w in blocks])
        out = []
        for n, ((_, s), r) in enumerate(zip(kept, table, strict=True)):
            f = dict(zip(SCALAR_FIELDS, r[:base], strict=True))
            values = [
                names[m].get(int(v), "") if m in names else int(v) for m, v in zip(meta, r[base:start], strict=True)
            ]
            text = texts[n * len(blocks) : (n + 1) * len(blocks)]
            inp = text[0] if w_in else run.get("summary", "")
            ref, pred = text[-2:] if token else (str(int(f["target"])), str(int(f["prediction"])))
            row = [SELECTIONS[s], int(f["position"]), *values, inp, ref, pred, bool(f["correct"]), f["loss"]]
            row += [f["confidence"], int(f["length"])] + ([f["token_accuracy"], int(f["first_diff"])] if token else [])
            out.append(row)
        return columns, out

    def _texts(self, rows: list[list[float]]) -> list[str]:
        ids = [[int(i) for i in r if i >= 0] for r in rows]
        tok = self.tokenizer
        if tok is None or not ids:
            return [" ".join(map(str, r)) for r in ids]
        if callable(getattr(tok, "batch_decode", None)):
            return [str(t) for t in tok.batch_decode(ids, skip_special_tokens=True)]
        return [str(tok.decode(r)) for r in ids]

    def _judge(self, trainer: pl.Trainer, stats: Sequence[rules.SliceStat], accuracy: float) -> None:
        for s in stats:
            if s.weak:
                self.emit(
                    trainer,
                    "eval.weak_slice",
                    f"Slice {s.column}={s.value} ({s.count} examples) has accuracy {s.accuracy:.3f} "
                    f"[{s.low:.3f}, {s.high:.3f}] against {s.rest_accuracy:.3f} for the rest of its column "
                    f"(gap {s.gap:.3f}, Holm-adjusted p {s.p_adjusted:.2g}).",
                    data=s.as_dict(),
                    key=f"{s.column}={s.value}",
                )
        if not self.history or not self.last_slices:
            return
        before = [rules.SliceStat(**d) for d in self.last_slices]
        previous = self.history[-1]["accuracy"]
        for r in rules.slice_regressions(
            before, stats, previous, accuracy, min_size=self.min_slice_size, alpha=self.alpha, min_gap=self.min_gap
        ):
            self.emit(
                trainer,
                "eval.slice_regression",
                f"Slice {r.column}={r.value} ({r.count} examples) fell from accuracy {r.before:.3f} to {r.after:.3f} "
                f"while the overall accuracy rose from {r.overall_before:.3f} to {r.overall_after:.3f} "
                f"(Holm-adjusted p {r.p_adjusted:.2g}).",
                data=vars(r),
                key=f"{r.column}={r.value}",
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._run = [], None

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "evaluation": self.evaluation,
            "history": [dict(h) for h in self.history],
            "last_slices": [dict(s) for s in self.last_slices],
            "token_counts": None if self.token_counts is None else self.token_counts.cpu(),
            "cost": dict(self.cost),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.evaluation = int(state_dict.get("evaluation", 0))
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.last_slices = [dict(s) for s in state_dict.get("last_slices", [])]
        self.token_counts = state_dict.get("token_counts")
        self.cost = {**self.cost, **state_dict.get("cost", {})}


def _has_scores(outputs: Any) -> bool:
    if isinstance(outputs, Mapping):
        return outputs.get("logits") is not None or outputs.get("probs") is not None
    return isinstance(getattr(outputs, "logits", None), Tensor)


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


def find_tokenizer(module: Any, datamodule: Any) -> Any:
    """A ``tokenizer`` attribute of the module or datamodule, or any attribute with ``decode`` and
    ``batch_decode`` (a Hugging Face tokenizer, recognised without importing transformers)."""
    for owner in (module, datamodule):
        if owner is None:
            continue
        tok = getattr(owner, "tokenizer", None)
        if callable(getattr(tok, "decode", None)):
            return tok
        for value in vars(owner).values():
            if callable(getattr(value, "decode", None)) and callable(getattr(value, "batch_decode", None)):
                return value
    return None
