"""The signals every callback reads, written once.

- :func:`metric_value`: a logged metric as a float (its epoch aggregate when there is one);
- :func:`train_key`: the training counterpart of a validation key (``val_acc`` -> ``train_acc``); :func:`loss_key`:
  the dev loss named like a metric (``val/acc`` -> ``val/loss``);
- :func:`check_mode` / :func:`mode_sign`: ``"min"`` / ``"max"`` and the sign that makes "better" positive;
- :func:`infer_mode` / :func:`resolve_mode`: whether a metric is better low or high, from its name;
- :func:`lookup_metric`: a metric in ``trainer.callback_metrics`` under Lightning's naming (several validation
  loaders add ``/dataloader_idx_N``), with the close matches when it is missing; :func:`close_names` for errors;
- :class:`ChanceLevel`: a classification metric's chance level (given, or inferred from the targets);
- :func:`undo_accumulation`: a step's loss as ``training_step`` computed it (Lightning divides it when it
  accumulates gradients);
- :func:`weight_norm`: the global L2 norm of a module's parameters, on the device (no host sync);
- :func:`first_dataloader`: the first ``DataLoader`` in whatever Lightning holds (one, a list, a dict, nested);
- :func:`find_predictions` / :func:`predictions`: scores and targets from a step's outputs and batch, with the
  causal-LM shift (logits at t predict the label at t + 1);
- :func:`context_targets`: a batch as ``(context, target)`` pairs, to find targets no model can tell apart.

Nothing here emits, logs or keeps a trainer: these are the inputs of the rules in :mod:`lightning_debug.rules`.
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    import lightning.pytorch as pl

InputFormat = Literal["logits", "probs"]
MODES = ("min", "max")


# -- logged metrics ---------------------------------------------------------------------------------------------
def metric_value(metrics: Mapping[str, Any], key: str) -> float | None:
    """``key`` from ``trainer.callback_metrics`` as a float, preferring its epoch aggregate ``<key>_epoch``; with
    several validation loaders, the first loader's ``<key>/dataloader_idx_0``."""
    value = metrics.get(f"{key}_epoch", metrics.get(key, metrics.get(f"{key}/dataloader_idx_0")))
    if value is None:
        return None
    return float(value.detach().float().mean()) if isinstance(value, Tensor) else float(value)


def train_key(key: str) -> str | None:
    """``val_acc`` -> ``train_acc``, ``val/acc`` -> ``train/acc``; ``None`` if ``key`` is no validation key."""
    train, n = re.subn(r"^(val|valid|validation)(?=[_/.\-])", "train", key)
    return train if n else None


def loss_key(metric: str) -> str:
    """The dev loss logged next to ``metric`` under the same naming: ``val/acc`` -> ``val/loss``, ``val_acc`` ->
    ``val_loss`` (``val_loss`` when ``metric`` has no ``val`` prefix)."""
    found = re.match(r"^(val|valid|validation)([_/.\-])", metric)
    return f"{found.group(1)}{found.group(2)}loss" if found else "val_loss"


def check_mode(mode: str, name: str = "mode") -> str:
    """``mode`` if it is ``"min"`` or ``"max"``, else a ``ValueError`` naming the argument."""
    if mode not in MODES:
        raise ValueError(f"`{name}` must be 'min' or 'max', got {mode!r}")
    return mode


def mode_sign(mode: str) -> float:
    """+1 for ``"max"``, -1 for ``"min"``: ``mode_sign(mode) * (new - old) > 0`` means ``new`` is better."""
    return 1.0 if mode == "max" else -1.0


# words (or word prefixes, for the max side) that decide whether a smaller or a larger value is better
_MIN_WORDS = ("loss", "error", "err", "perplexity", "ppl", "mse", "mae", "rmse", "nll", "wer", "cer")
_MAX_PREFIXES = ("acc", "f1", "bleu", "rouge", "auc", "auroc", "precision", "recall")  # accuracy, rougeL, ...


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]


