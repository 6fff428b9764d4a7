"""The over/underconfidence rule on hand-made statistics: no Trainer, floats in, a verdict out."""

import math

from lightning_debug.rules.calibration import (
    assess_calibration,
    chart_affordable,
    reliability_due,
    temperature_decides,
)

DEFAULTS = dict(ece_threshold=0.1, min_samples=200, z=3.0)


def _assess(**stats):
    base = dict(ece=0.15, gap=0.15, gap_se=0.01, count=1000.0, temperature=1.8)
    return assess_calibration(**{**base, **stats}, **DEFAULTS)


def test_confident_and_wrong_with_a_softening_temperature_is_overconfident():
    v = _assess()
    assert v.miscalibrated and v.overconfident and not v.underconfident, v


def test_mirror_image_is_underconfident():
    v = _assess(gap=-0.15, temperature=0.6)
    assert v.underconfident and not v.overconfident, v


def test_ece_below_the_threshold_is_calibrated():
    v = _assess(ece=0.05)
    assert not v.miscalibrated and not v.overconfident, v


def test_too_few_predictions_are_not_judged():
    assert not _assess(count=100.0).miscalibrated


def test_a_gap_within_z_standard_errors_has_no_direction():
    v = _assess(gap=0.02, gap_se=0.01)  # 2 standard errors < z = 3
    assert v.miscalibrated and not v.overconfident and not v.underconfident, v


def test_a_temperature_that_disagrees_with_the_gap_means_mixed_miscalibration():
    v = _assess(temperature=0.9)  # the gap says overconfident, the temperature says sharpen
    assert v.miscalibrated and not v.overconfident, v


def test_without_a_fitted_temperature_the_gap_decides():
    assert _assess(temperature=math.nan).overconfident


def test_label_smoothing_cap_is_the_smoothed_target_on_the_label():
    from lightning_debug.rules.calibration import label_smoothing_cap

    assert label_smoothing_cap(None) is None
    assert math.isclose(label_smoothing_cap((10, 0.1)), 0.91)


def test_overconfidence_is_due_once_it_persists_underconfidence_only_standalone():
    from lightning_debug.rules.calibration import CalibrationVerdict, due, underconfident_at_end

    over = CalibrationVerdict(miscalibrated=True, overconfident=True, underconfident=False)
    under = CalibrationVerdict(miscalibrated=True, overconfident=False, underconfident=True)
    assert due(over, 1, 0, patience=2, standalone=False) == []
    assert due(over, 2, 0, patience=2, standalone=False) == ["overconfident"]
    assert due(over, 1, 0, patience=2, standalone=True) == ["overconfident"]
    assert due(under, 0, 5, patience=2, standalone=False) == [], "every run starts underconfident"
    assert due(under, 0, 1, patience=2, standalone=True) == ["underconfident"]
    assert underconfident_at_end(2, 2) and not underconfident_at_end(1, 2)


def test_reliability_charts_are_due_at_powers_of_two_by_default_or_every_n():
    assert [e for e in range(1, 40) if reliability_due(e, None)] == [1, 2, 4, 8, 16, 32]
    assert [e for e in range(1, 12) if reliability_due(e, 5)] == [1, 6, 11]
    assert not any(reliability_due(e, 0) for e in range(1, 12))


def test_the_temperature_decides_only_a_miscalibrated_evaluation_with_a_clear_direction():
    base = {"ece": 0.2, "gap": 0.1, "gap_se": 0.01, "count": 500, "ece_threshold": 0.1, "min_samples": 200, "z": 3.0}
    assert temperature_decides(**base)
    assert not temperature_decides(**{**base, "ece": 0.05})  # calibrated: no verdict to decide
    assert not temperature_decides(**{**base, "gap": 0.02})  # mixed: neither direction
    assert not temperature_decides(**{**base, "count": 100})


def test_charts_are_affordable_within_the_budget_of_the_fit_so_far():
    assert chart_affordable(0.0, 0, elapsed=1.0, budget=0.02), "0.02 s expected within 2% of 1 s"
    assert not chart_affordable(0.0, 0, elapsed=0.5, budget=0.02)
    assert not chart_affordable(0.4, 1, elapsed=30.0, budget=0.02), "a 0.4 s figure: 0.8 s > 0.6 s"
    assert chart_affordable(0.4, 1, elapsed=40.0, budget=0.02)
    assert chart_affordable(5.0, 1, elapsed=1.0, budget=None), "no budget: every scheduled chart"
