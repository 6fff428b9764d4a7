"""The suite on a user's own code (issue 16): output paths, metric names, mode, printed findings, iterable data,
and misuse errors."""

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_debug import DebugCallback, debug_callbacks
from lightning_debug.callbacks.early_stopping import MetricEarlyStopping
from lightning_debug.callbacks.overfit import OverfitBatchCheck

from models import DigitsMLP, loaders, make_trainer

ROOT = Path(__file__).resolve().parents[1]

# An editable install as setuptools makes it: a meta-path finder appended after the path-based one, so a
# `lightning_debug` folder in the working directory (sys.path[0]) wins the import over it.
EDITABLE_RUN = f"""
import importlib.abc, importlib.util, sys

class EditableFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "lightning_debug":
            pkg = {str(ROOT / "lightning_debug")!r}
            return importlib.util.spec_from_file_location(name, pkg + "/__init__.py", submodule_search_locations=[pkg])
        return None

sys.meta_path.append(EditableFinder())
import lightning.pytorch as pl, torch
from lightning_debug import DebugCallback, debug_callbacks
from lightning_debug.demos.digits import DigitsMLP, loaders

torch.set_num_threads(1)
train, val = loaders(batch_size=64, n_train=256)
trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=2, callbacks=debug_callbacks("val_acc"))
trainer.fit(DigitsMLP(hidden=(16,)), train, val)
"""


