"""What reaches the loggers: the offline W&B run read back from its file, and the no-W&B path on disk."""

import csv
import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_debug import DebugCallback, DebugReport, LossConvergenceMonitor
from lightning_debug.sinks import MAX_HOLD_STEPS, Sink, hold_steps

from models import DigitsMLP, loaders, make_trainer
from wandb_reader import read_offline_run


class Flags(DebugCallback):
    """Logs a debug scalar and a figure each epoch; emits a warning and an error."""

    def on_train_start(self, trainer, pl_module):
        Sink(trainer).define_metric("debug/probe/level", summary="min,max")

    def on_train_epoch_end(self, trainer, pl_module):
        sink = Sink(trainer)
        sink.log_scalars({"debug/probe/level": 2.0 - trainer.current_epoch})
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        sink.log_figure("debug/probe/figure", fig)
        sink.log_table("debug/probe/table", ["epoch", "value"], [[trainer.current_epoch, 1.5]])
        self.emit(trainer, "loss.plateau", "flat at 2.30 (floor 0)", data={"level": 2.3})
        self.emit(trainer, "loss.nonfinite", "loss is NaN at step 7")


def test_wandb_offline_run_holds_findings_table_summary_metrics_and_alert(tmp_path, wandb_logger):
    train, _ = loaders(n_train=128)
    make_trainer(tmp_path, [Flags(), DebugReport(print_table=False)], logger=wandb_logger, max_epochs=2).fit(
        DigitsMLP(), train
    )
    import wandb

    wandb.finish()
    run = read_offline_run(tmp_path)

    table = run.table("debug/findings/table")
    assert table["columns"][:5] == ["check", "severity", "step", "epoch", "count"]
    rows = [(r[0], r[1], r[4]) for r in table["data"]]
    assert rows == [("loss.nonfinite", "error", 2), ("loss.plateau", "warning", 2)]
    assert run.summary["debug/findings/loss.plateau"] == 1
    assert run.summary["debug/findings/total_error"] == 1
    assert run.summary["debug/findings/status"] == "finished"

    assert run.series("debug/probe/level") == [2.0, 1.0]
    assert run.summary["debug/probe/level"]["min"] == 1.0 and run.summary["debug/probe/level"]["max"] == 2.0
    assert any(m["name"] == "debug/probe/level" and m["summary"] == ["min", "max"] for m in run.metrics)
    assert run.table("debug/probe/table")["data"] == [[1, 1.5]]
    assert "debug/probe/figure" in run.keys()  # noqa: SIM118 (OfflineRun.keys, not a dict)

    assert [a["title"] for a in run.alerts] == ["loss.nonfinite: Training loss is NaN or Inf"], "one alert, not two"
    assert "NaN at step 7" in run.alerts[0]["text"]


def test_without_wandb_figures_are_png_tables_csv_and_scalars_reach_csv_and_tensorboard(tmp_path):
    train, _ = loaders(n_train=128)
    loggers = [CSVLogger(str(tmp_path), name="csv"), TensorBoardLogger(str(tmp_path), name="tb")]
    make_trainer(tmp_path, [Flags(), DebugReport(print_table=False)], logger=loggers, max_epochs=2).fit(
        DigitsMLP(), train
    )
    out = tmp_path / "csv" / "version_0" / "lightning_debug"
    assert sorted(p.name for p in out.glob("*.png")) == ["probe_figure_step4.png", "probe_figure_step8.png"]
    assert (out / "report.json").exists()
    with (out / "probe_table.csv").open() as fh:
        assert list(csv.reader(fh)) == [["epoch", "value"], ["1", "1.5"]]
    with (tmp_path / "csv" / "version_0" / "metrics.csv").open() as fh:
        levels = [row["debug/probe/level"] for row in csv.DictReader(fh) if row.get("debug/probe/level")]
    assert levels == ["2.0", "1.0"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "tb").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0})
    acc.Reload()
    assert "debug/probe/figure" in acc.Tags()["images"]
    assert [e.value for e in acc.Scalars("debug/probe/level")] == [2.0, 1.0]


def test_logging_failures_never_reach_training(tmp_path):
    class Broken(CSVLogger):
        def log_metrics(self, metrics, step=None):
            raise OSError("disk full")

    trainer = make_trainer(tmp_path, [Flags()], logger=Broken(str(tmp_path)), max_epochs=1)
    Sink(trainer).log_scalars({"debug/x": 1.0})
    Sink(trainer).flush()  # must not raise


class Recording(CSVLogger):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))


