"""``CalibrationMonitor``: is the model as sure as it is right? (Guo et al. 2017, "On Calibration of ...").

A model stopped at its best accuracy can be very confident whether right or wrong. Every validation epoch
this callback bins the top-label confidence of every validation prediction (streaming, O(bins) memory, on the
device: :class:`~lightning_debug.metrics.StreamingCalibration`), logs ECE / MCE / RMS CE / adaptive ECE /
Brier / NLL / the signed gap and a temperature fitted on a bounded sample of logits, draws the reliability
diagram and the confidence histogram, and warns when the model is clearly over- or underconfident.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_debug import media
from lightning_debug.base import DebugCallback
from lightning_debug.integrations.hf import is_causal_lm
from lightning_debug.metrics import InputFormat, LogitSample, StreamingCalibration, looks_like_probabilities
from lightning_debug.rules.calibration import assess_calibration, label_smoothing_cap
from lightning_debug.rules.loss import declared_label_smoothing
from lightning_debug.rules.persistence import streak
from lightning_debug.signals import predictions
from lightning_debug.sinks import Sink

log = logging.getLogger("lightning_debug")

if TYPE_CHECKING:
    import lightning.pytorch as pl

PREFIX = "debug/calibration/"
SCALARS = ("ece", "mce", "rms_ce", "adaptive_ece", "brier", "nll", "gap", "accuracy", "confidence", "count")


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
        temperature_samples: rows (predictions) of logits kept each epoch to fit a temperature (0: off).
        plot_every_n_epochs: reliability table, native charts and figure every N validation epochs (0: never;
            the scalars are logged every epoch). A figure costs ~0.3-0.5 s to draw: the default keeps fast epochs
            cheap.
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
        plot_every_n_epochs: int = 5,
        dataloader_idx: int = 0,
        input_format: str = "auto",
        raise_errors: bool = False,
        print_findings: bool = True,
        strict: bool | None = None,
        verbose: bool | None = None,
    ) -> None:
        super().__init__(raise_errors=raise_errors, print_findings=print_findings, strict=strict, verbose=verbose)
        if not 0 < ece_threshold < 1:
            raise ValueError(f"ece_threshold must be in (0, 1), got {ece_threshold!r}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples!r}")
        if z < 0:
            raise ValueError(f"z must be >= 0, got {z!r}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience!r}")
        if temperature_samples < 0:
            raise ValueError(f"temperature_samples must be >= 0, got {temperature_samples!r}")
        if plot_every_n_epochs < 0:
            raise ValueError(f"plot_every_n_epochs must be >= 0, got {plot_every_n_epochs!r}")
        if dataloader_idx < 0:
            raise ValueError(f"dataloader_idx must be >= 0, got {dataloader_idx!r}")
        if input_format not in ("auto", "logits", "probs"):
            raise ValueError(f"input_format must be 'auto', 'logits' or 'probs', got {input_format!r}")
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
        self.dataloader_idx = dataloader_idx
        self.metrics = {
            fmt: StreamingCalibration(n_bins, fine_bins=fine_bins, ignore_index=ignore_index, input_format=fmt)
            for fmt in ("logits", "probs")
        }
        self.history: list[dict[str, float]] = []  # one row of scalars per judged validation epoch
        self._over = 0  # consecutive overconfident evaluations
        self._under = 0
        self.sample = LogitSample(temperature_samples, ignore_index)
        self._missing: str | None = None
        self._shift = False
        self._cap: float | None = None  # the confidence the module's label smoothing trains to, if it declares one

    # -- collecting (device only) -------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._shift = is_causal_lm(pl_module) if self.shift_labels is None else self.shift_labels
        self._cap = label_smoothing_cap(declared_label_smoothing(pl_module))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sink = Sink(trainer)
        for name in ("ece", "adaptive_ece", "mce", "gap", "temperature", "nll", "brier"):
            sink.define_metric(PREFIX + name, summary="min,max", step_metric="trainer/global_step")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for metric in self.metrics.values():
            metric.to(pl_module.device)
            metric.reset()
        self.sample.reset()
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
        self.metrics[fmt].update(scores, target)
        self.sample.add(scores if fmt == "logits" else scores.clamp_min(1e-12).log(), target)

    def _detect_format(self, trainer: pl.Trainer, scores: Tensor, target: Tensor) -> InputFormat:
        self._format = "probs" if looks_like_probabilities(scores, target) else "logits"
        why = "all in [0, 1], rows summing to 1" if self._format == "probs" else "not all probabilities"
        text = f"CalibrationMonitor: treating `{self.keys['logits_key']}` as {self._format} ({why}; set input_format)"
        if self.print_findings and trainer.global_rank == 0:
            log.info(text)
        Sink(trainer).set_summary({PREFIX + "input_format": self._format})
        return self._format

    # -- judging (once per epoch) ---------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        used = [m for m in self.metrics.values() if m.update_count > 0]
        if not used:
            why = self._missing or "no validation batches"
            self.skip(trainer, f"nothing to measure: {why}.", key="calibration:no-predictions")
            return
        result = used[0].compute()
        scalars = dict(zip(SCALARS, torch.stack([result[k] for k in SCALARS]).tolist(), strict=True))
        scalars["gap_se"] = float(result["gap_se"])
        if self.sample.parts:  # one temperature for the whole validation set, the same on every rank
            scalars["temperature"] = self.sample.temperature(
                trainer.strategy.all_gather if trainer.world_size > 1 else None
            )
        self._report_left_out(trainer, float(result["nonfinite"]), float(result["out_of_range"]))
        if scalars["count"] == 0:
            return
        Sink(trainer).log_scalars({PREFIX + k: v for k, v in scalars.items() if math.isfinite(v)})
        self.history.append({"step": float(trainer.global_step), "epoch": float(trainer.current_epoch), **scalars})
        if self.plot_every_n_epochs and (len(self.history) - 1) % self.plot_every_n_epochs == 0:
            self._plot(trainer, result, scalars)
        self._judge(trainer, scalars)

    def _report_left_out(self, trainer: pl.Trainer, nonfinite: float, out_of_range: float) -> None:
        if nonfinite:
            self.skip(
                trainer,
                f"{nonfinite:.0f} validation predictions had NaN/Inf scores; calibration leaves them out.",
                key="calibration:nonfinite",
                data={"nonfinite": nonfinite, "epoch": trainer.current_epoch},
            )
        if out_of_range:
            self.skip(
                trainer,
                f"{out_of_range:.0f} validation targets are not a class of the scores (ignore_index="
                f"{self.ignore_index}); calibration leaves them out. If they are padding labels, pass their "
                "value as `ignore_index`; otherwise the scores have fewer classes than the labels.",
                key="calibration:out-of-range",
                data={"out_of_range": out_of_range, "ignore_index": self.ignore_index, "epoch": trainer.current_epoch},
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._under >= self.patience:
            self._warn(trainer, "underconfident", self.history[-1])

    def _judge(self, trainer: pl.Trainer, s: dict[str, float]) -> None:
        """Overconfidence is reported once it persists for ``patience`` evaluations; underconfidence only at the
        end of fit (every run starts underconfident); both at once outside fitting (``trainer.validate``)."""
        v = assess_calibration(
            ece=s["ece"],
            gap=s["gap"],
            gap_se=s["gap_se"],
            count=s["count"],
            temperature=s.get("temperature", math.nan),
            ece_threshold=self.ece_threshold,
            min_samples=self.min_samples,
            z=self.z,
        )
        self._over = streak(self._over, v.overconfident)
        self._under = streak(self._under, v.underconfident)
        standalone = trainer.state.fn != "fit"
        if v.overconfident and (self._over >= self.patience or standalone):
            self._warn(trainer, "overconfident", s)
        if v.underconfident and standalone:
            self._warn(trainer, "underconfident", s)

    def _warn(self, trainer: pl.Trainer, kind: str, s: dict[str, float]) -> None:
        temp = s.get("temperature", float("nan"))
        message = (
            f"{kind.capitalize()}: ECE {s['ece']:.3f} (threshold {self.ece_threshold}) over {s['count']:.0f} "
            f"validation predictions; mean confidence {s['confidence']:.3f} vs accuracy {s['accuracy']:.3f} "
            f"(gap {s['gap']:+.3f} ± {s['gap_se']:.3f})"
            + (f"; fitted temperature {temp:.2f}" if math.isfinite(temp) else "")
            + "."
        )
        keys = ("ece", "mce", "adaptive_ece", "gap", "gap_se", "accuracy", "confidence", "count", "temperature")
        data = {"threshold": self.ece_threshold, **{k: s[k] for k in keys if k in s}}
        if kind == "underconfident" and self._cap is not None:
            message += f" Expected: the module's label smoothing trains confidence to at most {self._cap:.3f}."
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

    # -- media ----------------------------------------------------------------------------------------------
    def _plot(self, trainer: pl.Trainer, result: dict[str, Tensor], s: dict[str, float]) -> None:
        edges = result["bin_edges"].tolist()
        counts = result["bin_count"].tolist()
        accs = result["bin_accuracy"].tolist()
        confs = result["bin_confidence"].tolist()
        rows = [
            [lo, hi, conf, acc, conf - acc, int(c)]
            for lo, hi, c, acc, conf in zip(edges[:-1], edges[1:], counts, accs, confs, strict=True)
            if c > 0
        ]
        sink = Sink(trainer)
        sink.log_table(PREFIX + "reliability", ["bin_low", "bin_high", "confidence", "accuracy", "gap", "count"], rows)
        epoch = trainer.current_epoch
        centers = [(r[0] + r[1]) / 2 for r in rows]
        sink.log_line_series(
            PREFIX + "reliability_diagram",
            [centers, centers, [0.0, 1.0]],
            [[r[3] for r in rows], [r[2] for r in rows], [0.0, 1.0]],
            ["accuracy", "mean confidence", "perfect calibration"],
            title=f"Reliability diagram, epoch {epoch} (ECE {s['ece']:.3f})",
            x_name="confidence bin",
        )
        total = max(sum(counts), 1.0)
        sink.log_bar(
            PREFIX + "confidence_histogram",
            [f"{lo:.2f}-{hi:.2f}" for lo, hi in itertools.pairwise(edges)],
            [c / total for c in counts],
            label_name="confidence",
            value_name="fraction",
            title=f"Confidence histogram, epoch {epoch}",
        )
        sink.log_figure(  # with W&B the native charts above carry the same data: no matplotlib on the run's path
            PREFIX + "reliability_figure",
            lambda: media.reliability_figure(edges, counts, accs, confs, s, epoch),
            with_wandb=False,
        )
