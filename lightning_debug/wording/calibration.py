"""The sentences and evidence of the ``calibration.*`` findings and notes of
:class:`~lightning_debug.callbacks.calibration.CalibrationMonitor`."""

from __future__ import annotations

import math
from typing import Any

EVIDENCE = ("ece", "mce", "adaptive_ece", "gap", "gap_se", "accuracy", "confidence", "count", "temperature")


def miscalibration(kind: str, s: dict[str, float], threshold: float, cap: float | None) -> tuple[str, dict[str, Any]]:
    """``kind`` (over- or underconfident) with the epoch's scalars ``s``; ``cap``: the confidence the module's
    label smoothing trains to, which explains underconfidence."""
    temp = s.get("temperature", float("nan"))
    message = (
        f"{kind.capitalize()}: ECE {s['ece']:.3f} (threshold {threshold}) over {s['count']:.0f} "
        f"validation predictions; mean confidence {s['confidence']:.3f} vs accuracy {s['accuracy']:.3f} "
        f"(gap {s['gap']:+.3f} ± {s['gap_se']:.3f})"
        + (f"; fitted temperature {temp:.2f}" if math.isfinite(temp) else "")
        + "."
    )
    if kind == "underconfident" and cap is not None:
        message += f" Expected: the module's label smoothing trains confidence to at most {cap:.3f}."
    return message, {"threshold": threshold, **{k: s[k] for k in EVIDENCE if k in s}}


def left_out(
    nonfinite: float, out_of_range: float, ignore_index: int | None, epoch: int
) -> list[tuple[str, str, dict[str, Any]]]:
    """``(key, message, data)`` of the notes on predictions calibration left out: NaN/Inf scores, and targets
    that are not a class of the scores (padding labels under another value than ``ignore_index``)."""
    notes: list[tuple[str, str, dict[str, Any]]] = []
    if nonfinite:
        message = f"{nonfinite:.0f} validation predictions had NaN/Inf scores; calibration leaves them out."
        notes.append(("calibration:nonfinite", message, {"nonfinite": nonfinite, "epoch": epoch}))
    if out_of_range:
        message = (
            f"{out_of_range:.0f} validation targets are not a class of the scores (ignore_index={ignore_index}); "
            "calibration leaves them out. If they are padding labels, pass their value as `ignore_index`; "
            "otherwise the scores have fewer classes than the labels."
        )
        data = {"out_of_range": out_of_range, "ignore_index": ignore_index, "epoch": epoch}
        notes.append(("calibration:out-of-range", message, data))
    return notes


def input_format(key: str, fmt: str) -> str:
    why = "all in [0, 1], rows summing to 1" if fmt == "probs" else "not all probabilities"
    return f"CalibrationMonitor: treating `{key}` as {fmt} ({why}; set input_format)"
