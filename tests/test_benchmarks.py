"""The benchmarks cannot rot: the overhead smoke run, the detection smoke set, the generated benchmark's parts
(fast), and its ``--quick`` subset end to end (slow). The full runs are `python benchmarks/*.py`."""

import importlib.util
import itertools
import math
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BENCHMARKS = ROOT / "benchmarks"
if str(ROOT) not in sys.path:  # `benchmarks.*` modules import each other; worker processes re-import them by name
    sys.path.insert(0, str(ROOT))

from benchmarks import detection  # noqa: E402
from benchmarks.scenarios import ARCHS, FAULTS, TASKS, Setup, apply_fault, sample_setup  # noqa: E402


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


def test_detection_smoke_set(tmp_path):
    out = detection.main(["--smoke", "--only", "lr_too_high", "healthy_mlp", "--json", str(tmp_path / "d.json")])
    assert out["summary"] == {"faults_detected": 1, "faults_total": 1, "healthy_with_alarm": 0, "healthy_total": 1}, out
    (fault,) = [r for r in out["results"] if not r["healthy"]]
    # the loss monitor pulls its device buffer every 200 steps: that bounds the latency
    assert fault["latency_steps"] is not None and fault["latency_steps"] <= 200, fault


def test_seed_sets_are_disjoint_and_the_report_set_is_big_enough():
    sets = {name: detection.scenario_list(name) for name in detection.SEED_BASE}
    seeds = {name: {s["setup"]["seed"] for s in scenarios} for name, scenarios in sets.items()}
    for a, b in itertools.combinations(seeds, 2):
        assert not seeds[a] & seeds[b], (a, b, sorted(seeds[a] & seeds[b])[:5])
    report = sets["report"]
    assert all(len(sets[name]) == len(report) for name in sets if name.startswith("holdout"))
    assert len(report) >= 200 and len({s["id"] for s in report}) == len(report), len(report)
    assert len(FAULTS) >= 16
    faults = {s["fault"] for s in report}
    assert faults - {None} == set(FAULTS), set(FAULTS) - faults
    healthy = [s for s in report if s["fault"] is None]
    assert sum("incident" in s["id"] for s in healthy) == 8 and sum("entropy_lm" in s["id"] for s in healthy) == 4
    assert detection.scenario_list("report") == report, "scenario generation must be deterministic"


def test_sampled_setups_stay_in_their_ranges():
    rng = random.Random(0)
    for i in range(300):
        arch = rng.choice(sorted(ARCHS))
        s = sample_setup(rng, arch, seed=i)
        spec = ARCHS[arch]
        assert s.task in spec["tasks"] and spec["steps"][0] <= s.steps <= spec["steps"][1], s
        assert 4 <= s.batch_size <= 512 and s.batch_size <= s.n_train // 2 and s.task in TASKS, s
        for name, fault in FAULTS.items():
            if arch in fault.archs:
                assert isinstance(apply_fault(s, name, rng), Setup)


def test_wilson_interval_matches_known_values():
    lo, hi = detection.wilson(0, 10)
    assert lo == 0 and abs(hi - 0.2775) < 1e-3, hi
    lo, hi = detection.wilson(8, 10)
    assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3, (lo, hi)


def test_score_counts_detections_false_alarms_stops_and_invalid_runs():
    setup = Setup("mlp", "digits", 300, 16, 100, "adam", 1e-3, "constant").to_dict()

    def result(i, fault, valid=True, findings=(), stopped_by=None):
        truth = {"valid": valid, "onset_step": 0, "evidence": ""}
        found = [{"id": f, "severity": sev, "step": step, "count": 1} for f, sev, step in findings]
        return {
            "id": str(i),
            "fault": fault,
            "setup": setup,
            "truth": truth,
            "findings": found,
            "stopped_by": stopped_by,
            "crash": None,
        }

    results = [
        result(0, "lr_too_low", findings=[("loss.not_decreasing", "warning", 60)]),
        result(1, "lr_too_low", findings=[("calibration.overconfident", "warning", 10)]),
        result(2, "lr_too_low", valid=False),
        result(3, None, findings=[("loss.diverging", "error", 90)], stopped_by="loss.diverging"),
        result(4, None, findings=[("loss.converged", "info", 90)]),
    ]
    s = detection.score(results)
    t = s["faults"]["lr_too_low"]
    assert (t["detected"], t["n"], t["median_latency_steps"], t["invalid"]) == (1, 2, 60, ["2"]), t
    assert s["false_alarms"]["n_alarm"] == 1 and s["false_alarms"]["n"] == 2, s["false_alarms"]
    assert s["healthy_stopped"]["runs"] == [{"id": "3", "setup": Setup(**setup).summary(), "by": "loss.diverging"}]


