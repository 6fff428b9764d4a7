"""One module per concern, one callback class each."""

from lightning_debug.callbacks.batch_consistency import BatchConsistencyCheck
from lightning_debug.callbacks.calibration import CalibrationMonitor
from lightning_debug.callbacks.decoding import DecodingConsistencyCheck
from lightning_debug.callbacks.divergence import LossMetricDivergence
from lightning_debug.callbacks.early_stopping import MetricEarlyStopping
from lightning_debug.callbacks.errors import ErrorAnalysis
from lightning_debug.callbacks.grokking import GrokkingMonitor
from lightning_debug.callbacks.health import ModelHealthCheck
from lightning_debug.callbacks.loss import LossConvergenceMonitor
from lightning_debug.callbacks.overfit import OverfitBatchCheck

__all__ = [
    "BatchConsistencyCheck",
    "CalibrationMonitor",
    "DecodingConsistencyCheck",
    "ErrorAnalysis",
    "GrokkingMonitor",
    "LossConvergenceMonitor",
    "LossMetricDivergence",
    "MetricEarlyStopping",
    "ModelHealthCheck",
    "OverfitBatchCheck",
]
