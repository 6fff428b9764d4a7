"""``GrokkingMonitor``: training set memorised, dev metric far behind; does it generalise later?

Grokking (Power et al. 2022): the training metric saturates early, the dev metric stays near chance for a
long time and then jumps. On a linear step axis the jump looks like a cliff at the far right, so this callback
logs train/dev metric, both losses and the global L2 weight norm against ``debug/grokking/log10_step`` (defined
as each key's step metric, so W&B plots them log-x with no UI setup), can evaluate at log-spaced steps, and
reports when the training set was memorised, when the dev metric caught up and how long that took.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_debug import media
from lightning_debug.base import DebugCallback
from lightning_debug.integrations.hf import is_causal_lm
from lightning_debug.isolation import isolated
from lightning_debug.metrics import prediction_sums
from lightning_debug.rules.grokking import assess_stall, is_generalized, is_memorized, log10_step, log_spaced_steps
from lightning_debug.signals import first_dataloader, predictions, weight_norm
from lightning_debug.sinks import Sink

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["GrokkingMonitor", "log10_step", "log_spaced_steps", "prediction_sums"]

PREFIX = "debug/grokking/"
STEP_KEY = PREFIX + "log10_step"
# series logged per evaluation (the token/sequence pair only when targets are sequences)
SERIES = ("train_acc", "val_acc", "train_loss", "val_loss", "weight_norm")
SEQ_SERIES = ("train_token_acc", "train_seq_acc", "val_token_acc", "val_seq_acc")


class GrokkingMonitor(DebugCallback):
    """Memorisation vs generalisation on a log-step axis, with the grokking delay.

    Args:
        train_metric / val_metric: logged keys of the training and dev metric (higher is better). When one
            is not logged, accuracy is computed from the ``logits`` / ``target`` the step returns.
        train_loss / val_loss: logged loss keys (computed from the outputs too when missing).
        threshold: the training metric at which the training set counts as memorised (0.99).
        val_threshold: the dev metric at which the model counts as generalised (default: ``threshold``).
        min_gap: "dev far below": at memorisation the dev metric must be at least this much lower (0.2).
        norm_every_n_steps: compute the global L2 weight norm (on the device) every N training steps.
        evals_per_decade: if > 0, also evaluate train and dev metric at this many log-spaced steps per
            factor of ten (1, 2, 3, 5, 10, 20, ...), so the log-x curve has points before the first
            validation. Uses ``validation_step`` on the first ``eval_batches`` batches of each loader.
        eval_batches: batches per extra evaluation.
        stall_factor: ``grokking.stalled`` needs the training set memorised for ``stall_factor`` x the step
            it took to memorise it, and at least ``stall_window`` evaluations since.
        stall_window: evaluations in the trend window: the dev metric shows no significant rise and the
            weight norm no significant fall (Theil-Sen 95% CI), i.e. nothing is moving towards a solution.
        ignore_index: target value to skip when computing accuracy (Hugging Face padding, -100).
        plot: at the end of fit, log a log-x figure and a native W&B chart of the curves.
    """

    def __init__(
        self,
        *,
        train_metric: str = "train_acc",
        val_metric: str = "val_acc",
        train_loss: str = "train_loss",
        val_loss: str = "val_loss",
        threshold: float = 0.99,
        val_threshold: float | None = None,
        min_gap: float = 0.2,
        norm_every_n_steps: int = 50,
        evals_per_decade: int = 0,
        eval_batches: int = 4,
        stall_factor: float = 10.0,
        stall_window: int = 10,
        ignore_index: int | None = -100,
        plot: bool = True,
        raise_errors: bool = False,
        print_findings: bool = True,
        strict: bool | None = None,
        verbose: bool | None = None,
    ) -> None:
        super().__init__(raise_errors=raise_errors, print_findings=print_findings, strict=strict, verbose=verbose)
        for name, value in (("threshold", threshold), ("val_threshold", val_threshold), ("min_gap", min_gap)):
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if norm_every_n_steps < 1:
            raise ValueError(f"norm_every_n_steps must be >= 1, got {norm_every_n_steps!r}")
        if evals_per_decade < 0:
            raise ValueError(f"evals_per_decade must be >= 0, got {evals_per_decade!r}")
        if eval_batches < 1:
            raise ValueError(f"eval_batches must be >= 1, got {eval_batches!r}")
        if stall_factor <= 1:
            raise ValueError(f"stall_factor must be > 1, got {stall_factor!r}")
        if stall_window < 3:
            raise ValueError(f"stall_window must be >= 3, got {stall_window!r}")
        self.keys = {"train_acc": train_metric, "val_acc": val_metric, "train_loss": train_loss, "val_loss": val_loss}
        self.threshold = threshold
        self.val_threshold = threshold if val_threshold is None else val_threshold
        self.min_gap = min_gap
        self.norm_every_n_steps = norm_every_n_steps
        self.evals_per_decade = evals_per_decade
        self.eval_batches = eval_batches
        self.stall_factor = stall_factor
        self.stall_window = stall_window
        self.ignore_index = ignore_index
        self.plot = plot
        self.records: list[dict[str, float]] = []  # one per evaluation, plain floats
        self.norms: list[tuple[int, float]] = []  # (step, weight norm) every norm_every_n_steps
        self.memorized_step: int | None = None
        self.generalized_step: int | None = None
        self._sums: dict[str, Tensor | None] = {"train": None, "val": None}
        self._pending_norms: list[tuple[int, Tensor]] = []
        self._stash: dict[str, float] | None = None
        self._probe_steps: set[int] = set()
        self._probe_train: dict[str, float] = {}
        self._shift = False

    # -- collecting -----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._shift = is_causal_lm(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sink = Sink(trainer)
        # Exact names, not a glob: which of two matching globs W&B applies (ours or Lightning's "*") is not
        # specified; an exact definition wins over both.
        for name in (*SERIES, *SEQ_SERIES):
            summary = "min" if name.endswith(("loss", "norm")) else "max"
            sink.define_metric(PREFIX + name, summary=summary, step_metric=STEP_KEY)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.evals_per_decade:  # here the number of training batches is known
            max_step = trainer.max_steps if trainer.max_steps > 0 else self._estimated_steps(trainer)
            self._probe_steps = log_spaced_steps(self.evals_per_decade, max_step)

    @staticmethod
    def _estimated_steps(trainer: pl.Trainer) -> int:
        batches = trainer.num_training_batches
        epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else 1000
        per_epoch = int(batches) if math.isfinite(batches) else 1000
        return max(1, per_epoch * epochs // max(1, trainer.accumulate_grad_batches))

    def _accumulate(self, stage: str, outputs: Any, batch: Any) -> None:
        found = predictions(outputs, batch, shift=self._shift)
        if isinstance(found, str):
            return
        scores, target, fmt = found
        sums = prediction_sums(scores, target, fmt, self.ignore_index)
        prev = self._sums[stage]
        self._sums[stage] = sums if prev is None else prev + sums

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(outputs, Mapping) and ("logits" in outputs or "probs" in outputs):  # not a bare {"loss": ..}
            self._accumulate("train", outputs, batch)
        step = trainer.global_step
        if step % self.norm_every_n_steps == 0 and (not self._pending_norms or self._pending_norms[-1][0] != step):
            self._pending_norms.append((step, weight_norm(pl_module)))
        if step in self._probe_steps:
            self._probe_steps.discard(step)
            values = self._probe(trainer, pl_module)
            if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                # a validation follows at this very step: lend it the current training metric (fresher than
                # the epoch mean) instead of logging a second point at the same step
                self._probe_train = {k: v for k, v in values.items() if k.startswith("train_")}
            elif values:
                self._record(trainer, pl_module, values)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking and dataloader_idx == 0:
            self._accumulate("val", outputs, batch)

    # -- recording ------------------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            self._sums["val"] = None
            return
        self._stash = self._stage_values("val", trainer.callback_metrics)
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # mid-epoch validation: record now
            self._record(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stash is not None:  # validation ran at the end of this epoch; train epoch metrics are ready now
            self._record(trainer, pl_module)

    def _stage_values(self, stage: str, logged: Mapping[str, Any]) -> dict[str, float]:
        """Logged keys first, then what was computed from the step outputs (and then reset)."""
        out: dict[str, float] = {}
        sums = self._sums[stage]
        self._sums[stage] = None
        if sums is not None:
            correct, tokens, nll, seq_correct, seqs = sums.tolist()
            if tokens > 0:
                out[f"{stage}_acc"], out[f"{stage}_loss"] = correct / tokens, nll / tokens
                if seqs > 0:
                    out[f"{stage}_token_acc"], out[f"{stage}_seq_acc"] = correct / tokens, seq_correct / seqs
        for name in ("acc", "loss"):
            value = logged.get(self.keys[f"{stage}_{name}"])
            if value is not None:
                out[f"{stage}_{name}"] = float(value)
        return out

    def _record(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, values: dict[str, float] | None = None
    ) -> None:
        if values is None:
            train = self._stage_values("train", trainer.callback_metrics)
            values = {**train, **self._probe_train, **(self._stash or {})}
            self._stash, self._probe_train = None, {}
        step = int(trainer.global_step)
        self._pending_norms = [(s, n) for s, n in self._pending_norms if s < step]
        self._pending_norms.append((step, weight_norm(pl_module)))
        norms = torch.stack([n for _, n in self._pending_norms]).tolist()
        new_norms = [(s, v) for (s, _), v in zip(self._pending_norms, norms, strict=True)]
        self._pending_norms = []
        sink = Sink(trainer)
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
        self._judge(trainer, record)

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """An extra evaluation of train and dev metric at a log-spaced step, through ``validation_step``."""
        values: dict[str, float] = {}
        loaders = {"train": trainer.train_dataloader, "val": trainer.val_dataloaders}
        with isolated(pl_module), torch.no_grad():
            pl_module.eval()
            for stage, loaders_of_stage in loaders.items():
                loader = first_dataloader(loaders_of_stage)
                if loader is None:
                    continue
                # a sequential loader over the same data: the training loader's shuffling RNG is not touched
                plain = DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
                saved = self._sums[stage]
                self._sums[stage] = None
                for i, batch in enumerate(plain):
                    if i >= self.eval_batches:
                        break
                    batch = trainer.strategy.batch_to_device(batch)
                    self._accumulate(stage, pl_module.validation_step(batch, i), batch)
                values.update(self._stage_values(stage, {}))  # computed only: logged values are stale here
                self._sums[stage] = saved
        if "train_acc" in values and "val_acc" in values:
            return values
        self._probe_steps.clear()
        self.skip(
            trainer,
            "cannot evaluate at log-spaced steps: validation_step returns no logits/target.",
            key="grokking:probe",
        )
        return {}

    # -- judging --------------------------------------------------------------------------------------------
    def _judge(self, trainer: pl.Trainer, r: dict[str, float]) -> None:
        train, val = r.get("train_acc"), r.get("val_acc")
        if train is None or val is None:
            return
        step = int(r["step"])
        if self.memorized_step is None:
            if is_memorized(
                train, val, threshold=self.threshold, val_threshold=self.val_threshold, min_gap=self.min_gap
            ):
                self.memorized_step = step
                self._report_memorized(trainer, r, step, train, val)
            return
        if self.generalized_step is None and is_generalized(val, val_threshold=self.val_threshold):
            self.generalized_step = step
            self._report_generalized(trainer, step, val)
            return
        if self.generalized_step is None and not self.has_finding("grokking.stalled"):
            self._check_stall(trainer, step)

    def _report_memorized(self, trainer: pl.Trainer, r: dict[str, float], step: int, train: float, val: float) -> None:
        self.emit(
            trainer,
            "grokking.memorized",
            f"Training set memorised at step {step}: train metric {train:.3f} >= {self.threshold}, "
            f"dev metric only {val:.3f}. Keep training (with weight decay) if you expect grokking; "
            "do not stop on dev loss.",
            data={"step": step, "train": train, "val": val, "val_loss": r.get("val_loss")},
        )

    def _report_generalized(self, trainer: pl.Trainer, step: int, val: float) -> None:
        assert self.memorized_step is not None
        ratio = step / max(self.memorized_step, 1)
        self.emit(
            trainer,
            "grokking.generalized",
            f"Dev metric reached {val:.3f} >= {self.val_threshold} at step {step}, {ratio:.1f}x the "
            f"{self.memorized_step} steps it took to memorise the training set (grokking delay).",
            data={
                "step": step,
                "memorized_step": self.memorized_step,
                "delay_ratio": ratio,
                "val": val,
                "max_val_loss": max((x.get("val_loss", -math.inf) for x in self.records), default=None),
            },
        )

    def _check_stall(self, trainer: pl.Trainer, step: int) -> None:
        assert self.memorized_step is not None
        since = [x for x in self.records if x["step"] >= self.memorized_step and "val_acc" in x]
        v = assess_stall(
            [x["step"] for x in since],
            [x["val_acc"] for x in since],
            [x["weight_norm"] for x in since],
            memorized_step=self.memorized_step,
            step=step,
            stall_factor=self.stall_factor,
            stall_window=self.stall_window,
        )
        if v is None or not v.stalled:
            return
        self.emit(
            trainer,
            "grokking.stalled",
            f"Training set memorised at step {self.memorized_step}, now step {step}: over the last "
            f"{v.evaluations} evaluations the dev metric shows no rise (slope {v.val.slope:.2e}/step, 95% CI "
            f"[{v.val.low:.2e}, {v.val.high:.2e}]) and the weight norm no fall ({since[-1]['weight_norm']:.1f}).",
            data={
                "memorized_step": self.memorized_step,
                "step": step,
                "val": v.val.as_dict(),
                "norm": v.norm.as_dict(),
            },
        )

    # -- end of fit -----------------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        summary: dict[str, Any] = {
            PREFIX + "memorized_step": self.memorized_step,
            PREFIX + "generalized_step": self.generalized_step,
        }
        if self.memorized_step and self.generalized_step:
            summary[PREFIX + "delay_ratio"] = self.generalized_step / self.memorized_step
        sink = Sink(trainer)
        sink.set_summary({k: v for k, v in summary.items() if v is not None})
        if not self.plot or not self.records:
            return
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
        records, norms, memorized, generalized = self.records, self.norms, self.memorized_step, self.generalized_step
        sink.log_figure(  # W&B has the native charts above: the ~0.7 s figure is for the other loggers only
            PREFIX + "curves",
            lambda: media.grokking_figure(records, norms, memorized, generalized),
            with_wandb=False,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "records": [dict(r) for r in self.records],
            "norms": [list(n) for n in self.norms],
            "memorized_step": self.memorized_step,
            "generalized_step": self.generalized_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.records = [dict(r) for r in state_dict.get("records", [])]
        self.norms = [(int(s), float(v)) for s, v in state_dict.get("norms", [])]
        self.memorized_step = state_dict.get("memorized_step")
        self.generalized_step = state_dict.get("generalized_step")
