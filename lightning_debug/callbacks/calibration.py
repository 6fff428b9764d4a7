"""``CalibrationMonitor``: is the model as sure as it is right? (Guo et al. 2017, "On Calibration of ...").

A model stopped at its best accuracy can be very confident whether right or wrong. Every validation epoch
this callback bins the top-label confidence of every validation prediction (streaming, O(bins) memory, on the
device: :class:`~lightning_debug.metrics.StreamingCalibration`), logs ECE / MCE / RMS CE / adaptive ECE /
Brier / NLL / the signed gap, fits a temperature on a bounded sample of logits where it matters, draws the
reliability diagram and the confidence histogram at log-spaced evaluations, and warns when the model is clearly
over- or underconfident.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_debug.base import DebugCallback
from lightning_debug.calibration_epoch import add_temperature, epoch_scalars, log_reliability
from lightning_debug.integrations.hf import is_causal_lm
from lightning_debug.metrics import (
    HeldPredictions,
    InputFormat,
    LogitSample,
    StreamingCalibration,
    looks_like_probabilities,
)
from lightning_debug.rules.calibration import (
    assess_calibration,
    chart_affordable,
    due,
    label_smoothing_cap,
    reliability_due,
    temperature_decides,
    underconfident_at_end,
    validate_arguments,
)
from lightning_debug.rules.loss import declared_label_smoothing
from lightning_debug.rules.persistence import streak
from lightning_debug.signals import predictions
from lightning_debug.sinks import Sink
from lightning_debug.wording import calibration as words

log = logging.getLogger("lightning_debug")

if TYPE_CHECKING:
    import lightning.pytorch as pl

PREFIX = "debug/calibration/"


class CalibrationMonitor(DebugCallback):
    """Calibration of the validation predictions, every validation epoch.

    Reads ``logits`` (or ``probs``) and ``target`` from what ``validation_step`` returns; a Hugging Face output
    with ``.logits`` and ``batch["labels"]`` works too (``ignore_index`` positions are skipped), so a language
    model gets token-level calibration. Binary (one score per target), multiclass and sequence outputs.

    Args:
        logits_key / probs_key / target_key: where the scores and targets are in the step output.
        input_format: ``"auto"`` (default): scores under ``probs_key`` are probabilities; scores under
            ``logits_key`` are taken for probabilities when the first validation batch's are all in [0, 1] with
            rows summing to 1 (binary: all in [0, 1]), as torchmetrics decides; said once on the console and in
            the run summary (``debug/calibration/input_format``). ``"logits"`` / ``"probs"`` force it.
        ignore_index: target value to skip (Hugging Face's padding label, -100, by default).
        shift_labels: compare logits at t with the label at t + 1 (causal LMs, whose ``labels`` equal the
            inputs). ``None``: on when the module contains a Hugging Face ``*ForCausalLM`` / ``*LMHeadModel``.
        n_bins: equal-width bins for ECE / MCE / RMS CE and the reliability diagram (15, as Guo et al.).
        fine_bins: resolution of the confidence histogram the adaptive (equal-mass) ECE is derived from.
        ece_threshold: ECE at or above which the model is called miscalibrated. 0.1 is well above the
            0.01-0.05 of a healthy digits MLP (400 predictions) and below the 0.12-0.15 of one memorising
            15% wrong labels (which keeps rising with training).
        min_samples: fewer validation predictions than this are not judged.
        z: the signed gap (mean confidence - accuracy) must be at least ``z`` standard errors from zero, so
            the direction is not noise.
        patience: consecutive miscalibrated evaluations before warning. Overconfidence is reported as soon
            as it persists; underconfidence only at the end of fit (every run starts underconfident: accuracy
            rises before confidence does), or at once from ``trainer.validate``; as info, since a run that ends
            underconfident is short of training or regularised, not broken (label smoothing, which the message
            names, trains confidence to at most ``1 - eps + eps/C``).
        temperature_samples: rows (predictions) of logits kept each epoch to fit a temperature (0: off). The
            temperature is fitted (and logged) only where it matters: when it decides an over-/underconfidence
            verdict, and with the reliability charts.
        plot_every_n_epochs: reliability table, native charts and figure every N validation epochs (0: never;
            the scalars are logged every epoch). ``None`` (default): at the 1st, 2nd, 4th, 8th, ... evaluation
            and at the last one of a fit, so their cost grows with the log of the run's length (a W&B table and
            its charts cost ~10-20 ms, a matplotlib figure ~0.3-0.5 s: too much for every 0.1 s epoch).
        chart_budget: with the default schedule (``plot_every_n_epochs=None``), the share of the fit's time so
            far the charts may bring their total to: a scheduled evaluation's are logged when they keep within it
            (0.005, a quarter of the suite's whole-run budget: on the quickstart a 30-epoch run gets the last
            evaluation's, a 190-epoch one the 64th, 128th and last, an hour-long run every scheduled one); the
            last evaluation's are always logged. ``None``: every scheduled evaluation's.
        dataloader_idx: the validation dataloader to watch.
    """

    def __init__(
        self,
        *,
        logits_key: str = "logits",
        probs_key: str = "probs",
        target_key: str = "target",
        ignore_index: int | None = -100,
        shift_labels: bool | None = None,
        n_bins: int = 15,
        fine_bins: int = 1000,
        ece_threshold: float = 0.1,
        min_samples: int = 200,
        z: float = 3.0,
        patience: int = 2,
        temperature_samples: int = 4096,
        plot_every_n_epochs: int | None = None,
        chart_budget: float | None = 0.005,
        dataloader_idx: int = 0,
        input_format: str = "auto",
        raise_errors: bool = False,
        print_findings: bool = True,
        strict: bool | None = None,
        verbose: bool | None = None,
    ) -> None:
        super().__init__(raise_errors=raise_errors, print_findings=print_findings, strict=strict, verbose=verbose)
        validate_arguments(locals())
        self.input_format = input_format
        self._format: InputFormat | None = None if input_format == "auto" else input_format  # type: ignore[assignment]
        self.keys = {"logits_key": logits_key, "probs_key": probs_key, "target_key": target_key}
        self.ignore_index = ignore_index
        self.shift_labels = shift_labels
        self.ece_threshold = ece_threshold
        self.min_samples = min_samples
        self.z = z
        self.patience = patience
        self.temperature_samples = temperature_samples
        self.plot_every_n_epochs = plot_every_n_epochs
        self.chart_budget = chart_budget
        self._charts = (0, 0.0)  # charts drawn in this process and their seconds (the budget's evidence)
        self._fit_began = time.perf_counter()
        self.dataloader_idx = dataloader_idx
        self.metrics = {
            fmt: StreamingCalibration(n_bins, fine_bins=fine_bins, ignore_index=ignore_index, input_format=fmt)
            for fmt in ("logits", "probs")
        }
        self.history: list[dict[str, float]] = []  # one row of scalars per judged validation epoch
        self._over = 0  # consecutive overconfident evaluations
        self._under = 0
        self.sample = LogitSample(temperature_samples, ignore_index)
        self._held = HeldPredictions(self._consume)
        self._missing: str | None = None
        self._shift = False
        self._cap: float | None = None  # the confidence the module's label smoothing trains to, if it declares one
        self._last: tuple[dict[str, Tensor], dict[str, float], int] | None = None  # unplotted: result, scalars, epoch

    # -- collecting (device only) -------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._shift = is_causal_lm(pl_module) if self.shift_labels is None else self.shift_labels
        self._cap = label_smoothing_cap(declared_label_smoothing(pl_module))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_began = time.perf_counter()
        sink = Sink(trainer)
        for name in ("ece", "adaptive_ece", "mce", "gap", "temperature", "nll", "brier"):
            sink.define_metric(PREFIX + name, summary="min,max", step_metric="trainer/global_step")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for metric in self.metrics.values():
            if metric.device != pl_module.device:
                metric.to(pl_module.device)
            if metric.update_count:
                metric.reset()
        self.sample.reset()
        self._held = HeldPredictions(self._consume)
        self._missing = None

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or dataloader_idx != self.dataloader_idx:
            return
        found = predictions(outputs, batch, shift=self._shift, **self.keys)
        if isinstance(found, str):
            self._missing = found
            return
        scores, target, fmt = found
        if fmt == "logits":  # found under logits_key: probabilities may hide there (a module returning softmax)
            fmt = self._format or self._detect_format(trainer, scores, target)
        self._held.add(scores, target, fmt)

    def _consume(self, scores: Tensor, target: Tensor, fmt: InputFormat) -> None:
        self.metrics[fmt].update(scores, target)
        self.sample.add(scores, target, probs=fmt == "probs")

    def _detect_format(self, trainer: pl.Trainer, scores: Tensor, target: Tensor) -> InputFormat:
        self._format = "probs" if looks_like_probabilities(scores, target) else "logits"
        if self.print_findings and trainer.global_rank == 0:
            log.info(words.input_format(self.keys["logits_key"], self._format))
        Sink(trainer).set_summary({PREFIX + "input_format": self._format})
        return self._format

    # -- judging (once per epoch) ---------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._held.flush()
        used = [m for m in self.metrics.values() if m.update_count > 0]
        if not used:
            why = self._missing or "no validation batches"
            self.skip(trainer, f"nothing to measure: {why}.", key="calibration:no-predictions")
            return
        result = used[0].compute()
        scalars = epoch_scalars(result)
        left_out = (float(result["nonfinite"]), float(result["out_of_range"]))
        for key, message, data in words.left_out(*left_out, self.ignore_index, trainer.current_epoch):
            self.skip(trainer, message, key=key, data=data)
        if scalars["count"] == 0:
            return
        budget = self.chart_budget if self.plot_every_n_epochs is None else None  # an asked-for N is kept
        plot = reliability_due(len(self.history) + 1, self.plot_every_n_epochs) and chart_affordable(
            self._charts[1], self._charts[0], time.perf_counter() - self._fit_began, budget
        )
        if plot or temperature_decides(**self._thresholds(scalars)):
            add_temperature(scalars, self.sample, trainer.strategy.all_gather if trainer.world_size > 1 else None)
        Sink(trainer).log_scalars({PREFIX + k: v for k, v in scalars.items() if math.isfinite(v)})
        self.history.append({"step": float(trainer.global_step), "epoch": float(trainer.current_epoch), **scalars})
        self._last = None if plot else (result, scalars, trainer.current_epoch)
        if plot:
            self._chart(trainer, result, scalars, trainer.current_epoch)
        self._judge(trainer, scalars)

    def _chart(self, trainer: pl.Trainer, result: dict[str, Tensor], scalars: dict[str, float], epoch: int) -> None:
        began = time.perf_counter()
        log_reliability(Sink(trainer), PREFIX, result, scalars, epoch)
        self._charts = (self._charts[0] + 1, self._charts[1] + time.perf_counter() - began)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last is not None and self.plot_every_n_epochs is None:  # the run's last state, at its own epoch
            self._chart(trainer, *self._last)
            self._last = None
        if underconfident_at_end(self._under, self.patience):
            self._warn(trainer, "underconfident", self.history[-1])

    def _thresholds(self, s: dict[str, float]) -> dict[str, Any]:
        keys = ("ece", "gap", "gap_se", "count")
        return {
            **{k: s[k] for k in keys},
            "ece_threshold": self.ece_threshold,
            "min_samples": self.min_samples,
            "z": self.z,
        }

    def _judge(self, trainer: pl.Trainer, s: dict[str, float]) -> None:
        """Judge one evaluation; report what is due (:func:`~lightning_debug.rules.calibration.due`)."""
        v = assess_calibration(**self._thresholds(s), temperature=s.get("temperature", math.nan))
        self._over = streak(self._over, v.overconfident)
        self._under = streak(self._under, v.underconfident)
        for kind in due(v, self._over, self._under, self.patience, standalone=trainer.state.fn != "fit"):
            self._warn(trainer, kind, s)

    def _warn(self, trainer: pl.Trainer, kind: str, s: dict[str, float]) -> None:
        message, data = words.miscalibration(kind, s, self.ece_threshold, self._cap)
        self.emit(trainer, f"calibration.{kind}", message, data=data)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "history": [dict(h) for h in self.history],
            "over": self._over,
            "under": self._under,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._over = int(state_dict.get("over", 0))
        self._under = int(state_dict.get("under", 0))
