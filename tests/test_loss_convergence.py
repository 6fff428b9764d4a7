"""LossConvergenceMonitor with real training: each fault gives its id with default settings, healthy runs stay
silent, no host-device sync per step, state survives a weights-only checkpoint."""

import contextlib
import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_debug import loss_series
from lightning_debug.base import DebugCallback
from lightning_debug.callbacks import loss as loss_module
from lightning_debug.callbacks.loss import LossConvergenceMonitor
from lightning_debug.findings import Severity
from lightning_debug.wording import loss as loss_words

from models import DigitsMLP, SmoothedDigitsMLP, loaders, make_trainer

PROBLEMS = {"loss.nonfinite", "loss.diverging", "loss.not_decreasing", "loss.plateau"}


def fit(tmp_path, module, epochs=10, batch_size=32, monitor=None, **loader_kwargs):
    monitor = monitor or LossConvergenceMonitor()
    train, _ = loaders(batch_size=batch_size, **loader_kwargs)
    make_trainer(tmp_path, [monitor], max_epochs=epochs).fit(module, train)
    return monitor


def ids(monitor):
    return {f.check for f in monitor.findings}


def csv_rows(root):
    with open(next(Path(root).rglob("metrics.csv"))) as fh:
        return list(csv.DictReader(fh))


def describe(monitor):
    s = monitor.series[0]
    return f"findings={[(f.check, f.step, f.message) for f in monitor.findings]} start={s.start} bins={s.values[-5:]}"


# ---------------------------------------------------------------------------------------------- detection
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"lr": 10.0}, id="adam-lr-10"),  # 1000x the demo's default
        pytest.param({"lr": 10.0, "optimizer": "sgd"}, id="sgd-lr-10"),
    ],
)
def test_far_too_high_learning_rate_diverges(tmp_path, kwargs):
    monitor = fit(tmp_path, DigitsMLP(**kwargs), epochs=4)
    assert ids(monitor) & {"loss.diverging", "loss.nonfinite"}, describe(monitor)
    first = next(f for f in monitor.findings if f.check in {"loss.diverging", "loss.nonfinite"})
    # the blow-up, confirmed over the next steps (no single bin raises an error), not at the end of the run
    assert first.severity is Severity.ERROR and first.step <= 40, describe(monitor)
    stuck = [f for f in monitor.findings if f.check == "loss.not_decreasing"]
    assert all("above where it started" in f.message and "e+" not in f.message for f in stuck), describe(monitor)


@pytest.mark.parametrize(
    "kwargs",
    [pytest.param({"lr": 1e-5}, id="adam-lr-1e-5"), pytest.param({"lr": 1e-4, "optimizer": "sgd"}, id="sgd-lr-1e-4")],
)
def test_far_too_low_learning_rate_does_not_decrease(tmp_path, kwargs):
    monitor = fit(tmp_path, DigitsMLP(**kwargs))
    assert ids(monitor) & {"loss.not_decreasing", "loss.plateau"}, describe(monitor)
    assert not ids(monitor) & {"loss.diverging", "loss.nonfinite"}, describe(monitor)


def test_one_unit_bottleneck_plateaus(tmp_path):
    """Seed 2: the single ReLU unit stays alive (with other seeds it can die: that run is not_decreasing)."""
    import lightning.pytorch as pl

    pl.seed_everything(2, verbose=False)
    monitor = fit(tmp_path, DigitsMLP(hidden=(1,)), epochs=25, seed=2)
    assert "loss.plateau" in ids(monitor), describe(monitor)
    f = next(f for f in monitor.findings if f.check == "loss.plateau")
    assert f.data["level"] > 1.0 and f.data["floor"] == 0.0 and f.data["floor_source"] == "a likelihood's best", f.data
    assert f.data["slope_low"] <= f.data["slope"] <= f.data["slope_high"], f.data
    assert {"window", "p_value", "reachable_drop"} <= set(f.data), f.data
    assert not ids(monitor) & {"loss.diverging", "loss.nonfinite", "loss.converged"}, describe(monitor)


