"""Model-health decisions: optimizer coverage, loss at initialisation, dead/saturated units, gradient health.

Pure functions over names, counts and numpy arrays; each returns a verdict dataclass. The thresholds are the
module constants below; ``benchmarks/health_thresholds.py`` measures the statistics they bound on healthy and
faulty runs (tuned on seeds 0-1, reported on seeds 2-4) and ``docs/callbacks/model_health.md`` gives the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from lightning_debug.stats import finite_median, median, row_medians

# init.loss_off_chance: healthy default inits sit within 0.25 nats of ln C (measured max 0.11 on the healthy set)
LOSS_GAP_NATS = 1.0
# init.dead_units: share of a ReLU layer's units zero for every example of the batch. Healthy PyTorch-default
# inits reach 0.39 (4-layer MLP, batch 32, tuning seeds); AUTOTRAINER and DeepDiagnosis use 0.7
DEAD_SHARE = 0.7
# init.saturated_units: share of a tanh/sigmoid layer's outputs saturated (SageMaker: 50% of a layer)
SATURATED_SHARE = 0.5
# grad.vanishing: median log10(first layer's grad RMS / last layer's) below this (1e-3: AUTOTRAINER's beta_1)
VANISHING_LOG10 = -3.0
RECOVERY_LOG10 = 1.0  # ...and not recovering: the window's second half at most this much above its first half
# ...and the loss not learned: the window's median loss still more than this share of the way from the floor to the
# run's first sampled losses. Healthy tiny BERTs that fit their task (loss down by 100x) sit at 10^-4.4 with every
# layer below the classifier small: little left to learn, not a gradient that cannot reach the input. A half, not a
# tenth: a label-smoothed BERT (floor ~0.2 of a start of 0.69, undeclared) fitted its task at 0.29 of its start and
# warned; every fault the rule names keeps its loss near its start (docs/callbacks/model_health.md)
LEARNED_SHARE = 0.5
# grad.exploding: the global gradient norm grew by this factor over its smallest earlier level, the loss too
EXPLODING_FACTOR = 1e3
# grad.update_ratio: per-step ||dW|| / ||W|| per layer. Usual ~1e-3; "far" = beyond these
UPDATE_RATIO_HIGH = 1.0  # largest sampled step of a layer: more than the layer's own norm
UPDATE_RATIO_LOW = 1e-6
ANNEALED = 0.5  # a learning rate below this share of its peak (schedule decay or warm-up) explains small updates
# grad.clipping_always: clipping active on at least this share of the sampled steps...
CLIPPING_SHARE = 0.95
MIN_SAMPLES = 5  # ...and every windowed gradient rule needs at least this many sampled steps


def module_of(param_name: str) -> str:
    """``net.0.weight`` -> ``net.0``; a top-level parameter is its own module."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def modules_of(names: Sequence[str]) -> list[str]:
    """The distinct modules of parameter names, in first-seen order."""
    return list(dict.fromkeys(module_of(n) for n in names))


def column_medians(a: np.ndarray) -> np.ndarray:
    """Median of the finite values of each column (NaN for a column with none)."""
    return finite_median(a, axis=0)


# ---------------------------------------------------------------------------------------------- optimizer coverage
@dataclass(frozen=True)
class Coverage:
    """Which parameters the backward and the optimizer disagree on."""

    not_in_optimizer: tuple[str, ...]  # receive a gradient, in no param group: never updated
    not_in_optimizer_elements: int
    unused: tuple[str, ...]  # in a param group and trainable, but no gradient: never used by the forward
    unused_elements: int
    grad_tensors: int  # tensors that receive a gradient
    grad_tensors_in_optimizer: int


def optimizer_coverage(with_grad: Mapping[str, int], optimized: Mapping[str, int]) -> Coverage:
    """``with_grad``: {name: numel} of trainable parameters that got a gradient in one backward;
    ``optimized``: {name: numel} of trainable tensors in any optimizer param group (tensors that are not
    parameters of the module, e.g. captured before a layer was replaced, under a name of their own)."""
    missing = tuple(n for n in with_grad if n not in optimized)
    unused = tuple(n for n in optimized if n not in with_grad)
    return Coverage(
        not_in_optimizer=missing,
        not_in_optimizer_elements=sum(with_grad[n] for n in missing),
        unused=unused,
        unused_elements=sum(optimized[n] for n in unused),
        grad_tensors=len(with_grad),
        grad_tensors_in_optimizer=len(with_grad) - len(missing),
    )


