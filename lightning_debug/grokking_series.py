"""What :class:`~lightning_debug.callbacks.grokking.GrokkingMonitor` collects and logs, so the callback reads as
an adapter: accuracy sums from the step outputs (:class:`StageSums`), the extra evaluations at log-spaced steps
(:func:`probe_values`), the evaluation records and the weight-norm series on the log-step axis
(:class:`Curves`), the end-of-fit charts, and the wording of the ``grokking.*`` findings. The phases are decided
in :mod:`lightning_debug.rules.grokking`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_debug import media
from lightning_debug.metrics import HeldPredictions, prediction_sums
from lightning_debug.rules.grokking import StallVerdict, log10_step, sum_values
from lightning_debug.signals import InputFormat, first_dataloader, predictions, weight_norm
from lightning_debug.sinks import Sink

if TYPE_CHECKING:
    import lightning.pytorch as pl

PREFIX = "debug/grokking/"
STEP_KEY = PREFIX + "log10_step"
# series logged per evaluation (the token/sequence pair only when targets are sequences)
SERIES = ("train_acc", "val_acc", "train_loss", "val_loss", "weight_norm")
SEQ_SERIES = ("train_token_acc", "train_seq_acc", "val_token_acc", "val_seq_acc")


def define_series(sink: Sink) -> None:
    """Each series' summary and its step metric, ``log10_step``, so W&B plots them log-x with no UI setup.
    Exact names, not a glob: which of two matching globs W&B applies (ours or Lightning's "*") is not
    specified; an exact definition wins over both."""
    for name in (*SERIES, *SEQ_SERIES):
        summary = "min" if name.endswith(("loss", "norm")) else "max"
        sink.define_metric(PREFIX + name, summary=summary, step_metric=STEP_KEY)


def planned_steps(trainer: pl.Trainer) -> int:
    """The run's planned optimizer steps: ``max_steps``, else estimated from the epochs (1000 when unbounded)."""
    if trainer.max_steps > 0:
        return int(trainer.max_steps)
    batches = trainer.num_training_batches
    epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else 1000
    per_epoch = int(batches) if math.isfinite(batches) else 1000
    return max(1, per_epoch * epochs // max(1, trainer.accumulate_grad_batches))


@dataclass
class StageSums:
    """Per stage (``train`` / ``val``), the prediction sums of the step outputs, kept on the device until read.
    Predictions with one target per example are held and summed a group of batches at a time
    (:class:`~lightning_debug.metrics.HeldPredictions`: the sums are ~30 small ops whatever the batch);
    sequences (a target per position) are summed per batch, as a sequence's accuracy needs its row.

    A stage is ``covered`` once an evaluation's logged metrics gave every value its sums gave (accuracy and
    loss, the common case): the caller then stops collecting it, as the logged values would override the sums
    anyway (the sums of a small model's validation are ~0.4 ms of an 80 ms epoch). An evaluation without them
    uncovers it again."""

    ignore_index: int | None
    shift: bool = False  # a causal LM: predictions are shifted against the targets
    sums: dict[str, Tensor | None] = field(default_factory=lambda: {"train": None, "val": None})
    held: dict[str, HeldPredictions] = field(init=False)
    covered: dict[str, bool] = field(default_factory=lambda: {"train": False, "val": False})

    def __post_init__(self) -> None:
        self.held = {stage: self._holder(stage) for stage in self.sums}

    def _holder(self, stage: str) -> HeldPredictions:
        return HeldPredictions(functools.partial(self._add_sums, stage))  # picklable, unlike a lambda

    def add(self, stage: str, outputs: Any, batch: Any) -> None:
        found = predictions(outputs, batch, shift=self.shift)
        if isinstance(found, str):
            return
        scores, target, fmt = found
        if target.dim() == 1:
            self.held[stage].add(scores, target, fmt)
        else:
            self._add_sums(stage, scores, target, fmt)

    def _add_sums(self, stage: str, scores: Tensor, target: Tensor, fmt: InputFormat) -> None:
        sums = prediction_sums(scores, target, fmt, self.ignore_index)
        prev = self.sums[stage]
        self.sums[stage] = sums if prev is None else prev + sums

    def set_aside(self, stage: str) -> Tensor | None:
        """The stage's sums so far (held predictions included), leaving it empty; :meth:`restore` puts them back."""
        self.held[stage].flush()
        sums, self.sums[stage] = self.sums[stage], None
        return sums

    def restore(self, stage: str, sums: Tensor | None) -> None:
        self.held[stage] = self._holder(stage)
        self.sums[stage] = sums

    def take(
        self, stage: str, logged: Mapping[str, Any] | None = None, keys: Mapping[str, str] | None = None
    ) -> dict[str, float]:
        """The stage's values, then reset: what the sums give (one host transfer), overridden by what is
        ``logged`` under ``keys`` (series name -> logged key: ``train_acc``, ``val_loss``, ...)."""
        sums = self.set_aside(stage)
        out = sum_values(stage, *sums.tolist()) if sums is not None else {}
        given = {}
        for name in ("acc", "loss"):
            value = logged.get(keys[f"{stage}_{name}"]) if logged and keys else None
            if value is not None:
                given[f"{stage}_{name}"] = float(value)
        if logged is not None:  # an evaluation of the run (a probe passes no logged metrics)
            self.covered[stage] = len(given) == 2 and set(out) <= set(given)
        return {**out, **given}


def probe_values(
    trainer: pl.Trainer, pl_module: pl.LightningModule, sums: StageSums, eval_batches: int
) -> dict[str, float]:
    """An extra evaluation of train and dev metric through ``validation_step`` on the first ``eval_batches``
    batches of each loader (run it isolated, without gradients, in eval mode); the stages' running sums are
    left as they were."""
    values: dict[str, float] = {}
    loaders = {"train": trainer.train_dataloader, "val": trainer.val_dataloaders}
    for stage, loaders_of_stage in loaders.items():
        loader = first_dataloader(loaders_of_stage)
        if loader is None:
            continue
        # a sequential loader over the same data: the training loader's shuffling RNG is not touched
        plain = DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
        saved = sums.set_aside(stage)
        for i, batch in enumerate(plain):
            if i >= eval_batches:
                break
            batch = trainer.strategy.batch_to_device(batch)
            sums.add(stage, pl_module.validation_step(batch, i), batch)
        values.update(sums.take(stage))  # computed only: logged values are stale here
        sums.restore(stage, saved)
    return values


@dataclass
class Curves:
    """The evaluation records (plain floats, one per evaluation) and the weight-norm series, logged against
    ``log10_step``. Norms are sampled on the device every N steps and pulled to the host at an evaluation."""

    records: list[dict[str, float]] = field(default_factory=list)
    norms: list[tuple[int, float]] = field(default_factory=list)  # (step, weight norm)
    pending: list[tuple[int, Tensor]] = field(default_factory=list)  # sampled, not yet on the host

    def sample_norm(self, step: int, module: torch.nn.Module, every: int) -> None:
        """The weight norm at ``step``, on the device, unless a point (sampled, or an evaluation's) lies less than
        ``every`` steps before it (so once a step under accumulation): where evaluations come at least that
        often, their records carry the norm, and a point of its own would only add a logged row (~0.3 ms on
        W&B, two in three of the suite's rows on the quickstart)."""
        last = max(s[-1][0] if s else -math.inf for s in (self.pending, self.norms))
        if step - last >= every:
            self.pending.append((step, weight_norm(module)))

    def record(self, sink: Sink, step: int, norm: Tensor, values: dict[str, float]) -> dict[str, float]:
        """Log the pending norms and this evaluation (``values`` and the weight ``norm`` at ``step``)."""
        pending = [(s, n) for s, n in self.pending if s < step] + [(step, norm)]
        self.pending = []
        new_norms = list(zip([s for s, _ in pending], torch.stack([n for _, n in pending]).tolist(), strict=True))
        for s, v in new_norms[:-1]:
            if not self.norms or s > self.norms[-1][0]:
                self.norms.append((s, v))
                sink.log_scalars({PREFIX + "weight_norm": v, STEP_KEY: log10_step(s)}, step=s)
        record = {"step": float(step), "weight_norm": new_norms[-1][1], **values}
        if self.records and self.records[-1]["step"] == step:  # a probe just before this validation: superseded
            self.records.pop()
            self.norms.pop()
        self.norms.append((step, new_norms[-1][1]))
        self.records.append(record)
        logged = {PREFIX + k: v for k, v in record.items() if k != "step" and math.isfinite(v)}
        sink.log_scalars({**logged, STEP_KEY: log10_step(step)}, step=step)
        return record

    def since(self, step: int) -> list[dict[str, float]]:
        """The records from ``step`` on that have a dev metric."""
        return [x for x in self.records if x["step"] >= step and "val_acc" in x]

    def log_charts(self, sink: Sink, memorized: int | None, generalized: int | None) -> None:
        """Native line charts of both metrics and both losses against log10(step + 1), and a figure of all
        curves for the loggers other than W&B."""
        for title, names in (("accuracy", ("train_acc", "val_acc")), ("loss", ("train_loss", "val_loss"))):
            rows = [x for x in self.records if all(n in x for n in names)]
            if rows:
                sink.log_line_series(
                    PREFIX + f"{title}_curves",
                    [log10_step(int(x["step"])) for x in rows],
                    [[x[n] for x in rows] for n in names],
                    names,
                    title=f"Grokking: {title} vs log10(step + 1)",
                    x_name="log10(step + 1)",
                )
        records, norms = self.records, self.norms
        sink.log_figure(  # W&B has the native charts above: the ~0.7 s figure is for the other loggers only
            PREFIX + "curves",
            lambda: media.grokking_figure(records, norms, memorized, generalized),
            with_wandb=False,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"records": [dict(r) for r in self.records], "norms": [list(n) for n in self.norms]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = [dict(r) for r in state.get("records", [])]
        self.norms = [(int(s), float(v)) for s, v in state.get("norms", [])]


# ---- wording -----------------------------------------------------------------------------------------------------
def memorized_finding(record: dict[str, float], threshold: float) -> tuple[str, dict[str, Any]]:
    """The ``grokking.memorized`` message and data, at the evaluation ``record``."""
    step, train, val = int(record["step"]), record["train_acc"], record["val_acc"]
    message = (
        f"Training set memorised at step {step}: train metric {train:.3f} >= {threshold}, "
        f"dev metric only {val:.3f}. Keep training (with weight decay) if you expect grokking; "
        "do not stop on dev loss."
    )
    return message, {"step": step, "train": train, "val": val, "val_loss": record.get("val_loss")}


def generalized_finding(
    curves: Curves, step: int, val: float, val_threshold: float, memorized_step: int
) -> tuple[str, dict[str, Any]]:
    """The ``grokking.generalized`` message and data: the grokking delay, and the worst dev loss on the way."""
    ratio = step / max(memorized_step, 1)
    message = (
        f"Dev metric reached {val:.3f} >= {val_threshold} at step {step}, {ratio:.1f}x the "
        f"{memorized_step} steps it took to memorise the training set (grokking delay)."
    )
    return message, {
        "step": step,
        "memorized_step": memorized_step,
        "delay_ratio": ratio,
        "val": val,
        "max_val_loss": max((x.get("val_loss", -math.inf) for x in curves.records), default=None),
    }


def stalled_finding(v: StallVerdict, step: int, memorized_step: int, weight_norm: float) -> tuple[str, dict[str, Any]]:
    """The ``grokking.stalled`` message and data: the dev metric's and the weight norm's trends."""
    message = (
        f"Training set memorised at step {memorized_step}, now step {step}: over the last "
        f"{v.evaluations} evaluations the dev metric shows no rise (slope {v.val.slope:.2e}/step, 95% CI "
        f"[{v.val.low:.2e}, {v.val.high:.2e}]) and the weight norm no fall ({weight_norm:.1f})."
    )
    return message, {"memorized_step": memorized_step, "step": step, "val": v.val.as_dict(), "norm": v.norm.as_dict()}


def summary(memorized: int | None, generalized: int | None) -> dict[str, Any]:
    """The run summary: when the training set was memorised, when the dev set caught up, the delay ratio."""
    out: dict[str, Any] = {PREFIX + "memorized_step": memorized, PREFIX + "generalized_step": generalized}
    if memorized and generalized:
        out[PREFIX + "delay_ratio"] = generalized / memorized
    return {k: v for k, v in out.items() if v is not None}
