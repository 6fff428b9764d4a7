"""GrokkingMonitor on the real modular-addition grokking run, read back from the offline W&B run file."""

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_debug.callbacks.grokking import GrokkingMonitor, log10_step, prediction_sums
from lightning_debug.demos.modular import ModularAdditionMLP, modular_addition_loaders

from models import make_trainer
from wandb_reader import read_offline_run

EVAL_INTERVAL = 50  # one validation per 50-step epoch in the demo


class GroundTruth(Callback):
    """Full train and dev accuracy every 10 steps, independent of the monitor and of the logged epoch means."""

    def __init__(self, train, val):
        self.data = {"train": train.tensors, "val": val.tensors}
        self.first = {}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % 10:
            return
        for name, (x, y) in self.data.items():
            if name not in self.first and (pl_module(x).argmax(-1) == y).float().mean() >= 0.99:
                self.first[name] = step


@pytest.mark.slow
def test_modular_addition_memorizes_then_generalizes_on_a_log_step_axis(tmp_path, wandb_logger):
    train, val = modular_addition_loaders()
    truth = GroundTruth(train.dataset, val.dataset)
    monitor = GrokkingMonitor(evals_per_decade=5)
    trainer = make_trainer(tmp_path, [truth, monitor], logger=wandb_logger, max_steps=1100, max_epochs=-1)
    trainer.fit(ModularAdditionMLP(), train, val)
    import wandb

    wandb.finish()
    run = read_offline_run(tmp_path)

    checks = [f.check for f in monitor.findings]
    assert checks == ["grokking.memorized", "grokking.generalized"], [f.message for f in monitor.findings]
    memorized, generalized = monitor.findings
    for finding, stage in ((memorized, "train"), (generalized, "val")):
        assert abs(finding.step - truth.first[stage]) <= EVAL_INTERVAL, (
            f"{finding.check} at step {finding.step}, full-data accuracy first >= 0.99 at {truth.first[stage]}"
        )
    assert memorized.data["val"] < 0.05, "dev accuracy is near zero when the training set is memorised"
    assert generalized.data["delay_ratio"] > 5, generalized.data
    assert generalized.data["max_val_loss"] > 10, "dev loss rises far above ln(97) during memorisation"

    # the curves are on the log-step axis, defined per key (an exact definition beats Lightning's "*" glob)
    defined = {m["name"]: m["step_metric"] for m in run.metrics}
    for key in ("train_acc", "val_acc", "train_loss", "val_loss", "weight_norm"):
        assert defined[f"debug/grokking/{key}"] == "debug/grokking/log10_step", defined
    rows = [r for r in run.history if "debug/grokking/val_acc" in r]
    assert all(math.isclose(r["debug/grokking/log10_step"], log10_step(r["trainer/global_step"])) for r in rows)
    steps = [r["trainer/global_step"] for r in rows]
    assert steps[:4] == [1, 2, 3, 4], f"log-spaced evaluations before the first validation: {steps[:12]}"
    assert len(steps) == len(set(steps)) and len(steps) >= 1100 // EVAL_INTERVAL + 5
    norms = run.series("debug/grokking/weight_norm")
    assert norms[-1] < 0.8 * max(norms), f"weight decay shrinks the weights while it groks: {norms[::5]}"
    assert run.summary["debug/grokking/memorized_step"] == memorized.step
    assert run.summary["debug/grokking/generalized_step"] == generalized.step
    assert run.summary["debug/grokking/val_acc"]["max"] > 0.99
    assert run.config["_wandb"]["visualize"]["debug/grokking/accuracy_curves"]["panel_type"] == "Vega2"
    assert "debug/grokking/curves" not in run.keys(), "W&B gets native charts: no figure is drawn"  # noqa: SIM118


@pytest.mark.slow
def test_no_weight_decay_memorizes_and_stalls(tmp_path):
    train, val = modular_addition_loaders()
    monitor = GrokkingMonitor(stall_factor=5, stall_window=8)
    make_trainer(tmp_path, [monitor], max_steps=1000, max_epochs=-1).fit(
        ModularAdditionMLP(weight_decay=0.0), train, val
    )
    checks = [f.check for f in monitor.findings]
    assert checks == ["grokking.memorized", "grokking.stalled"], [f.message for f in monitor.findings]