# ---------------------------------------------------------------------------------------------- loss at init
@dataclass(frozen=True)
class InitLoss:
    loss: float
    num_classes: int
    chance: float  # ln C: the loss of uniform predictions, whatever the labels
    prior_entropy: float  # the loss of predicting the label prior (the best an input-blind model can do)
    scale_loss: float  # the loss these logits give a uniformly random label: the part due to their scale alone
    logit_std: float  # spread of the logits across classes, averaged over examples
    gap: float  # loss - chance
    off: bool

    @property
    def scale_explains_gap(self) -> bool:
        """The loss the logits' scale alone gives is within half the gap of the loss: the scale explains it."""
        return abs(self.scale_loss - self.loss) <= 0.5 * abs(self.gap)


def init_loss(loss: float, logits: np.ndarray, class_counts: np.ndarray, tolerance: float = LOSS_GAP_NATS) -> InitLoss:
    """A C-class cross-entropy at initialisation against ``ln C``.

    ``logits``: (N, C) of the scored examples; ``class_counts``: (C,) label counts. Off when the loss exceeds
    ``ln C`` by more than ``tolerance`` nats, or sits more than ``tolerance`` below the label-prior entropy
    (an uninformed model cannot beat the prior: labels leak into the inputs, or the loss is not what it seems).
    ``scale_loss`` = mean(logsumexp(z) - mean(z)): when it is close to ``loss``, the logit scale alone explains
    the gap (too-large init of the output layer, a missing temperature, logits multiplied by mistake).
    """
    c = logits.shape[1]
    z = logits.astype(np.float64)
    zmax = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
    scale_loss = float(np.mean(lse - z.mean(axis=1)))
    p = class_counts / max(class_counts.sum(), 1)
    prior = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    chance = math.log(c)
    gap = loss - chance
    off = bool(gap > tolerance or loss < prior - tolerance)
    std = float(z.std(axis=1).mean())
    return InitLoss(loss, c, chance, prior, scale_loss, std, gap, off)


# ---------------------------------------------------------------------------------------------- dead / saturated
@dataclass(frozen=True)
class UnitStats:
    """One activation site on one batch: ``units`` features, ``flat`` of them in that state for every example
    (zero for ReLU, saturated for tanh/sigmoid), and the share of output values in that state."""

    layer: str
    kind: str  # "relu", "tanh" or "sigmoid"
    units: int
    flat: int
    value_share: float

    @property
    def share(self) -> float:
        """ReLU: the share of units dead for the whole batch (a unit zero for some examples still learns).
        tanh/sigmoid: the share of outputs saturated (a unit at +1 for some examples and -1 for others passes
        no gradient either), SageMaker's and DeepDiagnosis' per-layer measure."""
        if self.kind != "relu":
            return self.value_share
        return self.flat / self.units if self.units else 0.0


@dataclass(frozen=True)
class UnitVerdict:
    dead: tuple[UnitStats, ...]  # ReLU-family layers with too many dead units, worst first
    saturated: tuple[UnitStats, ...]  # tanh/sigmoid layers with too many saturated units, worst first


def unit_health(
    stats: Sequence[UnitStats], dead: float = DEAD_SHARE, saturated: float = SATURATED_SHARE
) -> UnitVerdict:
    """ReLU layers where at least ``dead`` of the units are zero for the whole batch; tanh/sigmoid layers where
    at least ``saturated`` of the outputs are saturated."""
    bad = sorted(
        (s for s in stats if s.units and s.share >= (dead if s.kind == "relu" else saturated)), key=lambda s: -s.share
    )
    return UnitVerdict(
        dead=tuple(s for s in bad if s.kind == "relu"), saturated=tuple(s for s in bad if s.kind != "relu")
    )


