"""The one place that talks to loggers: every W&B and matplotlib call of the package is made here.

Scalars go through ``trainer.loggers`` (CSV, TensorBoard, W&B alike). Rich media (tables, native charts,
figures, alerts, summaries, metric definitions) go to W&B when a ``WandbLogger`` is attached; without one,
tables are written as CSV and figures as PNG under ``<log_dir>/lightning_debug/`` (figures also to TensorBoard
when that logger is present). Figures are passed as a function that draws them (see :mod:`lightning_debug.media`),
so nothing is drawn, and matplotlib is not imported, unless a figure is actually logged.
Every method is rank-zero only and swallows logger failures: a dashboard problem must never stop training.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger("lightning_debug")
_OUTPUT_DIR = "_lightning_debug_output_dir"  # kept on the trainer: one folder per run
_PENDING = "_lightning_debug_pending_scalars"  # kept on the trainer: {step: scalars} not yet sent
MAX_HOLD_STEPS = 200

ALERT_WAIT = timedelta(minutes=5)
ALERT_LIMIT = 10  # per run: an alert storm helps nobody
_ALERTS_SENT = "_lightning_debug_alerts_sent"  # the per-run budget, kept on the run's WandbLogger


def output_dir(trainer: pl.Trainer) -> Path:
    """Where reports and figures go, fixed for the run: ``<log_dir>/lightning_debug`` for a TensorBoard or CSV
    logger; ``<save_dir>/lightning_logs/<version>/lightning_debug`` for another logger (W&B: the run id); without
    a logger ``<default_root_dir>/lightning_logs/version_<n>/lightning_debug``, the next free version. Never a
    ``lightning_debug`` folder in the working directory, which would shadow the package on the next import.
    Resolved without the collective call in ``trainer.log_dir``."""
    cached = getattr(trainer, _OUTPUT_DIR, None)
    if cached is not None:
        return cached
    first = trainer.loggers[0] if trainer.loggers else None
    if isinstance(first, (TensorBoardLogger, CSVLogger)):
        path = Path(first.log_dir) / "lightning_debug"
    else:
        root = Path((first.save_dir if first is not None else None) or trainer.default_root_dir) / "lightning_logs"
        version = first.version if first is not None else None
        path = root / (str(version) if version not in (None, "") else _next_version(root)) / "lightning_debug"
    setattr(trainer, _OUTPUT_DIR, path)
    return path


def _next_version(root: Path) -> str:
    taken = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
    return f"version_{max(taken, default=-1) + 1}"


def hold_steps(trainer: pl.Trainer) -> int:
    """How long a step's scalars wait for more points of that step: the trainer's logging interval, or its
    validation interval if longer (a sample taken mid-interval is logged at the validation), at most
    ``MAX_HOLD_STEPS`` (the debug series of a run with long epochs must not lag by an epoch)."""
    every = getattr(trainer, "log_every_n_steps", 0) or 0  # set by Lightning at init
    val = getattr(trainer, "val_check_batch", None)
    interval = val if isinstance(val, (int, float)) and math.isfinite(val) else 0
    return int(min(MAX_HOLD_STEPS, max(every, interval, 1)))


def _wandb_logger(trainer: pl.Trainer) -> Any | None:
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - lightning always ships the class
        return None
    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


def _safe(fn: Any) -> Any:
    """Rank zero only, and a failing logger becomes a log line instead of an exception."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # a dashboard must never stop training
            log.warning("lightning-debug could not log (%s: %s)", type(err).__name__, err)
            return None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return rank_zero_only(wrapper)


