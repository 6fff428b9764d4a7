"""``ErrorAnalysis``: look at the errors, not only the score (the lecture's "sample 100 outputs, look at them").

An adapter: :mod:`lightning_debug.error_collection` samples rows and sums slices on the device during an analysed
validation run, :mod:`lightning_debug.rules.errors` decides (weak and regressed slices, the time budget),
:mod:`lightning_debug.error_tables` builds the scalars and the tables; this module words and emits the findings
``eval.weak_slice`` and ``eval.slice_regression`` and keeps the state.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_debug import error_tables as tables
from lightning_debug.base import DebugCallback
from lightning_debug.error_collection import Collection, LogitsCapture, batch_target, count_tokens, predictions
from lightning_debug.error_ranks import agreed, pull_all, summed
from lightning_debug.integrations.hf import is_causal_lm
from lightning_debug.rules import errors as rules
from lightning_debug.sinks import Sink

if TYPE_CHECKING:
    import lightning.pytorch as pl


class ErrorAnalysis(DebugCallback):
    """Sampled dev errors, slices with intervals, weak and regressed slices, every analysed evaluation.

    Reads what ``validation_step`` returns (``logits``/``probs`` and ``target``, as the calibration monitor does;
    optionally ``preds``, your decoded ids in the target's shape, and ``metadata``, a dict of per-example
    columns), or the ``.logits`` of a Hugging Face model called inside it (a forward hook on the module's
    children; targets from ``batch["labels"]``). Per-example fields of a dict batch become metadata columns.

    Args:
        sample_size: errors kept by the seeded uniform sample; top_k: rows kept by each other selection.
        max_tokens: tokens kept per input / reference / prediction row.
        budget: share of validation time the callback may use during ``fit`` (see
            :func:`~lightning_debug.rules.errors.analysis_due` and ``publication_due``: analysis and findings when
            affordable, the tables when also affordable; ``trainer.validate`` always does both). ``None``: analyse
            and publish every ``every_n_evaluations``.
        min_slice_size / alpha / min_gap: a slice is weak when it has ``min_slice_size`` examples, is worse than
            the rest of its column by ``min_gap`` and a one-sided Fisher test is significant at family-wise
            ``alpha`` (Holm over all slices).
        max_slice_values: a column with more distinct values (an ``id``) is a row column, not sliced.
        ignore_index / shift_labels: as :class:`~lightning_debug.callbacks.calibration.CalibrationMonitor`; the
            automatic shift applies only to targets taken from ``batch["labels"]``.
        tokenizer: decodes ids to text; by default the module's or datamodule's ``tokenizer`` or any attribute
            with ``decode`` and ``batch_decode``.
        plot_every_n_evaluations: the slice bar chart every N published evaluations (0: never).
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
        self.max_tokens, self.cap, self.seed, self.tokenizer = max_tokens, max_slice_values, seed, tokenizer
        self.budget, self.every_n_evaluations = budget, every_n_evaluations
        self.min_slice_size, self.alpha, self.min_gap = min_slice_size, alpha, min_gap
        self.ignore_index, self.shift_labels = ignore_index, shift_labels
        self.plot_every_n_evaluations, self.dataloader_idx = plot_every_n_evaluations, dataloader_idx
        self.evaluation = 0  # validation runs seen (sanity checks excluded)
        self.history: list[dict[str, Any]] = []  # one row per analysed evaluation
        self.last_slices: list[dict[str, Any]] = []
        self.token_counts: Tensor | None = None  # target-token frequencies in the training data seen
        self.cost = dict(rules.NO_COST)  # what the budget is judged on
        self.last_files: list[Any] = []
        self._causal = False
        self._capture = LogitsCapture()
        self._run: Collection | None = None  # the validation run being analysed
        self._clock: float | None = None  # its start (None: a sanity check, or no run)
        self._own = 0.0  # the callback's time in it

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._causal = is_causal_lm(pl_module) if self.shift_labels is None else self.shift_labels
        if self.tokenizer is None:
            datamodule = trainer.datamodule if hasattr(trainer, "datamodule") else None
            self.tokenizer = tables.find_tokenizer(pl_module, datamodule)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        labels = batch_target(batch)
        if labels is None or labels.dim() < 2 or labels.is_floating_point():
            setattr(self, "on_train_batch_end", None)  # noqa: B010  not a token task: Lightning skips the hook
            return
        self.token_counts = count_tokens(self.token_counts, labels, pl_module)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._clock, self._own = time.perf_counter(), 0.0
        if agreed(trainer, self._due(trainer)):  # under DDP, rank zero's decision
            settings = (self.max_tokens, self.cap, self.ignore_index, self.seed, self.evaluation)
            self._run = Collection(self.sizes, *settings, summed(trainer, self.token_counts), trainer.global_rank)
            self._capture.attach(pl_module)

    def _due(self, trainer: pl.Trainer) -> bool:
        """Outside ``fit`` always; else every ``every_n_evaluations`` or, with a budget, when affordable."""
        if trainer.state.fn != "fit":
            return True
        if self.budget is None:
            return self.evaluation % self.every_n_evaluations == 0
        return rules.analysis_due(self.cost, self.budget)

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
        if run is None or dataloader_idx != self.dataloader_idx:
            return
        start = time.perf_counter()
        try:
            run.add(predictions(outputs, batch, self._capture.take(), self._causal), batch, outputs, batch_idx)
        finally:
            self._own += time.perf_counter() - start

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run, self._run = self._run, None
        if self._clock is None:
            return
        self._capture.detach()
        start = time.perf_counter()
        c = self.cost
        c["validation_seconds"] += start - self._clock - self._own
        try:
            judged = self._judge(trainer, run) if run is not None else None
            spent = c["seconds"] + self._own + time.perf_counter() - start
            budget = self.budget if trainer.state.fn == "fit" else None  # None: every analysed evaluation
            if judged is not None and (budget is None or rules.publication_due(c, spent, budget)):
                self._publish(trainer, *judged)
        finally:
            c["seconds"] += self._own + time.perf_counter() - start
            c["analysed"] += int(run is not None)
            c["evaluations"] += 1
            self.evaluation += 1
            self._clock = None

    def _judge(self, trainer: pl.Trainer, run: Collection) -> tuple[Any, ...] | None:
        """Pull, compute the slices, log the scalars, emit the findings; what publishing needs, or ``None``."""
        pulled = pull_all(trainer, run)  # one transfer; under DDP one gather, every rank's shard merged
        if pulled is None:
            reason = run.missing or "no validation batches"
            self.emit(trainer, "check.skipped", f"ErrorAnalysis found nothing to analyse: {reason}.", key="errors:none")
            return None
        counts = tables.slice_counts(run, pulled.slices, pulled.frequency)
        overall = counts.pop(0)
        limits: dict[str, Any] = {"min_size": self.min_slice_size, "alpha": self.alpha, "min_gap": self.min_gap}
        stats = rules.slice_statistics(counts, **limits)
        tested = [s for s in stats if s.count >= self.min_slice_size][: tables.MAX_SLICE_SCALARS]
        summary = tables.summary(overall)
        Sink(trainer).log_scalars(tables.scalars(summary, tested))
        accuracy = summary["accuracy"]
        self._emit_slices(trainer, stats, accuracy, limits)
        epoch = trainer.current_epoch
        self.history.append({"evaluation": self.evaluation, "epoch": epoch, "step": trainer.global_step, **summary})
        self.last_slices = [s.as_dict() for s in stats]
        return run, pulled, stats, tested, accuracy

    def _publish(self, trainer: pl.Trainer, run: Collection, pulled: Any, stats: Any, tested: Any, acc: float) -> None:
        start, every = time.perf_counter(), self.plot_every_n_evaluations
        chart = tested if every and self.cost["published"] % every == 0 else []
        sink, epoch = Sink(trainer), trainer.current_epoch
        self.last_files = tables.publish(sink, epoch, run, pulled, stats, chart, acc, self.tokenizer)
        self.cost["publish_seconds"] += time.perf_counter() - start
        self.cost["published"] += 1

    def _emit_slices(self, trainer: pl.Trainer, stats: list[rules.SliceStat], accuracy: float, limits: Any) -> None:
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
        before = [rules.SliceStat(**d) for d in self.last_slices]
        previous = self.history[-1]["accuracy"] if self.history else math.nan  # NaN: nothing to compare with
        for r in rules.slice_regressions(before, stats, previous, accuracy, **limits):
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
        self._capture.detach()
        self._run, self._clock = None, None
        super().teardown(trainer, pl_module, stage)

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
