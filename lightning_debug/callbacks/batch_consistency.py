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

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from scipy.stats import kendalltau
from torch.utils.data import IterableDataset

from lightning_debug.base import DebugCallback
from lightning_debug.batching import (
    ForwardFn,
    batch_dim,
    batch_mover,
    batch_size_of,
    default_forward,
    dependency_matrix,
    input_embedding,
    padding_of,
    per_example_outputs,
    tensors_of,
    token_counts,
)
from lightning_debug.isolation import batch_stat_modules, isolated
from lightning_debug.precision import float64_on_cpu, module_tolerance
from lightning_debug.signals import first_dataloader

if TYPE_CHECKING:
    import lightning.pytorch as pl

SplitFn = Callable[[Any], Sequence[Any]]
# Aggregations tried, in the order reported when several match (equal weights make them indistinguishable).
_TOKEN_RULES = ("labels_shifted", "labels", "attention_mask_shifted", "attention_mask")
_WORST = 5  # examples / pairs named in a finding


def _median(values: list[float]) -> float:
    return float(torch.tensor(values).median())


def _identity(batch: Any) -> Any:
    return batch


def _same(a: Any, b: Any) -> bool:
    ta, tb = tensors_of(a), tensors_of(b)
    return len(ta) == len(tb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb, strict=True))


class _Skip(Exception):
    """The check cannot judge this setup; the text is the reason."""


@dataclass
class _Examples:
    batch: Any
    singles: list[Any]
    items: list[Any] | None  # dataset items, when pairs can be re-collated
    collate: Callable[[list[Any]], Any] | None
    move: Callable[[Any], Any]  # a collated batch to the module's device, as the training loop moves it


