"""``ModelHealthCheck``: name the cause when the loss does not move (parameters, gradients, initialisation).

At the start of fit, on one batch of the train loader and under :func:`~lightning_debug.isolation.isolated`
(RNG, ``self.log``, train/eval modes kept; buffers such as BatchNorm statistics restored; gradients taken with
``torch.autograd.grad`` so no ``.grad`` is left), one forward and one backward give:

- ``setup.params_not_in_optimizer`` / ``setup.optimizer_params_unused``: gradient receivers vs param groups;
- ``init.loss_off_chance``: a C-class cross-entropy at init vs ``ln C`` (recognised by matching the loss the
  step returned against the cross-entropy of an output and an integer label of the batch);
- ``init.dead_units`` / ``init.saturated_units``: ReLU/tanh/sigmoid outputs seen through a
  ``TorchFunctionMode`` (modules and functional calls alike), per layer.

During training, every ``sample_every_n_steps`` optimizer steps, per-layer gradient norms (before clipping:
Lightning calls ``on_before_optimizer_step`` before it clips), the global norm, whether clipping is active
(that norm, or the largest gradient entry, against ``gradient_clip_val``) and the one-step update/weight ratio
per layer (a parameter snapshot before the step, the difference after it) are written to device tensors. Every
``check_every_n_steps`` steps they are pulled in one transfer, logged under ``debug/grad/<layer>/`` and judged
(``grad.vanishing``, ``grad.exploding``, ``grad.update_ratio``, ``grad.clipping_always``). Under sharded
parameters (FSDP, DeepSpeed) nothing is gathered: ``check.skipped``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.data import IterableDataset

from lightning_debug.base import DebugCallback
from lightning_debug.batching import batch_mover, tensors_of
from lightning_debug.isolation import isolated
from lightning_debug.rules import health as rules
from lightning_debug.signals import first_dataloader
from lightning_debug.sinks import Sink

if TYPE_CHECKING:
    import lightning.pytorch as pl

PREFIX = "debug/grad/"
SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")
_KINDS = {"relu": "relu", "relu_": "relu", "relu6": "relu", "tanh": "tanh", "tanh_": "tanh"}
_KINDS.update(sigmoid="sigmoid", sigmoid_="sigmoid")
_ACTIVATION_MODULES = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Tanh, torch.nn.Sigmoid)
MAX_HISTORY = 4096  # sampled steps kept on the host (for the heat map and the exploding rule); older are thinned


class _Skip(Exception):
    pass


class _ActivationProbe(TorchFunctionMode):
    """Sees every ReLU/tanh/sigmoid call inside the module (module or functional) and counts, per call site,
    units that are flat for the whole batch. Names: the activation module's own name, else the calling
    module's name + the function (+ ``#k`` for its k-th call). Parameter-free leaf modules (GELU/SiLU
    wrappers that use tanh/sigmoid inside) are not activation sites of these kinds and are skipped."""

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
            if top:
                self.outputs.append(out)

        return hook

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        kind = _KINDS.get(getattr(func, "__name__", ""))
        if kind is not None and self.stack and isinstance(out, torch.Tensor) and out.ndim >= 2:
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


@contextlib.contextmanager
def _kept_buffers(module: torch.nn.Module) -> Iterator[None]:
    """BatchNorm running statistics and other buffers a train-mode forward updates are put back."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)


def _one_batch(trainer: pl.Trainer) -> Any | None:
    """The first ``batch_size`` examples of the first train loader, collated (no sampler, no RNG drawn); ``None``
    for a stream (``IterableDataset``), which a check never iterates: it gets the first real batch instead."""
    loader = first_dataloader(trainer.train_dataloader)
    if loader is None:
        raise _Skip("no train DataLoader to take a batch from")
    size = loader.batch_size
    if isinstance(loader.dataset, IterableDataset) or size is None or not hasattr(loader.dataset, "__len__"):
        return None
    n = min(size, len(loader.dataset))
    return loader.collate_fn([loader.dataset[i] for i in range(n)])


