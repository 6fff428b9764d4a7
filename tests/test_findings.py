"""The findings model and the catalogue."""

import json
import math
from pathlib import Path

import pytest
import torch

from lightning_debug import CATALOGUE, Finding, Severity
from lightning_debug.findings import check_info, jsonable, render_catalogue


def test_finding_round_trips_through_dict_and_json():
    f = Finding(
        "loss.plateau",
        Severity.WARNING,
        "flat at 2.30",
        hint="raise lr",
        step=120,
        epoch=2,
        data={"level": 2.3, "ci": [-0.01, 0.01]},
        source="LossConvergenceMonitor",
    )
    d = f.to_dict()
    assert d["severity"] == "warning"
    back = Finding.from_dict(json.loads(json.dumps(d)))
    assert back == f
    assert back.severity is Severity.WARNING


def test_repeated_counts_and_keeps_first_step():
    f = Finding("loss.nonfinite", "error", "NaN", step=5)
    g = f.repeated(9).repeated(12)
    assert (g.count, g.step, g.last_step) == (3, 5, 12)


def test_jsonable_makes_evidence_plain():
    data = jsonable(
        {
            "t": torch.tensor([1.0, 2.0]),
            "s": torch.tensor(3),
            "tup": (1, 2),
            "nan": math.nan,
            "inf": float("inf"),
            4: None,
        }
    )
    assert data == {"t": [1.0, 2.0], "s": 3, "tup": [1, 2], "nan": "nan", "inf": "inf", "4": None}
    json.dumps(data, allow_nan=False)


def test_catalogue_has_causes_fixes_and_the_docs_are_current():
    for c in CATALOGUE.values():
        assert c.causes and c.fixes and c.meaning, c.id
        assert "." in c.id
    docs = Path(__file__).parents[1] / "docs" / "checks.md"
    assert docs.read_text() == render_catalogue(), "run: python -m lightning_debug checks > docs/checks.md"


def test_unknown_check_id_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unknown check id 'loss\.plateu'"):
        check_info("loss.plateu")


def test_catalogue_prose_reads_defaults_from_the_callbacks():
    from lightning_debug.callbacks import CalibrationMonitor, GrokkingMonitor
    from lightning_debug.findings import with_defaults

    assert with_defaults("{default:CalibrationMonitor.ece_threshold}") == f"{CalibrationMonitor().ece_threshold:g}"
    assert with_defaults("{default:GrokkingMonitor.stall_window}") == str(GrokkingMonitor().stall_window)
    unresolved = [c.id for c in CATALOGUE.values() if "{default:" in c.description]
    assert not unresolved, unresolved
    assert "{default:" not in render_catalogue()
