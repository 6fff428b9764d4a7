"""Batch plumbing shared by the batch-consistency checks.

Turning a user's batch (tuple, list, dict, Hugging Face ``BatchEncoding``) into what the checks need:
per-example token counts and padding amounts, the module's per-example outputs, the input embedding whose
output stands in for integer token inputs, and the BxB dependency matrix from one batched vector-Jacobian
product. (The float64 re-run that tells float noise from bugs is in :mod:`lightning_debug.precision`.)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

ForwardFn = Callable[[nn.Module, Any], Any]


class CannotCheck(Exception):
    """The batch check cannot judge this setup; the text is the reason."""


def tensors_of(batch: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) batch, in a stable order."""
    found: list[torch.Tensor] = []
    apply_to_collection(batch, torch.Tensor, found.append)
    return found


def batch_size_of(batch: Any) -> int | None:
    """Size of dim 0 of the first tensor with at least one dimension."""
    return next((t.shape[0] for t in tensors_of(batch) if t.ndim > 0), None)


def padding_of(single: Any, batch: Any) -> int:
    """Positions of padding an example received in ``batch``: the largest growth of any non-batch dimension."""
    pad = 0
    for s, b in zip(tensors_of(single), tensors_of(batch), strict=False):
        if s.ndim == b.ndim and s.ndim > 1:
            pad = max(pad, *(bd - sd for sd, bd in zip(s.shape[1:], b.shape[1:], strict=True)))
    return pad


def _get(batch: Any, key: str) -> torch.Tensor | None:
    value = batch.get(key) if isinstance(batch, Mapping) else None
    return value if isinstance(value, torch.Tensor) else None


def token_counts(single: Any, ignore_index: int = -100) -> dict[str, int]:
    """Scored-token counts of a single-example batch, by the rule a token-weighted loss could use.

    ``labels`` counts targets ``!= ignore_index`` (``labels_shifted`` drops the first, as causal LMs shift
    their labels); ``attention_mask`` counts attended positions. Tuple batches: a last element with more than
    one label per example is treated as token labels.
    """
    labels = _get(single, "labels")
    if labels is None and isinstance(single, (tuple, list)) and len(single) > 1:
        last = single[-1]
        labels = last if isinstance(last, torch.Tensor) and last.ndim > 1 else None
    counts: dict[str, int] = {}
    if labels is not None and labels.ndim > 1 and not labels.is_floating_point():
        valid = labels.reshape(labels.shape[0], -1) != ignore_index
        counts["labels"] = int(valid.sum())
        counts["labels_shifted"] = int(valid[:, 1:].sum())
    mask = _get(single, "attention_mask")
    if mask is not None and mask.ndim > 1:
        counts["attention_mask"] = int((mask != 0).sum())
        counts["attention_mask_shifted"] = int((mask.reshape(mask.shape[0], -1)[:, 1:] != 0).sum())
    return counts


def input_embedding(module: nn.Module) -> nn.Module | None:
    """The layer whose output replaces integer inputs: ``get_input_embeddings()`` (Hugging Face models,
    duck-typed) of the module or of its first submodule that has one, else the first ``nn.Embedding``."""
    for m in module.modules():
        getter = getattr(m, "get_input_embeddings", None)
        if callable(getter):
            with contextlib.suppress(NotImplementedError, AttributeError):
                emb = getter()
                if isinstance(emb, nn.Module):
                    return emb
    return next((m for m in module.modules() if isinstance(m, nn.Embedding)), None)


def _forward_target(module: nn.Module) -> nn.Module | None:
    """The module to call: the LightningModule if it defines ``forward``, else a held Hugging Face model."""
    if not isinstance(module, pl.LightningModule) or type(module).forward is not pl.LightningModule.forward:
        return module
    return next((m for m in module.children() if callable(getattr(m, "get_input_embeddings", None))), None)