# ---------------------------------------------------------------------------------------------- gradients
@dataclass(frozen=True)
class Vanishing:
    fires: bool
    bottom: str
    top: str
    log10_ratio: float  # median over the window of log10(grad RMS of the bottom layer / of the top layer)
    falling: bool  # the window's second half recovers less than RECOVERY_LOG10 on its first half
    learned: bool = False  # the loss covered LEARNED_SHARE of its way to the floor: nothing left to learn


def vanishing(
    rms: np.ndarray,
    layers: Sequence[str],
    threshold: float = VANISHING_LOG10,
    sparse: Sequence[bool] | None = None,
    losses: np.ndarray | None = None,
    start_loss: float = math.nan,
    floor: float = 0.0,
) -> Vanishing:
    """``rms``: (samples, layers) gradient RMS per layer (layers input to output). The lowest layer's gradient
    orders of magnitude below the top layer's, not recovering, and the loss not learned: the window's median
    ``losses`` more than ``LEARNED_SHARE`` of the way from the ``floor`` to ``start_loss`` (the run's first sampled
    losses), since a model that has fitted its data has small gradients everywhere and the lowest ones smallest.
    ``sparse`` layers (embeddings) are left out: only the rows of the tokens in a batch get a gradient, so its RMS
    over the whole table is no measure."""
    ok = np.isfinite(rms).all(axis=0) & (rms > 0).any(axis=0)
    if sparse is not None:
        ok &= ~np.asarray(sparse, dtype=bool)
    idx = np.flatnonzero(ok)
    if len(idx) < 2 or rms.shape[0] < MIN_SAMPLES:
        return Vanishing(False, "", "", math.nan, False)
    lo, hi = idx[0], idx[-1]
    ratio = np.log10(np.maximum(rms[:, lo], 1e-30) / np.maximum(rms[:, hi], 1e-30))
    half = len(ratio) // 2
    falling = bool(median(ratio[half:]) <= median(ratio[:half]) + RECOVERY_LOG10)
    level = median(ratio)
    now = median(losses) if losses is not None and len(losses) else math.nan
    learned = bool(start_loss > floor and now - floor <= LEARNED_SHARE * (start_loss - floor))
    fires = bool(level < threshold and falling and not learned)
    return Vanishing(fires, layers[lo], layers[hi], level, falling, learned)


@dataclass(frozen=True)
class Exploding:
    fires: bool
    growth: float  # latest level / smallest earlier level of the global gradient norm
    nonfinite: bool
    loss_before: float
    loss_now: float


def exploding(norms: np.ndarray, losses: np.ndarray, factor: float = EXPLODING_FACTOR, group: int = 3) -> Exploding:
    """Global gradient norm (one per sampled step) growing by ``factor`` over its smallest earlier level (medians
    of ``group`` samples), while the loss (same samples) is not lower than it was then; any NaN/Inf norm fires."""
    if not np.isfinite(norms).all():
        return Exploding(True, math.inf, True, math.nan, math.nan)
    n = len(norms) // group * group
    if n < 2 * group:
        return Exploding(False, math.nan, False, math.nan, math.nan)
    levels = row_medians(norms[-n:].reshape(-1, group))
    loss_levels = row_medians(losses[-n:].reshape(-1, group))
    low = int(np.argmin(levels[:-1]))
    growth = float(levels[-1] / max(levels[low], 1e-30))
    before, now = float(loss_levels[low]), float(loss_levels[-1])
    loss_up = not math.isfinite(now) or not now < before
    return Exploding(bool(growth >= factor and loss_up), growth, False, before, now)


@dataclass(frozen=True)
class UpdateRatio:
    too_high: tuple[tuple[str, float], ...]  # (layer, largest sampled ratio) above the high bound, worst first
    too_low: bool  # the median layer's ratio below the low bound at an unannealed learning rate
    median: float  # median over layers of the per-layer median ratios
    per_layer: dict[str, float] = field(default_factory=dict)  # per-layer median ratios


