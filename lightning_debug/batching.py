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
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn

ForwardFn = Callable[[nn.Module, Any], Any]


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