def default_forward(module: nn.Module, batch: Any) -> Any:
    """Call the module the way its ``forward`` signature allows.

    Dicts / ``BatchEncoding``: the keys ``forward`` accepts (all of them if it takes ``**kwargs``; the whole
    dict if it accepts none of them).
    Tuples / lists: as many leading elements as ``forward`` has required positional parameters (all but the
    last, the target, if it takes ``*args``). A bare tensor is passed as is.
    """
    target = _forward_target(module)
    if target is None:
        raise TypeError("the module defines no forward and holds no Hugging Face model; pass `forward_fn`")
    params = inspect.signature(target.forward).parameters.values()
    if isinstance(batch, Mapping):
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return target(**batch)
        names = {p.name for p in params}
        accepted = {k: v for k, v in batch.items() if k in names}
        return target(**accepted) if accepted else target(batch)  # `forward(self, batch)`
    if isinstance(batch, (tuple, list)):
        if any(p.kind is p.VAR_POSITIONAL for p in params):
            return target(*batch[: max(len(batch) - 1, 1)])
        n = sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty)
        return target(*batch[: max(n, 1)])
    return target(batch)


def per_example_outputs(outputs: Any, batch_size: int) -> torch.Tensor | None:
    """Floating outputs with ``batch_size`` rows, flattened per example and concatenated: ``(B, K)``."""
    rows = [
        t.flatten(1) if t.ndim > 1 else t.unsqueeze(1)
        for t in tensors_of(outputs)
        if t.is_floating_point() and t.ndim > 0 and t.shape[0] == batch_size
    ]
    if not rows:
        return None
    return torch.cat([r.to(rows[0].dtype) for r in rows], dim=1)


def batch_dim(t: torch.Tensor, batch_size: int) -> int | None:
    """Dim 0 if it has ``batch_size`` entries, else the only dim that does (seq-first layouts)."""
    if t.ndim and t.shape[0] == batch_size:
        return 0
    dims = [d for d, n in enumerate(t.shape) if n == batch_size]
    return dims[0] if len(dims) == 1 else None


def dependency_matrix(
    outputs: torch.Tensor, inputs: list[tuple[torch.Tensor, int]], seed: int = 0
) -> tuple[torch.Tensor, str]:
    """``D[i, j]`` = norm of the gradient of example ``i``'s output with respect to example ``j``'s input.

    Each row's output is first projected on a fixed random direction (a plain sum can cancel, e.g. over
    softmax probabilities), then one batched VJP with the identity as cotangents gives all B rows at once
    (Bolts only looks at row 0). Only ``torch.autograd.grad`` is used: no ``.grad`` is left on parameters.
    Falls back to one VJP per row if an op has no batching rule. ``inputs``: (tensor, its batch dim).
    """
    b = outputs.shape[0]
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(outputs.shape, generator=g, dtype=torch.float64).to(outputs)
    scalars = (outputs * direction).sum(dim=1)
    eye = torch.eye(b, dtype=scalars.dtype, device=scalars.device)
    tensors = [t for t, _ in inputs]
    try:
        grads = torch.autograd.grad(scalars, tensors, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
        method = "batched_vjp"
    except RuntimeError:  # an op without a vmap rule: same matrix, one row at a time
        rows = [torch.autograd.grad(scalars[i], tensors, retain_graph=True, allow_unused=True) for i in range(b)]
        grads = tuple(
            torch.stack([r[k] if r[k] is not None else torch.zeros_like(tensors[k]) for r in rows])
            for k in range(len(tensors))
        )
        method = "vjp_per_row"
    matrix = torch.zeros(b, b, dtype=torch.float64)
    for grad, (_, dim) in zip(grads, inputs, strict=True):
        if grad is None:
            continue
        per_input = grad.movedim(dim + 1, 1).reshape(b, b, -1).double()
        matrix += per_input.pow(2).sum(-1).cpu()
    return matrix.sqrt(), method


def output_dependence(
    module: nn.Module, batch: Any, b: int, forward_fn: ForwardFn, seed: int = 0
) -> tuple[torch.Tensor, str]:
    """:func:`dependency_matrix` of ``forward_fn(module, batch)`` through the input embedding (integer inputs)
    and the floating inputs. Raises :class:`CannotCheck` when there is nothing differentiable to measure."""
    leaves: list[tuple[torch.Tensor, int]] = []

    def as_leaf(t: torch.Tensor) -> torch.Tensor:
        dim = batch_dim(t, b)
        if not t.is_floating_point() or dim is None:
            return t
        leaf = t.detach().clone().requires_grad_()
        leaves.append((leaf, dim))
        return leaf

    batch = apply_to_collection(batch, torch.Tensor, as_leaf)
    handle = None
    embedding = input_embedding(module)
    if embedding is not None and any(not t.is_floating_point() for t in tensors_of(batch)):
        captured: list[bool] = []

        def capture(_: torch.nn.Module, __: Any, out: Any) -> Any:
            dim = batch_dim(out, b) if isinstance(out, torch.Tensor) and not captured else None
            if dim is None:  # only the first call embeds the token inputs
                return None
            captured.append(True)
            leaf = out.detach().requires_grad_()
            leaves.insert(0, (leaf, dim))
            return leaf

        handle = embedding.register_forward_hook(capture)
    try:
        with torch.enable_grad():
            outputs = per_example_outputs(forward_fn(module, batch), b)
    except Exception as err:
        raise CannotCheck(f"the forward pass raised {type(err).__name__}: {err}; pass `forward_fn`") from err
    finally:
        if handle is not None:
            handle.remove()
    if outputs is None or not outputs.requires_grad or not leaves:
        raise CannotCheck(
            "no differentiable per-example inputs or outputs (integer inputs without an embedding layer, "
            "or no floating output with one row per example); pass `forward_fn`"
        )
    return dependency_matrix(outputs, leaves, seed)


@dataclass
class Examples:
    """A batch and its examples alone, for the batch-consistency check."""

    batch: Any
    singles: list[Any]
    items: list[Any] | None  # dataset items, when pairs can be re-collated
    collate: Callable[[list[Any]], Any] | None
    move: Callable[[Any], Any]  # a collated batch to the module's device, as the training loop moves it


def _same(a: Any, b: Any) -> bool:
    ta, tb = tensors_of(a), tensors_of(b)
    return len(ta) == len(tb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb, strict=True))


