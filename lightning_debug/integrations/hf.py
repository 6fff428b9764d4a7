"""Hugging Face ``transformers`` glue for :class:`~lightning_debug.callbacks.decoding.DecodingConsistencyCheck`.

All Hugging Face knowledge of the package lives here. Importing this module is cheap and does not import
transformers: the functions that need it import it when called, and :func:`holds_transformers` tells, from class
names alone, whether a module holds a transformers model at all (so a model without one never pays the ~0.1 s
import, and the package works without transformers installed).

What it knows (measured on transformers 5.24, see ``shared/reference/batch-consistency.md`` §3):

- ``generate(..., return_dict_in_generate=True, output_logits=True)`` returns the **raw** logits of every step
  (``output_scores`` would give the processed ones: temperature, penalties, forced tokens), and
  ``beam_indices`` for beam search, so ``compute_transition_scores(normalize_logits=True)`` recovers the
  log-probability the decoder used for each chosen token, per hypothesis.
- The teacher-forced likelihood of the same output needs the same left-padded prompt mask and
  ``position_ids = clamp(cumsum(mask) - 1, 0)``; encoder-decoder models score ``sequences`` as decoder inputs.
- Everything after the first EOS is padding; the EOS itself counts (GPT-2 style ``pad == eos`` included).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Score-changing logits processors a generation config may switch on, set to their no-op values for the check:
# beam search ranks hypotheses by processed scores, so only without them is the search objective the model's
# likelihood (forced tokens and bad-word lists stay: they constrain every hypothesis alike).
NEUTRAL_PROCESSORS: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_new_tokens": 0,
}


MAX_PROMPT_TOKENS = 64  # long documents add cost, not evidence
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def holds_transformers(module: nn.Module) -> bool:
    """``module`` is or contains a class from ``transformers`` (read from class names: nothing is imported)."""
    return any(type(m).__module__.startswith("transformers.") for m in module.modules())


def is_causal_lm(module: nn.Module) -> bool:
    """A Hugging Face causal LM inside ``module``: its logits at position t predict the label at t + 1."""
    return any(type(m).__name__.endswith(_CAUSAL_LM_SUFFIXES) for m in module.modules())


def position_gradient_norms(
    module: nn.Module, batch: Any, loss_of: Callable[[Any], torch.Tensor]
) -> torch.Tensor | None:
    """``(B, T)`` norms of the gradient of ``loss_of(batch)`` with respect to each position's input embedding, for
    a module holding a causal LM (None otherwise, or when the embedding's output is not ``(B, T, D)``). Only
    ``torch.autograd.grad``: nothing is left on the parameters' ``.grad``."""
    from lightning_debug.batching import input_embedding

    embedding = input_embedding(module) if is_causal_lm(module) else None
    if embedding is None:
        return None
    captured: list[torch.Tensor] = []

    def capture(_: nn.Module, __: Any, out: Any) -> Any:
        if captured or not isinstance(out, torch.Tensor) or out.ndim != 3:
            return None
        captured.append(out.detach().requires_grad_())
        return captured[0]

    handle = embedding.register_forward_hook(capture)
    try:
        with torch.enable_grad():
            loss = loss_of(batch)
    finally:
        handle.remove()
    if not captured or not loss.requires_grad:
        return None
    (grad,) = torch.autograd.grad(loss, captured[0], allow_unused=True)
    return None if grad is None else grad.detach().double().norm(dim=-1).cpu()


def find_generator(module: nn.Module) -> tuple[str, PreTrainedModel] | None:
    """The first submodule (by attribute path) that is a ``PreTrainedModel`` able to ``generate()``."""
    from transformers import PreTrainedModel

    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel) and sub.can_generate():
            return name, sub
    return None


