"""CalibrationMonitor and StreamingCalibration: exact against torchmetrics, bounded memory, real models.

The end-to-end tests read the offline W&B run file back, so they check what a user would see in W&B.
"""

import io
import math

import lightning.pytorch as pl
import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError
from torchmetrics.functional.classification import binary_calibration_error

from lightning_debug.callbacks.calibration import CalibrationMonitor
from lightning_debug.metrics import HeldPredictions, LogitSample, StreamingCalibration, fit_temperature
from lightning_debug.signals import find_predictions

from models import DigitsMLP, SmoothedDigitsMLP, loaders, make_trainer
from wandb_reader import read_offline_run


def _logits(n, classes=10, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, classes, generator=g) * scale
    # a model that is right ~60% of the time, so bins hold both correct and wrong predictions
    y = torch.where(torch.rand(n, generator=g) < 0.6, x.argmax(-1), torch.randint(0, classes, (n,), generator=g))
    return x, y


@pytest.mark.parametrize("norm,key", [("l1", "ece"), ("max", "mce"), ("l2", "rms_ce")])
def test_matches_torchmetrics_multiclass_streamed_in_chunks(norm, key):
    x, y = _logits(20_000)
    ours = StreamingCalibration(n_bins=15)
    for chunk in range(0, len(x), 1000):
        ours.update(x[chunk : chunk + 1000], y[chunk : chunk + 1000])
    reference = MulticlassCalibrationError(num_classes=10, n_bins=15, norm=norm)
    reference.update(x, y)
    got, want = float(ours.compute()[key]), float(reference.compute())
    # torchmetrics averages each bin in float32; ours sums in float64. 1e-6 absolute plus 1e-6 relative.
    assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6), f"{key}: ours {got!r} vs torchmetrics {want!r}"


def test_held_predictions_give_the_per_batch_updates_numbers():
    """Batches of an LM-shaped (N, T, C), a binary and a multiclass task, a format change, a flush at
    ``max_elements`` and a shape mismatch passed on at once: the consumer sees the same rows, in order, as it
    would batch by batch (float64 sums: the statistics agree to 1e-12)."""
    seen = []
    held = HeldPredictions(lambda scores, target, fmt: seen.append((scores, target, fmt)), max_elements=5000)
    direct = {f: StreamingCalibration(input_format=f) for f in ("logits", "probs")}
    together = {f: StreamingCalibration(input_format=f) for f in ("logits", "probs")}
    batches = []
    for i in range(6):
        x, y = _logits(64 * 3, seed=10 + i)
        batches.append((x.reshape(64, 3, 10), y.reshape(64, 3), "logits"))
    x, y = _logits(100, seed=20)
    batches.append((x.softmax(-1), y, "probs"))
    batches.append((torch.randn(50), torch.randint(0, 2, (50,)), "logits"))
    for scores, target, fmt in batches:
        direct[fmt].update(scores, target)
        held.add(scores, target, fmt)
    held.add(torch.randn(4, 10), torch.randint(0, 10, (4, 2)), "logits")  # mismatch: passed on as it is
    assert seen[-1][0].shape == (4, 10) and held.parts == []
    held.flush()
    assert len(seen) == 5, [s[0].shape for s in seen]  # 5000 scores, then the format, the width, the mismatch
    for scores, target, fmt in seen[:-1]:
        together[fmt].update(scores, target)
    for fmt in direct:
        a, b = direct[fmt].compute(), together[fmt].compute()
        for key in ("ece", "adaptive_ece", "nll", "brier", "gap_se", "count"):
            assert math.isclose(float(a[key]), float(b[key]), rel_tol=1e-12, abs_tol=1e-15), (fmt, key, a[key], b[key])


def test_ignore_index_matches_torchmetrics_on_the_kept_rows():
    x, y = _logits(3000, seed=1)
    y_ignored = y.clone()
    y_ignored[::3] = -100
    ours = StreamingCalibration(ignore_index=-100)
    ours.update(x, y_ignored)
    reference = MulticlassCalibrationError(num_classes=10, n_bins=15)
    keep = y_ignored != -100
    reference.update(x[keep], y[keep])
    out = ours.compute()
    assert out["count"] == int(keep.sum()), f"counted {out['count']} rows, {int(keep.sum())} not ignored"
    assert math.isclose(float(out["ece"]), float(reference.compute()), abs_tol=1e-6)


