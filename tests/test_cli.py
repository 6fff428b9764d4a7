"""The stop-criteria YAML parses into the right callbacks and runs under LightningCLI (jsonargparse)."""

import sys
from pathlib import Path

import pytest

from lightning_debug import DebugReport
from lightning_debug.callbacks.divergence import LossMetricDivergence
from lightning_debug.callbacks.early_stopping import MetricEarlyStopping

pytest.importorskip("jsonargparse")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from cli import main  # noqa: E402

CONFIG = str(ROOT / "examples" / "configs" / "stop_criteria.yaml")


def test_stop_criteria_config_parses_into_configured_callbacks(tmp_path):
    cli = main(["--config", CONFIG, f"--trainer.default_root_dir={tmp_path}"], run=False)
    callbacks = {type(cb): cb for cb in cli.trainer.callbacks}
    es = callbacks[MetricEarlyStopping]
    assert (es.monitor, es.mode, es.patience, es.smoothing, es.warmup) == ("val_acc", "max", 8, "median", 5)
    assert es.restore_best_weights and es.grokking_guard and es.stop_on == ["loss.nonfinite", "loss.diverging"]
    div = callbacks[LossMetricDivergence]
    assert (div.metric, div.train_loss, div.window) == ("val_acc", "train_loss", 15)
    assert DebugReport in callbacks
    assert cli.model.hparams["hidden"] == [512, 512] or tuple(cli.model.hparams["hidden"]) == (512, 512)


def test_stop_criteria_config_runs(tmp_path):
    cli = main(
        [
            "fit",
            "--config",
            CONFIG,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=3",
            "--trainer.logger=false",
        ]
    )
    es = next(cb for cb in cli.trainer.callbacks if isinstance(cb, MetricEarlyStopping))
    assert cli.trainer.current_epoch == 3 and es.judged == 3 and es.best_step > 0


def test_bad_init_args_fail_before_training_naming_the_argument():
    with pytest.raises(ValueError, match="min_delta_mode"):
        main(
            [
                "--config",
                CONFIG,
                "--trainer.callbacks+=MetricEarlyStopping",
                "--trainer.callbacks.monitor=x",
                "--trainer.callbacks.min_delta_mode=relative",
            ],
            run=False,
        )
