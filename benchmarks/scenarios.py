"""The generated detection benchmark's scenario space: sampled set-ups x injected faults.

A :class:`Setup` is a plain, JSON-able description of one training run (architecture, data, batch size, length,
optimizer, schedule, precision, regularisation, accumulation, seed); :func:`build` turns it, plus a fault name
or ``None``, into ``(module, train_loader, val_loader, trainer_kwargs)``. Everything here is ordinary user code:
nothing imports the library's checks (the demos' data sets and tiny HF models are reused as data and models).

Each fault in :data:`FAULTS` names the architectures it applies to, how it changes the set-up, and the finding
ids that count as detecting it (from ``docs/checks.md`` plus the ids the model-health work adds; an id that does
not exist yet is simply never seen).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_debug.demos import lm, text
from lightning_debug.demos.digits import digits

# ---- set-ups -----------------------------------------------------------------------------------------------------

CLASSIFIERS = ("mlp", "cnn", "gru", "lstm", "attnpool", "bert")
TOKEN_CLASSIFIERS = ("gru", "lstm", "attnpool", "bert", "rnn")


@dataclass(frozen=True)
class Setup:
    arch: str  # mlp cnn gru lstm rnn attnpool bert gpt2 bart
    task: str  # digits blobs marker markov reverse
    n_train: int
    batch_size: int
    steps: int  # optimizer steps
    optimizer: str  # sgd sgd_momentum adam adamw
    lr: float
    schedule: str  # constant warmup_cosine step (faults: grows)
    precision: str = "32-true"
    width: int = 64
    batchnorm: bool = False
    dropout: float = 0.0
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    accumulate: int = 1
    clip: float | None = None
    label_noise: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        reg = [f"do{self.dropout:.2g}"] if self.dropout else []
        reg += [f"wd{self.weight_decay:.1g}"] if self.weight_decay else []
        reg += [f"ls{self.label_smoothing:g}"] if self.label_smoothing else []
        reg += ["bn"] if self.batchnorm else []
        reg += [f"acc{self.accumulate}"] if self.accumulate > 1 else []
        reg += [f"clip{self.clip:g}"] if self.clip else []
        prec = "bf16" if self.precision.startswith("bf16") else "fp32"
        return (
            f"{self.arch}/{self.task} n={self.n_train} b={self.batch_size} {self.steps}st {self.optimizer} "
            f"lr={self.lr:.2g} {self.schedule} {prec} w={self.width} {' '.join(reg)} seed={self.seed}"
        ).strip()


# Per architecture: its task, data sizes, run lengths (cost-bounded), batch sizes, optimizers with a working lr
# (tuned on the tune seed set only), widths, and whether bf16-mixed is offered.
ARCHS: dict[str, dict[str, Any]] = {
    "mlp": {
        "tasks": ("digits", "blobs"),
        "n_train": (300, 1400),
        "steps": (30, 3000),
        "batch": (4, 8, 16, 32, 64, 128, 256, 512),
        "lr": {"sgd": 0.1, "sgd_momentum": 0.02, "adam": 2e-3, "adamw": 2e-3},
        "width": (32, 64, 128, 256),
        "bf16": True,
    },
    "cnn": {
        "tasks": ("digits",),
        "n_train": (400, 1400),
        "steps": (30, 1200),
        "batch": (8, 16, 32, 64, 128, 256),
        "lr": {"sgd": 0.1, "sgd_momentum": 0.02, "adam": 2e-3, "adamw": 2e-3},
        "width": (8, 16),
        "bf16": True,
    },
    "gru": {
        "tasks": ("marker",),
        "n_train": (600, 2000),
        "steps": (60, 600),
        "batch": (8, 16, 32, 64, 128),
        "lr": {"sgd_momentum": 0.05, "adam": 3e-3, "adamw": 3e-3},
        "width": (32, 64),
        "bf16": False,
    },
    "lstm": {
        "tasks": ("marker",),
        "n_train": (600, 2000),
        "steps": (60, 600),
        "batch": (8, 16, 32, 64, 128),
        "lr": {"sgd_momentum": 0.05, "adam": 3e-3, "adamw": 3e-3},
        "width": (32, 64),
        "bf16": False,
    },
    "rnn": {
        "tasks": ("marker",),
        "n_train": (600, 2000),
        "steps": (100, 400),
        "batch": (16, 32, 64),
        "lr": {"sgd_momentum": 0.01, "adam": 1e-3},
        "width": (32, 64),
        "bf16": False,
    },
    "attnpool": {
        "tasks": ("marker",),
        "n_train": (500, 2000),
        "steps": (30, 1000),
        "batch": (4, 8, 16, 32, 64, 128),
        "lr": {"sgd_momentum": 0.05, "adam": 3e-3, "adamw": 3e-3},
        "width": (16, 32),
        "bf16": False,
    },
    "bert": {
        "tasks": ("marker",),
        "n_train": (600, 2000),
        "steps": (60, 300),
        "batch": (8, 16, 32, 64),
        "lr": {"adam": 1e-3, "adamw": 1e-3},
        "width": (32,),
        "bf16": True,
    },
    "gpt2": {
        "tasks": ("markov",),
        "n_train": (1000, 4096),
        "steps": (60, 300),
        "batch": (8, 16, 32, 64),
        "lr": {"adam": 3e-3, "adamw": 3e-3},
        "width": (32, 64),
        "bf16": True,
    },
    "bart": {
        "tasks": ("reverse",),
        "n_train": (1000, 4096),
        "steps": (150, 300),
        "batch": (16, 32, 64),
        "lr": {"adam": 3e-3, "adamw": 3e-3},
        "width": (64,),
        "bf16": False,
    },
}

# task -> (metric, mode, healthy target, "far below healthy" level, number of classes or vocabulary)
TASKS: dict[str, tuple[str, str, float, float, int]] = {
    "digits": ("val_acc", "max", 0.80, 0.50, 10),
    "blobs": ("val_acc", "max", 0.70, 0.45, 4),
    "marker": ("val_acc", "max", 0.80, 0.65, 2),
    "markov": ("val_loss", "min", 1.80, 2.40, lm.VOCAB),
    "reverse": ("val_loss", "min", 2.00, 2.70, lm.VOCAB),
}


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def sample_setup(rng: random.Random, arch: str, seed: int, max_steps: int | None = None) -> Setup:
    """One set-up of ``arch`` drawn from its ranges (run length log-uniform, capped at ``max_steps``)."""
    spec = ARCHS[arch]
    n_train = rng.randint(*spec["n_train"])
    batch = rng.choice([b for b in spec["batch"] if b <= n_train // 2])
    steps = round(_log_uniform(rng, *spec["steps"]))
    if max_steps:
        steps = min(steps, max_steps)
    optimizer = rng.choice(sorted(spec["lr"]))
    lr = spec["lr"][optimizer] * _log_uniform(rng, 0.5, 2.0)
    if optimizer.startswith("sgd"):  # SGD's usable lr grows with the batch (up to a point)
        lr *= min(2.0, max(0.25, math.sqrt(batch / 32)))
    is_lm = arch in ("gpt2", "bart")
    return Setup(
        arch=arch,
        task=rng.choice(spec["tasks"]),
        n_train=n_train,
        batch_size=batch,
        steps=steps,
        optimizer=optimizer,
        lr=lr,
        schedule=rng.choice(("constant", "warmup_cosine", "step")),
        precision="bf16-mixed" if spec["bf16"] and rng.random() < 0.2 else "32-true",
        width=rng.choice(spec["width"]),
        batchnorm=arch == "cnn" or (arch == "mlp" and rng.random() < 0.3),
        dropout=round(rng.uniform(0.1, 0.3), 2) if rng.random() < 0.3 else 0.0,
        weight_decay=round(_log_uniform(rng, 1e-4, 1e-2), 5) if rng.random() < 0.3 else 0.0,
        label_smoothing=0.1 if rng.random() < (0.35 if is_lm else 0.2) else 0.0,
        accumulate=rng.choice((1, 1, 1, 2, 4)) if batch <= 64 else 1,
        clip=1.0 if arch == "rnn" else None,
        seed=seed,
    )


# The healthy set-up the default suite stopped in 6 of 8 seeds (issue 14): batch 8, SGD + momentum, cosine,
# overlapping classes; bare runs reach val_acc 0.85-0.92.
def incident_setup(seed: int) -> Setup:
    return Setup(
        arch="mlp",
        task="blobs",
        n_train=1600,
        batch_size=8,
        steps=2000,
        optimizer="sgd_momentum",
        lr=0.02,
        schedule="warmup_cosine",
        width=64,
        seed=seed,
    )


def entropy_lm_setup(seed: int, label_smoothing: float) -> Setup:
    """A healthy LM whose loss floor is the language's entropy (plus label smoothing): far above zero."""
    return Setup(
        arch="gpt2",
        task="markov",
        n_train=4096,
        batch_size=32,
        steps=300,
        optimizer="adamw",
        lr=3e-3,
        schedule="warmup_cosine",
        width=64,
        label_smoothing=label_smoothing,
        weight_decay=0.01,
        seed=seed,
    )


