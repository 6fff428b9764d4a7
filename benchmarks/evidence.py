"""Ground truth WITHOUT the library: a bare run (plain Trainer, a recorder of our own) plus direct probes.

A healthy scenario is valid when its bare run has finite losses, a training loss that fell to <= 0.8 of its
start, and reaches its task's stated validation level (``TASKS``). A faulty scenario is valid when its bare run
or a direct probe shows the fault's symptom (``EVIDENCE``). An invalid scenario is excluded from the scores
and counted. Nothing here imports a lightning_debug check.
"""

from __future__ import annotations

import itertools
import math
import tempfile
from collections import Counter
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from benchmarks.models import Bench, build
from benchmarks.scenarios import TASKS, Setup

PROBE_RTOL = 1e-3  # structural probes: float noise is ~1e-6 relative, the injected bugs are >= 1e-2


class Recorder(Callback):
    """Per-batch training losses, the validation metric per check, the largest gradient norm."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.losses: list[torch.Tensor] = []
        self.checks: list[tuple[int, float, float]] = []  # (step, metric, val_loss)
        self.max_grad_norm = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach().float())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        grads = [p.grad.detach().float().norm() for p in pl_module.parameters() if p.grad is not None]
        if grads:
            self.max_grad_norm = max(self.max_grad_norm, float(torch.stack(grads).norm()))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        m = trainer.callback_metrics
        if self.metric in m and "val_loss" in m:
            self.checks.append((trainer.global_step, float(m[self.metric]), float(m["val_loss"])))


def trainer_for(root: str, callbacks: list[Callback], kwargs: dict[str, Any]) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
        **kwargs,
    )


def curve_summary(losses: list[torch.Tensor], checks: list[tuple[int, float, float]]) -> dict[str, Any]:
    values = torch.stack(losses).tolist() if losses else []
    finite = [v for v in values if math.isfinite(v)]
    k = max(3, len(values) // 10)
    smooth = [sum(finite[i : i + k]) / k for i in range(0, max(1, len(finite) - k + 1), max(1, k // 2))]
    return {
        "batches": len(values),
        "nonfinite": len(finite) < len(values),
        "start": sum(finite[:5]) / max(1, len(finite[:5])) if finite else math.nan,
        "end": sum(finite[-k:]) / max(1, len(finite[-k:])) if finite else math.nan,
        "min_smoothed": min(smooth) if finite else math.nan,
        "checks": checks,
    }


def bare_run(setup: Setup, fault: str | None) -> dict[str, Any]:
    """Train the scenario with no debug callback; returns the curve summary, probes and parameter movement."""
    metric = TASKS[setup.task][0]
    pl.seed_everything(setup.seed, verbose=False)
    module, train, val, kwargs = build(setup, fault)
    probes = run_probes(module, val, fault)
    before = [p.detach().clone() for p in model_params(module)]
    recorder = Recorder(metric)
    with tempfile.TemporaryDirectory() as root:
        trainer_for(root, [recorder], kwargs).fit(module, train, val)
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model_params(module), before, strict=True))
    return {
        **curve_summary(recorder.losses, recorder.checks),
        **probes,
        "max_param_change": moved,
        "max_grad_norm": recorder.max_grad_norm,
        "steps_run": int(module.trainer.global_step),
    }


def model_params(module: Bench) -> list[torch.Tensor]:
    spare = {id(p) for p in module.spare.parameters()} if module.spare is not None else set()
    return [p for p in module.parameters() if id(p) not in spare]


# ---- direct probes on the untrained module (eval mode, no grad) ---------------------------------------------------


def run_probes(module: Bench, val: Any, fault: str | None) -> dict[str, Any]:
    """The direct probes, drawing their noise from a forked generator: the bare run that follows draws what the
    suite's run draws (until 2026-12 they moved the global one, so the two runs' dropout masks and in-batch
    permutations differed, and a chaotic fault could blow up in one and not the other)."""
    items = [val.dataset[i] for i in range(16)]
    collate = val.collate_fn
    module.eval()
    out: dict[str, Any] = {}
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        out["cross_sample_change"] = _cross_sample_change(module, collate(items[:8]))
        if isinstance(collate(items[:2]), dict):  # padded token batches
            out["pad_change"] = _pad_change(module, items, collate)
        out["dead_fraction"] = _dead_fraction(module, collate(items))
        if fault == "decoder_off_by_one" or hasattr(module, "decode_with_scores"):
            out["decode_change"] = _decode_change(module, collate(items[:8]))
    module.train()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-6))


def _cross_sample_change(module: Bench, batch: Any) -> float:
    """Relative change of example 0's logits when the other examples' inputs change."""
    if isinstance(batch, dict):
        other = dict(batch)
        ids = batch["input_ids"].clone()
        noise = torch.randint_like(ids[1:], 2, 24)
        mask = batch["attention_mask"][1:].bool()
        ids[1:] = torch.where(mask, noise, ids[1:])
        other["input_ids"] = ids
    else:
        x, y = batch
        other = (torch.cat([x[:1], x[1:].flip(0) + torch.randn_like(x[1:])]), y)
    a, _ = module.scored(batch)
    b, _ = module.scored(other)
    return _rel(a[0], b[0])


def _pad_change(module: Bench, items: list[Any], collate: Any) -> float:
    """Relative change of an example's loss when it is padded (collated with a longer example, row 0 kept)."""
    length = [
        len(it["input_ids"] if isinstance(it, dict) else it if isinstance(it, torch.Tensor) else it[0]) for it in items
    ]
    short, long = items[length.index(min(length))], items[length.index(max(length))]
    alone = collate([short])
    padded = {k: v[:1] for k, v in collate([short, long]).items()}
    a = module.loss_of(alone)[0]
    b = module.loss_of(padded)[0]
    return _rel(b, a)


