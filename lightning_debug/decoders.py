"""Decoders to check and the prompts to check them on, for
:class:`~lightning_debug.callbacks.decoding.DecodingConsistencyCheck`.

A :class:`DecodeTarget` decodes one prompt batch and teacher-forces the result: :class:`ProtocolTarget` for a
hand-written decoder on the LightningModule, ``integrations.hf.HFTarget`` for a Hugging Face model.
:func:`find_decoder` tells which applies, :func:`decode_target` builds it on the prompts of
:func:`first_examples`, :func:`run_decoders` collects their scores per beam size and :func:`recheck_in_float64`
re-runs the failing beam sizes in float64.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch.utils.data import IterableDataset

from lightning_debug.batching import batch_mover
from lightning_debug.integrations import hf
from lightning_debug.precision import float64_on_cpu
from lightning_debug.rules.decoding import Scores, difference, score_mismatches
from lightning_debug.signals import first_dataloader

if TYPE_CHECKING:
    import lightning.pytorch as pl


class DecodeTarget(Protocol):
    """One prompt batch and a way to decode it and to teacher-force the result."""

    kind: str
    calls: dict[str, int]

    def decode(self, beam_size: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """``(outputs, decoder scores [B], scored tokens [B])``."""

    def score(self, outputs: Any) -> torch.Tensor:
        """Teacher-forced summed log-likelihood of ``outputs`` [B]."""

    def in_float64(self) -> contextlib.AbstractContextManager[DecodeTarget]:
        """The same target, its model run in float64 on the CPU (see ``precision.float64_on_cpu``)."""


def _as_scores(scores: Any, what: str) -> torch.Tensor:
    out = torch.as_tensor(scores).detach().flatten()
    if not out.is_floating_point():
        raise ValueError(f"{what} must return floating-point per-example scores, got {out.dtype}")
    return out


def _lengths(outputs: Any, n: int) -> torch.Tensor:
    """Scored tokens per example, an upper bound when outputs are padded (only the tolerance uses it)."""
    if isinstance(outputs, torch.Tensor) and outputs.dim() >= 2:
        return torch.full((n,), outputs.shape[1])
    if isinstance(outputs, (list, tuple)) and len(outputs) == n and all(hasattr(o, "__len__") for o in outputs):
        return torch.tensor([len(o) for o in outputs])
    return torch.ones(n, dtype=torch.long)


class ProtocolTarget:
    """A hand-written decoder on the LightningModule: ``decode_with_scores`` and ``score_outputs``."""

    kind = "protocol"

    def __init__(self, module: pl.LightningModule, batch: Any, calls: dict[str, int] | None = None) -> None:
        self.module = module
        self.batch = batch
        self.calls = calls if calls is not None else {"generate": 0, "forward": 0}

    def decode(self, beam_size: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        outputs, scores = self.module.decode_with_scores(self.batch, beam_size)  # type: ignore[operator]
        self.calls["generate"] += 1
        scores = _as_scores(scores, "decode_with_scores")
        return outputs, scores, _lengths(outputs, len(scores))

    def score(self, outputs: Any) -> torch.Tensor:
        scores = self.module.score_outputs(self.batch, outputs)  # type: ignore[operator]
        self.calls["forward"] += 1
        return _as_scores(scores, "score_outputs")

    @contextlib.contextmanager
    def in_float64(self) -> Iterator[ProtocolTarget]:
        with float64_on_cpu(self.module) as convert:
            yield ProtocolTarget(self.module, convert(self.batch), self.calls)


def run_decoders(target: DecodeTarget, beam_sizes: Sequence[int]) -> tuple[Scores, list[int]]:
    """Decode and teacher-force at each beam size; beam sizes the decoder refuses are returned apart."""
    run, unsupported = Scores(), []
    for k in beam_sizes:
        try:
            outputs, dec, n = target.decode(k)
        except NotImplementedError:
            unsupported.append(k)
            continue
        mod = target.score(outputs)
        if len(mod) != len(dec):
            raise ValueError(f"score_outputs returned {len(mod)} scores for {len(dec)} decoded examples")
        run.decoder[k], run.model[k] = dec.double().cpu(), mod.double().cpu()
        run.tokens[k] = n.cpu()
    return run, unsupported


def _slice(batch: Any, n: int) -> Any:
    """The first ``n`` rows of every tensor whose first dimension is the batch size."""
    sizes: list[int] = []
    apply_to_collection(batch, torch.Tensor, lambda t: sizes.append(t.shape[0]) if t.dim() else None)
    if not sizes:
        return batch
    return apply_to_collection(batch, torch.Tensor, lambda t: t[:n] if t.dim() and t.shape[0] == sizes[0] else t)


def first_examples(trainer: pl.Trainer, n: int) -> Any | None:
    """The first ``n`` examples of the validation (else training) data, built by the loader's ``collate_fn``.

    Map-style datasets are indexed directly, so a shuffling sampler's generator is never advanced; an
    ``IterableDataset`` is never iterated (that could advance the user's stream).
    """
    for loaders in (trainer.val_dataloaders, trainer.train_dataloader):
        loader = first_dataloader(loaders)
        if loader is None or isinstance(loader.dataset, IterableDataset):
            continue
        data: Any = loader.dataset
        if not hasattr(data, "__len__") or len(data) == 0:
            return _slice(next(iter(loader)), n)
        if loader.batch_size is None and loader.batch_sampler is None:  # the dataset yields whole batches
            return _slice(loader.collate_fn(data[0]), n)
        return loader.collate_fn([data[i] for i in range(min(n, len(data)))])
    return None


def find_decoder(pl_module: pl.LightningModule) -> tuple[bool, tuple[str, Any] | None]:
    """Whether the module speaks the protocol; else the Hugging Face model it holds (attribute path, model)."""
    if callable(getattr(pl_module, "decode_with_scores", None)) and callable(getattr(pl_module, "score_outputs", None)):
        return True, None
    # the full transformers import costs ~0.1 s: it happens only for a module that holds a transformers class
    if not hf.holds_transformers(pl_module):
        return False, None
    try:
        return False, hf.find_generator(pl_module)
    except ImportError:  # a transformers too old or broken to use: no zero-config path
        return False, None


def decode_target(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    generator: tuple[str, Any] | None,
    *,
    n_examples: int,
    max_new_tokens: int,
    prompt_fraction: float,
) -> DecodeTarget | str:
    """What to decode with (the protocol when ``generator`` is None) on the first ``n_examples`` prompts, moved
    to the module's device; or the reason why nothing can be."""
    batch = first_examples(trainer, n_examples)
    if batch is None:
        return "no validation or training dataloader to take prompts from"
    batch = batch_mover(trainer, pl_module)(batch)
    if generator is None:
        return ProtocolTarget(pl_module, batch)
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        return "the batch is not a mapping with `input_ids` (define `decode_with_scores`/`score_outputs`)"
    return hf.HFTarget(generator[1], batch, max_new_tokens, prompt_fraction)


def recheck_in_float64(target: DecodeTarget, beams: list[int], rtol: float, atol: float) -> dict[str, Any] | str:
    """Re-run the failing beam sizes in float64 on the CPU (reference §4): noise vanishes, a bug stays. Whether
    the mismatch is ``confirmed``, its ``max_abs`` and the per-beam ``diffs``; or why it could not run."""
    try:
        with target.in_float64() as target64:
            run64, _ = run_decoders(target64, beams)
    except Exception as err:  # a model that cannot run in float64: alarm on the float32 evidence
        return f"float64 re-check unavailable ({type(err).__name__}: {err})"
    mism = score_mismatches(run64, rtol, atol)
    diffs = {k: difference(run64.decoder[k], run64.model[k]) for k in run64.decoder}
    return {"confirmed": mism["count"] > 0, "max_abs": mism["max_abs"], "diffs": diffs}