def test_report_never_shadows_the_package(tmp_path):
    """Run a script twice from a fresh directory against an editable-style install with ``logger=False``: the
    report goes to ``lightning_logs/version_<n>/lightning_debug/``, and the second run still imports the package
    (on e2b2395 the first run's ``./lightning_debug/`` made it fail with ImportError)."""
    (tmp_path / "train.py").write_text(EDITABLE_RUN)
    env = {"PATH": "/usr/bin:/bin", "WANDB_MODE": "offline", "HOME": str(tmp_path)}
    for run in range(2):
        done = subprocess.run(
            [sys.executable, "train.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"run {run + 1} failed:\n{done.stderr[-3000:]}"
    assert not (tmp_path / "lightning_debug").exists()
    reports = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("report.json"))
    assert reports == [f"lightning_logs/version_{i}/lightning_debug/report.json" for i in (0, 1)], reports


class SlashMetrics(DigitsMLP):
    """Logs ``train/acc``, ``val/acc``, ``val/loss`` (a common naming) and optionally two validation loaders."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train/acc", (logits.argmax(-1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        logits = self(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())
        return {"logits": logits, "target": y}


def _suite_of(callbacks, cls):
    return next(cb for cb in callbacks if isinstance(cb, cls))


def test_slash_metric_names_are_paired_and_tracked(tmp_path):
    train, val = loaders(batch_size=64, n_train=512)
    callbacks = debug_callbacks("val/acc", early_stopping={"loss_monitor": "val/loss"})
    es = _suite_of(callbacks, MetricEarlyStopping)
    assert (es.mode, es.train_monitor) == ("max", "train/acc")
    make_trainer(tmp_path, callbacks, max_epochs=2).fit(SlashMetrics(hidden=(32,)), train, val)
    assert es.judged == 2 and float(es.best_score) > 0.5
    assert es.guard_history["train"][-1] > 0.5, "train/acc is read for the guard"
    debug = [cb for cb in callbacks if isinstance(cb, DebugCallback)]
    skipped = [f.message for cb in debug for f in cb.findings if f.check.startswith("check.") and "logged" in f.message]
    assert not skipped, skipped


def test_several_validation_loaders_use_the_first_and_say_so_once(tmp_path):
    train, val = loaders(batch_size=64, n_train=512)
    callbacks = debug_callbacks("val/acc")
    es = _suite_of(callbacks, MetricEarlyStopping)
    make_trainer(tmp_path, callbacks, max_epochs=3).fit(SlashMetrics(hidden=(32,)), train, [val, val])
    resolved = [f for f in es.findings if f.check == "check.metric_resolved"]
    assert len(resolved) == 1 and resolved[0].data["key"] == "val/acc/dataloader_idx_0", es.findings
    assert es.judged == 3


def test_unknown_metric_is_a_warning_with_close_matches(tmp_path, caplog):
    train, val = loaders(batch_size=64, n_train=256)
    callbacks = debug_callbacks("val_accuracy")  # the module logs val_acc
    es = _suite_of(callbacks, MetricEarlyStopping)
    with caplog.at_level(logging.WARNING, logger="lightning_debug"):
        make_trainer(tmp_path, callbacks, max_epochs=1).fit(DigitsMLP(hidden=(16,)), train, val)
    (missing,) = [f for f in es.findings if f.check == "check.metric_missing"]
    assert missing.severity.value == "warning" and "val_acc" in missing.data["close"], missing
    assert "did you mean 'val_acc'" in missing.message
    assert any("check.metric_missing" in r.getMessage() for r in caplog.records), "printed when it happens"


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("val_loss", "min"), ("val/acc", "max"), ("val_f1", "max"), ("eval_perplexity", "min"), ("val_wer", "min")],
)
def test_mode_inferred_from_the_metric_name(metric, mode):
    callbacks = debug_callbacks(metric)
    assert _suite_of(callbacks, MetricEarlyStopping).mode == mode


def test_mode_undecidable_or_contradicted():
    with pytest.raises(ValueError, match=r"debug_callbacks: cannot tell .*'val_score'.*mode='max'"):
        debug_callbacks("val_score")
    with pytest.warns(UserWarning, match=r"mode='max' for 'val_loss'.*suggests mode='min'"):
        debug_callbacks("val_loss", mode="max")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        debug_callbacks("val_score", mode="max")


def test_debug_callbacks_val_loss_tracks_the_minimum(tmp_path):
    train, val = loaders(batch_size=64, n_train=512)
    callbacks = debug_callbacks("val_loss")
    es = _suite_of(callbacks, MetricEarlyStopping)
    make_trainer(tmp_path, callbacks, max_epochs=3).fit(DigitsMLP(hidden=(32,)), train, val)
    losses = [float(v) for v in es.recent]
    assert es.mode == "min" and float(es.best_score) == pytest.approx(min(losses)), (es.best_score, losses)


def test_stop_findings_print_when_they_happen(tmp_path, caplog):
    """``stop.early`` reaches the console at the step it happens (MetricEarlyStopping's ``verbose=False`` is
    Lightning's argument, not the findings' printing), and a stop before any validation says so plainly."""
    train, val = loaders(batch_size=64, n_train=512)
    es = MetricEarlyStopping("val_acc", patience=1, stopping_threshold=0.0)
    with caplog.at_level(logging.INFO, logger="lightning_debug"):
        make_trainer(tmp_path / "a", [es], max_epochs=3).fit(DigitsMLP(hidden=(16,)), train, val)
    assert any(r.getMessage().startswith("stop.early [info] Stopped at step") for r in caplog.records)

    early = MetricEarlyStopping("val_acc", patience=1)
    early.on_finding(None, type("F", (), {"check": "loss.nonfinite", "count": 1})())
    make_trainer(tmp_path / "b", [early], max_epochs=1).fit(DigitsMLP(hidden=(16,)), train, val)
    (stop,) = [f for f in early.findings if f.check == "stop.early"]
    assert "-inf" not in stop.message and "step -1" not in stop.message, stop.message
    assert "No val_acc had been recorded yet" in stop.message


class Stream(IterableDataset):
    """A stateful stream: each ``iter()`` continues where the last one stopped (a reader over a shared file)."""

    def __init__(self, n: int = 256) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)
        self.position = 0

    def __iter__(self):
        while self.position < len(self.x):
            i = self.position
            self.position += 1
            yield self.x[i], self.y[i]


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append([t.clone() for t in batch])


def test_stateful_iterable_dataset_yields_the_same_batches_with_the_suite(tmp_path):
    """Startup checks must not call ``iter()`` on the user's stream: the training batches with the suite are
    the bare run's, batch for batch. The one-batch test runs at start (a stream has no epoch length to defer
    against) on the first real batch."""
    val = DataLoader(TensorDataset(torch.randn(64, 64), torch.randint(0, 10, (64,))), batch_size=32)
    runs, weights = {}, {}
    suites = {
        "bare": [],
        "suite": debug_callbacks("val_acc"),
        "stall": debug_callbacks("val_acc", overfit={"when": "stall"}),
    }
    for name, suite in suites.items():
        recorder = Recorder()
        pl.seed_everything(0)
        model = DigitsMLP(hidden=(16,))
        make_trainer(tmp_path / name, [recorder, *suite], max_epochs=1).fit(
            model, DataLoader(Stream(), batch_size=32), val
        )
        runs[name] = recorder.batches
        weights[name] = [p.detach().clone() for p in model.parameters()]
    for name in ("suite", "stall"):
        assert len(runs[name]) == len(runs["bare"]) == 8, {k: len(v) for k, v in runs.items()}
        for i, (a, b) in enumerate(zip(runs["bare"], runs[name], strict=True)):
            assert all(torch.equal(s, t) for s, t in zip(a, b, strict=True)), f"{name}: batch {i} differs"
        same = all(torch.equal(a, b) for a, b in zip(weights["bare"], weights[name], strict=True))
        assert same, f"{name}: training differs"
    (overfit,) = [cb for cb in suites["suite"] if isinstance(cb, OverfitBatchCheck)]
    assert [f.check for f in overfit.findings] == ["startup.overfit_ok"], [f.message for f in overfit.findings]
    (deferred,) = [cb for cb in suites["stall"] if isinstance(cb, OverfitBatchCheck)]
    assert deferred._stream_batch is not None and not deferred.done  # kept for a stall that never came


def test_deferred_one_batch_test_on_a_stream_uses_its_kept_first_batch(tmp_path):
    """A stream whose loss cannot fall (detached logits): the deferred test runs at the end of fit on the first
    real batch, kept on the CPU, never on a new ``iter()`` of the stream."""
    overfit = OverfitBatchCheck(when="stall")
    suite = [cb for cb in debug_callbacks("val_acc", overfit=False) if type(cb).__name__ == "LossConvergenceMonitor"]
    stream = Stream(2048)  # 128 steps: enough for the loss monitor's verdict
    make_trainer(tmp_path, [overfit, *suite], max_epochs=1).fit(
        DigitsMLP(hidden=(16,), detach_logits=True), DataLoader(stream, batch_size=16)
    )
    (f,) = overfit.findings
    assert f.check == "startup.cannot_overfit" and f.data["trigger"], f.message
    assert stream.position == 2048 and overfit._stream_batch is None, stream.position  # one pass, batch released


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: debug_callbacks("val_acc", loss={"floorr": 1}), r"`loss=` has no argument 'floorr'.*'floor'"),
        (lambda: debug_callbacks("val_acc", early_stopping={"mode": "min"}), r"early_stopping=.*'mode'.*mode="),
        (lambda: debug_callbacks(["val_acc"]), r"`metric` must be the name of one metric"),
        (lambda: debug_callbacks(""), r"`metric` must be the name of one metric"),
        (lambda: debug_callbacks(None, early_stopping={"patience": 3}), r"`early_stopping=`.*needs a metric"),
        (lambda: debug_callbacks("val_acc", calibraton={}), r"unknown component 'calibraton'.*'calibration'"),
        (lambda: debug_callbacks("val_acc", loss=3), r"`loss=` takes a dict"),
    ],
)
def test_misuse_errors_name_the_argument_and_suggest(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_mode_is_lightnings_exception_and_a_value_error():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    for kind in (MisconfigurationException, ValueError):
        with pytest.raises(kind, match="`mode` can be min, max, got unknown"):
            MetricEarlyStopping("val_loss", mode="unknown")


class NoForward(pl.LightningModule):
    """A module that computes its loss inline and defines no ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_module_without_forward_gets_one_hint(tmp_path):
    from lightning_debug.callbacks.batch_consistency import BatchConsistencyCheck

    train, _ = loaders(batch_size=32, n_train=128)
    check = BatchConsistencyCheck()
    make_trainer(tmp_path, [check], max_epochs=1, limit_train_batches=1).fit(NoForward(), train)
    (skip,) = [f for f in check.findings if f.check == "check.skipped"]
    assert "defines no forward" in skip.message and skip.message.count("forward_fn") == 1, skip.message