def _dead_fraction(module: Bench, batch: Any) -> float:
    """Share of ReLU outputs that are exactly 0 on a batch (1.0 = every unit dead), 0 without ReLUs."""
    zeros, total = [0], [0]

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        zeros[0] += int((out == 0).sum())
        total[0] += out.numel()

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.ReLU)]
    module.scored(batch)
    for h in handles:
        h.remove()
    return zeros[0] / total[0] if total[0] else 0.0


def _decode_change(module: Any, batch: dict[str, torch.Tensor]) -> float:
    """Greedy decoder's own scores vs the teacher-forced scores of the same outputs."""
    outputs, scores = module.decode_with_scores(batch, 1)
    return _rel(scores, module.score_outputs(batch, outputs))


# ---- verdicts -----------------------------------------------------------------------------------------------------


def entropy_floor(setup: Setup) -> float:
    """Empirical next-token conditional entropy (bigram) of the Markov language: no LM can go far below it."""
    from lightning_debug.demos.lm import markov_language

    pairs: Counter[tuple[int, int]] = Counter()
    for sent in markov_language(4096, seed=setup.seed):
        seq = sent.tolist()
        pairs.update(itertools.pairwise(seq))
    prev: Counter[int] = Counter()
    for (a, _), n in pairs.items():
        prev[a] += n
    total = sum(pairs.values())
    return -sum(n / total * math.log(n / prev[a]) for (a, _), n in pairs.items())


def _final(ev: dict[str, Any]) -> float:
    return ev["checks"][-1][1] if ev["checks"] else math.nan


def _worse(setup: Setup, value: float, level: float) -> bool:
    mode = TASKS[setup.task][1]
    return not math.isfinite(value) or (value < level if mode == "max" else value > level)


def _far_below(setup: Setup, ev: dict[str, Any]) -> bool:
    return _worse(setup, _final(ev), TASKS[setup.task][3])


def _stuck(ev: dict[str, Any]) -> bool:
    return not math.isfinite(ev["end"]) or ev["end"] >= 0.85 * ev["start"]


def _probs_floor(setup: Setup, ev: dict[str, Any]) -> bool:
    classes = TASKS[setup.task][4]
    return ev["min_smoothed"] >= 0.95 * math.log(1 + (classes - 1) / math.e)