class SameStep(DebugCallback):
    """Two debug callbacks' worth of scalars at the end of each validation: one logger call per step."""

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            Sink(trainer).log_scalars({"debug/a": 1.0})
            Sink(trainer).log_scalars({"debug/b": 2.0})


def debug_calls(tmp_path, callback, epochs, **trainer_kwargs):
    """The (step, scalars) logger calls that carry debug scalars, from a short digits run with ``callback``."""
    train, val = loaders(n_train=128)
    logger = Recording(str(tmp_path))
    trainer = make_trainer(tmp_path, [callback], logger=logger, max_epochs=epochs, **trainer_kwargs)
    trainer.fit(DigitsMLP(), train, val)
    return [(step, m) for step, m in logger.calls if any(k.startswith("debug/") for k in m)]


def test_scalars_of_one_step_reach_each_logger_in_one_call_and_the_last_at_teardown(tmp_path):
    ours = debug_calls(tmp_path, SameStep(), epochs=3)
    steps = [step for step, _ in ours]
    assert len(ours) == 3 and len(set(steps)) == 3, ours  # held for log_every_n_steps (10): all at teardown
    assert all(m == {"debug/a": 1.0, "debug/b": 2.0} for _, m in ours), ours


class Sent(Callback):
    """After the debug callbacks' validation end: how many debug calls the logger has received by then."""

    def __init__(self, logger):
        self.logger, self.sent = logger, []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            debug = [m for _, m in self.logger.calls if any(k.startswith("debug/") for k in m)]
            self.sent.append((trainer.global_step, len(debug)))


def test_a_step_is_held_until_one_hold_steps_later_arrives(tmp_path):
    """4 steps per epoch, log_every_n_steps=4 and validation every epoch: hold_steps is 4, so the scalars of
    step 4 are sent when step 8's arrive, and so on; the last at teardown."""
    train, val = loaders(n_train=128)
    logger = Recording(str(tmp_path))
    sent = Sent(logger)
    trainer = make_trainer(tmp_path, [SameStep(), sent], logger=logger, max_epochs=4, log_every_n_steps=4)
    assert hold_steps(trainer) == 4
    trainer.fit(DigitsMLP(), train, val)
    assert sent.sent == [(4, 0), (8, 1), (12, 2), (16, 3)], sent.sent
    assert [step for step, m in logger.calls if "debug/a" in m] == [4, 8, 12, 16], logger.calls


def test_hold_steps_follows_the_logging_and_validation_intervals_within_its_cap(tmp_path):
    train, val = loaders(n_train=128)
    assert hold_steps(make_trainer(tmp_path, [], max_epochs=1, log_every_n_steps=20)) == 20  # no interval yet
    trainer = make_trainer(tmp_path, [], max_epochs=1, log_every_n_steps=2, val_check_interval=3)
    trainer.fit(DigitsMLP(), train, val)
    assert hold_steps(trainer) == 3
    trainer = make_trainer(tmp_path, [], max_steps=2, log_every_n_steps=10**4)
    assert hold_steps(trainer) == MAX_HOLD_STEPS


class LateSample(DebugCallback):
    """At each validation end: a scalar of this step, then one of an earlier step (a sample taken mid-epoch, as
    GrokkingMonitor's weight norm), then another of this step."""

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            step = trainer.global_step
            Sink(trainer).log_scalars({"debug/a": 1.0})
            Sink(trainer).log_scalars({"debug/sample": 3.0}, step=step - 2)
            Sink(trainer).log_scalars({"debug/b": 2.0})


def test_a_late_point_joins_the_held_scalars_and_steps_reach_the_logger_in_order(tmp_path):
    ours = debug_calls(tmp_path, LateSample(), epochs=2)
    assert [step for step, _ in ours] == [2, 4, 6, 8], ours  # 4 steps of 2 per epoch: one call each
    assert ours[1][1] == {"debug/a": 1.0, "debug/b": 2.0} and ours[0][1] == {"debug/sample": 3.0}, ours


def test_the_loss_monitor_logs_no_denser_than_the_trainer_logs_training_metrics(tmp_path):
    """Checks every 10 steps are judged every 10 steps, but a W&B row costs ~1 ms: a point is logged only once
    ``log_every_n_steps`` (25) have passed since the last one, and the run's last check always."""
    ours = debug_calls(tmp_path, LossConvergenceMonitor(check_every_n_steps=10), epochs=16, log_every_n_steps=25)
    steps = [step for step, m in ours if "debug/loss/smoothed" in m]
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    assert len(steps) >= 2 and all(g >= 25 for g in gaps[:-1]) and steps[-1] == 64, steps  # 6 checks judged
