"""ErrorAnalysis on real small trainings: planted weak slices, a healthy run, a tiny GPT-2 read back from W&B,
an off-by-one decode visible in the first rows, exports to pandas, reproducible sampling and bounded memory."""

import math

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_debug import debug_callbacks
from lightning_debug.callbacks.errors import ErrorAnalysis
from lightning_debug.demos.lm import TinyGPT2LM, pad_collate
from lightning_debug.demos.sources import SourcedClassifier, sourced_loaders, word_tokenizer
from lightning_debug.rules import errors as rules
from lightning_debug.sinks import write_rows

from models import make_trainer
from wandb_reader import read_offline_run


def _fit_sourced(tmp_path, flip_source=None, truncate=None, epochs=2, **options):
    train, val = sourced_loaders(flip_source=flip_source)
    callback = ErrorAnalysis(budget=None, **options)
    trainer = make_trainer(tmp_path, [callback], max_epochs=epochs)
    trainer.fit(SourcedClassifier(truncate=truncate, tokenizer=word_tokenizer(), lr=1e-2), train, val)
    return callback


def _weak(callback):
    return {f.data["column"] + "=" + f.data["value"] for f in callback.findings if f.check == "eval.weak_slice"}


def test_a_mislabelled_source_and_truncated_long_inputs_are_named(tmp_path):
    callback = _fit_sourced(tmp_path, flip_source="forum", truncate=10, plot_every_n_evaluations=1)
    assert {"source=forum", "input_length=17-32"} <= _weak(callback), [f.message for f in callback.findings]
    samples, slices = (pd.read_parquet(p) for p in callback.last_files[:2])
    weak = slices[slices.weak]
    assert {("source", "forum"), ("input_length", "17-32")} <= set(zip(weak.column, weak.value, strict=True)), slices
    forum = slices[(slices.column == "source") & (slices.value == "forum")].iloc[0]
    assert forum.accuracy < forum.low + 0.2 and forum.rest_accuracy - forum.accuracy > 0.3, forum
    # the rows: metadata columns, words decoded by the module's tokenizer, a forum majority among errors
    assert {"selection", "source", "id", "input", "reference", "prediction", "loss"} <= set(samples.columns)
    errors = samples[samples.selection == "random_error"]
    assert len(errors) == 100 and not errors.correct.any()
    assert errors.input.str.contains("YES|NO").all(), errors.input.head()
    assert (errors.source == "forum").mean() > 0.15, "forum is 15% of the data and far more of the errors"
    assert callback.last_files[2].suffix == ".png", "the slice chart went the figure path without W&B"


def test_a_healthy_run_names_no_weak_slice(tmp_path):
    callback = _fit_sourced(tmp_path)
    assert callback.history[-1]["accuracy"] > 0.85, callback.history
    assert not _weak(callback), [f.message for f in callback.findings]


def test_parquet_and_csv_exports_round_trip_into_pandas(tmp_path, monkeypatch):
    columns = ["selection", "position", "source", "id", "input", "correct", "loss"]
    rows = [["random_error", i, "forum" if i % 2 else "news", f"1-{i}", "w2 YES", False, 0.5 + i] for i in range(5)]
    path = write_rows(tmp_path / "epoch=0", columns, rows)
    frame = pd.read_parquet(path)
    assert path.suffix == ".parquet" and list(frame.columns) == columns
    assert frame.source.tolist() == ["news", "forum", "news", "forum", "news"] and frame.loss.iloc[4] == 4.5
    with monkeypatch.context() as patch:
        patch.setitem(__import__("sys").modules, "pyarrow", None)  # pyarrow not installed
        csv = write_rows(tmp_path / "epoch=1", columns, rows)
    assert csv.suffix == ".csv"
    assert pd.read_csv(csv).equals(frame.astype({"correct": bool})), pd.read_csv(csv)


# -- a tiny GPT-2 on a deterministic language, read back from W&B --------------------------------------------------
WORDS = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 24)}}


