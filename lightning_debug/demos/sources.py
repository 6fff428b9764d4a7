"""A text classifier whose dev set has metadata, and two planted weaknesses, for error analysis.

Each example is a sequence of 3-32 word tokens with a ``source`` (``news``, ``wiki``, ``forum``,
``reviews``) and an ``id``; the label says whether the marker word occurs. Two knobs plant what
:class:`~lightning_debug.callbacks.errors.ErrorAnalysis` should find:

- ``flip_source``: the labels of one source are flipped in training and dev data. The model does not see the
  source, so it learns the majority rule and gets that source wrong (a mislabelled source);
- ``truncate``: the classifier reads only the first ``truncate`` tokens (a truncation bug), so long inputs
  whose marker comes late are missed.

:func:`word_tokenizer` builds a word-level Hugging Face tokenizer for the vocabulary in code (no download),
so the sampled rows read as words.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_debug.demos.text import MARKER, PAD, AttentionPoolingClassifier

SOURCES = ("news", "wiki", "forum", "reviews")
VOCAB = 24


class SourcedMarkerDataset(Dataset):
    """``n`` examples ``{"input_ids", "label", "source", "id"}``; label 1 iff ``MARKER`` occurs (flipped for
    ``flip_source``)."""

    def __init__(self, n: int, seed: int = 0, flip_source: str | None = None, max_len: int = 32) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items: list[dict[str, Any]] = []
        for i in range(n):
            length = int(torch.randint(3, max_len + 1, (1,), generator=g))
            ids = torch.randint(2, VOCAB, (length,), generator=g)
            label = int(torch.rand(1, generator=g) < 0.5)
            if label:
                ids[torch.randint(0, length, (1,), generator=g)] = MARKER
            source = SOURCES[int(torch.randint(0, len(SOURCES), (1,), generator=g))]
            if source == flip_source:
                label = 1 - label
            self.items.append({"input_ids": ids, "label": label, "source": source, "id": f"{seed}-{i}"})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Right-padded ``input_ids`` / ``attention_mask``, ``labels``, and the metadata as lists of strings."""
    ids = torch.nn.utils.rnn.pad_sequence([it["input_ids"] for it in items], batch_first=True, padding_value=PAD)
    mask = torch.nn.utils.rnn.pad_sequence(
        [torch.ones_like(it["input_ids"]) for it in items], batch_first=True, padding_value=0
    )
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.tensor([it["label"] for it in items]),
        "source": [it["source"] for it in items],
        "id": [it["id"] for it in items],
    }


def sourced_loaders(
    n_train: int = 2000, n_val: int = 600, batch_size: int = 32, seed: int = 0, flip_source: str | None = None
) -> tuple[DataLoader, DataLoader]:
    train = SourcedMarkerDataset(n_train, seed=seed, flip_source=flip_source)
    val = SourcedMarkerDataset(n_val, seed=seed + 1, flip_source=flip_source)
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=g),
        DataLoader(val, batch_size=200, collate_fn=collate),
    )


class SourcedClassifier(AttentionPoolingClassifier):
    """The attention-pooling classifier, reading only the first ``truncate`` tokens when set; holds the
    ``tokenizer`` so error analysis shows words."""

    def __init__(self, truncate: int | None = None, tokenizer: Any = None, lr: float = 3e-3) -> None:
        super().__init__(vocab=VOCAB, lr=lr)
        self.truncate = truncate
        self.tokenizer = tokenizer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.truncate is not None:
            input_ids, attention_mask = input_ids[:, : self.truncate], attention_mask[:, : self.truncate]
        return super().forward(input_ids, attention_mask)


def word_tokenizer(vocab: int = VOCAB) -> Any:
    """A word-level ``PreTrainedTokenizerFast``: ``[PAD]``, ``MARKER``, then ``w2`` ... ``w<vocab-1>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[PAD]": PAD, "MARKER": MARKER, **{f"w{i}": i for i in range(2, vocab)}}
    core = Tokenizer(models.WordLevel(words, unk_token="[PAD]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]")
