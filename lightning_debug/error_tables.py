"""Host side of :class:`~lightning_debug.callbacks.errors.ErrorAnalysis`: a pulled
:class:`~lightning_debug.error_collection.Collection` turned into slice counts and readable sample rows.

Slice counts feed :func:`~lightning_debug.rules.errors.slice_statistics`; the sample rows (one per kept example
and selection, metadata codes turned back into values, ids decoded to text in one tokenizer call) are the
``debug/errors/samples`` table. Rows are built only for an evaluation whose tables are published.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_debug.error_collection import SCALAR_FIELDS, SELECTIONS, Collection, Pulled
from lightning_debug.rules import errors as rules
from lightning_debug.sinks import Sink

PREFIX = "debug/errors/"
SLICE_PREFIX = "debug/slices/"
MAX_SLICE_SCALARS = 100  # slices with a scalar and a bar in the chart


def slice_counts(c: Collection, slices: Any, frequency: Any) -> list[rules.SliceCounts]:
    """Overall first, then every slice of every column that has no overflow (more than ``cap`` values)."""
    names = _value_names(c)
    found: list[tuple[str, str, list[float]]] = []
    for column, block in zip(c.columns, slices.reshape(-1, c.cap + 1, 5).tolist(), strict=True):
        if column != "all" and block[c.cap][0] > 0:
            continue  # more than max_slice_values values: an id-like column, not a slice
        found += [(column, _value(column, code, names), v) for code, v in enumerate(block[: c.cap])]
    found += [("target_frequency", rules.frequency_bucket_label(b), v) for b, v in enumerate(frequency.tolist())]
    return [rules.SliceCounts(column, value, int(v[0]), *v[1:]) for column, value, v in found if v[0] > 0]


def summary(overall: rules.SliceCounts) -> dict[str, float]:
    """Token (or example) accuracy, exact-sequence accuracy, mean loss and the number of examples."""
    units = overall.units or math.nan
    return {
        "accuracy": float(overall.accuracy),
        "sequence_accuracy": float(overall.exact / units),
        "loss": float(overall.loss_sum / units),
        "count": float(overall.units),
    }


def scalars(summary: dict[str, float], tested: Sequence[rules.SliceStat]) -> dict[str, float]:
    """``debug/errors/<summary key>`` (NaN left out) and one ``debug/slices/<column>/<value>/acc`` per slice."""
    out = {PREFIX + k: v for k, v in summary.items() if math.isfinite(v)}
    out.update({f"{SLICE_PREFIX}{s.column}/{s.value}/acc": s.accuracy for s in tested})
    return out


def publish(
    sink: Sink,
    epoch: int,
    c: Collection,
    pulled: Pulled,
    stats: Sequence[rules.SliceStat],
    chart: Sequence[rules.SliceStat],
    accuracy: float,
    tokenizer: Any,
) -> list[Path | None]:
    """The ``samples`` and ``slices`` tables (W&B, else parquet / CSV files) and, when ``chart`` holds slices,
    their accuracy bar chart (``accuracy``: the overall one, in its title). Returns the files written (``None``
    for what went to W&B)."""
    rows = sample_rows(c, pulled.keys, pulled.rows, tokenizer)
    files = [
        sink.log_frame(PREFIX + "samples", f"errors/epoch={epoch}", sample_columns(c), rows),
        sink.log_frame(
            PREFIX + "slices", f"errors/slices_epoch={epoch}", rules.SliceStat.COLUMNS, [s.row() for s in stats]
        ),
    ]
    if chart:
        labels = [f"{s.column}={s.value}" for s in chart]
        intervals = [(s.low, s.high) for s in chart]
        title = f"Accuracy per slice, epoch {epoch} (overall {accuracy:.3f})"
        files.append(
            sink.log_interval_bars(PREFIX + "slice_accuracy", labels, [s.accuracy for s in chart], intervals, title)
        )
    return files


def _value_names(c: Collection) -> dict[str, dict[int, str]]:
    return {name: {code: value for value, code in table.items()} for name, table in c.codes.items()}


def _value(column: str, code: int, names: dict[str, dict[int, str]]) -> str:
    if column == "input_length":
        return rules.length_bucket_label(code)
    return names[column].get(code, str(code)) if column in names else str(code)


def sample_columns(c: Collection) -> list[str]:
    columns = ["selection", "position", *(name for name, _ in c.meta), "input", "reference", "prediction"]
    columns += ["correct", "loss", "confidence", "length"]
    return columns + (["token_accuracy", "first_difference"] if c.token_task else [])


def sample_rows(c: Collection, keys: Any, rows: Any, tokenizer: Any) -> list[list[Any]]:
    """One row per kept example and selection (:func:`sample_columns`), texts decoded in one call."""
    meta = [name for name, _ in c.meta]
    names = _value_names(c)
    base, start = len(SCALAR_FIELDS), len(SCALAR_FIELDS) + len(meta)
    slot = [s for s, size in enumerate(c.sizes) for _ in range(size)]
    kept = [(i, s) for i, s in enumerate(slot) if math.isfinite(keys[i, s])]
    picked = rows[[i for i, _ in kept]]
    table = picked[:, :start].tolist()  # ids stay in numpy: only their kept entries become Python ints
    blocks = [(start, c.in_width)] if c.in_width else []
    if c.token_task:
        blocks += [(start + c.in_width, c.out_width), (start + c.in_width + c.out_width, c.out_width)]
    texts = decode([r[a : a + w] for r in picked for a, w in blocks], tokenizer)
    out = []
    for n, ((_, s), r) in enumerate(zip(kept, table, strict=True)):
        f = dict(zip(SCALAR_FIELDS, r[:base], strict=True))
        values = [names[m].get(int(v), "") if m in names else int(v) for m, v in zip(meta, r[base:start], strict=True)]
        text = texts[n * len(blocks) : (n + 1) * len(blocks)]
        inp = text[0] if c.in_width else c.summary
        ref, pred = text[-2:] if c.token_task else (str(int(f["target"])), str(int(f["prediction"])))
        row = [SELECTIONS[s], int(f["position"]), *values, inp, ref, pred, bool(f["correct"]), f["loss"]]
        row += [f["confidence"], int(f["length"])]
        out.append(row + ([f["token_accuracy"], int(f["first_diff"])] if c.token_task else []))
    return out


def decode(rows: Sequence[Any], tokenizer: Any) -> list[str]:
    """Each numpy row of ids (``-1``: padding) as text: one ``batch_decode`` call, else ``decode`` per row, else
    the ids themselves."""
    ids = [r[r >= 0].astype(np.int64).tolist() for r in rows]
    if tokenizer is None or not ids:
        return [" ".join(map(str, r)) for r in ids]
    if callable(getattr(tokenizer, "batch_decode", None)):
        return [str(t) for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return [str(tokenizer.decode(r)) for r in ids]


def find_tokenizer(module: Any, datamodule: Any) -> Any:
    """A ``tokenizer`` attribute of the module or datamodule, or any attribute with ``decode`` and
    ``batch_decode`` (a Hugging Face tokenizer, recognised without importing transformers)."""
    for owner in (module, datamodule):
        if owner is None:
            continue
        tok = getattr(owner, "tokenizer", None)
        if callable(getattr(tok, "decode", None)):
            return tok
        for value in vars(owner).values():
            if callable(getattr(value, "decode", None)) and callable(getattr(value, "batch_decode", None)):
                return value
    return None
