"""The one place that talks to loggers.

Scalars go through ``trainer.loggers`` (CSV, TensorBoard, W&B alike). Rich media (tables, charts, figures,
alerts, summaries, metric definitions) go to W&B when a ``WandbLogger`` is attached; without one, figures
are written as PNG under ``<log_dir>/lightning_debug/`` and added to TensorBoard when that logger is present.
Every method is rank-zero only and swallows logger failures: a dashboard problem must never stop training.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger("lightning_debug")

ALERT_WAIT = timedelta(minutes=5)
ALERT_LIMIT = 10  # per run: an alert storm helps nobody
_ALERTS_SENT: Counter[str] = Counter()  # by W&B run id (a wandb Run accepts no new attributes)


def output_dir(trainer: pl.Trainer) -> Path:
    """``<log_dir>/lightning_debug``, resolved without the collective call in ``trainer.log_dir``."""
    base: str | None = None
    if trainer.loggers:
        first = trainer.loggers[0]
        base = first.log_dir if isinstance(first, (TensorBoardLogger, CSVLogger)) else first.save_dir
    return Path(base or trainer.default_root_dir) / "lightning_debug"


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
    """Logging for one trainer. Cheap to build and stateless (the alert budget is kept per W&B run id)."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer

    @property
    def wandb_run(self) -> Any | None:
        lg = _wandb_logger(self.trainer)
        return None if lg is None else lg.experiment

    @property
    def directory(self) -> Path:
        return output_dir(self.trainer)

    @_safe
    def log_scalars(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Plain floats only: callers pull tensors to the host once, before calling."""
        step = self.trainer.global_step if step is None else step
        for lg in self.trainer.loggers:
            lg.log_metrics(dict(metrics), step=step)

    @_safe
    def define_metric(self, key: str, *, summary: str | None = None, step_metric: str | None = None) -> None:
        """W&B metric definition (``summary`` like ``"min,max"``); a no-op for other loggers."""
        run = self.wandb_run
        if run is None:
            return
        kwargs: dict[str, Any] = {"summary": summary} if summary else {}
        if step_metric:
            kwargs.update(step_metric=step_metric, step_sync=True)
        run.define_metric(key, **kwargs)

    @_safe
    def set_summary(self, items: Mapping[str, Any]) -> None:
        run = self.wandb_run
        if run is not None:
            for k, v in items.items():
                run.summary[k] = v

    @_safe
    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A ``wandb.Table`` under ``key``; without W&B, a CSV file under the output directory."""
        run = self.wandb_run
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
    def log_chart(self, key: str, chart: Any) -> None:
        """A native W&B chart (``wandb.plot.*``); dropped without W&B (a figure covers that case)."""
        run = self.wandb_run
        if run is not None:
            run.log({key: chart})

    @_safe
    def log_figure(self, key: str, figure: Any) -> Path | None:
        """A matplotlib figure: to W&B as an image, else PNG on disk (+ TensorBoard when present)."""
        import matplotlib.pyplot as plt

        try:
            run = self.wandb_run
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
        run = self.wandb_run
        if run is None:
            return
        if _ALERTS_SENT[run.id] >= ALERT_LIMIT:
            return
        run.alert(title=title[:63], text=text, level=level, wait_duration=ALERT_WAIT)
        _ALERTS_SENT[run.id] += 1

    def _file_for(self, key: str, ext: str, step: int | None = None) -> Path:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", key.replace("debug/", "", 1))
        if step is not None:
            name = f"{name}_step{step}"
        directory = self.directory
        os.makedirs(directory, exist_ok=True)
        return directory / f"{name}.{ext}"

    # -- error analysis (ErrorAnalysis) ---------------------------------------------------------------------------
    @_safe
    def log_frame(self, key: str, file: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path | None:
        """A table of rows: a ``wandb.Table`` under ``key`` with W&B, else ``<directory>/<file>.parquet`` (CSV
        when pyarrow is missing), loadable with ``pandas.read_parquet`` / ``read_csv``. Returns the file."""
        if self.wandb_run is not None:
            self.log_table(key, columns, rows)
            return None
        path = self.directory / file
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_rows(path, columns, rows)

    @_safe
    def log_bars(
        self,
        key: str,
        labels: Sequence[str],
        values: Sequence[float],
        errors: Sequence[tuple[float, float]],
        title: str,
    ) -> Path | None:
        """A bar chart (e.g. accuracy per slice with its interval): a native W&B bar chart, else a PNG figure
        through :meth:`log_figure`. Returns the PNG path when one was written."""
        run = self.wandb_run
        if run is not None:
            import wandb

            table = wandb.Table(
                columns=["label", "value"], data=[[lb, v] for lb, v in zip(labels, values, strict=True)]
            )
            run.log({key: wandb.plot.bar(table, "label", "value", title=title)})
            return None
        try:
            import matplotlib  # noqa: F401  (the `plots` extra)
        except ImportError:
            return None
        return self.log_figure(key, bar_figure(labels, values, errors, title))


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