def draw_examples(
    loader: DataLoader,
    batch_size: int,
    seed: int,
    split_fn: Callable[[Any], Sequence[Any]] | None,
    move: Callable[[Any], Any],
) -> Examples:
    """``batch_size`` examples of ``loader``'s dataset (drawn with a private generator seeded by ``seed``),
    collated as one batch and one by one (or cut by ``split_fn``), moved by ``move``. Raises
    :class:`CannotCheck` when the data cannot be split into single examples that match the batch."""
    dataset, collate = loader.dataset, loader.collate_fn
    per_item = loader.batch_size is not None
    items: list[Any] | None = None
    if per_item and not isinstance(dataset, IterableDataset):
        n = len(dataset)  # type: ignore[arg-type]
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:batch_size]
        items = [dataset[int(i)] for i in idx]
    elif per_item:
        items = list(itertools.islice(iter(dataset), batch_size))
    if items is not None:
        if len(items) < 2:
            raise CannotCheck(f"the train dataset has {len(items)} example(s); a batch of 1 has nothing to compare")
        batch = collate(items)
        if not _same(batch, collate(items)):  # e.g. MLM masking: a batch and its singles get different masks
            if split_fn is None:
                raise CannotCheck(
                    "the collate_fn is random (two collations of the same examples differ, e.g. MLM masking), "
                    "so examples collated alone would not match the batch; pass `split_fn` to cut the batch "
                    "into unpadded single examples instead"
                )
            items = None
            singles = list(split_fn(batch))
        else:
            singles = [collate([it]) for it in items]
    elif split_fn is not None:
        batch = next(iter(loader))
        singles = list(split_fn(batch))
    else:
        raise CannotCheck(
            "the train loader yields ready-made batches (batch_size=None or no per-item collate_fn), so "
            "examples cannot be re-collated alone; pass `split_fn`"
        )
    b = batch_size_of(batch)
    if b is None or b < 2 or b != len(singles):
        raise CannotCheck(f"could not build a batch of >= 2 examples (batch size {b}, {len(singles)} singles)")
    return Examples(move(batch), [move(s) for s in singles], items, collate if items is not None else None, move)


def batch_mover(trainer: pl.Trainer, module: pl.LightningModule) -> Callable[[Any], Any]:
    """A collated batch to the module's device as the training loop moves it: through the module's (or the
    datamodule's) ``transfer_batch_to_device`` / ``on_after_batch_transfer`` when one is overridden, else by a
    plain device move (Lightning's hook dispatch costs ~50 µs a batch, a sizeable part of a check on a small
    model)."""
    owners = ((module, pl.LightningModule), (getattr(trainer, "datamodule", None), pl.LightningDataModule))
    hooks = ("transfer_batch_to_device", "on_after_batch_transfer")
    if any(owner is not None and is_overridden(h, owner, parent) for owner, parent in owners for h in hooks):
        return module._apply_batch_transfer_handler
    return functools.partial(move_data_to_device, device=module.device)
