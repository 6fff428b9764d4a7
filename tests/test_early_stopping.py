"""MetricEarlyStopping: drop-in parity with EarlyStopping, the new stop criteria, resume, and grokking."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from test_divergence import Scripted, _grokking_script, fit_scripted, scripted_loaders

from lightning_debug import DebugCallback
from lightning_debug.callbacks.divergence import LossMetricDivergence
from lightning_debug.callbacks.early_stopping import MetricEarlyStopping
from lightning_debug.demos.modular import ModularAdditionMLP, modular_addition_loaders

from models import DigitsMLP, loaders, make_trainer


def stop_finding(es):
    found = [f for f in es.findings if f.check == "stop.early"]
    return found[0] if found else None


def test_plain_arguments_behave_exactly_like_lightning(tmp_path):
    """Same series, same EarlyStopping arguments (guard off): same stop epoch, wait count, best and reason."""
    script = {"val_loss": [1.0, 0.8, 0.79, 0.795, 0.7, 0.71, 0.72, 0.73, 0.74, 0.75]}
    kwargs = dict(monitor="val_loss", min_delta=0.02, patience=3, mode="min")
    ours, theirs = MetricEarlyStopping(**kwargs, grokking_guard=False), EarlyStopping(**kwargs)
    t1, _ = fit_scripted(tmp_path / "a", script, [ours])
    t2, _ = fit_scripted(tmp_path / "b", script, [theirs])
    assert (t1.current_epoch, ours.stopped_epoch, ours.wait_count) == (t2.current_epoch, theirs.stopped_epoch, 3)
    assert float(ours.best_score) == pytest.approx(float(theirs.best_score))
    assert ours.stopping_reason == theirs.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED
    f = stop_finding(ours)
    assert f is not None and f.data["reason"] == "patience" and f.data["best"] == pytest.approx(0.7)
    assert f.data["best_step"] == 5  # 1 step per epoch; the check after epoch 4 is at global step 5


def test_min_delta_rel(tmp_path):
    """A loss falling 0.5% per check: an absolute min_delta of 0.01 counts every check as an improvement, a
    relative one of 1% needs three checks' worth of progress, so a patience of 2 runs out."""
    script = {"val_loss": [100 * 0.995**i for i in range(12)]}
    absolute = MetricEarlyStopping("val_loss", min_delta=0.01, patience=2)
    relative = MetricEarlyStopping("val_loss", min_delta=0.01, patience=2, min_delta_mode="rel")
    fit_scripted(tmp_path / "a", script, [absolute])
    fit_scripted(tmp_path / "b", script, [relative])
    assert stop_finding(absolute) is None and absolute.wait_count == 0
    assert relative.stop_reason == "patience" and relative.stopped_epoch == 2


def test_warmup_and_min_epochs_do_not_clash(tmp_path):
    """Flat metric, patience 2. Lightning's EarlyStopping exhausts patience before min_epochs=6 and the
    trainer stops the moment min_epochs is reached (#19966); ours starts counting only when the trainer may
    stop (``respect_min_epochs=True``), so it stops 2 checks later. ``warmup`` checks delay patience the same way."""
    script = {"val_loss": [1.0] * 20}
    theirs = EarlyStopping("val_loss", patience=2)
    ours = MetricEarlyStopping("val_loss", patience=2, respect_min_epochs=True)
    t_theirs, _ = fit_scripted(tmp_path / "a", script, [theirs], min_epochs=6)
    t_ours, _ = fit_scripted(tmp_path / "b", script, [ours], min_epochs=6)
    assert t_theirs.current_epoch == 6, "Lightning stops right at min_epochs"
    assert ours.stopped_epoch == 6 and ours.stop_reason == "patience"  # checks after epochs 5 and 6 count
    assert t_ours.current_epoch == 7

    warm = MetricEarlyStopping("val_loss", patience=2, warmup=5)
    fit_scripted(tmp_path / "c", script, [warm])
    assert warm.stopped_epoch == 6  # checks 1-5 are warm-up; checks 6 and 7 exhaust patience


def test_smoothing_ignores_one_lucky_evaluation(tmp_path):
    """Accuracy rising 1 point per check with one lucky spike: plain early stopping takes the spike as the
    best and stops; with a 3-check median it keeps training."""
    acc = [0.50 + 0.01 * i for i in range(15)]
    acc[3] = 0.80
    plain = MetricEarlyStopping("val_acc", mode="max", patience=3, grokking_guard=False)
    smooth = MetricEarlyStopping("val_acc", mode="max", patience=3, smoothing="median", grokking_guard=False)
    fit_scripted(tmp_path / "a", {"val_acc": acc}, [plain])
    fit_scripted(tmp_path / "b", {"val_acc": acc}, [smooth])
    assert plain.stop_reason == "patience" and plain.stopped_epoch == 6
    assert smooth.stop_reason is None and float(smooth.best_score) == pytest.approx(0.63)


