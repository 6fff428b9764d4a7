"""ErrorAnalysis under real 2-process CPU DDP (gloo): slices and samples reduced across ranks. Marked `ddp`.

One launch (``tests/scripts/ddp_errors.py``) trains the sourced text task on two ranks; each rank validates half
of the 600 examples. Both ranks must conclude the same slices, equal to one process analysing the whole set with
the trained weights, and name the planted weak slices.
"""

from pathlib import Path

import pandas as pd
import pytest
import torch

from lightning_debug.callbacks.errors import ErrorAnalysis
from lightning_debug.demos.sources import SourcedClassifier, sourced_loaders, word_tokenizer

from models import make_trainer, run_two_rank_script

SCRIPT = Path(__file__).parent / "scripts" / "ddp_errors.py"
pytestmark = pytest.mark.ddp


def _slices(slices):
    return {(s["column"], s["value"]): (s["count"], round(s["accuracy"], 9)) for s in slices}


def test_slices_and_samples_are_reduced_across_ranks_and_equal_one_process(tmp_path):
    _, (r0, r1) = run_two_rank_script(SCRIPT, tmp_path)
    assert _slices(r0["last_slices"]) == _slices(r1["last_slices"]), "every rank concludes the same"
    assert r0["history"] == r1["history"] and r0["history"][-1]["count"] == 600, r0["history"]
    weak = {(f["data"]["column"], f["data"]["value"]) for f in r0["findings"] if f["check"] == "eval.weak_slice"}
    assert {("source", "forum"), ("input_length", "17-32")} <= weak, r0["findings"]
    # one process, the same weights, the whole validation set
    model = SourcedClassifier(truncate=10, tokenizer=word_tokenizer())
    model.load_state_dict(torch.load(tmp_path / "final_weights.pt", weights_only=True))
    single = ErrorAnalysis(verbose=False)
    make_trainer(tmp_path / "single", [single]).validate(model, sourced_loaders(flip_source="forum")[1], verbose=False)
    assert _slices(r0["last_slices"]) == _slices(single.last_slices)
    # rank zero published the merged samples: positions of the whole set, errors only in random_error
    samples = pd.read_parquet(r0["files"][0])
    assert not r1["files"], "only rank zero writes"
    errors = samples[samples.selection == "random_error"]
    assert len(errors) == 100 and not errors.correct.any() and errors.position.max() >= 300, errors.position.describe()