def test_confidence_exactly_one_goes_to_the_last_bin_where_torchmetrics_misbins_it():
    # torchmetrics issue #3510: bucketize(right=True) - 1 sends a confidence of 1.0 to a phantom bin.
    probs = torch.tensor([0.95, 1.0])
    target = torch.tensor([1, 0])
    torchmetrics_value = float(binary_calibration_error(probs, target, n_bins=10))
    assert math.isclose(torchmetrics_value, 0.525, abs_tol=1e-6), "torchmetrics no longer misbins 1.0: re-check"
    ours = StreamingCalibration(n_bins=10, input_format="probs")
    ours.update(torch.stack([1 - probs, probs], dim=1), target)  # top-label: the same two predictions
    # correct answer: both in bin [0.9, 1.0], mean confidence 0.975, accuracy 0.5 -> |0.5 - 0.975| = 0.475
    assert math.isclose(float(ours.compute()["ece"]), 0.475, abs_tol=1e-7)  # 0.95 in float32


def test_binary_scores_match_the_two_class_top_label_metric():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(5000, generator=g) * 4
    y = (torch.rand(5000, generator=g) < torch.sigmoid(z / 2)).long()  # overconfident logits
    ours = StreamingCalibration()
    ours.update(z, y)
    reference = MulticlassCalibrationError(num_classes=2, n_bins=15)
    reference.update(torch.stack([torch.zeros_like(z), z], dim=1), y)
    out = ours.compute()
    assert math.isclose(float(out["ece"]), float(reference.compute()), rel_tol=1e-6, abs_tol=1e-6)
    assert float(out["gap"]) > 0.05, f"logits twice too sharp should be overconfident, gap {float(out['gap'])}"
    assert 1.6 < fit_temperature(z, y) < 2.4, "the generating temperature is 2"


def test_brier_and_nll_are_the_textbook_definitions():
    x, y = _logits(500, classes=4)
    ours = StreamingCalibration()
    ours.update(x, y)
    p = x.softmax(-1)
    brier = ((p - torch.nn.functional.one_hot(y, 4)) ** 2).sum(-1).mean()
    nll = torch.nn.functional.cross_entropy(x, y)
    out = ours.compute()
    assert math.isclose(float(out["brier"]), float(brier), rel_tol=1e-5)
    assert math.isclose(float(out["nll"]), float(nll), rel_tol=1e-5)


def test_adaptive_ece_is_close_to_exact_equal_mass_bins():
    x, y = _logits(20_000, scale=2.0, seed=3)
    ours = StreamingCalibration(n_bins=15)
    ours.update(x, y)
    conf, pred = x.softmax(-1).max(-1)
    order = conf.argsort()
    exact = sum(
        abs(float((pred[idx] == y[idx]).float().sum() - conf[idx].sum())) for idx in order.tensor_split(15)
    ) / len(x)
    got = float(ours.compute()["adaptive_ece"])
    # bin edges quantised to 1/1000 in confidence: a few hundredths of a bin's mass move between neighbours
    assert abs(got - exact) < 0.005, f"adaptive ECE {got:.4f} vs exact equal-mass {exact:.4f}"


def test_state_after_a_million_predictions_is_the_size_of_the_state_after_a_thousand():
    def state_bytes(metric):
        return sum(v.numel() * v.element_size() for v in metric.metric_state.values())

    small, large = StreamingCalibration(), StreamingCalibration()
    x, y = _logits(10_000)
    small.update(x[:1000], y[:1000])
    for _ in range(100):  # 10^6 predictions
        large.update(x, y)
    assert large.compute()["count"] == 1_000_000
    assert state_bytes(large) == state_bytes(small), f"state grew: {state_bytes(small)} -> {state_bytes(large)}"
    assert state_bytes(large) < 30_000, "O(bins) state: 3 x (15 + 1000) float64 + scalars"


