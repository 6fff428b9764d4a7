"""A saved W&B workspace for lightning-debug runs, as code (``pip install wandb-workspaces``, optional).

``wandb_workspace(entity, project).save()`` creates a workspace view with one section per area: Convergence,
Divergence, Calibration, Grokking (log-x panels), Findings and Gradients. Building it needs no network;
``save()`` needs a W&B server and an API key.
"""

from __future__ import annotations

from typing import Any

from lightning_debug.callbacks.calibration import PREFIX as CALIBRATION
from lightning_debug.callbacks.grokking import PREFIX as GROKKING
from lightning_debug.callbacks.health import PREFIX as GRAD


def wandb_workspace(entity: str, project: str, name: str = "lightning-debug") -> Any:
    """The ``wandb_workspaces.workspaces.Workspace`` spec; call ``.save()`` on it to create the view. Over 50
    lines for a reason: the dashboard's declaration, one section per area, read top to bottom like the view."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as err:
        raise ImportError("wandb_workspace needs the optional `wandb-workspaces` package") from err

    def lines(title: str, keys: list[Any], **kwargs: Any) -> Any:
        return wr.LinePlot(title=title, x="trainer/global_step", y=keys, **kwargs)

    def grok(title: str, names: list[str], log_y: bool = False) -> Any:
        # a true log x axis on the trainer step; debug/grokking/log10_step is the no-setup alternative
        return wr.LinePlot(
            title=title, x="trainer/global_step", y=[GROKKING + n for n in names], log_x=True, log_y=log_y
        )

    sections = [
        ws.Section(
            name="Convergence",
            panels=[lines("Training loss checks", [], metric_regex="debug/loss/.*")],
            is_open=True,
        ),
        ws.Section(
            name="Divergence",
            panels=[lines("Loss-metric divergence", [], metric_regex="debug/divergence/.*")],
            is_open=True,
        ),
        ws.Section(
            name="Calibration",
            panels=[
                lines("Calibration error", [CALIBRATION + k for k in ("ece", "adaptive_ece", "mce")]),
                lines("Mean confidence - accuracy", [CALIBRATION + "gap"]),
                lines("Fitted temperature (> 1: overconfident)", [CALIBRATION + "temperature"]),
                lines("NLL and Brier", [CALIBRATION + "nll", CALIBRATION + "brier"]),
                wr.MediaBrowser(title="Reliability diagrams", media_keys=[CALIBRATION + "reliability_figure"]),
            ],
            is_open=True,
        ),
        ws.Section(
            name="Grokking",
            panels=[
                grok("Train vs dev accuracy (log step)", ["train_acc", "val_acc"]),
                grok("Train vs dev loss (log step)", ["train_loss", "val_loss"], log_y=True),
                grok("Global L2 weight norm (log step)", ["weight_norm"]),
                grok("Token vs exact-match accuracy (log step)", ["val_token_acc", "val_seq_acc"]),
            ],
            is_open=True,
        ),
        ws.Section(
            name="Findings",
            panels=[wr.WeavePanelSummaryTable(table_name="debug/findings/table")],
            is_open=True,
        ),
        ws.Section(
            name="Gradients",
            panels=[
                lines("Gradient norm per layer (before clipping)", [], metric_regex=GRAD + ".*/norm", log_y=True),
                lines(
                    "Update / weight per step, per layer (usual ~1e-3)",
                    [],
                    metric_regex=GRAD + ".*/update_ratio",
                    log_y=True,
                ),
                lines("Global gradient norm and clipping", [GRAD + "global_norm", GRAD + "clip_active"]),
                wr.MediaBrowser(title="Per-layer heat map over steps", media_keys=[GRAD + "heatmap"]),
                wr.WeavePanelSummaryTable(table_name=GRAD + "table"),
            ],
            is_open=True,
        ),
    ]
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections)
