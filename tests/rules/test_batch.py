"""Batch-consistency rules on hand-made losses and matrices: no Trainer, no model."""

import math

import pytest
import torch

from lightning_debug.rules.batch import (
    PaddingProbe,
    aggregation_fits,
    all_within,
    is_leaking,
    leaking_pairs,
    padding_probe,
    padding_verdict,
    pair_rows,
    rejudged,
    relative_dependence,
    target_visibility,
)

LOSSES = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
TOKENS = [{"labels": 1}, {"labels": 1}, {"labels": 2}, {"labels": 4}]


def test_the_mean_of_the_single_losses_is_found_and_sum_is_not():
    fits = aggregation_fits(3.0, LOSSES, [{}] * 4, rtol=1e-5, atol=1e-6)
    assert fits[0].name == "mean" and fits[0].ratio <= 1, fits[0]
    assert next(f for f in fits if f.name == "sum").ratio > 1


def test_a_token_weighted_mean_is_found_from_the_label_counts():
    total = float((LOSSES * torch.tensor([1.0, 1, 2, 4])).sum() / 8)
    fits = aggregation_fits(total, LOSSES, TOKENS, rtol=1e-5, atol=1e-6)
    assert fits[0].name == "token_mean:labels" and fits[0].ratio <= 1, [(f.name, f.ratio) for f in fits]


def test_nothing_explains_a_wrong_total():
    fits = aggregation_fits(2.0, LOSSES, TOKENS, rtol=1e-5, atol=1e-6)
    assert all(f.ratio > 1 for f in fits)


def test_float64_fits_keep_the_working_precision_tolerance():
    fits = aggregation_fits(3.0 + 1e-4, LOSSES, [{}] * 4, rtol=1e-5, atol=1e-6)  # fails in "float32"
    fits64 = rejudged(aggregation_fits(3.0 + 1e-12, LOSSES, [{}] * 4, rtol=1e-12, atol=0.0), fits)
    assert fits[0].ratio > 1 and fits64[0].name == "mean" and fits64[0].ratio <= 1
    assert math.isclose(fits64[0].tol, next(f.tol for f in fits if f.name == "mean"))


def test_pairs_attribute_the_mismatch_to_the_padded_example():
    fit = aggregation_fits(3.0, LOSSES, [{}] * 4, rtol=1e-5, atol=1e-6)[0]  # mean
    totals = {0: (1.5 + 6.0) / 2, 1: (2.0 + 6.0) / 2, 3: 6.0}  # example 0 changes its loss next to #3 (padded)
    rows = pair_rows(totals, LOSSES, fit, ref=3, pads=[5, 0, 2, 0], counts=[{}] * 4, rtol=1e-5, atol=1e-6)
    by_index = {r["index"]: r for r in rows}
    assert math.isclose(by_index[0]["delta"], 0.5) and by_index[0]["ratio"] > 1
    assert by_index[1]["ratio"] <= 1 and by_index[3]["ratio"] <= 1
    v = padding_verdict(rows, leaking=False)
    assert v.padding_only and v.amounts == [5], v
    assert not padding_verdict(rows, leaking=True).padding_only, "a leak explains the mismatch instead"


def test_dependence_is_relative_to_the_largest_self_gradient():
    matrix = torch.tensor([[2.0, 0.0, 0.0], [1e-3, 4.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    rel = relative_dependence(matrix)
    assert isinstance(rel, torch.Tensor) and rel.diagonal().abs().sum() == 0
    assert math.isclose(float(rel[1, 0]), 1e-3 / 4)
    pairs = leaking_pairs(rel, rel, threshold=1e-6)
    assert [(p["output"], p["input"]) for p in pairs] == [(1, 0)]


def test_a_degenerate_matrix_is_a_reason_not_a_verdict():
    assert isinstance(relative_dependence(torch.zeros(3, 3)), str)
    assert isinstance(relative_dependence(torch.full((2, 2), float("nan"))), str)


def test_target_visibility_is_exact_zero_at_the_last_position_when_labels_are_shifted():
    norms = torch.tensor([[0.5, 0.4, 0.0, 0.0], [0.3, 0.2, 0.6, 0.0]], dtype=torch.float64)  # right padding
    shifted = target_visibility(norms)
    assert not shifted.visible and shifted.ratio == 0.0
    norms[1, -1] = 0.35  # the longest example's last token is read by its own prediction
    unshifted = target_visibility(norms)
    assert unshifted.visible and unshifted.ratio == pytest.approx(0.35 / 0.4)


def test_target_visibility_tolerates_small_auxiliary_terms_and_empty_gradients():
    norms = torch.tensor([[1.0, 1.0, 1.0, 0.02]], dtype=torch.float64)  # a router loss reading every position
    assert not target_visibility(norms).visible
    nothing = target_visibility(torch.zeros(2, 5, dtype=torch.float64))
    assert not nothing.visible and nothing.ratio != nothing.ratio  # NaN: nothing to compare with


def test_the_padding_probe_pairs_the_most_padded_example_with_the_longest_unpadded_one():
    assert padding_probe([2, 0, 5, 0], [6, 8, 3, 8]) == PaddingProbe(ref=1, padded=2)
    assert padding_probe([0, 0], [4, 4]) is None  # nothing padded: nothing to probe
    assert padding_probe([1, 2], [4, 3]) is None  # every example padded: no unpadded reference


def test_all_within_needs_the_best_fit_and_every_pair_row_within_tolerance():
    fits = aggregation_fits(2.0, torch.tensor([1.0, 3.0], dtype=torch.float64), [{}, {}], 1e-6, 0.0)
    assert all_within(fits, [{"ratio": 0.5}])
    assert not all_within(fits, [{"ratio": 1.5}])


def test_a_leak_is_judged_on_the_float64_matrix_when_there_is_one():
    rel, rel64 = torch.tensor([[0.0, 1e-3], [0.0, 0.0]]), torch.zeros(2, 2)
    assert is_leaking(rel, None, 1e-6)
    assert not is_leaking(rel, rel64, 1e-6)  # the working-precision entry was float noise
