""":class:`~lightning_debug.callbacks.errors.ErrorAnalysis` under DDP: one decision and one collection for all ranks.

Each rank collects its shard of the validation set on its device (:class:`~lightning_debug.error_collection.
Collection`). The ranks must analyse the same evaluations (they time themselves differently), so rank zero's
decision is broadcast once per evaluation (:func:`agreed`); at the end of an analysed run the pulled arrays are
gathered once (``all_gather_object``) and merged on the host (:func:`merge`): slice sums added (string metadata
codes, given in each rank's order of appearance, mapped to one table), kept rows re-selected by their keys, and
positions mapped to the validation order of Lightning's ``DistributedSampler`` (rank ``r`` holds examples
``r, r + world, ...`` when it does not shuffle). Every rank then computes the same slices and findings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_debug.error_collection import SCALAR_FIELDS, Collection, Pulled
from lightning_debug.rules import errors as rules

if TYPE_CHECKING:
    import lightning.pytorch as pl

LAYOUT = ("token_task", "meta", "codes", "in_width", "out_width", "summary", "columns")


def agreed(trainer: pl.Trainer, decision: bool) -> bool:
    """Rank zero's ``decision`` on every rank: one broadcast per evaluation under DDP."""
    return decision if trainer.world_size <= 1 else bool(trainer.strategy.broadcast(decision, src=0))


def summed(trainer: pl.Trainer, counts: torch.Tensor | None) -> torch.Tensor | None:
    """The training-label token counts of every rank (one reduction per analysed evaluation under DDP): the
    ranks bucket target tokens by the same frequencies."""
    if counts is None or trainer.world_size <= 1:
        return counts
    return trainer.strategy.reduce(counts.clone(), reduce_op="sum")


def pull_all(trainer: pl.Trainer, run: Collection) -> Pulled | None:
    """The run's arrays on the host, every rank's merged under DDP; ``None`` when no rank saw a batch."""
    local = run.pull() if run.started else None
    if trainer.world_size <= 1:
        return local
    layout = {k: getattr(run, k) for k in LAYOUT} if run.started else None
    parts: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, (local, layout))
    return merge(run, parts)


def merge(run: Collection, parts: list[tuple[Pulled | None, dict[str, Any] | None]]) -> Pulled | None:
    """Rank ``r``'s ``(pulled, layout)`` is ``parts[r]``. Sets the merged layout on ``run`` (string codes in
    rank order) and returns the merged arrays: what one process would have collected, up to which of equal
    keys wins and the order of string codes."""
    world = len(parts)
    started = [(rank, p, lay) for rank, (p, lay) in enumerate(parts) if p is not None and lay is not None]
    if not started:
        return None
    for k in LAYOUT:
        setattr(run, k, started[0][2][k])  # fixed by the first batch: the same shapes on every rank
    run.started, run.codes = True, {name: {} for name in run.codes}
    meta_column = {name: len(SCALAR_FIELDS) + j for j, (name, _) in enumerate(run.meta)}
    blocks = np.zeros((len(run.columns), run.cap + 1, 5))
    frequency, keys, rows = 0.0, [], []
    for rank, p, lay in started:
        local = p.rows.copy()
        local[:, 0] = local[:, 0] * world + rank  # the position in the validation order
        block = p.slices.reshape(blocks.shape)
        for i, column in enumerate(run.columns):
            if column not in run.codes:
                blocks[i] += block[i]
                continue
            table = run.codes[column]
            to_global = {code: table.setdefault(value, len(table)) for value, code in lay["codes"][column].items()}
            # slot `cap` sums every value past the cap; a value's new code past it joins them
            slots = [
                min(to_global[c], run.cap) if c in to_global and c < run.cap else run.cap for c in range(run.cap + 1)
            ]
            np.add.at(blocks[i], slots, block[i])
            values = local[:, meta_column[column]]
            local[:, meta_column[column]] = [to_global.get(int(v), -1) for v in values]
        frequency = frequency + p.frequency
        keys.append(p.keys)
        rows.append(local)
    kept_keys, kept_rows = rules.empty_selection(run.sizes, rows[0].shape[1], torch.device("cpu"))
    new_keys, new_rows = (torch.from_numpy(np.concatenate(x)) for x in (keys, rows))
    merged_keys, merged_rows = rules.merge_selections(kept_keys, kept_rows, new_keys, new_rows, run.sizes)
    slices = blocks.reshape(-1, 5)
    return Pulled(slices, np.asarray(frequency), merged_keys.numpy(), merged_rows.numpy())
