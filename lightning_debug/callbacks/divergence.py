"""``LossMetricDivergence``: the dev loss rises while the dev metric holds or improves (overconfidence).

The loss you optimise and the metric you care about can decorrelate: a classifier keeps getting *more accurate*
on the dev set while its dev loss *rises*, because its wrong answers grow ever more confident (Guo et al. 2017,
Fig. 3). Early stopping or checkpoint selection on the loss then throws away the best model. This callback
tests that pattern with robust trends over a trailing window of validation checks, and separately flags the
classic growing generalisation gap (training loss falling while dev loss rises).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np
from lightning.pytorch.trainer.states import TrainerFn

from lightning_debug.base import DebugCallback
from lightning_debug.rules.divergence import DivergenceVerdict, assess_divergence, is_new_best, validate_arguments
from lightning_debug.rules.persistence import streak
from lightning_debug.signals import ChanceLevel, check_mode, metric_value
from lightning_debug.sinks import Sink
from lightning_debug.wording import divergence as words

if TYPE_CHECKING:
    import lightning.pytorch as pl

PREFIX = "debug/divergence/"
__all__ = ["DivergenceVerdict", "LossMetricDivergence", "assess_divergence"]


class LossMetricDivergence(DebugCallback):
    """Warns when the dev loss trends up while the dev metric holds or improves, and on a growing gap.

    Statistics: over the last ``window`` validation checks, Theil-Sen slopes with 95% intervals widened for
    lag-1 autocorrelation (:func:`~lightning_debug.stats.trend_autocorrelated`); a condition must hold on
    ``persistence`` consecutive checks before it is reported. ``window`` must be at least 6, the smallest
    window on which a rank trend test can reach p < 0.01. The default 15 is what it takes to see the slow
    rise of real overconfidence (a few % over tens of checks) through evaluation noise; use 8-10 for short runs.

    Args:
        metric: the evaluation metric (``trainer.callback_metrics`` key), e.g. ``"val_acc"``.
        mode: ``"max"`` if a larger ``metric`` is better, ``"min"`` otherwise.
        loss: the dev loss key.
        train_loss: the training loss key (its ``_epoch`` aggregate is used when logged per step and epoch);
            enables ``val.overfitting``. ``None`` leaves that check out.
        window: validation checks per trend window (>= 6; default 15).
        min_checks: validation checks to wait before judging; defaults to ``window``.
        persistence: consecutive checks a condition must hold before it is reported (>= 2; default 3, which
            keeps false alarms on flat but autocorrelated (AR(1), rho=0.3) evaluation noise near 5% per run).
        min_rise: how far (relative) the dev loss's trend line must sit above its best value, e.g. 0.03 = 3%.
        max_metric_drop: how much of its best gain over chance the metric may have given back (0.1 = 10%);
            a metric that fell and plateaued while the loss rises is plain overfitting, not divergence.
        chance: the metric's chance level; ``None`` infers it (for a ``"max"`` metric the majority class of the
            ``target`` returned by ``validation_step``, else the metric's first value). Divergence below chance
            is the memorisation phase of grokking, not overconfidence, and is never reported.
        confidence: confidence level of the slope intervals.
    """

    def __init__(
        self,
        metric: str = "val_acc",
        mode: str = "max",
        loss: str = "val_loss",
        train_loss: str | None = None,
        window: int = 15,
        min_checks: int | None = None,
        persistence: int = 3,
        min_rise: float = 0.03,
        max_metric_drop: float = 0.1,
        chance: float | None = None,
        confidence: float = 0.95,
        *,
        raise_errors: bool = False,
        print_findings: bool = True,
        strict: bool | None = None,
        verbose: bool | None = None,
    ) -> None:
        super().__init__(raise_errors=raise_errors, print_findings=print_findings, strict=strict, verbose=verbose)
        check_mode(mode)
        validate_arguments(window, min_checks, persistence, min_rise, max_metric_drop, confidence)
        self.metric = metric
        self.mode = mode
        self.loss = loss
        self.train_loss = train_loss
        self.window = window
        self.min_checks = max(window, min_checks or window)
        self.persistence = persistence
        self.min_rise = min_rise
        self.max_metric_drop = max_metric_drop
        self.confidence = confidence
        self.chance = ChanceLevel(chance, from_targets=mode == "max")
        self.checks = 0
        self.history: dict[str, list[float]] = {"loss": [], "metric": [], "train": [], "step": []}
        self.loss_min = float("inf")
        self.loss_min_step = -1
        self.metric_best = float("nan")
        self.streaks = {"diverging": 0, "overfitting": 0}

    @functools.cached_property
    def state_key(self) -> str:
        return self._generate_state_key(metric=self.metric, loss=self.loss)  # built once: read on every hook

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.chance.observe_outputs(outputs)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        if trainer.sanity_checking:
            self.chance.end_epoch(metric_value(metrics, self.metric))
            return
        if trainer.state.fn != TrainerFn.FITTING:
            return
        keys = {"loss": self.loss, "metric": self.metric}
        values = {name: metric_value(metrics, key) for name, key in keys.items()}
        self.chance.end_epoch(values["metric"])
        missing = [keys[name] for name, v in values.items() if v is None]
        if missing:
            text = f"{missing} not logged; available: {sorted(metrics)}"
            if self.raise_errors:
                raise RuntimeError(f"LossMetricDivergence monitors {text}")
            self.skip(trainer, text, data={"missing": missing})
            return
        train = metric_value(metrics, self.train_loss) if self.train_loss else None
        self._record(trainer.global_step, float(values["loss"]), float(values["metric"]), train)  # type: ignore[arg-type]
        if self.checks >= self.min_checks and np.isfinite(self.history["loss"]).all():
            self._judge(trainer)

    def _record(self, step: int, loss: float, metric: float, train: float | None) -> None:
        """One validation check into the trailing window, the best loss and the best metric."""
        self.checks += 1
        if np.isfinite(loss) and loss < self.loss_min:
            self.loss_min, self.loss_min_step = loss, step
        if is_new_best(metric, self.metric_best, self.mode):
            self.metric_best = metric
        for name, v in (("loss", loss), ("metric", metric), ("train", train), ("step", step)):
            self.history[name] = [*self.history[name], float("nan") if v is None else float(v)][-self.window :]

    def _judge(self, trainer: pl.Trainer) -> None:
        h = self.history
        v = assess_divergence(
            h["loss"],
            h["metric"],
            mode=self.mode,
            loss_min=self.loss_min,
            metric_best=self.metric_best,
            chance=self.chance.level,
            min_rise=self.min_rise,
            max_metric_drop=self.max_metric_drop,
            train_loss=h["train"] if self.train_loss else None,
            confidence=self.confidence,
        )
        self.streaks = {
            "diverging": streak(self.streaks["diverging"], v.diverging),
            "overfitting": streak(self.streaks["overfitting"], v.overfitting),
        }
        Sink(trainer).log_scalars(words.scalars(PREFIX, v))
        window = words.Window(
            self.history, self.loss_min, self.loss_min_step, self.metric_best, self.chance.level, self.window
        )
        if self.streaks["diverging"] >= self.persistence:
            message, evidence = words.divergence(v, window, self.loss, self.metric)
            self.emit(trainer, "val.loss_metric_divergence", message, data=evidence, key=self.metric)
        if self.streaks["overfitting"] >= self.persistence and v.train is not None:
            message, evidence = words.overfitting(v, v.train, window, self.loss, str(self.train_loss))
            self.emit(trainer, "val.overfitting", message, data=evidence, key=self.loss)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "checks": self.checks,
            "history": {k: list(v) for k, v in self.history.items()},
            "loss_min": self.loss_min,
            "loss_min_step": self.loss_min_step,
            "metric_best": self.metric_best,
            "streaks": dict(self.streaks),
            "chance": self.chance.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.checks = state_dict.get("checks", 0)
        self.history = {k: list(v) for k, v in state_dict.get("history", self.history).items()}
        self.loss_min = state_dict.get("loss_min", float("inf"))
        self.loss_min_step = state_dict.get("loss_min_step", -1)
        self.metric_best = state_dict.get("metric_best", float("nan"))
        self.streaks = dict(state_dict.get("streaks", self.streaks))
        self.chance.load_state_dict(state_dict.get("chance", {}))
