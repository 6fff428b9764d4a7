"""What the loss monitor collects, and how: a step's values on the device, the bins of each series on the
host, and what it reads of the run (its planned length, its learning rate). Plumbing of
:class:`~lightning_debug.callbacks.loss.LossConvergenceMonitor`; its decisions are in
:mod:`lightning_debug.rules.loss`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_debug.rules.loss import Schedule, bin_medians, schedule_for
from lightning_debug.signals import undo_accumulation

if TYPE_CHECKING:
    import lightning.pytorch as pl

MAX_BINS = 1024  # older bins are merged pairwise beyond this, so memory and state stay bounded


@dataclass
class LossSeries:
    """One tracked loss series (the total or a component): its bins, all host floats."""

    name: str
    start: float | None = None
    values: list[float] = field(default_factory=list)  # bin medians (NaN when a bin had no finite value)
    xs: list[float] = field(default_factory=list)  # bin centres, in training batches seen

    def add(self, values: list[float], xs: list[float]) -> None:
        self.values += values
        self.xs += xs
        if len(self.values) > MAX_BINS:
            v, x = np.asarray(self.values), np.asarray(self.xs)
            even = len(v) // 2 * 2
            self.values = np.nanmean(v[:even].reshape(-1, 2), axis=1).tolist() + v[even:].tolist()
            self.xs = x[:even].reshape(-1, 2).mean(axis=1).tolist() + x[even:].tolist()

    def finite(self, since: float = -math.inf) -> tuple[np.ndarray, np.ndarray]:
        """The finite bins from batch ``since`` on, and their centres."""
        v, x = np.asarray(self.values), np.asarray(self.xs)
        keep = (x >= since) & np.isfinite(v)
        return v[keep], x[keep]

    def last(self) -> float:
        """The latest finite bin (NaN if none)."""
        finite = [v for v in self.values if math.isfinite(v)]
        return finite[-1] if finite else math.nan


@dataclass(frozen=True)
class Rows:
    """Host rows pulled at a check: their global steps and values (rows, series), the batches before them,
    the first row not tested for NaN/Inf before, and how many of them were binned."""

    steps: list[int]
    values: np.ndarray
    first_batch: int
    fresh: int
    binned: int


class LossRecorder:
    """The loss monitor's collection, kept as its attributes (they are its checkpointed state): each step's
    values stay on their device until a check pulls them all at once; the host rows are binned, full bins
    only until the end of the run. Also what it reads of the run: its schedule (from the planned length), the
    learning rate (its peak, and at the last check) and the last validation loss."""

    series: list[LossSeries]

    def _init_recorder(self, names: list[str], check_every: int | None, warmup: int | None) -> None:
        self.series = [LossSeries(name) for name in names]
        self._step = 0  # the global step the next batch's training_step sees
        self._step_counter: Any = None  # its `completed` is trainer.global_step, once training started
        self.schedule = schedule_for(None, check_every=check_every, warmup=warmup)
        self.batches = 0  # training batches recorded
        self._tail: list[tuple[int, list[float]]] = []  # (global step, values) pulled but not yet binned
        self._pending: list[torch.Tensor] = []  # this step's values per batch, on the loss's device (no sync)
        self._steps: list[int] = []  # global step of each pending row (host ints)
        self._finite_upto = 0  # batches whose values were already tested for NaN/Inf (each is reported once)
        self._lr_group: dict[str, Any] | None = None  # where the hook reads the rate (found again at each check)
        self.peak_lr = 0.0  # largest learning rate seen (a host float: reading it never syncs)
        self.check_lr = 0.0  # the learning rate at the previous check or the first batch (rising: warming up)
        self.val_level = math.nan  # the last validation loss (read once per validation run)

    def _plan(self, trainer: pl.Trainer, check_every: int | None, warmup: int | None) -> None:
        """The schedule of the planned run; a resumed run keeps the one its bins were made with."""
        if self.batches == 0:
            self.schedule = schedule_for(planned_batches(trainer), check_every=check_every, warmup=warmup)

    def _read_validation(self, trainer: pl.Trainer, key: str) -> None:
        value = trainer.callback_metrics.get(key)
        if isinstance(value, torch.Tensor) and not trainer.sanity_checking:
            self.val_level = float(value)

    def _record(self, values: torch.Tensor, step: int, lr: Any) -> None:
        """One batch's values (a device tensor, not read) at global ``step``, and the learning rate it used (as
        the optimizer holds it: a tensor learning rate is not read, as :func:`current_lr`)."""
        self._pending.append(values)
        self._steps.append(step)
        if isinstance(lr, (int, float)):
            if lr > self.peak_lr:
                self.peak_lr = float(lr)  # the peak must be seen before a schedule decays it
            if self.batches == 0:
                self.check_lr = float(lr)  # the reference for "still warming up" at the first check
        self.batches += 1

    def _lr_at_check(self, trainer: pl.Trainer) -> tuple[float | None, float]:
        """The learning rate now, and at the previous check (which it becomes)."""
        self._lr_group = first_param_group(trainer)  # an optimizer replaced since: the next steps read its own
        lr, before = current_lr(trainer), self.check_lr
        self.check_lr = lr if lr is not None else before
        return lr, before

    def _pull(self) -> None:
        """Move the pending rows to the host tail (the one transfer per check)."""
        self._tail.extend(zip(self._steps, host_rows(self._pending), strict=True))
        self._pending, self._steps = [], []

    def _take_rows(self, bin_steps: int, final: bool) -> Rows | None:
        """Pull, and bin the tail's full bins (all of it at the end); ``None`` when nothing is new."""
        self._pull()
        if not self._tail:
            return None
        first_batch = self.batches - len(self._tail)  # batches seen before the tail's first row
        steps, values = [s for s, _ in self._tail], np.asarray([row for _, row in self._tail], dtype=float)
        fresh = max(0, self._finite_upto - first_batch)
        self._finite_upto = max(self._finite_upto, first_batch + len(values))
        n = len(values) if final else len(values) // bin_steps * bin_steps
        if n:
            add_rows(self.series, values[:n], first_batch, bin_steps)
            self._tail = self._tail[n:]
        return Rows(steps, values, first_batch, fresh, n)

    def _recorder_state(self) -> dict[str, Any]:
        pending = [[s, row] for s, row in zip(self._steps, host_rows(self._pending), strict=True)]
        return {
            "batches": self.batches,
            "peak_lr": self.peak_lr,
            "check_lr": self.check_lr,
            "finite_upto": self._finite_upto,
            "val_level": self.val_level,
            "schedule": asdict(self.schedule),
            "series": [asdict(s) for s in self.series],
            "tail": [[step, row] for step, row in self._tail] + pending,
        }

    def _load_recorder_state(self, state: dict[str, Any]) -> None:
        self.batches = int(state.get("batches", 0))
        self.peak_lr = float(state.get("peak_lr", 0.0))
        self.check_lr = float(state.get("check_lr", 0.0))
        self._finite_upto = int(state.get("finite_upto", 0))
        self.val_level = float(state.get("val_level", math.nan))
        if "schedule" in state:
            self.schedule = Schedule(**state["schedule"])
        saved = {d["name"]: d for d in state.get("series", [])}
        self.series = [LossSeries(**saved[s.name]) if s.name in saved else s for s in self.series]
        self._tail = [(int(step), list(row)) for step, row in state.get("tail", [])]
        self._pending, self._steps = [], []


