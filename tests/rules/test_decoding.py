"""Decoder-vs-model score comparison and beam monotonicity on hand-made scores: no Trainer, no model."""

import math

import torch

from lightning_debug.rules.decoding import Scores, beam_monotonicity, difference, score_mismatches


def _scores(model, decoder=None, tokens=6):
    s = Scores()
    for k, m in model.items():
        s.model[k] = torch.tensor(m, dtype=torch.float64)
        s.decoder[k] = s.model[k].clone() if decoder is None else torch.tensor(decoder[k], dtype=torch.float64)
        s.tokens[k] = torch.full((len(m),), tokens)
    return s


def test_differences_within_the_tolerance_are_no_mismatch():
    s = _scores({1: [-10.0, -20.0]}, {1: [-10.00005, -20.00001]})  # tolerance 1e-5*|model| + 1e-6*6
    m = score_mismatches(s, 1e-5, 1e-6)
    assert m["count"] == 0 and m["total"] == 2 and m["max_abs"] < 1e-4, m


def test_mismatches_are_counted_by_beam_worst_first():
    s = _scores({1: [-10.0, -20.0], 4: [-9.0, -19.0]}, {1: [-10.0, -21.0], 4: [-9.5, -19.0]})
    m = score_mismatches(s, 1e-5, 1e-6)
    assert m["count"] == 2 and m["beams"] == [1, 4], m
    assert [(w["beam"], w["example"]) for w in m["worst"]] == [(4, 0), (1, 1)], "ranked by |diff| / tolerance"
    assert math.isclose(m["max_abs"], 1.0) and math.isclose(m["max_rel"], 0.5 / 9), m


def test_equal_infinities_match_and_nan_is_an_infinite_difference():
    inf = float("inf")
    d = difference(torch.tensor([-inf, 1.0]), torch.tensor([-inf, float("nan")]))
    assert d[0] == 0 and d[1] == inf


def test_beam_decision_tolerates_search_noise():
    """One worse example in eight is within beam search's own non-monotonicity (2%); three are not."""
    for worse, alarm in ((1, False), (3, True)):
        base = [-3.0 * i for i in range(1, 9)]
        larger = [b + 0.5 for b in base]
        largest = [b - 2.0 if i < worse else b for i, b in enumerate(larger)]
        stats = beam_monotonicity(_scores({1: base, 2: larger, 4: largest}), 1e-5, 1e-6, violation_rate=0.02)
        assert stats["worse"] == worse and (stats["p_value"] < 0.01) is alarm, stats
        assert stats["per_beam"] == {"2": 0, "4": worse}


def test_one_beam_size_has_no_beam_statistics():
    stats = beam_monotonicity(_scores({1: [-1.0, -2.0]}), 1e-5, 1e-6, violation_rate=0.02)
    assert stats["examples"] == 0 and stats["p_value"] == 1.0
