"""``OverfitBatchCheck``: can the model memorise one batch? (a startup check)

The lecture's bug test: a correct model of reasonable size drives the loss of a tiny training set to ~0. Before
the first training step (or, when that would cost more than 5% of an epoch, once the loss stalls), on a deep
copy of the module and a fresh optimizer from the copy's ``configure_optimizers``, this trains on the first
batch of the train dataloader for up to ``max_steps`` and checks the loss fell near ``floor``. The real run is
untouched: parameters, optimizer state, RNG streams (global and the dataloader's own generators), train/eval
modes and ``self.log`` results are as before.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning_utilities.core.apply_func import apply_to_collection
from torch.utils.data import DataLoader, IterableDataset

from lightning_debug.base import DebugCallback
from lightning_debug.findings import Finding
from lightning_debug.integrations.hf import is_causal_lm
from lightning_debug.isolation import isolated, silenced_logging
from lightning_debug.rules import loss as loss_rules
from lightning_debug.rules.overfit import Memorisation, assess_memorisation, batch_floor, passes, reference_start
from lightning_debug.signals import context_targets, first_dataloader

if TYPE_CHECKING:
    import lightning.pytorch as pl

STALL_FINDINGS = ("loss.not_decreasing", "loss.plateau")  # with when="stall"/"auto", the findings that run the check
START_BUDGET = 0.05  # with when="auto", run at start only if max_steps is at most this share of an epoch's steps


@contextlib.contextmanager
def _preserved_loader_rng(loader: DataLoader) -> Iterator[None]:
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


def _is_stall(finding: Finding) -> bool:
    """A loss finding that asks why: a stall, or a run that ended (or levelled off) far from its floor."""
    return finding.check in STALL_FINDINGS or (
        finding.check.startswith("loss.") and finding.data.get("stalled") is True
    )


def _first_batch(loader: DataLoader) -> Any:
    with _preserved_loader_rng(loader):
        return next(iter(loader))


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
        self._classes: int | None = None  # the module's class count, for the probability-input signature
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
        """``when="auto"``: defer (and say so once, on resume too) when the test costs over the start budget."""
        run_steps = trainer.max_steps if trainer.max_steps >= 0 else math.inf
        epoch_steps = min(trainer.num_training_batches, run_steps)
        share = self.max_steps / epoch_steps if epoch_steps > 0 else math.inf
        if share <= START_BUDGET or not self.watched_on(trainer, "loss.plateau"):
            return False
        if trainer.global_rank == 0 and not self.has_finding("startup.overfit_deferred"):
            self._defer(trainer, epoch_steps, share, "run" if run_steps < trainer.num_training_batches else "epoch")
        return True

    def on_first_train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        """The first real batch of a stream: tested now (``at start``), or kept on the CPU for a later test."""
        del self.on_train_batch_start  # back to the class's: no per-step dispatch
        if self._at_first_batch:
            self._check(trainer, pl_module, trigger=None, batch=batch)
        elif trainer.global_rank == 0:
            self._stream_batch = apply_to_collection(batch, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))

    def _defer(self, trainer: pl.Trainer, epoch_steps: float, share: float, span: str) -> None:
        self.emit(
            trainer,
            "startup.overfit_deferred",
            f"One-batch memorisation test deferred: up to {self.max_steps} steps on one batch would be {share:.0%} "
            f"of a {epoch_steps:g}-step {span} (budget {START_BUDGET:.0%}). It runs if the training loss stalls "
            f"({' or '.join(STALL_FINDINGS)}) or the run ends far from its floor.",
            data={"max_steps": self.max_steps, "epoch_steps": epoch_steps, "share": share, "budget": START_BUDGET},
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on_stall(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run that ended with a stall, or still far from its floor, gets the test too (after its verdict)."""
        self._on_stall(trainer, pl_module)

    def _on_stall(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when != "start" and not self.done:
            trigger = next((f for f in self.findings_on(trainer) if _is_stall(f)), None)
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
        if loaders is None or not apply_to_collection(loaders, DataLoader, lambda _: True):
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
                batch = trainer.strategy.batch_to_device(apply_to_collection(loaders, DataLoader, _first_batch))
            self._stream_batch = None
            self._run(trainer, pl_module, batch, trigger)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, trigger: Finding | None) -> None:
        began = time.perf_counter()
        floor = self._floor(pl_module, batch)
        self._classes = loss_rules.output_classes(pl_module)
        model = copy.deepcopy(pl_module)  # a deep copy drops the trainer reference...
        model._trainer = trainer  # ...which training_step may read; its self.log is silenced below
        TorchSyncBatchNorm().revert(model)  # converts the children in place: no collective calls in the copy
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.modules.dropout._DropoutNd):
                m.eval()
                m.p = 0.0  # attention kernels (HF SDPA) read `p` from the module whatever its mode
        optimizers, _ = _init_optimizers_and_lr_schedulers(model)
        optimizer = optimizers[0]
        for group in optimizer.param_groups:  # a scheduler may have set a warm-up lr: train at the base lr
            group["lr"] = group.get("initial_lr", group["lr"])
        start = trigger.data.get("start") if trigger is not None else None  # the run's first loss, if known
        with silenced_logging(model):
            curve = self._memorise(trainer, model, optimizer, batch, floor.value, start)
        if curve:
            self._report(trainer, curve, floor, time.perf_counter() - began, trigger, start)
        del model, optimizer

    def _memorise(
        self, trainer: pl.Trainer, model: Any, optimizer: Any, batch: Any, floor: float, start: float | None
    ) -> list[float]:
        """Up to ``max_steps`` steps on the batch; the loss before each (and after the last). Empty: no loss."""
        clip = trainer.gradient_clip_val
        curve: list[float] = []
        for step in range(self.max_steps + 1):
            optimizer.zero_grad(set_to_none=True)
            out = model.training_step(batch, 0)
            loss = out.get("loss") if isinstance(out, Mapping) else out
            if not isinstance(loss, torch.Tensor):
                self.skip(trainer, "training_step returned no loss tensor", key="loss")
                return []
            curve.append(float(loss.detach()))
            done = passes(curve[-1], reference_start(curve[0], start), floor, self.rel_tol, self.abs_tol)
            if not math.isfinite(curve[-1]) or done or step == self.max_steps:
                break
            loss.backward()
            if clip and trainer.gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(model.parameters(), float(clip))
            elif clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
            optimizer.step()
        return curve

    def _floor(self, pl_module: pl.LightningModule, batch: Any) -> loss_rules.Floor:
        """The declared floor, else the batch's own (targets that share a context, label smoothing), else 0."""
        smoothing = loss_rules.declared_label_smoothing(pl_module)
        floor = loss_rules.choose_floor(self.floor, smoothing)
        pairs = context_targets(batch, causal=is_causal_lm(pl_module)) if self.floor is None else None
        if not pairs:
            return floor
        own = batch_floor(pairs, smoothing)
        if own.shared == 0 or own.value <= floor.value:
            return floor
        return loss_rules.Floor(
            own.value, f"this batch's own: {own.shared} of {own.targets} targets share their context with another"
        )

    def _report(
        self,
        trainer: pl.Trainer,
        curve: list[float],
        floor: loss_rules.Floor,
        seconds: float,
        trigger: Finding | None,
        start: float | None,
    ) -> None:
        m = assess_memorisation(curve, floor.value, self.rel_tol, self.abs_tol, self._classes, start)
        steps = len(curve) - 1
        model = "A copy of the model" if trigger is None else f"A copy of the model at step {trainer.global_step}"
        first = reference_start(curve[0], start)
        why = (
            f" (run because of {trigger.check}; progress measured from the run's start {first:.4g})"
            if trigger is not None
            else ""
        )
        finite = all(map(math.isfinite, curve))
        data = {
            "trigger": trigger.check if trigger else None, "start": first, "steps": steps,
            "max_steps": self.max_steps, "seconds": seconds,
            "first_loss": curve[0], "final_loss": curve[-1], "best_loss": min(curve) if finite else math.nan,
            "floor": floor.value, "floor_source": floor.source, "rel_tol": self.rel_tol, "abs_tol": self.abs_tol,
            "curve": curve, "target": m.target, "closed": m.closed, "status": m.status,
        }  # fmt: skip
        change = f"loss {curve[0]:.4g} -> {curve[-1]:.4g}"
        if m.status in ("passed", "mostly"):
            how = "memorised one batch" if m.status == "passed" else f"closed {m.closed:.0%} of the gap on one batch"
            message = f"{model} {how}: {change} in {steps} steps (floor {floor.describe()}; {seconds:.2f} s){why}."
            self.emit(trainer, "startup.overfit_ok", message, data=data)
        elif m.status == "floor_high":
            self._report_floor_high(trainer, m, f"{model} {change} in {steps} steps{why}", floor, data)
        else:
            slow = m.status == "slow"
            self.emit(
                trainer,
                "startup.cannot_overfit",
                f"{model} could not memorise one batch{why}: {change} after {steps} steps, {m.closed:.0%} of the "
                f"way to the floor {floor.describe()} (needed <= {m.target:.4g})"
                + ("; it learns, but slowly: raise the learning rate or `max_steps`" if slow else "")
                + f". Check took {seconds:.2f} s.",
                data=data,
                severity="warning" if slow else None,
            )

    def _report_floor_high(
        self, trainer: pl.Trainer, m: Memorisation, what: str, floor: loss_rules.Floor, data: dict[str, Any]
    ) -> None:
        """The curve learned, then levelled off far above the floor: the model cannot become confident. A warning
        when the level is the signature of probabilities fed to cross-entropy; else info, since label smoothing
        written into the loss call, soft targets or a data entropy the checks cannot see level off the same way."""
        c = m.probability_classes
        signature = (
            f" {m.level:.4g} is just above log(1 + (C-1)/e) = {loss_rules.probability_input_floor(c):.4g} for "
            f"C = {c}: the floor of {c}-class cross-entropy fed probabilities instead of logits."
            if c is not None
            else ""
        )
        unknown = "" if c is not None else " Or the loss has a floor the checks do not know (set `floor`)."
        self.emit(
            trainer,
            "loss.floor_high",
            f"{what}: it levelled off at {m.level:.4g}, {1 - m.closed:.0%} of the way from the floor "
            f"{floor.describe()} to where it started: the model cannot become confident on one batch."
            f"{signature}{unknown}",
            data={**data, "level": m.level, "probability_classes": c},
            severity="warning" if c is not None else None,
        )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.done = bool(state_dict.get("done", False))
