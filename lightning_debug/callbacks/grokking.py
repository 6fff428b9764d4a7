"""``GrokkingMonitor``: training set memorised, dev metric far behind; does it generalise later?

Grokking (Power et al. 2022): the training metric saturates early, the dev metric stays near chance for a
long time and then jumps. On a linear step axis the jump looks like a cliff at the far right, so this callback
logs train/dev metric, both losses and the global L2 weight norm against ``debug/grokking/log10_step`` (defined
as each key's step metric, so W&B plots them log-x with no UI setup), can evaluate at log-spaced steps, and
reports when the training set was memorised, when the dev metric caught up and how long that took.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from lightning_debug import grokking_series as series
from lightning_debug.arguments import require
from lightning_debug.base import DebugCallback
from lightning_debug.grokking_series import PREFIX, SERIES, Curves, StageSums
from lightning_debug.integrations.hf import is_causal_lm
from lightning_debug.isolation import isolated
from lightning_debug.metrics import prediction_sums
from lightning_debug.rules.grokking import assess_stall, is_generalized, is_memorized, log10_step, log_spaced_steps
from lightning_debug.signals import global_step_counter, weight_norm
from lightning_debug.sinks import Sink

if TYPE_CHECKING:
    import lightning.pytorch as pl

# PREFIX and SERIES: the logged keys, read by workspace.py and the tests
__all__ = ["PREFIX", "SERIES", "GrokkingMonitor", "log10_step", "log_spaced_steps", "prediction_sums"]


class GrokkingMonitor(DebugCallback):
    """Memorisation vs generalisation on a log-step axis, with the grokking delay.

    Args:
        train_metric / val_metric: logged keys of the training and dev metric (higher is better). When one
            is not logged, accuracy is computed from the ``logits`` / ``target`` the step returns.
        train_loss / val_loss: logged loss keys (computed from the outputs too when missing).
        threshold: the training metric at which the training set counts as memorised (0.99).
        val_threshold: the dev metric at which the model counts as generalised (default: ``threshold``).
        min_gap: "dev far below": at memorisation the dev metric must be at least this much lower (0.2).
        norm_every_n_steps: compute the global L2 weight norm (on the device) every N training steps, where
            no evaluation (whose record carries the norm) came in the last N.
        evals_per_decade: if > 0, also evaluate train and dev metric at this many log-spaced steps per
            factor of ten (1, 2, 3, 5, 10, 20, ...), so the log-x curve has points before the first
            validation. Uses ``validation_step`` on the first ``eval_batches`` batches of each loader.
        eval_batches: batches per extra evaluation.
        stall_factor: ``grokking.stalled`` needs the training set memorised for ``stall_factor`` x the step
            it took to memorise it, and at least ``stall_window`` evaluations since.
        stall_window: evaluations in the trend window: the dev metric shows no significant rise and the
            weight norm no significant fall (Theil-Sen 95% CI), i.e. nothing is moving towards a solution.
        ignore_index: target value to skip when computing accuracy (Hugging Face padding, -100).
        plot: at the end of fit, log a log-x figure and a native W&B chart of the curves.
    """

    def __init__(
        self,
        *,
        train_metric: str = "train_acc",
        val_metric: str = "val_acc",
        train_loss: str = "train_loss",
        val_loss: str = "val_loss",
        threshold: float = 0.99,
        val_threshold: float | None = None,
        min_gap: float = 0.2,
        norm_every_n_steps: int = 50,
        evals_per_decade: int = 0,
        eval_batches: int = 4,
        stall_factor: float = 10.0,
        stall_window: int = 10,
        ignore_index: int | None = -100,
        plot: bool = True,
        raise_errors: bool = False,
        print_findings: bool = True,
        strict: bool | None = None,
        verbose: bool | None = None,
    ) -> None:
        super().__init__(raise_errors=raise_errors, print_findings=print_findings, strict=strict, verbose=verbose)
        unit_fractions = {"threshold": threshold, "val_threshold": val_threshold, "min_gap": min_gap}
        require(
            *((n, v, v is None or 0 < v <= 1, "must be in (0, 1]") for n, v in unit_fractions.items()),
            ("norm_every_n_steps", norm_every_n_steps, norm_every_n_steps >= 1, "must be >= 1"),
            ("evals_per_decade", evals_per_decade, evals_per_decade >= 0, "must be >= 0"),
            ("eval_batches", eval_batches, eval_batches >= 1, "must be >= 1"),
            ("stall_factor", stall_factor, stall_factor > 1, "must be > 1"),
            ("stall_window", stall_window, stall_window >= 3, "must be >= 3"),
        )
        self.keys = {"train_acc": train_metric, "val_acc": val_metric, "train_loss": train_loss, "val_loss": val_loss}
        self.threshold = threshold
        self.val_threshold = threshold if val_threshold is None else val_threshold
        self.min_gap = min_gap
        self.norm_every_n_steps = norm_every_n_steps
        self.evals_per_decade = evals_per_decade
        self.eval_batches = eval_batches
        self.stall_factor = stall_factor
        self.stall_window = stall_window
        self.ignore_index = ignore_index
        self.plot = plot
        self.memorized_step: int | None = None
        self.generalized_step: int | None = None
        self.curves = Curves()  # the evaluation records and the weight-norm series
        self._sums = StageSums(ignore_index)
        self._stash: dict[str, float] | None = None  # a validation's values, recorded once the train epoch ends
        self._probe_steps: set[int] = set()
        self._probe_train: dict[str, float] = {}
        self._step_counter: Any = None  # its `completed` is trainer.global_step, once training started
        self._train_predictions = True  # the last training outputs seen carried predictions (or none seen yet)

    records = property(lambda self: self.curves.records)  # one per evaluation, plain floats
    norms = property(lambda self: self.curves.norms)  # (step, weight norm)

    # -- collecting -----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._sums.shift = is_causal_lm(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        series.define_series(Sink(trainer))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step_counter = global_step_counter(trainer)
        if self.evals_per_decade:  # here the number of training batches is known
            self._probe_steps = log_spaced_steps(self.evals_per_decade, series.planned_steps(trainer))

    @property
    def on_train_batch_end(self) -> Callable[..., None] | None:  # type: ignore[override]
        """Lightning's hook, there only for the batches with work: while the training outputs carry predictions
        the logged metrics do not already give (looked at again on every weight-norm step), at a weight-norm step
        and at a probe step. The other steps pay no dispatch (~2.5 us each)."""
        counter = self._step_counter
        if counter is None or (self._train_predictions and not self._sums.covered["train"]):
            return self.on_train_batch_end_due
        step = counter.completed
        return self.on_train_batch_end_due if step % self.norm_every_n_steps == 0 or step in self._probe_steps else None

    def on_train_batch_end_due(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._train_predictions = isinstance(outputs, Mapping) and ("logits" in outputs or "probs" in outputs)
        if self._train_predictions and not self._sums.covered["train"]:  # not a bare {"loss": ..}, not logged
            self._sums.add("train", outputs, batch)
        step = trainer.global_step
        if step % self.norm_every_n_steps == 0:
            self.curves.sample_norm(step, pl_module, self.norm_every_n_steps)
        if step in self._probe_steps:
            self._probe_steps.discard(step)
            values = self._probe(trainer, pl_module)
            if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                # a validation follows at this very step: lend it the current training metric (fresher than
                # the epoch mean) instead of logging a second point at the same step
                self._probe_train = {k: v for k, v in values.items() if k.startswith("train_")}
            elif values:
                self._record(trainer, pl_module, values)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking and dataloader_idx == 0 and not self._sums.covered["val"]:
            self._sums.add("val", outputs, batch)

    # -- recording ------------------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            self._sums.restore("val", None)
            return
        self._stash = self._sums.take("val", trainer.callback_metrics, self.keys)
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # mid-epoch validation: record now
            self._record(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stash is not None:  # validation ran at the end of this epoch; train epoch metrics are ready now
            self._record(trainer, pl_module)

    def _record(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, values: dict[str, float] | None = None
    ) -> None:
        if values is None:
            train = self._sums.take("train", trainer.callback_metrics, self.keys)
            values = {**train, **self._probe_train, **(self._stash or {})}
            self._stash, self._probe_train = None, {}
        step = int(trainer.global_step)
        record = self.curves.record(Sink(trainer), step, weight_norm(pl_module), values)
        self._judge(trainer, record)

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """An extra evaluation of train and dev metric at a log-spaced step, through ``validation_step``."""
        with isolated(pl_module), torch.no_grad():
            pl_module.eval()
            values = series.probe_values(trainer, pl_module, self._sums, self.eval_batches)
        if "train_acc" in values and "val_acc" in values:
            return values
        self._probe_steps.clear()
        reason = "cannot evaluate at log-spaced steps: validation_step returns no logits/target."
        self.skip(trainer, reason, key="grokking:probe")
        return {}

    # -- judging --------------------------------------------------------------------------------------------
    def _judge(self, trainer: pl.Trainer, r: dict[str, float]) -> None:
        train, val = r.get("train_acc"), r.get("val_acc")
        if train is None or val is None:
            return
        step = int(r["step"])
        if self.memorized_step is None:
            if is_memorized(
                train, val, threshold=self.threshold, val_threshold=self.val_threshold, min_gap=self.min_gap
            ):
                self.memorized_step = step
                message, data = series.memorized_finding(r, self.threshold)
                self.emit(trainer, "grokking.memorized", message, data=data)
            return
        if self.generalized_step is None and is_generalized(val, val_threshold=self.val_threshold):
            self.generalized_step = step
            message, data = series.generalized_finding(self.curves, step, val, self.val_threshold, self.memorized_step)
            self.emit(trainer, "grokking.generalized", message, data=data)
            return
        if self.generalized_step is None and not self.has_finding("grokking.stalled"):
            self._check_stall(trainer, step)

    def _check_stall(self, trainer: pl.Trainer, step: int) -> None:
        assert self.memorized_step is not None
        since = self.curves.since(self.memorized_step)
        v = assess_stall(
            [x["step"] for x in since],
            [x["val_acc"] for x in since],
            [x["weight_norm"] for x in since],
            memorized_step=self.memorized_step,
            step=step,
            stall_factor=self.stall_factor,
            stall_window=self.stall_window,
        )
        if v is not None and v.stalled:
            message, data = series.stalled_finding(v, step, self.memorized_step, since[-1]["weight_norm"])
            self.emit(trainer, "grokking.stalled", message, data=data)

    # -- end of fit -----------------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sink = Sink(trainer)
        sink.set_summary(series.summary(self.memorized_step, self.generalized_step))
        if self.plot and self.records:
            self.curves.log_charts(sink, self.memorized_step, self.generalized_step)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            **self.curves.state_dict(),
            "memorized_step": self.memorized_step,
            "generalized_step": self.generalized_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.curves.load_state_dict(state_dict)
        self.memorized_step = state_dict.get("memorized_step")
        self.generalized_step = state_dict.get("generalized_step")
