import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_flush_denormal(True)
torch.set_num_threads(1)  # 2 cores shared by pytest and other jobs: more threads only oversubscribe them
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    yield


@pytest.fixture
def wandb_logger(tmp_path):
    """An offline WandbLogger writing under tmp_path; finished after the test so its file is complete."""
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lightning-debug-tests")
    yield logger
    import wandb

    if wandb.run is not None:
        wandb.finish()