class Sink:
    """Logging for one trainer. Cheap to build and stateless (the alert budget lives on the W&B logger)."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer

    @property
    def has_wandb(self) -> bool:
        """A ``WandbLogger`` is attached: native charts, tables and summaries will reach W&B."""
        return _wandb_logger(self.trainer) is not None

    @property
    def _wandb_run(self) -> Any | None:
        lg = _wandb_logger(self.trainer)
        return None if lg is None else lg.experiment

    @property
    def directory(self) -> Path:
        return output_dir(self.trainer)

    @_safe
    def log_scalars(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Plain floats only: callers pull tensors to the host once, before calling.

        Scalars are held back by step and sent, one call per step and logger in step order, once a step
        :func:`hold_steps` later arrives, or at :meth:`flush` (the debug callbacks' ``teardown`` /
        ``on_exception``). So the points several callbacks log at one step (the end of a validation, a loss and
        a health check on the same step) and a late point of that step (a weight norm sampled mid-epoch, logged
        at the validation) share one call: each W&B ``log`` call costs ~1 ms and writes a history row of its
        own, a few percent of a small model's epoch."""
        step = self.trainer.global_step if step is None else step
        pending: dict[int, dict[str, float]] | None = getattr(self.trainer, _PENDING, None)
        if pending is None:
            pending = {}
            setattr(self.trainer, _PENDING, pending)
        pending.setdefault(step, {}).update(metrics)
        hold = hold_steps(self.trainer)
        self._send(pending, [s for s in pending if s + hold <= step])

    @_safe
    def flush(self) -> None:
        """Send the scalars :meth:`log_scalars` holds back."""
        pending = getattr(self.trainer, _PENDING, None)
        if pending:
            self._send(pending, list(pending))

    def _send(self, pending: dict[int, dict[str, float]], steps: list[int]) -> None:
        for step in sorted(steps):
            metrics = pending.pop(step)
            for lg in self.trainer.loggers:
                lg.log_metrics(metrics, step=step)

    @_safe
    def define_metric(self, key: str, *, summary: str | None = None, step_metric: str | None = None) -> None:
        """W&B metric definition (``summary`` like ``"min,max"``); a no-op for other loggers."""
        run = self._wandb_run
        if run is None:
            return
        kwargs: dict[str, Any] = {"summary": summary} if summary else {}
        if step_metric:
            kwargs.update(step_metric=step_metric, step_sync=True)
        run.define_metric(key, **kwargs)

    @_safe
    def set_summary(self, items: Mapping[str, Any]) -> None:
        run = self._wandb_run
        if run is not None:
            for k, v in items.items():
                run.summary[k] = v

    @_safe
    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A ``wandb.Table`` under ``key``; without W&B, a CSV file under the output directory."""
        run = self._wandb_run
        if run is not None:
            import wandb

            run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})
            return
        path = self._file_for(key, "csv")
        import csv

        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            writer.writerows(rows)

    @_safe
    def log_line_series(
        self,
        key: str,
        xs: Sequence[float] | Sequence[Sequence[float]],
        ys: Sequence[Sequence[float]],
        names: Sequence[str],
        *,
        title: str,
        x_name: str,
    ) -> None:
        """A native W&B line chart of several series (``xs`` shared, or one list per series); dropped
        without W&B (a figure covers that case)."""
        run = self._wandb_run
        if run is None:
            return
        import wandb

        chart = wandb.plot.line_series(
            xs=[list(x) for x in xs] if xs and isinstance(xs[0], Sequence) else list(xs),  # type: ignore[arg-type]
            ys=[list(y) for y in ys],
            keys=list(names),
            title=title,
            xname=x_name,
        )
        run.log({key: chart})

    @_safe
    def log_bar(
        self, key: str, labels: Sequence[str], values: Sequence[float], *, label_name: str, value_name: str, title: str
    ) -> None:
        """A native W&B bar chart (a histogram when ``labels`` are bins); dropped without W&B."""
        run = self._wandb_run
        if run is None:
            return
        import wandb

        table = wandb.Table(
            columns=[label_name, value_name], data=[[lb, v] for lb, v in zip(labels, values, strict=True)]
        )
        run.log({key: wandb.plot.bar(table, label_name, value_name, title=title)})

    @_safe
    def log_figure(self, key: str, figure: Any | Callable[[], Any], *, with_wandb: bool = True) -> Path | None:
        """A matplotlib figure, or a function that draws one (called only here, so only when it is logged):
        to W&B as an image, else PNG on disk (+ TensorBoard when present). ``with_wandb=False``: W&B gets
        native charts of the same data instead, so with W&B attached nothing is drawn. Without matplotlib
        installed (the ``plots`` extra), nothing is drawn either."""
        if not with_wandb and self.has_wandb:
            return None
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        if callable(figure):
            figure = figure()
        try:
            run = self._wandb_run
            if run is not None:
                import wandb

                run.log({key: wandb.Image(figure)})
                return None
            path = self._file_for(key, "png", step=self.trainer.global_step)
            figure.savefig(path, dpi=100, bbox_inches="tight")
            for lg in self.trainer.loggers:
                if isinstance(lg, TensorBoardLogger):
                    lg.experiment.add_figure(key, figure, global_step=self.trainer.global_step, close=False)
            return path
        finally:
            plt.close(figure)

    @_safe
    def alert(self, title: str, text: str, level: str = "ERROR") -> None:
        """A W&B alert (Slack/e-mail once synced); rate limited per run."""
        lg = _wandb_logger(self.trainer)
        if lg is None:
            return
        sent = getattr(lg, _ALERTS_SENT, 0)
        if sent >= ALERT_LIMIT:
            return
        lg.experiment.alert(title=title[:63], text=text, level=level, wait_duration=ALERT_WAIT)
        setattr(lg, _ALERTS_SENT, sent + 1)

    def _file_for(self, key: str, ext: str, step: int | None = None) -> Path:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", key.replace("debug/", "", 1))
        if step is not None:
            name = f"{name}_step{step}"
        directory = self.directory
        os.makedirs(directory, exist_ok=True)
        return directory / f"{name}.{ext}"

    @_safe
    def log_heatmap(
        self, key: str, panels: Mapping[str, Any], row_labels: Sequence[str], column_labels: Sequence[int]
    ) -> None:
        """One image of stacked heat maps (title -> (rows, columns) array, NaN blank) over the same rows and
        columns, e.g. a value per layer over training steps: to W&B as pixels (no figure drawn: W&B has the values
        in a table), else a labelled figure as PNG (through :meth:`log_figure`)."""
        run = self._wandb_run
        if run is not None:
            import wandb

            from lightning_debug.media import heatmap_pixels

            caption = (
                f"{' / '.join(panels)}; rows (top down): {', '.join(row_labels)}; "
                f"columns: steps {column_labels[0]}-{column_labels[-1]}"
            )
            run.log({key: wandb.Image(heatmap_pixels(dict(panels)), caption=caption)})
            return
        import matplotlib.pyplot as plt
        import numpy as np

        n = len(panels)
        fig, axes = plt.subplots(n, 1, figsize=(8, 0.25 * len(row_labels) * n + 1.5 * n), squeeze=False)
        for ax, (title, values) in zip(axes[:, 0], panels.items(), strict=True):
            arr = np.ma.masked_invalid(np.asarray(values, dtype=float))
            image = ax.imshow(arr, aspect="auto", interpolation="nearest", cmap="viridis")
            ax.set_yticks(range(len(row_labels)), labels=list(row_labels), fontsize=7)
            ticks = np.linspace(0, len(column_labels) - 1, min(8, len(column_labels))).astype(int)
            ax.set_xticks(ticks, labels=[str(column_labels[i]) for i in ticks], fontsize=7)
            ax.set_xlabel("step")
            ax.set_title(title, fontsize=9)
            fig.colorbar(image, ax=ax)
        fig.tight_layout()
        self.log_figure(key, fig)

    # -- error analysis (ErrorAnalysis) ---------------------------------------------------------------------------
    @_safe
    def log_frame(self, key: str, file: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path | None:
        """A table of rows: a ``wandb.Table`` under ``key`` with W&B, else ``<directory>/<file>.parquet`` (CSV
        when pyarrow is missing), loadable with ``pandas.read_parquet`` / ``read_csv``. Returns the file."""
        if self.has_wandb:
            self.log_table(key, columns, rows)
            return None
        path = self.directory / file
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_rows(path, columns, rows)

    def log_interval_bars(
        self,
        key: str,
        labels: Sequence[str],
        values: Sequence[float],
        intervals: Sequence[tuple[float, float]],
        title: str,
    ) -> Path | None:
        """Accuracy per label with its interval: a native W&B bar chart, else a PNG through :meth:`log_figure`
        (drawn only then). Returns the PNG path when one was written."""
        self.log_bar(key, labels, values, label_name="slice", value_name="accuracy", title=title)
        return self.log_figure(key, lambda: bar_figure(labels, values, intervals, title), with_wandb=False)


def write_rows(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """``path`` with suffix ``.parquet`` through pyarrow, or ``.csv`` without it. A column holding several value
    types is written as text (parquet columns have one type)."""
    data: dict[str, list[Any]] = {c: [r[i] for r in rows] for i, c in enumerate(columns)}
    for c, values in data.items():
        if len({type(v) for v in values if v is not None}) > 1:
            data[c] = [None if v is None else str(v) for v in values]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        import csv

        path = path.with_suffix(".csv")
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            writer.writerows(zip(*data.values(), strict=True) if rows else [])
        return path
    path = path.with_suffix(".parquet")
    pq.write_table(pa.table(data), path)
    return path


def bar_figure(
    labels: Sequence[str], values: Sequence[float], errors: Sequence[tuple[float, float]], title: str
) -> Any:
    """Horizontal bars with interval whiskers, one per label (matplotlib imported here, never on import)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.3 * len(labels) + 1.2))
    y = list(range(len(labels)))
    lo = [max(0.0, v - e[0]) for v, e in zip(values, errors, strict=True)]
    hi = [max(0.0, e[1] - v) for v, e in zip(values, errors, strict=True)]
    ax.barh(y, values, xerr=[lo, hi], color="tab:blue", ecolor="black", capsize=2)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (95% interval)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
