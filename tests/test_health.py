"""ModelHealthCheck on real digits-sized trainings: each named fault, the right layer, silence when healthy."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_debug import ModelHealthCheck, debug_callbacks
from lightning_debug.callbacks.health import PREFIX

from models import DigitsMLP, digits, loaders, make_trainer

_spec = importlib.util.spec_from_file_location(
    "benchmarks_health_thresholds", Path(__file__).parents[1] / "benchmarks" / "health_thresholds.py"
)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)


def _fit(tmp_path, module, train, callbacks=None, **kwargs):
    cb = ModelHealthCheck(verbose=False)
    trainer = make_trainer(tmp_path, [cb, *(callbacks or [])], limit_val_batches=0, **kwargs)
    trainer.fit(module, train)
    return cb, trainer


def _warnings(cb):
    return {f.check: f for f in cb.findings if f.severity.rank >= 1}


def test_healthy_digits_run_is_silent_at_warning_level_and_samples_every_interval(tmp_path):
    cb, _ = _fit(tmp_path, DigitsMLP(), loaders(batch_size=32)[0], max_steps=120)
    assert not _warnings(cb), [f.message for f in cb.findings]
    assert cb.history["step"][:3] == [0, 10, 20] and len(cb.history["step"]) == 12
    assert cb.layers == ["net.0", "net.2"]


@pytest.mark.parametrize(
    ("setup", "check", "layer"),
    [
        ("dead_init", "init.dead_units", "net.1"),
        ("saturated_init", "init.saturated_units", "net.3"),
        ("logit_scale", "init.loss_off_chance", "net.2"),
        ("not_in_optimizer", "setup.params_not_in_optimizer", None),
        ("unused_params", "setup.optimizer_params_unused", None),
        ("stale_optimizer", "setup.optimizer_params_unused", None),
    ],
)
def test_each_startup_fault_is_named_at_step_zero_with_its_layer(tmp_path, setup, check, layer):
    module, train = bench.SETUPS[setup][0]()
    cb, _ = _fit(tmp_path, module, train, max_steps=1)
    found = _warnings(cb)
    assert check in found, f"{setup}: expected {check}, got {[f.message for f in cb.findings]}"
    f = found[check]
    assert f.step == 0 and f.data["cause"], f
    if layer is not None:
        assert f.data["layer"] == layer, f.data


def test_optimizer_coverage_evidence_the_loss_monitor_can_cite(tmp_path):
    module, train = bench.SETUPS["not_in_optimizer"][0]()
    cb, _ = _fit(tmp_path, module, train, max_steps=1)
    d = _warnings(cb)["setup.params_not_in_optimizer"].data
    assert d["modules"] == ["net.2"] and d["tensors"] == ["net.2.weight", "net.2.bias"] and d["elements"] == 650
    assert (d["grad_tensors"], d["grad_tensors_in_optimizer"]) == (4, 2)
    assert d["cause"] == "the optimizer holds 2 of the 4 tensors that receive gradients"
    module, train = bench.SETUPS["stale_optimizer"][0]()
    cb, _ = _fit(tmp_path, module, train, max_steps=1)
    found = _warnings(cb)
    assert found["setup.params_not_in_optimizer"].data["modules"] == ["net.2"], "the new head is never updated"
    assert found["setup.optimizer_params_unused"].data["elements"] == 650, "the replaced head's tensors are held"


@pytest.mark.parametrize(
    ("setup", "check"),
    [
        ("lr_too_high_sgd", "grad.update_ratio"),
        ("lr_too_low", "grad.update_ratio"),
        pytest.param("exploding_rnn", "grad.exploding", marks=pytest.mark.slow),
        ("vanishing_sigmoid", "grad.vanishing"),
        ("clip_too_low", "grad.clipping_always"),
    ],
)
def test_each_gradient_fault_is_found_within_one_interval(tmp_path, setup, check):
    build, trainer_kwargs, _ = bench.SETUPS[setup]
    module, train = build()
    cb, _ = _fit(tmp_path, module, train, **trainer_kwargs)  # max_steps: one check interval
    found = _warnings(cb)
    assert check in found, f"{setup}: expected {check}, got {[f.message for f in cb.findings]}"
    assert found[check].step <= cb.check_every_n_steps


def test_startup_leaves_no_trace_on_model_optimizer_rng_data_or_logs(tmp_path):
    """Same seed, with and without the check (BatchNorm + dropout + a shuffled loader): identical weights,
    BatchNorm statistics, optimizer state, logged metrics and RNG state after a few steps."""

    def run(with_check: bool):
        pl.seed_everything(0, verbose=False)
        module = DigitsMLP(hidden=(32,), batchnorm=True, dropout=0.2)
        seen = []

        class Record(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, i):
                seen.append(batch[1].clone())

        cbs = [Record()] + (
            [ModelHealthCheck(verbose=False, sample_every_n_steps=1, check_every_n_steps=5)] if with_check else []
        )
        trainer = make_trainer(tmp_path / str(with_check), cbs, max_steps=6, limit_val_batches=0, log_every_n_steps=1)
        trainer.fit(module, loaders(batch_size=16)[0])
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        return module.state_dict(), trainer.optimizers[0].state_dict()["state"], seen, metrics, torch.rand(3)

    a, b = run(False), run(True)
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), f"{k} differs"
    for i in a[1]:
        for k in a[1][i]:
            assert torch.equal(torch.as_tensor(a[1][i][k]), torch.as_tensor(b[1][i][k])), f"optimizer state {i}/{k}"
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2], strict=True)), "the data stream changed"
    assert a[3] == b[3], "logged metrics changed"
    assert torch.equal(a[4], b[4]), "RNG state changed"


def test_state_survives_checkpoint_with_weights_only(tmp_path):
    cb, _ = _fit(tmp_path, DigitsMLP(), loaders(batch_size=32)[0], max_steps=50)
    torch.save(cb.state_dict(), tmp_path / "s.pt")
    restored = ModelHealthCheck()
    restored.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert restored.history == cb.history and restored.startup_done and restored.checked == cb.checked
    trainer2 = make_trainer(tmp_path / "b", [restored], max_steps=60, limit_val_batches=0)
    trainer2.fit(DigitsMLP(), loaders(batch_size=32)[0])
    assert restored.startup_seconds != restored.startup_seconds, "startup does not run again after a resume"


def test_sharded_strategy_gathers_nothing_and_says_why(tmp_path):
    """A real FSDP/DeepSpeed run cannot happen on this CPU-only machine: a strategy class that has the
    FSDP name in its MRO stands in for it (the detection is by class name, as Lightning's are optional)."""

    class FSDPStrategy(SingleDeviceStrategy):
        pass

    cb = ModelHealthCheck(verbose=False)
    trainer = make_trainer(tmp_path, [cb], max_steps=20, limit_val_batches=0, strategy=FSDPStrategy(device="cpu"))
    trainer.fit(DigitsMLP(), loaders(batch_size=32)[0])
    assert [f.check for f in cb.findings] == ["check.skipped"] and "FSDPStrategy" in cb.findings[0].message
    assert not cb.history["step"]


def test_a_run_of_60_steps_still_gets_a_gradient_verdict(tmp_path):
    """The first check interval is sampled every 10 steps, not every 20: a run that ends (or is stopped) at step
    60 has the 5 samples a verdict needs (6 here; at every 20 it would have 3 and no verdict)."""
    build, _, _ = bench.SETUPS["lr_too_high_sgd"]
    module, train = build()
    cb, _ = _fit(tmp_path, module, train, max_steps=60)
    assert cb.history["step"] == [0, 10, 20, 30, 40, 50], cb.history["step"]
    assert "grad.update_ratio" in _warnings(cb), [f.message for f in cb.findings]


def test_wandb_gets_per_layer_series_table_and_heatmap(tmp_path, wandb_logger):
    from wandb_reader import read_offline_run

    # a check every 100 steps: windows end at 50 and 100 (the first interval is sampled twice as often), 200, 300
    cb = ModelHealthCheck(verbose=False, check_every_n_steps=100)
    trainer = make_trainer(tmp_path, [cb], logger=wandb_logger, max_steps=300, max_epochs=10, limit_val_batches=0)
    trainer.fit(DigitsMLP(), loaders(batch_size=32)[0])
    import wandb

    wandb.finish()
    run = read_offline_run(tmp_path)
    keys = set(run.keys())
    for key in ("net.0/norm", "net.2/norm", "net.0/update_ratio", "global_norm"):
        assert PREFIX + key in keys, sorted(k for k in keys if k.startswith(PREFIX))
    assert len([v for v in run.series(PREFIX + "net.0/norm") if v is not None]) == 4, "one point per check"
    assert PREFIX + "table" in keys and PREFIX + "heatmap" in keys


def test_without_wandb_the_heatmap_is_a_png_and_the_table_a_csv(tmp_path):
    _fit(tmp_path, DigitsMLP(), loaders(batch_size=32)[0], max_steps=60)
    out = next(tmp_path.rglob("lightning_debug"))
    assert [p.name for p in out.glob("grad_heatmap*.png")], list(out.iterdir())
    assert (out / "grad_table.csv").read_text().startswith("step,layer,grad_norm,update_ratio")


def test_suite_has_the_health_component_on_by_default():
    assert any(isinstance(cb, ModelHealthCheck) for cb in debug_callbacks())
    assert not any(isinstance(cb, ModelHealthCheck) for cb in debug_callbacks(health=False))


def test_misuse_names_the_argument():
    with pytest.raises(ValueError, match="sample_every_n_steps"):
        ModelHealthCheck(sample_every_n_steps=0)
    with pytest.raises(ValueError, match="check_every_n_steps"):
        ModelHealthCheck(sample_every_n_steps=10, check_every_n_steps=20)


def test_wandb_workspace_has_a_gradients_section():
    pytest.importorskip("wandb_workspaces")
    import json

    from lightning_debug.workspace import wandb_workspace

    spec = wandb_workspace("team", "proj")._to_model().model_dump(by_alias=True, exclude_none=True)
    section = next(s for s in spec["spec"]["section"]["panelBankConfig"]["sections"] if s["name"] == "Gradients")
    text = json.dumps(section)
    for key in ("debug/grad/.*/norm", "debug/grad/.*/update_ratio", "debug/grad/heatmap", "debug/grad/table"):
        assert key in text, key


def test_iterable_dataset_gets_its_first_batch_checked(tmp_path):
    from torch.utils.data import DataLoader, IterableDataset

    train, _ = digits()

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(train)

    cb, _ = _fit(tmp_path, DigitsMLP(), DataLoader(Stream(), batch_size=32), max_steps=2)
    assert not _warnings(cb) and cb.evidence["units"] == {"net.1": cb.evidence["units"]["net.1"]}
    assert abs(cb.evidence["init_gap"]) < 0.25, cb.evidence


def test_heatmap_pixels_colour_each_panel_without_matplotlib():
    import numpy as np

    from lightning_debug.media import heatmap_pixels

    norm = np.log10(np.array([[1e-3, 1e-2, np.nan], [1.0, 1e-1, 1e-2]]))
    pixels = heatmap_pixels({"norm": norm, "ratio": norm - 3}, cell=4, width=30)
    assert pixels.dtype == np.uint8 and pixels.shape == (2 * 2 * 4 + 4, 30, 3), pixels.shape
    assert (pixels[0, 20] == 128).all(), "NaN is grey"
    assert tuple(pixels[4, 0]) == (253, 231, 37) and tuple(pixels[0, 0]) == (68, 1, 84), "each panel spans viridis"


class _ManualTwoLosses(DigitsMLP):
    """Manual optimization with two backward passes per step (as a GAN's): the head trains on the first loss, a
    second head (`aux`) only on the second; optionally an `unused` layer the forward never calls."""

    def __init__(self, unused: bool = False) -> None:
        super().__init__(hidden=(32,))
        self.automatic_optimization = False
        self.aux = torch.nn.Linear(64, 10)
        self.unused = torch.nn.Linear(4, 4) if unused else None

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_main, opt_aux = self.optimizers()
        for opt, head in ((opt_main, self), (opt_aux, self.aux)):
            opt.zero_grad()
            self.manual_backward(torch.nn.functional.cross_entropy(head(x), y))
            opt.step()
            opt.zero_grad()  # gradients gone by the step's end: the evidence is taken at each backward

    def configure_optimizers(self):
        aux = list(self.aux.parameters())
        main = [p for n, p in self.named_parameters() if not n.startswith("aux.")]
        return torch.optim.Adam(main, lr=1e-3), torch.optim.Adam(aux, lr=1e-3)


@pytest.mark.parametrize("unused", [False, True])
def test_manual_optimization_is_checked_over_every_backward_of_the_first_step(tmp_path, unused):
    cb, _ = _fit(tmp_path, _ManualTwoLosses(unused=unused), loaders(batch_size=32)[0], max_steps=4)
    found = _warnings(cb)
    assert not any(f.check == "check.skipped" for f in cb.findings), [f.message for f in cb.findings]
    if unused:
        assert found["setup.optimizer_params_unused"].data["modules"] == ["unused"], found
    else:
        assert not found, [f.message for f in found.values()]


def test_an_accumulated_first_step_is_judged_on_the_loss_training_step_computed(tmp_path):
    """Lightning divides the loss by ``accumulate_grad_batches`` before the backward; the init check must not see
    ln(10)/4 as a loss far below chance."""
    cb, _ = _fit(tmp_path, DigitsMLP(), loaders(batch_size=32)[0], max_steps=2, accumulate_grad_batches=4)
    assert not _warnings(cb), [f.message for f in cb.findings]
    assert abs(cb.evidence["init_gap"]) < 0.25, cb.evidence


def test_the_first_step_is_watched_without_an_extra_forward_and_leaves_no_mode_behind(tmp_path):
    class Counting(DigitsMLP):
        calls = 0

        def training_step(self, batch, batch_idx):
            Counting.calls += 1
            return super().training_step(batch, batch_idx)

    cb, _ = _fit(tmp_path, Counting(), loaders(batch_size=32)[0], max_steps=3)
    assert Counting.calls == 3, "the startup evidence comes from the run's own steps"
    assert cb.startup_done and "units" in cb.evidence and cb.startup_seconds < 1
    assert torch._C._len_torch_function_stack() == 0

    class Failing(DigitsMLP):
        def training_step(self, batch, batch_idx):
            self(batch[0])  # the forward runs under the probe, then the step fails
            raise RuntimeError("the user's bug")

    with pytest.raises(RuntimeError, match="the user's bug"):
        _fit(tmp_path / "failing", Failing(), loaders(batch_size=32)[0], max_steps=3)
    assert torch._C._len_torch_function_stack() == 0, "a failed first step must not leave the probe's mode active"


@pytest.mark.parametrize("update", ["adam_like", "sgd_like"])
def test_a_large_layers_update_ratio_is_estimated_within_a_few_percent(update):
    """Above ``SAMPLED_ABOVE`` entries the update norm comes from a fixed random ``UPDATE_SAMPLE`` of them; the
    ratio must stay within 5% of the exact one (the rules compare orders of magnitude), with the run's RNG
    untouched and smaller tensors exact."""
    from lightning_debug.health_probes import SAMPLED_ABOVE, GradientSampler

    torch.manual_seed(0)
    module = pl.LightningModule()
    module.big = torch.nn.Linear(512, 512)
    module.small = torch.nn.Linear(512, 10)
    assert module.big.weight.numel() > SAMPLED_ABOVE >= module.small.weight.numel()
    for p in module.parameters():
        p.grad = torch.randn_like(p) * (torch.rand_like(p) < 0.3)  # sparse, heavy-tailed: ReLU inputs
    rng = torch.get_rng_state()
    sampler = GradientSampler(module)
    assert torch.equal(torch.get_rng_state(), rng), "the sampler drew from the run's RNG"
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    assert sampler.before_step(0, 0.1)
    with torch.no_grad():
        for p in module.parameters():
            p -= 1e-3 * (p.grad.sign() if update == "adam_like" else p.grad)
    sampler.after_step(torch.tensor(1.0))
    _, _, rows = sampler.pull()
    ratio = dict(zip(sampler.layers, rows[0, len(sampler.layers) + 2 : 2 * len(sampler.layers) + 2], strict=True))
    for layer in ("big", "small"):
        names = [n for n in before if n.startswith(layer + ".")]
        delta = torch.cat([(dict(module.named_parameters())[n].detach() - before[n]).flatten() for n in names])
        weight = torch.cat([before[n].flatten() for n in names])
        exact = float(delta.norm() / weight.norm())
        tolerance = 0.05 if layer == "big" else 1e-5
        assert abs(ratio[layer] / exact - 1) < tolerance, f"{layer}: estimate {ratio[layer]:.4g}, exact {exact:.4g}"


def test_another_checks_isolated_passes_on_the_first_batch_are_not_counted(tmp_path):
    """On a stream the batch-consistency check runs its own single-example passes in the first step's
    ``on_train_batch_start``; with the health check first on the trainer its probe is already watching, and
    must count the run's forward only (one site, not one per extra pass)."""
    from torch.utils.data import DataLoader, IterableDataset

    from lightning_debug import BatchConsistencyCheck

    train, _ = digits()

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(train)

    batch_check = BatchConsistencyCheck(verbose=False)
    cb, _ = _fit(tmp_path, DigitsMLP(), DataLoader(Stream(), batch_size=32), callbacks=[batch_check], max_steps=2)
    assert any(f.check.startswith("batch.") for f in batch_check.findings), "the batch check ran on the first batch"
    assert list(cb.evidence["units"]) == ["net.1"], cb.evidence
    assert not _warnings(cb), [f.message for f in cb.findings]