class AnnealedBottleneck(DigitsMLP):
    """The same bottleneck, with a schedule that cuts the learning rate 100x after 150 steps."""

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=150, gamma=0.01)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_a_flat_loss_under_an_annealed_learning_rate_is_not_a_plateau(tmp_path):
    """A schedule that took the rate below half its peak explains the flat loss (cosine end, step decay)."""
    import lightning.pytorch as pl

    pl.seed_everything(2, verbose=False)
    monitor = fit(tmp_path, AnnealedBottleneck(hidden=(1,)), epochs=25, seed=2)
    assert "loss.plateau" not in ids(monitor), describe(monitor)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="mlp"),
        pytest.param({"batchnorm": True}, id="batchnorm"),
        pytest.param({"dropout": 0.5}, id="dropout"),
    ],
)
def test_healthy_runs_raise_no_warning(tmp_path, kwargs):
    monitor = fit(tmp_path, DigitsMLP(**kwargs))
    bad = [f for f in monitor.findings if f.severity is not Severity.INFO]
    assert not bad, describe(monitor)


@pytest.mark.slow
@pytest.mark.parametrize("batchnorm", [False, True], ids=["mlp", "batchnorm"])
@pytest.mark.parametrize(
    ("batch_size", "epochs", "n_train"), [(8, 5, 1200), (1024, 160, 1500)], ids=["batch-8", "batch-1024"]
)
def test_healthy_runs_raise_no_warning_across_batch_sizes(tmp_path, batchnorm, batch_size, epochs, n_train):
    monitor = fit(
        tmp_path, DigitsMLP(batchnorm=batchnorm), epochs=epochs, batch_size=batch_size, n_train=n_train, n_val=100
    )
    bad = [f for f in monitor.findings if f.severity is not Severity.INFO]
    assert not bad, describe(monitor)
    assert monitor.batches >= 300, "the run must be long enough to be judged"


def test_healthy_run_converges_and_logs_smoothed_and_slope(tmp_path):
    monitor = fit(tmp_path, DigitsMLP())
    assert "loss.converged" in ids(monitor), describe(monitor)
    rows = csv_rows(tmp_path)
    smoothed = [float(r["debug/loss/smoothed"]) for r in rows if r.get("debug/loss/smoothed")]
    slopes = [float(r["debug/loss/slope"]) for r in rows if r.get("debug/loss/slope")]
    # checks every tenth of the planned 380 batches (rounded to whole bins), and the final verdict
    every = monitor.schedule.check_every
    assert every == 36 and len(smoothed) == 380 // every + 1, (every, smoothed)
    assert len(slopes) == len(smoothed) - 2, slopes  # a trend needs 6 bins in the window: from the third check
    assert smoothed[-1] < 0.1 * monitor.series[0].start, smoothed


def test_nonfinite_reports_the_first_step_and_the_component(tmp_path):
    class NaNAfter(DigitsMLP):
        """The regularisation component turns NaN at step 57; the total follows."""

        def training_step(self, batch, batch_idx):
            x, y = batch
            nll = torch.nn.functional.cross_entropy(self(x), y)
            reg = 1e-4 * sum((p**2).sum() for p in self.parameters())
            if self.global_step >= 57:
                reg = reg * float("nan")
            self.log("train_nll", nll)
            self.log("train_reg", reg)
            return nll + reg

    monitor = LossConvergenceMonitor(components={"nll": "train_nll", "reg": "train_reg"})
    fit(tmp_path, NaNAfter(), epochs=3, monitor=monitor)
    nonfinite = {f.data["series"]: f for f in monitor.findings if f.check == "loss.nonfinite"}
    assert {"loss", "reg"} <= set(nonfinite), describe(monitor)
    assert nonfinite["reg"].data["step"] == 57 and nonfinite["loss"].data["step"] == 57, describe(monitor)
    assert nonfinite.get("nll", nonfinite["reg"]).data["step"] >= 57, "the NaN reaches the weights only after"
    assert "'reg'" in nonfinite["reg"].message and nonfinite["reg"].severity is Severity.ERROR
    # a 114-batch run is checked every 20 batches: found at the next check (batch 60), not at the end
    assert monitor.schedule.check_every == 20 and nonfinite["loss"].step == 60, describe(monitor)


