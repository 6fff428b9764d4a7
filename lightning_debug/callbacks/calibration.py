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
from lightning_debug.metrics import StreamingCalibration, fit_temperature, looks_like_probabilities
from lightning_debug.signals import predictions
from lightning_debug.sinks import Sink

log = logging.getLogger("lightning_debug")

if TYPE_CHECKING:
    import lightning.pytorch as pl

PREFIX = "debug/calibration/"
SCALARS = ("ece", "mce", "rms_ce", "adaptive_ece", "brier", "nll", "gap", "accuracy", "confidence", "count")
_SAMPLE_ELEMENTS = 1 << 22  # the temperature sample never holds more than 4M floats (16 MiB), whatever the vocab


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
            rises before confidence does), or at once from ``trainer.validate``.
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
        self._format: str | None = None if input_format == "auto" else input_format  # decided once per run
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
        self._sample: list[tuple[Tensor, Tensor, Tensor]] = []
        self._sample_rows = 0
        self._missing: str | None = None
        self._shift = False

    # -- collecting (device only) -------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._shift = is_causal_lm(pl_module) if self.shift_labels is None else self.shift_labels

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sink = Sink(trainer)
        for name in ("ece", "adaptive_ece", "mce", "gap", "temperature", "nll", "brier"):
            sink.define_metric(PREFIX + name, summary="min,max", step_metric="trainer/global_step")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for metric in self.metrics.values():
            metric.to(pl_module.device)
            metric.reset()
        self._sample, self._sample_rows, self._missing = [], 0, None

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
        self._keep_sample(scores if fmt == "logits" else scores.clamp_min(1e-12).log(), target)

    def _detect_format(self, trainer: pl.Trainer, scores: Tensor, target: Tensor) -> str:
        self._format = "probs" if looks_like_probabilities(scores, target) else "logits"
        why = "all in [0, 1], rows summing to 1" if self._format == "probs" else "not all probabilities"
        text = f"CalibrationMonitor: treating `{self.keys['logits_key']}` as {self._format} ({why}; set input_format)"
        if self.print_findings and trainer.global_rank == 0:
            log.info(text)
        Sink(trainer).set_summary({PREFIX + "input_format": self._format})
        return self._format

    def _keep_sample(self, logits: Tensor, target: Tensor) -> None:
        """The first rows of each epoch, up to the budget: a fixed sample, so temperatures compare over epochs."""
        binary = logits.shape == target.shape or (logits.shape[-1] == 1 and logits.shape[:-1] == target.shape)
        width = 1 if binary else logits.shape[-1]
        budget = min(self.temperature_samples, _SAMPLE_ELEMENTS // width) - self._sample_rows
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
        self._sample.append((x, torch.where(valid, t, torch.zeros_like(t)), valid.float()))
        self._sample_rows += len(t)

    def _gathered(self, trainer: pl.Trainer, *rows: Tensor) -> list[Tensor]:
        """Every rank's sample, each padded with weight-0 rows to the sample budget so ``all_gather`` can stack
        them (ranks may keep different numbers of rows)."""
        width = 1 if rows[0].dim() == 1 else rows[0].shape[-1]
        budget = min(self.temperature_samples, _SAMPLE_ELEMENTS // width)
        out = []
        for r in rows:
            padded = torch.cat([r, r.new_zeros((budget - r.shape[0], *r.shape[1:]))])
            out.append(trainer.strategy.all_gather(padded).reshape(-1, *r.shape[1:]))
        return out

    # -- judging (once per epoch) ---------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        used = [m for m in self.metrics.values() if m.update_count > 0]
        if not used:
            self.skip(
                trainer,
                f"nothing to measure: {self._missing or 'no validation batches'}.",
                key="calibration:no-predictions",
            )
            return
        result = used[0].compute()
        scalars = dict(zip(SCALARS, torch.stack([result[k] for k in SCALARS]).tolist(), strict=True))
        scalars["gap_se"] = float(result["gap_se"])
        nonfinite, out_of_range = float(result["nonfinite"]), float(result["out_of_range"])
        if self._sample:
            x, t, w = (torch.cat(parts) for parts in zip(*self._sample, strict=True))
            if trainer.world_size > 1:  # one temperature for the whole validation set, the same on every rank
                x, t, w = self._gathered(trainer, x, t, w)
            scalars["temperature"] = fit_temperature(x, t, w)
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
        if scalars["count"] == 0:
            return
        Sink(trainer).log_scalars({PREFIX + k: v for k, v in scalars.items() if math.isfinite(v)})
        self.history.append({"step": float(trainer.global_step), "epoch": float(trainer.current_epoch), **scalars})
        n = len(self.history)
        if self.plot_every_n_epochs and (n - 1) % self.plot_every_n_epochs == 0:
            self._plot(trainer, result, scalars)
        self._judge(trainer, scalars)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._under >= self.patience:
            self._warn(trainer, "underconfident", self.history[-1])

    def _judge(self, trainer: pl.Trainer, s: dict[str, float]) -> None:
        """Miscalibrated = enough predictions, ECE over the threshold, a gap ``z`` standard errors from 0, and a
        fitted temperature on the same side of 1 (mixed miscalibration, which one temperature cannot fix, is
        not called over- or underconfident)."""
        bad = s["count"] >= self.min_samples and s["ece"] >= self.ece_threshold
        temp = s.get("temperature", float("nan"))  # when fitted, it must agree: T > 1 softens an overconfident model
        over = bad and s["gap"] > self.z * s["gap_se"] and not temp <= 1
        under = bad and -s["gap"] > self.z * s["gap_se"] and not temp >= 1
        self._over = self._over + 1 if over else 0
        self._under = self._under + 1 if under else 0
        standalone = trainer.state.fn != "fit"
        if over and (self._over >= self.patience or standalone):
            self._warn(trainer, "overconfident", s)
        if under and standalone:
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
        sink.log_figure(
            PREFIX + "reliability_figure", lambda: media.reliability_figure(edges, counts, accs, confs, s, epoch)
        )
