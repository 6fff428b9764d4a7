"""Over- and underconfidence from one evaluation's calibration statistics (``calibration.*`` findings).

Pure: plain floats in, a :class:`CalibrationVerdict` out. Used by
:class:`~lightning_debug.callbacks.calibration.CalibrationMonitor`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CalibrationVerdict:
    """``miscalibrated``: enough predictions and ECE at or over the threshold; ``overconfident`` /
    ``underconfident``: miscalibrated in one clear direction (before persistence)."""

    miscalibrated: bool
    overconfident: bool
    underconfident: bool


def assess_calibration(
    *,
    ece: float,
    gap: float,
    gap_se: float,
    count: float,
    temperature: float = math.nan,
    ece_threshold: float,
    min_samples: int,
    z: float,
) -> CalibrationVerdict:
    """Miscalibrated = at least ``min_samples`` predictions and ``ece >= ece_threshold``. Overconfident: also
    a gap (mean confidence - accuracy) more than ``z`` standard errors above 0 and, when a temperature was
    fitted, ``temperature > 1`` (softening helps); underconfident mirrors it. Mixed miscalibration, which one
    temperature cannot fix, is neither.
    """
    bad = count >= min_samples and ece >= ece_threshold
    return CalibrationVerdict(
        miscalibrated=bad,
        overconfident=bad and gap > z * gap_se and not temperature <= 1,
        underconfident=bad and -gap > z * gap_se and not temperature >= 1,
    )


def temperature_decides(
    *, ece: float, gap: float, gap_se: float, count: float, ece_threshold: float, min_samples: int, z: float
) -> bool:
    """Whether :func:`assess_calibration`'s verdict depends on the temperature: only for an evaluation that is
    miscalibrated with a clear direction. Elsewhere the fit (an LBFGS on thousands of logits) is not needed."""
    bad = count >= min_samples and ece >= ece_threshold
    return bad and abs(gap) > z * gap_se


def reliability_due(evaluation: int, every: int | None) -> bool:
    """Whether the reliability charts of the ``evaluation``-th judged evaluation (1-based) are logged: every
    ``every`` evaluations from the first, or with ``None`` at the 1st, 2nd, 4th, 8th, ... (a number of tables
    that grows with the log of the run's length, so a run of 1000 short epochs does not pay 200 of them; the
    last evaluation of a fit is logged at its end)."""
    if every is None:
        return evaluation & (evaluation - 1) == 0
    return every > 0 and (evaluation - 1) % every == 0


# A reliability table and its two native W&B charts: 15-25 ms measured on the quickstart; the expected cost of a
# chart before any is timed (a matplotlib figure, without W&B, costs 0.3-0.5 s: learned from the first)
CHART_SECONDS = 0.02


def chart_affordable(spent: float, charts: int, elapsed: float, budget: float | None) -> bool:
    """Whether one more set of reliability charts keeps their time within ``budget`` of the fit's ``elapsed``
    seconds: the ``charts`` drawn so far took ``spent`` seconds, the next is expected to take their mean
    (:data:`CHART_SECONDS` before any). ``None``: no budget. On a 2 s run the 1st, 2nd, 4th, 8th evaluations'
    charts would be 5% of it; on an hour-long run the budget never binds."""
    if budget is None:
        return True
    expected = spent / charts if charts else CHART_SECONDS
    return spent + expected <= budget * elapsed


def label_smoothing_cap(smoothing: tuple[int, float] | None) -> float | None:
    """The confidence label smoothing ``(classes, eps)`` trains a certain, correct prediction to: its target puts
    ``1 - eps + eps / C`` on the label, not 1, so such a model is underconfident by design (``None``: no smoothing)."""
    if smoothing is None:
        return None
    classes, eps = smoothing
    return 1 - eps + eps / classes


def due(v: CalibrationVerdict, over: int, under: int, patience: int, standalone: bool) -> list[str]:
    """The directions to report now, given the streaks ``over`` / ``under`` that include this evaluation:
    overconfidence once it persists for ``patience`` evaluations; underconfidence only outside fitting
    (``standalone``: ``trainer.validate``), since every run starts underconfident (accuracy rises before
    confidence does): a fit reports it at its end (:func:`underconfident_at_end`). Both at once standalone."""
    kinds = []
    if v.overconfident and (over >= patience or standalone):
        kinds.append("overconfident")
    if v.underconfident and standalone:
        kinds.append("underconfident")
    return kinds


def underconfident_at_end(under: int, patience: int) -> bool:
    """A fit that ends underconfident for ``patience`` evaluations (short of training, or regularised)."""
    return under >= patience


def validate_arguments(args: Mapping[str, Any]) -> None:
    """``ValueError`` naming the argument for every misuse of ``CalibrationMonitor``'s constructor (``locals()``)."""
    if not 0 < args["ece_threshold"] < 1:
        raise ValueError(f"ece_threshold must be in (0, 1), got {args['ece_threshold']!r}")
    lowest = {
        "min_samples": 1,
        "z": 0,
        "patience": 1,
        "temperature_samples": 0,
        "plot_every_n_epochs": 0,
        "dataloader_idx": 0,
    }  # fmt: skip (plot_every_n_epochs may be None)
    for name, low in lowest.items():
        if args[name] is not None and args[name] < low:
            raise ValueError(f"{name} must be >= {low}, got {args[name]!r}")
    budget = args["chart_budget"]
    if budget is not None and not 0 < budget <= 1:
        raise ValueError(f"chart_budget must be in (0, 1] or None (every scheduled chart), got {budget!r}")
    if args["input_format"] not in ("auto", "logits", "probs"):
        raise ValueError(f"input_format must be 'auto', 'logits' or 'probs', got {args['input_format']!r}")