def infer_mode(name: str) -> str | None:
    """``"min"`` for a loss/error-like name (loss, error, perplexity, mse/mae, wer/cer), ``"max"`` for a score
    (acc, f1, bleu, rouge, auc, precision, recall, exact_match), ``None`` when the name says neither or both."""
    words = _words(name)
    joined = "_".join(words)
    low = any(w in _MIN_WORDS or w.endswith("loss") for w in words)
    high = "exact_match" in joined or "em" in words or any(w.startswith(_MAX_PREFIXES) for w in words)
    if low == high:
        return None
    return "min" if low else "max"


def resolve_mode(metric: str, mode: str | None, *, where: str) -> str:
    """``mode`` if given (a warning when the name says the opposite), else the mode the name implies.

    ``where`` names the component for messages (e.g. ``"debug_callbacks"``). A ``ValueError`` when ``mode`` is
    neither ``"min"`` nor ``"max"``, or when it is ``None`` and the name decides nothing."""
    implied = infer_mode(metric)
    if mode is None:
        if implied is None:
            raise ValueError(
                f"{where}: cannot tell from the name {metric!r} whether a larger value is better; pass "
                f"`mode='max'` (accuracy-like) or `mode='min'` (loss-like)"
            )
        return implied
    if mode not in ("min", "max"):
        raise ValueError(f"{where}: `mode` must be 'min' or 'max', got {mode!r}")
    if implied is not None and implied != mode:
        warnings.warn(
            f"{where}: mode={mode!r} for {metric!r}, whose name suggests mode={implied!r} (a "
            f"{'loss-like' if implied == 'min' else 'score-like'} metric); check that this is intended",
            UserWarning,
            stacklevel=3,
        )
    return mode


