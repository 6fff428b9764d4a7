"""DebugCallback: de-duplication, guarded hooks, checkpointable state — with real training."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_debug import (
    DebugCallback,
    DebugReport,
    GrokkingMonitor,
    MetricEarlyStopping,
    ModelHealthCheck,
    debug_callbacks,
)

from models import DigitsMLP, loaders, make_trainer


class Probe(DebugCallback):
    """Emits a repeated warning every batch and raises at one chosen step."""

    def __init__(self, raise_at: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.raise_at = raise_at
        self.batches_after_raise = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.raise_at is not None and trainer.global_step > self.raise_at:
            self.batches_after_raise += 1
        self.emit(trainer, "loss.plateau", f"flat at step {trainer.global_step}", data={"step": trainer.global_step})
        if trainer.global_step == self.raise_at:
            raise ZeroDivisionError("probe failed on purpose")


def test_repeated_findings_are_counted_not_repeated(tmp_path, caplog):
    probe = Probe()
    train, _ = loaders(n_train=320)
    make_trainer(tmp_path, [probe], max_epochs=1).fit(DigitsMLP(), train)
    assert len(probe.findings) == 1
    (f,) = probe.findings
    assert (f.check, f.count, f.step, f.last_step) == ("loss.plateau", 10, 1, 10)
    assert f.source == "Probe" and f.hint.startswith("Try")


class Escalating(DebugCallback):
    """A provisional info at step 2 that a later repeat confirms as a warning."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in (2, 3):
            self.emit(trainer, "loss.not_decreasing", f"flat at {step}", data={"step": step}, severity="info")
        if step == 6:
            self.emit(trainer, "loss.not_decreasing", "still flat at the end", data={"step": step})


def test_a_repeat_with_a_higher_severity_confirms_the_finding_and_is_printed_again(tmp_path, caplog):
    probe = Escalating()
    make_trainer(tmp_path, [probe], max_steps=8).fit(DigitsMLP(), loaders()[0])
    (f,) = probe.findings
    assert (f.severity.value, f.count, f.step, f.last_step) == ("warning", 3, 2, 6)
    assert (f.message, f.data) == ("still flat at the end", {"step": 6})
    printed = [r.getMessage() for r in caplog.records if "loss.not_decreasing" in r.getMessage()]
    assert len(printed) == 2 and "[warning] still flat" in printed[1], printed


def test_a_check_that_raises_becomes_check_error_and_training_continues(tmp_path):
    probe = Probe(raise_at=3)
    train, _ = loaders(n_train=320)
    trainer = make_trainer(tmp_path, [probe], max_epochs=1)
    trainer.fit(DigitsMLP(), train)
    assert trainer.global_step == 10, "training must run to the end"
    errors = [f for f in probe.findings if f.check == "check.error"]
    assert len(errors) == 1
    assert "ZeroDivisionError: probe failed on purpose" in errors[0].message
    assert errors[0].data["hook"] == "on_train_batch_end" and errors[0].step == 3
    assert probe.batches_after_raise == 7


def test_strict_reraises(tmp_path):
    train, _ = loaders(n_train=320)
    with pytest.raises(ZeroDivisionError):
        make_trainer(tmp_path, [Probe(raise_at=2, strict=True)], max_epochs=1).fit(DigitsMLP(), train)


def test_findings_survive_checkpoint_resume_with_weights_only(tmp_path):
    train, _ = loaders(n_train=320)
    probe = Probe(raise_at=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [probe, ckpt], max_epochs=1, enable_checkpointing=True).fit(DigitsMLP(), train)
    path = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(path, weights_only=True)
    saved = next(v for k, v in state["callbacks"].items() if "Probe" in k)
    assert {f["check"] for f in saved["findings"]} == {"loss.plateau", "check.error"}

    resumed = Probe()
    make_trainer(tmp_path, [resumed], max_epochs=2).fit(DigitsMLP(), train, ckpt_path=path)
    by_check = {f.check: f for f in resumed.findings}
    assert set(by_check) == {"loss.plateau", "check.error"}
    assert by_check["loss.plateau"].count == 20, "the count goes on across the resume"
    assert by_check["loss.plateau"].step == 1


def test_report_collects_findings_of_every_debug_callback(tmp_path):
    class OtherProbe(Probe):
        pass

    a, b = Probe(), OtherProbe(raise_at=1)
    report = DebugReport(print_table=False)
    train, _ = loaders(n_train=64)
    make_trainer(tmp_path, [a, b, report], max_epochs=1).fit(DigitsMLP(), train)
    assert sorted(f.check for f in report.findings(make_trainer(tmp_path, [a, b]))) == [
        "check.error",
        "loss.plateau",
        "loss.plateau",
    ]


PER_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


