"""The examples run end to end with small settings and report what they claim to (so none can rot)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from lightning_debug.base import debug_callbacks_of
from lightning_debug.findings import Severity

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def findings(trainer):
    return [f for cb in debug_callbacks_of(trainer) for f in cb.findings]


def assert_quiet(found):
    loud = [f"{f.check}: {f.message}" for f in found if f.severity is not Severity.INFO]
    assert not loud, f"a healthy example raised warnings/errors: {loud}"


def test_quickstart_is_quiet(tmp_path):
    trainer = load("quickstart").main(["--epochs", "3", "--out", str(tmp_path)])
    import wandb

    wandb.finish()  # quickstart leaves its run open; the next example's WandbLogger would reuse it
    found = findings(trainer)
    assert {"startup.overfit_deferred", "batch.ok"} <= {f.check for f in found}, [f.check for f in found]
    assert_quiet(found)
    assert list((tmp_path / "wandb").glob("offline-run-*")), "the run was logged to W&B offline"


def test_early_stopping_replay_follows_lightnings_patience_rule():
    would_stop = load("loss_metric_divergence").would_stop
    # best at 1; no strict improvement for 2 checks after it -> stops at check 3 with patience 2
    assert would_stop([0.5, 0.7, 0.7, 0.6, 0.9], "max", patience=2) == (3, 1)
    assert would_stop([1.0, 0.8, 0.7, 0.6], "min", patience=2) == (None, 3)
    assert would_stop([1.0, 0.8, 0.9, 1.1, 1.2], "min", patience=3) == (4, 1)


@pytest.mark.slow
def test_loss_metric_divergence_reports_divergence_and_calibration(tmp_path):
    result = load("loss_metric_divergence").main(["--out", str(tmp_path)])
    checks = {f.check for f in result.findings}
    assert "val.loss_metric_divergence" in checks, [f"{f.check}: {f.message}" for f in result.findings]
    assert not [f for f in result.findings if f.severity is Severity.ERROR], result.findings
    acc, loss = result.history["val_acc"], result.history["val_loss"]
    by_loss = {p.monitor: p for p in result.stops}["val_loss"]
    assert loss[-1] > 1.01 * by_loss.best_value, f"dev loss rose after its best epoch {by_loss.best_epoch}: {loss}"
    assert acc[-1] >= by_loss.val_acc_at_best - 0.01, f"dev accuracy held after the loss's best epoch: {acc}"
    # with W&B attached the reliability diagram goes as a native chart (its table), not as a matplotlib image
    tables = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/debug/calibration/reliability_diagram*"))
    assert tables, "reliability diagrams were logged to W&B"


def test_transformer_lm_healthy_passes_batch_and_decode_checks(tmp_path):
    trainer = load("transformer_lm").main(["--steps", "10", "--n-train", "512", "--out", str(tmp_path)])
    found = findings(trainer)
    assert {"startup.overfit_deferred", "batch.ok", "decode.ok"} <= {f.check for f in found}, [f.check for f in found]
    assert_quiet(found)


@pytest.mark.parametrize(
    ("bug", "expected"),
    [
        ("padding", {"batch.padding_dependence"}),
        ("batch-mix", {"batch.cross_sample_dependence"}),
        ("decode-score", {"decode.score_mismatch"}),
    ],
)
def test_transformer_lm_bug_is_reported(tmp_path, bug, expected):
    argv = ["--bug", bug, "--steps", "2", "--n-train", "256", "--no-overfit", "--out", str(tmp_path)]
    found = findings(load("transformer_lm").main(argv))
    checks = {f.check for f in found}
    assert expected <= checks, f"--bug {bug}: expected {expected}, got {[f'{f.check}: {f.message}' for f in found]}"
    errors = {f.check for f in found if f.severity is Severity.ERROR}
    assert errors <= {
        "batch.loss_mismatch",
        "batch.padding_dependence",
        "batch.cross_sample_dependence",
        "decode.score_mismatch",
    }, errors