# ---- faults ------------------------------------------------------------------------------------------------------

LOSS_STUCK = frozenset({"loss.not_decreasing", "loss.plateau", "startup.cannot_overfit"})
BLOW_UP = frozenset({"loss.diverging", "loss.nonfinite", "grad.exploding", "grad.update_ratio"})
PADDING = frozenset({"batch.loss_mismatch", "batch.padding_dependence"})


@dataclass(frozen=True)
class Fault:
    name: str
    archs: tuple[str, ...]
    detected_by: frozenset[str]
    evidence: str  # the name of the ground-truth test in evidence.py
    description: str


FAULTS: dict[str, Fault] = {
    f.name: f
    for f in (
        Fault(
            "lr_too_high",
            ("mlp", "cnn", "gru", "lstm", "attnpool", "bert", "gpt2"),
            BLOW_UP | {"loss.not_decreasing", "loss.plateau"},
            "broken",
            "learning rate x300 (Adam) / x1000 (SGD)",
        ),
        Fault(
            "lr_too_low",
            (*CLASSIFIERS, "gpt2"),
            frozenset({"loss.not_decreasing", "loss.plateau", "grad.update_ratio", "grad.vanishing"}),
            "stuck",
            "learning rate x1e-4",
        ),
        Fault(
            "lr_grows",
            ("mlp", "cnn", "gru", "attnpool", "gpt2"),
            BLOW_UP,
            "blew_up",
            "a schedule that multiplies the lr by 1e4 over the run",
        ),
        Fault(
            "capacity_bottleneck",
            ("mlp", "cnn"),
            LOSS_STUCK | {"loss.floor_high"},
            "far_below",
            "a 1-unit hidden layer on 10 classes",
        ),
        Fault(
            "dead_units",
            ("mlp", "cnn"),
            LOSS_STUCK | {"init.dead_units", "grad.vanishing"},
            "dead_at_init",
            "every ReLU's pre-activation bias at -10: all units dead from the first step",
        ),
        Fault(
            "optimizer_wrong_params",
            (*CLASSIFIERS, "gpt2", "bart"),
            LOSS_STUCK | {"setup.params_not_in_optimizer", "setup.optimizer_params_unused"},
            "frozen",
            "the optimizer holds a spare layer the forward never uses",
        ),
        Fault("labels_permuted", CLASSIFIERS, LOSS_STUCK, "far_below", "labels shuffled within each training batch"),
        Fault(
            "label_noise_overfit",
            ("mlp",),
            frozenset({"val.overfitting", "val.loss_metric_divergence", "calibration.overconfident"}),
            "overfit",
            "40% of 300 training labels random, a wide MLP trained far past its best epoch",
        ),
        Fault(
            "probs_into_ce",
            CLASSIFIERS,
            LOSS_STUCK | {"loss.floor_high", "init.loss_off_chance", "init.saturated_units"},
            "probs_floor",
            "softmax probabilities fed to cross_entropy (which expects logits)",
        ),
        Fault("pads_in_loss", ("gpt2", "bart"), PADDING, "pad_variant", "padding positions scored in the loss"),
        Fault(
            "mask_ignored",
            ("gru", "lstm", "attnpool", "bert"),
            PADDING,
            "pad_variant",
            "pooling / attention ignores the padding mask",
        ),
        Fault(
            "batch_softmax",
            ("mlp", "gru", "lstm", "attnpool", "bert"),
            frozenset({"batch.cross_sample_dependence", "batch.loss_mismatch"}),
            "batch_dependent",
            "a softmax over the batch dimension",
        ),
        Fault(
            "bn_no_running_stats",
            ("mlp", "cnn"),
            frozenset({"batch.cross_sample_dependence"}),
            "batch_dependent",
            "BatchNorm with track_running_stats=False: evaluation depends on the batch",
        ),
        Fault(
            "no_zero_grad",
            ("mlp", "cnn", "gru", "attnpool"),
            BLOW_UP | {"loss.not_decreasing", "loss.plateau"},
            "broken",
            "manual optimisation that never calls zero_grad (gradients accumulate forever)",
        ),
        Fault(
            "lm_sees_future",
            ("gpt2",),
            frozenset({"batch.target_visible", "decode.score_mismatch", "batch.loss_mismatch"}),
            "below_entropy",
            "targets not shifted: the causal LM is scored on the token it already sees",
        ),
        Fault(
            "decoder_off_by_one",
            ("gpt2",),
            frozenset({"decode.score_mismatch"}),
            "decode_mismatch",
            "a greedy decoder that scores each token with the previous step's distribution",
        ),
        Fault(
            "rnn_exploding",
            ("rnn",),
            BLOW_UP | {"grad.clipping_always", "loss.not_decreasing"},
            "blew_up",
            "a ReLU RNN with recurrent gain 1.2 on long sequences, no gradient clipping",
        ),
        Fault(
            "detached_logits",
            CLASSIFIERS,
            LOSS_STUCK | {"grad.vanishing"},
            "frozen",
            "logits detached before the loss: no gradient reaches the model",
        ),
    )
}


