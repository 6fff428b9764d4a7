"""lightning-debug: PyTorch Lightning callbacks that diagnose a training run and say what to try."""

from lightning_debug.base import DebugCallback
from lightning_debug.callbacks import (
    BatchConsistencyCheck,
    CalibrationMonitor,
    DecodingConsistencyCheck,
    ErrorAnalysis,
    GrokkingMonitor,
    LossConvergenceMonitor,
    LossMetricDivergence,
    MetricEarlyStopping,
    ModelHealthCheck,
    OverfitBatchCheck,
)
from lightning_debug.findings import CATALOGUE, CheckInfo, Finding, Severity
from lightning_debug.metrics import StreamingCalibration
from lightning_debug.report import DebugReport
from lightning_debug.suite import SUITE_COMPONENTS, debug_callbacks
from lightning_debug.workspace import wandb_workspace

__version__ = "0.1.0"

__all__ = [
    "CATALOGUE",
    "SUITE_COMPONENTS",
    "BatchConsistencyCheck",
    "CalibrationMonitor",
    "CheckInfo",
    "DebugCallback",
    "DebugReport",
    "DecodingConsistencyCheck",
    "ErrorAnalysis",
    "Finding",
    "GrokkingMonitor",
    "LossConvergenceMonitor",
    "LossMetricDivergence",
    "MetricEarlyStopping",
    "ModelHealthCheck",
    "OverfitBatchCheck",
    "Severity",
    "StreamingCalibration",
    "debug_callbacks",
    "wandb_workspace",
]
