"""DebugReport: report.json at the end of fit and on an exception; the console table."""

import json

import pytest
from lightning.pytorch.callbacks import Callback

from lightning_debug import DebugCallback, DebugReport
from lightning_debug.report import format_table

from models import DigitsMLP, loaders, make_trainer


class Flags(DebugCallback):
    def on_train_epoch_end(self, trainer, pl_module):
        self.emit(trainer, "loss.plateau", "flat at 2.30 (floor 0)", data={"level": 2.3})
        self.emit(trainer, "loss.nonfinite", "loss is NaN at step 7", key="nan")


class Crash(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            raise RuntimeError("user code exploded")


def _read(tmp_path):
    (path,) = tmp_path.rglob("lightning_debug/report.json")
    return json.loads(path.read_text())


def test_report_json_written_at_fit_end(tmp_path, capsys):
    train, _ = loaders(n_train=128)
    make_trainer(tmp_path, [Flags(), DebugReport()], max_epochs=2).fit(DigitsMLP(), train)
    report = _read(tmp_path)
    assert report["version"] == 1 and report["status"] == "finished"
    assert report["summary"] == {"loss.nonfinite": 1, "loss.plateau": 1}
    assert [f["check"] for f in report["findings"]] == ["loss.nonfinite", "loss.plateau"], "errors first"
    assert report["findings"][1]["count"] == 2
    out = capsys.readouterr().out
    assert "loss.nonfinite" in out and "loss.plateau" in out


def test_report_json_written_when_training_raises(tmp_path):
    train, _ = loaders(n_train=320)

    class Early(DebugCallback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 1:
                self.emit(trainer, "loss.diverging", "up 10x")

    with pytest.raises(RuntimeError, match="user code exploded"):
        make_trainer(tmp_path, [Early(), Crash(), DebugReport(print_table=False)], max_epochs=1).fit(DigitsMLP(), train)
    report = _read(tmp_path)
    assert report["status"].startswith("interrupted: RuntimeError: user code exploded")
    assert report["summary"] == {"loss.diverging": 1}


def test_plain_table_when_rich_is_missing():
    from lightning_debug import Finding

    text = format_table([Finding("loss.plateau", "warning", "flat at 2.30", step=40)])
    assert "WARNING" in text and "loss.plateau" in text and "flat at 2.30" in text
    assert format_table([]) == "lightning-debug: no findings."
