"""The signals every callback reads, written once.

- :func:`infer_mode` / :func:`resolve_mode`: whether a metric is better low or high, from its name;
- :func:`lookup_metric`: a metric in ``trainer.callback_metrics`` under Lightning's naming (several validation
  loaders add ``/dataloader_idx_N``), with close matches when it is missing;
- :func:`close_names`: the names closest to a misspelt one (for error messages).
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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
    validation loader's copy (``name/dataloader_idx_0``), and the logged names closest to it."""

    name: str
    key: str | None
    first_loader: bool
    close: list[str]


def lookup_metric(metrics: Mapping[str, Any], name: str) -> MetricLookup:
    """``name`` in ``trainer.callback_metrics``; with several validation loaders Lightning logs
    ``<name>/dataloader_idx_<i>`` instead, and the first loader's is used."""
    if name in metrics:
        return MetricLookup(name, name, False, [])
    first = f"{name}/dataloader_idx_0"
    if first in metrics:
        return MetricLookup(name, first, True, [])
    return MetricLookup(name, None, False, close_names(name, metrics))


# ---- TEMPORARY until arch's foundation lands (then arch's definitions replace these) ----------------------------
from lightning_debug.callbacks.divergence import ChanceLevel, metric_value  # noqa: E402,F401


def train_key(key: str) -> str | None:
    """``val_acc`` -> ``train_acc``, ``val/acc`` -> ``train/acc``; ``None`` if ``key`` is no validation key."""
    train, n = re.subn(r"^(val|valid|validation)(?=[_/.\-])", "train", key)
    return train if n else None


def weight_norm(module: Any) -> Any:
    import torch

    norms = [p.detach().float().norm() for p in module.parameters()]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.full((), float("nan"))