class Regularised(DigitsMLP):
    """A prior term (like a KL to a prior) keeps the total ~1.5 above 0, while the likelihood part falls to ~0."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        nll = torch.nn.functional.cross_entropy(self(x), y)
        reg = 1.5 + 1e-4 * sum((p**2).sum() for p in self.parameters())
        self.log("train_nll", nll)
        self.log("train_reg", reg)
        return nll + reg


def test_components_keep_a_regularised_total_from_being_called_a_plateau(tmp_path):
    bare = fit(tmp_path / "bare", Regularised(), epochs=20)  # a plateau must hold at two consecutive checks
    assert "loss.plateau" in ids(bare), "the scenario must look like a plateau from the total alone: " + describe(bare)
    monitor = LossConvergenceMonitor(components={"nll": "train_nll", "reg": "train_reg"})
    fit(tmp_path / "parts", Regularised(), monitor=monitor)
    assert not [f for f in monitor.findings if f.severity is not Severity.INFO], describe(monitor)
    nll, reg = monitor.series[1].values[-1], monitor.series[2].values[-1]
    assert nll < 0.1 * monitor.series[1].start and reg > 1.5, (nll, reg)
    rows = csv_rows(tmp_path / "parts")
    assert any(r.get("debug/loss/nll") for r in rows) and any(r.get("debug/loss/reg") for r in rows)


def test_key_reads_a_logged_metric(tmp_path):
    monitor = fit(tmp_path, DigitsMLP(lr=1e-5), monitor=LossConvergenceMonitor(key="train_loss_step"))
    assert monitor.series[0].name == "train_loss_step"
    assert "loss.not_decreasing" in ids(monitor), describe(monitor)


def test_missing_key_is_reported_once_as_skipped(tmp_path):
    monitor = fit(tmp_path, DigitsMLP(), epochs=1, monitor=LossConvergenceMonitor(key="nope"))
    (f,) = monitor.findings
    assert f.check == "check.skipped" and "nope" in f.message and f.count == 38


# ---------------------------------------------------------------------------------------------- cost
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "to", "__float__", "__int__", "__bool__", "__index__", "__repr__")


def test_no_host_device_sync_between_checks(tmp_path, monkeypatch):
    """Every tensor->host conversion made from the monitor (callbacks/loss.py, loss_series.py) is counted; they
    happen only at checks (here every 100 steps) and at train end, one transfer each, and at the log2(100) early
    probes (batches 1, 2, 4, ... 64)."""
    calls: list[tuple[str, int]] = []
    trainer_box = {}
    sources = {loss_module.__file__, loss_series.__file__}

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename in sources:
                calls.append((name, trainer_box["trainer"].global_step))
            return original(self, *args, **kwargs)

        return wrapper

    for name in SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monitor = LossConvergenceMonitor(components={"nll": "train_loss_step"}, check_every_n_steps=100)
    train, _ = loaders(batch_size=32, n_train=1200)
    trainer = make_trainer(tmp_path, [monitor], max_steps=250, max_epochs=20)
    trainer_box["trainer"] = trainer
    trainer.fit(DigitsMLP(), train)
    monkeypatch.undo()
    probes = [("tolist", b) for b in (1, 2, 4, 8, 16, 32, 64)]  # the early NaN/Inf/jump probes before the first check
    checks = [("tolist", 100), ("tolist", 200), ("tolist", 250)]  # one per check (100, 200) + the end
    assert calls == probes + checks, f"conversions {calls}"


def test_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "loss_overhead", Path(__file__).parents[1] / "benchmarks" / "loss_overhead.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure(reps=1, epochs=2, root=str(tmp_path))
    for clock in ("cpu", "wall"):
        assert result[clock]["ratio"] > 0 and len(result[clock]["monitored"]["ratios"]) == 1, result
        assert result[clock]["noop"]["ratio"] > 0, result


# ---------------------------------------------------------------------------------------------- state
def test_state_survives_weights_only_checkpoint_resume(tmp_path):
    train, _ = loaders(batch_size=32)
    monitor = LossConvergenceMonitor(check_every_n_steps=200)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [monitor, ckpt], max_steps=150, max_epochs=20, enable_checkpointing=True).fit(
        DigitsMLP(lr=1e-5), train
    )
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"][monitor.state_key]
    # saved at the last epoch end, before the end-of-training verdict: bins of 3 steps (150 planned batches);
    # the early probe at batch 128 binned 42 full bins; the 24 rows after them wait in the tail
    assert state["schedule"] == {"bin_steps": 3, "check_every": 200, "warmup": 30, "stuck_after": 75}, state["schedule"]
    assert state["batches"] == 150 and len(state["series"][0]["values"]) == 42, state["series"][0]
    assert [step for step, _ in state["tail"]] == list(range(126, 150)), state["tail"]

    resumed = LossConvergenceMonitor(check_every_n_steps=200)
    make_trainer(tmp_path, [resumed, ckpt], max_steps=380, max_epochs=20, enable_checkpointing=True).fit(
        DigitsMLP(lr=1e-5), train, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert resumed.schedule.bin_steps == 3, "a resumed run keeps the bins it was made with"
    assert resumed.batches == 380 and resumed.series[0].xs[-1] >= 379, (resumed.batches, resumed.series[0].xs[-3:])
    assert resumed.series[0].start == monitor.series[0].start
    assert "loss.not_decreasing" in ids(resumed), describe(resumed)


def test_pending_rows_are_saved_mid_check():
    """A checkpoint between checks keeps the rows not yet pulled (they load as plain lists)."""
    monitor = LossConvergenceMonitor()
    monitor._pending = [torch.tensor(float(i)) for i in range(3)]
    monitor._steps, monitor.batches = [0, 1, 2], 3
    state = monitor.state_dict()
    assert state["tail"] == [[0, [0.0]], [1, [1.0]], [2, [2.0]]]
    other = LossConvergenceMonitor()
    other.load_state_dict(state)
    assert other._tail == [(0, [0.0]), (1, [1.0]), (2, [2.0])] and other.batches == 3


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"floor": float("nan")}, "floor"),
        ({"check_every_n_steps": 9}, "check_every_n_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"window": 30}, "window"),
        ({"min_drop": 0}, "min_drop"),
        ({"min_progress": 1.5}, "min_progress"),
        ({"converged_level": 0.5}, "converged_level"),
        ({"diverge_factor": 1.0}, "diverge_factor"),
        ({"confidence": 1.0}, "confidence"),
        ({"components": {"slope": "x"}}, "components"),
    ],
)
def test_arguments_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LossConvergenceMonitor(**kwargs)


# ---------------------------------------------------------------------------------------------- every run length
class WrongParams(DigitsMLP):
    """The optimizer holds a parameter the model never uses: nothing that gets gradients is ever stepped."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.unused = torch.nn.Parameter(torch.zeros(3))

    def configure_optimizers(self):
        return torch.optim.Adam([self.unused], lr=1e-2)


