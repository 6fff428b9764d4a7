"""The default suite under real 2-process CPU DDP (gloo). Marked `ddp`: CI runs them with `pytest -m ddp`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wandb_reader import read_offline_run

SCRIPT = Path(__file__).parent / "scripts" / "ddp_suite.py"
pytestmark = pytest.mark.ddp


def _run(tmp_path, *args):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"DDP run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    return proc, ranks


def test_healthy_ddp_run_finishes_logs_once_and_a_one_rank_finding_does_not_hang(tmp_path):
    proc, (r0, r1) = _run(tmp_path)
    assert r0["global_step"] == r1["global_step"] == 40
    assert [f["check"] for f in r1["findings"] if f["source"] == "OneRankProbe"] == ["loss.plateau"]
    assert not [f for f in r0["findings"] if f["source"] == "OneRankProbe"]
    # rank 1's finding is not printed (rank-zero logging); nothing is printed twice
    assert "seen on rank 1 only" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[lightning-debug]")]
    assert len(lines) == len(set(lines)), lines
    report = json.loads(next(tmp_path.rglob("lightning_debug/report.json")).read_text())
    assert report["status"] == "finished"
    run = read_offline_run(tmp_path)
    assert len(run.table("debug/findings/table")["data"]) == len(report["findings"])
