"""The shared signals and precision helpers, without a Trainer."""

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_debug.integrations.hf import holds_transformers, is_causal_lm
from lightning_debug.precision import TOLERANCES, float64_on_cpu, module_tolerance, precision_of
from lightning_debug.signals import (
    ChanceLevel,
    check_mode,
    first_dataloader,
    global_step_counter,
    metric_value,
    mode_sign,
    predictions,
    train_key,
    weight_norm,
)


def test_metric_value_prefers_the_epoch_aggregate():
    metrics = {"val_acc": torch.tensor(0.5), "val_acc_epoch": torch.tensor(0.75), "n": 3}
    assert metric_value(metrics, "val_acc") == 0.75 and metric_value(metrics, "n") == 3.0
    assert metric_value(metrics, "missing") is None


def test_train_key_and_mode():
    assert train_key("val_acc") == "train_acc" and train_key("validation/loss") == "train/loss"
    assert train_key("accuracy") is None
    assert mode_sign("max") == 1.0 and mode_sign("min") == -1.0
    with pytest.raises(ValueError, match="`mode`"):
        check_mode("maximum")


def test_chance_level_is_the_majority_class_then_the_first_value():
    chance = ChanceLevel(None)
    chance.observe_outputs({"target": torch.tensor([0, 0, 0, 1])})
    chance.end_epoch(0.4)
    assert chance.level == 0.75
    explicit = ChanceLevel(0.1)
    explicit.end_epoch(0.4)
    assert explicit.level == 0.1
    no_targets = ChanceLevel(None)
    no_targets.end_epoch(0.4)
    assert no_targets.level == 0.4


def test_weight_norm_is_the_global_l2_norm_on_the_device():
    layer = torch.nn.Linear(3, 2)
    expected = torch.cat([p.detach().flatten() for p in layer.parameters()]).norm()
    assert torch.isclose(weight_norm(layer), expected)
    assert math.isnan(float(weight_norm(torch.nn.ReLU())))
    # one norm per parameter, then their norm: the numbers per-parameter `.norm()` calls give, bitwise
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).to(torch.bfloat16)
    norms = torch.stack([p.detach().float().norm() for p in mlp.parameters()])
    assert torch.equal(weight_norm(mlp), torch.linalg.vector_norm(norms)), weight_norm(mlp)


def test_first_dataloader_in_any_collection():
    dl = DataLoader(TensorDataset(torch.zeros(2)))
    for loaders in (dl, [dl], {"a": dl}, [[None, dl]]):
        assert first_dataloader(loaders) is dl
    assert first_dataloader(None) is None and first_dataloader([]) is None


def test_predictions_shift_for_causal_lms():
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    scores, target, fmt = predictions({"logits": logits}, {"labels": labels}, shift=True)
    assert fmt == "logits" and scores.shape == (2, 4, 7) and torch.equal(target, labels[:, 1:])
    assert isinstance(predictions({"loss": 1.0}, None, shift=False), str)


def test_hf_knowledge_without_importing_transformers():
    assert not is_causal_lm(torch.nn.Linear(2, 2)) and not holds_transformers(torch.nn.Linear(2, 2))


def test_tolerance_table_rows():
    assert precision_of(torch.bfloat16, torch.device("cpu")) == "half"
    assert precision_of(torch.float64, torch.device("cpu")) == "float64"
    assert precision_of(torch.float32, torch.device("cpu")) == "float32_cpu"
    assert module_tolerance(torch.nn.Linear(2, 2)) == TOLERANCES["float32_cpu"]
    f64 = torch.nn.Linear(2, 2).double()
    assert module_tolerance(f64) == TOLERANCES["float64"]
    assert module_tolerance(f64, scores_in_float32=True) == TOLERANCES["float32_cpu"]


def test_float64_on_cpu_leaves_the_module_untouched():
    layer = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 3)
    with float64_on_cpu(layer) as convert:
        out = layer(convert(x))
        assert out.dtype == torch.float64
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("manual, accumulate", [(False, 1), (False, 3), (True, 1)])
def test_the_global_step_counter_reads_what_the_trainer_says_at_every_batch(tmp_path, manual, accumulate):
    """The per-step hooks' shortcut to ``trainer.global_step``: the same number at every batch end, under
    gradient accumulation and manual optimisation."""
    from lightning.pytorch.callbacks import Callback

    from models import DigitsMLP, loaders, make_trainer

    class Manual(DigitsMLP):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            optimizer.zero_grad()
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            optimizer.step()
            return loss

    class Compare(Callback):
        def __init__(self) -> None:
            self.pairs: list[tuple[int, int]] = []

        def on_train_start(self, trainer, pl_module) -> None:
            self.counter = global_step_counter(trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.pairs.append((self.counter.completed, trainer.global_step))

    compare = Compare()
    trainer = make_trainer(tmp_path, [compare], max_steps=7, accumulate_grad_batches=accumulate)
    trainer.fit(Manual() if manual else DigitsMLP(), loaders()[0])
    assert len(compare.pairs) == 7 * accumulate and all(a == b for a, b in compare.pairs), compare.pairs


def test_the_global_step_counter_falls_back_to_the_trainers_property():
    """Where Lightning keeps no counter the hooks recognise, ``completed`` is ``trainer.global_step`` itself."""
    from types import SimpleNamespace

    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=object()), lightning_module=None, global_step=3)
    counter = global_step_counter(trainer)
    trainer.global_step = 7
    assert counter.completed == 7
