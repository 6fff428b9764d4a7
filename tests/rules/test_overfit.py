"""The batch's own floor (Trainer-free): targets that share their whole context cost the entropy of their mix."""

import math

import pytest
import torch

from lightning_debug.rules.loss import label_smoothing_floor
from lightning_debug.rules.overfit import assess_memorisation, batch_floor, recognised_smoothing_floor
from lightning_debug.signals import context_targets


def test_unique_contexts_have_floor_zero_or_label_smoothing():
    pairs = [(i, i % 3) for i in range(12)]
    assert batch_floor(pairs) == batch_floor(pairs, None)
    assert batch_floor(pairs).value == 0.0 and batch_floor(pairs).shared == 0
    smoothed = batch_floor(pairs, (10, 0.1)).value
    assert smoothed == pytest.approx(label_smoothing_floor(10, 0.1), abs=1e-12), smoothed


def test_shared_context_costs_the_entropy_of_its_targets():
    # context "a" carries targets 1, 1, 2, 3 (entropy of (1/2, 1/4, 1/4)); four unique contexts cost nothing
    pairs = [("a", 1), ("a", 1), ("a", 2), ("a", 3), ("b", 0), ("c", 0), ("d", 1), ("e", 2)]
    floor = batch_floor(pairs)
    expected = 4 * -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / 8
    assert floor.value == pytest.approx(expected, rel=1e-12) and (floor.shared, floor.targets) == (4, 8), floor


def test_shared_context_with_label_smoothing_is_the_entropy_of_the_smoothed_mix():
    classes, eps = 5, 0.1
    pairs = [("a", 0), ("a", 1)]
    mix = [(1 - eps) * 0.5 + eps / classes] * 2 + [eps / classes] * 3
    expected = -sum(t * math.log(t) for t in mix)
    assert batch_floor(pairs, (classes, eps)).value == pytest.approx(expected, rel=1e-12)


def test_classification_batch_contexts_are_the_inputs():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0]])
    y = torch.tensor([0, 1, 1])
    pairs = context_targets((x, y), causal=False)
    assert pairs is not None and pairs[0][0] == pairs[1][0] != pairs[2][0], pairs
    assert batch_floor(pairs).value == pytest.approx(2 * math.log(2) / 3)
    dict_pairs = context_targets({"input_ids": x.long(), "labels": y}, causal=False)
    assert dict_pairs is not None and [t for _, t in dict_pairs] == [0, 1, 1]


