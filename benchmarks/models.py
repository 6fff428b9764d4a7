"""The generated benchmark's models: ordinary Lightning modules with one switch per injected fault.

:class:`Bench` holds what every scenario shares (loss, logging, optimizer and schedule, the training-side faults);
subclasses only say how a batch becomes logits and targets. ``build(setup, fault)`` picks the class.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration, BertConfig, BertForSequenceClassification

from benchmarks.scenarios import TASKS, Setup, loaders
from lightning_debug.demos import lm, text


class Bench(pl.LightningModule):
    """Logs ``train_loss`` (step and epoch), ``val_loss`` and, for classifiers, ``train_acc`` / ``val_acc``."""

    classifier = True

    def __init__(self, setup: Setup, fault: str | None) -> None:
        super().__init__()
        self._bench_init(setup, fault)

    def _bench_init(self, setup: Setup, fault: str | None) -> None:
        self.setup_spec, self.fault = setup, fault
        self.spare = nn.Linear(4, 4) if fault == "optimizer_wrong_params" else None
        self.automatic_optimization = fault != "no_zero_grad"

    # subclasses: logits and targets of a batch, aligned so that cross_entropy(logits, target) is the loss
    def scored(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def loss_of(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, target = self.scored(batch)
        if self.fault == "detached_logits":
            logits = logits.detach().requires_grad_()
        if self.fault == "probs_into_ce":
            logits = logits.softmax(-1)
        flat, flat_target = logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1)
        loss = nn.functional.cross_entropy(flat, flat_target, label_smoothing=self.setup_spec.label_smoothing)
        return loss, logits, target

    def _permuted(self, batch: Any) -> Any:
        if isinstance(batch, dict):
            perm = torch.randperm(len(batch["labels"]), device=batch["labels"].device)
            return {**batch, "labels": batch["labels"][perm]}
        x, y = batch
        return x, y[torch.randperm(len(y), device=y.device)]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fault == "labels_permuted":
            batch = self._permuted(batch)
        loss, logits, target = self.loss_of(batch)
        n = len(target)
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=n)
        if self.classifier:
            acc = (logits.argmax(-1) == target).float().mean()
            self.log("train_acc", acc, on_step=False, on_epoch=True, batch_size=n)
        if not self.automatic_optimization:  # the fault: no zero_grad, gradients pile up step after step
            opt = self.optimizers()
            self.manual_backward(loss)
            opt.step()  # type: ignore[union-attr]
            self.lr_schedulers().step()  # type: ignore[union-attr]
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor] | None:
        loss, logits, target = self.loss_of(batch)
        n = len(target)
        self.log("val_loss", loss, prog_bar=True, batch_size=n)
        if not self.classifier:
            return None
        self.log("val_acc", (logits.argmax(-1) == target).float().mean(), prog_bar=True, batch_size=n)
        return {"logits": logits, "target": target}

    def configure_optimizers(self) -> Any:
        s = self.setup_spec
        params = (self.spare or self).parameters()
        if s.optimizer.startswith("sgd"):
            momentum = 0.9 if s.optimizer == "sgd_momentum" else 0.0
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=s.lr, momentum=momentum, weight_decay=s.weight_decay
            )
        else:
            cls = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
            opt = cls(params, lr=s.lr, weight_decay=s.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(s.schedule, s.steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lr_factor(schedule: str, total: int) -> Any:
    warmup = max(1, total // 20)
    if schedule == "warmup_cosine":
        return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0)))
    if schedule == "step":
        return lambda s: 0.3 ** (3 * s // total)
    if schedule == "grows":  # the fault lr_grows: x10 per quarter of the run
        return lambda s: 10 ** (4 * s / total)
    return lambda s: 1.0


def batch_dim_bug(logits: torch.Tensor, fault: str | None) -> torch.Tensor:
    """The fault ``batch_softmax``: log-probabilities normalised over the batch instead of the classes."""
    return logits.log_softmax(dim=0) if fault == "batch_softmax" else logits


def _kill_relus(net: nn.Sequential) -> None:
    """The fault ``dead_units``: the bias feeding each ReLU at -10, so no unit fires at initialisation."""
    layers = list(net)
    for before, layer in itertools.pairwise(layers):
        if isinstance(layer, nn.ReLU) and getattr(before, "bias", None) is not None:
            nn.init.constant_(before.bias, -10.0)


class VectorClassifier(Bench):
    """MLP on 64 (digits) or 16 (blobs) features, or a CNN with BatchNorm on the 8x8 digits."""

    def __init__(self, setup: Setup, fault: str | None) -> None:
        super().__init__(setup, fault)
        s, track = setup, fault != "bn_no_running_stats"
        classes, features = TASKS[s.task][4], 64 if s.task == "digits" else 16
        layers: list[nn.Module] = []
        if s.arch == "cnn":
            c = s.width if s.width > 1 else 1
            layers += [nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, c, 3, padding=1)]
            layers += [nn.BatchNorm2d(c, track_running_stats=track), nn.ReLU(), nn.Conv2d(c, 2 * c, 3, padding=1)]
            layers += [nn.BatchNorm2d(2 * c, track_running_stats=track), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
            width = 2 * c * 16
            if s.width == 1:  # the capacity bottleneck: one unit between the features and the classes
                layers += [nn.Linear(width, 1), nn.ReLU()]
                width = 1
        else:
            width = features
            for _ in range(2 if s.width > 1 else 1):
                layers.append(nn.Linear(width, s.width))
                if s.batchnorm:
                    layers.append(nn.BatchNorm1d(s.width, track_running_stats=track))
                layers.append(nn.ReLU())
                width = s.width
        if s.dropout:
            layers.append(nn.Dropout(s.dropout))
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)
        if fault == "dead_units":
            _kill_relus(self.net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_dim_bug(self.net(x), self.fault)

    def scored(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        return self(x), y


class TokenClassifier(Bench):
    """GRU / LSTM / ReLU-RNN with masked mean pooling, the demo's attention pooling, or a tiny BERT."""

    def __init__(self, setup: Setup, fault: str | None) -> None:
        super().__init__(setup, fault)
        s, vocab = setup, 24
        self.attnpool: text.AttentionPoolingClassifier | None = None
        self.bert: BertForSequenceClassification | None = None
        if s.arch == "attnpool":
            bug = fault if fault in ("mask_ignored", "batch_softmax") else None
            self.attnpool = text.AttentionPoolingClassifier(vocab=vocab, d=s.width, bug=bug)
        elif s.arch == "bert":
            config = BertConfig(
                vocab_size=vocab,
                hidden_size=s.width,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=2 * s.width,
                max_position_embeddings=80,
                num_labels=2,
                hidden_dropout_prob=s.dropout,
                attention_probs_dropout_prob=s.dropout,
                pad_token_id=text.PAD,
            )
            self.bert = BertForSequenceClassification(config)
        else:
            self.embed = nn.Embedding(vocab, s.width, padding_idx=text.PAD)
            kinds = {"gru": nn.GRU, "lstm": nn.LSTM}
            if s.arch == "rnn":
                self.rnn: nn.Module = nn.RNN(s.width, s.width, batch_first=True, nonlinearity="relu")
                gain = 1.2 if fault == "rnn_exploding" else 1.0
                nn.init.orthogonal_(self.rnn.weight_hh_l0, gain=gain)
            else:
                self.rnn = kinds[s.arch](s.width, s.width, batch_first=True)
            self.drop = nn.Dropout(s.dropout)
            self.head = nn.Linear(s.width, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ignore_mask = self.fault == "mask_ignored"
        if self.attnpool is not None:
            return self.attnpool(input_ids, attention_mask)
        if self.bert is not None:
            out = self.bert(input_ids=input_ids, attention_mask=None if ignore_mask else attention_mask).logits
            return batch_dim_bug(out, self.fault)
        h, _ = self.rnn(self.embed(input_ids))
        mask = torch.ones_like(attention_mask) if ignore_mask else attention_mask
        m = mask.unsqueeze(-1).to(h.dtype)
        return batch_dim_bug(self.head(self.drop((h * m).sum(1) / m.sum(1))), self.fault)

    def scored(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self(batch["input_ids"], batch["attention_mask"]), batch["labels"]


class CausalLM(Bench, lm.GreedyGPT2LM):
    """The demo's tiny GPT-2 (its greedy decoder, off by one for that fault), trained with the shared recipe."""

    classifier = False

    def __init__(self, setup: Setup, fault: str | None) -> None:
        torch.manual_seed(setup.seed)
        lm.GreedyGPT2LM.__init__(self, off_by_one=fault == "decoder_off_by_one", n_embd=setup.width)
        self._bench_init(setup, fault)
        for layer in self.model.modules():
            if isinstance(layer, nn.Dropout):
                layer.p = setup.dropout

    def scored(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if self.fault == "lm_sees_future":  # targets not shifted: each position is scored on its own input token
            return logits, batch["labels"]
        return logits[:, :-1], batch["labels"][:, 1:]


class Seq2Seq(Bench):
    """The demo's tiny BART on the reverse task (decoder inputs are the labels shifted right, BART style)."""

    classifier = False

    def __init__(self, setup: Setup, fault: str | None) -> None:
        super().__init__(setup, fault)
        config = BartConfig(
            vocab_size=lm.VOCAB,
            d_model=setup.width,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=2 * setup.width,
            decoder_ffn_dim=2 * setup.width,
            max_position_embeddings=64,
            dropout=setup.dropout,
            pad_token_id=lm.EOS,
            bos_token_id=lm.BOS,
            eos_token_id=lm.EOS,
            decoder_start_token_id=lm.EOS,
            forced_eos_token_id=None,
        )
        self.model = BartForConditionalGeneration(config)

    def scored(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(**batch).logits, batch["labels"]


def module_for(setup: Setup, fault: str | None) -> Bench:
    torch.manual_seed(setup.seed)
    if setup.arch in ("mlp", "cnn"):
        return VectorClassifier(setup, fault)
    if setup.arch == "gpt2":
        return CausalLM(setup, fault)
    if setup.arch == "bart":
        return Seq2Seq(setup, fault)
    return TokenClassifier(setup, fault)


def build(setup: Setup, fault: str | None) -> tuple[Bench, Any, Any, dict[str, Any]]:
    """Module, loaders and the Trainer arguments of a scenario (about ten validations over the run)."""
    module = module_for(setup, fault)
    train, val = loaders(setup, fault)
    trainer = {
        "max_steps": setup.steps,
        "precision": setup.precision,
        "accumulate_grad_batches": setup.accumulate,
        "gradient_clip_val": setup.clip,
        "check_val_every_n_epoch": None,
        "val_check_interval": max(1, setup.steps * setup.accumulate // 10),
        "num_sanity_val_steps": 0,
    }
    return module, train, val, trainer