def test_without_wandb_the_log_x_figure_is_drawn_at_fit_end(tmp_path):
    """No W&B to take the native charts: one PNG of the curves under <log_dir>/lightning_debug/."""
    train, val = modular_addition_loaders()
    monitor = GrokkingMonitor(evals_per_decade=3)
    trainer = make_trainer(tmp_path, [monitor], max_steps=60, max_epochs=-1)
    trainer.fit(ModularAdditionMLP(), train, val)
    pngs = sorted(p.name for p in (tmp_path / "csv" / "version_0" / "lightning_debug").glob("*.png"))
    assert pngs == ["grokking_curves_step60.png"], pngs
    assert [r["step"] for r in monitor.records][:3] == [1.0, 2.0, 5.0], monitor.records[:3]


def test_sequences_give_token_and_exact_match_accuracy():
    target = torch.tensor([[1, 2, 3, -100], [1, 2, 3, 4], [0, 0, 0, 0]])
    pred = torch.tensor([[1, 2, 3, 0], [1, 2, 0, 4], [1, 1, 1, 1]])  # padding wrong is fine; 1 slip; all wrong
    logits = torch.nn.functional.one_hot(pred, 5).float() * 10
    correct, tokens, _, seq_correct, seqs = prediction_sums(logits, target, "logits", -100).tolist()
    assert (correct, tokens) == (6, 11), "token accuracy counts the 11 unpadded tokens"
    assert (seq_correct, seqs) == (1, 3), "only the first sequence is an exact match"


def test_stage_sums_are_the_per_batch_sums_whether_held_or_set_aside():
    """Per-example targets are held and summed together, sequences per batch; a probe's set-aside sums come
    back as they were. Counts agree exactly, the NLL sum to 1e-12."""
    from lightning_debug.grokking_series import StageSums

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 10, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(5)]
    batches.insert(2, (torch.randn(4, 6, 10, generator=g), torch.randint(0, 10, (4, 6), generator=g)))  # sequences
    sums = StageSums(ignore_index=-100)
    expected = sum(prediction_sums(x, y, "logits", -100) for x, y in batches)
    for x, y in batches[:4]:
        sums.add("val", {"logits": x}, (None, y))
    saved = sums.set_aside("val")  # a probe: evaluates with empty sums, then puts them back
    sums.add("val", {"logits": batches[0][0]}, (None, batches[0][1]))
    assert sums.take("val")["val_acc"] == float(prediction_sums(*batches[0], "logits", -100)[0] / 32)
    sums.restore("val", saved)
    for x, y in batches[4:]:
        sums.add("val", {"logits": x}, (None, y))
    assert sums.held["val"].parts, "per-example predictions are held until read"
    got = sums.set_aside("val")
    assert got is not None and sums.held["val"].parts == []
    assert torch.equal(got[[0, 1, 3, 4]], expected[[0, 1, 3, 4]]), (got, expected)
    assert math.isclose(float(got[2]), float(expected[2]), rel_tol=1e-12), (got, expected)


def test_a_stage_whose_logged_metrics_give_its_values_is_no_longer_summed():
    """Once an evaluation's logged accuracy and loss give everything the sums give, the stage is covered and
    not summed (the logged values win anyway); sequences (token and exact-match accuracy) or a missing logged
    value keep it summed."""
    from lightning_debug.grokking_series import StageSums

    keys = {"val_acc": "val_acc", "val_loss": "val_loss"}
    x, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    logged = {"val_acc": torch.tensor(0.5), "val_loss": torch.tensor(1.0)}
    sums = StageSums(ignore_index=-100)
    sums.add("val", {"logits": x}, (None, y))
    assert sums.take("val", logged, keys) == {"val_acc": 0.5, "val_loss": 1.0} and sums.covered["val"]
    sums.add("val", {"logits": x.unsqueeze(0)}, (None, y.unsqueeze(0)))  # sequences: seq accuracy is not logged
    assert "val_seq_acc" in sums.take("val", logged, keys) and not sums.covered["val"]
    sums.add("val", {"logits": x}, (None, y))
    assert "val_acc" in sums.take("val", {"val_loss": torch.tensor(1.0)}, keys) and not sums.covered["val"]