@dataclass
class _Fit:
    """How well one aggregation rule explains the batched loss."""

    name: str
    coef: torch.Tensor  # batched loss ≈ Σ coef_i · loss_i
    predicted: float
    residual: float
    tol: float

    @property
    def ratio(self) -> float:
        return self.residual / self.tol if self.tol > 0 else float("inf")


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
        self.done = True
        if trainer.local_rank != 0:
            return
        start = time.perf_counter()
        with isolated(pl_module):  # RNG included: datasets and collate functions may draw random numbers
            try:
                ex = self._examples(trainer, pl_module)
            except _Skip as reason:
                self.skip(trainer, str(reason), key="batch")
                return
            cost = _Cost()
            with torch.autocast(pl_module.device.type, enabled=False):
                pl_module.eval()
                loss = self._loss_part(trainer, pl_module, ex, cost)
                dep = self._dependence_part(trainer, pl_module, ex, cost)
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
    def _examples(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> _Examples:
        if not pl_module.automatic_optimization:
            raise _Skip("manual optimization: `training_step` steps the optimizer itself, so it cannot be replayed")
        loader = first_dataloader(trainer.train_dataloader)
        if loader is None:
            raise _Skip("no train DataLoader to draw examples from")
        dataset, collate = loader.dataset, loader.collate_fn
        per_item = loader.batch_size is not None
        items: list[Any] | None = None
        if per_item and not isinstance(dataset, IterableDataset):
            n = len(dataset)  # type: ignore[arg-type]
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[: self.batch_size]
            items = [dataset[int(i)] for i in idx]
        elif per_item:
            items = list(itertools.islice(iter(dataset), self.batch_size))
        if items is not None:
            if len(items) < 2:
                raise _Skip(f"the train dataset has {len(items)} example(s); a batch of 1 has nothing to compare")
            batch = collate(items)
            if not _same(batch, collate(items)):  # e.g. MLM masking: a batch and its singles get different masks
                if self.split_fn is None:
                    raise _Skip(
                        "the collate_fn is random (two collations of the same examples differ, e.g. MLM masking), "
                        "so examples collated alone would not match the batch; pass `split_fn` to cut the batch "
                        "into unpadded single examples instead"
                    )
                items = None
                singles = list(self.split_fn(batch))
            else:
                singles = [collate([it]) for it in items]
        elif self.split_fn is not None:
            batch = next(iter(loader))
            singles = list(self.split_fn(batch))
        else:
            raise _Skip(
                "the train loader yields ready-made batches (batch_size=None or no per-item collate_fn), so "
                "examples cannot be re-collated alone; pass `split_fn`"
            )
        b = batch_size_of(batch)
        if b is None or b < 2 or b != len(singles):
            raise _Skip(f"could not build a batch of >= 2 examples (batch size {b}, {len(singles)} singles)")
        move = batch_mover(trainer, pl_module)
        return _Examples(move(batch), [move(s) for s in singles], items, collate if items is not None else None, move)

    def _rtol(self, pl_module: pl.LightningModule) -> float:
        return self.rtol if self.rtol is not None else module_tolerance(pl_module)[0]

    # ------------------------------------------------------------------ loss decomposition
    @staticmethod
    def _step(module: pl.LightningModule, batch: Any) -> float:
        try:
            out = module.training_step(batch, 0)
        except Exception as err:  # the user's code cannot run this way (e.g. BatchNorm on a batch of 1)
            raise _Skip(f"`training_step` raised {type(err).__name__}: {err}") from err
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise _Skip(f"`training_step` returned {type(out).__name__}, not a scalar loss")
        return float(loss)

    def _losses(self, module: pl.LightningModule, batch: Any, singles: list[Any]) -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            return self._step(module, batch), torch.tensor(
                [self._step(module, s) for s in singles], dtype=torch.float64
            )

    def _fits(self, total: float, losses: torch.Tensor, counts: list[dict[str, int]], rtol: float) -> list[_Fit]:
        """Every aggregation rule the data supports, best first."""
        ones = torch.ones_like(losses)
        rules: dict[str, tuple[torch.Tensor, bool]] = {"mean": (ones, True), "sum": (ones, False)}
        for rule in _TOKEN_RULES:
            if all(c.get(rule, 0) > 0 for c in counts):
                rules[f"token_mean:{rule}"] = (torch.tensor([float(c[rule]) for c in counts]), True)
        tokens = torch.tensor([float(max(c.values(), default=1)) for c in counts])
        tol_i = rtol * losses.abs() + self.atol * tokens
        fits = []
        for name, (w, normalized) in rules.items():
            coef = w / w.sum() if normalized else w
            predicted = float((coef * losses).sum())
            tol = float((coef * tol_i).sum()) + rtol * abs(total)
            fits.append(_Fit(name, coef, predicted, abs(total - predicted), tol))
        return sorted(fits, key=lambda f: f.ratio)

    def _loss_part(
        self, trainer: pl.Trainer, module: pl.LightningModule, ex: _Examples, cost: _Cost
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
        except _Skip as reason:
            self.skip(trainer, f"loss decomposition skipped: {reason}", key="loss")
            return None
        cost.forwards += 1 + len(ex.singles) + len(pair_totals)
        fits = self._fits(total, losses, counts, rtol)
        probe_rows = self._pair_rows(pair_totals, losses, fits[0], ref, pads, counts, rtol)
        result: dict[str, Any] = {"fits": fits, "total": total, "rtol": rtol, "pads": pads, "probe": probe_rows}
        if fits[0].ratio <= 1 and all(r["ratio"] <= 1 for r in probe_rows):
            return result
        # Escalate: the same computation in float64 on the CPU. Judged against the working-precision tolerance,
        # so float noise (which can only shrink) passes and a bug (which stays) fails.
        with float64_on_cpu(module) as convert:
            total64, losses64 = self._losses(module, convert(ex.batch), [convert(s) for s in ex.singles])
            cost.float64_forwards += 1 + len(ex.singles)
            fits64 = self._fits(total64, losses64, counts, rtol)
            for f64 in fits64:
                f64.tol = next(f.tol for f in fits if f.name == f64.name)
            fits64.sort(key=lambda f: f.ratio)
            result.update(fits64=fits64, failed=fits64[0].ratio > 1)
            if probe:
                # every example next to the longest (the padding it had in the batch), the longest next to itself
                # as the unpadded control; judged with the aggregation that explains the most pairs
                assert ex.items is not None
                totals = {i: self._pair_total(module, ex, i, ref, convert) for i in range(len(ex.items))}
                cost.float64_forwards += len(totals)
                name, rows = max(
                    ((f.name, self._pair_rows(totals, losses64, f, ref, pads, counts, rtol)) for f in fits64),
                    key=lambda nr: (sum(r["ratio"] <= 1 for r in nr[1]), -_median([r["ratio"] for r in nr[1]])),
                )
                result.update(attribution=(name, rows), failed=result["failed"] or any(r["ratio"] > 1 for r in rows))
        return result

    def _pair_total(
        self, module: pl.LightningModule, ex: _Examples, i: int, ref: int, convert: Callable[[Any], Any]
    ) -> float:
        assert ex.items is not None and ex.collate is not None
        with torch.no_grad():
            pair = ex.collate([ex.items[i], ex.items[ref]])
            return self._step(module, convert(ex.move(pair)))

    def _pair_rows(
        self,
        totals: dict[int, float],
        losses: torch.Tensor,
        fit: _Fit,
        ref: int,
        pads: list[int],
        counts: list[dict[str, int]],
        rtol: float,
    ) -> list[dict[str, Any]]:
        """Per-example difference ``Δ_i`` in the pair ``[i, ref]`` under ``fit``'s aggregation, with tolerance."""
        rows = []
        for i, pair_total in totals.items():
            w = (fit.coef / fit.coef.max())[[i, ref]]
            coef = w if fit.name == "sum" else w / w.sum()
            predicted = float(coef[0] * losses[i] + coef[1] * losses[ref])
            delta = (pair_total - predicted) / float(coef.sum() if i == ref else coef[0])
            tol = rtol * abs(float(losses[i])) + self.atol * max(counts[i].values(), default=1)
            ratio = abs(delta) / tol if tol > 0 else float("inf")
            rows.append({"index": i, "padding": pads[i], "loss_alone": float(losses[i]), "delta": delta, "tol": tol})
            rows[-1]["ratio"] = ratio
        return rows

    # ------------------------------------------------------------------ cross-sample dependence
    def _matrix(self, module: pl.LightningModule, batch: Any, b: int) -> tuple[torch.Tensor, str]:
        """BxB dependency matrix through the input embedding (integer inputs) and float inputs."""
        leaves: list[tuple[torch.Tensor, int]] = []

        def as_leaf(t: torch.Tensor) -> torch.Tensor:
            dim = batch_dim(t, b)
            if not t.is_floating_point() or dim is None:
                return t
            leaf = t.detach().clone().requires_grad_()
            leaves.append((leaf, dim))
            return leaf

        batch = apply_to_collection(batch, torch.Tensor, as_leaf)
        handle = None
        embedding = input_embedding(module)
        if embedding is not None and any(not t.is_floating_point() for t in tensors_of(batch)):
            captured: list[bool] = []

            def capture(_: torch.nn.Module, __: Any, out: Any) -> Any:
                dim = batch_dim(out, b) if isinstance(out, torch.Tensor) and not captured else None
                if dim is None:  # only the first call embeds the token inputs
                    return None
                captured.append(True)
                leaf = out.detach().requires_grad_()
                leaves.insert(0, (leaf, dim))
                return leaf

            handle = embedding.register_forward_hook(capture)
        try:
            with torch.enable_grad():
                outputs = per_example_outputs(self.forward_fn(module, batch), b)
        except Exception as err:
            raise _Skip(f"the forward pass raised {type(err).__name__}: {err}; pass `forward_fn`") from err
        finally:
            if handle is not None:
                handle.remove()
        if outputs is None or not outputs.requires_grad or not leaves:
            raise _Skip(
                "no differentiable per-example inputs or outputs (integer inputs without an embedding layer, "
                "or no floating output with one row per example); pass `forward_fn`"
            )
        return dependency_matrix(outputs, leaves, self.seed)

    def _leaks(self, matrix: torch.Tensor) -> tuple[torch.Tensor, float]:
        scale = float(matrix.diagonal().max())
        if not scale > 0 or not torch.isfinite(matrix).all():
            raise _Skip(
                f"the dependency matrix is degenerate (largest self-gradient {scale}, finite: "
                f"{bool(torch.isfinite(matrix).all())})"
            )
        rel = matrix / scale
        rel.fill_diagonal_(0.0)
        return rel, scale

    def _dependence_part(
        self, trainer: pl.Trainer, module: pl.LightningModule, ex: _Examples, cost: _Cost
    ) -> dict[str, Any] | None:
        b = len(ex.singles)
        try:
            matrix, method = self._matrix(module, ex.batch, b)
            cost.vjps += 1  # one forward with gradients and one batched backward
            rel, _ = self._leaks(matrix)
            result: dict[str, Any] = {"rel": rel, "method": method}
            if float(rel.max()) > self.dependence_rtol:
                with float64_on_cpu(module) as convert:
                    matrix64, _ = self._matrix(module, convert(ex.batch), b)
                cost.float64_forwards += 1
                result["rel64"], _ = self._leaks(matrix64)
        except _Skip as reason:
            self.skip(trainer, f"dependence check skipped: {reason}", key="dependence")
            return None
        return result

    # ------------------------------------------------------------------ verdicts
    def _report(
        self,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        ex: _Examples,
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
        flagged = (rel64 > self.dependence_rtol).nonzero().tolist()
        flagged.sort(key=lambda ij: -float(rel64[ij[0], ij[1]]))
        pairs = [
            {"output": i, "input": j, "relative": float(rel[i, j]), "relative_float64": float(rel64[i, j])}
            for i, j in flagged
        ]
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
        ex: _Examples,
        loss: dict[str, Any],
        data: dict[str, Any],
        leaking: bool,
        failed: bool,
    ) -> None:
        fits: list[_Fit] = loss["fits"]
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
        best64: _Fit = loss["fits64"][0]
        data["loss"].update(
            difference_float64=best64.residual,
            aggregation_float64=best64.name if best64.ratio <= 1 else None,
            candidates_float64={f.name: f.residual for f in loss["fits64"]},
        )
        if not failed:
            data["loss"]["aggregation"] = best64.name
            data["loss"]["note"] = "the working-precision difference vanished in float64: float noise"
            return
        check, detail = "batch.loss_mismatch", ""
        if "attribution" in loss:
            data["loss"]["attribution_aggregation"], rows = loss["attribution"]
            rows.sort(key=lambda r: -r["ratio"])
            data["loss"]["worst_examples"] = rows[:_WORST]
            bad = [r for r in rows if r["ratio"] > 1]
            padded_only = bool(bad) and all(r["padding"] > 0 for r in bad)
            tau = kendalltau([r["padding"] for r in rows], [abs(r["delta"]) for r in rows]).statistic
            data["loss"]["padding_kendall_tau"] = float(tau) if tau == tau else None
            if padded_only and not leaking:
                check = "batch.padding_dependence"
                amounts = sorted({r["padding"] for r in bad})
                detail = (
                    f" Re-collated next to the longest example, only padded examples change their loss (padding "
                    f"{amounts} positions; unpadded ones match; Kendall tau of |difference| vs padding {tau:.2f}): "
                    "worst "
                )
            else:
                detail = " Worst examples: "
            detail += ", ".join(
                f"#{r['index']} (padding {r['padding']}: alone {r['loss_alone']:.4g}, difference {r['delta']:.3g})"
                for r in rows[:3]
            )
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

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.done = bool(state_dict.get("done", False))
