"""``BatchConsistencyCheck``: at fit start, is a mini-batch just its examples side by side?

Two properties every correctly batched model has, checked once on B training examples:

- **loss decomposition**: the loss of the padded batch is the mean / token-weighted mean / sum of the losses
  of its examples collated *alone* (no padding). If not, padding or masking is broken; when the mismatch
  appears only in padded examples it is reported as padding dependence.
- **cross-sample independence**: no example's output depends on another example's input. One batched
  vector-Jacobian product gives the whole BxB dependency matrix (not only row 0, where Lightning Bolts looks);
  integer token inputs are differentiated at the output of the input embedding.

Float noise must never raise an alarm and real bugs must never hide under a loose tolerance, so a failure in
the working precision is re-run in float64 on the CPU, where noise shrinks by ~1e8 and a bug stays O(0.1).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import IterableDataset

from lightning_debug import batch_wording as wording
from lightning_debug.arguments import optional_callable, require
from lightning_debug.base import DebugCallback
from lightning_debug.batch_replay import (
    Cost,
    LossReplay,
    rejudge_in_float64,
    replay_dependence,
    replay_losses,
    replay_target_visibility,
)
from lightning_debug.batching import (
    CannotCheck,
    Examples,
    ForwardFn,
    batch_mover,
    default_forward,
    draw_examples,
    first_batch_examples,
)
from lightning_debug.isolation import batch_stat_modules, isolated
from lightning_debug.precision import module_tolerance
from lightning_debug.rules.batch import is_leaking
from lightning_debug.signals import first_dataloader

if TYPE_CHECKING:
    import lightning.pytorch as pl

SplitFn = Callable[[Any], Sequence[Any]]


class BatchConsistencyCheck(DebugCallback):
    """Once at fit start: batched loss vs per-example losses, padding dependence, cross-sample leaks.

    Runs on local rank 0 only (no collective calls, so other ranks simply go ahead), with the model in eval
    mode, without gradients on parameters, logging silenced, RNG states and modes restored.

    Args:
        batch_size: examples B drawn from the train dataset (at most B+2 forward passes and one batched VJP).
            A handful is enough for both properties (any two rows show a leak; the padding probe pairs the most
            padded example with the longest), and the cost grows with B: four keep the check under one
            training step of a small MLP.
        rtol: relative tolerance per example; ``None`` picks it from the parameter dtype and device
            (float32: 1e-5 on CPU, 1e-4 on GPU, 5e-3 with TF32; bf16/fp16: 3e-2; float64: 1e-9).
        atol: absolute tolerance per scored token (``|Δ_i| ≤ rtol·|loss_i| + atol·n_i``).
        dependence_rtol: an off-diagonal gradient above this fraction of the largest self-gradient is a leak.
        ignore_index: label value that marks unscored tokens (for token-weighted means).
        coupled_loss: the loss couples examples by design (contrastive, in-batch negatives): skip the loss
            decomposition, still check the forward outputs for leaks.
        split_fn: ``batch -> [single-example batches]`` for data the check cannot re-collate per example
            (iterable datasets without a per-item collate, pre-batched datasets). The singles must carry no
            padding.
        forward_fn: ``(module, batch) -> outputs`` whose floating tensors with B rows are the per-example
            outputs for the dependency matrix. Default: ``module(...)`` with what its signature accepts.
        seed: which examples are drawn (a private generator: the global RNG is untouched).
    """

    def __init__(
        self,
        batch_size: int = 4,
        *,
        rtol: float | None = None,
        atol: float = 1e-6,
        dependence_rtol: float = 1e-6,
        ignore_index: int = -100,
        coupled_loss: bool = False,
        split_fn: SplitFn | None = None,
        forward_fn: ForwardFn | None = None,
        seed: int = 0,
        raise_errors: bool = False,
        print_findings: bool = True,
        strict: bool | None = None,
        verbose: bool | None = None,
    ) -> None:
        super().__init__(raise_errors=raise_errors, print_findings=print_findings, strict=strict, verbose=verbose)
        require(
            ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 2, "must be an int >= 2"),
            ("rtol", rtol, rtol is None or rtol > 0, "must be > 0 or None"),
            ("atol", atol, atol >= 0, "must be >= 0"),
            ("dependence_rtol", dependence_rtol, 0 < dependence_rtol < 1, "must be in (0, 1)"),
            optional_callable("split_fn", split_fn),
            optional_callable("forward_fn", forward_fn),
        )
        self.batch_size = batch_size
        self.rtol = rtol
        self.atol = atol
        self.dependence_rtol = dependence_rtol
        self.ignore_index = ignore_index
        self.coupled_loss = coupled_loss
        self.split_fn = split_fn
        self.forward_fn: ForwardFn = forward_fn or default_forward
        self.seed = seed
        self.done = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.done:  # once per run, also across checkpoint resume
            return
        loader = first_dataloader(trainer.train_dataloader)
        if loader is not None and isinstance(loader.dataset, IterableDataset):
            # iterating the user's stream could change what training sees: check its first real batch instead,
            # through a per-instance hook that Lightning dispatches for that one batch only
            self.on_train_batch_start = self.on_first_train_batch  # type: ignore[method-assign,assignment]
            return
        self._check(trainer, pl_module, None)

    def on_first_train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        """The first real batch of an ``IterableDataset``, before its step (guarded like the Lightning hooks)."""
        del self.on_train_batch_start  # back to the class's: no per-step dispatch
        self._check(trainer, pl_module, batch)

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, first_batch: Any) -> None:
        self.done = True
        if trainer.local_rank != 0:
            return
        start = time.perf_counter()
        with isolated(pl_module):  # RNG included: datasets and collate functions may draw random numbers
            try:
                ex = self._examples(trainer, pl_module, first_batch)
            except CannotCheck as reason:
                self.skip(trainer, str(reason), key="batch")
                return
            cost = Cost()
            with torch.autocast(pl_module.device.type, enabled=False):
                pl_module.eval()
                loss = self._loss_part(trainer, pl_module, ex, cost)
                dep = self._dependence_part(trainer, pl_module, ex, cost)
                target = replay_target_visibility(pl_module, ex, cost)
        if target is not None and target[0].visible:  # a causal LM scored on the token it reads learns to copy
            message, evidence = wording.target_visible(*target)
            self.emit(trainer, "batch.target_visible", message, data=evidence)
        data: dict[str, Any] = {
            "batch_size": len(ex.singles),
            "precision": str(trainer.precision),
            "autocast": "disabled: checked in the parameters' dtype",
            "batch_stat_layers_in_eval": [name for name, _ in batch_stat_modules(pl_module)],
            "cost": cost.as_dict(time.perf_counter() - start),
        }
        self._report(trainer, pl_module, ex, loss, dep, data)

    def _examples(self, trainer: pl.Trainer, pl_module: pl.LightningModule, first_batch: Any) -> Examples:
        if not pl_module.automatic_optimization:
            raise CannotCheck(
                "manual optimization: `training_step` steps the optimizer itself, so it cannot be replayed"
            )
        loader = first_dataloader(trainer.train_dataloader)
        if loader is None:
            raise CannotCheck("no train DataLoader to draw examples from")
        if first_batch is not None:  # the first real batch of a stream, already on the device: never iter() it
            return first_batch_examples(first_batch, self.split_fn)
        return draw_examples(loader, self.batch_size, self.seed, self.split_fn, batch_mover(trainer, pl_module))

    def _loss_part(
        self, trainer: pl.Trainer, module: pl.LightningModule, ex: Examples, cost: Cost
    ) -> LossReplay | None:
        """The loss decomposition, re-run in float64 where the working precision fails; ``None`` if skipped."""
        if self.coupled_loss:
            self.skip(
                trainer,
                "loss decomposition skipped, the loss is declared coupled (`coupled_loss=True`); cross-sample "
                "dependence of the outputs is still checked",
                key="loss",
            )
            return None
        rtol = self.rtol if self.rtol is not None else module_tolerance(module)[0]
        try:
            loss = replay_losses(module, ex, rtol=rtol, atol=self.atol, ignore_index=self.ignore_index, cost=cost)
        except CannotCheck as reason:
            self.skip(trainer, f"loss decomposition skipped: {reason}", key="loss")
            return None
        rejudge_in_float64(module, ex, loss, atol=self.atol, cost=cost)
        return loss

    def _dependence_part(
        self, trainer: pl.Trainer, module: pl.LightningModule, ex: Examples, cost: Cost
    ) -> dict[str, Any] | None:
        """The cross-sample dependency matrix (and its float64 re-run above the threshold); ``None`` if skipped."""
        try:
            return replay_dependence(
                module, ex, self.forward_fn, seed=self.seed, threshold=self.dependence_rtol, cost=cost
            )
        except CannotCheck as reason:
            self.skip(trainer, f"dependence check skipped: {reason}", key="dependence")
            return None

    def _report(
        self,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        ex: Examples,
        loss: LossReplay | None,
        dep: dict[str, Any] | None,
        data: dict[str, Any],
    ) -> None:
        """A loss finding the float64 re-run confirms, a leak, or else ``batch.ok``; the evidence in ``data``."""
        leaking = dep is not None and is_leaking(dep["rel"], dep.get("rel64"), self.dependence_rtol)
        leak_message = None
        if dep is not None:
            mixing = [name for name, m in batch_stat_modules(module) if m.running_mean is None]
            leak_message = wording.dependence_evidence(
                dep, data, leaking=leaking, threshold=self.dependence_rtol, mixing=mixing
            )
        if loss is not None:
            wording.loss_evidence(loss, data, atol=self.atol)
            if loss.failed:
                self.emit(trainer, *wording.loss_finding(loss, data, leaking=leaking), data=data)
        if leak_message is not None:
            self.emit(trainer, "batch.cross_sample_dependence", leak_message, data=data)
        if (loss is not None and loss.failed) or leaking or (loss is None and dep is None):
            return
        fit = loss.fits[0] if loss is not None else None
        self.emit(trainer, "batch.ok", wording.ok_message(len(ex.singles), fit, dep, data), data=data)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.done = bool(state_dict.get("done", False))
