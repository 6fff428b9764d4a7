"""The signals every callback reads, written once.

- :func:`metric_value`: a logged metric as a float (its epoch aggregate when there is one);
- :func:`train_key`: the training counterpart of a validation key (``val_acc`` -> ``train_acc``);
- :func:`check_mode` / :func:`mode_sign`: ``"min"`` / ``"max"`` and the sign that makes "better" positive;
- :class:`ChanceLevel`: a classification metric's chance level (given, or inferred from the targets);
- :func:`weight_norm`: the global L2 norm of a module's parameters, on the device (no host sync);
- :func:`first_dataloader`: the first ``DataLoader`` in whatever Lightning holds (one, a list, a dict, nested);
- :func:`find_predictions` / :func:`predictions`: scores and targets from a step's outputs and batch, with the
  causal-LM shift (logits at t predict the label at t + 1).

Nothing here emits, logs or keeps a trainer: these are the inputs of the rules in :mod:`lightning_debug.rules`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import DataLoader

InputFormat = Literal["logits", "probs"]
MODES = ("min", "max")


# -- logged metrics ---------------------------------------------------------------------------------------------
def metric_value(metrics: Mapping[str, Any], key: str) -> float | None:
    """``key`` from ``trainer.callback_metrics`` as a float, preferring its epoch aggregate ``<key>_epoch``."""
    value = metrics.get(f"{key}_epoch", metrics.get(key))
    if value is None:
        return None
    return float(value.detach().float().mean()) if isinstance(value, Tensor) else float(value)


def train_key(key: str) -> str | None:
    """``val_acc`` -> ``train_acc``, ``val/acc`` -> ``train/acc``; ``None`` if ``key`` is no validation key."""
    train, n = re.subn(r"^(val|valid|validation)(?=[_/.\-])", "train", key)
    return train if n else None


def check_mode(mode: str, name: str = "mode") -> str:
    """``mode`` if it is ``"min"`` or ``"max"``, else a ``ValueError`` naming the argument."""
    if mode not in MODES:
        raise ValueError(f"`{name}` must be 'min' or 'max', got {mode!r}")
    return mode


def mode_sign(mode: str) -> float:
    """+1 for ``"max"``, -1 for ``"min"``: ``mode_sign(mode) * (new - old) > 0`` means ``new`` is better."""
    return 1.0 if mode == "max" else -1.0


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
def weight_norm(module: torch.nn.Module) -> Tensor:
    """The global L2 norm of ``module``'s parameters as a 0-d float32 tensor on their device (NaN if none).

    Per-parameter norms in float32, then their norm: no host transfer, so it can run on the training path.
    """
    norms = [p.detach().float().norm() for p in module.parameters()]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.full((), float("nan"))


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