EVIDENCE: dict[str, Callable[[Setup, dict[str, Any]], tuple[bool, str]]] = {
    "broken": lambda s, ev: (
        ev["nonfinite"] or _stuck(ev) or _far_below(s, ev),
        f"nonfinite={ev['nonfinite']} loss {ev['start']:.3g}->{ev['end']:.3g} final metric {_final(ev):.3g}",
    ),
    "stuck": lambda s, ev: (
        _stuck(ev) and _far_below(s, ev),
        f"loss {ev['start']:.3g}->{ev['end']:.3g} final metric {_final(ev):.3g}",
    ),
    "blew_up": lambda s, ev: (
        ev["nonfinite"] or ev["end"] >= 1.5 * ev["min_smoothed"] or ev["max_grad_norm"] > 1e4,
        f"nonfinite={ev['nonfinite']} loss min {ev['min_smoothed']:.3g} end {ev['end']:.3g} "
        f"max grad norm {ev['max_grad_norm']:.3g}",
    ),
    "far_below": lambda s, ev: (
        _far_below(s, ev),
        f"final metric {_final(ev):.3g} (far-below level {TASKS[s.task][3]})",
    ),
    "dead_at_init": lambda s, ev: (
        ev["dead_fraction"] >= 0.95 and _far_below(s, ev),
        f"dead ReLU outputs at init {ev['dead_fraction']:.2f}, final metric {_final(ev):.3g}",
    ),
    "frozen": lambda s, ev: (ev["max_param_change"] == 0.0, f"largest parameter change {ev['max_param_change']:.3g}"),
    "overfit": lambda s, ev: (
        bool(ev["checks"]) and ev["checks"][-1][2] >= 1.15 * min(c[2] for c in ev["checks"]),
        "val_loss min {:.3g} end {:.3g}".format(
            min((c[2] for c in ev["checks"]), default=math.nan), ev["checks"][-1][2] if ev["checks"] else math.nan
        ),
    ),
    "probs_floor": lambda s, ev: (
        _probs_floor(s, ev),
        f"lowest smoothed loss {ev['min_smoothed']:.3g} vs floor {math.log(1 + (TASKS[s.task][4] - 1) / math.e):.3g}",
    ),
    "pad_variant": lambda s, ev: (ev.get("pad_change", 0.0) > PROBE_RTOL, f"pad change {ev.get('pad_change', 0):.3g}"),
    "batch_dependent": lambda s, ev: (
        ev["cross_sample_change"] > PROBE_RTOL,
        f"cross-sample change {ev['cross_sample_change']:.3g}",
    ),
    "below_entropy": lambda s, ev: (
        _final(ev) < 0.5 * entropy_floor(s),
        f"val_loss {_final(ev):.3g} vs language entropy {entropy_floor(s):.3g}",
    ),
    "decode_mismatch": lambda s, ev: (
        ev.get("decode_change", 0.0) > PROBE_RTOL,
        f"decoder vs teacher-forced score change {ev.get('decode_change', 0):.3g}",
    ),
}


def healthy_verdict(setup: Setup, ev: dict[str, Any]) -> tuple[bool, str]:
    metric, _, target, _, _ = TASKS[setup.task]
    probes_clean = ev["cross_sample_change"] <= PROBE_RTOL and ev.get("pad_change", 0.0) <= PROBE_RTOL
    ok = (
        not ev["nonfinite"]
        and ev["end"] <= 0.8 * ev["start"]
        and not _worse(setup, _final(ev), target)
        and probes_clean
    )
    text = (
        f"loss {ev['start']:.3g}->{ev['end']:.3g}, final {metric} {_final(ev):.3g} (target {target}), "
        f"nonfinite={ev['nonfinite']}, probes cross {ev['cross_sample_change']:.2g} pad {ev.get('pad_change', 0):.2g}"
    )
    return ok, text


def verdict(setup: Setup, fault: str | None, evidence_name: str | None, ev: dict[str, Any]) -> tuple[bool, str]:
    if fault is None or evidence_name is None:
        return healthy_verdict(setup, ev)
    return EVIDENCE[evidence_name](setup, ev)


def onset_step(fault: str | None, ev: dict[str, Any]) -> int:
    """Step from which the fault is visible: the best validation check for overfitting, else the first step."""
    if fault == "label_noise_overfit" and ev["checks"]:
        return min(ev["checks"], key=lambda c: c[2])[0]
    return 0