def test_a_module_that_logs_accuracy_and_loss_is_summed_only_until_the_first_validation(tmp_path, monkeypatch):
    """On the digits MLP (logs train/val accuracy and loss): the monitor sums the validation predictions of
    the first validation only, and every record carries the logged values of its epoch."""
    from lightning_debug import grokking_series
    from lightning_debug.demos.digits import DigitsMLP, loaders

    summed = []
    add_sums = grokking_series.StageSums._add_sums

    def counted(self, stage, *args):
        summed.append(stage)
        return add_sums(self, stage, *args)

    monkeypatch.setattr(grokking_series.StageSums, "_add_sums", counted)
    train, val = loaders(batch_size=64, n_train=256)
    monitor, logged = GrokkingMonitor(), []

    class Logged(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            logged.append(float(trainer.callback_metrics["val_acc"]))

    make_trainer(tmp_path, [Logged(), monitor], max_epochs=3).fit(DigitsMLP(hidden=(32,)), train, val)
    assert summed == ["val"], f"only the first validation is summed, got {summed}"
    assert [r["val_acc"] for r in monitor.records] == pytest.approx(logged, abs=0), (monitor.records, logged)


def test_the_weight_norm_gets_a_point_of_its_own_only_where_no_evaluation_came_in_the_last_period():
    """Every 50 steps a norm, unless an evaluation (whose record carries one) came in the last 50: evaluations
    every 38 steps leave no point of its own (no extra logged row); evaluations every 200 leave three per gap."""
    from lightning_debug.grokking_series import Curves

    class Logged:
        def __init__(self):
            self.steps = []

        def log_scalars(self, metrics, step=None):
            self.steps.append(step)

    module = torch.nn.Linear(3, 2)
    for every_eval, want in ((38, [0, 38, 76, 114, 152, 190]), (200, [0, 50, 100, 150, 200])):
        curves, sink = Curves(), Logged()
        for step in range(0, 201):
            if step % 50 == 0:
                curves.sample_norm(step, module, 50)
            if step and step % every_eval == 0:
                curves.record(sink, step, torch.tensor(1.0), {})
        assert [s for s, _ in curves.norms] == want, (every_eval, curves.norms)


def test_arguments_are_validated():
    for kwargs in ({"threshold": 0.0}, {"norm_every_n_steps": 0}, {"stall_factor": 1.0}, {"stall_window": 2}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            GrokkingMonitor(**kwargs)


def test_example_runs_and_says_where_the_dashboard_is(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "grokking.py"
    spec = importlib.util.spec_from_file_location("grokking_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = example.main(["--steps", "100", "--evals-per-decade", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert trainer.global_step == 100
    assert "W&B offline run:" in out and "wandb sync" in out and str(tmp_path) in out, out
    run = read_offline_run(tmp_path)
    steps = [r["trainer/global_step"] for r in run.history if "debug/grokking/val_acc" in r]
    assert steps == [1, 2, 5, 10, 22, 46, 50, 100], steps
    assert "debug/findings/status" in run.summary, "the findings report reached W&B"
    assert "debug/grokking/accuracy_curves" in run.config["_wandb"]["visualize"], "native log-x chart in W&B"
    assert "debug/grokking/curves" not in run.keys(), "W&B has the native charts: no figure drawn"  # noqa: SIM118


def test_wandb_workspace_spec_has_one_section_per_area_and_log_x_grokking_panels():
    pytest.importorskip("wandb_workspaces")
    import json

    from lightning_debug.callbacks.grokking import SERIES
    from lightning_debug.workspace import wandb_workspace

    model = wandb_workspace("team", "proj")._to_model()  # built offline; .save() would need a server
    spec = model.model_dump(by_alias=True, exclude_none=True)
    sections = spec["spec"]["section"]["panelBankConfig"]["sections"]
    names = ["Convergence", "Divergence", "Calibration", "Grokking", "Findings", "Gradients"]
    assert [s["name"] for s in sections] == names
    grokking = [p["config"] for p in sections[3]["panels"] if p["viewType"] == "Run History Line Plot"]
    assert grokking and all(c["xLogScale"] and c["xAxis"] == "trainer/global_step" for c in grokking)
    plotted = {m for c in grokking for m in c["metrics"]}
    assert {f"debug/grokking/{k}" for k in SERIES} <= plotted, plotted
    assert "debug/findings/table" in json.dumps(sections[4])