def test_the_temperature_sample_keeps_copies_and_weighs_its_rows_only_when_fitted():
    """Rows are kept as added (two copies) and weighed at the fit: NaN scores, targets outside the classes and
    ``ignore_index`` get weight 0; probabilities are kept as logits (binary: log(p/(1-p))); later edits of the
    caller's tensor do not reach the sample. The fitted temperature is the one fitted on the valid rows alone
    (to the fit's 1e-3 on log T)."""
    x, y = _logits(600, scale=4.0, seed=5)
    y[:10], y[10:15], x[15:20, 2] = -100, 10, float("nan")
    sample = LogitSample(rows=500, ignore_index=-100)
    scores = x.clone()
    sample.add(scores[:300], y[:300])
    sample.add(scores[300:], y[300:])
    scores.zero_()  # the caller's tensor changes after the evaluation
    want = fit_temperature(x[20:500], y[20:500])
    assert math.isclose(sample.temperature(), want, rel_tol=2e-3), (sample.temperature(), want)
    probs = LogitSample(rows=500, ignore_index=-100)
    probs.add(x.softmax(-1), y, probs=True)
    assert math.isclose(probs.temperature(), want, rel_tol=2e-3), "log-probabilities are logits up to a row constant"
    g = torch.Generator().manual_seed(6)
    z = torch.randn(600, generator=g) * 3  # binary: class-1 logits twice too sharp, and their probabilities
    label = (torch.rand(600, generator=g) < torch.sigmoid(z / 2)).long()
    binary_logits, binary_probs = LogitSample(rows=600, ignore_index=None), LogitSample(rows=600, ignore_index=None)
    binary_logits.add(z, label)
    binary_probs.add(torch.sigmoid(z), label, probs=True)
    assert math.isclose(binary_probs.temperature(), binary_logits.temperature(), rel_tol=2e-3), "p -> log(p/(1-p))"


def test_nonfinite_scores_are_counted_and_left_out():
    x, y = _logits(100)
    x[:7, 3] = float("nan")
    x[7:9, 0] = float("inf")
    ours = StreamingCalibration()
    ours.update(x, y)
    clean = StreamingCalibration()
    clean.update(x[9:], y[9:])
    out, want = ours.compute(), clean.compute()
    assert float(out["nonfinite"]) == 9 and float(out["count"]) == 91
    assert all(math.isfinite(float(out[k])) for k in ("ece", "nll", "brier", "adaptive_ece"))
    assert math.isclose(float(out["ece"]), float(want["ece"]), abs_tol=1e-12)


def test_targets_that_are_not_a_class_are_counted_and_left_out():
    x, y = _logits(100)
    y[:5], y[5:8] = -1, 10  # a padding label other than ignore_index, and one class too many
    ours = StreamingCalibration(ignore_index=-100)
    ours.update(x, y)
    clean = StreamingCalibration()
    clean.update(x[8:], y[8:])
    out, want = ours.compute(), clean.compute()
    assert float(out["out_of_range"]) == 8 and float(out["count"]) == 92, (out["out_of_range"], out["count"])
    assert math.isclose(float(out["ece"]), float(want["ece"]), abs_tol=1e-12)


class PaddedTargetsMLP(DigitsMLP):
    """Validation targets padded with -1 where the monitor expects -100: they must be reported, not hidden."""

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        out["target"] = torch.cat([out["target"][:-4], torch.full((4,), -1)])
        return out


def test_monitor_reports_targets_it_left_out(tmp_path):
    train, val = loaders(batch_size=32)
    monitor = CalibrationMonitor(plot_every_n_epochs=0)
    make_trainer(tmp_path, [monitor], max_epochs=1).fit(PaddedTargetsMLP(), train, val)
    (finding,) = [f for f in monitor.findings if f.data.get("out_of_range")]
    assert finding.check == "check.skipped" and "ignore_index" in finding.message, finding.message
    assert finding.data["out_of_range"] == 4 * len(val), finding.data
    assert len(monitor.history) == 1, "the other predictions are still measured"


def test_find_predictions_reads_dicts_hf_outputs_and_xy_batches():
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert find_predictions({"logits": logits, "target": y}, None)[1] is y
    assert find_predictions({"probs": logits.softmax(-1)}, (torch.zeros(4, 2), y))[2] == "probs"
    assert find_predictions({"logits": logits}, {"labels": y})[1] is y
    assert isinstance(find_predictions(torch.tensor(0.3), (torch.zeros(4, 2), y)), str)


def test_arguments_are_validated():
    bad = ({"ece_threshold": 0.0}, {"patience": 0}, {"min_samples": 0}, {"temperature_samples": -1})
    bad += ({"chart_budget": 0},)
    for kwargs in bad:
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            CalibrationMonitor(**kwargs)
    with pytest.raises(ValueError, match="n_bins"):
        StreamingCalibration(n_bins=0)


# -- real models ---------------------------------------------------------------------------------------------


