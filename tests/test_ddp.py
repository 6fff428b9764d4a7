"""The default suite under real 2-process CPU DDP (gloo). Marked `ddp`: CI runs them with `pytest -m ddp`.

One launch (``tests/scripts/ddp_suite.py``, ~20 s) is shared by every test here: a digits run whose
MetricEarlyStopping stops on a ``val_acc`` threshold that each rank computes on its own half of the data.
"""

import json
from pathlib import Path

import pytest
import torch

from lightning_debug.metrics import StreamingCalibration, fit_temperature

from models import DigitsMLP, loaders, run_two_rank_script
from wandb_reader import read_offline_run

SCRIPT = Path(__file__).parent / "scripts" / "ddp_suite.py"
pytestmark = pytest.mark.ddp
STEPS_PER_EPOCH = 10  # 640 examples, 2 ranks, batch 32
MAX_EPOCHS = 8


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc, ranks = run_two_rank_script(SCRIPT, out)
    return out, proc, ranks


def _from(rank, source):
    return [f["check"] for f in rank["findings"] if f["source"] == source]


def test_healthy_ddp_run_finishes_logs_once_and_a_one_rank_finding_does_not_hang(ddp_run):
    out, proc, (r0, r1) = ddp_run
    assert _from(r1, "OneRankProbe") == ["loss.plateau"]
    assert not _from(r0, "OneRankProbe")
    # rank 1's finding is not printed (rank-zero logging); nothing is printed twice
    assert "seen on rank 1 only" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[lightning-debug]")]
    assert len(lines) == len(set(lines)), lines
    report = json.loads(next(out.rglob("lightning_debug/report.json")).read_text())
    assert report["status"] == "finished"
    run = read_offline_run(out)
    assert len(run.table("debug/findings/table")["data"]) == len(report["findings"])


def test_early_stop_is_decided_on_the_same_step_on_every_rank(ddp_run):
    _, _, (r0, r1) = ddp_run
    assert r0["should_stop"] and r1["should_stop"], (r0["should_stop"], r1["should_stop"])
    assert r0["global_step"] == r1["global_step"] < MAX_EPOCHS * STEPS_PER_EPOCH, (r0["global_step"], r1["global_step"])
    assert r0["stopped_epoch"] == r1["stopped_epoch"], (r0["stopped_epoch"], r1["stopped_epoch"])
    # the rank that reached the threshold says why; the other follows it through the collective
    reasons = {r0["stop_reason"], r1["stop_reason"]}
    assert reasons <= {"threshold", "another rank"} and "threshold" in reasons, reasons
    for r in (r0, r1):
        assert [f["step"] for f in r["findings"] if f["check"] == "stop.early"] == [r["global_step"]]


def test_calibration_is_reduced_across_ranks_and_equals_one_process(ddp_run):
    """Each rank sees half of the validation set (DistributedSampler, no shuffle, 320 = 2 x 160: no padding);
    the logged ECE must be that of the full set computed in one process, to 1e-6."""
    out, _, (r0, r1) = ddp_run
    assert r0["calibration"]["count"] == r1["calibration"]["count"] == 320
    model = DigitsMLP()
    model.load_state_dict(torch.load(out / "final_weights.pt", weights_only=True))
    model.eval()
    metric = StreamingCalibration(15)
    _, val = loaders(batch_size=32, n_train=640, n_val=320)
    logits, targets = [], []
    with torch.no_grad():
        for x, y in val:
            metric.update(model(x), y)
            logits.append(model(x))
            targets.append(y)
    single = {k: float(v) for k, v in metric.compute().items() if v.numel() == 1}
    for key in ("ece", "mce", "adaptive_ece", "brier", "nll", "accuracy", "confidence", "count"):
        for r in (r0, r1):
            diff = abs(r["calibration"][key] - single[key])
            assert diff <= 1e-6, f"{key}: rank {r['rank']} {r['calibration'][key]} vs one process {single[key]}"
    # the temperature is fitted on every rank's sample together: one value on both ranks, that of the whole set
    # (to the bounded search's resolution: the NLL is flat near its minimum, so float-order noise moves T ~1e-4)
    temperature = fit_temperature(torch.cat(logits), torch.cat(targets))
    assert r0["calibration"]["temperature"] == r1["calibration"]["temperature"], (r0["calibration"], r1["calibration"])
    got = r0["calibration"]["temperature"]
    assert abs(got - temperature) <= 1e-3 * temperature, f"T {got} on the ranks vs {temperature} in one process"


def test_startup_checks_run_once_on_rank_zero(ddp_run):
    _, _, (r0, r1) = ddp_run
    assert _from(r0, "OverfitBatchCheck") == ["startup.overfit_ok"], r0["findings"]
    assert _from(r0, "BatchConsistencyCheck") == ["batch.ok"], r0["findings"]
    for source in ("OverfitBatchCheck", "BatchConsistencyCheck"):
        assert not _from(r1, source), r1["findings"]
        assert [f["count"] for f in r0["findings"] if f["source"] == source] == [1]