class DeadUnits(DigitsMLP):
    """Every hidden ReLU is dead from initialisation (a bias of -100): only the output bias can learn."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with torch.no_grad():
            self.net[0].bias.fill_(-100.0)


@pytest.mark.parametrize(
    "module",
    [
        pytest.param(lambda: DigitsMLP(lr=1e-7), id="lr-1e-7"),
        pytest.param(WrongParams, id="optimizer-holds-wrong-params"),
        pytest.param(DeadUnits, id="dead-units"),
    ],
)
def test_a_short_run_gets_a_verdict(tmp_path, module):
    """60 optimizer steps (2 epochs of digits at batch 64): the old monitor said nothing before 200."""
    monitor = fit(tmp_path, module(), epochs=2, batch_size=64)
    assert monitor.batches == 38 and monitor.finished, monitor.batches
    (f,) = [f for f in monitor.findings if f.check == "loss.not_decreasing"] or [None]
    assert f is not None and f.step <= 38, describe(monitor)
    assert "floor 0 (a likelihood's best)" in f.message and "%" not in f.message.split(":")[1][:40], f.message


def test_a_run_whose_last_check_is_its_last_batch_still_gets_the_final_verdict(tmp_path):
    """Checks every 19 batches of a 38-batch run: the last periodic check takes every row, and the end of the run
    must still give its verdict (it gave none, so a 200-step run checked every 20 batches ended silent)."""
    monitor = LossConvergenceMonitor(check_every_n_steps=19)
    fit(tmp_path, DigitsMLP(), epochs=2, batch_size=64, monitor=monitor)
    assert monitor.batches == 38 and monitor.finished, monitor.batches
    assert ids(monitor) & {"loss.converged", "loss.still_decreasing", "loss.plateau"}, describe(monitor)


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_a_bottleneck_stopped_early_gets_a_finding(tmp_path):
    """25 epochs planned (950 batches), stopped by another callback at step 240 (the issue's run stopped at 484
    with nothing said): the final verdict runs, and the deferred one-batch test diagnoses it (here: the loss still
    falls, slowly, and one batch levels off at 46% of the gap: ``loss.floor_high``, whose first cause is a 1-unit
    layer)."""
    import lightning.pytorch as pl

    from lightning_debug.callbacks.overfit import OverfitBatchCheck

    pl.seed_everything(2, verbose=False)
    monitor, overfit = LossConvergenceMonitor(), OverfitBatchCheck()
    train, _ = loaders(batch_size=32, seed=2)
    make_trainer(tmp_path, [overfit, monitor, StopAt(240)], max_epochs=25).fit(DigitsMLP(hidden=(1,)), train)
    assert monitor.batches == 240, monitor.batches
    found = ids(monitor) | {f.check for f in overfit.findings}
    stuck = {"loss.plateau", "loss.not_decreasing", "startup.cannot_overfit", "loss.floor_high"}
    assert found & stuck, (found, describe(monitor))


class Interrupt(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= 50:
            raise KeyboardInterrupt


def test_an_interrupted_run_gets_a_verdict(tmp_path):
    monitor = LossConvergenceMonitor()
    train, _ = loaders(batch_size=32)
    trainer = make_trainer(tmp_path, [monitor, Interrupt()], max_epochs=10)
    with contextlib.suppress(BaseException):  # Lightning turns Ctrl-C into a graceful stop (or SystemExit)
        trainer.fit(DigitsMLP(lr=1e-7), train)
    assert monitor.finished and "loss.not_decreasing" in ids(monitor), describe(monitor)


# ---------------------------------------------------------------------------------------------- floors
def test_label_smoothing_sets_the_floor_and_a_healthy_run_is_no_plateau(tmp_path):
    monitor = fit(tmp_path, SmoothedDigitsMLP(hidden=(128,), lr=3e-3), epochs=12)
    assert not [f for f in monitor.findings if f.severity is not Severity.INFO], describe(monitor)
    verdicts = [f for f in monitor.findings if f.check.startswith("loss.")]
    assert verdicts and all(abs(f.data["floor"] - 0.5003) < 1e-3 for f in verdicts), describe(monitor)
    assert all("label smoothing 0.1 over 10 classes" in f.message for f in verdicts), describe(monitor)


def test_progress_is_worded_without_absurd_percentages():
    """The old message said "-4.4e31%" after a blow-up."""
    floor = loss_words.rules.Floor(0.0, "a likelihood's best")
    above = loss_words.describe_progress(2.3, 1e31, floor)
    assert above.startswith("above where it started") and "%" not in above, above
    assert loss_words.describe_progress(2.3, 1.15, floor).startswith("50% of the way"), "a plain fraction"
    below = loss_words.describe_progress(2.3, -0.5, floor)
    assert below.startswith("below the floor") and "%" not in below, below
    assert "floor 0 (a likelihood's best)" in above


# ---------------------------------------------------------------------------------------------- model health
class StubHealth(DebugCallback):
    """Stands in for ModelHealthCheck: one setup finding before the first step."""

    def on_train_start(self, trainer, pl_module):
        self.emit(trainer, "setup.stub_unused", "the optimizer holds none of the 3 tensors that receive gradients")


def test_a_model_health_finding_is_cited_in_the_hint(tmp_path, monkeypatch):
    from lightning_debug import findings

    info = findings.CheckInfo("setup.stub_unused", Severity.ERROR, "stub", "stub", ("x",), ("y",), "StubHealth")
    monkeypatch.setitem(findings.CATALOGUE, info.id, info)
    monitor = LossConvergenceMonitor()
    train, _ = loaders(batch_size=64)
    make_trainer(tmp_path, [StubHealth(), monitor], max_epochs=2).fit(WrongParams(), train)
    f = next(f for f in monitor.findings if f.check == "loss.not_decreasing")
    assert f.data["explained_by"] == ["setup.stub_unused"], f.data
    assert "none of the 3 tensors that receive gradients" in f.hint, f.hint


# ---------------------------------------------------------------------------------------------- small-batch SGD
def _sgd_incident(tmp_path, seed, steps):
    """The healthy set-up the old rule stopped in 6 of 8 seeds: batch 8, SGD momentum 0.9, warm-up + cosine,
    4 overlapping classes (make_classification, class_sep 1.0, standardised)."""
    import lightning.pytorch as pl
    from sklearn.datasets import make_classification
    from torch.utils.data import DataLoader, TensorDataset

    x, y = make_classification(
        n_samples=1900, n_features=16, n_informative=8, n_redundant=2, n_classes=4, n_clusters_per_class=1,
        class_sep=1.0, random_state=seed,
    )  # fmt: skip
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor(y)
    pl.seed_everything(seed, verbose=False)
    train = DataLoader(TensorDataset(x[:1600], y[:1600]), batch_size=8, shuffle=True)

    class Blobs(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)
            total = self.trainer.estimated_stepping_batches
            warm = max(1, total // 20)

            def factor(s):
                return min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0)))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    monitor = LossConvergenceMonitor()
    make_trainer(tmp_path, [monitor], max_steps=steps, max_epochs=100).fit(Blobs(), train)
    return monitor


@pytest.mark.parametrize("seed", [0, 1])
def test_small_batch_sgd_is_never_diverging(tmp_path, seed):
    monitor = _sgd_incident(tmp_path, seed, steps=400)
    assert "loss.diverging" not in ids(monitor), describe(monitor)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8))
def test_small_batch_sgd_is_never_diverging_over_eight_seeds(tmp_path, seed):
    monitor = _sgd_incident(tmp_path, seed, steps=2000)
    assert not [f for f in monitor.findings if f.severity is not Severity.INFO], describe(monitor)


class NoisyLabels(DigitsMLP):
    """8 classes, a label that follows the input only 70% of the time: the data's entropy (1.09 nats) is the
    floor, for train and validation alike."""

    def __init__(self):
        super().__init__(hidden=(32,), lr=3e-3)
        self.net[0] = torch.nn.Linear(8, 32)
        self.net[-1] = torch.nn.Linear(32, 8)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))


def test_a_floor_of_irreducible_entropy_is_not_a_plateau(tmp_path):
    """Train ~= validation, both flat at the data's entropy: `loss.converged` at that floor, named, no plateau."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 8, generator=g)
    clean = (x @ torch.randn(8, 8, generator=g)).argmax(-1)
    y = torch.where(torch.rand(5000, generator=g) < 0.7, clean, torch.randint(0, 8, (5000,), generator=g))
    train = DataLoader(TensorDataset(x[:4000], y[:4000]), batch_size=64, shuffle=True, generator=g)
    val = DataLoader(TensorDataset(x[4000:], y[4000:]), batch_size=500)
    monitor = LossConvergenceMonitor()
    make_trainer(tmp_path, [monitor], max_epochs=10).fit(NoisyLabels(), train, val)
    assert not [f for f in monitor.findings if f.severity is not Severity.INFO], describe(monitor)
    converged = [f for f in monitor.findings if f.check == "loss.converged"]
    assert converged and "validation" in converged[-1].data["floor_source"], describe(monitor)
    assert 1.0 < converged[-1].data["floor"] < 1.5, converged[-1].data  # the entropy, plus what the MLP misses


