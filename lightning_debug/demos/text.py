"""Padded token classification: variable-length sequences and an attention-pooling classifier.

The label is whether a marker token occurs in the sequence, so the model must look at every real position
and ignore the padding. Bug knobs inject the two classic batching faults the batch-consistency check hunts:
a pooling softmax that ignores the attention mask, and one that runs over the batch dimension.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

PAD = 0
MARKER = 1
BUGS = (None, "mask_ignored", "batch_softmax")


class MarkerDataset(Dataset):
    """``n`` sequences of ``min_len``..``max_len`` tokens from ``2..vocab-1``; half get the ``MARKER`` token.

    Items are dicts ``{"input_ids": LongTensor[len], "label": int}`` (label 1 iff the marker occurs).
    """

    def __init__(self, n: int = 2000, vocab: int = 24, min_len: int = 3, max_len: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items: list[dict[str, Any]] = []
        for _ in range(n):
            length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            ids = torch.randint(2, vocab, (length,), generator=g)
            label = int(torch.rand(1, generator=g) < 0.5)
            if label:
                ids[torch.randint(0, length, (1,), generator=g)] = MARKER
            self.items.append({"input_ids": ids, "label": label})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def pad_collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item: ``input_ids``, ``attention_mask`` (B, T) and ``labels`` (B,)."""
    length = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, it in enumerate(items):
        ids[row, : len(it["input_ids"])] = it["input_ids"]
        mask[row, : len(it["input_ids"])] = 1
    labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class AttentionPoolingClassifier(pl.LightningModule):
    """Embedding → per-token MLP → attention pooling over positions → linear head (2 classes).

    Args:
        bug: ``None`` (healthy); ``"mask_ignored"``: the pooling softmax also weighs padding positions;
            ``"batch_softmax"``: the pooling softmax runs over the batch dimension instead of positions.
    """

    def __init__(self, vocab: int = 24, d: int = 32, lr: float = 3e-3, bug: str | None = None) -> None:
        super().__init__()
        if bug not in BUGS:
            raise ValueError(f"`bug` must be one of {BUGS}, got {bug!r}")
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, d, padding_idx=PAD)
        self.token = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.score = nn.Linear(d, 1)
        self.head = nn.Linear(d, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.token(self.embed(input_ids))  # (B, T, d)
        scores = self.score(h).squeeze(-1)  # (B, T)
        mask = attention_mask.bool()
        bug = self.hparams["bug"]
        if bug == "mask_ignored":
            weights = scores.softmax(dim=1)
        elif bug == "batch_softmax":
            weights = scores.masked_fill(~mask, -1e9).softmax(dim=0) * mask
        else:
            weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=1)
        pooled = (weights.unsqueeze(-1) * h).sum(dim=1)
        return self.head(pooled)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return nn.functional.cross_entropy(logits, batch["labels"]), logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        loss, logits = self._loss(batch)
        n = len(batch["labels"])
        self.log("val_loss", loss, prog_bar=True, batch_size=n)
        self.log("val_acc", (logits.argmax(-1) == batch["labels"]).float().mean(), prog_bar=True, batch_size=n)
        return {"logits": logits, "target": batch["labels"]}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])


def text_loaders(
    batch_size: int = 32, n_train: int = 2000, n_val: int = 500, seed: int = 0, **dataset_kwargs: Any
) -> tuple[DataLoader, DataLoader]:
    """Shuffled padded train loader and a padded validation loader over disjoint seeds."""
    train = MarkerDataset(n_train, seed=seed, **dataset_kwargs)
    val = MarkerDataset(n_val, seed=seed + 1, **dataset_kwargs)
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=pad_collate, generator=g),
        DataLoader(val, batch_size=256, collate_fn=pad_collate),
    )
