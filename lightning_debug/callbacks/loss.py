"""``LossConvergenceMonitor``: is the training loss going down, and towards a good value?

The debugging lecture's first rule: before looking at dev accuracy, look at the training loss. This adapter
keeps the loss of every step on its own device (no host-device sync), pulls it to the host at a few probes
and checks, bins it (medians of a few steps) and asks the rules of :mod:`lightning_debug.rules.loss` for a
verdict, which it words and emits:

- ``loss.nonfinite``: a NaN/Inf value in any tracked series (the exact step is in the buffer).
- ``loss.diverging``: a level jumped far above the best level and the start and stayed there, or the loss
  rises with a significant trend (noise-aware: levels, the run's own spread, autocorrelation-widened CIs).
- ``loss.not_decreasing`` / ``loss.plateau`` / ``loss.converged``: the trend verdicts after the warm-up.
- ``loss.still_decreasing``: the run ended while the loss still fell (no stall, not yet at its floor).

Intervals scale with the planned run (``trainer.estimated_stepping_batches``), and every run of at least 30
batches ends with a verdict (at the end of fit, an early stop, ``max_steps`` or an interruption). Every
finding names the floor it was judged against and where that floor comes from (:func:`~lightning_debug.rules.
loss.choose_floor`), and cites a model-health finding (``setup.*``, ``init.*``, ``grad.*``) that explains it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_debug.base import DebugCallback
from lightning_debug.findings import Finding, check_info
from lightning_debug.rules import loss as rules
from lightning_debug.sinks import Sink

if TYPE_CHECKING:
    import lightning.pytorch as pl

MAX_BINS = 1024  # older bins are merged pairwise beyond this, so memory and state stay bounded
ANNEALED = 0.5  # a schedule that took the learning rate below this fraction of its peak explains a flat loss
LEARNED = 0.75  # train ~= val counts as a floor only below this fraction of the first loss
EXPLAINING_PREFIXES = ("setup.", "init.", "grad.")  # model-health findings that explain a loss finding
_RESERVED = ("smoothed", "slope")


@dataclass
class _Series:
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
        v, x = np.asarray(self.values), np.asarray(self.xs)
        keep = (x >= since) & np.isfinite(v)
        return v[keep], x[keep]


class LossConvergenceMonitor(DebugCallback):
    """Watches the training loss for NaN/Inf, divergence, no progress, plateaus and convergence.

    Zero-config: it reads the loss ``training_step`` returns and the ``val_loss`` the module logs (if any).

    Args:
        key: read this logged metric (from ``trainer.callback_metrics``) instead of the returned loss.
        components: ``{name: logged_key}`` of loss parts to track too; a total that is flat while a component
            still falls significantly is not called a plateau (regularisation keeps the total up).
        floor: the best achievable loss. ``None`` (default): from evidence, see :func:`rules.choose_floor`.
        val_key: the logged validation loss; where train and validation agree at a flat level, that level is
            the data's floor (irreducible entropy), not a plateau.
        check_every_n_steps / warmup_steps: ``None`` scales them to the planned run (a tenth of it, 20-200 and
            30-200 batches); an int fixes them.
        window: batches the trend is fitted over; ``None`` uses the last half of the batches seen.
        min_drop, min_progress, plateau_level, converged_level, diverge_margin, confidence: see
            :class:`rules.LossRules` (fractions of the starting gap, first loss minus floor).
        diverge_factor: a level this many times further from the floor than the best level diverges.
    """

    def __init__(
        self,
        *,
        key: str | None = None,
        components: Mapping[str, str] | None = None,
        floor: float | None = None,
        val_key: str = "val_loss",
        check_every_n_steps: int | None = None,
        window: int | None = None,
        warmup_steps: int | None = None,
        min_drop: float = 0.1,
        min_progress: float = 0.2,
        plateau_level: float = 0.2,
        converged_level: float = 0.05,
        diverge_factor: float = 3.0,
        diverge_margin: float = 0.25,
        confidence: float = 0.95,
        raise_errors: bool = False,
        print_findings: bool = True,
        strict: bool | None = None,
        verbose: bool | None = None,
    ) -> None:
        super().__init__(raise_errors=raise_errors, print_findings=print_findings, strict=strict, verbose=verbose)
        _validate(locals())
        self.key = key
        self.components = dict(components or {})
        self._logged_keys = ([key] if key is not None else []) + list(self.components.values())  # read every step
        self.floor = floor
        self.val_key = val_key
        self.check_every_n_steps = check_every_n_steps
        self.window = window
        self.warmup_steps = warmup_steps
        self.diverge_factor = diverge_factor
        self.rules = rules.LossRules(
            min_drop=min_drop,
            min_progress=min_progress,
            plateau_level=plateau_level,
            converged_level=converged_level,
            diverge_margin=diverge_margin,
            confidence=confidence,
        )
        self.series = [_Series(key or "loss")] + [_Series(name) for name in self.components]
        self.schedule = rules.schedule_for(None, check_every=check_every_n_steps, warmup=warmup_steps)
        self.batches = 0  # training batches recorded
        self._tail: list[tuple[int, list[float]]] = []  # (global step, values) pulled but not yet binned
        self._pending: list[torch.Tensor] = []  # this step's values per batch, on the loss's device (no sync)
        self._steps: list[int] = []  # global step of each pending row (host ints)
        self._step = 0
        self.peak_lr = 0.0  # largest learning rate seen (a host float: reading it never syncs)
        self.check_lr = 0.0  # the learning rate at the previous check or the first batch (rising: warming up)
        self.plateau_checks = 0  # consecutive checks at which the plateau condition held
        self.val_level = math.nan  # the last validation loss (read once per validation run)
        self.smoothing: tuple[int, float] | None = None  # (classes, eps) of declared label smoothing
        self.finished = False  # the final verdict was given
        self._finite_upto = 0  # batches whose values were already tested for NaN/Inf (each is reported once)

    @functools.cached_property
    def state_key(self) -> str:
        return self._generate_state_key(key=self.key, components=sorted(self.components.items()))  # built once

    # ------------------------------------------------------------------ per step: device only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        Sink(trainer).define_metric("debug/loss/smoothed", summary="min,last")
        self.smoothing = rules.declared_label_smoothing(pl_module)
        self.finished = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step = trainer.global_step  # after a resume has restored it
        if self.batches == 0:  # a resumed run keeps the schedule its bins were made with
            self.schedule = rules.schedule_for(
                planned_batches(trainer), check_every=self.check_every_n_steps, warmup=self.warmup_steps
            )

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
        lr = current_lr(trainer)  # a host float: the peak must be seen before a schedule decays it
        if lr is not None and lr > self.peak_lr:
            self.peak_lr = lr
        if lr is not None and self.batches == 0:
            self.check_lr = lr  # the reference for "still warming up" at the first check
        self.batches += 1
        every = self.schedule.check_every
        if self.batches % every == 0:
            self._check(trainer)
        elif self.batches < every and self.batches & (self.batches - 1) == 0:
            self._check(trainer, probe=True)

    def _read(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> torch.Tensor | None:
        """This step's values as one device tensor, without reading them."""
        parts: list[Any] = []
        if self.key is None:
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if not isinstance(loss, torch.Tensor):
                self.skip(
                    trainer, "training_step returned no loss tensor; pass `key=` naming a logged loss", key="loss"
                )
                return None
            if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
                loss = loss * trainer.accumulate_grad_batches  # Lightning divides it for accumulation
            parts.append(loss)
        if self._logged_keys:
            metrics = trainer.callback_metrics
            missing = [k for k in self._logged_keys if not isinstance(metrics.get(k), torch.Tensor)]
            if missing:
                self.skip(trainer, f"logged metric(s) {missing} not found in trainer.callback_metrics", key="keys")
                return None
            parts.extend(metrics[k] for k in self._logged_keys)
        if len(parts) == 1:
            value = parts[0].detach()
            return value if value.dim() == 0 else value.float().mean()
        return torch.stack([p.detach().float().mean() for p in parts])

    # ------------------------------------------------------------------ checks: host
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.val_key)
        if isinstance(value, torch.Tensor) and not trainer.sanity_checking:
            self.val_level = float(value)  # once per validation run

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """An interrupted run still gets its verdict (hooks of this kind are not guarded by the base class)."""
        try:
            self._finish(trainer)
        except Exception as err:
            if self.raise_errors:
                raise
            self.emit(trainer, "check.error", f"LossConvergenceMonitor.on_exception failed: {err!r}", key="exception")

    def _finish(self, trainer: pl.Trainer) -> None:
        if not self.finished:
            self.finished = True
            self._check(trainer, final=True)

    def _pull(self) -> None:
        """Move the pending rows to the host tail (the one transfer per check)."""
        if self._pending:
            rows = torch.stack([v.reshape(-1) for v in self._pending]).tolist()
            self._tail.extend(zip(self._steps, rows, strict=True))
        self._pending, self._steps = [], []

    def _check(self, trainer: pl.Trainer, *, probe: bool = False, final: bool = False) -> None:
        self._pull()
        if not self._tail:
            return
        first_batch = self.batches - len(self._tail)  # batches seen before the tail's first row
        steps, values = [s for s, _ in self._tail], np.asarray([row for _, row in self._tail], dtype=float)
        self._report_nonfinite(trainer, steps, values, first_batch)
        b = self.schedule.bin_steps
        n = len(values) if final else len(values) // b * b
        if n:
            self._add_bins(values[:n], first_batch)
            self._check_jump(trainer, steps[n - 1], new=-(-n // b))
            self._tail = self._tail[n:]
        if not probe and self.series[0].start is not None:
            self._evaluate(trainer, final)

    def _add_bins(self, values: np.ndarray, first_batch: int) -> None:
        b = self.schedule.bin_steps
        medians = rules.bin_medians(values, b)
        xs = [first_batch + (i * b + min((i + 1) * b, len(values)) + 1) / 2 for i in range(len(medians))]
        finite = np.isfinite(values)
        for j, series in enumerate(self.series):
            if series.start is None and finite[:, j].any():
                series.start = float(values[np.argmax(finite[:, j]), j])  # the first loss, before any update acted
            series.add(medians[:, j].tolist(), xs)

    def _report_nonfinite(self, trainer: pl.Trainer, steps: list[int], values: np.ndarray, first_batch: int) -> None:
        """``loss.nonfinite`` for the first NaN/Inf of each series among rows not tested before."""
        fresh = max(0, self._finite_upto - first_batch)
        self._finite_upto = max(self._finite_upto, first_batch + len(values))
        finite = np.isfinite(values[fresh:])
        for j, series in enumerate(self.series):
            if not finite[:, j].all():
                i = fresh + int(np.argmin(finite[:, j]))
                what = "loss" if j == 0 else f"loss component {series.name!r}"
                self.emit(
                    trainer,
                    "loss.nonfinite",
                    f"The training {what} is {values[i, j]} at step {steps[i]} (first non-finite value).",
                    data={"series": series.name, "step": steps[i], "batch": first_batch + i + 1, "value": values[i, j]},
                    key=series.name,
                )

    def _check_jump(self, trainer: pl.Trainer, step: int, new: int) -> None:
        total = self.series[0]
        if total.start is None:
            return
        floor = self._floor(trainer, total)
        bins = np.asarray(total.values)
        v = rules.assess_jump(
            bins, min(new, len(bins)), total.start, floor.value, bin_steps=self.schedule.bin_steps,
            factor=self.diverge_factor, margin=self.rules.diverge_margin,
        )  # fmt: skip
        if v.fired.any():
            i = int(np.argmax(v.fired))
            level, best = float(v.level[i]), float(v.best[i])
            self._emit_loss(
                trainer,
                "loss.diverging",
                f"The training loss jumped to a level of {level:.4g} and stayed up ({float(v.held[i]):.4g} over the "
                f"next steps, by step {step}): {(level - floor.value) / max(best - floor.value, 1e-12):.3g}x further "
                f"from the floor {floor.describe()} than its best level {best:.4g} (it started at {total.start:.4g}; "
                f"the run's spread of a level is {float(v.spread):.3g}).",
                floor,
                data={"rule": "jump", "level": level, "held": float(v.held[i]), "best": best,
                      "start": total.start, "spread": float(v.spread), "step": step},
            )  # fmt: skip

    # ------------------------------------------------------------------ verdicts
    def _floor(self, trainer: pl.Trainer, series: _Series, with_val: bool = False) -> rules.Floor:
        """The floor from evidence; ``with_val``: also where train ~= validation (asked only of a flat loss)."""
        memorised = next((f.data.get("level") for f in self.findings_on(trainer, "loss.floor_high")), None)
        bins = series.finite()[0]
        level = float(rules.level_of(bins)) if len(bins) else math.nan
        start = series.start if series.start is not None else math.nan
        # train ~= validation is the data's floor only once the model learned something (else: stuck at chance)
        agree = with_val and level <= LEARNED * start and rules.agrees(level, self.val_level, start)
        return rules.choose_floor(self.floor, self.smoothing, memorised, (level, self.val_level) if agree else None)

    def _evaluate(self, trainer: pl.Trainer, final: bool) -> None:
        total = self.series[0]
        assert total.start is not None
        start: float = total.start
        floor = self._floor(trainer, total)
        bins, _ = total.finite()
        metrics = {"debug/loss/smoothed": float(rules.level_of(bins)) if len(bins) else math.nan}
        metrics.update({f"debug/loss/{s.name}": _last(s.values) for s in self.series[1:]})
        span = self.window if self.window is not None else self.batches / 2
        window, xs = rules.rebin(*total.finite(self.batches - span))
        if final and len(window) < rules.MIN_TREND_POINTS:  # a short run's verdict: over the whole run
            window, xs = rules.rebin(*total.finite())
        lr = current_lr(trainer)
        warming = lr is not None and lr > 1.01 * self.check_lr and not final
        self.check_lr = lr if lr is not None else self.check_lr
        if len(window) >= rules.MIN_TREND_POINTS and (not final or self.batches >= rules.MIN_VERDICT_BATCHES):
            judging = final or (self.batches >= self.schedule.warmup and not warming)
            excused = (lr is not None and lr < ANNEALED * self.peak_lr) or bool(self._falling_components(span))

            def assess(floor: rules.Floor) -> rules.LossVerdicts:
                return rules.assess_loss_batch(
                    window, xs, rules.level_of(bins), start, floor.value, self.batches, span, rules=self.rules,
                    judging=judging, final=final, plateau_checks=self.plateau_checks, excused=excused,
                    noise=rules.spread(bins), patient=self.batches >= self.schedule.stuck_after,
                )  # fmt: skip

            v = assess(floor)
            if int(v.plateau_checks) > 0:  # flat far above the floor: is it the data's (train ~= validation)?
                data_floor = self._floor(trainer, total, with_val=True)
                if data_floor.value > floor.value:
                    floor, v = data_floor, assess(data_floor)
            self.plateau_checks = int(v.plateau_checks)
            metrics["debug/loss/slope"] = float(v.trend.slope)
            self._report(trainer, v, floor, start, span, lr)
        Sink(trainer).log_scalars({k: val for k, val in metrics.items() if math.isfinite(val)})

    def _report(
        self, trainer: pl.Trainer, v: rules.LossVerdicts, floor: rules.Floor, start: float, span: float, lr: Any
    ) -> None:
        code, tr = int(v.code), v.trend
        if code == rules.NONE:
            return
        evidence = {
            "lr": lr, "peak_lr": self.peak_lr, "level": float(v.level), "start": start, "window": int(span),
            "slope": float(tr.slope), "slope_low": float(tr.low), "slope_high": float(tr.high),
            "p_value": float(tr.p_value), "confidence": self.rules.confidence, "batches": self.batches,
            "reachable_drop": float(v.reachable), "drop": float(v.drop), "stalled": bool(v.far),
        }  # fmt: skip
        if code == rules.DIVERGING:
            evidence.update(rule="rising", stalled=False)
        elif code == rules.CONVERGED:  # levelled off far above 0 (train ~= val): can the model fit at all?
            evidence["stalled"] = floor.value > self.rules.plateau_level * start
        check = f"loss.{rules.VERDICTS[code]}"
        self._emit_loss(trainer, check, verdict_message(code, v, floor, start, span, self.batches), floor, evidence)

    def _emit_loss(self, trainer: pl.Trainer, check: str, message: str, floor: rules.Floor, data: dict) -> Finding:
        """Emit a loss finding naming its floor, citing model-health findings that explain it."""
        explaining = [f for f in self.findings_on(trainer) if f.check.startswith(EXPLAINING_PREFIXES)]
        hint = None
        if explaining:
            cited = "; ".join(f"{f.check}: {f.message}" for f in explaining)
            hint = f"Likely explained by {cited}. {check_info(check).hint}"
        data = {
            **data,
            "floor": floor.value,
            "floor_source": floor.source,
            "explained_by": [f.check for f in explaining],
        }
        return self.emit(trainer, check, message, data=data, hint=hint, key=self.series[0].name)

    def _falling_components(self, span: float) -> list[str]:
        """Components whose trend still falls significantly and meaningfully (they carry the progress)."""
        falling = []
        for series in self.series[1:]:
            values, xs = rules.rebin(*series.finite(self.batches - span))
            if len(values) < rules.MIN_TREND_POINTS:
                continue
            tr = rules.trend(values, xs, self.rules.confidence)
            gap = rules.level_of(values)
            if float(tr.high) < 0 and gap > 0 and -float(tr.high) * self.batches >= self.rules.min_progress * gap:
                falling.append(series.name)
        return falling

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        pending = [[s, row] for s, row in zip(self._steps, _rows(self._pending), strict=True)]
        return {
            **super().state_dict(),
            "batches": self.batches,
            "peak_lr": self.peak_lr,
            "check_lr": self.check_lr,
            "plateau_checks": self.plateau_checks,
            "finite_upto": self._finite_upto,
            "val_level": self.val_level,
            "schedule": asdict(self.schedule),
            "series": [asdict(s) for s in self.series],
            "tail": [[step, row] for step, row in self._tail] + pending,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.batches = int(state_dict.get("batches", 0))
        self.peak_lr = float(state_dict.get("peak_lr", 0.0))
        self.check_lr = float(state_dict.get("check_lr", 0.0))
        self.plateau_checks = int(state_dict.get("plateau_checks", 0))
        self._finite_upto = int(state_dict.get("finite_upto", 0))
        self.val_level = float(state_dict.get("val_level", math.nan))
        if "schedule" in state_dict:
            self.schedule = rules.Schedule(**state_dict["schedule"])
        saved = {d["name"]: d for d in state_dict.get("series", [])}
        self.series = [_Series(**saved[s.name]) if s.name in saved else s for s in self.series]
        self._tail = [(int(step), list(row)) for step, row in state_dict.get("tail", [])]
        self._pending, self._steps = [], []


# ---------------------------------------------------------------------------------------------- helpers
def verdict_message(code: int, v: rules.LossVerdicts, floor: rules.Floor, start: float, span: float, t: int) -> str:
    """One sentence with the numbers for a trend verdict."""
    tr, level, w = v.trend, float(v.level), int(span)
    slope = f"slope {float(tr.slope):.2g}/batch, 95% CI [{float(tr.low):.2g}, {float(tr.high):.2g}]"
    progress = describe_progress(start, level, floor)
    if code == rules.DIVERGING:
        rise = float(tr.slope) * span
        return (
            f"The training loss is rising: {rise:+.3g} over the last {w} batches ({slope});"
            f" now {level:.4g}, {progress}."
        )
    if code == rules.NOT_DECREASING:
        return f"After {t} batches the training loss is still {level:.4g}: {progress}; its trend is flat ({slope})."
    if code == rules.PLATEAU:
        return (
            f"The training loss has plateaued at {level:.4g}, {progress}: over the last {w} batches its {slope}; "
            f"at the fastest plausible rate another {t} batches would lower it by at most {float(v.reachable):.3g}."
        )
    if code == rules.CONVERGED:
        return f"The training loss reached {level:.4g}, close to its floor: {progress}."
    how = "still falling" if float(tr.high) < 0 else "neither flat nor significantly falling"
    return f"The run ended after {t} batches with the training loss {how} ({slope}): {level:.4g}, {progress}."


def describe_progress(start: float, level: float, floor: rules.Floor) -> str:
    """How far the loss went from its start towards the floor, in words a blow-up cannot turn absurd."""
    gap0 = start - floor.value
    where = f"started at {start:.4g}, floor {floor.describe()}"
    if not math.isfinite(level):
        return f"not finite ({where})"
    if level > start:
        return f"above where it started ({where})"
    closed = (start - level) / gap0 if gap0 > 0 else math.nan
    if not 0 <= closed <= 1:
        return f"below the floor ({where})"
    return f"{closed:.0%} of the way from its start to the floor ({where})"


def planned_batches(trainer: pl.Trainer) -> float | None:
    """Training batches the run plans (optimizer steps times accumulation), if the trainer can tell."""
    try:
        steps = float(trainer.estimated_stepping_batches)
    except Exception:  # an iterable dataset without a length, no max_steps
        return None
    return steps * trainer.accumulate_grad_batches if math.isfinite(steps) else None


def current_lr(trainer: pl.Trainer) -> float | None:
    """The first parameter group's learning rate, if it is a plain number (reading it never syncs a device)."""
    optimizers = trainer.optimizers
    lr = optimizers[0].param_groups[0].get("lr") if optimizers and optimizers[0].param_groups else None
    return float(lr) if isinstance(lr, (int, float)) else None


def _rows(pending: list[torch.Tensor]) -> list[list[float]]:
    return torch.stack([v.reshape(-1) for v in pending]).tolist() if pending else []


def _last(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return finite[-1] if finite else math.nan


def _validate(args: dict[str, Any]) -> None:
    """``ValueError`` naming the argument for every misuse of the constructor."""
    floor, every, window, warmup = args["floor"], args["check_every_n_steps"], args["window"], args["warmup_steps"]
    if floor is not None and not math.isfinite(floor):
        raise ValueError(f"`floor` must be finite or None, got {floor}")
    if every is not None and every < 10:
        raise ValueError(f"`check_every_n_steps` must be None or >= 10, got {every}")
    if window is not None and window < 2 * (every or 20):
        raise ValueError(f"`window` must be None or >= 2 * check_every_n_steps, got {window}")
    if warmup is not None and warmup < 0:
        raise ValueError(f"`warmup_steps` must be None or >= 0, got {warmup}")
    for name in ("min_drop", "min_progress", "plateau_level", "converged_level", "diverge_margin", "confidence"):
        if not 0 < args[name] < 1:
            raise ValueError(f"`{name}` must be in (0, 1), got {args[name]}")
    if args["converged_level"] >= args["plateau_level"]:
        raise ValueError(
            f"`converged_level` ({args['converged_level']}) must be below `plateau_level` ({args['plateau_level']})"
        )
    if args["diverge_factor"] <= 1:
        raise ValueError(f"`diverge_factor` must be > 1, got {args['diverge_factor']}")
    for name in args["components"] or {}:
        if name in _RESERVED:
            raise ValueError(f"`components` name {name!r} is reserved; pick another name")