def first_eos_mask(tokens: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """True up to and including each row's first EOS: the EOS is scored, the padding after it is not."""
    if not eos_token_ids:
        return torch.ones_like(tokens, dtype=torch.bool)
    is_eos = torch.isin(tokens, torch.tensor(list(eos_token_ids), device=tokens.device)).long()
    return (is_eos.cumsum(1) - is_eos) == 0


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate()`` computes them for decoder-only models."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_prefixes(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pad_token_id: int,
    fraction: float = 0.5,
    max_tokens: int = MAX_PROMPT_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``fraction`` of each row's real tokens (at least one, at most ``max_tokens``), left-padded.

    Rows keep different prompt lengths on purpose: left padding and position ids are part of what is checked.
    """
    rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask, strict=True)]
    keep = [max(1, min(max_tokens, int(len(r) * fraction))) for r in rows]
    width = max(keep)
    out = torch.full((len(rows), width), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros((len(rows), width), dtype=attention_mask.dtype, device=input_ids.device)
    for i, (r, k) in enumerate(zip(rows, keep, strict=True)):
        out[i, width - k :] = r[:k]
        mask[i, width - k :] = 1
    return out, mask


def _eos_ids(model: PreTrainedModel) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class HFTarget:
    """Decode and teacher-force one prompt batch with a ``PreTrainedModel``.

    ``decode(beam_size)`` returns ``((tokens, valid), decoder_scores, n_tokens)``: generated tokens (prompt
    removed), the first-EOS mask and the summed raw log-probabilities of the chosen tokens along the returned
    hypothesis. ``score(outputs)`` is the teacher-forced log-likelihood of the same tokens in one forward.
    """

    kind = "huggingface"

    def __init__(
        self,
        model: PreTrainedModel,
        batch: Mapping[str, Any],
        max_new_tokens: int,
        prompt_fraction: float,
        calls: dict[str, int] | None = None,
    ) -> None:
        if "input_ids" not in batch:
            raise KeyError("the batch has no `input_ids`")
        self.model: Any = model  # PreTrainedModel; Any because nn.Module's __getattr__ hides its methods
        self.prompt_fraction = prompt_fraction
        self.calls = calls if calls is not None else {"generate": 0, "forward": 0}
        self.encoder_decoder = bool(model.config.is_encoder_decoder)
        self.eos = _eos_ids(model)
        gc = model.generation_config
        pad = gc.pad_token_id if gc.pad_token_id is not None else (self.eos[0] if self.eos else 0)
        self.pad_token_id = int(pad)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        if self.encoder_decoder:
            self.prompt_ids, self.prompt_mask = ids, mask
            labels = batch.get("labels")
            reference = (labels != -100).sum(1) if isinstance(labels, torch.Tensor) and labels.dim() == 2 else None
        else:
            limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
            room = MAX_PROMPT_TOKENS if limit is None else max(1, min(MAX_PROMPT_TOKENS, int(limit) - max_new_tokens))
            self.prompt_ids, self.prompt_mask = prompt_prefixes(ids, mask, self.pad_token_id, prompt_fraction, room)
            reference = mask.sum(1) - self.prompt_mask.sum(1)  # the rest of each row after its prompt
        # Generating past the longest output the data itself has adds cost, not evidence.
        longest = int(reference.max()) if reference is not None and reference.numel() else 0
        self.new_tokens = min(max_new_tokens, longest) if longest > 0 else max_new_tokens

    @property
    def n_examples(self) -> int:
        return int(self.prompt_ids.shape[0])

    def settings(self) -> dict[str, Any]:
        """The generation settings in effect (checkpoint defaults apply silently; say which)."""
        diff = self.model.generation_config.to_diff_dict()
        return {
            "model": type(self.model).__name__,
            "encoder_decoder": self.encoder_decoder,
            "eos_token_id": self.eos,
            "pad_token_id": self.pad_token_id,
            "max_new_tokens": self.new_tokens,
            "prompt_tokens": self.prompt_mask.sum(1).tolist(),
            "generation_config": {k: v for k, v in diff.items() if k != "transformers_version"},
            "overridden_for_the_check": {"do_sample": False, "length_penalty": 0.0, **NEUTRAL_PROCESSORS},
        }

    def decode(self, beam_size: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        kwargs: dict[str, Any] = dict(
            do_sample=False,
            num_beams=beam_size,
            num_return_sequences=1,
            max_new_tokens=self.new_tokens,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        kwargs.update(NEUTRAL_PROCESSORS)
        if beam_size > 1:
            kwargs["length_penalty"] = 0.0  # the search objective is then the plain summed log-probability
        import transformers

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # "flags not valid for greedy" notices are expected here
        try:
            out = self.model.generate(input_ids=self.prompt_ids, attention_mask=self.prompt_mask, **kwargs)
        finally:
            transformers.logging.set_verbosity(verbosity)
        self.calls["generate"] += 1
        start = 1 if self.encoder_decoder else self.prompt_ids.shape[1]
        tokens = out.sequences[:, start:]
        valid = first_eos_mask(tokens, self.eos)
        logits = tuple(_at_least_fp32(step) for step in out.logits)
        steps = self.model.compute_transition_scores(
            out.sequences, logits, out.get("beam_indices"), normalize_logits=True
        )
        n = min(steps.shape[1], tokens.shape[1])
        chosen = torch.zeros_like(tokens, dtype=steps.dtype)
        chosen[:, :n] = steps[:, :n]
        scores = torch.where(valid, chosen, torch.zeros_like(chosen)).sum(1)
        return (tokens, valid), scores, valid.sum(1)

    def score(self, outputs: Any) -> torch.Tensor:
        tokens, valid = outputs
        if self.encoder_decoder:
            start = torch.full_like(tokens[:, :1], self.model.generation_config.decoder_start_token_id)
            decoder_in = torch.cat([start, tokens[:, :-1]], 1)
            logits = self.model(
                input_ids=self.prompt_ids, attention_mask=self.prompt_mask, decoder_input_ids=decoder_in
            ).logits
        else:
            seq = torch.cat([self.prompt_ids, tokens], 1)
            attn = torch.cat([self.prompt_mask, torch.ones_like(tokens, dtype=self.prompt_mask.dtype)], 1)
            full = self.model(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn)).logits
            p = self.prompt_ids.shape[1]
            logits = full[:, p - 1 : -1]
        self.calls["forward"] += 1
        logp = torch.log_softmax(_at_least_fp32(logits), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return torch.where(valid, logp, torch.zeros_like(logp)).sum(1)

    @contextlib.contextmanager
    def in_float64(self) -> Iterator[HFTarget]:
        """The same check with the model run in float64 on the CPU: float noise shrinks ~1e8x, a bug does not."""
        from lightning_debug.precision import float64_on_cpu

        with float64_on_cpu(self.model) as convert:
            clone = copy.copy(self)
            clone.prompt_ids, clone.prompt_mask = convert(self.prompt_ids), convert(self.prompt_mask)
            yield clone