def test_memorising_noisy_labels_is_overconfident_in_wandb(tmp_path, wandb_logger):
    train, val = loaders(batch_size=8, label_noise=0.15, n_train=200, n_val=400)
    monitor = CalibrationMonitor(plot_every_n_epochs=4)
    trainer = make_trainer(tmp_path, [monitor], logger=wandb_logger, max_epochs=16)
    trainer.fit(DigitsMLP(hidden=(512, 512), lr=2e-3), train, val)
    import wandb

    wandb.finish()
    run = read_offline_run(tmp_path)

    (finding,) = [f for f in monitor.findings if f.check.startswith("calibration.")]
    assert finding.check == "calibration.overconfident", [f.message for f in monitor.findings]
    assert finding.data["ece"] >= 0.1 and finding.data["gap"] > 0 and finding.data["temperature"] > 1
    ece = run.series("debug/calibration/ece")
    temperature = run.series("debug/calibration/temperature")
    assert len(ece) == 16, f"one ECE per validation epoch, got {len(ece)}"
    assert ece[-1] > 0.1 and temperature[-1] > 1.5, f"final ECE {ece[-1]:.3f}, temperature {temperature[-1]:.2f}"
    assert temperature[-1] > temperature[3], "growing overconfidence shows as a rising fitted temperature"
    assert run.summary["debug/calibration/ece"]["max"] >= ece[-1]
    table = run.table("debug/calibration/reliability")
    assert table["columns"] == ["bin_low", "bin_high", "confidence", "accuracy", "gap", "count"]
    assert sum(row[5] for row in table["data"]) == 400, "every validation prediction is in one bin"
    top = table["data"][-1]
    assert top[0] >= 0.9 and top[4] > 0, f"the top bin is overconfident: {top}"
    assert not run.series("debug/calibration/reliability_figure"), "W&B gets native charts, no matplotlib figure"
    charts = run.config["_wandb"]["visualize"]
    for key in ("reliability_diagram", "confidence_histogram"):  # native charts: a table + a Vega panel config
        assert charts[f"debug/calibration/{key}"]["panel_type"] == "Vega2", sorted(charts)
        assert len(run.series(f"debug/calibration/{key}_table")) == 4, f"{key} every 4 epochs"
    diagram = run.table("debug/calibration/reliability_diagram_table")
    accuracy = [row for row in diagram["data"] if row[diagram["columns"].index("lineKey")] == "accuracy"]
    assert len(accuracy) == len(table["data"]), "one accuracy point per non-empty bin"


def test_healthy_model_is_not_called_miscalibrated(tmp_path):
    train, val = loaders(batch_size=32)
    monitor = CalibrationMonitor(plot_every_n_epochs=0)
    make_trainer(tmp_path, [monitor], max_epochs=5).fit(DigitsMLP(), train, val)
    assert len(monitor.history) == 5
    assert not monitor.findings, [f.message for f in monitor.findings]
    first, last = monitor.history[0], monitor.history[-1]
    assert last["ece"] < 0.1 and last["accuracy"] > 0.9, last
    # the first epoch is underconfident (accuracy rises before confidence): not a finding mid-fit
    assert first["gap"] < 0, first


def test_label_smoothing_is_not_called_underconfident(tmp_path):
    """Label smoothing 0.1 over 10 classes trains confidence to at most 0.91 by design: a model at ~0.97 accuracy
    is underconfident, which the monitor says (info, naming the cap) but does not warn about."""
    train, val = loaders(batch_size=32)
    monitor = CalibrationMonitor(plot_every_n_epochs=0)
    make_trainer(tmp_path, [monitor], max_epochs=8).fit(SmoothedDigitsMLP(), train, val)
    last = monitor.history[-1]
    assert last["accuracy"] > 0.9 and last["gap"] < -0.03 and last["ece"] >= 0.05, last
    (f,) = monitor.findings
    assert f.check == "calibration.underconfident" and f.severity.value == "info", f
    assert "label smoothing trains confidence to at most 0.910" in f.message, f.message


def test_no_wandb_writes_reliability_png_and_csv(tmp_path):
    train, val = loaders(batch_size=64, n_train=256, n_val=256)
    make_trainer(tmp_path, [CalibrationMonitor()], max_epochs=1).fit(DigitsMLP(), train, val)
    out = tmp_path / "csv" / "version_0" / "lightning_debug"
    assert [p.name for p in out.glob("*.png")] == ["calibration_reliability_figure_step4.png"]
    assert (out / "calibration_reliability.csv").exists()