def update_ratio(
    ratios: np.ndarray,
    layers: Sequence[str],
    lrs: np.ndarray,
    peak_lr: float,
    high: float = UPDATE_RATIO_HIGH,
    low: float = UPDATE_RATIO_LOW,
) -> UpdateRatio:
    """``ratios``: (samples, layers) per-step ||dW|| / ||W||; ``lrs``: the learning rate at each sample.

    Too high: a sampled step changed a layer by more than ``high`` times its norm (the step rewrote the layer:
    one such step is enough to kill ReLUs or blow up the loss). Too low:
    the median layer's ratio below ``low`` while the learning rate is at least ``ANNEALED`` of its peak and
    not rising (a warm-up or a decayed schedule explains small steps)."""
    if ratios.shape[0] < MIN_SAMPLES:
        return UpdateRatio((), False, math.nan)
    finite = np.where(np.isfinite(ratios), ratios, np.nan)
    seen: np.ndarray = np.asarray(np.isfinite(finite).any(axis=0))
    if not seen.any():
        return UpdateRatio((), False, math.nan)
    med = column_medians(finite[:, seen])
    top = np.nanmax(finite[:, seen], axis=0)
    names = [layer for i, layer in enumerate(layers) if seen[i]]
    per_layer = {layer: float(m) for layer, m in zip(names, med, strict=True)}
    overall = median(med)
    high_layers = tuple(
        sorted(((k, float(v)) for k, v in zip(names, top, strict=True) if v > high), key=lambda kv: -kv[1])
    )
    steady = len(lrs) > 0 and lrs[-1] >= ANNEALED * peak_lr and lrs[-1] <= lrs[0]
    return UpdateRatio(high_layers, bool(overall < low and steady), overall, per_layer)


@dataclass(frozen=True)
class Clipping:
    fires: bool
    share: float
    samples: int


def clipping(active: np.ndarray, threshold: float = CLIPPING_SHARE) -> Clipping:
    """Clipping active on at least ``threshold`` of the sampled steps (at least ``MIN_SAMPLES`` of them)."""
    n = len(active)
    share = float(np.mean(active)) if n else math.nan
    return Clipping(bool(n >= MIN_SAMPLES and share >= threshold), share, n)


# ---------------------------------------------------------------------------------------------- one check window
@dataclass(frozen=True)
class GradientVerdict:
    """The four gradient verdicts on one check window."""

    vanishing: Vanishing
    exploding: Exploding
    largest: str | None  # the layer with the largest gradient norm at the window's last sample
    update_ratio: UpdateRatio
    clipping: Clipping | None  # None when gradient clipping is off


def check_due(unchecked: int, sample_every: int, check_every: int) -> bool:
    """Enough samples are waiting to make a check window (counted over a resume too)."""
    return unchecked * sample_every >= check_every


def judge_gradients(
    window: Mapping[str, np.ndarray],
    run: Mapping[str, np.ndarray],
    layers: Sequence[str],
    numel: np.ndarray,
    sparse: Sequence[bool],
    peak_lr: float,
    clipping_on: bool,
    floor: float = 0.0,
) -> GradientVerdict:
    """``window``: the check window's columns (``norm``, ``ratio``: (samples, layers); ``clip``, ``lr``,
    ``loss``: (samples,)); ``run``: the run's ``total`` gradient norms and ``loss`` so far (growth is measured over the
    run); ``numel``: elements per layer (norms become RMS, so layers of different sizes compare); ``floor``: the
    lowest loss reachable (a declared label smoothing's), which "the loss learned" is measured to."""
    last = window["norm"][-1]
    largest = layers[int(np.nanargmax(last))] if np.isfinite(last).any() else None
    return GradientVerdict(
        vanishing=vanishing(
            window["norm"] / np.sqrt(np.maximum(numel, 1)),
            layers,
            sparse=sparse,
            losses=window["loss"],
            start_loss=median(run["loss"][:3]) if len(run["loss"]) else math.nan,
            floor=floor,
        ),
        exploding=exploding(run["total"], run["loss"]),
        largest=largest,
        update_ratio=update_ratio(window["ratio"], layers, window["lr"], peak_lr),
        clipping=clipping(window["clip"]) if clipping_on else None,
    )
