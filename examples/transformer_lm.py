"""A tiny GPT-2 on a synthetic language with padded batches, and the classic bugs the startup checks catch.

    python examples/transformer_lm.py                     # healthy: batch and decode checks pass, ~15 s
    python examples/transformer_lm.py --bug padding       # loss counted on padding -> batch.padding_dependence
    python examples/transformer_lm.py --bug batch-mix     # examples mixed in the batch -> cross_sample_dependence
    python examples/transformer_lm.py --bug decode-score  # decoder scores off by one -> decode.score_mismatch

The model is a 2-layer GPT-2 built from a ``GPT2Config`` (random init, nothing downloaded) learning a sparse
Markov language of 3-16 word sentences, right-padded into batches with ``attention_mask`` and ``labels = -100``
on padding. The default suite runs, among others, the batch-consistency check (is the batched loss the
per-example losses put together, does padding change an example's loss, does any output depend on another
example's input) and the decode check (does the decoder's score equal the model's teacher-forced
log-likelihood of what it decoded) once at the start of training. The bugs:

- ``padding``: the labels are the raw ``input_ids``, so the loss also scores the padding tokens;
- ``batch-mix``: the batch mean of the input embeddings is added to every example (a normalisation or
  pooling over the wrong dimension): each example's prediction depends on the others in its batch;
- ``decode-score``: a hand-written greedy decoder scores each chosen token with the previous step's
  distribution (:class:`~lightning_debug.demos.lm.GreedyGPT2LM` with ``off_by_one=True``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

from lightning_debug import debug_callbacks
from lightning_debug.demos.lm import GreedyGPT2LM, TinyGPT2LM, lm_loaders

BUGS = ("padding", "batch-mix", "decode-score")
# The language's entropy rate, the lowest loss any model can reach (exact NLL of the Markov chain, measured on
# 4096 sentences): the loss monitor's floor, so that converging near it is not reported as a plateau.
ENTROPY_NATS = 1.32
BATCH_FLOOR_NATS = 0.3


class PaddingInLossLM(TinyGPT2LM):
    """Bug: the loss is computed on the padding positions too (labels not masked with -100)."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return super().training_step({**batch, "labels": batch["input_ids"]}, batch_idx)


class BatchMixLM(TinyGPT2LM):
    """Bug: every example's input embeddings get the batch mean added, mixing information across examples."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> Any:
        embeds = self.model.get_input_embeddings()(input_ids)
        embeds = embeds + embeds.mean(0, keepdim=True)
        return self.model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(**batch).loss
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss


def build_model(bug: str | None, **kwargs: Any) -> TinyGPT2LM:
    if bug == "padding":
        return PaddingInLossLM(**kwargs)
    if bug == "batch-mix":
        return BatchMixLM(**kwargs)
    if bug == "decode-score":
        return GreedyGPT2LM(off_by_one=True, **kwargs)
    return TinyGPT2LM(**kwargs)


def main(argv: list[str] | None = None) -> pl.Trainer:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bug", choices=BUGS, default=None)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n-train", type=int, default=4096)
    parser.add_argument("--val-every", type=int, default=50, help="validate every N training steps")
    parser.add_argument(
        "--no-overfit",
        action="store_true",
        help="leave out the one-batch memorisation check (by default it waits for a loss stall: a 128-step epoch "
        "is too short to pay its ~0.6 s at start)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/transformer_lm")
    args = parser.parse_args(argv)

    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_flush_denormal(True)
    pl.seed_everything(args.seed, verbose=False)
    train, val = lm_loaders(n_train=args.n_train, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    logger = WandbLogger(project="lightning-debug-transformer-lm", save_dir=args.out, offline=True)
    trainer = pl.Trainer(
        max_steps=args.steps,
        max_epochs=-1,
        val_check_interval=min(args.val_every, len(train)),
        check_val_every_n_epoch=None,
        accelerator="cpu",
        logger=logger,
        callbacks=debug_callbacks(
            metric="val_loss",
            mode="min",
            # Even one batch cannot be memorised below ~0.3 nats/token: all 32 sentences share the context [BOS]
            # and then go on with ~20 different first words.
            overfit=False if args.no_overfit else {"floor": BATCH_FLOOR_NATS},
            loss={"floor": ENTROPY_NATS},
        ),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        default_root_dir=args.out,
    )
    trainer.fit(build_model(args.bug), train, val)
    run_dir = logger.experiment.dir.removesuffix("/files") if logger.experiment.dir else args.out
    import wandb

    wandb.finish()
    print(
        f"\nW&B offline run: {run_dir}\n"
        f"  view it: `wandb sync {run_dir}`; the startup checks' verdicts are in `debug/findings`."
    )
    return trainer


if __name__ == "__main__":
    main()
