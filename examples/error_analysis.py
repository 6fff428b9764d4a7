"""Look at the errors: a text classifier with a mislabelled source and a truncation bug, found by slices.

    python examples/error_analysis.py            # both weaknesses named by eval.weak_slice
    python examples/error_analysis.py --healthy  # nothing planted: no eval.weak_slice
    python examples/error_analysis.py --figure docs/img/error_analysis_tables.png   # + render the W&B tables

The data (:mod:`lightning_debug.demos.sources`): sequences of 3-32 words whose label is 1 if the word ``YES``
occurs and 0 if ``NO`` does, each with a ``source`` (news, wiki, forum, reviews) and an ``id``, 10% of labels
flipped at random everywhere. Planted: the labels of ``forum`` are all flipped (a mislabelled source; the model
never sees the source), and the classifier reads only the first 10 tokens (a truncation bug: it guesses on
long inputs whose marker comes late). Overall accuracy says only "about 75%". ``ErrorAnalysis`` (in the
default suite) logs every evaluation a ``debug/errors/samples`` table (100 sampled errors, the highest-loss
rows and the most confident errors, decoded by the module's tokenizer, with the ``source`` and ``id``
columns), a ``debug/errors/slices`` table with 95% intervals and a bar chart, and names the weak slices.

Run time: 98 s measured on 2 CPU cores shared with other jobs (load average 11); its three 63-step epochs
are most of it. The example analyses every evaluation (``errors={"budget": None}``); the suite's default
spends at most 2% of validation time on it, which on a validation set this small (~20 ms) means never.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

from lightning_debug import debug_callbacks
from lightning_debug.demos.sources import SourcedClassifier, sourced_loaders, word_tokenizer


def main(argv: list[str] | None = None) -> pl.Trainer:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--healthy", action="store_true", help="no mislabelled source, no truncation")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="out/error_analysis")
    parser.add_argument("--figure", help="also render the last samples and slices tables of the W&B run to PNG")
    args = parser.parse_args(argv)

    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_flush_denormal(True)
    pl.seed_everything(0, verbose=False)
    train, val = sourced_loaders(flip_source=None if args.healthy else "forum")
    model = SourcedClassifier(truncate=None if args.healthy else 10, tokenizer=word_tokenizer(), lr=1e-2)
    os.makedirs(args.out, exist_ok=True)
    logger = WandbLogger(project="lightning-debug-error-analysis", save_dir=args.out, offline=True)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=debug_callbacks(metric="val_acc", errors={"budget": None, "plot_every_n_evaluations": 1}),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
    )
    trainer.fit(model, train, val)
    run_dir = Path(logger.experiment.dir).parent
    import wandb

    wandb.finish()
    print(f"W&B offline run: {run_dir}  (`wandb sync` it; the tables are debug/errors/samples and /slices)")
    if args.figure:
        print(f"figure: {render_tables(run_dir, Path(args.figure))}")
    return trainer


def last_table(run_dir: Path, key: str) -> dict[str, Any]:
    """The last ``wandb.Table`` logged under ``key`` in an offline run (files named ``<key>_<step>_<hash>``)."""
    folder = run_dir / "files" / "media" / "table" / Path(key).parent
    files = sorted(folder.glob(f"{Path(key).name}_*.table.json"), key=lambda p: int(p.name.split("_")[-2]))
    if not files:
        raise FileNotFoundError(f"no table {key!r} under {folder}")
    return json.loads(files[-1].read_text())


def render_tables(run_dir: Path, path: Path) -> Path:
    """A picture of what the two W&B tables hold: accuracy per slice with intervals (weak slices in red) and
    the first sampled rows. Drawn from the offline run's table files, as W&B shows them."""
    import matplotlib.pyplot as plt

    slices, samples = last_table(run_dir, "debug/errors/slices"), last_table(run_dir, "debug/errors/samples")
    s = [dict(zip(slices["columns"], row, strict=True)) for row in slices["data"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8.5), gridspec_kw={"height_ratios": [1, 1.1]})
    labels = [f"{r['column']}={r['value']}  (n={r['count']})" for r in s]
    acc = [r["accuracy"] for r in s]
    err = [[a - r["low"] for a, r in zip(acc, s, strict=True)], [r["high"] - a for a, r in zip(acc, s, strict=True)]]
    colors = ["tab:red" if r["weak"] else "tab:blue" for r in s]
    top.barh(range(len(s)), acc, xerr=err, color=colors, ecolor="black", capsize=2)
    top.set_yticks(range(len(s)), labels, fontsize=8)
    top.invert_yaxis()
    top.set_xlim(0, 1)
    top.set_xlabel("accuracy with 95% Wilson interval (red: eval.weak_slice)")
    top.set_title("debug/errors/slices", loc="left", fontsize=10, family="monospace")
    columns = ["selection", "source", "input", "reference", "prediction", "loss", "confidence"]
    index = [samples["columns"].index(c) for c in columns]
    rows = []
    for row in samples["data"][:12]:
        cells = [row[i] for i in index]
        cells[2] = textwrap.shorten(str(cells[2]), 58, placeholder=" ...")
        cells[5], cells[6] = f"{cells[5]:.2f}", f"{cells[6]:.2f}"
        rows.append(cells)
    bottom.axis("off")
    table = bottom.table(cellText=rows, colLabels=columns, loc="upper left", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(7.5)
    table.auto_set_column_width(list(range(len(columns))))
    bottom.set_title("debug/errors/samples (first rows of 130)", loc="left", fontsize=10, family="monospace")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