def test_lightning_dispatches_only_the_hooks_a_callback_defines(tmp_path):
    """Lightning pays ~2.5 us per hook call per callback, no-op or not: the suite leaves it 3 calls per step
    (of 6 hooks x 11 callbacks), and a run still sees every hook a callback does define."""
    suite = debug_callbacks("val_acc")
    dispatched = sorted(
        f"{type(cb).__name__}.{name}" for cb in suite for name in PER_STEP_HOOKS if callable(getattr(cb, name))
    )
    assert dispatched == [
        "ErrorAnalysis.on_train_batch_end",  # counts target tokens; switches itself off after one non-token batch
        "GrokkingMonitor.on_train_batch_end",
        "LossConvergenceMonitor.on_train_batch_end",
    ], dispatched  # the health check's hooks are there only on its sampled steps, once training has started

    class Counting(DebugCallback):
        def __init__(self) -> None:
            super().__init__()
            self.batches = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.batches += 1

    counting = Counting()
    assert Counting.on_before_backward is None and Counting.on_train_batch_start is None
    make_trainer(tmp_path, [counting], max_steps=5).fit(DigitsMLP(), loaders()[0])
    assert counting.batches == 5


def test_hooks_with_work_only_on_some_steps_are_dispatched_on_those_steps(tmp_path):
    """The health check's hooks are there only around a sampled step (every 2nd of the first 25 here, the first
    check interval sampled twice as often, then every 5th), the grokking monitor's on its weight-norm steps when
    training outputs carry no predictions, early stopping's only for checks counted in steps or a stop to act on;
    the work is done all the same."""

    class CountedHealth(ModelHealthCheck):
        def __init__(self) -> None:
            super().__init__(sample_every_n_steps=5, check_every_n_steps=25)
            self.sampled_ends = self.sampled_starts = 0

        def on_before_optimizer_step_due(self, trainer, pl_module, optimizer) -> None:
            self.sampled_starts += 1
            super().on_before_optimizer_step_due(trainer, pl_module, optimizer)

        def on_train_batch_end_due(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.sampled_ends += 1
            super().on_train_batch_end_due(trainer, pl_module, outputs, batch, batch_idx)

    health = CountedHealth()
    assert health.on_train_batch_end is None
    make_trainer(tmp_path, [health], max_steps=40).fit(DigitsMLP(), loaders()[0])
    expected = [*range(0, 25, 2), 25, 30, 35]
    assert health.sampled_starts == health.sampled_ends == len(expected), health.sampled_ends
    assert health.history["step"] == expected, health.history["step"]

    class CountedGrokking(GrokkingMonitor):
        def __init__(self) -> None:
            super().__init__(norm_every_n_steps=5)
            self.batch_ends = 0

        def on_train_batch_end_due(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.batch_ends += 1
            super().on_train_batch_end_due(trainer, pl_module, outputs, batch, batch_idx)

    grokking = CountedGrokking()  # the module returns a bare loss: no training predictions to count
    make_trainer(tmp_path, [grokking], max_steps=23).fit(DigitsMLP(), loaders()[0])
    sampled = [s for s, _ in grokking.curves.pending]  # weight norms not yet recorded: no validation here
    assert grokking.batch_ends == 5 and sampled == [5, 10, 15, 20], (grokking.batch_ends, sampled)  # + the 1st batch

    stopping = MetricEarlyStopping("val_acc", mode="max")
    assert stopping.on_train_batch_end is None
    stopping._pending = "loss.nonfinite"
    assert callable(stopping.on_train_batch_end)
    assert callable(MetricEarlyStopping("val_acc", mode="max", unit="steps").on_train_batch_end)


class Listener(DebugCallback):
    """Learns about the other callbacks' findings only through the base class."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.heard: list[tuple[str, int]] = []
        self.fail = fail

    def on_finding(self, trainer, finding):
        self.heard.append((finding.check, finding.count))
        if self.fail:
            raise RuntimeError("listener failed on purpose")


def test_callbacks_hear_each_others_findings_through_the_base_class(tmp_path):
    probe, listener = Probe(), Listener()
    train, _ = loaders(n_train=320)
    trainer = make_trainer(tmp_path, [probe, listener], max_epochs=1)
    trainer.fit(DigitsMLP(), train)
    assert listener.heard == [("loss.plateau", n) for n in range(1, 11)], "every emit, repeats with their count"
    assert [f.check for f in listener.findings_on(trainer)] == ["loss.plateau"]
    assert listener.findings_on(trainer, "loss.nonfinite") == [] and probe.findings_on(trainer) == []
    assert DebugCallback.emissions_on(trainer) == 10
    assert not listener.watched_on(trainer, "loss.plateau"), "no LossConvergenceMonitor on this trainer"
    assert listener.skip(trainer, "no data", key="x").message == "Listener: no data"


def test_a_failing_listener_becomes_one_check_error_without_recursion(tmp_path):
    probe, listener = Probe(), Listener(fail=True)
    train, _ = loaders(n_train=320)
    make_trainer(tmp_path, [probe, listener], max_epochs=1).fit(DigitsMLP(), train)
    errors = [f for f in listener.findings if f.check == "check.error"]
    assert len(errors) == 1 and errors[0].count == 10 and errors[0].data["hook"] == "on_finding", errors


def test_new_argument_names_and_the_former_ones():
    assert Probe(raise_errors=True).raise_errors and not Probe(print_findings=False).print_findings
    assert Probe(strict=True).raise_errors and not Probe(verbose=False).print_findings
