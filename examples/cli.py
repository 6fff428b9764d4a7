"""A LightningCLI over the digits MLP: stop criteria and debug callbacks from a YAML config.

    python examples/cli.py fit --config examples/configs/stop_criteria.yaml
    python examples/cli.py fit --config examples/configs/stop_criteria.yaml --trainer.max_epochs 5

Every lightning-debug callback is a plain class with typed arguments, so `trainer.callbacks` entries
(`class_path` + `init_args`) configure them like any Lightning callback.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

from lightning_debug.demos.digits import DigitsMLP, loaders


class DigitsData(pl.LightningDataModule):
    """scikit-learn's bundled 8x8 digits as a datamodule (no download)."""

    def __init__(self, batch_size: int = 32, n_train: int = 1200, label_noise: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        hp = self.hparams
        self.train, self.val = loaders(hp.batch_size, hp.seed, n_train=hp.n_train, label_noise=hp.label_noise)

    def train_dataloader(self) -> DataLoader:
        return self.train

    def val_dataloader(self) -> DataLoader:
        return self.val


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    torch.set_flush_denormal(True)
    return LightningCLI(DigitsMLP, DigitsData, seed_everything_default=0, args=args, run=run)


if __name__ == "__main__":
    main()
