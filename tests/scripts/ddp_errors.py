"""ErrorAnalysis under 2-process CPU DDP (gloo); each rank writes what it concluded to <out>/rank<k>.json.

Launched by tests/test_errors_ddp.py as a script (Lightning's "ddp" strategy re-runs the script for rank 1). The
sourced text task with a mislabelled source and truncated long inputs (the weak slices of tests/test_errors.py);
each rank validates half of the 600 validation examples; rank 0 saves the weights so the test can analyse the
whole set in one process and compare.
"""

import json
import os
import sys

import lightning.pytorch as pl
import torch

from lightning_debug.callbacks.errors import ErrorAnalysis
from lightning_debug.demos.sources import SourcedClassifier, sourced_loaders, word_tokenizer


def main(out: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    train, val = sourced_loaders(flip_source="forum")
    analysis = ErrorAnalysis(budget=None, verbose=False)
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        logger=False,
        callbacks=[analysis],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=out,
    )
    model = SourcedClassifier(truncate=10, tokenizer=word_tokenizer(), lr=1e-2)
    trainer.fit(model, train, val)
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), os.path.join(out, "final_weights.pt"))
    seen = {
        "rank": trainer.global_rank,
        "history": analysis.history,
        "last_slices": analysis.last_slices,
        "findings": [f.to_dict() for f in analysis.findings],
        "files": [str(p) for p in analysis.last_files if p is not None],
    }
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as fh:
        json.dump(seen, fh)


if __name__ == "__main__":
    main(sys.argv[1])
