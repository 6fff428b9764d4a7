"""Model-health rules without a Trainer: each verdict on hand-built evidence."""

from __future__ import annotations

import math

import numpy as np

from lightning_debug.rules import health as rules
from lightning_debug.rules import loss as rules_loss


def test_coverage_names_what_the_optimizer_misses_and_holds_unused():
    cov = rules.optimizer_coverage(
        {"net.0.weight": 640, "net.0.bias": 10, "head.weight": 100},
        {"net.0.weight": 640, "net.0.bias": 10, "aux.weight": 4096},
    )
    assert cov.not_in_optimizer == ("head.weight",) and cov.not_in_optimizer_elements == 100
    assert cov.unused == ("aux.weight",) and cov.unused_elements == 4096
    assert (cov.grad_tensors, cov.grad_tensors_in_optimizer) == (3, 2)
    assert rules.modules_of(["net.0.weight", "net.0.bias", "scale"]) == ["net.0", "scale"]


def test_init_loss_at_chance_is_fine_and_large_logits_are_off_with_the_scale_explaining_it():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 256)
    counts = np.bincount(labels, minlength=10)

    def ce(z: np.ndarray) -> float:
        lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        return float(np.mean(lse - z[np.arange(len(z)), labels]))

    small = rng.normal(0, 0.1, (256, 10))
    v = rules.init_loss(ce(small), small, counts)
    assert not v.off and abs(v.gap) < 0.05, v
    big = rng.normal(0, 8.0, (256, 10))
    v = rules.init_loss(ce(big), big, counts)
    assert v.off and v.gap > 5, v
    assert abs(v.scale_loss - v.loss) < 0.5 * v.gap, f"the scale should explain the gap: {v}"
    assert math.isclose(v.chance, math.log(10))


def test_init_loss_below_the_label_prior_is_off():
    counts = np.full(10, 10)
    z = np.zeros((100, 10))
    v = rules.init_loss(0.01, z, counts)  # an input-blind model cannot reach 0.01 on balanced labels
    assert v.off and math.isclose(v.prior_entropy, math.log(10))


def test_unit_health_splits_dead_relu_and_saturated_layers_worst_first():
    stats = [
        rules.UnitStats("net.1", "relu", 64, 64, 1.0),
        rules.UnitStats("net.3", "relu", 64, 3, 0.5),
        rules.UnitStats("rnn:tanh", "tanh", 32, 20, 0.8),
    ]
    v = rules.unit_health(stats)
    assert [s.layer for s in v.dead] == ["net.1"] and [s.layer for s in v.saturated] == ["rnn:tanh"]


def test_vanishing_fires_on_a_bottom_layer_orders_below_the_top_and_not_on_a_flat_profile():
    layers = ["l0", "l1", "l2"]
    falling = np.array([[10.0 ** (-3 - 0.1 * t), 1e-2, 1.0] for t in range(10)])
    v = rules.vanishing(falling, layers)
    assert v.fires and (v.bottom, v.top) == ("l0", "l2") and v.log10_ratio < -3
    assert not rules.vanishing(np.ones((10, 3)), layers).fires
    assert not rules.vanishing(falling[:3], layers).fires, "fewer than MIN_SAMPLES samples: no verdict"


def test_vanishing_leaves_out_sparse_embedding_gradients():
    """A BERT's word embeddings get gradient only in the rows of the batch's tokens: 10^-3.3 of the classifier's
    RMS over the whole table on a healthy tune-set run. The dense layer above them is the bottom that counts."""
    layers = ["embeddings", "encoder", "classifier"]
    rms = np.array([[10.0 ** (-3.3 - 0.05 * t), 0.3, 1.0] for t in range(10)])
    assert rules.vanishing(rms, layers).fires
    v = rules.vanishing(rms, layers, sparse=[True, False, False])
    assert not v.fires and v.bottom == "encoder", v


def test_vanishing_is_no_verdict_once_the_loss_has_covered_half_its_way_to_the_floor():
    """Healthy tiny BERTs of the detection benchmark that fit their task: the loss fell ~100x, every layer below
    the classifier is orders of magnitude smaller (embeddings.LayerNorm 10^-4.2 to 10^-4.4, measured): small
    gradients because little is left to learn. A loss still near its start keeps the verdict."""
    layers = ["embeddings.LayerNorm", "encoder.0.query", "pooler", "classifier"]
    rms = np.array([[10.0 ** (-6.5 - 0.05 * t), 1e-8, 1e-4, 1e-2] for t in range(10)])
    fitted = rules.vanishing(rms, layers, losses=np.full(10, 0.007), start_loss=0.69)
    assert not fitted.fires and fitted.learned and fitted.log10_ratio < -4, fitted
    stuck = rules.vanishing(rms, layers, losses=np.full(10, 0.68), start_loss=0.69)
    assert stuck.fires and not stuck.learned and stuck.bottom == "embeddings.LayerNorm"
    window = {"norm": rms, "ratio": np.full((10, 4), 1e-3), "clip": np.zeros(10), "lr": np.full(10, 1e-3)}
    run = {"total": np.ones(13), "loss": np.r_[[0.69] * 3, np.full(10, 0.007)]}
    v = rules.judge_gradients({**window, "loss": run["loss"][3:]}, run, layers, np.ones(4), [False] * 4, 1e-3, False)
    assert not v.vanishing.fires and v.vanishing.learned, "the run's first sampled losses are the start"