def test_check_every_in_steps_and_in_checks(tmp_path):
    train, val = loaders(batch_size=100, n_train=400)  # 4 steps per epoch
    steps = MetricEarlyStopping("train_loss_step", patience=100, unit="steps", check_every=2)
    every_other = MetricEarlyStopping("val_loss", patience=100, check_every=2)
    make_trainer(tmp_path, [steps, every_other], max_epochs=3, log_every_n_steps=1).fit(DigitsMLP(), train, val)
    assert steps.judged == 6  # steps 2, 4, ..., 12
    assert (every_other.seen_checks, every_other.judged) == (3, 1)


class Emitter(DebugCallback):
    """Reports a dead run (``loss.nonfinite``) after ``at`` training steps."""

    def __init__(self, at: int) -> None:
        super().__init__(verbose=False)
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            self.emit(trainer, "loss.nonfinite", "loss is NaN")


def test_stop_on_another_callbacks_finding(tmp_path):
    train, val = loaders(batch_size=100, n_train=400)
    es = MetricEarlyStopping("val_loss", patience=100)
    trainer = make_trainer(tmp_path, [Emitter(at=6), es], max_epochs=10)
    trainer.fit(DigitsMLP(), train, val)
    assert trainer.global_step == 6, "stops at the batch the finding appeared"
    assert es.stop_reason == "finding:loss.nonfinite"
    assert es.stopping_reason == EarlyStoppingReason.NON_FINITE_METRIC
    assert stop_finding(es).data["reason"] == "finding:loss.nonfinite"

    with pytest.raises(ValueError, match="stop_on"):
        MetricEarlyStopping("val_loss", stop_on=["loss.nope"])


def test_a_stop_before_the_first_validation_says_no_value_was_recorded(tmp_path):
    """Issue 14's message defect: "Best val_loss = -inf at step -1" when a finding stopped the run first."""
    train, val = loaders(batch_size=100, n_train=400)
    es = MetricEarlyStopping("val_loss", patience=100)
    make_trainer(tmp_path, [Emitter(at=2), es], max_epochs=10).fit(DigitsMLP(), train, val)
    finding = stop_finding(es)
    assert "No val_loss had been recorded yet." in finding.message, finding.message
    assert "inf" not in finding.message and "step -1" not in finding.message, finding.message
    assert finding.data["best_step"] is None


class Snapshots(Callback):
    """The module's weights after every validation, by global step."""

    def __init__(self) -> None:
        self.weights = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.weights[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_restore_best_weights(tmp_path):
    """The memorising MLP's dev loss bottoms out, then rises: at the end the module holds the weights of
    the best check, and re-validating them gives the best value."""
    train, val = loaders(batch_size=16, n_train=300)
    es = MetricEarlyStopping("val_loss", patience=4, restore_best_weights=True)
    snaps = Snapshots()
    model = DigitsMLP(hidden=(512, 512), lr=1e-3)
    trainer = make_trainer(tmp_path, [snaps, es], max_epochs=40)
    trainer.fit(model, train, val)
    assert es.stop_reason == "patience" and es.best_step < trainer.global_step
    for k, v in model.state_dict().items():
        assert torch.equal(v, snaps.weights[es.best_step][k]), f"{k} differs from the best check's weights"
    assert all(t.device.type == "cpu" for t in es.best_weights.values())
    val_loss = trainer.validate(model, val, verbose=False)[0]["val_loss"]
    assert val_loss == pytest.approx(float(es.best_score), abs=1e-5)


def test_grokking_guard_defers_patience_on_the_measured_curve_shape(tmp_path):
    """Fast guard test on the measured shape of the grokking run (dev accuracy below chance for 20 checks
    while the model memorises, then generalises): the guard defers, the run reaches accuracy 1.0; without
    the guard the same callback stops in the memorisation phase."""
    script = _grokking_script()
    guarded = MetricEarlyStopping("val_acc", mode="max", chance=1 / 97)
    fit_scripted(tmp_path / "a", script, [guarded])
    assert guarded.stop_reason is None, guarded.findings
    deferred = [f for f in guarded.findings if f.check == "stop.deferred"]
    assert deferred and "memorising" in deferred[0].message, guarded.findings
    assert any("grokking" in f.message for f in deferred) or deferred[0].count > 1
    assert float(guarded.best_score) == pytest.approx(1.0)

    unguarded = MetricEarlyStopping("val_acc", mode="max", chance=1 / 97, grokking_guard=False)
    fit_scripted(tmp_path / "b", script, [unguarded])
    assert unguarded.stop_reason == "patience" and unguarded.stopped_epoch < 10


def test_grokking_guard_is_bounded_and_silent_on_plain_plateaus(tmp_path):
    """A plateau with a rising dev loss (overfitting) is not deferred; max_deferral bounds deferral."""
    overfit = {"val_acc": [0.9] * 12, "train_acc": [1.0] * 12, "val_loss": [0.3 + 0.02 * i for i in range(12)]}
    es = MetricEarlyStopping("val_acc", mode="max", patience=3)
    fit_scripted(tmp_path / "a", overfit, [es])
    assert es.stop_reason == "patience" and es.deferred == 0

    falling = {**overfit, "val_loss": [1.0 * 0.9**i for i in range(12)]}
    bounded = MetricEarlyStopping("val_acc", mode="max", patience=3, max_deferral=4)
    fit_scripted(tmp_path / "b", falling, [bounded])
    assert bounded.deferred == 4 and bounded.stop_reason == "patience"


class LastCheckpoint(ModelCheckpoint):
    def __init__(self, dirpath):
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_epochs=1)