@pytest.mark.parametrize("accumulate, scheduled", [(1, True), (2, False)])
def test_every_step_is_recorded_as_the_general_reader_reads_it(tmp_path, monkeypatch, accumulate, scheduled):
    """The per-step hook reads the common case (a dict with a 0-d loss) inline and the learning rate from the
    cached parameter group: every batch's recorded value, step and learning rate must equal what
    ``step_values``, ``trainer.global_step`` and ``current_lr`` give at that batch (exactly, no tolerance)."""

    class Scheduled(DigitsMLP):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.05)
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]

    recorded, expected = [], []
    record = LossConvergenceMonitor._record

    def spy(self, values, step, lr):
        recorded.append((values.item(), step, float(lr) if isinstance(lr, (int, float)) else None))
        record(self, values, step, lr)

    class Reference(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.step = trainer.global_step  # the step the batch's training_step sees

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            values = loss_series.step_values(trainer, pl_module, outputs, None, [])
            expected.append((values.item(), self.step, loss_series.current_lr(trainer)))

    monkeypatch.setattr(LossConvergenceMonitor, "_record", spy)
    train, _ = loaders(batch_size=64)
    module = Scheduled() if scheduled else DigitsMLP()
    trainer = make_trainer(tmp_path, [LossConvergenceMonitor(), Reference()], max_epochs=3)
    trainer.accumulate_grad_batches = accumulate
    trainer.fit(module, train)
    assert len(recorded) == len(expected) == 3 * len(train), (len(recorded), len(expected))
    mismatches = [(i, r, e) for i, (r, e) in enumerate(zip(recorded, expected, strict=True)) if r != e]
    assert not mismatches, f"{len(mismatches)} of {len(recorded)} batches differ, first: {mismatches[:3]}"
    assert not scheduled or len({lr for _, _, lr in recorded}) >= 3, "the rate changes every epoch"