def close_names(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``candidates`` closest to ``name`` (difflib ratio >= 0.6), best first."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)


@dataclass(frozen=True)
class MetricLookup:
    """Where ``name`` is in the logged metrics: ``key`` (``None`` if absent), whether it is the first
    validation loader's copy (``name/dataloader_idx_0``), and (absent) the logged names."""

    name: str
    key: str | None
    first_loader: bool
    logged: tuple[str, ...] = ()

    @property
    def close(self) -> list[str]:
        """The logged names closest to an absent ``name``; computed when a message needs them (difflib costs
        ~100 us, and a run without validation looks its metric up after every epoch)."""
        return close_names(self.name, self.logged) if self.key is None else []


def lookup_metric(metrics: Mapping[str, Any], name: str) -> MetricLookup:
    """``name`` in ``trainer.callback_metrics``; with several validation loaders Lightning logs
    ``<name>/dataloader_idx_<i>`` instead, and the first loader's is used."""
    if name in metrics:
        return MetricLookup(name, name, False)
    first = f"{name}/dataloader_idx_0"
    if first in metrics:
        return MetricLookup(name, first, True)
    return MetricLookup(name, None, False, tuple(metrics))


class ChanceLevel:
    """The chance level of a classification metric, for "is the model better than guessing yet?".

    Given explicitly, or, for an accuracy-like metric (``from_targets``), inferred from the ``target`` tensor
    that ``validation_step`` returns (the majority class rate over the first validation epoch), or else the
    metric's first observed value (the sanity check when it runs, i.e. the untrained model).
    """

    def __init__(self, explicit: float | None, from_targets: bool = True) -> None:
        self.explicit = explicit
        self.from_targets = from_targets
        self.inferred: float | None = None
        self.start: float | None = None
        self._counts: Tensor | None = None

    def __eq__(self, other: object) -> bool:  # pickled copies compare equal, as Lightning's callbacks do
        fields = ("explicit", "from_targets", "inferred", "start")
        return (
            isinstance(other, ChanceLevel)
            and all(getattr(self, f) == getattr(other, f) for f in fields)
            and self._counts is None
            and other._counts is None
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def level(self) -> float | None:
        for v in (self.explicit, self.inferred, self.start):
            if v is not None:
                return v
        return None

    def observe_outputs(self, outputs: Any) -> None:
        """Count validation targets on the device until the first epoch ends (then never again)."""
        if not self.from_targets or self.explicit is not None or self.inferred is not None:
            return
        if not isinstance(outputs, Mapping):
            return
        target = outputs.get("target")
        if not isinstance(target, Tensor) or target.is_floating_point():
            return
        t = target.detach().flatten()
        counts = torch.bincount(t.clamp(min=0), weights=(t >= 0).to(torch.float32))
        if self._counts is None:
            self._counts = counts
        else:
            n = max(len(counts), len(self._counts))
            self._counts = torch.nn.functional.pad(self._counts, (0, n - len(self._counts)))
            self._counts = self._counts + torch.nn.functional.pad(counts, (0, n - len(counts)))

    def end_epoch(self, metric: float | None) -> None:
        if self._counts is not None and float(self._counts.sum()) > 0:
            self.inferred = float(self._counts.max() / self._counts.sum())
        self._counts = None
        if self.start is None and metric is not None and np.isfinite(metric):
            self.start = metric

    def state_dict(self) -> dict[str, Any]:
        return {"inferred": self.inferred, "start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inferred = state.get("inferred")
        self.start = state.get("start")


# -- the model and its data -------------------------------------------------------------------------------------
class _TrainerGlobalStep:
    """``trainer.global_step`` as a counter's ``completed``, where Lightning keeps its counter elsewhere."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self._trainer = trainer

    @property
    def completed(self) -> int:
        return self._trainer.global_step


def global_step_counter(trainer: pl.Trainer) -> Any:
    """What hooks that run on every training step read ``trainer.global_step`` from, as its ``completed``: the
    optimizer-step counter Lightning's property returns, read directly (the property goes through four more,
    ~0.3 us warm and ~3 us between two training steps; an attribute costs no call at all). Checked against the
    property once; the property itself wherever that counter is not where Lightning keeps it. Call it once
    training has started (after a resume)."""
    loop = trainer.fit_loop.epoch_loop
    module = trainer.lightning_module
    try:
        if module is None or module.automatic_optimization:
            counter = loop.automatic_optimization.optim_progress.optimizer.step.total
        else:
            counter = loop.manual_optimization.optim_step_progress.total
        if counter.completed == trainer.global_step:
            return counter
    except AttributeError:  # another Lightning's internals
        pass
    return _TrainerGlobalStep(trainer)


def undo_accumulation(trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> Tensor:
    """A step's loss as ``training_step`` computed it: under automatic optimization Lightning divides it by
    ``accumulate_grad_batches`` before the backward and in the step's outputs."""
    if trainer.accumulate_grad_batches > 1 and pl_module.automatic_optimization:
        return loss * trainer.accumulate_grad_batches
    return loss


def weight_norm(module: torch.nn.Module) -> Tensor:
    """The global L2 norm of ``module``'s parameters as a 0-d float32 tensor on their device (NaN if none).

    Per-parameter norms in float32, then their norm: no host transfer, so it can run on the training path.
    """
    params = [p.detach().float() for p in module.parameters()]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(params))) if params else torch.full((), math.nan)


def first_dataloader(loaders: Any) -> DataLoader | None:
    """The first ``DataLoader`` in ``loaders`` (``trainer.train_dataloader`` / ``val_dataloaders``: one loader,
    a list, a dict or a nesting of them), or ``None``."""
    found: list[DataLoader] = []
    apply_to_collection(loaders, DataLoader, found.append)
    return found[0] if found else None


