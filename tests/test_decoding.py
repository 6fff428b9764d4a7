"""DecodingConsistencyCheck on real tiny models: HF GPT-2 and BART from configs, and a hand-written decoder.

Properties: healthy decoders (HF greedy/beam, decoder-only and encoder-decoder, a correct Python-loop
decoder) give `decode.ok` within the fp32 CPU tolerance (rtol 1e-5, 1e-6/token); an off-by-one in the
accumulated score gives `decode.score_mismatch` that survives the float64 re-check; float noise above an
absurdly tight tolerance vanishes in float64 and is not reported; a broken beam search gives one aggregate
`decode.beam_not_monotonic`; and the check leaves model, optimizer, RNG and logged metrics bitwise unchanged.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_debug.callbacks.decoding import DecodingConsistencyCheck
from lightning_debug.demos.lm import (
    GreedyGPT2LM,
    TinyGPT2LM,
    TinySeq2Seq,
    lm_loaders,
    reverse_loaders,
)

from models import DigitsMLP, loaders, make_trainer, run_two_rank_script


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """Tiny models: one intra-op thread is as fast alone and far faster on a shared, oversubscribed CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pretrain(module: pl.LightningModule, train: Any, steps: int) -> dict[str, torch.Tensor]:
    """A short plain training loop, so decoders emit varied tokens and EOS (random GPT-2s repeat a token)."""
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    batches = iter(train)
    for _ in range(steps):
        loss = module.model(**next(batches)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def gpt2_state() -> dict[str, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    return _pretrain(TinyGPT2LM(), lm_loaders(n_train=2048)[0], steps=60)


@pytest.fixture(scope="module")
def seq2seq_state() -> dict[str, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    return _pretrain(TinySeq2Seq(), reverse_loaders(n_train=2048)[0], steps=60)


@pytest.mark.parametrize("kind", ["gpt2", "seq2seq"])
def test_demo_models_learn(
    kind: str, gpt2_state: dict[str, torch.Tensor], seq2seq_state: dict[str, torch.Tensor]
) -> None:
    """60 AdamW steps (a few seconds on CPU) cut the validation loss below its value at initialisation.

    Measured: GPT-2 on the Markov language 3.2 -> 1.5; BART on reversal (harder) 3.2 -> 2.7.
    """
    make, state, val = (
        (TinyGPT2LM, gpt2_state, lm_loaders(n_train=32)[1])
        if kind == "gpt2"
        else (TinySeq2Seq, seq2seq_state, reverse_loaders(n_train=32)[1])
    )
    batch = next(iter(val))
    fresh, trained = make(), make()
    trained.load_state_dict(state)
    with torch.no_grad():
        before, after = (float(m.eval().model(**batch).loss) for m in (fresh, trained))
    assert after < (0.7 if kind == "gpt2" else 0.9) * before, (
        f"{kind}: validation loss {before:.3f} at init, {after:.3f} after 60 steps"
    )


def _fit(
    tmp_path: Any, module: pl.LightningModule, data: tuple[Any, Any], **cb_kwargs: Any
) -> DecodingConsistencyCheck:
    cb = DecodingConsistencyCheck(strict=True, **cb_kwargs)
    make_trainer(tmp_path, [cb], max_steps=1, limit_val_batches=1).fit(module, *data)
    return cb


def _only(cb: DecodingConsistencyCheck, check: str) -> dict[str, Any]:
    checks = [(f.check, f.message) for f in cb.findings]
    assert [c for c, _ in checks] == [check], f"expected only {check}, got {checks}"
    return cb.findings[0].data


def _assert_healthy(data: dict[str, Any]) -> None:
    tol = data["rtol"]
    assert data["max_rel_diff"] <= tol, f"max relative |decoder - model| {data['max_rel_diff']:.3g} > rtol {tol}"
    assert data["cost"]["generate_calls"] >= 1 and data["cost"]["forward_calls"] >= 1, data["cost"]
    assert data["cost"]["seconds"] > 0


def test_tiny_gpt2_passes_with_beam_statistics(tmp_path: Any, gpt2_state: dict[str, torch.Tensor]) -> None:
    module = TinyGPT2LM()
    module.load_state_dict(gpt2_state)
    data = _only(_fit(tmp_path, module, lm_loaders(n_train=256)), "decode.ok")
    _assert_healthy(data)
    assert data["path"] == "huggingface" and data["attribute"] == "model"
    assert data["beam_sizes"] == [1, 4] and data["examples"] == 8
    assert data["cost"] == {**data["cost"], "generate_calls": 2, "forward_calls": 2}
    beam = data["beam"]
    assert beam["examples"] == 8 and set(beam["per_beam"]) == {"4"}, beam
    # length_penalty=0 and early_stopping=False: the measured violation rate is 0/480 (reference §3)
    assert beam["worse"] == 0, beam
    means = [beam["mean_score"][k] for k in ("1", "4")]
    assert means == sorted(means), f"mean best-hypothesis score should not drop with the beam: {means}"


def test_tiny_encoder_decoder_passes(tmp_path: Any, seq2seq_state: dict[str, torch.Tensor]) -> None:
    module = TinySeq2Seq()
    module.load_state_dict(seq2seq_state)
    data = _only(_fit(tmp_path, module, reverse_loaders(n_train=256)), "decode.ok")
    _assert_healthy(data)
    assert data["settings"]["encoder_decoder"] is True
    assert data["beam"]["examples"] == 8 and data["beam"]["worse"] == 0, data["beam"]
    labels = next(iter(reverse_loaders(n_train=256)[1]))["labels"][:8]
    longest = int((labels != -100).sum(1).max())
    assert data["settings"]["max_new_tokens"] == min(16, longest), (data["settings"], longest)


def test_generation_stops_at_the_longest_continuation_in_the_data() -> None:
    """Generating past the longest reference output adds cost, not evidence: the length follows the data."""
    from lightning_debug.integrations.hf import HFTarget

    model = TinyGPT2LM().model.eval()
    batch = {k: v[:8] for k, v in next(iter(lm_loaders(n_train=256)[1])).items()}
    target = HFTarget(model, batch, max_new_tokens=16, prompt_fraction=0.5)
    rest = batch["attention_mask"].sum(1) - target.prompt_mask.sum(1)
    assert target.new_tokens == min(16, int(rest.max())) < 16, (target.new_tokens, rest.tolist())
    assert HFTarget(model, batch, max_new_tokens=3, prompt_fraction=0.5).new_tokens == 3
    tokens, _ = target.decode(1)[0]
    assert tokens.shape[1] <= target.new_tokens, tokens.shape


def test_float64_training_passes(tmp_path: Any, gpt2_state: dict[str, torch.Tensor]) -> None:
    """precision="64-true": HF generate() still computes step logits in fp32; that must not be a mismatch."""
    module = TinyGPT2LM()
    module.load_state_dict(gpt2_state)
    cb = DecodingConsistencyCheck(strict=True)
    trainer = make_trainer(tmp_path, [cb], max_steps=1, limit_val_batches=1, precision="64-true")
    trainer.fit(module, *lm_loaders(n_train=256))
    _assert_healthy(_only(cb, "decode.ok"))


@pytest.mark.parametrize("kind", ["gpt2", "seq2seq"])
def test_generation_config_processors_cause_no_false_alarm(
    tmp_path: Any, kind: str, gpt2_state: dict[str, torch.Tensor], seq2seq_state: dict[str, torch.Tensor]
) -> None:
    """Checkpoint generation defaults (penalties, n-gram bans, sampling) change processed scores, not raw ones."""
    module, state, data = (
        (TinyGPT2LM(), gpt2_state, lm_loaders(n_train=256))
        if kind == "gpt2"
        else (TinySeq2Seq(), seq2seq_state, reverse_loaders(n_train=256))
    )
    module.load_state_dict(state)
    module.model.generation_config.update(
        repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=3, do_sample=True, top_k=5
    )
    found = _only(_fit(tmp_path, module, data), "decode.ok")
    _assert_healthy(found)
    assert found["settings"]["generation_config"]["repetition_penalty"] == 1.5, found["settings"]


def test_hand_written_greedy_decoder_passes(tmp_path: Any, gpt2_state: dict[str, torch.Tensor]) -> None:
    module = GreedyGPT2LM()
    module.load_state_dict(gpt2_state)
    data = _only(_fit(tmp_path, module, lm_loaders(n_train=256)), "decode.ok")
    _assert_healthy(data)
    assert data["path"] == "protocol" and data["beam_sizes"] == [1]
    assert data["unsupported_beam_sizes"] == [4]


def test_prompts_go_through_the_modules_transfer_hook(tmp_path: Any, gpt2_state: dict[str, torch.Tensor]) -> None:
    """The prompts reach the decoder the way training batches reach `training_step`: through a transfer hook the
    module overrides (here one that only counts, in eval mode: the decode check's call)."""

    class Counting(GreedyGPT2LM):
        eval_transfers = 0

        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            self.eval_transfers += not self.training
            return batch

    module = Counting()
    module.load_state_dict(gpt2_state)
    cb = DecodingConsistencyCheck(strict=True)
    make_trainer(tmp_path, [cb], max_steps=1, limit_val_batches=0).fit(module, *lm_loaders(n_train=256))
    _assert_healthy(_only(cb, "decode.ok"))
    assert module.eval_transfers == 1, f"{module.eval_transfers} transfers of the prompts, expected 1"


def test_off_by_one_score_accumulation_is_a_mismatch(tmp_path: Any, gpt2_state: dict[str, torch.Tensor]) -> None:
    module = GreedyGPT2LM(off_by_one=True)
    module.load_state_dict(gpt2_state)
    data = _only(_fit(tmp_path, module, lm_loaders(n_train=256)), "decode.score_mismatch")
    worst = data["worst"][0]
    assert data["mismatched"] >= 4, f"only {data['mismatched']}/8 examples flagged: {data['worst']}"
    assert worst["diff"] > 0.1, f"an off-by-one should move the score by O(1), got {worst}"
    assert worst["diff_float64"] == pytest.approx(worst["diff"], rel=1e-3), (
        f"the float64 re-check should confirm the same difference: {worst}"
    )


def test_off_by_one_is_caught_at_initialisation(tmp_path: Any) -> None:
    """At fit start the model is random (greedy repeats one token); the misalignment must still show."""
    data = _only(_fit(tmp_path, GreedyGPT2LM(off_by_one=True), lm_loaders(n_train=256)), "decode.score_mismatch")
    assert data["mismatched"] == 8 and data["worst"][0]["diff"] > 0.1, data["worst"]


def test_float_noise_is_not_reported(tmp_path: Any, gpt2_state: dict[str, torch.Tensor]) -> None:
    """With rtol=1e-12 the fp32 noise (~1e-7 relative) fails; float64 shrinks it below and nothing alarms.

    (The hand-written decoder runs fully in float64; HF ``generate`` upcasts logits to float32 only.)
    """
    module = GreedyGPT2LM()
    module.load_state_dict(gpt2_state)
    data = _only(_fit(tmp_path, module, lm_loaders(n_train=256), rtol=1e-12, atol=0.0), "decode.ok")
    assert data["max_rel_diff"] > 1e-12, "expected fp32 differences above the tight tolerance"
    assert data["float64_max_abs_diff"] < 1e-9, data


class _BrokenBeam(GreedyGPT2LM):
    """'Beam search' that drops the best hypothesis: it returns greedy's output with the first token changed.

    Its scores are self-consistent (score_outputs), so only the beam statistic can catch it.
    """

    def decode_with_scores(self, batch: dict[str, torch.Tensor], beam_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, scores = super().decode_with_scores(batch, 1)
        if beam_size == 1:
            return outputs, scores
        outputs = outputs.clone()
        outputs[:, 0] = 2 + (outputs[:, 0] - 1) % (self.hparams["vocab"] - 2)  # another word, never EOS
        return outputs, self.score_outputs(batch, outputs)


def test_broken_beam_search_is_one_aggregate_warning(tmp_path: Any, gpt2_state: dict[str, torch.Tensor]) -> None:
    module = _BrokenBeam()
    module.load_state_dict(gpt2_state)
    data = _only(_fit(tmp_path, module, lm_loaders(n_train=256)), "decode.beam_not_monotonic")
    beam = data["beam"]
    assert beam["worse"] >= 6 and beam["p_value"] < 0.01, beam


def test_no_decoder_is_skipped(tmp_path: Any) -> None:
    cb = DecodingConsistencyCheck()
    make_trainer(tmp_path, [cb], max_steps=1).fit(DigitsMLP(), *loaders())
    data = _only(cb, "check.skipped")
    assert "decode_with_scores" in data["reason"]


def _snapshot(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, Any]:
    return {
        "params": {k: v.clone() for k, v in module.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "logged": {k: v.clone() for k, v in trainer.logged_metrics.items()},
        "rng": torch.get_rng_state(),
    }


def test_check_leaves_no_trace(tmp_path: Any, gpt2_state: dict[str, torch.Tensor]) -> None:
    """Same seed, with and without the check (at start and after every validation): bitwise equal runs."""
    runs = []
    for with_check in (False, True):
        pl.seed_everything(0, verbose=False)
        module = TinyGPT2LM()
        module.load_state_dict(gpt2_state)
        cbs = [DecodingConsistencyCheck(strict=True, every_n_val_checks=1)] if with_check else []
        trainer = make_trainer(tmp_path / str(with_check), cbs, max_steps=6, val_check_interval=3, limit_val_batches=1)
        trainer.fit(module, *lm_loaders(n_train=512))
        runs.append(_snapshot(trainer, module))
        if with_check:
            runs_done = next(f.count for f in cbs[0].findings if f.check == "decode.ok")
            assert runs_done == 3, f"expected a run at start and after 2 validations, got {runs_done}"
    off, on = runs
    for k in off["params"]:
        assert torch.equal(off["params"][k], on["params"][k]), f"parameter {k} changed by the check"
    for i, state in off["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, on["optimizer"]["state"][i][name]), f"optimizer state {i}.{name} changed"
    assert off["logged"].keys() == on["logged"].keys()
    for k in off["logged"]:
        assert torch.equal(off["logged"][k], on["logged"][k]), f"logged metric {k} changed"
    assert torch.equal(off["rng"], on["rng"]), "global torch RNG state changed"


def test_state_dict_round_trip_weights_only() -> None:
    cb = DecodingConsistencyCheck(every_n_val_checks=2)
    cb._val_checks, cb._started = 5, True
    buf = io.BytesIO()
    torch.save(cb.state_dict(), buf)
    buf.seek(0)
    other = DecodingConsistencyCheck(every_n_val_checks=2)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert (other._val_checks, other._started) == (5, True)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"beam_sizes": (4, 2)}, "beam_sizes"),
        ({"beam_sizes": ()}, "beam_sizes"),
        ({"n_examples": 0}, "n_examples"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt_fraction": 0.0}, "prompt_fraction"),
        ({"every_n_val_checks": 0}, "every_n_val_checks"),
        ({"rtol": -1.0}, "rtol"),
        ({"beam_violation_rate": 1.0}, "beam_violation_rate"),
        ({"confidence": 1.0}, "confidence"),
    ],
)
def test_arguments_are_validated(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DecodingConsistencyCheck(**kwargs)


@pytest.mark.slow
def test_cost_is_a_small_fraction_of_an_epoch(tmp_path: Any) -> None:
    """One epoch of the GPT-2 demo (256 steps) vs the check at start: target < 5% (noisy on a shared CPU)."""
    pl.seed_everything(0, verbose=False)
    cb = DecodingConsistencyCheck(strict=True)
    trainer = make_trainer(tmp_path, [cb], max_epochs=1, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(TinyGPT2LM(), *lm_loaders())
    epoch = time.perf_counter() - start
    cost = cb.findings[0].data["cost"]["seconds"]
    ratio = cost / (epoch - cost)
    print(f"decode check {cost:.3f} s vs epoch {epoch - cost:.2f} s: {ratio:.1%}")
    assert ratio < 0.10, f"decode check {cost:.3f} s is {ratio:.1%} of a {epoch - cost:.2f} s epoch"


DDP_SCRIPT = """
import json, sys
import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning_debug.callbacks.decoding import DecodingConsistencyCheck
from lightning_debug.demos.lm import GreedyGPT2LM, lm_loaders

out = sys.argv[1]
torch.set_num_threads(1)
pl.seed_everything(0, verbose=False)
check = DecodingConsistencyCheck(every_n_val_checks=1)
trainer = pl.Trainer(
    callbacks=[check], accelerator="cpu", devices=2, strategy="ddp", max_steps=4, val_check_interval=2,
    limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    logger=CSVLogger(out), default_root_dir=out, num_sanity_val_steps=0,
)
trainer.fit(GreedyGPT2LM(off_by_one=True), *lm_loaders(n_train=256))
with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
    decided = sum(x.check.startswith("decode.") for x in check.findings)
    json.dump({"step": trainer.global_step, "decode_findings": decided, "checks": [x.check for x in check.findings]}, f)
"""


@pytest.mark.ddp
def test_ddp_checks_on_rank_zero_and_does_not_hang(tmp_path: Any) -> None:
    """Two gloo ranks: rank 0 decodes at start and after each validation, rank 1 goes on; no deadlock."""
    script = tmp_path / "ddp_decoding.py"
    script.write_text(DDP_SCRIPT)
    _, (r0, r1) = run_two_rank_script(script, tmp_path, timeout=300)
    assert r0["step"] == r1["step"] == 4
    assert r0["decode_findings"] > 0 and r1["decode_findings"] == 0, (r0, r1)  # decided on rank zero only
    assert "decode.score_mismatch" in r0["checks"] and r1["checks"] == [], (r0, r1)


def test_first_eos_rule_and_left_padded_prompts() -> None:
    """EOS counts, everything after the first EOS does not (pad == eos included); prompts are left-padded."""
    from lightning_debug.integrations.hf import first_eos_mask, position_ids, prompt_prefixes

    tokens = torch.tensor([[5, 1, 1, 3], [5, 6, 7, 8], [1, 4, 1, 1]])
    assert first_eos_mask(tokens, [1]).tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
    ]
    ids = torch.tensor([[0, 4, 5, 6, 7, 1], [0, 8, 1, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    prompt, pmask = prompt_prefixes(ids, mask, pad_token_id=1, fraction=0.5)
    assert prompt.tolist() == [[0, 4, 5], [1, 1, 0]] and pmask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(pmask).tolist() == [[0, 1, 2], [0, 0, 0]]
    capped, _ = prompt_prefixes(ids, mask, pad_token_id=1, fraction=1.0, max_tokens=2)
    assert capped.tolist() == [[0, 4], [0, 8]]


def test_a_model_without_transformers_classes_does_not_import_transformers(tmp_path: Any) -> None:
    """Lightning imports transformers lazily whenever it is installed; the check must not trigger the full import
    (~0.1 s, more than an epoch of a small MLP) for a module that holds no transformers class."""
    code = (
        "import sys, lightning.pytorch as pl\n"
        "from lightning_debug.callbacks.decoding import DecodingConsistencyCheck\n"
        "from lightning_debug.demos.digits import DigitsMLP, loaders\n"
        "cb = DecodingConsistencyCheck()\n"
        f"pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, default_root_dir={str(tmp_path)!r},\n"
        "           enable_checkpointing=False, callbacks=[cb]).fit(DigitsMLP(), *loaders())\n"
        "assert [f.check for f in cb.findings] == ['check.skipped'], cb.findings\n"
        "print('transformers.modeling_utils' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False", "the check imported transformers' modeling code"
