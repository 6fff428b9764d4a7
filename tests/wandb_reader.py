"""Read an offline W&B run back, so tests assert what actually reached W&B.

wandb 0.31 has no supported reader for offline runs; this follows ``shared/reference/wandb-offline-format.md``:
a 7-byte header, then LevelDB-log framing (32 KiB blocks of chunks with a 7-byte ``<IHB`` header,
FULL/FIRST/MIDDLE/LAST), each record a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(data: bytes) -> list[bytes]:
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, "not a W&B record log"
    out: list[bytes] = []
    pending = b""
    pos = 7
    while len(data) - pos >= 7:
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:
            pos += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left_in_block
            continue
        if pos + 7 + length > len(data):
            break  # a chunk still being written
        payload = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == checksum, f"bad checksum at {pos}"
        pos += 7 + length
        if kind == FULL:
            out.append(payload)
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            out.append(pending + payload)
            pending = b""
    return out


def _fold(items: Any, into: dict[str, Any]) -> dict[str, Any]:
    """Items carry a flat ``key`` or a ``nested_key`` path (``["debug/x/table", "path"]``): nest the latter."""
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = into
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return into


@dataclass
class OfflineRun:
    """What an offline run holds: history rows, summary, metric definitions, config items and alerts."""

    path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False

    @property
    def files(self) -> Path:
        return self.path / "files"

    def keys(self) -> set[str]:
        return {k for row in self.history for k in row}

    def series(self, key: str) -> list[Any]:
        return [row[key] for row in self.history if key in row]

    def table(self, key: str, index: int = -1) -> dict[str, Any]:
        """Contents (``{"columns", "data"}``) of a logged table or chart, the last one by default."""
        refs = [row[key] for row in self.history if key in row]
        assert refs, f"no table logged under {key!r}; keys: {sorted(self.keys())}"
        return json.loads((self.files / refs[index]["path"]).read_text())


def read_offline_run(save_dir: str | Path, timeout: float = 60.0) -> OfflineRun:
    """Parse the newest ``offline-run-*`` under ``save_dir`` (or ``save_dir/wandb``).

    ``wandb.finish()`` can return before the wandb-core service has written everything, so this waits (up to
    ``timeout`` seconds) for the run's ``exit`` record, which is written last.
    """
    save_dir = Path(save_dir)
    roots = [save_dir / "wandb", save_dir]
    runs = sorted(p for r in roots if r.is_dir() for p in r.glob("offline-run-*"))
    assert runs, f"no offline run under {save_dir}"
    run_dir = runs[-1]
    (log_file,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        run = _parse(run_dir, log_file)
        if run.finished or time.monotonic() > deadline:
            assert run.finished, f"{log_file} has no exit record after {timeout} s: was wandb.finish() called?"
            return run
        time.sleep(0.2)


def _parse(run_dir: Path, log_file: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    run = OfflineRun(run_dir)
    for payload in _records(log_file.read_bytes()):
        record = pb.Record.FromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append(_fold(record.history.item, {}))
        elif kind == "summary":
            _fold(record.summary.update, run.summary)
        elif kind == "metric":
            m = record.metric
            run.metrics.append(
                {
                    "name": m.name or m.glob_name,
                    "step_metric": m.step_metric,
                    "summary": [s for s in ("min", "max", "mean", "last", "first", "best") if getattr(m.summary, s)],
                }
            )
        elif kind == "config":
            _fold(record.config.update, run.config)
        elif kind == "alert":
            a = record.alert
            run.alerts.append({"title": a.title, "text": a.text, "level": a.level})
        elif kind == "exit":
            run.finished = True
    return run
