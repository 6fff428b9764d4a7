"""``DebugReport``: gathers the findings of every ``DebugCallback`` and writes them out.

At the end of fit/validate/test, and when training raises, it writes ``report.json`` under
:func:`~lightning_debug.sinks.output_dir` (``<log_dir>/lightning_debug/``)
(``{"version", "status", "findings", "summary"}``), prints a console table, and sends the findings table,
per-check counts and totals to W&B when a ``WandbLogger`` is attached.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_debug.base import LeanCallback, debug_callbacks_of
from lightning_debug.findings import Finding, Severity
from lightning_debug.sinks import Sink

if TYPE_CHECKING:
    import lightning.pytorch as pl

REPORT_VERSION = 1
TABLE_COLUMNS = ("check", "severity", "step", "epoch", "count", "source", "message", "hint", "data")
log = logging.getLogger("lightning_debug")


def build_report(findings: list[Finding], status: str) -> dict[str, Any]:
    ordered = sorted(findings, key=lambda f: (-f.severity.rank, f.step, f.check))
    return {
        "version": REPORT_VERSION,
        "status": status,
        "findings": [f.to_dict() for f in ordered],
        "summary": dict(Counter(f.check for f in ordered)),
    }


def format_table(findings: list[Finding]) -> str:
    """A plain-text table: used when ``rich`` is not installed, and in logs."""
    if not findings:
        return "lightning-debug: no findings."
    rows = [(f.severity.value.upper(), f.check, str(f.step), f"x{f.count}", f.message) for f in findings]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["lightning-debug findings:"]
    for r in rows:
        lines.append("  " + "  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
    return "\n".join(lines)


class DebugReport(LeanCallback):
    """Writes the findings report at the end of a run and on an exception.

    Args:
        print_table: print the findings table to the console at the end (rank zero).
        min_severity: the least severe findings to print (all are always written to the JSON report).
    """

    def __init__(self, print_table: bool = True, min_severity: str = "info") -> None:
        if min_severity not in {s.value for s in Severity}:
            raise ValueError(f"`min_severity` must be one of {[s.value for s in Severity]}, got {min_severity!r}")
        self.print_table = print_table
        self.min_severity = Severity(min_severity)
        self.path: Path | None = None

    def findings(self, trainer: pl.Trainer) -> list[Finding]:
        return [f for cb in debug_callbacks_of(trainer) for f in cb.findings]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._write(trainer, status="finished")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._write(trainer, status=f"interrupted: {type(exception).__name__}: {exception}")

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, status: str) -> None:
        findings = self.findings(trainer)
        report = build_report(findings, status)
        sink = Sink(trainer)
        sink.flush()  # the debug callbacks' last scalars, before the loggers are finalised
        try:
            os.makedirs(sink.directory, exist_ok=True)
            self.path = sink.directory / "report.json"
            self.path.write_text(json.dumps(report, indent=2))
        except OSError as err:
            log.warning("lightning-debug could not write its report: %s", err)
        self._to_wandb(sink, report)
        if self.print_table:
            self._print([f for f in findings if f.severity.rank >= self.min_severity.rank])

    @staticmethod
    def _to_wandb(sink: Sink, report: dict[str, Any]) -> None:
        if not sink.has_wandb:
            return
        rows = [[json.dumps(f[c]) if c == "data" else f[c] for c in TABLE_COLUMNS] for f in report["findings"]]
        sink.log_table("debug/findings/table", TABLE_COLUMNS, rows)
        by_severity = Counter(f["severity"] for f in report["findings"])
        summary: dict[str, Any] = {f"debug/findings/{check}": n for check, n in report["summary"].items()}
        summary.update({f"debug/findings/total_{s.value}": by_severity.get(s.value, 0) for s in Severity})
        summary["debug/findings/status"] = report["status"]
        sink.set_summary(summary)

    def _print(self, findings: list[Finding]) -> None:
        findings = sorted(findings, key=lambda f: (-f.severity.rank, f.step))
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            print(format_table(findings))
            return
        console = Console(width=None if sys.stdout.isatty() else 160)  # logs and CI: do not fold at 80
        if not findings:
            console.print("lightning-debug: no findings.")
            return
        table = Table(title="lightning-debug findings", show_lines=False)
        for column in ("severity", "check", "step", "count", "message"):
            table.add_column(column, overflow="fold")
        colours = {"error": "red", "warning": "yellow", "info": "cyan"}
        for f in findings:
            sev = f.severity.value
            table.add_row(f"[{colours[sev]}]{sev}[/]", f.check, str(f.step), str(f.count), f.message)
        console.print(table)
        if self.path is not None:
            console.print(f"report: {self.path}")
