"""What the calibration monitor makes of one validation epoch: its scalars (the statistics, and a temperature
fitted on the kept logits) and its charts: the reliability table, the reliability diagram and the confidence
histogram as native W&B charts (CSV without W&B), and the matplotlib figure
(:func:`lightning_debug.media.reliability_figure`, drawn only when logged). Used by
:class:`~lightning_debug.callbacks.calibration.CalibrationMonitor`."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_debug import media
from lightning_debug.metrics import LogitSample
from lightning_debug.sinks import Sink

SCALARS = ("ece", "mce", "rms_ce", "adaptive_ece", "brier", "nll", "gap", "accuracy", "confidence", "count")


def epoch_scalars(result: dict[str, Tensor]) -> dict[str, float]:
    """The epoch's statistics as host floats (one transfer)."""
    scalars = dict(zip(SCALARS, torch.stack([result[k] for k in SCALARS]).tolist(), strict=True))
    scalars["gap_se"] = float(result["gap_se"])
    return scalars


def add_temperature(scalars: dict[str, float], sample: LogitSample, all_gather: Callable[[Tensor], Any] | None) -> None:
    """A temperature fitted on ``sample`` when it kept logits: one for the whole validation set, the same on
    every rank (``all_gather`` under DDP)."""
    if sample.parts and "temperature" not in scalars:
        scalars["temperature"] = sample.temperature(all_gather)


def log_reliability(sink: Sink, prefix: str, result: dict[str, Tensor], s: dict[str, float], epoch: int) -> None:
    """Log the charts of a :class:`~lightning_debug.metrics.StreamingCalibration` ``result`` (per-bin sums),
    titled with the epoch and its ECE (from the scalars ``s``)."""
    edges = result["bin_edges"].tolist()
    counts = result["bin_count"].tolist()
    accs = result["bin_accuracy"].tolist()
    confs = result["bin_confidence"].tolist()
    rows = [
        [lo, hi, conf, acc, conf - acc, int(c)]
        for lo, hi, c, acc, conf in zip(edges[:-1], edges[1:], counts, accs, confs, strict=True)
        if c > 0
    ]
    sink.log_table(prefix + "reliability", ["bin_low", "bin_high", "confidence", "accuracy", "gap", "count"], rows)
    centers = [(r[0] + r[1]) / 2 for r in rows]
    sink.log_line_series(
        prefix + "reliability_diagram",
        [centers, centers, [0.0, 1.0]],
        [[r[3] for r in rows], [r[2] for r in rows], [0.0, 1.0]],
        ["accuracy", "mean confidence", "perfect calibration"],
        title=f"Reliability diagram, epoch {epoch} (ECE {s['ece']:.3f})",
        x_name="confidence bin",
    )
    total = max(sum(counts), 1.0)
    sink.log_bar(
        prefix + "confidence_histogram",
        [f"{lo:.2f}-{hi:.2f}" for lo, hi in itertools.pairwise(edges)],
        [c / total for c in counts],
        label_name="confidence",
        value_name="fraction",
        title=f"Confidence histogram, epoch {epoch}",
    )
    sink.log_figure(  # with W&B the native charts above carry the same data: no matplotlib on the run's path
        prefix + "reliability_figure",
        lambda: media.reliability_figure(edges, counts, accs, confs, s, epoch),
        with_wandb=False,
    )
