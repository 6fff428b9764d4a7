"""Tiny language models on a synthetic language, for the decode check's examples, tests and benchmarks.

- :func:`markov_language` / :func:`lm_loaders`: sentences from a fixed sparse Markov chain (BOS, 3-16
  words, EOS), right-padded batches of ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding).
- :class:`TinyGPT2LM`: a 2-layer GPT-2 built from ``GPT2Config`` (random init, no download), ``pad = eos``.
  It learns the chain on a CPU in a few seconds; ``generate()`` works out of the box.
- :class:`GreedyGPT2LM`: the same model decoded by a hand-written Python loop that implements the
  decode-check protocol (``decode_with_scores`` / ``score_outputs``); ``off_by_one=True`` scores each
  chosen token with the previous step's distribution, the classic misalignment.
- :func:`reverse_loaders` / :class:`TinySeq2Seq`: a tiny BART (from ``BartConfig``) that learns to reverse
  a token sequence, the encoder-decoder case.

Needs transformers (the ``transformers`` extra).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, cast

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

from lightning_debug.integrations.hf import first_eos_mask, position_ids, prompt_prefixes

BOS, EOS = 0, 1  # EOS doubles as the padding token (GPT-2 style)
VOCAB = 24


def markov_language(n: int, vocab: int = VOCAB, seed: int = 0, max_words: int = 16) -> list[torch.Tensor]:
    """``n`` sentences ``[BOS, w_1 .. w_k, EOS]`` from a sparse Markov chain over ``vocab - 2`` words.

    The chain itself is fixed (seed 0) so train and validation sets (other ``seed``) speak the same language.
    Each word has three successors; after three words a sentence ends with probability 0.15 per step.
    """
    words = vocab - 2
    chain = torch.Generator().manual_seed(0)
    successors = [(torch.randperm(words, generator=chain)[:3] + 2).tolist() for _ in range(words)]
    rng = random.Random(seed + 1)
    out = []
    for _ in range(n):
        sent = [BOS, rng.randrange(2, vocab)]
        while len(sent) < max_words + 1 and (len(sent) < 4 or rng.random() > 0.15):
            sent.append(rng.choices(successors[sent[-1] - 2], weights=(0.6, 0.3, 0.1))[0])
        out.append(torch.tensor([*sent, EOS]))
    return out


def pad_collate(pad_token_id: int = EOS) -> Callable[[list[Any]], dict[str, torch.Tensor]]:
    """Right-pad a list of token tensors (or ``(source, target)`` pairs) into an HF-style dict batch."""

    def pad(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
        return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)

    def collate(items: list[Any]) -> dict[str, torch.Tensor]:
        if isinstance(items[0], torch.Tensor):  # language modelling: labels = inputs, padding ignored
            ids = pad(items, pad_token_id)
            mask = pad([torch.ones_like(s) for s in items], 0)
            return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        sources, targets = zip(*items, strict=True)
        return {
            "input_ids": pad(list(sources), pad_token_id),
            "attention_mask": pad([torch.ones_like(s) for s in sources], 0),
            "labels": pad(list(targets), -100),
        }

    return collate


def lm_loaders(
    n_train: int = 8192, n_val: int = 256, batch_size: int = 32, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """Shuffled training and fixed validation loaders of the Markov language (256 steps per epoch)."""
    return _loaders(markov_language(n_train, seed=seed), markov_language(n_val, seed=seed + 1000), batch_size, seed)


def _loaders(train: list[Any], val: list[Any], batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    collate = pad_collate()
    return (
        DataLoader(cast(Dataset, train), batch_size=batch_size, shuffle=True, generator=g, collate_fn=collate),
        DataLoader(cast(Dataset, val), batch_size=64, collate_fn=collate),
    )


class _HFLightning(pl.LightningModule):
    """Loss from the HF model's ``labels``; logs ``train_loss`` and ``val_loss``."""

    model: Any

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])


