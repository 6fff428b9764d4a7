"""lightning-debug: PyTorch Lightning callbacks that diagnose a training run and say what to try."""

from lightning_debug.base import DebugCallback
from lightning_debug.findings import CATALOGUE, CheckInfo, Finding, Severity
from lightning_debug.report import DebugReport
from lightning_debug.suite import SUITE_COMPONENTS, debug_callbacks

__version__ = "0.1.0"

__all__ = [
    "CATALOGUE",
    "SUITE_COMPONENTS",
    "CheckInfo",
    "DebugCallback",
    "DebugReport",
    "Finding",
    "Severity",
    "debug_callbacks",
]