def chain_sentences(n, seed):
    """``<s> w_1 .. w_k </s>``: w_1 random, each next word a fixed successor of the previous, k = 3 + w_1 % 5."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        words = [int(torch.randint(2, 24, (1,), generator=g))]
        while len(words) < 3 + words[0] % 5:
            words.append(2 + (words[-1] - 2 + 7) % 22)
        out.append(torch.tensor([0, *words, 1]))
    return out


def chain_loaders(n_train=768, n_val=128):
    collate = pad_collate()

    def masked(items):
        batch = collate(items)
        batch["labels"][:, 1] = -100  # the first word is a free choice: not scored
        return batch

    return (
        DataLoader(chain_sentences(n_train, 0), batch_size=32, shuffle=True, collate_fn=masked),
        DataLoader(chain_sentences(n_val, 1), batch_size=64, collate_fn=masked),
    )


class ChainLM(TinyGPT2LM):
    """``decode=None``: validation_step returns nothing (zero-config: the callback captures the HF output's
    logits and shifts them); ``"argmax"``: it returns its own decoded ``preds``; ``"off_by_one"``: the same
    decode with a post-processing bug that drops the first predicted token."""

    def __init__(self):
        super().__init__(lr=1e-2)
        self.tokenizer = word_tokenizer(WORDS, pad_token="</s>", bos_token="<s>", eos_token="</s>")
        self.decode = None

    def validation_step(self, batch, batch_idx):
        out = self.model(**batch)
        self.log("val_loss", out.loss)
        if self.decode is None:
            return None
        logits, target = out.logits[:, :-1], batch["labels"][:, 1:]
        preds = logits.argmax(-1)
        if self.decode == "off_by_one":
            preds = torch.cat([preds[:, 1:], preds[:, -1:]], 1)
        return {"logits": logits, "target": target, "preds": preds}


def _frame(table):
    return pd.DataFrame(table["data"], columns=table["columns"])


def test_gpt2_rows_reach_wandb_decoded_and_an_off_by_one_decode_shows_in_the_first_rows(tmp_path, wandb_logger):
    callback = ErrorAnalysis(budget=None, plot_every_n_evaluations=1)
    train, val = chain_loaders()
    trainer = make_trainer(tmp_path, [callback], logger=wandb_logger, max_epochs=4, check_val_every_n_epoch=4)
    module = ChainLM()
    trainer.fit(module, train, val)  # zero-config: one evaluation, at the end
    for decode in ("argmax", "off_by_one"):
        module.decode = decode
        trainer.validate(module, val, verbose=False)
    import wandb

    wandb.finish()
    run = read_offline_run(tmp_path)
    zero_config, healthy, buggy = (_frame(run.table("debug/errors/samples", i)) for i in range(3))
    # decoded input, reference and prediction text, special tokens stripped
    assert {"input", "reference", "prediction", "token_accuracy", "first_difference"} <= set(zero_config.columns)
    assert zero_config.input.str.match(r"^w\d+( w\d+)+$").all(), zero_config.input.head()
    assert zero_config.reference.str.match(r"^w\d+( w\d+)*$").all(), zero_config.reference.head()
    slices = _frame(run.table("debug/errors/slices", 0))
    assert {"input_length", "target_frequency"} <= set(slices.column), slices
    first = callback.history[0]
    assert first["accuracy"] > 0.8 and first["sequence_accuracy"] <= first["accuracy"], first
    logged = run.keys()
    assert any(k.startswith("debug/slices/input_length/") for k in logged), sorted(logged)
    assert "debug/errors/slice_accuracy" in run.config["_wandb"]["visualize"], "the bar chart"
    bars = _frame(run.table("debug/errors/slice_accuracy_table", 0))
    assert bars.slice.str.startswith("input_length=").any(), bars
    # the off-by-one decode: every one of the first rows differs at the first word, shifted by one
    top = buggy.head(10)
    assert (top.first_difference == 0).all(), top[["reference", "prediction", "first_difference"]]
    row = top.iloc[0]
    assert row.prediction.split()[:2] == row.reference.split()[1:3], (row.reference, row.prediction)
    assert (healthy.first_difference == 0).mean() < 0.3, healthy[["reference", "prediction", "first_difference"]]


# -- sampling: reproducible, bounded -----------------------------------------------------------------------------------
def _sampled(callback, trainer, module, val):
    trainer.validate(module, val, verbose=False)
    frame = pd.read_parquet(callback.last_files[0])
    return frame[frame.selection == "random_error"].position.tolist()


def test_the_sample_is_reproducible_after_loading_the_state(tmp_path):
    _, val = sourced_loaders(n_val=1000)
    module = SourcedClassifier()  # untrained: ~500 errors, 100 sampled
    first = ErrorAnalysis()
    trainer = make_trainer(tmp_path, [first])
    a0 = _sampled(first, trainer, module, val)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    a1 = _sampled(first, trainer, module, val)
    resumed = ErrorAnalysis()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    b1 = _sampled(resumed, make_trainer(tmp_path / "b", [resumed]), module, val)
    assert len(a0) == 100 and a1 == b1, "the same evaluation index draws the same sample"
    assert a0 != a1, "each evaluation draws a new sample"


def test_memory_is_bounded_by_the_sample_not_the_dataset(tmp_path, monkeypatch):
    shapes = []
    merge = rules.merge_selections

    def recording(*args):
        out = merge(*args)
        shapes.append((tuple(out[0].shape), tuple(out[1].shape)))
        return out

    monkeypatch.setattr(rules, "merge_selections", recording)
    module = SourcedClassifier()
    for n in (400, 4000):
        callback = ErrorAnalysis()
        _, val = sourced_loaders(n_val=n)
        shapes.clear()
        make_trainer(tmp_path, [callback]).validate(module, val, verbose=False)
        assert len(set(shapes)) == 1, shapes
        kept = shapes[0]
        assert kept[0][0] == 130 and kept[1][0] == 130, f"{n} examples: kept {kept}"


def test_the_default_budget_skips_evaluations_it_cannot_afford(tmp_path):
    callback = ErrorAnalysis()
    train, val = sourced_loaders(n_train=320, n_val=200)
    make_trainer(tmp_path, [callback], max_epochs=3).fit(SourcedClassifier(), train, val)
    c = callback.cost
    assert c["evaluations"] == 3 and c["analysed"] == 0, c  # 3 x ~20 ms of validation: 2% is ~1 ms
    assert c["seconds"] < 0.02 * c["validation_seconds"], c


def test_it_is_in_the_default_suite_and_rejects_bad_arguments():
    assert any(isinstance(cb, ErrorAnalysis) for cb in debug_callbacks("val_acc"))
    assert not any(isinstance(cb, ErrorAnalysis) for cb in debug_callbacks("val_acc", errors=False))
    with pytest.raises(ValueError, match="sample_size"):
        ErrorAnalysis(sample_size=0)
    with pytest.raises(ValueError, match="budget"):
        ErrorAnalysis(budget=2.0)
    assert math.isclose(ErrorAnalysis().budget, 0.02)


def test_digits_zero_config_rows_summarise_feature_inputs_and_slice_by_label(tmp_path):
    from models import DigitsMLP, loaders

    _, val = loaders()
    callback = ErrorAnalysis()
    make_trainer(tmp_path, [callback]).validate(DigitsMLP(), val, verbose=False)  # untrained: ~90% errors
    samples, slices = (pd.read_parquet(p) for p in callback.last_files[:2])
    assert (samples.input == "float32 [64]").all() and set(samples.reference) <= {str(d) for d in range(10)}
    assert set(slices.column) == {"label"} and slices["count"].sum() == 400, slices
    assert "first_difference" not in samples.columns, "classification rows have no token columns"


@pytest.mark.slow
def test_the_example_names_both_planted_weaknesses_and_renders_the_figure(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "error_analysis.py"
    spec = importlib.util.spec_from_file_location("example_error_analysis", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    trainer = module.main(["--out", str(tmp_path), "--figure", str(tmp_path / "tables.png")])
    found = {
        f.data["column"] + "=" + f.data["value"]
        for cb in trainer.callbacks
        if isinstance(cb, ErrorAnalysis)
        for f in cb.findings
        if f.check == "eval.weak_slice"
    }
    assert {"source=forum", "input_length=17-32"} <= found, found
    assert (tmp_path / "tables.png").stat().st_size > 10_000


def test_the_token_counting_hook_switches_itself_off_for_classification(tmp_path):
    from models import DigitsMLP, loaders

    callback = ErrorAnalysis()
    make_trainer(tmp_path, [callback], max_steps=3).fit(DigitsMLP(), loaders()[0])
    assert callback.on_train_batch_end is None and callback.token_counts is None, "Lightning no longer calls it"


# -- DDP: every rank's shard merged into what one process collects ---------------------------------------------------
def _collect(batch, scores, rank=0):
    from lightning_debug.error_collection import Collection

    run = Collection((20, 10, 10, 10), 16, 64, -100, 0, 0, None, rank)
    run.add((scores, batch["labels"], "logits", None), batch, None, 0)
    return run


def _shard(batch, scores, rank, world):
    part = {k: v[rank::world] for k, v in batch.items()}
    return part, scores[rank::world]


def test_merging_two_ranks_shards_equals_one_process():
    from lightning_debug import error_tables as tables
    from lightning_debug.error_ranks import LAYOUT, merge

    g = torch.Generator().manual_seed(0)
    n = 96
    lengths = torch.randint(1, 12, (n,), generator=g)
    mask = torch.arange(12)[None, :] < lengths[:, None]
    sources = ["news", "forum", "wiki"]
    batch = {
        "input_ids": torch.randint(1, 30, (n, 12), generator=g) * mask,
        "attention_mask": mask.long(),
        "labels": torch.randint(0, 3, (n,), generator=g),
        "source": [sources[(i * 7 + i // 5) % 3] for i in range(n)],  # the ranks meet them in other orders
    }
    scores = torch.randn(n, 3, generator=g)
    full = _collect(batch, scores)
    expected = full.pull()
    shards = [_collect(*_shard(batch, scores, r, 2), rank=r) for r in (0, 1)]
    assert shards[0].codes["source"] != shards[1].codes["source"], "the test needs different code orders"
    parts = [(s.pull(), {k: getattr(s, k) for k in LAYOUT}) for s in shards]
    merged_run = _collect(*_shard(batch, scores, 1, 2), rank=1)  # rank 1's own collection, merged in place
    merged = merge(merged_run, parts)

    def counts(run, pulled):
        return {(c.column, c.value): (c.units, c.correct, round(c.loss_sum, 9)) for c in
                tables.slice_counts(run, pulled.slices, pulled.frequency)}  # fmt: skip

    assert counts(merged_run, merged) == counts(full, expected)

    def positions(run, pulled, selection):
        rows = tables.sample_rows(run, pulled.keys, pulled.rows, None)
        return sorted((r[1], r[2]) for r in rows if r[0] == selection)  # (position, source)

    assert positions(merged_run, merged, "highest_loss") == positions(full, expected, "highest_loss")
    assert positions(merged_run, merged, "confident_error") == positions(full, expected, "confident_error")
    errors = positions(merged_run, merged, "random_error")
    assert len(errors) == 20 and all(batch["source"][p] == s for p, s in errors), "positions map to the dataset"
