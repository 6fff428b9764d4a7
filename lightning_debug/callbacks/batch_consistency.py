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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import IterableDataset

from lightning_debug.base import DebugCallback
from lightning_debug.batching import (
    CannotCheck,
    Examples,
    ForwardFn,
    batch_mover,
    default_forward,
    draw_examples,
    first_batch_examples,
    output_dependence,
    padding_of,
    tensors_of,
    token_counts,
)
from lightning_debug.integrations.hf import position_gradient_norms
from lightning_debug.isolation import batch_stat_modules, isolated
from lightning_debug.precision import float64_on_cpu, module_tolerance
from lightning_debug.rules.batch import (
    Fit,
    aggregation_fits,
    best_attribution,
    leaking_pairs,
    padding_verdict,
    pair_rows,
    rejudged,
    relative_dependence,
    target_visibility,
)
from lightning_debug.signals import first_dataloader

if TYPE_CHECKING:
    import lightning.pytorch as pl

SplitFn = Callable[[Any], Sequence[Any]]
_WORST = 5  # examples / pairs named in a finding


def _identity(batch: Any) -> Any:
    return batch


def _usable(rel: torch.Tensor | str) -> torch.Tensor:
    if isinstance(rel, str):
        raise CannotCheck(rel)
    return rel


@dataclass
class _Cost:
    forwards: int = 0
    vjps: int = 0
    float64_forwards: int = 0


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
        if not isinstance(batch_size, int) or batch_size < 2:
            raise ValueError(f"`batch_size` must be an int >= 2, got {batch_size!r}")
        if rtol is not None and not rtol > 0:
            raise ValueError(f"`rtol` must be > 0 or None, got {rtol!r}")
        if not atol >= 0:
            raise ValueError(f"`atol` must be >= 0, got {atol!r}")
        if not 0 < dependence_rtol < 1:
            raise ValueError(f"`dependence_rtol` must be in (0, 1), got {dependence_rtol!r}")
        for name, fn in (("split_fn", split_fn), ("forward_fn", forward_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(f"`{name}` must be callable or None")
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

    # ------------------------------------------------------------------ hook
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
            cost = _Cost()
            with torch.autocast(pl_module.device.type, enabled=False):
                pl_module.eval()
                loss = self._loss_part(trainer, pl_module, ex, cost)
                dep = self._dependence_part(trainer, pl_module, ex, cost)
                self._target_part(trainer, pl_module, ex, cost)
        data: dict[str, Any] = {
            "batch_size": len(ex.singles),
            "precision": str(trainer.precision),
            "autocast": "disabled: checked in the parameters' dtype",
            "batch_stat_layers_in_eval": [name for name, _ in batch_stat_modules(pl_module)],
        }
        data.update(
            cost={
                "forward_passes": cost.forwards,
                "batched_vjps": cost.vjps,
                "float64_forward_passes": cost.float64_forwards,
                "seconds": round(time.perf_counter() - start, 4),
            }
        )
        self._report(trainer, pl_module, ex, loss, dep, data)

    # ------------------------------------------------------------------ inputs
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

    def _rtol(self, pl_module: pl.LightningModule) -> float:
        return self.rtol if self.rtol is not None else module_tolerance(pl_module)[0]

    # ------------------------------------------------------------------ loss decomposition
    @staticmethod
    def _step_loss(module: pl.LightningModule, batch: Any) -> torch.Tensor:
        try:
            out = module.training_step(batch, 0)
        except Exception as err:  # the user's code cannot run this way (e.g. BatchNorm on a batch of 1)
            raise CannotCheck(f"`training_step` raised {type(err).__name__}: {err}") from err
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise CannotCheck(f"`training_step` returned {type(out).__name__}, not a scalar loss")
        return loss

    @classmethod
    def _step(cls, module: pl.LightningModule, batch: Any) -> float:
        return float(cls._step_loss(module, batch))

    def _losses(self, module: pl.LightningModule, batch: Any, singles: list[Any]) -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            return self._step(module, batch), torch.tensor(
                [self._step(module, s) for s in singles], dtype=torch.float64
            )

    def _loss_part(
        self, trainer: pl.Trainer, module: pl.LightningModule, ex: Examples, cost: _Cost
    ) -> dict[str, Any] | None:
        if self.coupled_loss:
            self.skip(
                trainer,
                "loss decomposition skipped, the loss is declared coupled (`coupled_loss=True`); cross-sample "
                "dependence of the outputs is still checked",
                key="loss",
            )
            return None
        rtol = self._rtol(module)
        counts = [token_counts(s, self.ignore_index) for s in ex.singles]
        pads = [padding_of(s, ex.batch) for s in ex.singles]
        # the padding probe: the shortest example next to the longest. Per-example differences can cancel in
        # the batch total; a pair with one padded example cannot hide them.
        ref = max(range(len(pads)), key=lambda i: (pads[i] == 0, tensors_of(ex.singles[i])[0].numel()))
        short = max(range(len(pads)), key=lambda i: pads[i])
        probe = ex.items is not None and ex.collate is not None and pads[short] > 0 and pads[ref] == 0
        try:
            total, losses = self._losses(module, ex.batch, ex.singles)
            pair_totals = {short: self._pair_total(module, ex, short, ref, _identity)} if probe else {}
        except CannotCheck as reason:
            self.skip(trainer, f"loss decomposition skipped: {reason}", key="loss")
            return None
        cost.forwards += 1 + len(ex.singles) + len(pair_totals)
        fits = aggregation_fits(total, losses, counts, rtol, self.atol)
        probe_rows = pair_rows(pair_totals, losses, fits[0], ref, pads, counts, rtol, self.atol)
        result: dict[str, Any] = {"fits": fits, "total": total, "rtol": rtol, "pads": pads, "probe": probe_rows}
        if fits[0].ratio <= 1 and all(r["ratio"] <= 1 for r in probe_rows):
            return result
        # Escalate: the same computation in float64 on the CPU. Judged against the working-precision tolerance,
        # so float noise (which can only shrink) passes and a bug (which stays) fails.
        with float64_on_cpu(module) as convert:
            total64, losses64 = self._losses(module, convert(ex.batch), [convert(s) for s in ex.singles])
            cost.float64_forwards += 1 + len(ex.singles)
            fits64 = rejudged(aggregation_fits(total64, losses64, counts, rtol, self.atol), fits)
            result.update(fits64=fits64, failed=fits64[0].ratio > 1)
            if probe:
                # every example next to the longest (the padding it had in the batch), the longest next to itself
                # as the unpadded control; judged with the aggregation that explains the most pairs
                assert ex.items is not None
                totals = {i: self._pair_total(module, ex, i, ref, convert) for i in range(len(ex.items))}
                cost.float64_forwards += len(totals)
                name, rows = best_attribution(fits64, totals, losses64, ref, pads, counts, rtol, self.atol)
                result.update(attribution=(name, rows), failed=result["failed"] or any(r["ratio"] > 1 for r in rows))
        return result

    def _pair_total(
        self, module: pl.LightningModule, ex: Examples, i: int, ref: int, convert: Callable[[Any], Any]
    ) -> float:
        assert ex.items is not None and ex.collate is not None
        with torch.no_grad():
            pair = ex.collate([ex.items[i], ex.items[ref]])
            return self._step(module, convert(ex.move(pair)))

    # ------------------------------------------------------------------ cross-sample dependence
    def _dependence_part(
        self, trainer: pl.Trainer, module: pl.LightningModule, ex: Examples, cost: _Cost
    ) -> dict[str, Any] | None:
        b = len(ex.singles)
        try:
            matrix, method = output_dependence(module, ex.batch, b, self.forward_fn, self.seed)
            cost.vjps += 1  # one forward with gradients and one batched backward
            rel = _usable(relative_dependence(matrix))
            result: dict[str, Any] = {"rel": rel, "method": method}
            if float(rel.max()) > self.dependence_rtol:
                with float64_on_cpu(module) as convert:
                    matrix64, _ = output_dependence(module, convert(ex.batch), b, self.forward_fn, self.seed)
                cost.float64_forwards += 1
                result["rel64"] = _usable(relative_dependence(matrix64))
        except CannotCheck as reason:
            self.skip(trainer, f"dependence check skipped: {reason}", key="dependence")
            return None
        return result

    # ------------------------------------------------------------------ a causal LM's targets
    def _target_part(self, trainer: pl.Trainer, module: pl.LightningModule, ex: Examples, cost: _Cost) -> None:
        """A causal LM scored on the token it reads (labels not shifted) learns to copy its input: the loss falls
        to ~0 on train and validation alike, and nothing else in the run looks wrong."""
        try:
            norms = position_gradient_norms(module, ex.batch, lambda batch: self._step_loss(module, batch))
        except CannotCheck:
            return  # the loss part reports why the training step cannot run
        if norms is None:
            return
        cost.vjps += 1
        verdict = target_visibility(norms)
        if verdict.visible:
            self.emit(
                trainer,
                "batch.target_visible",
                f"The loss reads the input token at the last position of the sequence (its gradient there is "
                f"{verdict.ratio:.2g}x the median of the earlier positions'; with labels shifted against the "
                "inputs it is exactly 0): each position is scored on the token it already sees.",
                data={"ratio": verdict.ratio, "positions": norms.shape[1], "examples": norms.shape[0]},
            )

    # ------------------------------------------------------------------ verdicts
    def _report(
        self,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        ex: Examples,
        loss: dict[str, Any] | None,
        dep: dict[str, Any] | None,
        data: dict[str, Any],
    ) -> None:
        leaking = dep is not None and float(dep.get("rel64", dep["rel"]).max()) > self.dependence_rtol
        loss_failed = loss is not None and loss.get("failed", False)
        leak_message = self._dependence_data(module, dep, data, leaking) if dep is not None else None
        if loss is not None:
            self._report_loss(trainer, ex, loss, data, leaking, loss_failed)
        if leak_message is not None:
            self.emit(trainer, "batch.cross_sample_dependence", leak_message, data=data)
        if loss_failed or leaking or (loss is None and dep is None):
            return
        parts = []
        if loss is not None:
            fit = loss["fits"][0]
            parts.append(
                f"batched loss = {fit.name} of the {len(ex.singles)} single-example losses "
                f"(difference {fit.residual:.2g}, tolerance {fit.tol:.2g}"
                + (", padding not exercised: no example was padded)" if not data["max_padding"] else ")")
            )
        if dep is not None:
            parts.append(
                f"no cross-sample dependence (largest off-diagonal {float(dep['rel'].max()):.2g} "
                "of the largest self-gradient)"
            )
        cost = data["cost"]
        summary = "; ".join(parts)
        self.emit(
            trainer,
            "batch.ok",
            summary[0].upper()
            + summary[1:]
            + f". Cost: {cost['forward_passes']} loss forward passes + {cost['batched_vjps']} batched VJP, "
            f"{cost['seconds']:.2f} s.",
            data=data,
        )

    def _dependence_data(
        self, module: pl.LightningModule, dep: dict[str, Any], data: dict[str, Any], leaking: bool
    ) -> str | None:
        """Fill ``data["dependence"]``; the finding's message if examples leak into each other."""
        rel = dep["rel"]
        data["dependence"] = {
            "method": dep["method"],
            "max_off_diagonal": float(rel.max()),
            "rtol": self.dependence_rtol,
            "max_off_diagonal_float64": float(dep["rel64"].max()) if "rel64" in dep else None,
        }
        if not leaking:
            return None
        rel64 = dep["rel64"]
        pairs = leaking_pairs(rel, rel64, self.dependence_rtol)
        mixing = [name for name, m in batch_stat_modules(module) if m.running_mean is None]
        data["dependence"].update(
            pairs=pairs[: _WORST * 4],
            n_pairs=len(pairs),
            rows_affected=sorted({p["output"] for p in pairs}),
            matrix_float64=rel64,
            batch_stat_layers_mixing_in_eval=mixing,
        )
        shown = ", ".join(f"output {p['output']} ← input {p['input']} ({p['relative_float64']:.2g})" for p in pairs[:3])
        cause = f"; {mixing} use batch statistics even in eval mode (track_running_stats=False)" if mixing else ""
        return (
            f"Example outputs depend on other examples' inputs in {len(pairs)} of {rel.numel() - len(rel)} pairs "
            f"(relative gradient in float64): {shown}{cause}."
        )

    def _report_loss(
        self,
        trainer: pl.Trainer,
        ex: Examples,
        loss: dict[str, Any],
        data: dict[str, Any],
        leaking: bool,
        failed: bool,
    ) -> None:
        fits: list[Fit] = loss["fits"]
        pads = loss["pads"]
        data["max_padding"] = max(pads)
        matches = [f.name for f in fits if f.ratio <= 1]
        data["loss"] = {
            "aggregation": fits[0].name if fits[0].ratio <= 1 else None,
            "also_matches": matches[1:],
            "batch_loss": loss["total"],
            "difference": fits[0].residual,
            "tolerance": fits[0].tol,
            "rtol": loss["rtol"],
            "atol_per_token": self.atol,
            "candidates": {f.name: f.residual for f in fits},
            "padding": pads,
            "padding_probe": loss["probe"][0] if loss["probe"] else None,
        }
        if "fits64" not in loss:
            return
        best64: Fit = loss["fits64"][0]
        data["loss"].update(
            difference_float64=best64.residual,
            aggregation_float64=best64.name if best64.ratio <= 1 else None,
            candidates_float64={f.name: f.residual for f in loss["fits64"]},
        )
        if not failed:
            data["loss"]["aggregation"] = best64.name
            data["loss"]["note"] = "the working-precision difference vanished in float64: float noise"
            return
        check, detail = self._attribution(loss, data, leaking) if "attribution" in loss else ("batch.loss_mismatch", "")
        if leaking:
            detail += " Consistent with the cross-sample dependence reported alongside."
        if best64.ratio <= 1:
            head = (
                f"Batched loss {loss['total']:.6g} matches {best64.name} of the single-example losses in total "
                f"(float64 difference {best64.residual:.3g}), but not example by example."
            )
        else:
            head = (
                f"Batched loss {loss['total']:.6g} matches no aggregation of the single-example losses "
                f"(closest: {fits[0].name} = {fits[0].predicted:.6g}; difference {fits[0].residual:.3g} in "
                f"working precision, {best64.residual:.3g} in float64, tolerance {fits[0].tol:.2g})."
            )
        self.emit(trainer, check, head + detail, data=data)

    @staticmethod
    def _attribution(loss: dict[str, Any], data: dict[str, Any], leaking: bool) -> tuple[str, str]:
        """Which finding the pair re-runs point to (padding dependence or a plain mismatch), and its detail."""
        data["loss"]["attribution_aggregation"], rows = loss["attribution"]
        rows.sort(key=lambda r: -r["ratio"])
        data["loss"]["worst_examples"] = rows[:_WORST]
        padding = padding_verdict(rows, leaking)
        data["loss"]["padding_kendall_tau"] = padding.tau
        worst = ", ".join(
            f"#{r['index']} (padding {r['padding']}: alone {r['loss_alone']:.4g}, difference {r['delta']:.3g})"
            for r in rows[:3]
        )
        if not padding.padding_only:
            return "batch.loss_mismatch", " Worst examples: " + worst
        tau = padding.tau if padding.tau is not None else float("nan")
        return "batch.padding_dependence", (
            f" Re-collated next to the longest example, only padded examples change their loss (padding "
            f"{padding.amounts} positions; unpadded ones match; Kendall tau of |difference| vs padding "
            f"{tau:.2f}): worst " + worst
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.done = bool(state_dict.get("done", False))