def apply_fault(setup: Setup, fault: str | None, rng: random.Random) -> Setup:
    """The set-up as the fault needs it (e.g. the lr it multiplies, a width of 1, BatchNorm on)."""
    if fault == "lr_too_high":
        return replace(setup, lr=setup.lr * (1000 if setup.optimizer.startswith("sgd") else 300), clip=None)
    if fault == "lr_too_low":
        return replace(setup, lr=setup.lr * 1e-4)
    if fault == "lr_grows":
        return replace(setup, schedule="grows", clip=None)
    if fault == "capacity_bottleneck":
        return replace(setup, task="digits", width=1, steps=max(setup.steps, 200))
    if fault == "bn_no_running_stats":
        return replace(setup, batchnorm=True)
    if fault == "no_zero_grad":  # with SGD the summed gradients grow the step; Adam's normalisation would hide it
        return replace(
            setup, accumulate=1, clip=None, optimizer="sgd_momentum", lr=0.05, schedule="constant", batchnorm=False
        )
    if fault == "label_noise_overfit":
        return replace(
            setup,
            task="digits",
            n_train=300,
            batch_size=rng.choice((16, 32)),
            steps=rng.randint(900, 1500),
            optimizer="adam",
            lr=1e-3,
            schedule="constant",
            width=512,
            dropout=0.0,
            weight_decay=0.0,
            label_smoothing=0.0,
            batchnorm=False,
            label_noise=0.4,
            accumulate=1,
        )
    if fault == "rnn_exploding":
        return replace(setup, clip=None, optimizer="sgd_momentum", lr=0.05, accumulate=1)
    if fault in ("labels_permuted", "dead_units", "capacity_bottleneck") and setup.steps < 100:
        return replace(setup, steps=100)
    return setup