# -- predictions in a step's outputs ----------------------------------------------------------------------------
def find_predictions(
    outputs: Any,
    batch: Any,
    *,
    logits_key: str = "logits",
    probs_key: str = "probs",
    target_key: str = "target",
) -> tuple[Tensor, Tensor, InputFormat] | str:
    """``(scores, target, input_format)`` from a step's outputs and batch, or why none were found.

    Scores: ``outputs[logits_key]`` (a dict or a Hugging Face ``ModelOutput``), ``outputs.logits``, then
    ``outputs[probs_key]``. Target: ``outputs[target_key]`` or ``outputs["labels"]``, then ``batch[target_key]``
    or ``batch["labels"]`` for a dict batch, then the second element of an ``(x, y)`` batch whose shape fits.
    """
    scores: Any = None
    fmt: InputFormat = "logits"
    if isinstance(outputs, Mapping):
        if outputs.get(logits_key) is not None:
            scores = outputs[logits_key]
        elif outputs.get(probs_key) is not None:
            scores, fmt = outputs[probs_key], "probs"
    elif getattr(outputs, logits_key, None) is not None:
        scores = getattr(outputs, logits_key)
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        return f"no floating `{logits_key}` or `{probs_key}` in what validation_step returned"
    target: Any = None
    for source in (outputs, batch):
        if isinstance(source, Mapping):
            target = next((source[k] for k in (target_key, "labels") if source.get(k) is not None), None)
            if target is not None:
                break
    if target is None and isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Tensor):
        y = batch[1]
        if y.shape == scores.shape or y.shape == scores.shape[:-1]:
            target = y
    if not isinstance(target, Tensor):
        return f"no `{target_key}` in what validation_step returned, and no `labels` or (x, y) target in the batch"
    return scores, target, fmt


def predictions(outputs: Any, batch: Any, *, shift: bool, **keys: str) -> tuple[Tensor, Tensor, InputFormat] | str:
    """:func:`find_predictions`, detached, with the causal-LM shift applied when ``shift``: the scores at
    position t are compared with the target at t + 1 (see :func:`lightning_debug.integrations.hf.is_causal_lm`)."""
    found = find_predictions(outputs, batch, **keys)
    if isinstance(found, str):
        return found
    scores, target, fmt = found
    scores, target = scores.detach(), target.detach()
    if shift:
        scores, target = scores[..., :-1, :], target[..., 1:]
    return scores, target, fmt


def context_targets(batch: Any, *, causal: bool, ignore_index: int = -100) -> list[tuple[Hashable, int]] | None:
    """A batch as ``(context, target)`` pairs, the context being everything a model sees for that target: for
    one integer label per example (``(x, y)`` or a dict with ``labels``), the example's other tensors; for a
    causal LM (``causal``: a dict with ``input_ids`` and ``labels`` of one shape), the tokens before the target.
    ``None`` when the batch has no such structure."""
    if isinstance(batch, Mapping):
        target, inputs = batch.get("labels"), [v for k, v in batch.items() if k != "labels"]
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, target = [batch[0]], batch[1]
    else:
        return None
    if not isinstance(target, Tensor) or target.is_floating_point() or target.dim() == 0:
        return None
    labels = target.detach().cpu()
    if labels.dim() == 1:
        rows = [t.detach().cpu() for t in inputs if isinstance(t, Tensor) and t.dim() > 0 and len(t) == len(labels)]
        if not rows:
            return None
        keys = zip(*[[r.numpy().tobytes() for r in t] for t in rows], strict=True)
        return [(key, y) for key, y in zip(keys, labels.tolist(), strict=True) if y != ignore_index]
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not causal or labels.dim() != 2 or not isinstance(ids, Tensor) or ids.shape != labels.shape:
        return None
    pairs: list[tuple[Hashable, int]] = []
    for tokens, targets in zip(ids.detach().cpu().tolist(), labels.tolist(), strict=True):
        prefix: Hashable = ()
        for token, target_next in zip(tokens[:-1], targets[1:], strict=True):
            prefix = hash((prefix, token))  # the whole prefix, hashed step by step: linear in its length
            if target_next != ignore_index:
                pairs.append((prefix, target_next))
    return pairs
