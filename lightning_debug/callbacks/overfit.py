"""``OverfitBatchCheck``: can the model memorise one batch? (a startup check)

The lecture's bug test: a correct model of reasonable size drives the loss of a tiny training set to ~0. Before
the first training step (or, when that would cost more than 5% of an epoch, once the loss stalls), on a deep
copy of the module and a fresh optimizer from the copy's ``configure_optimizers``, this trains on the first
batch of the train dataloader for up to ``max_steps`` and checks the loss fell near ``floor``. The real run is
untouched: parameters, optimizer state, RNG streams (global and the dataloader's own generators), train/eval
modes and ``self.log`` results are as before.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from torch.utils.data import IterableDataset

from lightning_debug import memorisation
from lightning_debug.base import DebugCallback
from lightning_debug.findings import Finding
from lightning_debug.integrations.hf import is_causal_lm
from lightning_debug.isolation import isolated, silenced_logging
from lightning_debug.rules import loss as loss_rules
from lightning_debug.rules.overfit import (
    asks_why,
    assess_memorisation,
    memorisation_floor,
    passes,
    recognised_smoothing_floor,
    reference_start,
    start_cost,
)
from lightning_debug.signals import context_targets, first_dataloader
from lightning_debug.wording import overfit as words

if TYPE_CHECKING:
    import lightning.pytorch as pl


class OverfitBatchCheck(DebugCallback):
    """Trains a copy of the model on one fixed batch at the start of fit; the loss should fall near ``floor``.

    Passes when, within ``max_steps``, the loss closes at least ``1 - rel_tol`` of its gap to ``floor`` (95% by
    default: the scale-free test) or gets within ``abs_tol`` of ``floor`` (for losses that start close to it).
    A failure is an error when the loss closed less than a quarter of its gap (a bug or no capacity), a warning
    when it got further (it learns, but too slowly for ``max_steps``: learning rate or optimizer); closing three
    quarters counts as a pass (a healthy small transformer gets ~90% of the way in 100 steps).
    When the loss falls and then levels off far above the floor, the model cannot become confident even on one
    batch: that is ``loss.floor_high`` (naming ``log(1 + (C-1)/e)``, the floor of C-class cross-entropy fed
    probabilities, when the level matches it).
    Runs once, on global rank zero only, on a copy of the model: at ``on_train_start`` (``when="start"``), or
    with ``when="stall"`` at the end of the first epoch in which another debug callback reported
    ``loss.not_decreasing`` or ``loss.plateau`` (or any ``loss.*`` finding whose data says ``stalled``: a run
    that ended, or levelled off, far from its floor; then at the end of fit): nothing at start, and the
    lecture's next question once the loss stalls (can the model memorise anything at all?). ``"auto"`` (the
    default) is ``"start"`` when ``max_steps`` is at most 5% of an epoch's steps (or no loss monitor is on the
    trainer to report a stall), else ``"stall"``, with a ``startup.overfit_deferred`` note: the test costs up to
    ``max_steps`` training steps, too much before a short epoch, and a broken loss is then found when the loss
    monitor finds it (a few hundred steps in). The copy makes no collective calls
    (``SyncBatchNorm`` is reverted to ``BatchNorm`` in the copy), so other ranks simply wait in their first
    training step. Dropout modules are switched off in the copy (memorising needs a deterministic model), the
    base learning rate is used (schedulers are created but not stepped) and ``gradient_clip_val`` is applied.

    Args:
        max_steps: optimizer steps on the batch at most; the check stops as soon as it passes.
        floor: the best achievable loss. ``None``: the batch's own floor, exact: targets that share their whole
            context (a language model's first word, duplicated inputs) cost the entropy of their mix, under the
            module's declared label smoothing if any; else 0 (a likelihood).
        rel_tol: pass when ``loss - floor <= rel_tol * (first loss - floor)``.
        abs_tol: or when ``loss - floor <= abs_tol``.
        when: ``"start"`` (before the first training step), ``"stall"`` (once the training loss stalls) or
            ``"auto"`` (at start if that is cheap next to an epoch, else on a stall).
    """

    def __init__(
        self,
        *,
        max_steps: int = 100,
        floor: float | None = None,
        rel_tol: float = 0.05,
        abs_tol: float = 0.02,
        when: str = "auto",
        raise_errors: bool = False,
        print_findings: bool = True,
        strict: bool | None = None,
        verbose: bool | None = None,
    ) -> None:
        super().__init__(raise_errors=raise_errors, print_findings=print_findings, strict=strict, verbose=verbose)
        if max_steps < 1:
            raise ValueError(f"`max_steps` must be >= 1, got {max_steps}")
        if floor is not None and not math.isfinite(floor):
            raise ValueError(f"`floor` must be finite or None, got {floor}")
        if not 0 < rel_tol < 1:
            raise ValueError(f"`rel_tol` must be in (0, 1), got {rel_tol}")
        if abs_tol < 0:
            raise ValueError(f"`abs_tol` must be >= 0, got {abs_tol}")
        if when not in ("start", "stall", "auto"):
            raise ValueError(f"`when` must be 'start', 'stall' or 'auto', got {when!r}")
        self.max_steps = max_steps
        self.floor = floor
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol
        self.when = when
        self.done = False
        self._at_first_batch = False  # a stream's test runs on its first real batch
        self._stream_batch: Any = None  # a stream's first real batch, on the CPU, for a deferred test

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.done:
            return
        loader = first_dataloader(trainer.train_dataloader)
        if loader is not None and isinstance(loader.dataset, IterableDataset):
            # iterating the user's stream could change what training sees: its first real batch is the test's,
            # through a per-instance hook that Lightning dispatches for that one batch only
            self.on_train_batch_start = self.on_first_train_batch  # type: ignore[method-assign,assignment]
        if self.when == "stall" or (self.when == "auto" and self._deferred(trainer)):
            return
        if self.on_train_batch_start is None:
            self._check(trainer, pl_module, trigger=None)
        else:
            self._at_first_batch = True

    def _deferred(self, trainer: pl.Trainer) -> bool:
        """``when="auto"``: defer (and say so once, on resume too) when the test costs over the start budget
        and a loss monitor is there to report a stall."""
        cost = start_cost(self.max_steps, trainer.max_steps, trainer.num_training_batches)
        if cost.affordable or not self.watched_on(trainer, "loss.plateau"):
            return False
        if trainer.global_rank == 0 and not self.has_finding("startup.overfit_deferred"):
            self._emit(trainer, words.deferred(self.max_steps, cost))
        return True

    def on_first_train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        """The first real batch of a stream: tested now (``at start``), or kept on the CPU for a later test."""
        del self.on_train_batch_start  # back to the class's: no per-step dispatch
        if self._at_first_batch:
            self._check(trainer, pl_module, trigger=None, batch=batch)
        elif trainer.global_rank == 0:
            self._stream_batch = memorisation.on_cpu(batch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on_stall(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run that ended with a stall, or still far from its floor, gets the test too (after its verdict)."""
        self._on_stall(trainer, pl_module)

    def _on_stall(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when != "start" and not self.done:
            trigger = next((f for f in self.findings_on(trainer) if asks_why(f.check, f.data)), None)
            if trigger is not None:
                self._check(trainer, pl_module, trigger)

    def _check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, trigger: Finding | None, batch: Any = None
    ) -> None:
        """The test on ``batch`` (a stream's first real batch), else the kept one, else the loader's first."""
        if self.done:
            return
        self.done = True
        if trainer.global_rank != 0:
            return
        if not pl_module.automatic_optimization:
            self.skip(
                trainer, "manual optimization: the copy's training_step would step the real optimizers", key="manual"
            )
            return
        loaders = trainer.train_dataloader
        if not memorisation.is_loader_collection(loaders):
            self.skip(
                trainer,
                f"the train dataloader is not a DataLoader (or a collection of them): {type(loaders)}",
                key="loader",
            )
            return
        with isolated(pl_module):
            if batch is None and self._stream_batch is not None:
                batch = trainer.strategy.batch_to_device(self._stream_batch)
            elif batch is None and isinstance(getattr(first_dataloader(loaders), "dataset", None), IterableDataset):
                self.skip(trainer, "the stream's first batch was not kept, and a check never iterates a stream")
                return
            elif batch is None:
                batch = trainer.strategy.batch_to_device(memorisation.first_batches(loaders))
            self._stream_batch = None
            self._run(trainer, pl_module, batch, trigger)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, trigger: Finding | None) -> None:
        """Train a copy on the batch (its ``self.log`` silenced), judge the curve, word and emit the verdict."""
        began = time.perf_counter()
        smoothing = loss_rules.declared_label_smoothing(pl_module)
        pairs = context_targets(batch, causal=is_causal_lm(pl_module)) if self.floor is None else None
        floor = memorisation_floor(loss_rules.choose_floor(self.floor, smoothing), pairs, smoothing)
        classes = loss_rules.output_classes(pl_module)
        start = trigger.data.get("start") if trigger is not None else None  # the run's first loss, if known
        model, optimizer = memorisation.trainable_copy(trainer, pl_module)

        def passed(curve: list[float]) -> bool:
            return passes(curve[-1], reference_start(curve[0], start), floor.value, self.rel_tol, self.abs_tol)

        with silenced_logging(model):
            curve = memorisation.memorise(trainer, model, optimizer, batch, self.max_steps, passed)
        del model, optimizer
        if curve is None:
            self.skip(trainer, "training_step returned no loss tensor", key="loss")
            return
        m = assess_memorisation(curve, floor.value, self.rel_tol, self.abs_tol, classes, start)
        recognised = recognised_smoothing_floor(curve, classes) if m.status not in ("passed", "mostly") else None
        if recognised is not None and recognised.value > floor.value:  # an undeclared label smoothing's floor
            floor = recognised
            m = assess_memorisation(curve, floor.value, self.rel_tol, self.abs_tol, classes, start)
        settings = {"max_steps": self.max_steps, "rel_tol": self.rel_tol, "abs_tol": self.abs_tol}
        first, seconds = reference_start(curve[0], start), time.perf_counter() - began
        self._emit(trainer, words.memorisation(m, curve, floor, first, seconds, trigger, trainer.global_step, settings))

    def _emit(self, trainer: pl.Trainer, worded: words.Worded) -> None:
        self.emit(trainer, worded.check, worded.message, data=worded.data, severity=worded.severity)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.done = bool(state_dict.get("done", False))
