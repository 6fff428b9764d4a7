"""How the one-batch memorisation test trains, without a trace on the real run: the batch it draws (the
loader's generators put back), the copy it trains (no collective calls, no dropout, the base learning rate)
and the training loop. Plumbing of :class:`~lightning_debug.callbacks.overfit.OverfitBatchCheck`; its verdict
is :func:`lightning_debug.rules.overfit.assess_memorisation`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning_utilities.core.apply_func import apply_to_collection
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    import lightning.pytorch as pl


@contextlib.contextmanager
def preserved_loader_rng(loader: DataLoader) -> Iterator[None]:
    """Drawing a batch advances the loader's own generators (shuffling); put them back."""
    candidates = [loader.generator, getattr(loader.sampler, "generator", None)]
    batch_sampler = loader.batch_sampler
    if batch_sampler is not None:
        candidates.append(getattr(getattr(batch_sampler, "sampler", None), "generator", None))
    generators = {id(g): g for g in candidates if isinstance(g, torch.Generator)}
    states = {k: g.get_state() for k, g in generators.items()}
    try:
        yield
    finally:
        for k, g in generators.items():
            g.set_state(states[k])


def first_batch(loader: DataLoader) -> Any:
    """The loader's first batch, as if it had never been drawn."""
    with preserved_loader_rng(loader):
        return next(iter(loader))


def first_batches(loaders: Any) -> Any:
    """The first batch of every loader of a collection of them."""
    return apply_to_collection(loaders, DataLoader, first_batch)


def is_loader_collection(loaders: Any) -> bool:
    return loaders is not None and bool(apply_to_collection(loaders, DataLoader, lambda _: True))


def on_cpu(batch: Any) -> Any:
    """A copy of the batch's tensors on the CPU (kept for a later test)."""
    return apply_to_collection(batch, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))


def trainable_copy(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Any, torch.optim.Optimizer]:
    """A deep copy of the module to train, and a fresh optimizer from its ``configure_optimizers`` at the base
    learning rate (schedulers are created but not stepped). ``SyncBatchNorm`` is reverted (no collective
    calls: other ranks simply wait) and dropout is off (memorising needs a deterministic model)."""
    model = copy.deepcopy(pl_module)  # a deep copy drops the trainer reference...
    model._trainer = trainer  # ...which training_step may read
    TorchSyncBatchNorm().revert(model)  # converts the children in place
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.eval()
            m.p = 0.0  # attention kernels (HF SDPA) read `p` from the module whatever its mode
    optimizers, _ = _init_optimizers_and_lr_schedulers(model)
    optimizer = optimizers[0]
    for group in optimizer.param_groups:  # a scheduler may have set a warm-up lr: train at the base lr
        group["lr"] = group.get("initial_lr", group["lr"])
    return model, optimizer


def memorise(
    trainer: pl.Trainer,
    model: Any,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    max_steps: int,
    passed: Callable[[list[float]], bool],
) -> list[float] | None:
    """Up to ``max_steps`` steps on the batch, stopping once ``passed(curve)``; the loss before each step (and
    after the last), with the trainer's gradient clipping. ``None``: ``training_step`` returned no loss."""
    clip = trainer.gradient_clip_val
    curve: list[float] = []
    for step in range(max_steps + 1):
        optimizer.zero_grad(set_to_none=True)
        out = model.training_step(batch, 0)
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(loss, torch.Tensor):
            return None
        curve.append(float(loss.detach()))
        if not math.isfinite(curve[-1]) or passed(curve) or step == max_steps:
            break
        loss.backward()
        if clip and trainer.gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(model.parameters(), float(clip))
        elif clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
        optimizer.step()
    return curve