class TinyGPT2(pl.LightningModule):
    """A 2-layer GPT-2 from config (no download) learning sequences that count up mod the vocabulary."""

    def __init__(self, vocab=16):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.model = GPT2LMHeadModel(
            GPT2Config(vocab_size=vocab, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
        )

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        return self.model(**batch)  # CausalLMOutput with .logits; labels come from the batch

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def _lm_batches(n, length=12, vocab=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    ids = (start + torch.arange(length)) % vocab
    labels = ids.clone()
    labels[:, -3:] = -100  # padding at the end of every sequence
    batches = [{"input_ids": ids[i : i + 8], "labels": labels[i : i + 8]} for i in range(0, n, 8)]
    return torch.utils.data.DataLoader(batches, batch_size=None)


def test_tiny_gpt2_gets_token_level_calibration_with_label_shift(tmp_path, wandb_logger):
    torch.manual_seed(0)
    model = TinyGPT2()
    val = _lm_batches(32, seed=1)
    monitor = CalibrationMonitor(min_samples=1)
    trainer = make_trainer(tmp_path, [monitor], logger=wandb_logger, max_epochs=3)
    trainer.fit(model, _lm_batches(64), val)
    import wandb

    wandb.finish()
    run = read_offline_run(tmp_path)
    # 32 sequences of 12 tokens, the last 3 labels padded; shifted: position t predicts label t+1 -> 8 each
    assert monitor.history[-1]["count"] == 32 * 8
    model.eval()
    expected = StreamingCalibration(ignore_index=-100)
    with torch.no_grad():
        for batch in val:
            expected.update(model.model(**batch).logits[:, :-1], batch["labels"][:, 1:])
    want = expected.compute()
    assert math.isclose(monitor.history[-1]["ece"], float(want["ece"]), abs_tol=1e-6)
    accuracy = run.series("debug/calibration/accuracy")
    assert len(accuracy) == 3 and accuracy[-1] > accuracy[0], f"the LM learns to count: {accuracy}"
    assert all(0 <= e <= 1 for e in run.series("debug/calibration/ece"))
    assert run.table("debug/calibration/reliability")["data"], "a token-level reliability table"


def test_state_dict_loads_with_weights_only(tmp_path):
    train, val = loaders(batch_size=64, n_train=256, n_val=256)
    monitor = CalibrationMonitor(plot_every_n_epochs=0)
    make_trainer(tmp_path, [monitor], max_epochs=2).fit(DigitsMLP(), train, val)
    buf = io.BytesIO()
    torch.save(monitor.state_dict(), buf)
    buf.seek(0)
    restored = CalibrationMonitor()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.history == monitor.history and len(restored.history) == 2


def test_default_charts_at_evaluations_1_2_4_and_the_last_with_temperature_only_where_it_matters(
    tmp_path, wandb_logger
):
    """The reliability charts' cost grows with the log of the run's length: 7 evaluations give 4 tables (1, 2,
    4 and 7 at the end of fit); the temperature is fitted with them and where a verdict needs it. (Without the
    time budget, which on this 1-second run affords only the last: the next test.)"""
    train, val = loaders(n_train=256, n_val=256)
    monitor = CalibrationMonitor(chart_budget=None)
    make_trainer(tmp_path, [monitor], logger=wandb_logger, max_epochs=7).fit(DigitsMLP(), train, val)
    import wandb

    wandb.finish()
    run = read_offline_run(tmp_path)
    assert len(run.series("debug/calibration/ece")) == 7
    assert len(run.series("debug/calibration/reliability_diagram_table")) == 4
    fitted = [h["epoch"] for h in monitor.history if "temperature" in h]
    assert {0.0, 1.0, 3.0} <= set(fitted), fitted


def test_default_charts_keep_within_their_time_budget_and_the_last_is_always_logged(tmp_path, wandb_logger):
    """A 7-epoch run of ~0.1 s epochs: the 1st, 2nd and 4th evaluations' charts (~20 ms each) would be several
    percent of it, beyond 2% of the time so far; the last evaluation's are logged at the end of fit."""
    train, val = loaders(n_train=256, n_val=256)
    monitor = CalibrationMonitor()
    make_trainer(tmp_path, [monitor], logger=wandb_logger, max_epochs=7).fit(DigitsMLP(), train, val)
    import wandb

    wandb.finish()
    run = read_offline_run(tmp_path)
    assert len(run.series("debug/calibration/ece")) == 7
    charts = run.series("debug/calibration/reliability_diagram_table")
    assert len(charts) == 1, f"only the last evaluation's charts, got {len(charts)}"
    assert monitor._charts[0] == 1