def test_vanishing_measures_the_fall_to_the_floor():
    """A label-smoothed tiny BERT of the tune set (0.1 over 2 classes, undeclared: floor 0.199) fitted its task at
    0.29 of its start and warned while the rule asked for a tenth. Half the way is enough, and a declared floor
    (10 classes at 0.3 smoothing: 1.18) counts the way from there."""
    layers = ["embeddings.LayerNorm", "classifier"]
    rms = np.array([[10.0 ** (-3.4 - 0.05 * t), 1.0] for t in range(10)])
    smoothed = rules.vanishing(rms, layers, losses=np.full(10, 0.2), start_loss=0.69)
    assert not smoothed.fires and smoothed.learned, smoothed
    ten_classes = {"losses": np.full(10, 1.3), "start_loss": 2.3}
    assert rules.vanishing(rms, layers, **ten_classes).fires, "1.3 of 2.3 is not half the way to 0"
    floor = rules_loss.label_smoothing_floor(10, 0.3)
    v = rules.vanishing(rms, layers, **ten_classes, floor=floor)
    assert not v.fires and v.learned, f"floor {floor:.3f}: {v}"


def test_exploding_needs_growth_and_a_loss_that_did_not_fall_and_fires_on_nonfinite():
    losses = np.full(12, 2.3)
    norms = np.array([1.0] * 6 + [1e4] * 6)
    assert rules.exploding(norms, losses).fires
    assert not rules.exploding(norms, np.linspace(2.3, 0.1, 12)).fires, "the loss fell: large but useful gradients"
    assert not rules.exploding(np.linspace(1, 5, 12), losses).fires
    assert rules.exploding(np.array([1.0, math.nan]), losses[:2]).nonfinite


def test_update_ratio_high_per_layer_low_only_at_a_steady_learning_rate():
    layers = ["a", "b"]
    high = np.tile([[1e-3, 1e-3]], (10, 1))
    high[0, 1] = 5.0  # one step rewrote layer b five times over
    v = rules.update_ratio(high, layers, np.full(10, 1e-2), 1e-2)
    assert v.too_high == (("b", 5.0),) and not v.too_low
    low = np.full((10, 2), 1e-8)
    assert rules.update_ratio(low, layers, np.full(10, 1e-7), 1e-7).too_low
    warmup = np.linspace(1e-6, 1e-3, 10)
    assert not rules.update_ratio(low, layers, warmup, 1e-3).too_low, "warm-up explains small steps"
    decayed = np.full(10, 1e-5)
    assert not rules.update_ratio(low, layers, decayed, 1e-3).too_low, "a decayed schedule explains small steps"


def test_clipping_always_needs_nearly_every_sampled_step():
    assert rules.clipping(np.ones(10)).fires
    assert not rules.clipping(np.array([1.0] * 8 + [0.0] * 2)).fires
    assert not rules.clipping(np.ones(3)).fires


def test_column_medians_match_nanmedian():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(7, 4))
    a[2, 1] = math.nan
    a[:, 3] = math.nan
    a[0, 0] = math.inf
    expected = [np.median(a[1:, 0]), np.median(np.delete(a[:, 1], 2)), np.median(a[:, 2]), math.nan]
    np.testing.assert_allclose(rules.column_medians(a), expected)
    np.testing.assert_allclose(
        rules.column_medians(a[:6, :3]), np.nanmedian(np.where(np.isfinite(a[:6, :3]), a[:6, :3], np.nan), axis=0)
    )


def test_judge_gradients_combines_the_window_verdicts_and_names_the_largest_layer():
    layers = ["l0", "l1"]
    window = {
        "norm": np.array([[1e-6, 1.0]] * 10 + [[1e-6, 3.0]]),
        "ratio": np.full((11, 2), 1e-3),
        "clip": np.ones(11),
        "lr": np.full(11, 1e-2),
        "loss": np.full(11, 2.3),
    }
    run = {"total": np.ones(11), "loss": np.full(11, 2.3)}
    numel = np.array([100, 100])
    v = rules.judge_gradients(window, run, layers, numel, [False, False], 1e-2, clipping_on=True)
    assert v.vanishing.fires and v.vanishing.bottom == "l0" and v.largest == "l1"
    assert not v.exploding.fires and not v.update_ratio.too_high and v.clipping is not None and v.clipping.fires
    off = rules.judge_gradients(window, run, layers, numel, [False, False], 1e-2, clipping_on=False)
    assert off.clipping is None, "no clipping verdict when clipping is off"
    sparse = rules.judge_gradients(window, run, layers, numel, [True, False], 1e-2, clipping_on=False)
    assert not sparse.vanishing.fires


def test_a_check_is_due_once_a_window_of_samples_waits():
    assert not rules.check_due(9, 10, 100) and rules.check_due(10, 10, 100) and rules.check_due(12, 10, 100)


def test_the_logit_scale_explains_a_gap_only_when_it_gives_the_loss_on_its_own():
    def verdict(loss: float, scale_loss: float) -> rules.InitLoss:
        return rules.InitLoss(loss, 10, math.log(10), math.log(10), scale_loss, 5.0, loss - math.log(10), True)

    assert verdict(10.0, 9.0).scale_explains_gap
    assert not verdict(10.0, 3.0).scale_explains_gap


def test_words_name_the_layer_that_feeds_an_activation_module():
    from lightning_debug import health_words as words

    layers = ["net.0", "net.2", "head"]
    assert words.feeding_layer("net.3", layers) == "net.2" and words.feeding_layer("net.1", layers) == "net.0"
    assert words.feeding_layer("head:relu", layers) is None and words.feeding_layer("net.0", layers) is None
    dead = rules.UnitStats("net.1", "relu", 64, 64, 1.0)
    (w,) = words.units(rules.UnitVerdict((dead,), ()), [dead], layers)
    assert (w.check, w.key, w.data["after"]) == ("init.dead_units", "net.1", "net.0")
    assert w.message.startswith("net.1 (after net.0): 64 of 64 ReLU units (100%) are zero for every example")
