"""A text classifier whose dev set has metadata, and two planted weaknesses, for error analysis.

Each example is a sequence of 3-32 word tokens with a ``source`` (``news``, ``wiki``, ``forum``,
``reviews``: 35/30/15/20%) and an ``id``; the label is 1 if the word ``YES`` occurs and 0 if ``NO`` does (one of them,
once, anywhere). Two knobs plant what
:class:`~lightning_debug.callbacks.errors.ErrorAnalysis` should find:

- ``flip_source``: the labels of one source are flipped in training and dev data. The model does not see the
  source, so it learns the majority rule and gets that source wrong (a mislabelled source);
- ``truncate``: the classifier reads only the first ``truncate`` tokens (a truncation bug), so it guesses on
  long inputs whose marker comes late, whatever their label.

:func:`word_tokenizer` builds a word-level Hugging Face tokenizer for the vocabulary in code (no download),
so the sampled rows read as words.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_debug.demos.text import MARKER, PAD, AttentionPoolingClassifier

SOURCES = ("news", "wiki", "forum", "reviews")
SOURCE_SHARES = (0.35, 0.3, 0.15, 0.2)
NO = 24  # the marker of label 0 (MARKER, token 1, is the marker of label 1)
VOCAB = 25


class SourcedMarkerDataset(Dataset):
    """``n`` examples ``{"input_ids", "label", "source", "id"}``; label 1 iff ``MARKER`` occurs (else ``NO``),
    flipped for ``flip_source`` and, whatever the source, for a random ``label_noise`` share (so a healthy model makes
    errors too, evenly over every slice)."""

    def __init__(
        self, n: int, seed: int = 0, flip_source: str | None = None, label_noise: float = 0.1, max_len: int = 32
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items: list[dict[str, Any]] = []
        for i in range(n):
            length = int(torch.randint(3, max_len + 1, (1,), generator=g))
            ids = torch.randint(2, NO, (length,), generator=g)
            label = int(torch.rand(1, generator=g) < 0.5)
            ids[torch.randint(0, length, (1,), generator=g)] = MARKER if label else NO
            source = SOURCES[int(torch.multinomial(torch.tensor(SOURCE_SHARES), 1, generator=g))]
            if (source == flip_source) != bool(torch.rand(1, generator=g) < label_noise):
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
    n_train: int = 2000,
    n_val: int = 600,
    batch_size: int = 32,
    seed: int = 0,
    flip_source: str | None = None,
    label_noise: float = 0.1,
) -> tuple[DataLoader, DataLoader]:
    train = SourcedMarkerDataset(n_train, seed=seed, flip_source=flip_source, label_noise=label_noise)
    val = SourcedMarkerDataset(n_val, seed=seed + 1, flip_source=flip_source, label_noise=label_noise)
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


def word_tokenizer(words: dict[str, int] | None = None, pad_token: str = "[PAD]", **special: str) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` (word -> id), built in code; ``special`` names
    more special tokens (``bos_token="<s>"``). By default this task's words: ``[PAD]``, ``YES`` (``MARKER``),
    ``w2`` ... ``w23``, ``NO``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if words is None:
        words = {"[PAD]": PAD, "YES": MARKER, **{f"w{i}": i for i in range(2, NO)}, "NO": NO}
    core = Tokenizer(models.WordLevel(words, unk_token=pad_token))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=pad_token, **special)