class ReturnsProbabilities(DigitsMLP):
    """Returns softmax probabilities under the ``logits`` key, as many modules do."""

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        return {"logits": out["logits"].softmax(-1), "target": out["target"]}


def test_calibration_detects_probabilities_like_torchmetrics(tmp_path, caplog):
    """The same model returning probabilities or logits gets the same ECE, and the monitor says which it
    assumed; forcing ``input_format="logits"`` on probabilities (e2b2395's behaviour) gives a wrong ECE."""
    from lightning_debug.callbacks.calibration import CalibrationMonitor

    ece = {}
    for name, cls, fmt in (
        ("logits", DigitsMLP, "auto"),
        ("probs", ReturnsProbabilities, "auto"),
        ("forced", ReturnsProbabilities, "logits"),
    ):
        pl.seed_everything(0)
        train, val = loaders(batch_size=64, n_train=512)
        monitor = CalibrationMonitor(plot_every_n_epochs=0, input_format=fmt)
        with caplog.at_level(logging.INFO, logger="lightning_debug"):
            make_trainer(tmp_path / name, [monitor], max_epochs=4).fit(cls(hidden=(64,), lr=1e-2), train, val)
        ece[name] = monitor.history[-1]["ece"]
    assert ece["probs"] == pytest.approx(ece["logits"], abs=1e-4), ece
    assert abs(ece["forced"] - ece["logits"]) > 0.1, ece
    said = [r.getMessage() for r in caplog.records if "CalibrationMonitor: treating" in r.getMessage()]
    assert said == [
        "CalibrationMonitor: treating `logits` as logits (not all probabilities; set input_format)",
        "CalibrationMonitor: treating `logits` as probs (all in [0, 1], rows summing to 1; set input_format)",
    ], said


def test_whole_run_benchmark_measures_suite_against_bare(tmp_path):
    """``benchmarks/overhead.py --whole-run``: suite and bare ``Trainer.fit`` of the same script, wall and CPU
    time, and the suite's costliest hooks (a one-epoch smoke run; the figures in the README come from the
    full command)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import overhead
    finally:
        sys.path.pop(0)
    result = overhead.whole_run(overhead.WHOLE_RUNS["no_val_22"], reps=1, root=str(tmp_path), seconds=0.1)
    assert result["epochs"] >= 1 and not result["validation"]  # 0.1 s is one epoch or a few, by machine load
    # a 0.1 s run is all fixed cost (startup checks, fit-end figures): only that both arms were timed is asserted
    assert result["ratio"] > 0.5 and result["cpu_ratio"] > 0.5, result
    names = [name.split("{")[0].split(".")[0] for name, _ in result["costliest_hooks"]]
    assert "LossConvergenceMonitor" in names, result["costliest_hooks"]