@pytest.mark.slow
def test_quick_generated_benchmark_runs_end_to_end(tmp_path):
    out = detection.main(["--quick", "--json", str(tmp_path / "q.json")])
    results = out["results"]
    assert len(results) == 24 and (tmp_path / "q.json").exists()
    valid = [r for r in results if r["truth"]["valid"]]
    # the ground truth must hold for most scenarios, or the benchmark measures nothing
    assert len(valid) >= 18, [(r["id"], r["truth"]["evidence"]) for r in results if not r["truth"]["valid"]]
    assert all("findings" in r and r["crash"] is None for r in valid), [r["id"] for r in valid if r.get("crash")]
    scores = out["scores"]
    assert scores["overall_recall"]["n"] + scores["false_alarms"]["n"] == len(valid), scores["overall_recall"]


@pytest.mark.parametrize("arch", ["mlp", "gru", "bert"])
def test_ground_truth_probes_leave_the_global_generator_as_they_found_it(arch):
    """The bare run of the ground truth probes the module before it trains; the suite's run does not. The probes
    draw noise (`randn_like`, `randint_like`), so they must not move the global generator, or the two runs draw
    different dropout masks: a ReLU RNN of the holdout4 set blew up bare (NaN by step 100) and trained to 0.02
    under the suite, whose run was identical to the bare run without probes, step for step."""
    import torch

    from benchmarks.evidence import run_probes
    from benchmarks.models import build

    setup = sample_setup(random.Random(3), arch, seed=3)
    torch.manual_seed(3)
    module, _, val, _ = build(setup, None)
    before = torch.random.get_rng_state()
    run_probes(module, val, None)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_overhead_without_leaves_the_components_out(tmp_path):
    """``overhead.py --without NAME``: the suite of both modes is built without NAME; with every component left
    out no suite hook runs at all (the null run: the ratio is the measurement's own noise)."""
    overhead = _load("overhead")
    suite = overhead.SUITE_COMPONENTS
    every = [arg for name in suite for arg in ("--without", name)]
    out = overhead.main(
        ["--whole-run", "no_val_22", "--whole-seconds", "0.1", "--reps", "1", "--root", str(tmp_path), *every]
    )
    (null,) = out["whole_runs"]
    assert null["without"] == list(suite) and null["costliest_hooks"] == [], null
    out = overhead.main(
        [
            "--whole-run",
            "no_val_22",
            "--whole-seconds",
            "0.1",
            "--reps",
            "1",
            "--root",
            str(tmp_path),
            "--without",
            "loss",
        ]
    )
    names = {name.split("{")[0].split(".")[0] for name, _ in out["whole_runs"][0]["costliest_hooks"]}
    assert names and "LossConvergenceMonitor" not in names, names


def test_detection_runs_one_scenario_of_a_set_by_id(tmp_path):
    """``--only`` with a generated set runs just the named scenarios (here a 31-step CNN of the tune set, its
    ground truth cached), and names an id the set does not have."""
    out = detection.main(["--set", "tune", "--only", "tune-lr_too_high-1", "--workers", "1"])
    assert [r["id"] for r in out["results"]] == ["tune-lr_too_high-1"], [r["id"] for r in out["results"]]
    assert "findings" in out["results"][0], out["results"][0]
    with pytest.raises(SystemExit, match="tune-no-such-run"):
        detection.main(["--set", "tune", "--only", "tune-no-such-run"])