def add_rows(series: list[LossSeries], values: np.ndarray, first_batch: int, bin_steps: int) -> None:
    """Bin host rows (rows, series) that follow ``first_batch`` batches into every series; a series' first
    finite value is its start (the loss before any update acted)."""
    medians = bin_medians(values, bin_steps)
    n = len(values)
    xs = [first_batch + (i * bin_steps + min((i + 1) * bin_steps, n) + 1) / 2 for i in range(len(medians))]
    finite = np.isfinite(values)
    for j, one in enumerate(series):
        if one.start is None and finite[:, j].any():
            one.start = float(values[np.argmax(finite[:, j]), j])
        one.add(medians[:, j].tolist(), xs)


class Unreadable(Exception):
    """The step's values cannot be read; ``key`` names what is missing (the returned loss or logged keys)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key


def step_values(
    trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, key: str | None, logged_keys: list[str]
) -> torch.Tensor:
    """This step's values (the loss, then the logged keys) as one device tensor, without reading them
    (:class:`Unreadable` if they are not there). The returned loss is scaled back up where Lightning divided
    it for accumulation."""
    if key is None:  # cheap tests first: this runs on every training step
        loss = outputs.get("loss") if type(outputs) is dict or isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            raise Unreadable("loss", "training_step returned no loss tensor; pass `key=` naming a logged loss")
        loss = undo_accumulation(trainer, pl_module, loss)
        if not logged_keys:
            return _scalar(loss)
    parts: list[Any] = [] if key is not None else [loss]
    if logged_keys:
        metrics = trainer.callback_metrics
        missing = [k for k in logged_keys if not isinstance(metrics.get(k), torch.Tensor)]
        if missing:
            raise Unreadable("keys", f"logged metric(s) {missing} not found in trainer.callback_metrics")
        parts.extend(metrics[k] for k in logged_keys)
    if len(parts) == 1:
        return _scalar(parts[0])
    return torch.stack([p.detach().float().mean() for p in parts])


def _scalar(value: torch.Tensor) -> torch.Tensor:
    value = value.detach() if value.requires_grad else value  # Lightning's is already detached
    return value if value.dim() == 0 else value.float().mean()


def host_rows(pending: list[torch.Tensor]) -> list[list[float]]:
    """Device rows to host lists: the one transfer per check (one per row if the module changed devices)."""
    if not pending:
        return []
    try:  # one op for the rows of a check (they share a shape: the loss, or the loss and the logged keys)
        return torch.stack(pending).reshape(len(pending), -1).tolist()
    except RuntimeError:  # rows on several devices, or of several shapes: not checked per step (it would cost more)
        return [v.reshape(-1).tolist() for v in pending]


def planned_batches(trainer: pl.Trainer) -> float | None:
    """Training batches the run plans (optimizer steps times accumulation), if the trainer can tell."""
    try:
        steps = float(trainer.estimated_stepping_batches)
    except Exception:  # an iterable dataset without a length, no max_steps
        return None
    return steps * trainer.accumulate_grad_batches if math.isfinite(steps) else None


def first_param_group(trainer: pl.Trainer) -> dict[str, Any] | None:
    """The first optimizer's first parameter group (schedulers change its ``lr`` in place), if any."""
    optimizers = trainer.optimizers
    return optimizers[0].param_groups[0] if optimizers and optimizers[0].param_groups else None


def current_lr(trainer: pl.Trainer) -> float | None:
    """The first parameter group's learning rate, if it is a plain number (reading it never syncs a device)."""
    group = first_param_group(trainer)
    lr = group.get("lr") if group is not None else None
    return float(lr) if isinstance(lr, (int, float)) else None