def test_resume_gives_identical_patience_state_and_loads_weights_only(tmp_path):
    """Scripted (deterministic) curves: a run interrupted at epoch 5 and resumed stops exactly where the
    uninterrupted run stops, with the same state; the checkpoint loads with ``weights_only=True``."""
    acc = [0.5, 0.6, 0.62, 0.61, 0.63, 0.62, 0.64, 0.64, 0.63, 0.62, 0.61, 0.6, 0.6, 0.6, 0.6]
    script = {"val_acc": acc, "train_acc": [1.0] * 15, "val_loss": [1.0] * 15}
    kw = dict(monitor="val_acc", mode="max", patience=4, smoothing="median", restore_best_weights=True)

    def fit(root, callbacks, epochs, ckpt_path=None):
        trainer = make_trainer(root, callbacks, max_epochs=epochs, enable_checkpointing=ckpt_path is None)
        trainer.fit(Scripted(script, lr=0.0), *scripted_loaders(), ckpt_path=ckpt_path)
        return trainer

    full = MetricEarlyStopping(**kw)
    t_full = fit(tmp_path / "full", [full], 15)

    first = MetricEarlyStopping(**kw)
    fit(tmp_path / "a", [first, LastCheckpoint(tmp_path / "ckpt")], 5)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    saved = ckpt["callbacks"][first.state_key]
    assert saved["wait_count"] == first.wait_count and saved["recent"] == first.recent

    resumed = MetricEarlyStopping(**kw)
    trainer = fit(tmp_path / "b", [resumed], 15, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.current_epoch == t_full.current_epoch and resumed.stopped_epoch == full.stopped_epoch
    a, b = resumed.state_dict(), full.state_dict()
    for key in ("wait_count", "best_step", "recent", "judged", "deferred", "stop_reason", "stopping_reason"):
        assert a[key] == b[key], (key, a[key], b[key])
    assert float(a["best_score"]) == float(b["best_score"])


class StopAt(Callback):
    """Ends the run once val_acc reaches ``level`` (the test's horizon, not part of the callback under test)."""

    def __init__(self, level: float) -> None:
        self.level, self.reached_at = level, None

    def on_train_epoch_end(self, trainer, pl_module):
        if float(trainer.callback_metrics.get("val_acc", 0.0)) >= self.level:
            self.reached_at, trainer.should_stop = trainer.global_step, True


@pytest.mark.slow
def test_grokking_run_is_not_stopped_before_it_generalises(tmp_path):
    """Modular addition (p=97, half the pairs, AdamW lr 3e-3, wd 1.0, full batch), validated every 10 steps:
    Lightning's EarlyStopping(patience=3) stops while val_acc is ~0; MetricEarlyStopping with default
    arguments lets it run until val_acc passes 0.95 (~step 800), and LossMetricDivergence stays silent."""
    pl.seed_everything(0)
    plain = EarlyStopping(monitor="val_acc", mode="max")
    trainer = make_trainer(tmp_path / "plain", [plain], max_epochs=150)
    trainer.fit(ModularAdditionMLP(), *modular_addition_loaders(steps_per_epoch=10))
    plain_acc = float(trainer.callback_metrics["val_acc"])
    assert plain.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED and plain_acc < 0.02, plain_acc

    pl.seed_everything(0)
    ours, horizon = MetricEarlyStopping(monitor="val_acc", mode="max"), StopAt(0.95)
    divergence = LossMetricDivergence(metric="val_acc", train_loss="train_loss")
    trainer = make_trainer(tmp_path / "ours", [ours, divergence, horizon], max_epochs=150)
    trainer.fit(ModularAdditionMLP(), *modular_addition_loaders(steps_per_epoch=10))
    assert horizon.reached_at is not None, f"stopped at step {trainer.global_step}: {ours.findings}"
    assert ours.stop_reason is None and any(f.check == "stop.deferred" for f in ours.findings)
    assert not divergence.has_finding("val.loss_metric_divergence"), divergence.findings
    print(
        f"plain EarlyStopping stopped at step {plain.stopped_epoch * 10 + 10} (val_acc {plain_acc:.4f}); "
        f"MetricEarlyStopping reached val_acc 0.95 at step {horizon.reached_at}"
    )


def test_a_pickled_copy_has_equal_vars():
    """Lightning's ``test_pickling`` compares ``vars`` of a pickled copy: the guard's state compares by value."""
    import pickle

    es = MetricEarlyStopping("val_acc", mode="max")
    assert vars(pickle.loads(pickle.dumps(es))) == vars(es)
