"""What ``ModelHealthCheck`` measures, on the device: the first training step, watched; the periodic gradient samples.

Startup (:class:`FirstStep`): the run's own first training step, watched while it runs: every ReLU/tanh/sigmoid
call seen through a ``TorchFunctionMode`` (:class:`ActivationProbe`) during its forward, its loss, and which
parameters its backward gave a gradient. No extra forward or backward, so nothing to isolate.

Periodic (:class:`GradientSampler`): on a sampled step, per-layer gradient and weight norms, the global norm and
whether clipping is active, before the optimizer step; one parameter snapshot, turned into per-layer update norms
after the step. Each sample is one device row; rows are pulled to the host in one transfer per check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from lightning_debug.batching import tensors_of
from lightning_debug.isolation import isolating
from lightning_debug.rules import health as rules
from lightning_debug.signals import undo_accumulation

if TYPE_CHECKING:
    import lightning.pytorch as pl

SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")
_KINDS = {"relu": "relu", "relu_": "relu", "relu6": "relu", "tanh": "tanh", "tanh_": "tanh"}
_KINDS.update(sigmoid="sigmoid", sigmoid_="sigmoid")
_ACTIVATION_MODULES = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Tanh, torch.nn.Sigmoid)


def sharded(trainer: pl.Trainer) -> str | None:
    """The sharding strategy's class name (recognised anywhere in the strategy's MRO), else ``None``."""
    names = {c.__name__ for c in type(trainer.strategy).__mro__}
    return next((n for n in SHARDED_STRATEGIES if n in names), None)


class ActivationProbe(TorchFunctionMode):
    """Sees every ReLU/tanh/sigmoid call inside the module (module or functional) and counts, per call site,
    units that are flat for the whole batch (not in another check's isolated run of user code, such as the
    batch-consistency check's single-example passes on a stream's first batch). Names: the activation
    module's own name, else the calling module's name + the function (+ ``#k`` for its k-th call).
    Parameter-free leaf modules (GELU/SiLU wrappers that use tanh/sigmoid inside) are not activation sites of
    these kinds and are skipped."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.stack: list[tuple[str, torch.nn.Module]] = []
        self.sites: dict[str, tuple[str, torch.Tensor, torch.Tensor, int]] = {}
        self.outputs: list[Any] = []  # outputs of the module and its children (where logits live)
        self.handles = []
        for name, m in module.named_modules():
            self.handles.append(m.register_forward_pre_hook(self._enter(name)))
            self.handles.append(m.register_forward_hook(self._leave(name.count(".") < 1 if name else True)))

    def _enter(self, name: str) -> Any:
        return lambda m, args: self.stack.append((name, m))

    def _leave(self, top: bool) -> Any:
        def hook(m: torch.nn.Module, args: Any, out: Any) -> None:
            self.stack.pop()
            if top and not isolating():
                self.outputs.append(out)

        return hook

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        kind = _KINDS.get(getattr(func, "__name__", ""))
        if kind is not None and self.stack and isinstance(out, torch.Tensor) and out.ndim >= 2 and not isolating():
            name, m = self.stack[-1]
            if not isinstance(m, _ACTIVATION_MODULES):
                if not any(True for _ in m.parameters()):
                    return out  # an activation wrapper of another kind (GELU, SiLU ...)
                name = f"{name or 'forward'}:{getattr(func, '__name__', kind).rstrip('_')}"
            self._record(name, kind, out.detach())
        return out

    def _record(self, name: str, kind: str, y: torch.Tensor) -> None:
        k = 2
        base = name
        while name in self.sites:
            name, k = f"{base}#{k}", k + 1
        unit_dim = y.ndim - 1 if y.ndim == 3 else 1  # (B, F), (B, C, H, W...): dim 1; (B, T, F): features last
        flat = y <= 0 if kind == "relu" else (y.abs() > 0.99 if kind == "tanh" else (y < 0.01) | (y > 0.99))
        per_unit = flat.movedim(unit_dim, 0).reshape(y.shape[unit_dim], -1).all(dim=1)
        self.sites[name] = (kind, per_unit.sum(), flat.float().mean(), y.shape[unit_dim])

    def close(self) -> list[rules.UnitStats]:
        for h in self.handles:
            h.remove()
        return [rules.UnitStats(n, k, units, int(f), float(v)) for n, (k, f, v, units) in self.sites.items()]


def classifier(out: list[Any], batch: Any, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(logits (N, C), labels (N,)) when the step's loss is the cross-entropy of an output and an integer label
    of the batch (plain, or shifted by one position as causal LMs score), else ``None``."""
    labels = [t for t in tensors_of(batch) if not t.is_floating_point() and t.ndim >= 1 and t.dtype != torch.bool]
    logits = [t for t in tensors_of(out) if t.is_floating_point() and t.ndim >= 2 and t.shape[-1] >= 2]
    for z in logits:
        for y in labels:
            pairs = [(z, y)] + ([(z[:, :-1], y[:, 1:])] if z.ndim == 3 and y.ndim == 2 else [])
            for zz, yy in pairs:
                if zz.shape[:-1] != yy.shape:
                    continue
                zz, yy = zz.reshape(-1, zz.shape[-1]).detach().float(), yy.reshape(-1)
                keep = yy != -100
                if not keep.any() or yy[keep].min() < 0 or yy[keep].max() >= zz.shape[-1]:
                    continue
                ce = torch.nn.functional.cross_entropy(zz[keep], yy[keep])
                if torch.isclose(ce, loss.detach().float(), rtol=1e-3, atol=1e-4):
                    return zz[keep], yy[keep]
    return None


def unscaled_loss(trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> Any:
    """The loss ``on_before_backward`` receives, as ``training_step`` computed it: a precision plugin's loss scale
    (16-bit mixed precision) divided out, then :func:`~lightning_debug.signals.undo_accumulation`."""
    if not isinstance(loss, torch.Tensor):
        return loss
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        loss = loss / scaler.get_scale()
    return undo_accumulation(trainer, pl_module, loss)


def optimized(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int]:
    """{name: numel} of the trainable tensors in any param group; a tensor that is no parameter of the module
    (captured before a layer was replaced) gets a name of its own."""
    names = {id(p): n for n, p in pl_module.named_parameters()}
    out: dict[str, int] = {}
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    out[names.get(id(p), f"<not a parameter of the module: {tuple(p.shape)}>#{len(out)}")] = p.numel()
    return out


@dataclass(frozen=True)
class StartupEvidence:
    """What the first training step showed."""

    with_grad: dict[str, int]  # {name: numel} of the trainable parameters that received a gradient
    units: list[rules.UnitStats]
    loss: float
    logits: np.ndarray | None  # (N, C) when the loss is a C-class cross-entropy of an output, else None
    class_counts: np.ndarray | None  # (C,) label counts of those examples


class FirstStep:
    """The evidence of the run's first training step, taken while the step runs: no extra forward or backward,
    so nothing to isolate and no cost but the probe's (a ``TorchFunctionMode`` and module hooks during one
    forward). :meth:`forward_done` (``on_before_backward``) closes the probe and keeps the loss and the logits it
    explains; :meth:`backward_done` (``on_after_backward``, every backward of the step under manual
    optimization) adds the parameters that now hold a gradient. :meth:`close` is safe to call at any point."""

    def __init__(self, pl_module: pl.LightningModule, params: list[tuple[str, torch.nn.Parameter]], batch: Any):
        self.params = params
        self.batch = batch
        self.had_grad = {i for i, (_, p) in enumerate(params) if p.grad is not None}  # not evidence of use
        self.received: set[int] = set()
        self.backwards = 0
        self.units: list[rules.UnitStats] | None = None
        self.loss = math.nan
        self.found: tuple[torch.Tensor, torch.Tensor] | None = None
        self._outputs: list[Any] = []
        self.probe: ActivationProbe | None = ActivationProbe(pl_module)
        self.probe.__enter__()

    def close(self) -> list[rules.UnitStats]:
        """Leave the mode and remove the hooks (once); the activation sites seen so far."""
        if self.probe is not None:
            probe, self.probe = self.probe, None
            probe.__exit__(None, None, None)
            self.units = probe.close()
            self._outputs = probe.outputs
        return self.units or []

    def forward_done(self, loss: torch.Tensor) -> None:
        """The step's loss (unscaled, per batch) reached its backward: the forward is over."""
        if self.probe is None:
            return
        self.close()
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.loss = float(loss.detach())
            self.found = classifier(self._outputs, self.batch, loss)
        self._outputs = []

    def backward_done(self) -> None:
        self.backwards += 1
        self.received |= {i for i, (_, p) in enumerate(self.params) if p.grad is not None}

    def evidence(self) -> StartupEvidence:
        """Parameters that held a gradient before the step count as receiving one (nothing tells otherwise)."""
        got = self.received | self.had_grad
        with_grad = {n: p.numel() for i, (n, p) in enumerate(self.params) if i in got}
        logits = counts = None
        if self.found is not None:
            logits = self.found[0].cpu().numpy()
            counts = torch.bincount(self.found[1], minlength=logits.shape[1]).cpu().numpy()
        return StartupEvidence(with_grad, self.close(), self.loss, logits, counts)


@dataclass
class _Sample:
    step: int
    lr: float
    norms: Sequence[torch.Tensor]  # 2P scalars: each parameter's gradient norm (0 without one), then weight norm
    peak: torch.Tensor | None  # largest gradient entry (clipping by value only)
    snapshot: Any = None  # the parameters before the step, until after it
    update: Sequence[torch.Tensor] = ()  # P scalars: the norm of each parameter's update
    loss: torch.Tensor | None = None


# A dense tensor larger than this has its update norm estimated from UPDATE_SAMPLE of its entries (a fixed random
# choice): the copy and difference of a 512x512 layer on every sampled step cost more than the rest of the check
# (memory-bound), while the estimate of a norm from 4096 entries is within a few percent (``update_scale``), and the
# rules compare update ratios in orders of magnitude. Embedding tables, updated a few rows at a time, stay exact.
SAMPLED_ABOVE = 65536
UPDATE_SAMPLE = 4096


class GradientSampler:
    """Device-side samples of gradient norms and update/weight ratios. A sampled step costs two ops before
    the optimizer step (one ``_foreach_norm`` over gradients and weights) and a copy of the parameters (of a fixed
    random ``UPDATE_SAMPLE`` of the entries of a dense tensor above ``SAMPLED_ABOVE``), and two after it (an
    in-place difference, its norms). On a training step's cold caches a small
    device op costs 10-30 us, so everything else (sums into layers, square roots, ratios, the clipping test) is
    done once for all samples when they are pulled, as rows
    ``[grad norm per layer, global norm, clipping active, update ratio per layer, loss]``."""

    def __init__(self, pl_module: pl.LightningModule, clip: float | None = None, algorithm: str | None = None) -> None:
        self.clip = float(clip) if clip else None  # Lightning's gradient_clip_val
        self.clip_by_value = self.clip is not None and algorithm == "value"
        self.params = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        self.tensors = [p.detach() for _, p in self.params]  # views: they follow the updates
        self.layers = rules.modules_of([n for n, _ in self.params])
        modules = dict(pl_module.named_modules())
        self.sparse = [isinstance(modules.get(layer), torch.nn.Embedding) for layer in self.layers]
        index = {layer: i for i, layer in enumerate(self.layers)}
        layer_ids = [index[rules.module_of(n)] for n, _ in self.params]
        self.numel = np.bincount(layer_ids, [p.numel() for _, p in self.params], len(self.layers))
        count, device = len(self.params), pl_module.device
        self.member = torch.zeros(count, len(self.layers), device=device)  # parameter x layer: 1 for its layer
        self.member[range(count), layer_ids] = 1.0
        self._parameters = [p for _, p in self.params]
        self.entries = [  # which entries of each tensor the update is measured on (None: all)
            None if p.numel() <= SAMPLED_ABOVE or self.sparse[layer_ids[i]] else _fixed_entries(p.numel(), i, device)
            for i, (_, p) in enumerate(self.params)
        ]
        self.update_scale = torch.tensor(  # a sampled tensor's norm: its sampled entries' times this
            [
                1.0 if e is None else math.sqrt(p.numel() / len(e))
                for e, (_, p) in zip(self.entries, self.params, strict=True)
            ],
            device=device,
        )
        self._sampled = any(e is not None for e in self.entries)
        self._zero = torch.zeros((), device=device)  # the gradient norm of a parameter without one
        self._on_cpu = device.type == "cpu"  # a loop of clones beats the CPU's foreach copy (~1.5 vs 3 us a tensor)
        self.pending: list[_Sample] = []  # not yet pulled
        self.waiting: _Sample | None = None  # sampled before a step, the step not seen yet

    def before_step(self, step: int, lr: float) -> bool:
        """Gradient and weight norms and a parameter snapshot, before the optimizer step; ``False`` when no
        parameter has a gradient (nothing sampled)."""
        grads = [p.grad for p in self._parameters]
        live = [g for g in grads if g is not None]
        if not live:
            return False
        full = live if len(live) == len(grads) else [self._zero if g is None else g for g in grads]
        snapshot: list[torch.Tensor] | tuple[torch.Tensor, ...]
        if self._sampled:  # a sampled tensor's weight norm too comes from its sampled entries (the copy)
            snapshot = [t.clone() if e is None else t.take(e) for t, e in zip(self.tensors, self.entries, strict=True)]
            weights = [t if e is None else c for t, e, c in zip(self.tensors, self.entries, snapshot, strict=True)]
        else:
            snapshot = [t.clone() for t in self.tensors] if self._on_cpu else torch._foreach_mul(self.tensors, 1.0)
            weights = self.tensors
        norms = torch._foreach_norm(full + weights)  # stacked at the pull: one op for all samples
        peak = torch.stack(torch._foreach_norm(live, math.inf)).max() if self.clip_by_value else None
        self.waiting = _Sample(step, lr, norms, peak, snapshot)
        return True

    def after_step(self, loss: Any) -> None:
        """The norm of each parameter's update, from the snapshot (whose memory is reused, then dropped)."""
        sample, self.waiting = self.waiting, None
        assert sample is not None
        if self._sampled:
            current = [t if e is None else t.take(e) for t, e in zip(self.tensors, self.entries, strict=True)]
        else:
            current = self.tensors
        torch._foreach_sub_(sample.snapshot, current)  # -dW
        sample.update = torch._foreach_norm(sample.snapshot)
        sample.snapshot = None
        sample.loss = loss.detach() if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None
        self.pending.append(sample)

    def pull(self) -> tuple[list[int], list[float], np.ndarray]:
        """Steps, learning rates and rows of the pending samples, in one transfer; the queue is emptied."""
        n, count = len(self.layers), len(self.params)
        if not self.pending:
            return [], [], np.zeros((0, 2 * n + 3))
        samples, self.pending = self.pending, []
        squares = torch.stack([x for s in samples for x in s.norms]).float().reshape(len(samples), -1).square()
        weights = squares[:, count:] * self.update_scale.square() if self._sampled else squares[:, count:]
        grad, weight = (squares[:, :count] @ self.member).sqrt(), (weights @ self.member).sqrt()
        total = squares[:, :count].sum(1).sqrt()
        updates = torch.stack([x for s in samples for x in s.update]).float().reshape(len(samples), count)
        if self._sampled:  # sampled entries' norms scaled to estimate the whole tensor's
            updates = updates * self.update_scale
        update = (updates.square() @ self.member).sqrt()
        losses = [s.loss for s in samples]
        if all(x is not None and x.device == total.device for x in losses):
            loss = torch.stack(losses).reshape(len(samples)).float()  # type: ignore[arg-type]
        else:
            nan = torch.full((), math.nan, device=total.device)
            loss = torch.stack([nan if x is None else x.reshape(()).float().to(nan.device) for x in losses])
        if self.clip is None:
            active = torch.zeros_like(total)
        else:  # clipping by norm compares the global norm, by value the largest entry
            peaks = [s.peak for s in samples if s.peak is not None]
            active = ((torch.stack(peaks) if self.clip_by_value else total) > self.clip).float()
        ratio = torch.where(weight > 0, update / weight, torch.full_like(weight, math.nan))
        rows = torch.cat([grad, total[:, None], active[:, None], ratio, loss[:, None]], 1)
        return [s.step for s in samples], [s.lr for s in samples], rows.cpu().numpy()


def _fixed_entries(numel: int, seed: int, device: torch.device) -> torch.Tensor:
    """``UPDATE_SAMPLE`` flat indices drawn once from a private generator (the run's RNG is not touched)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(numel, (UPDATE_SAMPLE,), generator=generator).to(device)


def columns(rows: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """The named columns of sample rows over ``n`` layers."""
    return {
        "norm": rows[:, :n],
        "total": rows[:, n],
        "clip": rows[:, n + 1],
        "ratio": rows[:, n + 2 : 2 * n + 2],
        "loss": rows[:, -1],
    }
