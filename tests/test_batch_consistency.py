"""BatchConsistencyCheck on real small models: healthy ones pass, each batching bug is caught by name.

Properties and tolerances: a healthy model's batched loss equals an aggregation of its single-example losses
within ``rtol·|loss_i| + atol·n_i`` (rtol 1e-5 in float32 on CPU) and its BxB dependency matrix is exactly
diagonal; a bug moves the loss by >1e-4 relative and leaks >1e-2 of the self-gradient, in float64 too.
"""

from __future__ import annotations

import itertools
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_debug.callbacks.batch_consistency import BatchConsistencyCheck
from lightning_debug.demos.text import AttentionPoolingClassifier, MarkerDataset, pad_collate, text_loaders

from models import DigitsMLP, loaders, make_trainer, run_two_rank_script

B = 4  # the check's default batch_size


def run_check(model: pl.LightningModule, train: DataLoader, tmp_path: Any, **kwargs: Any) -> BatchConsistencyCheck:
    check = BatchConsistencyCheck(strict=True, **kwargs)
    trainer = make_trainer(tmp_path, [check], max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(model, train)
    return check


def only(check: BatchConsistencyCheck, check_id: str) -> dict[str, Any]:
    found = [f for f in check.findings if f.check == check_id]
    assert found, f"expected {check_id}, got {[(f.check, f.message) for f in check.findings]}"
    return found[0].data


def checks(check: BatchConsistencyCheck) -> set[str]:
    return {f.check for f in check.findings}


def test_healthy_attention_pooling_over_padded_batches_passes(tmp_path):
    check = run_check(AttentionPoolingClassifier(), text_loaders()[0], tmp_path)
    assert checks(check) == {"batch.ok"}, [f.message for f in check.findings]
    data = only(check, "batch.ok")
    assert data["loss"]["aggregation"] == "mean"
    assert data["loss"]["difference"] <= data["loss"]["tolerance"], data["loss"]
    assert data["max_padding"] >= 10, "the sampled batch must exercise padding"
    assert data["dependence"]["max_off_diagonal"] == 0.0  # structural zeros, not rounding
    # batch + B singles + the padding probe (shortest next to longest), and one batched VJP
    assert data["cost"]["forward_passes"] == B + 2 and data["cost"]["batched_vjps"] == 1
    assert data["loss"]["padding_probe"]["padding"] == data["max_padding"]
    assert data["cost"]["float64_forward_passes"] == 0
    assert data["dependence"]["method"] == "batched_vjp"


def test_mask_ignoring_pooling_is_a_padding_bug(tmp_path):
    check = run_check(AttentionPoolingClassifier(bug="mask_ignored"), text_loaders()[0], tmp_path)
    assert checks(check) & {"batch.loss_mismatch", "batch.padding_dependence"}, [f.message for f in check.findings]
    assert "batch.cross_sample_dependence" not in checks(check)
    data = only(check, "batch.padding_dependence")
    worst = data["loss"]["worst_examples"]
    assert worst[0]["padding"] > 0 and abs(worst[0]["delta"]) > 1e-3, worst
    # unpadded examples match alone and in a batch, also in float64
    assert all(r["ratio"] <= 1 for r in worst if r["padding"] == 0)
    assert data["loss"]["difference_float64"] > data["loss"]["tolerance"]


def test_batch_dim_softmax_is_cross_sample_dependence(tmp_path):
    check = run_check(AttentionPoolingClassifier(bug="batch_softmax"), text_loaders()[0], tmp_path)
    data = only(check, "batch.cross_sample_dependence")["dependence"]
    assert data["n_pairs"] == B * (B - 1), data["n_pairs"]  # the softmax over the batch couples every pair
    assert min(p["relative_float64"] for p in data["pairs"]) > 1e-3


class SeqFirstGRU(pl.LightningModule):
    """The classic layout bug: (B, T, D) fed to a ``batch_first=False`` GRU, which reads dim 0 as time.

    Output row i then depends on input rows 0..i: row 0 depends on itself only (where Bolts looks), rows
    1..B-1 leak.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(64, 16)  # batch_first=False
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x.view(x.shape[0], 4, 16).repeat(1, 1, 4))
        return self.head(out[:, -1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters())


def test_cross_sample_dependence_is_caught_beyond_row_zero(tmp_path):
    check = run_check(SeqFirstGRU(), loaders()[0], tmp_path)
    data = only(check, "batch.cross_sample_dependence")["dependence"]
    matrix = torch.tensor(data["matrix_float64"])
    # row 0 is clean: a row-0-only check (Lightning Bolts) passes this model
    assert matrix[0].abs().max() == 0.0, matrix[0]
    assert 0 not in data["rows_affected"]
    assert data["rows_affected"] == list(range(1, B)), data["rows_affected"]
    # row i depends on inputs 0..i: strictly lower-triangular leaks, upper triangle exactly zero
    assert torch.triu(matrix, 1).abs().max() == 0.0
    assert int((torch.tril(matrix, -1) > 0).sum()) == B * (B - 1) // 2
    assert matrix.diagonal(-1).min() > 1e-2  # the previous example leaks most (GRU memory fades)


def test_batchnorm_mlp_passes_with_its_batchnorm_named(tmp_path):
    check = run_check(DigitsMLP(batchnorm=True), loaders()[0], tmp_path)
    assert checks(check) == {"batch.ok"}, [f.message for f in check.findings]
    data = only(check, "batch.ok")
    assert data["batch_stat_layers_in_eval"] == ["net.1"]
    assert data["loss"]["aggregation"] == "mean"


class NoRunningStatsMLP(DigitsMLP):
    """BatchNorm without running statistics: it normalises with batch statistics even in eval mode."""

    def __init__(self) -> None:
        super().__init__(hidden=(32,))
        self.net.insert(0, nn.BatchNorm1d(64, track_running_stats=False))


def test_batchnorm_without_running_stats_is_a_real_leak(tmp_path):
    check = run_check(NoRunningStatsMLP(), loaders()[0], tmp_path)
    data = only(check, "batch.cross_sample_dependence")
    assert data["dependence"]["batch_stat_layers_mixing_in_eval"] == ["net.0"]
    message = next(f.message for f in check.findings if f.check == "batch.cross_sample_dependence")
    assert "track_running_stats=False" in message
    # a batch of one cannot go through it at all: the loss part says so instead of guessing
    skipped = [f.message for f in check.findings if f.check == "check.skipped"]
    assert any("loss decomposition skipped" in m for m in skipped), skipped


class TinyGPT2(pl.LightningModule):
    """A random-weight GPT-2 built from a config (no download); its loss is HF's token mean."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2)
        self.model = GPT2LMHeadModel(config)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def lm_collate(items: list[torch.Tensor]) -> Any:
    """Right padding, labels -100 on pads, returned as a Hugging Face ``BatchEncoding``."""
    from transformers import BatchEncoding

    length = max(len(x) for x in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, x in enumerate(items):
        ids[row, : len(x)] = x
        mask[row, : len(x)] = 1
    return BatchEncoding({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})


def test_tiny_gpt2_passes_with_token_weighted_mean(tmp_path):
    g = torch.Generator().manual_seed(0)
    lengths = [3, 39, *torch.randint(3, 40, (62,), generator=g).tolist()]
    data = [torch.randint(1, 64, (n,), generator=g) for n in lengths]
    check = run_check(TinyGPT2(), DataLoader(data, batch_size=8, collate_fn=lm_collate), tmp_path)
    assert checks(check) == {"batch.ok"}, [f.message for f in check.findings]
    result = only(check, "batch.ok")
    # HF's causal-LM loss: sum over shifted targets / their count (not a mean of per-example means)
    assert result["loss"]["aggregation"] == "token_mean:labels_shifted", result["loss"]
    assert result["loss"]["candidates"]["mean"] > 10 * result["loss"]["tolerance"]
    assert result["dependence"]["max_off_diagonal"] == 0.0


def left_pad_collate(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The classic bug: left padding without position ids, so a sequence's positions shift with its padding."""
    batch = lm_collate([x.flip(0) for x in items])
    return {k: v.flip(1) for k, v in batch.items()}


def test_tiny_gpt2_left_padding_without_position_ids_is_a_padding_bug(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(1, 64, (int(n),), generator=g) for n in torch.randint(3, 40, (64,), generator=g)]
    check = run_check(TinyGPT2(), DataLoader(data, batch_size=8, collate_fn=left_pad_collate), tmp_path)
    loss = only(check, "batch.padding_dependence")["loss"]
    worst = loss["worst_examples"][0]
    assert worst["padding"] > 0 and abs(worst["delta"]) > 1e-2, worst  # a bug stays O(0.01-0.1) in float64
    assert "batch.cross_sample_dependence" not in checks(check)


def _state(model: pl.LightningModule, trainer: pl.Trainer) -> dict[str, Any]:
    opt = trainer.optimizers[0].state_dict()
    return {
        "params": {k: v.clone() for k, v in model.state_dict().items()},
        "opt": {k: {n: t.clone() for n, t in s.items()} for k, s in opt["state"].items()},
        "rng": torch.get_rng_state(),
        "metrics": {k: float(v) for k, v in trainer.logged_metrics.items()},
    }


def test_model_optimizer_rng_and_metrics_are_bitwise_unchanged(tmp_path):
    runs = []
    for with_check in (False, True):
        pl.seed_everything(0, verbose=False)
        model = AttentionPoolingClassifier()
        train, _ = text_loaders(n_train=256)
        check = BatchConsistencyCheck(strict=True)
        trainer = make_trainer(tmp_path / str(with_check), [check] if with_check else [], max_epochs=1)
        trainer.fit(model, train)
        if with_check:
            assert checks(check) == {"batch.ok"}
        runs.append((_state(model, trainer), (tmp_path / str(with_check)).rglob("metrics.csv")))
    (a, csv_a), (b, csv_b) = runs
    for key in a["params"]:
        assert torch.equal(a["params"][key], b["params"][key]), key
    for k in a["opt"]:
        for n in a["opt"][k]:
            assert torch.equal(a["opt"][k][n], b["opt"][k][n]), (k, n)
    assert torch.equal(a["rng"], b["rng"])
    assert a["metrics"] == b["metrics"]
    assert next(csv_a).read_text() == next(csv_b).read_text()


def test_float64_rerun_leaves_parameters_and_their_grad_accumulators_alone(tmp_path):
    # DDP hooks the parameters' gradient accumulators; a dtype swap through `param.data` would reset them
    # (rank 0 then skips the all-reduce and the other ranks hang), so the float64 re-run must not do that.
    model = AttentionPoolingClassifier(bug="mask_ignored")
    params = {name: (p, p.data, p.view_as(p).grad_fn.next_functions[0][0]) for name, p in model.named_parameters()}
    check = run_check(model, text_loaders()[0], tmp_path)
    assert only(check, "batch.padding_dependence")["cost"]["float64_forward_passes"] > 0
    for name, (p, data, accumulator) in params.items():
        assert p.dtype == torch.float32 and p.data.data_ptr() == data.data_ptr(), name
        assert p.view_as(p).grad_fn.next_functions[0][0] is accumulator, name


def test_bf16_mixed_precision_gives_no_false_finding(tmp_path):
    check = BatchConsistencyCheck(strict=True)
    trainer = make_trainer(
        tmp_path, [check], max_epochs=1, limit_train_batches=1, limit_val_batches=0, precision="bf16-mixed"
    )
    trainer.fit(AttentionPoolingClassifier(), text_loaders()[0])
    assert checks(check) == {"batch.ok"}, [f.message for f in check.findings]
    data = only(check, "batch.ok")
    assert data["precision"] == "bf16-mixed" and data["autocast"].startswith("disabled")


def test_float_noise_beyond_a_too_tight_tolerance_is_cleared_in_float64(tmp_path):
    # rtol=1e-12 is far below float32 rounding: the float32 check fails, the float64 re-run clears it
    check = run_check(AttentionPoolingClassifier(), text_loaders()[0], tmp_path, rtol=1e-12, atol=0.0)
    assert checks(check) == {"batch.ok"}, [f.message for f in check.findings]
    loss = only(check, "batch.ok")["loss"]
    assert loss["difference"] > loss["tolerance"] > loss["difference_float64"], loss
    assert "float noise" in loss["note"]
    # float64: batch + B singles, then every example next to the longest
    assert only(check, "batch.ok")["cost"]["float64_forward_passes"] == 2 * B + 1


def test_coupled_loss_skips_the_decomposition_but_checks_outputs(tmp_path):
    check = run_check(AttentionPoolingClassifier(bug="batch_softmax"), text_loaders()[0], tmp_path, coupled_loss=True)
    assert checks(check) == {"check.skipped", "batch.cross_sample_dependence"}


def test_single_example_dataset_is_skipped(tmp_path):
    train = DataLoader(MarkerDataset(1), batch_size=4, collate_fn=pad_collate)
    check = run_check(AttentionPoolingClassifier(), train, tmp_path)
    assert checks(check) == {"check.skipped"}
    assert "batch of 1" in check.findings[0].message


class Prebatched(IterableDataset):
    """Yields whole padded batches (the loader has batch_size=None): nothing to re-collate per example."""

    def __iter__(self) -> Any:
        items = MarkerDataset(64).items
        for i in range(0, len(items), 8):
            yield pad_collate(items[i : i + 8])


def unpad_split(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    singles = []
    for i in range(len(batch["labels"])):
        n = int(batch["attention_mask"][i].sum())
        singles.append({k: v[i : i + 1, :n] if v.ndim > 1 else v[i : i + 1] for k, v in batch.items()})
    return singles


def test_prebatched_stream_is_checked_on_its_first_real_batch(tmp_path):
    """A stream of ready-made batches is never iterated by the check (issue 16): its first real batch is cut
    into rows (which keep their padding) or, with ``split_fn``, into unpadded examples."""
    train = DataLoader(Prebatched(), batch_size=None)
    rows = run_check(AttentionPoolingClassifier(), train, tmp_path / "a")
    assert checks(rows) == {"batch.ok"}, [f.message for f in rows.findings]
    split = run_check(AttentionPoolingClassifier(bug="mask_ignored"), train, tmp_path / "b", split_fn=unpad_split)
    # no items to re-collate: the mismatch is reported without the per-example padding breakdown
    assert "batch.loss_mismatch" in checks(split), [f.message for f in split.findings]


def test_iterable_dataset_with_a_collate_is_checked(tmp_path):
    class Stream(IterableDataset):
        def __iter__(self) -> Any:
            return itertools.islice(iter(MarkerDataset(64)), 64)

    check = run_check(
        AttentionPoolingClassifier(), DataLoader(Stream(), batch_size=8, collate_fn=pad_collate), tmp_path
    )
    assert checks(check) == {"batch.ok"}


def test_forward_fn_selects_the_outputs(tmp_path):
    def pooled_only(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module.token(module.embed(batch["input_ids"]))  # per-token features: no pooling bug here

    check = run_check(
        AttentionPoolingClassifier(bug="batch_softmax"), text_loaders()[0], tmp_path, forward_fn=pooled_only
    )
    assert "batch.cross_sample_dependence" not in checks(check)
    assert "batch.loss_mismatch" in checks(check)


def test_tuple_batches_with_float_inputs(tmp_path):
    x, y = torch.randn(40, 64), torch.randint(0, 10, (40,))
    check = run_check(DigitsMLP(), DataLoader(TensorDataset(x, y), batch_size=8), tmp_path, batch_size=5)
    assert checks(check) == {"batch.ok"}
    assert only(check, "batch.ok")["batch_size"] == 5


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 1}, {"rtol": 0.0}, {"atol": -1.0}, {"dependence_rtol": 1.0}, {"split_fn": 3}, {"forward_fn": "x"}],
)
def test_invalid_arguments_name_the_argument(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        BatchConsistencyCheck(**kwargs)


def test_state_survives_a_checkpoint_and_the_check_runs_once(tmp_path):
    check = run_check(AttentionPoolingClassifier(), text_loaders()[0], tmp_path)
    state = check.state_dict()
    torch.save(state, tmp_path / "s.pt")
    restored = BatchConsistencyCheck()
    restored.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert restored.done and [f.check for f in restored.findings] == ["batch.ok"]


DDP_SCRIPT = """
import json, sys
import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning_debug.callbacks.batch_consistency import BatchConsistencyCheck
from lightning_debug.demos.text import AttentionPoolingClassifier, text_loaders

out = sys.argv[1]
torch.set_num_threads(1)
pl.seed_everything(0, verbose=False)
check = BatchConsistencyCheck()
trainer = pl.Trainer(
    callbacks=[check], accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=4,
    limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    logger=CSVLogger(out), default_root_dir=out,
)
trainer.fit(AttentionPoolingClassifier(bug="batch_softmax"), text_loaders(n_train=256)[0])
with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
    json.dump({"step": trainer.global_step, "checks": [x.check for x in check.findings]}, f)
"""


@pytest.mark.ddp
def test_ddp_runs_on_local_rank_zero_only_and_does_not_hang(tmp_path):
    script = tmp_path / "ddp_batch_consistency.py"
    script.write_text(DDP_SCRIPT)
    _, (r0, r1) = run_two_rank_script(script, tmp_path, timeout=300)
    assert r0["step"] == r1["step"] == 4
    assert "batch.cross_sample_dependence" in r0["checks"] and r1["checks"] == []


def masking_collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Random token masking at collate time (MLM style): two collations of the same items differ."""
    batch = pad_collate(items)
    noise = (torch.rand(batch["input_ids"].shape) < 0.15) & batch["attention_mask"].bool()
    batch["input_ids"] = batch["input_ids"].masked_fill(noise, 2)
    return batch


def test_random_collate_is_skipped_unless_split_fn_cuts_the_batch(tmp_path):
    train = DataLoader(MarkerDataset(64), batch_size=8, collate_fn=masking_collate)
    skipped = run_check(AttentionPoolingClassifier(), train, tmp_path / "a")
    assert checks(skipped) == {"check.skipped"} and "random" in skipped.findings[0].message
    split = run_check(AttentionPoolingClassifier(), train, tmp_path / "b", split_fn=unpad_split)
    assert checks(split) == {"batch.ok"}, [f.message for f in split.findings]


def test_a_user_transfer_hook_is_applied_to_the_batch_and_every_single(tmp_path):
    """Without overridden transfer hooks the check moves batches itself (cheaper); with one, the user's hook runs
    on the batch and each example alone, as the training loop would run it."""

    class Transferring(DigitsMLP):
        transfers = 0

        def on_after_batch_transfer(self, batch, dataloader_idx):
            self.transfers += 1
            return batch

    module = Transferring()
    check = run_check(module, loaders()[0], tmp_path)
    assert checks(check) == {"batch.ok"}, [f.message for f in check.findings]
    assert module.transfers == (B + 1) + 1, f"{module.transfers} transfers: the batch, B singles, 1 training step"


class UnshiftedGPT2(TinyGPT2):
    """The classic causal-LM bug: the logits at position t are scored against the token at t, which they read."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())


@pytest.mark.parametrize("collate", [lm_collate, left_pad_collate])
def test_causal_lm_scored_on_the_token_it_reads_is_caught(tmp_path, collate):
    """Property: with shifted labels the loss has an exactly-zero gradient at the last position's input
    embedding (the healthy GPT-2 above passes with nothing but ``batch.ok``); unshifted, that gradient is of the
    order of the other positions' (ratio > 0.1; measured 0.7-1.6 on tiny GPT-2s)."""
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(1, 64, (int(n),), generator=g) for n in torch.randint(3, 40, (64,), generator=g)]
    check = run_check(UnshiftedGPT2(), DataLoader(data, batch_size=8, collate_fn=collate), tmp_path)
    found = only(check, "batch.target_visible")
    assert found["ratio"] > 0.1, found
