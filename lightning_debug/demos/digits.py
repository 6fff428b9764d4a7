"""Digits classification: scikit-learn's bundled 8x8 digits and an MLP with knobs for the classic faults.

Used by the examples, the tests and the fault-injection benchmark. Needs scikit-learn (the ``demos`` extra).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def digits(
    n_train: int = 1200, n_val: int = 400, label_noise: float = 0.0, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """Train/val ``TensorDataset``s of 8x8 digits (64 features, 10 classes), shuffled with ``seed``."""
    x, y = _digits()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm].clone()
    if label_noise:
        flip = torch.rand(len(y), generator=g) < label_noise
        y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    train = TensorDataset(x[:n_train], y[:n_train])
    val = TensorDataset(x[n_train : n_train + n_val], y[n_train : n_train + n_val])
    return train, val


class DigitsMLP(pl.LightningModule):
    """An MLP classifier logging train_loss/train_acc/val_loss/val_acc; knobs to inject the classic faults.

    Args:
        hidden: hidden widths; a width of 1 is a capacity bottleneck.
        batchnorm / dropout: healthy variants.
        detach_logits: the loss cannot train the model (a classic bug).
        shuffle_labels: labels are permuted every step (no learnable signal).
    """

    def __init__(
        self,
        hidden: tuple[int, ...] = (64,),
        lr: float = 1e-2,
        optimizer: str = "adam",
        batchnorm: bool = False,
        dropout: float = 0.0,
        weight_decay: float = 0.0,
        detach_logits: bool = False,
        shuffle_labels: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = 64
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        if self.hparams["detach_logits"]:
            logits = logits.detach().requires_grad_()
        if self.hparams["shuffle_labels"]:
            y = y[torch.randperm(len(y), device=y.device)]
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_acc", (logits.argmax(-1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)
        return {"logits": logits, "target": y}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.parameters()
        if self.hparams["optimizer"] == "sgd":
            return torch.optim.SGD(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])
        return torch.optim.Adam(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])


def loaders(batch_size: int = 32, seed: int = 0, **digits_kwargs: Any) -> tuple[DataLoader, DataLoader]:
    train, val = digits(seed=seed, **digits_kwargs)
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
        DataLoader(val, batch_size=256),
    )