# ---- data --------------------------------------------------------------------------------------------------------

N_VAL = 400


def _blobs(n_train: int, seed: int, label_noise: float) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=n_train + N_VAL,
        n_features=16,
        n_informative=8,
        n_redundant=2,
        n_classes=4,
        n_clusters_per_class=1,
        class_sep=1.0,
        flip_y=label_noise,
        random_state=seed,
    )
    xt = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.long)
    return TensorDataset(xt[:n_train], yt[:n_train]), TensorDataset(xt[n_train:], yt[n_train:])


def datasets(setup: Setup, fault: str | None) -> tuple[Any, Any, Any]:
    """``(train, val, collate_fn or None)`` for the set-up's task; the seed draws the data too."""
    s = setup
    if s.task == "digits":
        train, val = digits(n_train=s.n_train, n_val=N_VAL, label_noise=s.label_noise, seed=s.seed)
        return train, val, None
    if s.task == "blobs":
        train, val = _blobs(s.n_train, s.seed, s.label_noise)
        return train, val, None
    if s.task == "marker":
        max_len = 64 if s.arch == "rnn" else 32
        train = text.MarkerDataset(s.n_train, seed=s.seed, max_len=max_len)
        val = text.MarkerDataset(N_VAL, seed=s.seed + 10_000, max_len=max_len)
        return train, val, text.pad_collate
    pad_scored = fault == "pads_in_loss"
    if s.task == "markov":
        train = lm.markov_language(s.n_train, seed=s.seed)
        val = lm.markov_language(256, seed=s.seed + 10_000)
        return train, val, scored_pads_collate() if pad_scored else lm.pad_collate()
    train, val = lm.reverse_task(s.n_train, seed=s.seed), lm.reverse_task(256, seed=s.seed + 10_000)
    return train, val, scored_pads_collate() if pad_scored else lm.pad_collate()


def scored_pads_collate() -> Any:
    """The demo collate, but labels keep the pad id instead of -100: the fault ``pads_in_loss``."""
    inner = lm.pad_collate()

    def collate(items: list[Any]) -> dict[str, torch.Tensor]:
        batch = inner(items)
        if isinstance(items[0], torch.Tensor):
            batch["labels"] = batch["input_ids"].clone()
        else:
            batch["labels"] = batch["labels"].masked_fill(batch["labels"] == -100, lm.EOS)
        return batch

    return collate


def loaders(setup: Setup, fault: str | None) -> tuple[DataLoader, DataLoader]:
    train, val, collate = datasets(setup, fault)
    g = torch.Generator().manual_seed(setup.seed)
    return (
        DataLoader(train, batch_size=setup.batch_size, shuffle=True, generator=g, collate_fn=collate, drop_last=True),
        DataLoader(val, batch_size=128, collate_fn=collate),
    )
