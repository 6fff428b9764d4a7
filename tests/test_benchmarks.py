"""Smoke versions of the two benchmarks, so neither can rot (the full runs are `python benchmarks/*.py`)."""

import importlib.util
import math
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_overhead_benchmark_smoke(tmp_path):
    overhead = _load("overhead")
    out = overhead.main(["--case", "mlp", "--reps", "1", "--root", str(tmp_path), "--json", str(tmp_path / "o.json")])
    (result,) = out["cases"]
    for key in ("step_ratio", "separate_runs_step_ratio", "epoch_ratio", "startup_ratio"):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    # the digits MLP has no decoder, and its 45-step epoch defers the overfit check: the batch check runs alone
    assert set(result["checks"]) == {"BatchConsistencyCheck"} and result["deferred"] == ["OverfitBatchCheck"], result
    assert all(c["seconds"] > 0 and c["epoch_ratio"] > 0 for c in result["checks"].values()), result["checks"]
    assert (tmp_path / "o.json").exists()


def test_detection_benchmark_smoke(tmp_path):
    detection = _load("detection")
    out = detection.main(["--only", "lr_too_high", "healthy_mlp", "--json", str(tmp_path / "d.json")])
    assert out["summary"] == {"faults_detected": 1, "faults_total": 1, "healthy_with_alarm": 0, "healthy_total": 1}, out
    (fault,) = [r for r in out["results"] if not r["healthy"]]
    # the loss monitor pulls its device buffer every 200 steps: that bounds the latency
    assert fault["latency_steps"] is not None and fault["latency_steps"] <= 200, fault
