"""``LossConvergenceMonitor``: is the training loss going down, and towards a good value?

The debugging lecture's first rule: before looking at dev accuracy, look at the training loss. This callback
keeps the loss of every step on the loss's own device (no host-device sync), pulls it to the host
once every ``check_every_n_steps`` and summarises it into bins (the median of every 10 steps: robust to spikes
and to small-batch noise). Decisions use those bins only:

- ``loss.nonfinite``: a NaN/Inf value in any tracked series (the exact step is in the buffer).
- ``loss.diverging``: a bin sits ``diverge_factor`` times further from the floor than the best level so far
  (and by a margin that matters), or the smoothed loss rises with a significant trend (Theil-Sen CI above 0,
  Mann-Kendall p-value below ``1 - confidence``).
- ``loss.not_decreasing`` / ``loss.plateau`` / ``loss.converged``: after warm-up, the trend over the window is
  *flat* when even the fastest descent its confidence interval allows would close less than ``min_progress``
  of the remaining gap to ``floor`` if training ran as long again. Flat near the start level is
  not-decreasing; flat far above the floor, and falling at most half as fast as on average since the start,
  is a plateau (a steady slow descent is not); a level near the floor is converged.

Before the first check the values are also pulled at batches 1, 2, 4, 8, ... (``log2(check_every_n_steps)``
transfers in all) for NaN/Inf and for a jump in a complete bin: a learning rate far too high blows up within a
few steps, and is then reported within about twice the steps it took instead of at the first check.

Thresholds are fractions of the starting gap (first loss minus ``floor``), so they do not depend on the
loss's scale, and the flatness horizon grows with the run, so slow-but-steady training is not a plateau.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_debug.base import DebugCallback
from lightning_debug.sinks import Sink
from lightning_debug.stats import MIN_TREND_POINTS, Trend, trend

if TYPE_CHECKING:
    import lightning.pytorch as pl

BIN_STEPS = 10  # steps per bin: the median of 10 losses ignores single spikes and damps small-batch noise
MAX_BINS = 1024  # older bins are merged pairwise beyond this, so memory and state stay bounded
MAX_TREND_POINTS = 64  # Theil-Sen is O(n^2): the window is re-binned to at most this many points
LEVELLED_OFF = 0.5  # a plateau falls at most this fraction of its average rate since the start (else: just slow)
ANNEALED = 0.5  # a schedule that took the learning rate below this fraction of its peak explains a flat loss
PLATEAU_CHECKS = 2  # consecutive checks a plateau must hold at: one flat window can be a pause before progress
_RESERVED = ("smoothed", "slope")


@dataclass
class _Series:
    """One tracked loss series (the total or a component): its bins and reference levels, all host floats."""

    name: str
    floor: float
    start: float | None = None
    best: float | None = None
    values: list[float] = field(default_factory=list)  # bin medians (NaN when a bin had no finite value)
    xs: list[float] = field(default_factory=list)  # bin centres, in training batches seen

    def add(self, value: float, x: float) -> None:
        self.values.append(value)
        self.xs.append(x)
        if math.isfinite(value):
            self.best = value if self.best is None else min(self.best, value)
        if len(self.values) > MAX_BINS:
            v, xs = np.asarray(self.values), np.asarray(self.xs)
            even = len(v) // 2 * 2
            self.values = np.nanmean(v[:even].reshape(-1, 2), axis=1).tolist() + v[even:].tolist()
            self.xs = xs[:even].reshape(-1, 2).mean(axis=1).tolist() + xs[even:].tolist()

    def window(self, since: float) -> tuple[np.ndarray, np.ndarray]:
        """Finite bins with centre >= ``since``, re-binned to at most MAX_TREND_POINTS points."""
        v, x = np.asarray(self.values), np.asarray(self.xs)
        keep = (x >= since) & np.isfinite(v)
        v, x = v[keep], x[keep]
        if len(v) > MAX_TREND_POINTS:  # medians of equal groups; the oldest remainder is dropped
            g = -(-len(v) // MAX_TREND_POINTS)
            keep_n = len(v) // g * g
            v = np.median(v[-keep_n:].reshape(-1, g), axis=1)
            x = x[-keep_n:].reshape(-1, g).mean(axis=1)
        return v, x

    @property
    def level(self) -> float:
        """The latest smoothed value (last finite bin median)."""
        finite = [v for v in self.values if math.isfinite(v)]
        return finite[-1] if finite else math.nan


class LossConvergenceMonitor(DebugCallback):
    """Watches the training loss for NaN/Inf, divergence, no progress, plateaus and convergence.

    Zero-config: it reads the loss ``training_step`` returns. Defaults are set to catch a far-too-high or
    far-too-low learning rate and a capacity bottleneck while staying silent on healthy runs with batch sizes
    from 8 to 1024, BatchNorm and dropout.

    Args:
        key: read this logged metric (from ``trainer.callback_metrics``) instead of the returned loss.
        components: ``{name: logged_key}`` of loss parts to track too (e.g. ``{"nll": "train_nll",
            "reg": "train_reg"}``). Each is checked for NaN/Inf and logged; a total that is flat while a
            component still falls significantly is not called a plateau (regularisation keeps the total up).
        floor: the best achievable loss (0 for a likelihood; higher for e.g. language-model pre-training).
        check_every_n_steps: training batches between pulls to the host (the only transfers it makes).
        window: training batches the trend is fitted over; ``None`` uses the last half of the batches seen
            so far, so the test adapts to the run's length.
        warmup_steps: no not-decreasing / plateau / converged verdict before this many batches.
        min_drop: the loss has "moved" once it fell by this fraction of the starting gap (start - floor).
        min_progress: flat = at the fastest rate the slope's confidence interval allows, training as long
            again would close less than this fraction of the remaining gap.
        plateau_level: a flat loss is a plateau while its gap to ``floor`` exceeds this fraction of the
            starting gap.
        converged_level: converged once the gap to ``floor`` is within this fraction of the starting gap.
        diverge_factor: a bin this many times further from ``floor`` than the best level so far diverges...
        diverge_margin: ...if it also rose by more than this fraction of the starting gap (the same margin
            applies to a significant upward trend over the window).
        confidence: confidence level of the slope intervals; trend tests use ``p < 1 - confidence``.
    """

    def __init__(
        self,
        *,
        key: str | None = None,
        components: Mapping[str, str] | None = None,
        floor: float = 0.0,
        check_every_n_steps: int = 200,
        window: int | None = None,
        warmup_steps: int = 200,
        min_drop: float = 0.1,
        min_progress: float = 0.2,
        plateau_level: float = 0.2,
        converged_level: float = 0.05,
        diverge_factor: float = 3.0,
        diverge_margin: float = 0.25,
        confidence: float = 0.95,
        strict: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__(strict=strict, verbose=verbose)
        if not math.isfinite(floor):
            raise ValueError(f"`floor` must be finite, got {floor}")
        if check_every_n_steps < BIN_STEPS:
            raise ValueError(f"`check_every_n_steps` must be >= {BIN_STEPS}, got {check_every_n_steps}")
        if window is not None and window < 2 * check_every_n_steps:
            raise ValueError(f"`window` must be None or >= 2 * check_every_n_steps, got {window}")
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}")
        for name, value in (
            ("min_drop", min_drop),
            ("min_progress", min_progress),
            ("plateau_level", plateau_level),
            ("converged_level", converged_level),
            ("diverge_margin", diverge_margin),
            ("confidence", confidence),
        ):
            if not 0 < value < 1:
                raise ValueError(f"`{name}` must be in (0, 1), got {value}")
        if converged_level >= plateau_level:
            raise ValueError(f"`converged_level` ({converged_level}) must be below `plateau_level` ({plateau_level})")
        if diverge_factor <= 1:
            raise ValueError(f"`diverge_factor` must be > 1, got {diverge_factor}")
        components = dict(components or {})
        for name in components:
            if name in _RESERVED:
                raise ValueError(f"`components` name {name!r} is reserved; pick another name")
        self.key = key
        self.components = components
        self._logged_keys = ([key] if key is not None else []) + list(components.values())  # read every step
        self.floor = float(floor)
        self.check_every_n_steps = check_every_n_steps
        self.window = window
        self.warmup_steps = warmup_steps
        self.min_drop = min_drop
        self.min_progress = min_progress
        self.plateau_level = plateau_level
        self.converged_level = converged_level
        self.diverge_factor = diverge_factor
        self.diverge_margin = diverge_margin
        self.confidence = confidence
        self.series = [_Series(key or "loss", self.floor)] + [_Series(name, 0.0) for name in components]
        self.batches = 0  # training batches recorded
        self._tail: list[tuple[int, list[float]]] = []  # (global step, values) pulled but not yet binned
        self._pending: list[torch.Tensor] = []  # this step's values per batch, on the loss's device (no sync)
        self._steps: list[int] = []  # global step of each pending row (host ints)
        self._step = 0
        self.last_trend: Trend | None = None
        self.peak_lr = 0.0  # largest learning rate seen (a host float: reading it never syncs)
        self.plateau_checks = 0  # consecutive checks at which the plateau condition held
        self._finite_upto = 0  # batches whose values were already tested for NaN/Inf (each is reported once)

    @functools.cached_property
    def state_key(self) -> str:
        return self._generate_state_key(key=self.key, components=sorted(self.components.items()))  # built once

    # ------------------------------------------------------------------ per step: device only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        Sink(trainer).define_metric("debug/loss/smoothed", summary="min,last")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step = trainer.global_step  # after a resume has restored it

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step, self._step = self._step, trainer.global_step  # the step training_step saw; the next batch sees this
        values = self._read(trainer, pl_module, outputs)
        if values is None:
            return
        if self._pending and values.device != self._pending[0].device:
            self._pull()  # the rows pending on the previous device
        self._pending.append(values)
        self._steps.append(step)
        lr = _current_lr(trainer)  # a host float: the peak must be seen before a schedule decays it
        if lr is not None and lr > self.peak_lr:
            self.peak_lr = lr
        self.batches += 1
        if self.batches % self.check_every_n_steps == 0:
            self._check(trainer)
        elif self.batches < self.check_every_n_steps and self.batches & (self.batches - 1) == 0:
            self._probe(trainer)

    def _probe(self, trainer: pl.Trainer) -> None:
        """Early in the run, one transfer: NaN/Inf in any value so far, and a jump in any complete bin. A learning
        rate far too high blows up within a few steps; trend verdicts still wait for the checks."""
        self._pull()
        if self._tail:
            first_batch = self.batches - len(self._tail)
            self._report_nonfinite(
                trainer, [step for step, _ in self._tail], np.asarray([row for _, row in self._tail]), first_batch
            )
            self._bin(trainer)

    def _read(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> torch.Tensor | None:
        """This step's values as one device tensor, without reading them."""
        parts: list[Any] = []
        if self.key is None:
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if not isinstance(loss, torch.Tensor):
                self._skip(trainer, "training_step returned no loss tensor; pass `key=` naming a logged loss")
                return None
            if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
                loss = loss * trainer.accumulate_grad_batches  # Lightning divides it for accumulation
            parts.append(loss)
        wanted = self._logged_keys
        if wanted:
            metrics = trainer.callback_metrics
            missing = [k for k in wanted if not isinstance(metrics.get(k), torch.Tensor)]
            if missing:
                self._skip(trainer, f"logged metric(s) {missing} not found in trainer.callback_metrics")
                return None
            parts.extend(metrics[k] for k in wanted)
        if len(parts) == 1:
            value = parts[0].detach()
            return value if value.dim() == 0 else value.float().mean()
        return torch.stack([p.detach().float().mean() for p in parts])

    def _skip(self, trainer: pl.Trainer, why: str) -> None:
        self.emit(trainer, "check.skipped", f"LossConvergenceMonitor: {why}", data={"reason": why}, key=why)

    # ------------------------------------------------------------------ every N steps: host
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, final=True)

    def _pull(self) -> None:
        """Move the pending rows to the host tail (the one transfer per check)."""
        self._tail.extend(self._pending_rows())
        self._pending, self._steps = [], []

    def _pending_rows(self) -> list[tuple[int, list[float]]]:
        if not self._pending:
            return []
        rows = torch.stack([v.reshape(-1) for v in self._pending]).tolist()
        return list(zip(self._steps, rows, strict=True))

    def _check(self, trainer: pl.Trainer, final: bool = False) -> None:
        self._pull()
        self._bin(trainer, final)
        if self.series[0].values:
            self._evaluate(trainer)

    def _bin(self, trainer: pl.Trainer, final: bool = False) -> None:
        """Bin the complete blocks of BIN_STEPS rows of the tail (every row at the end of training)."""
        k = BIN_STEPS
        n = len(self._tail) if final else len(self._tail) // k * k
        if n:
            first_batch = self.batches - len(self._tail)  # batches seen before the tail's first row
            chunk, self._tail = self._tail[:n], self._tail[n:]
            self._add_bins(trainer, [step for step, _ in chunk], np.asarray([row for _, row in chunk]), first_batch)

    def _add_bins(self, trainer: pl.Trainer, steps: list[int], values: np.ndarray, first_batch: int) -> None:
        """Bin ``values`` (n_rows, n_series) into medians of BIN_STEPS rows (the last bin may be short)."""
        k = BIN_STEPS
        full = len(values) // k * k
        finite = np.isfinite(values)
        median = np.median if finite.all() else np.nanmedian  # nanmedian is slow: only when needed
        masked = np.where(finite, values, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN bin has a NaN median: that is the intent
            medians = median(masked[:full].reshape(-1, k, values.shape[1]), axis=1).tolist()
            if full < len(values):
                medians.append(median(masked[full:], axis=0).tolist())
        self._report_nonfinite(trainer, steps, values, first_batch)
        for j, series in enumerate(self.series):
            if series.start is None and finite[:, j].any():
                series.start = float(values[np.argmax(finite[:, j]), j])  # the first loss, before any update acted
                series.best = series.start
        for b, row in enumerate(medians):
            lo, hi = b * k, min((b + 1) * k, len(values))
            x = first_batch + (lo + hi + 1) / 2
            for j, series in enumerate(self.series):
                if j == 0:
                    self._check_jump(trainer, series, row[j], steps[hi - 1])
                series.add(row[j], x)

    def _report_nonfinite(self, trainer: pl.Trainer, steps: list[int], values: np.ndarray, first_batch: int) -> None:
        """``loss.nonfinite`` for the first NaN/Inf of each series among rows not tested before (an early probe
        may have reported them already)."""
        fresh = max(0, self._finite_upto - first_batch)
        self._finite_upto = max(self._finite_upto, first_batch + len(values))
        finite = np.isfinite(values[fresh:])
        for j, series in enumerate(self.series):
            if not finite[:, j].all():
                i = fresh + int(np.argmin(finite[:, j]))
                self.emit(
                    trainer,
                    "loss.nonfinite",
                    f"The training {'loss' if j == 0 else f'loss component {series.name!r}'} is {values[i, j]} at "
                    f"step {steps[i]} (first non-finite value).",
                    data={"series": series.name, "step": steps[i], "batch": first_batch + i + 1, "value": values[i, j]},
                    key=series.name,
                )

    def _check_jump(self, trainer: pl.Trainer, series: _Series, median: float, step: int) -> None:
        """A bin far above the best level so far (before it is added)."""
        if series.best is None or series.start is None or not math.isfinite(median):
            return
        floor, best = series.floor, series.best
        gap0 = series.start - floor
        if gap0 <= 0:
            return
        if median - floor > self.diverge_factor * (best - floor) and median - best > self.diverge_margin * gap0:
            self.emit(
                trainer,
                "loss.diverging",
                f"The smoothed training loss jumped to {median:.4g} at step {step}, "
                f"{(median - floor) / max(best - floor, 1e-12):.3g}x further from the floor ({floor:g}) than its best "
                f"so far ({best:.4g}; it started at {series.start:.4g}).",
                data={
                    "rule": "above_best",
                    "level": median,
                    "best": best,
                    "start": series.start,
                    "floor": floor,
                    "step": step,
                },
                key=series.name,
            )

    def _evaluate(self, trainer: pl.Trainer) -> None:
        total = self.series[0]
        metrics = {"debug/loss/smoothed": total.level}
        metrics.update({f"debug/loss/{s.name}": s.level for s in self.series[1:]})
        self.last_trend = None
        if total.start is not None and total.start - total.floor <= 0:
            self._skip(
                trainer, f"the first loss ({total.start:.4g}) is not above `floor` ({total.floor:g}); set `floor`"
            )
        elif total.start is not None:
            span = self.window if self.window is not None else self.batches / 2
            values, xs = total.window(self.batches - span)
            if len(values) >= MIN_TREND_POINTS:
                self.last_trend = trend(values, xs, confidence=self.confidence)
                metrics["debug/loss/slope"] = self.last_trend.slope
                self._judge(trainer, total, self.last_trend, span)
        Sink(trainer).log_scalars({k: v for k, v in metrics.items() if math.isfinite(v)})

    def _judge(self, trainer: pl.Trainer, series: _Series, tr: Trend, span: float) -> None:
        assert series.start is not None and series.best is not None
        floor, start, level, t = series.floor, series.start, series.level, self.batches
        gap0, gap = start - floor, level - floor
        lr = _current_lr(trainer)
        evidence: dict[str, Any] = {
            "lr": lr,
            "peak_lr": self.peak_lr,
            "level": level,
            "floor": floor,
            "start": start,
            "best": series.best,
            "window": int(span),
            "slope": tr.slope,
            "slope_low": tr.low,
            "slope_high": tr.high,
            "p_value": tr.p_value,
            "confidence": self.confidence,
            "batches": t,
        }
        if tr.rising and tr.p_value < 1 - self.confidence and tr.slope * span > self.diverge_margin * gap0:
            self.emit(
                trainer,
                "loss.diverging",
                f"The smoothed training loss is rising: {tr.slope * span:+.3g} over the last {int(span)} batches "
                f"(slope {tr.slope:.3g}/batch, {self.confidence:.0%} CI [{tr.low:.3g}, {tr.high:.3g}], "
                f"trend p={tr.p_value:.2g}); now {level:.4g}, best {series.best:.4g}.",
                data={"rule": "rising", **evidence},
                key=series.name,
            )
        if not math.isfinite(level):
            return
        # Flat: even the fastest plausible descent would close < min_progress of the gap in another t batches.
        reachable = max(0.0, -tr.low) * t
        flat = gap > 0 and reachable < self.min_progress * gap
        evidence["reachable_drop"] = reachable
        previous_plateau_checks, self.plateau_checks = self.plateau_checks, 0
        if t >= self.warmup_steps and flat:
            drop = start - level
            if drop < self.min_drop * gap0:
                self.emit(
                    trainer,
                    "loss.not_decreasing",
                    f"After {t} batches the training loss is still {level:.4g} (started at {start:.4g}, floor "
                    f"{floor:g}): it fell by {drop / gap0:.1%} of the way to the floor and its trend over the last "
                    f"{int(span)} batches is flat (slope {tr.slope:.2g}/batch, CI [{tr.low:.2g}, {tr.high:.2g}]).",
                    data={"drop": drop, "min_drop": self.min_drop, **evidence},
                    key=series.name,
                )
                return
            levelled = max(0.0, -tr.low) < LEVELLED_OFF * drop / t
            falling = self._falling_components(span, t)
            # a loss that flattens while a schedule anneals the learning rate (cosine, step decay) has converged
            # for that schedule: not a plateau to fix with capacity or a higher rate
            annealed = lr is not None and lr < ANNEALED * self.peak_lr
            plateau = gap > self.plateau_level * gap0 and levelled and not falling and not annealed
            self.plateau_checks = previous_plateau_checks + 1 if plateau else 0
            evidence["plateau_checks"] = self.plateau_checks
            if self.plateau_checks >= PLATEAU_CHECKS:
                self.emit(
                    trainer,
                    "loss.plateau",
                    f"The training loss has plateaued at {level:.4g}, far above its floor {floor:g} (started at "
                    f"{start:.4g}): over the last {int(span)} batches its slope is {tr.slope:.2g}/batch "
                    f"({self.confidence:.0%} CI [{tr.low:.2g}, {tr.high:.2g}]); at the fastest plausible rate another "
                    f"{t} batches would lower it by at most {reachable:.3g} ({reachable / gap:.1%} of the gap).",
                    data={"components_falling": falling, **evidence},
                    key=series.name,
                )
                return
        if t >= self.warmup_steps and gap <= self.converged_level * gap0:
            self.emit(
                trainer,
                "loss.converged",
                f"The training loss reached {level:.4g}, within {self.converged_level:.0%} of the way from its start "
                f"({start:.4g}) to its floor ({floor:g}).",
                data=evidence,
                key=series.name,
            )

    def _falling_components(self, span: float, t: int) -> list[str]:
        """Components whose trend still falls significantly and meaningfully (they carry the progress)."""
        falling = []
        for series in self.series[1:]:
            values, xs = series.window(self.batches - span)
            if len(values) < MIN_TREND_POINTS:
                continue
            tr = trend(values, xs, confidence=self.confidence)
            gap = series.level - series.floor
            if tr.falling and gap > 0 and -tr.high * t >= self.min_progress * gap:
                falling.append(series.name)
        return falling

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        tail = self._tail + self._pending_rows()
        return {
            **super().state_dict(),
            "batches": self.batches,
            "peak_lr": self.peak_lr,
            "plateau_checks": self.plateau_checks,
            "finite_upto": self._finite_upto,
            "series": [asdict(s) for s in self.series],
            "tail": [[step, row] for step, row in tail],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.batches = int(state_dict.get("batches", 0))
        self.peak_lr = float(state_dict.get("peak_lr", 0.0))
        self.plateau_checks = int(state_dict.get("plateau_checks", 0))
        self._finite_upto = int(state_dict.get("finite_upto", 0))
        saved = {d["name"]: d for d in state_dict.get("series", [])}
        self.series = [_Series(**saved[s.name]) if s.name in saved else s for s in self.series]
        self._tail = [(int(step), list(row)) for step, row in state_dict.get("tail", [])]
        self._pending, self._steps = [], []


def _current_lr(trainer: pl.Trainer) -> float | None:
    """The first parameter group's learning rate, if it is a plain number (reading it never syncs a device)."""
    optimizers = trainer.optimizers
    lr = optimizers[0].param_groups[0].get("lr") if optimizers and optimizers[0].param_groups else None
    return float(lr) if isinstance(lr, (int, float)) else None