def _classifier(out: list[Any], batch: Any, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
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


def _sharded(trainer: pl.Trainer) -> str | None:
    names = {c.__name__ for c in type(trainer.strategy).__mro__}
    return next((n for n in SHARDED_STRATEGIES if n in names), None)


class ModelHealthCheck(DebugCallback):
    """Parameters, gradients and initialisation: the causes behind a loss that does not move.

    Args:
        sample_every_n_steps: optimizer steps between gradient / update samples (the only steps that do work).
        check_every_n_steps: optimizer steps between pulls of the samples to the host (one transfer) and
            verdicts; a multiple of ``sample_every_n_steps``.
        startup: run the one-batch startup checks at the start of fit.
    """

    def __init__(
        self,
        *,
        sample_every_n_steps: int = 10,
        check_every_n_steps: int = 100,
        startup: bool = True,
        strict: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__(strict=strict, verbose=verbose)
        if sample_every_n_steps < 1:
            raise ValueError(f"`sample_every_n_steps` must be >= 1, got {sample_every_n_steps}")
        if check_every_n_steps < sample_every_n_steps * rules.MIN_SAMPLES:
            raise ValueError(
                f"`check_every_n_steps` must be >= {rules.MIN_SAMPLES} * sample_every_n_steps "
                f"(= {rules.MIN_SAMPLES * sample_every_n_steps}) so a check sees enough samples, "
                f"got {check_every_n_steps}"
            )
        self.sample_every_n_steps = sample_every_n_steps
        self.check_every_n_steps = check_every_n_steps
        self.startup = startup
        self.startup_done = False
        self.startup_seconds = math.nan
        self.disabled: str | None = None
        self.evidence: dict[str, Any] = {}  # startup measurements, findings or not (for threshold studies)
        self.layers: list[str] = []
        self._sparse: list[bool] = []  # embedding layers: their gradient is sparse (the rows of the tokens seen)
        self.history: dict[str, list[Any]] = {k: [] for k in ("step", "lr", "row", "total", "loss")}  # pulled samples
        self.checked = 0  # history entries already judged
        self.peak_lr = 0.0
        self._params: list[tuple[str, torch.nn.Parameter]] = []
        self._tensors: list[torch.Tensor] = []  # the same parameters, detached (views: they follow the updates)
        self._layer_of: torch.Tensor | None = None  # (P,) layer index of each parameter, on the device
        self._pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, device row) not yet pulled
        self._sample: tuple[tuple[torch.Tensor, ...] | list[torch.Tensor], torch.Tensor, int] | None = (
            None  # snapshot, grad part, step
        )

    # ------------------------------------------------------------------ startup
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sharded = _sharded(trainer)
        if sharded is not None:
            self.disabled = f"parameters are sharded by {sharded}; gathering them would cost a full copy per check"
            self.emit(trainer, "check.skipped", f"ModelHealthCheck: {self.disabled}.", data={"reason": self.disabled})
            return
        self._params = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        self._tensors = [p.detach() for _, p in self._params]
        self.layers = rules.modules_of([n for n, _ in self._params])
        modules = dict(pl_module.named_modules())
        self._sparse = [isinstance(modules.get(layer), torch.nn.Embedding) for layer in self.layers]
        index = {layer: i for i, layer in enumerate(self.layers)}
        self._layer_of = torch.tensor([index[rules.module_of(n)] for n, _ in self._params], device=pl_module.device)
        self._numel = np.bincount(
            [index[rules.module_of(n)] for n, _ in self._params], [p.numel() for _, p in self._params], len(self.layers)
        )
        if self.startup and not self.startup_done and trainer.global_rank == 0:
            self.startup_done = True
            try:
                batch = _one_batch(trainer)
            except _Skip as why:
                self.emit(trainer, "check.skipped", f"ModelHealthCheck startup: {why}", data={"reason": str(why)})
                return
            if batch is None:  # a stream: its first real batch, through a hook dispatched for that batch only
                self.on_train_batch_start = self.on_first_train_batch  # type: ignore[method-assign,assignment]
                return
            self._timed_startup(trainer, pl_module, batch_mover(trainer, pl_module)(batch))

    def on_first_train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        """The first real batch of an ``IterableDataset``, already moved, before its step."""
        del self.on_train_batch_start  # back to the class's: no per-step dispatch
        self._timed_startup(trainer, pl_module, batch)

    def _timed_startup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        began = time.perf_counter()
        try:
            self._startup(trainer, pl_module, batch)
        except _Skip as why:
            self.emit(trainer, "check.skipped", f"ModelHealthCheck startup: {why}", data={"reason": str(why)})
        self.startup_seconds = time.perf_counter() - began

    def _startup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        if not pl_module.automatic_optimization:
            raise _Skip("manual optimization: `training_step` steps the optimizer itself, so it cannot be replayed")
        with isolated(pl_module), _kept_buffers(pl_module), torch.enable_grad():
            pl_module.train()
            probe = _ActivationProbe(pl_module)
            try:
                with probe:
                    out = pl_module.training_step(batch, 0)
            finally:
                units = probe.close()
            loss = out.get("loss") if isinstance(out, Mapping) else out
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise _Skip(f"`training_step` returned {type(out).__name__}, not a scalar loss with a graph")
            grads = torch.autograd.grad(loss, [p for _, p in self._params], allow_unused=True)
            classifier = _classifier(probe.outputs, batch, loss)
        with_grad = {n: p.numel() for (n, p), g in zip(self._params, grads, strict=True) if g is not None}
        self._report_coverage(trainer, pl_module, with_grad)
        self.evidence["units"] = {u.layer: u.share for u in units}
        if classifier is not None:
            logits, labels = classifier
            counts = torch.bincount(labels, minlength=logits.shape[1]).cpu().numpy()
            verdict = rules.init_loss(float(loss.detach()), logits.cpu().numpy(), counts)
            self.evidence["init_gap"] = verdict.gap
            self._report_init_loss(trainer, verdict)
        self._report_units(trainer, rules.unit_health(units), units)

    def _optimized(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int]:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        out: dict[str, int] = {}
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.requires_grad:
                        out[names.get(id(p), f"<not a parameter of the module: {tuple(p.shape)}>#{len(out)}")] = (
                            p.numel()
                        )
        return out

    def _report_coverage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, with_grad: dict[str, int]) -> None:
        cov = rules.optimizer_coverage(with_grad, self._optimized(trainer, pl_module))
        n, held = cov.grad_tensors, cov.grad_tensors_in_optimizer
        if cov.not_in_optimizer:
            modules = rules.modules_of(cov.not_in_optimizer)
            cause = f"the optimizer holds {'none' if held == 0 else held} of the {n} tensors that receive gradients"
            self.emit(
                trainer,
                "setup.params_not_in_optimizer",
                f"{cause[0].upper()}{cause[1:]}: {len(cov.not_in_optimizer)} tensors "
                f"({cov.not_in_optimizer_elements:,} elements) in {', '.join(modules)} get gradients but are "
                "never updated.",
                data={
                    "cause": cause,
                    "tensors": list(cov.not_in_optimizer),
                    "elements": cov.not_in_optimizer_elements,
                    "modules": modules,
                    "grad_tensors": n,
                    "grad_tensors_in_optimizer": held,
                },
            )
        if cov.unused:
            modules = rules.modules_of(cov.unused)
            cause = f"{len(cov.unused)} tensors the optimizer holds get no gradient ({', '.join(modules)})"
            self.emit(
                trainer,
                "setup.optimizer_params_unused",
                f"{len(cov.unused)} optimizer tensors ({cov.unused_elements:,} elements) in {', '.join(modules)} "
                f"get no gradient in a backward of the training loss: the forward never uses them.",
                data={"cause": cause, "tensors": list(cov.unused), "elements": cov.unused_elements, "modules": modules},
            )

    def _report_init_loss(self, trainer: pl.Trainer, v: rules.InitLoss) -> None:
        if not v.off:
            return
        explained = abs(v.scale_loss - v.loss) <= 0.5 * abs(v.gap)
        why = (
            f"the logits' spread (std {v.logit_std:.3g} across classes) alone gives {v.scale_loss:.3g} on random "
            "labels, so the logit scale explains the gap"
            if explained
            else f"the logit scale alone would give {v.scale_loss:.3g}, so it does not explain the gap"
        )
        cause = (
            f"the loss at initialisation is {v.loss:.3g}, {v.gap:+.2f} nats from ln {v.num_classes} = {v.chance:.3g}"
        )
        self.emit(
            trainer,
            "init.loss_off_chance",
            f"{cause[0].upper()}{cause[1:]} (label-prior entropy {v.prior_entropy:.3g}; output layer "
            f"{self.layers[-1] if self.layers else '?'}): {why}.",
            data={
                "cause": cause,
                "loss": v.loss,
                "num_classes": v.num_classes,
                "ln_c": v.chance,
                "prior_entropy": v.prior_entropy,
                "gap": v.gap,
                "logit_std": v.logit_std,
                "scale_loss": v.scale_loss,
                "scale_explains_gap": explained,
                "layer": self.layers[-1] if self.layers else None,
            },
        )

    def _report_units(self, trainer: pl.Trainer, v: rules.UnitVerdict, stats: list[rules.UnitStats]) -> None:
        for check, bad in (("init.dead_units", v.dead), ("init.saturated_units", v.saturated)):
            for s in bad:
                if s.kind == "relu":
                    cause = f"{s.share:.0%} of the ReLU units of {s.layer} are zero for every example at init"
                    text = f"{s.flat} of {s.units} ReLU units ({s.share:.0%}) are zero for every example"
                else:
                    cause = f"{s.share:.0%} of the {s.kind} outputs of {s.layer} are saturated at init"
                    text = f"{s.share:.0%} of the {s.kind} outputs are saturated ({s.flat} of {s.units} units always)"
                self.emit(
                    trainer,
                    check,
                    f"{s.layer}{self._after(s.layer)}: {text} on the first batch; they pass (almost) no gradient.",
                    data={
                        "cause": cause,
                        "layer": s.layer,
                        "after": self._after(s.layer)[8:-1] or None,
                        "kind": s.kind,
                        "units": s.units,
                        "flat_units": s.flat,
                        "share": s.share,
                        "value_share": s.value_share,
                        "all_layers": {x.layer: round(x.share, 4) for x in stats},
                    },
                    key=s.layer,
                )

    def _after(self, site: str) -> str:
        """`` (after net.0)``: the parameterised layer that feeds an activation module, when its name says so."""
        head, _, last = site.partition(":")[0].rpartition(".")
        if not last.isdigit():
            return ""
        before = [
            layer
            for layer in self.layers
            if layer.rpartition(".")[0] == head
            and layer.rpartition(".")[2].isdigit()
            and int(layer.rpartition(".")[2]) < int(last)
        ]
        return f" (after {before[-1]})" if before else ""

    # ------------------------------------------------------------------ periodic: device only
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.disabled or self._layer_of is None or self._sample is not None:
            return
        step = trainer.global_step
        if step % self.sample_every_n_steps:
            return
        tensors = self._tensors
        grads = [p.grad for _, p in self._params]
        live = [g for g in grads if g is not None]
        if not live:
            return
        n = len(self.layers)
        with torch.no_grad():
            index = self._layer_of if len(live) == len(tensors) else self._index(grads)
            g2 = torch.stack(torch._foreach_norm(live)).float().square()
            w2 = torch.stack(torch._foreach_norm(tensors)).float().square()
            sums = torch.zeros(2 * n, device=g2.device).index_add_(
                0, torch.cat([index, self._layer_of + n]), torch.cat([g2, w2])
            )
            total = g2.sum().sqrt()
            clip = trainer.gradient_clip_val
            if not clip:
                active = torch.zeros((), device=g2.device)
            elif trainer.gradient_clip_algorithm == "value":
                active = (torch.stack(torch._foreach_norm(live, math.inf)).max() > float(clip)).float()
            else:
                active = (total > float(clip)).float()
            snapshot = torch._foreach_mul(tensors, 1.0)  # one copy of every parameter, until after the step
        # the row: layer grad norms, global norm, clipping active, layer weight norms (replaced by ratios later)
        self._sample = (snapshot, torch.cat([sums[:n].sqrt(), total[None], active[None], sums[n:].sqrt()]), step)
        lr = optimizer.param_groups[0]["lr"]
        self._lr = float(lr) if not isinstance(lr, torch.Tensor) else math.nan
        self.peak_lr = max(self.peak_lr, self._lr) if math.isfinite(self._lr) else self.peak_lr

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._sample is None or trainer.global_step == self._sample[2]:
            return  # no sample, or the sampled step's optimizer step has not run yet (gradient accumulation)
        snapshot, part, step = self._sample
        self._sample = None
        assert self._layer_of is not None
        n = len(self.layers)
        with torch.no_grad():
            torch._foreach_sub_(snapshot, self._tensors)  # -dW, in the snapshot's memory
            d2 = torch.stack(torch._foreach_norm(snapshot)).float().square()
            dl = torch.zeros(n, device=d2.device).index_add_(0, self._layer_of, d2).sqrt()
            wl = part[n + 2 :]
            ratio = torch.where(wl > 0, dl / wl, torch.full_like(wl, math.nan))
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            loss = loss.detach().float().reshape(1) if isinstance(loss, torch.Tensor) else torch.full((1,), math.nan)
        self._pending.append((step, self._lr, torch.cat([part[: n + 2], ratio, loss.to(ratio.device)])))
        unchecked = len(self.history["step"]) - self.checked + len(self._pending)  # also across a resume
        if unchecked * self.sample_every_n_steps >= self.check_every_n_steps:
            self._check(trainer)

    def _index(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """Layer index of the parameters that have a gradient (when some have none)."""
        assert self._layer_of is not None
        present = [i for i, g in enumerate(grads) if g is not None]
        return self._layer_of[torch.tensor(present, device=self._layer_of.device)]

    # ------------------------------------------------------------------ every check: one transfer
    def _pull(self) -> None:
        if not self._pending:
            return
        rows = torch.stack([r for _, _, r in self._pending]).cpu().numpy()
        self.history["step"] += [s for s, _, _ in self._pending]
        self.history["lr"] += [lr for _, lr, _ in self._pending]
        self.history["row"] += rows.tolist()
        n = len(self.layers)
        self.history["total"] += rows[:, n].tolist()
        self.history["loss"] += rows[:, -1].tolist()
        self._pending = []

    def _columns(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        n = len(self.layers)
        return {
            "norm": rows[:, :n],
            "total": rows[:, n],
            "clip": rows[:, n + 1],
            "ratio": rows[:, n + 2 : 2 * n + 2],
            "loss": rows[:, -1],
        }

    def _check(self, trainer: pl.Trainer, final: bool = False) -> None:
        """Judge and log the samples since the last check; ``final``: the end of fit (a partial window, logged at
        the trainer's step, after any checkpoint of this run)."""
        self._pull()
        end = len(self.history["step"])
        if end - self.checked >= rules.MIN_SAMPLES:
            window = slice(self.checked, end)
            w = self._columns(np.asarray(self.history["row"][window]))
            self._log(trainer, trainer.global_step if final else self.history["step"][end - 1], w)
            self._judge(trainer, window, w)
            if not final:  # windows stay aligned to the run's start, whether or not a checkpoint follows
                self.checked = end
        if end > MAX_HISTORY:  # thin the older half; memory and state stay bounded
            for k, v in self.history.items():
                self.history[k] = v[: end // 2 : 2] + v[end // 2 :]
            self.checked = len(self.history["step"])

    def _log(self, trainer: pl.Trainer, step: int, w: dict[str, np.ndarray]) -> None:
        """One point per check and series: the window's medians (every sample is in the end-of-fit table)."""
        norm, ratio = rules.column_medians(w["norm"]), rules.column_medians(w["ratio"])
        metrics = {f"{PREFIX}{layer}/norm": norm[j] for j, layer in enumerate(self.layers)}
        metrics.update({f"{PREFIX}{layer}/update_ratio": ratio[j] for j, layer in enumerate(self.layers)})
        metrics[PREFIX + "global_norm"] = np.median(w["total"])
        if trainer.gradient_clip_val:
            metrics[PREFIX + "clip_active"] = np.mean(w["clip"])
        Sink(trainer).log_scalars({k: float(v) for k, v in metrics.items() if math.isfinite(v)}, step=step)

    def _judge(self, trainer: pl.Trainer, window: slice, w: dict[str, np.ndarray]) -> None:
        steps = self.history["step"][window]
        span = f"steps {steps[0]}-{steps[-1]} ({len(steps)} samples)"
        self._vanishing(trainer, w, steps, span)
        self._exploding(trainer, w, steps)
        self._update_ratio(trainer, w, np.asarray(self.history["lr"][window]), span)
        if trainer.gradient_clip_val:
            self._clipping(trainer, w, span)

    def _vanishing(self, trainer: pl.Trainer, w: dict[str, np.ndarray], steps: list[int], span: str) -> None:
        van = rules.vanishing(w["norm"] / np.sqrt(np.maximum(self._numel, 1)), self.layers, sparse=self._sparse)
        if van.fires:
            cause = f"the gradient of {van.bottom} is 10^{van.log10_ratio:.1f} times that of {van.top}"
            self.emit(
                trainer,
                "grad.vanishing",
                f"Vanishing gradients: {cause} (median RMS ratio over {span}), not recovering.",
                data={
                    "cause": cause,
                    "layer": van.bottom,
                    "top_layer": van.top,
                    "log10_ratio": van.log10_ratio,
                    "steps": [steps[0], steps[-1]],
                },
            )

    def _exploding(self, trainer: pl.Trainer, w: dict[str, np.ndarray], steps: list[int]) -> None:
        exp = rules.exploding(np.asarray(self.history["total"]), np.asarray(self.history["loss"]))
        if exp.fires:
            cause = (
                "the gradient norm became NaN/Inf"
                if exp.nonfinite
                else f"the global gradient norm grew {exp.growth:.3g}x while the loss went {exp.loss_before:.3g} -> "
                f"{exp.loss_now:.3g}"
            )
            top = self.layers[int(np.nanargmax(w["norm"][-1]))] if np.isfinite(w["norm"][-1]).any() else None
            self.emit(
                trainer,
                "grad.exploding",
                f"Exploding gradients by step {steps[-1]}: {cause}; largest in {top}.",
                data={
                    "cause": cause,
                    "growth": exp.growth,
                    "nonfinite": exp.nonfinite,
                    "layer": top,
                    "loss_before": exp.loss_before,
                    "loss_now": exp.loss_now,
                },
            )

    def _update_ratio(self, trainer: pl.Trainer, w: dict[str, np.ndarray], lrs: np.ndarray, span: str) -> None:
        upd = rules.update_ratio(w["ratio"], self.layers, lrs, self.peak_lr)
        for layer, value in upd.too_high[:1]:
            cause = f"one optimizer step changed {layer} by {value:.3g} times its norm (usual ~1e-3)"
            self.emit(
                trainer,
                "grad.update_ratio",
                f"Updates far too large over {span}: {cause}; "
                f"{len(upd.too_high)} layer(s) above {rules.UPDATE_RATIO_HIGH:g}x. The learning rate is too high.",
                data={
                    "cause": cause,
                    "direction": "high",
                    "layer": layer,
                    "ratio": value,
                    "layers": dict(upd.too_high),
                    "median": upd.median,
                },
                key="high",
            )
        if upd.too_low:
            low = min(upd.per_layer, key=upd.per_layer.__getitem__)
            cause = f"the median layer changes by {upd.median:.2g} of its norm per step (usual ~1e-3)"
            self.emit(
                trainer,
                "grad.update_ratio",
                f"Updates far too small over {span}: {cause}, {low} least "
                f"({upd.per_layer[low]:.2g}); the learning rate is too low for this model.",
                data={
                    "cause": cause,
                    "direction": "low",
                    "layer": low,
                    "ratio": upd.median,
                    "layers": upd.per_layer,
                    "median": upd.median,
                },
                key="low",
            )

    def _clipping(self, trainer: pl.Trainer, w: dict[str, np.ndarray], span: str) -> None:
        clip = rules.clipping(w["clip"])
        if clip.fires:
            cause = (
                f"gradient clipping at {trainer.gradient_clip_val:g} was active on {clip.share:.0%} of sampled steps"
            )
            self.emit(
                trainer,
                "grad.clipping_always",
                f"{cause[0].upper()}{cause[1:]} ({span}; pre-clip global norm "
                f"median {np.median(w['total']):.3g}): clipping is doing the learning rate's job.",
                data={
                    "cause": cause,
                    "share": clip.share,
                    "samples": clip.samples,
                    "clip_val": trainer.gradient_clip_val,
                    "median_norm": float(np.median(w["total"])),
                },
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.disabled or self._layer_of is None:
            return
        self._check(trainer, final=True)
        if not self.history["step"] or trainer.global_rank != 0:
            return
        c = self._columns(np.asarray(self.history["row"]))
        steps = self.history["step"]
        sink = Sink(trainer)
        sink.log_table(
            PREFIX + "table",
            ["step", "layer", "grad_norm", "update_ratio"],
            [
                [s, layer, c["norm"][i, j], c["ratio"][i, j]]
                for i, s in enumerate(steps)
                for j, layer in enumerate(self.layers)
            ],
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            panels = {"log10 gradient norm": np.log10(c["norm"].T), "log10 update / weight": np.log10(c["ratio"].T)}
        sink.log_heatmap(PREFIX + "heatmap", panels, self.layers, steps)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Plain types only (``torch.load(weights_only=True)``). Samples not yet pulled are pulled now (one
        transfer per checkpoint), so a resumed run checks and logs at the same steps as an uninterrupted one."""
        self._pull()
        return {
            **super().state_dict(),
            "startup_done": self.startup_done,
            "history": self.history,
            "checked": self.checked,
            "peak_lr": self.peak_lr,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.startup_done = bool(state_dict.get("startup_done", False))
        self.history = {k: list(v) for k, v in state_dict.get("history", self.history).items()}
        self.checked = int(state_dict.get("checked", 0))
        self.peak_lr = float(state_dict.get("peak_lr", 0.0))