def test_causal_lm_contexts_are_prefixes_and_skip_ignored_targets():
    ids = torch.tensor([[0, 5, 6, 1], [0, 7, 6, 1], [0, 5, 6, 1]])
    labels = ids.clone()
    labels[1, 3] = -100
    pairs = context_targets({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, causal=True)
    assert pairs is not None and len(pairs) == 8, pairs  # 3 targets per row, one ignored
    # after BOS: targets 5, 7, 5 share one context; after (BOS, 5): 6, 6; after (BOS, 7): 6
    by_context: dict = {}
    for context, target in pairs:
        by_context.setdefault(context, []).append(target)
    assert sorted(map(sorted, by_context.values())) == [[1, 1], [5, 5, 7], [6], [6, 6]], by_context
    assert context_targets({"input_ids": ids, "labels": labels}, causal=False) is None  # not a causal LM
    assert context_targets({"input_ids": ids}, causal=True) is None
    assert context_targets(torch.zeros(3), causal=False) is None


def test_a_deferred_test_measures_progress_from_the_runs_start():
    """A model already trained to 0.636 (label smoothing in the loss call: floor 0.500 the checks cannot see)
    levels off at 0.5003 on one batch: 21% of what was left, but 78% of the run's gap from 2.328."""
    from lightning_debug.rules.overfit import assess_memorisation

    curve = [0.636 - 0.136 * (1 - 0.9**k) for k in range(101)]
    assert assess_memorisation(curve, 0.0, 0.05, 0.02).status == "stuck"
    v = assess_memorisation(curve, 0.0, 0.05, 0.02, start=2.328)
    assert v.status == "mostly" and 0.77 < v.closed < 0.79, v
    stuck = assess_memorisation([2.36] * 101, 0.0, 0.05, 0.02, start=2.362)  # detached logits: nothing moves
    assert stuck.status == "stuck", stuck
    assert assess_memorisation(curve, 0.0, 0.05, 0.02, start=float("nan")).status == "stuck"  # unknown start


def test_stall_findings_and_stalled_loss_findings_run_a_deferred_test():
    from lightning_debug.rules.overfit import asks_why

    assert asks_why("loss.plateau", {}) and asks_why("loss.not_decreasing", {})
    assert asks_why("loss.still_decreasing", {"stalled": True})
    assert not asks_why("loss.converged", {"stalled": False}) and not asks_why("grad.vanishing", {"stalled": True})


def test_start_cost_against_an_epoch_or_a_shorter_run():
    from lightning_debug.rules.overfit import start_cost

    epoch = start_cost(100, -1, 3000)
    assert (epoch.steps, epoch.span, epoch.affordable) == (3000, "epoch", True), epoch
    run = start_cost(100, 200, 3000)
    assert (run.steps, run.span, run.affordable) == (200, "run", False) and run.share == 0.5, run
    assert start_cost(100, -1, 0).share == math.inf


def test_memorisation_floor_keeps_the_stronger_evidence():
    from lightning_debug.rules.loss import Floor
    from lightning_debug.rules.overfit import memorisation_floor

    zero = Floor(0.0, "a likelihood's best")
    shared = [("a", 1), ("a", 2), ("b", 0), ("c", 1)]
    own = memorisation_floor(zero, shared, None)
    assert own.value == pytest.approx(math.log(2) / 2) and "2 of 4 targets" in own.source, own
    assert memorisation_floor(zero, None, None) is zero and memorisation_floor(zero, [("a", 1)], None) is zero
    assert memorisation_floor(Floor(1.0, "set by `floor`"), shared, None).value == 1.0


def test_an_undeclared_label_smoothing_floor_is_recognised_where_memorisation_settles():
    """Tune-set tiny BERT with inline ``label_smoothing=0.1`` over 2 classes: its one-batch curve sits at
    0.19852, the entropy of the smoothed target (0.19852): it has reached its floor, not "levelled off far above
    0". A curve that settles there with late spikes (SGD momentum at the floor) counts too; one still falling
    through that level or still falling slowly near it, an unknown class count, and the floor of probabilities fed
    to cross-entropy do not (the holdout3 set of docs/detection.md: a GRU fed probabilities, at 0.3313 and still
    falling towards 0.3133, was taken for smoothing 0.2's 0.3251 while that value was recognised too)."""
    floor = label_smoothing_floor(2, 0.1)
    bert = [0.19854, 0.19853] + [0.19852] * 99
    recognised = recognised_smoothing_floor(bert, classes=2)
    assert recognised is not None and recognised.value == floor and "label smoothing 0.1" in recognised.source
    spiky = [0.26 - 0.0012 * t for t in range(50)] + [0.1997 + 0.0005 * (t % 3) for t in range(40)]
    spiky += [0.2403, 0.271, 0.2455, 0.2022, 0.2599, 0.4509, 0.3666, 0.2492, 0.21, 0.205]
    assert recognised_smoothing_floor(spiky, classes=2) == recognised
    falling = [0.35 * 0.985**t for t in range(101)]  # passes 0.2 at step ~37 and goes on down
    assert recognised_smoothing_floor(falling, classes=2) is None
    slowly = [0.1985 + 0.01 * 0.99**t for t in range(101)]  # within 3% of the floor, but still falling
    assert recognised_smoothing_floor(slowly, classes=2) is None
    probabilities = [0.3313 + 0.07 * 0.95**t for t in range(101)]  # settled above log(1 + 1/e) = 0.3133
    probabilities[-20:] = [0.3313 + 0.0001 * (t % 2) for t in range(20)]
    assert recognised_smoothing_floor(probabilities, classes=2) is None
    smoothed_10 = [label_smoothing_floor(10, 0.1)] * 101
    assert recognised_smoothing_floor(smoothed_10, classes=10).value == smoothed_10[0]
    assert recognised_smoothing_floor(bert, classes=None) is None
    m = assess_memorisation(bert, recognised.value, 0.05, 1e-3, classes=2, start=0.693)
    assert m.status == "passed", m