class TinyGPT2LM(_HFLightning):
    """A GPT-2 of ``n_layer`` x ``n_embd`` on the Markov language; the decode check finds ``self.model``."""

    def __init__(self, vocab: int = VOCAB, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        config = GPT2Config(
            vocab_size=vocab,
            n_positions=64,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            bos_token_id=BOS,
            eos_token_id=EOS,
            pad_token_id=EOS,
        )
        self.model = GPT2LMHeadModel(config)


class GreedyGPT2LM(TinyGPT2LM):
    """:class:`TinyGPT2LM` with a hand-written greedy decoder implementing the decode-check protocol.

    ``decode_with_scores(batch, beam_size)`` decodes the first half of each validation sentence greedily with
    a Python loop (a full forward per step, no KV cache) and sums the log-probability of each chosen token,
    EOS included. ``score_outputs(batch, outputs)`` teacher-forces the outputs in one forward.
    ``off_by_one=True`` scores the token chosen at step t with the log-probabilities of step t-1 (a stale
    cached distribution): the misalignment the check exists to catch, visible on a random-init GPT-2 (which
    greedily repeats one token) as well as on a trained one.
    """

    def __init__(self, off_by_one: bool = False, max_new_tokens: int = 16, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.off_by_one = off_by_one
        self.max_new_tokens = max_new_tokens

    def _prompts(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return prompt_prefixes(batch["input_ids"], batch["attention_mask"], EOS)

    def decode_with_scores(self, batch: dict[str, torch.Tensor], beam_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if beam_size != 1:
            raise NotImplementedError("greedy only")
        seq, mask = self._prompts(batch)
        scores = torch.zeros(len(seq), device=seq.device)
        done = torch.zeros(len(seq), dtype=torch.bool, device=seq.device)
        stale = None  # off_by_one: the previous step's log-probabilities
        out = []
        for _ in range(self.max_new_tokens):
            logits = self.model(input_ids=seq, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
            logp = torch.log_softmax(logits, -1)
            token = logp.argmax(-1)
            scored = stale if self.off_by_one and stale is not None else logp
            scores = scores + torch.where(done, 0.0, scored.gather(1, token[:, None]).squeeze(1))
            stale = logp
            token = torch.where(done, torch.full_like(token, EOS), token)
            out.append(token)
            done = done | (token == EOS)
            seq = torch.cat([seq, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if bool(done.all()):
                break
        return torch.stack(out, 1), scores

    def score_outputs(self, batch: dict[str, torch.Tensor], outputs: torch.Tensor) -> torch.Tensor:
        prompt, mask = self._prompts(batch)
        seq = torch.cat([prompt, outputs], 1)
        attn = torch.cat([mask, torch.ones_like(outputs)], 1)
        logits = self.model(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn)).logits
        logp = torch.log_softmax(logits[:, prompt.shape[1] - 1 : -1], -1).gather(-1, outputs[..., None]).squeeze(-1)
        return (logp * first_eos_mask(outputs, [EOS])).sum(1)


def reverse_task(n: int, vocab: int = VOCAB, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(source, target)`` pairs: 3-10 random words, and the same words reversed followed by EOS."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        words = torch.randint(2, vocab, (int(torch.randint(3, 11, (1,), generator=g)),), generator=g)
        pairs.append((torch.cat([words, torch.tensor([EOS])]), torch.cat([words.flip(0), torch.tensor([EOS])])))
    return pairs


def reverse_loaders(
    n_train: int = 4096, n_val: int = 256, batch_size: int = 32, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """Shuffled training and fixed validation loaders of the reverse task."""
    return _loaders(reverse_task(n_train, seed=seed), reverse_task(n_val, seed=seed + 1000), batch_size, seed)


class TinySeq2Seq(_HFLightning):
    """A 1+1-layer BART of width ``d_model`` for the reverse task (decoder starts with EOS, BART style)."""

    def __init__(self, vocab: int = VOCAB, d_model: int = 64, layers: int = 1, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = BartConfig(
            vocab_size=vocab,
            d_model=d_model,
            encoder_layers=layers,
            decoder_layers=layers,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=2 * d_model,
            decoder_ffn_dim=2 * d_model,
            max_position_embeddings=64,
            pad_token_id=EOS,
            bos_token_id=BOS,
            eos_token_id=EOS,
            decoder_start_token_id=EOS,
            forced_eos_token_id=None,
        )
        self.model = BartForConditionalGeneration(config)
