"""Decision rules for the training loss: pure functions over arrays (no trainer, no emit, no logging).

The loss monitor bins the per-step training loss (medians of ``bin_steps`` steps) and calls these rules at its
checks. Every rule works on a batch of curves (leading axes) as well as on one, so the Monte-Carlo tests in
``tests/rules/`` run the very code the callback runs on ten thousand simulated curves at once.

Noise model. A small-batch loss is heavy-tailed (a batch of 8 hard examples), autocorrelated (momentum, data
order) and spiky. So no decision rests on one bin or on an extreme of many noisy values:

- a *level* is the median of several bins, never a single bin or the minimum of bins;
- the reference for a jump is the lowest *rolling level* (medians over ``REFERENCE_STEPS`` steps), not the best
  bin;
- a jump must also clear a multiple of the run's own spread (the scaled MAD of bin-to-bin differences) and
  still hold over the next ``JUMP_STEPS`` steps;
- trend intervals (Theil-Sen) are widened for the lag-1 autocorrelation of the residuals (Yue & Wang 2004).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from scipy.special import ndtr

from lightning_debug.stats import finite_median, row_medians, two_sided_z

MIN_VERDICT_BATCHES = 30  # a run at least this long ends with a training-loss verdict
MAX_TREND_POINTS = 32  # the trend window is re-binned to at most this many points (Theil-Sen is O(n^2))
MIN_TREND_POINTS = 6
JUMP_STEPS = 10  # a jump's level is the median over at least this many steps, and must hold for as many more
REFERENCE_STEPS = 50  # a reference level is the median over at least this many steps
SPREAD_Z = 5.0  # a jump must clear this many times the run's spread (of a level)
LEVELLED_OFF = 0.5  # a plateau falls at most this fraction of its average rate since the start (else: just slow)
ANNEALED = 0.5  # a schedule that took the learning rate below this fraction of its peak explains a flat loss
WARMING = 1.01  # a learning rate this many times the previous check's is still warming up
LEARNED = 0.75  # train ~= val counts as a floor only below this fraction of the first loss
RESERVED_COMPONENTS = ("smoothed", "slope")  # logged keys of the monitor: no component may take their names

VERDICTS = ("none", "diverging", "not_decreasing", "plateau", "converged", "still_decreasing")
NONE, DIVERGING, NOT_DECREASING, PLATEAU, CONVERGED, STILL_DECREASING = range(len(VERDICTS))


# ---------------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Schedule:
    """When the monitor bins, checks and starts judging, in training batches."""

    bin_steps: int
    check_every: int
    warmup: int
    stuck_after: int = 0  # before the end, a flat start is called stuck only from here (0: from the warm-up)

    def probes(self) -> list[int]:
        """Early pulls before the first check (1, 2, 4, ...): a blow-up is reported within about twice its step."""
        return [2**i for i in range(32) if 2**i < self.check_every]


STUCK_AFTER_MAX = 500  # batches: a long run's flat start is called stuck by then at the latest


def schedule_for(
    planned_batches: float | None,
    *,
    check_fraction: float = 0.1,
    warmup_fraction: float = 0.1,
    check_every: int | None = None,
    warmup: int | None = None,
) -> Schedule:
    """Intervals that scale with the planned run: a tenth of it, within [20, 200] batches for checks and
    [30, 200] for the warm-up; bins of 10 steps, fewer for runs under 400 batches (a 30-step run has 30 points).
    An unknown length (``None``/inf) gets the long-run values. ``stuck_after``: half the run, within [warm-up,
    STUCK_AFTER_MAX]: a loss may sit at its first level for a third of a short run before it drops (a small
    transformer or RNN from scratch), and the final verdict still calls a run that never moved."""
    known = planned_batches is not None and math.isfinite(planned_batches) and planned_batches > 0
    planned = float(planned_batches) if known else math.inf  # type: ignore[arg-type]
    bin_steps = int(min(10, max(1, planned // 40))) if known else 10
    if check_every is None:
        raw = planned * check_fraction if known else 200
        check_every = int(min(200, max(20, round(raw / bin_steps) * bin_steps)))
    if warmup is None:
        warmup = int(min(200, max(MIN_VERDICT_BATCHES, planned * warmup_fraction))) if known else 200
    stuck_after = int(min(STUCK_AFTER_MAX, max(warmup, planned / 2))) if known else warmup
    return Schedule(bin_steps=bin_steps, check_every=check_every, warmup=warmup, stuck_after=stuck_after)


def validate_arguments(
    floor: float | None,
    every: int | None,
    window: int | None,
    warmup: int | None,
    diverge_factor: float,
    components: Mapping[str, str] | None,
) -> None:
    """``ValueError`` naming the argument for a misuse of the schedule or the floor (:class:`LossRules`
    checks the thresholds)."""
    if floor is not None and not math.isfinite(floor):
        raise ValueError(f"`floor` must be finite or None, got {floor}")
    if every is not None and every < 10:
        raise ValueError(f"`check_every_n_steps` must be None or >= 10, got {every}")
    if window is not None and window < 2 * (every or 20):
        raise ValueError(f"`window` must be None or >= 2 * check_every_n_steps, got {window}")
    if warmup is not None and warmup < 0:
        raise ValueError(f"`warmup_steps` must be None or >= 0, got {warmup}")
    if diverge_factor <= 1:
        raise ValueError(f"`diverge_factor` must be > 1, got {diverge_factor}")
    for name in components or {}:
        if name in RESERVED_COMPONENTS:
            raise ValueError(f"`components` name {name!r} is reserved; pick another name")


# ---------------------------------------------------------------------------------------------- floors
def label_smoothing_floor(num_classes: int, smoothing: float) -> float:
    """The lowest cross-entropy reachable with label smoothing: the entropy of the smoothed target
    (``1 - eps + eps/C`` on the label, ``eps/C`` elsewhere). 10 classes at 0.1: 0.500."""
    if num_classes < 2 or not 0 <= smoothing <= 1:
        raise ValueError(f"need num_classes >= 2 and smoothing in [0, 1], got {num_classes}, {smoothing}")
    on, off = 1 - smoothing + smoothing / num_classes, smoothing / num_classes
    return float(-on * math.log(on) - (num_classes - 1) * (off * math.log(off) if off > 0 else 0.0))


def probability_input_floor(num_classes: int) -> float:
    """The lowest cross-entropy when probabilities (values in [0, 1]) are passed as logits: a perfect model
    scores ``log(1 + (C - 1) / e)`` (1.461 for 10 classes), never 0."""
    return math.log1p((num_classes - 1) / math.e)


def classes_of_probability_floor(level: float, classes: int | None = None, tolerance: float = 0.05) -> int | None:
    """The class count ``C`` whose :func:`probability_input_floor` ``level`` sits at (from above, within
    ``tolerance`` relative: a memorising curve approaches it), when the model's class count is known; without
    it, only a level within 1% of a floor counts. A loss stuck there is the signature of probabilities fed to
    cross-entropy."""
    if not math.isfinite(level) or level <= 0 or level > 20:
        return None
    if classes is not None:
        floor = probability_input_floor(classes) if classes >= 2 else math.nan
        return classes if floor <= level <= floor * (1 + tolerance) else None
    c = round(1 + math.e * math.expm1(level))
    return int(c) if c >= 2 and abs(probability_input_floor(c) - level) <= 0.01 * level else None


@dataclass(frozen=True)
class Floor:
    """The floor a loss is judged against, and where it comes from (named in every finding)."""

    value: float
    source: str

    def describe(self) -> str:
        return f"{self.value:.4g} ({self.source})"


def choose_floor(
    declared: float | None,
    smoothing: tuple[int, float] | None = None,
    memorised: float | None = None,
    train_val: tuple[float, float] | None = None,
) -> Floor:
    """The floor from the strongest evidence: a declared value wins; else the highest of the exact floor of
    label smoothing ``(classes, eps)``, the level a one-batch memorisation levelled off at, and a level where
    train and validation loss agree ``(train, val)``; else 0 (a likelihood)."""
    if declared is not None:
        return Floor(float(declared), "set by `floor`")
    candidates = [Floor(0.0, "a likelihood's best")]
    if smoothing is not None:
        c, eps = smoothing
        candidates.append(Floor(label_smoothing_floor(c, eps), f"label smoothing {eps:g} over {c} classes"))
    if memorised is not None and math.isfinite(memorised):
        candidates.append(Floor(memorised, "where one-batch memorisation levels off"))
    if train_val is not None and all(math.isfinite(v) for v in train_val):
        train, val = train_val
        candidates.append(Floor(min(train, val), f"train ~= validation loss ({train:.4g} vs {val:.4g})"))
    return max(candidates, key=lambda f: f.value)


def evidence_floor(
    declared: float | None,
    smoothing: tuple[int, float] | None,
    memorised: float | None,
    bins: np.ndarray,
    start: float | None,
    val_level: float = math.nan,
) -> Floor:
    """:func:`choose_floor` from a run's finite bins; with ``val_level`` (asked only of a flat loss), also where
    train ~= validation, which is the data's floor only once the model learned something (else: stuck at
    chance, below ``LEARNED`` of the start)."""
    level = float(level_of(bins)) if len(bins) else math.nan
    first = start if start is not None else math.nan
    agree = level <= LEARNED * first and agrees(level, val_level, first)
    return choose_floor(declared, smoothing, memorised, (level, val_level) if agree else None)


def agrees(train: float, val: float, start: float, tolerance: float = 0.05) -> bool:
    """Train and validation loss within ``tolerance`` of the starting level of each other (no generalisation
    gap to close, no underfit to explain by overfitting): the level is the data's, if the model can fit."""
    return bool(math.isfinite(train) and math.isfinite(val) and abs(train - val) <= tolerance * abs(start))


def declared_label_smoothing(module: torch.nn.Module) -> tuple[int, float] | None:
    """``(classes, eps)`` when the module declares label smoothing (read from its attributes only): a
    ``label_smoothing`` hyperparameter or
    attribute (its own or a ``config``'s), or a ``CrossEntropyLoss`` submodule with it set. The class count is
    a ``num_classes``/``num_labels`` hyperparameter, else the last ``Linear``'s ``out_features``."""
    hparams = dict(getattr(module, "hparams", {}) or {})
    config = getattr(module, "config", None)
    eps = next(
        (float(v) for v in (hparams.get("label_smoothing"), getattr(module, "label_smoothing", None),
                            getattr(config, "label_smoothing", None)) if isinstance(v, (int, float)) and v > 0),
        None,
    )  # fmt: skip
    if eps is None:
        losses = [m for m in module.modules() if isinstance(m, torch.nn.CrossEntropyLoss) and m.label_smoothing > 0]
        eps = float(losses[0].label_smoothing) if losses else None
    if eps is None:
        return None
    classes = output_classes(module)
    return (classes, eps) if classes is not None else None


def output_classes(module: torch.nn.Module) -> int | None:
    """The module's class count: a ``num_classes``/``num_labels`` hyperparameter, else the last ``Linear``'s
    ``out_features`` (a classifier's head, an LM's vocabulary)."""
    hparams = dict(getattr(module, "hparams", {}) or {})
    classes = hparams.get("num_classes") or hparams.get("num_labels")
    if not isinstance(classes, int):
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        classes = linears[-1].out_features if linears else None
    return int(classes) if isinstance(classes, int) and classes >= 2 else None


# ---------------------------------------------------------------------------------------------- bins
def bin_medians(values: np.ndarray, bin_steps: int) -> np.ndarray:
    """Medians of consecutive blocks of ``bin_steps`` rows of ``values`` (rows, ...); a short last block
    gets its own median. NaN/Inf rows are ignored; an all-NaN bin is NaN."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    full = n // bin_steps * bin_steps
    masked = np.where(np.isfinite(values), values, np.nan)
    blocks = [masked[:full].reshape(-1, bin_steps, *values.shape[1:])]
    out = []
    with np.errstate(all="ignore"):
        if np.isfinite(masked).all():  # np.median's numbers, without its partition-and-mean machinery
            out.append(row_medians(np.moveaxis(blocks[0], 1, -1)))
            if full < n:
                out.append(row_medians(np.moveaxis(masked[full:], 0, -1))[None])
        else:
            out.append(finite_median(blocks[0], axis=1))
            if full < n:
                out.append(finite_median(masked[full:], axis=0)[None])
    return np.concatenate(out) if out else masked[:0]


def rebin(values: np.ndarray, xs: np.ndarray, max_points: int = MAX_TREND_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points along the last axis: medians of equal groups, the oldest remainder dropped."""
    n = values.shape[-1]
    if n <= max_points:
        return values, xs
    g = -(-n // max_points)
    keep = n // g * g
    v = row_medians(values[..., n - keep :].reshape(*values.shape[:-1], -1, g))
    x = xs[..., n - keep :].reshape(*xs.shape[:-1], -1, g).mean(axis=-1)
    return v, x


def spread(bins: np.ndarray, reference: int = 5) -> np.ndarray:
    """The run's noise of a level, along the last axis: the scaled MAD of the bins around their rolling median
    of ``reference`` bins (their local level). Unlike differences of neighbours, this keeps the slow wander of
    autocorrelated noise. 0 with fewer than ``reference + 3`` bins (no estimate yet)."""
    if bins.shape[-1] < reference + 3:
        return np.zeros(bins.shape[:-1])
    local = finite_median(sliding_window_view(bins, reference, axis=-1), -1)
    resid = bins[..., reference - 1 :] - local
    return 1.4826 * finite_median(np.abs(resid), -1)


# ---------------------------------------------------------------------------------------------- trend
@dataclass(frozen=True)
class Trend:
    """Theil-Sen slope with an autocorrelation-widened confidence interval, and the matching Mann-Kendall p."""

    slope: np.ndarray
    low: np.ndarray
    high: np.ndarray
    p_value: np.ndarray


def trend(y: np.ndarray, x: np.ndarray, confidence: float = 0.95) -> Trend:
    """Theil-Sen over the last axis of ``y`` (curves, n), all finite, ``x`` increasing (n,) or like ``y``.

    Sen's interval and the Kendall S test assume independent noise; successive bins of a training loss are
    not, so the variance of S is inflated by ``1 + 2 sum_k (1 - k/n) rho^k`` with ``rho`` the lag-1
    autocorrelation of the residuals (clipped to [0, 0.95]), as in :func:`lightning_debug.stats.trend_autocorrelated`.
    """
    y = np.asarray(y, dtype=float)
    x = np.broadcast_to(np.asarray(x, dtype=float), y.shape)
    n = y.shape[-1]
    i, j = np.triu_indices(n, 1)
    dx, dy = x[..., j] - x[..., i], y[..., j] - y[..., i]
    slopes = dy / dx
    slope = row_medians(slopes)
    intercept = row_medians(y - slope[..., None] * x)
    resid = y - intercept[..., None] - slope[..., None] * x
    resid = resid - resid.mean(axis=-1, keepdims=True)
    denom = (resid**2).sum(axis=-1)
    with np.errstate(all="ignore"):
        rho = np.where(denom > 0, (resid[..., :-1] * resid[..., 1:]).sum(axis=-1) / denom, 0.0)
    rho = np.clip(rho, 0.0, 0.95)
    k = np.arange(1, n)
    inflation = 1 + 2 * ((1 - k / n) * rho[..., None] ** k).sum(axis=-1)
    var_s = n * (n - 1) * (2 * n + 5) / 18.0 * inflation
    sigma = np.sqrt(var_s)
    z = two_sided_z(confidence)
    pairs = len(i)
    lo_i = np.clip(np.round((pairs - z * sigma) / 2).astype(int) - 1, 0, pairs - 1)
    hi_i = np.clip(np.round((pairs + z * sigma) / 2).astype(int), 0, pairs - 1)
    ordered = np.sort(slopes, axis=-1)
    low = np.take_along_axis(ordered, lo_i[..., None], axis=-1)[..., 0]
    high = np.take_along_axis(ordered, hi_i[..., None], axis=-1)[..., 0]
    s = np.sign(dy).sum(axis=-1)
    z_s = np.where(s != 0, (s - np.sign(s)) / sigma, 0.0)
    p = 2 * ndtr(-np.abs(z_s))  # norm.sf's numbers without its argument checks
    return Trend(slope=slope, low=low, high=high, p_value=p)


# ---------------------------------------------------------------------------------------------- divergence
@dataclass(frozen=True)
class JumpVerdict:
    """Per new bin: did the loss jump and stay up? With the levels and the reference it was judged by."""

    fired: np.ndarray  # (..., new) bool
    level: np.ndarray  # (..., new) the jump's level: the median of the JUMP_STEPS before the holding ones
    held: np.ndarray  # (..., new) the level of the last JUMP_STEPS (ending at this bin)
    best: np.ndarray  # (..., new) the lowest reference level before the jump
    spread: np.ndarray  # (...,) the run's bin-to-bin spread before the new bins


def reference_bins(bin_steps: int) -> int:
    """Bins in a reference level: at least REFERENCE_STEPS steps."""
    return max(2, math.ceil(REFERENCE_STEPS / bin_steps))


def _rolling_median(bins: np.ndarray, k: int) -> np.ndarray:
    """Median of the k bins ending at each index (NaN bins ignored); NaN where fewer than k bins exist."""
    out = np.full(bins.shape, np.nan)
    if bins.shape[-1] >= k:
        clean = np.where(np.isfinite(bins), bins, np.nan)
        out[..., k - 1 :] = finite_median(sliding_window_view(clean, k, axis=-1), -1)
    return out


def assess_jump(
    bins: np.ndarray,
    new: int,
    start: np.ndarray | float,
    floor: np.ndarray | float,
    *,
    bin_steps: int = 10,
    factor: float = 3.0,
    margin: float = 0.25,
) -> JumpVerdict:
    """``loss.diverging`` by levels, for each of the last ``new`` bins of ``bins`` (..., m).

    A level is the median of the bins covering ``JUMP_STEPS`` steps. The loss *jumped* when a level is
    ``factor`` times further from ``floor`` than the best reference before it (the start, or the lowest median
    of ``REFERENCE_STEPS`` steps), above that reference by more than ``margin`` of the starting gap and by
    ``SPREAD_Z`` times the run's own spread, and worse than the untrained model (the start) by ``margin``; it
    *stayed up* when the next level is still worse than the start and above the reference by the spread. (A
    slower rise that stays below the start is the trend rule's.) Both are needed: no single bin raises it.
    NaN bins count as missing (``loss.nonfinite`` reports them)."""
    bins = np.asarray(bins, dtype=float)
    m, lead = bins.shape[-1], bins.shape[:-1]
    k = max(1, math.ceil(JUMP_STEPS / bin_steps))
    kr = reference_bins(bin_steps)
    start_ = np.broadcast_to(np.asarray(start, dtype=float), lead)[..., None]
    floor_ = np.broadcast_to(np.asarray(floor, dtype=float), lead)[..., None]
    gap0 = start_ - floor_
    held = _rolling_median(bins, k)
    jumped = np.concatenate([np.full((*lead, k), np.nan), held], axis=-1)[..., :m]  # the level k bins earlier
    ref = np.nan_to_num(_rolling_median(bins, kr), nan=np.inf)
    lowest = np.minimum.accumulate(ref, axis=-1)
    before = np.concatenate([np.full((*lead, 2 * k), np.inf), lowest], axis=-1)[..., :m]  # ends before the jump
    best = np.minimum(before, start_)
    old = bins[..., : max(0, m - new)]
    s = spread(np.where(np.isfinite(old), old, np.nan))
    noise = SPREAD_Z * s[..., None]
    with np.errstate(invalid="ignore"):
        rise = np.maximum(margin * gap0, noise)
        up = (jumped - floor_ > factor * (best - floor_)) & (jumped - best > rise) & (jumped - start_ > margin * gap0)
        stays = (held > start_) & (held - best > noise)
    fired = (gap0 > 0) & up & stays
    sl = slice(m - new, m)
    return JumpVerdict(
        fired=fired[..., sl], level=jumped[..., sl], held=held[..., sl], best=best[..., sl], spread=np.asarray(s)
    )


# ---------------------------------------------------------------------------------------------- verdict
@dataclass(frozen=True)
class LossRules:
    """Thresholds of the trend verdicts, as fractions of the starting gap (first loss minus floor)."""

    min_drop: float = 0.1
    min_progress: float = 0.2
    plateau_level: float = 0.2
    converged_level: float = 0.05
    diverge_margin: float = 0.25
    confidence: float = 0.95
    plateau_checks: int = 2

    def __post_init__(self) -> None:
        """``ValueError`` naming the threshold: every fraction in (0, 1), converged below plateau."""
        for name in ("min_drop", "min_progress", "plateau_level", "converged_level", "diverge_margin", "confidence"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be in (0, 1), got {getattr(self, name)}")
        if self.converged_level >= self.plateau_level:
            raise ValueError(
                f"`converged_level` ({self.converged_level}) must be below `plateau_level` ({self.plateau_level})"
            )


@dataclass(frozen=True)
class LossVerdicts:
    """:func:`assess_loss_batch` over a batch of curves: one verdict code (index into ``VERDICTS``) per curve
    and the evidence behind it, all arrays."""

    code: np.ndarray
    level: np.ndarray
    gap0: np.ndarray
    gap: np.ndarray
    drop: np.ndarray
    trend: Trend
    reachable: np.ndarray
    flat: np.ndarray
    rising: np.ndarray
    plateau_checks: np.ndarray
    far: np.ndarray  # the level is more than plateau_level of the starting gap above the floor


def level_of(bins: np.ndarray) -> np.ndarray:
    """The current level: the median of the last tenth of the bins (2 to 8 of them), not the last bin."""
    m = bins.shape[-1]
    k = int(min(8, max(2, math.ceil(m / 10)))) if m >= 2 else 1
    return row_medians(bins[..., m - k :])


def assess_loss_batch(
    window: np.ndarray,
    window_xs: np.ndarray,
    level: np.ndarray,
    start: np.ndarray | float,
    floor: np.ndarray | float,
    batches: int,
    span: float,
    *,
    rules: LossRules = LossRules(),
    judging: np.ndarray | bool = True,
    final: bool = False,
    plateau_checks: np.ndarray | int = 0,
    excused: np.ndarray | bool = False,
    noise: np.ndarray | float = 0.0,
    patient: np.ndarray | bool = True,
) -> LossVerdicts:
    """The trend verdict at a check, for curves (..., n) of finite bins over the trend window.

    ``judging``: past the warm-up (or the run ended) and the learning rate is not still warming up.
    ``noise``: the run's spread of a level (:func:`spread`); a rise must clear ``SPREAD_Z`` times it.
    ``excused``: a plateau is explained (a component still falls, or the schedule annealed the rate).
    ``patient``: enough of the run has passed (:attr:`Schedule.stuck_after`) to call a flat start stuck mid-run.
    ``final``: the run ended; a plateau needs one check instead of ``rules.plateau_checks``, and a curve with
    no other verdict gets ``still_decreasing``. Priority: diverging, not_decreasing, plateau, converged.
    Over 50 lines for a reason: one vectorised decision over many curves at once (the Monte-Carlo of
    ``tests/rules/simulate.py`` judges thousands per call) whose priorities read in one place.
    """
    start = np.asarray(start, dtype=float)
    floor = np.asarray(floor, dtype=float)
    tr = trend(window, window_xs, rules.confidence)
    gap0, gap = start - floor, level - floor
    drop = start - level
    reachable = np.maximum(0.0, -tr.low) * batches
    flat = (gap > 0) & (reachable < rules.min_progress * gap)
    rise = np.maximum(rules.diverge_margin * gap0, SPREAD_Z * np.asarray(noise))
    rising = (tr.low > 0) & (tr.p_value < 1 - rules.confidence) & (tr.slope * span > rise)
    falling = (tr.high < 0) & (tr.p_value < 1 - rules.confidence)
    # mid-run, a loss that falls significantly is not stuck however slowly (a slow start, an RNN or a transformer
    # before its drop: the next check will tell); at the end an insignificant trend is enough, and so is a fall
    # too slow to matter: there is no later check to wait for
    stuck = np.where(final, flat | ~falling, flat & ~falling)
    with np.errstate(all="ignore"):
        levelled = np.maximum(0.0, -tr.low) < LEVELLED_OFF * drop / max(batches, 1)
    far = gap > rules.plateau_level * gap0
    # a plateau needs the interval itself to be flat, at the end too (an insignificant trend there is as often
    # a healthy loss still on its way down: 4-8% of simulated healthy short runs)
    plateau_now = judging & flat & (drop >= rules.min_drop * gap0) & far & levelled & ~np.asarray(excused)
    streak = np.where(plateau_now, np.asarray(plateau_checks) + 1, 0)
    needed = 1 if final else rules.plateau_checks
    code = np.full(np.broadcast(gap0, gap).shape, NONE)
    code = np.where(judging & (gap <= rules.converged_level * gap0), CONVERGED, code)
    # at the end, a loss that no longer falls and sits within plateau_level of its floor has converged for this run
    code = np.where(judging & final & ~falling & ~far, CONVERGED, code)
    if final:
        code = np.where(code == NONE, STILL_DECREASING, code)
    code = np.where(streak >= needed, PLATEAU, code)
    code = np.where(judging & (final | patient) & stuck & (drop < rules.min_drop * gap0), NOT_DECREASING, code)
    code = np.where(rising, DIVERGING, code)
    code = np.where(gap0 > 0, code, NONE)
    return LossVerdicts(
        code=code,
        level=level,
        gap0=gap0,
        gap=gap,
        drop=drop,
        trend=tr,
        reachable=reachable,
        flat=flat,
        rising=rising,
        plateau_checks=streak,
        far=far,
    )


# ---------------------------------------------------------------------------------------------- a check
def trend_window(
    bins: np.ndarray, xs: np.ndarray, batches: int, span: float, final: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The bins the trend is fitted over: those of the last ``span`` batches, re-binned; at the end of a run
    too short for that, the whole run's. ``bins`` (..., m) finite, ``xs`` (m,) their centres."""
    keep = xs >= batches - span
    window, window_xs = rebin(bins[..., keep], xs[keep])
    if final and window.shape[-1] < MIN_TREND_POINTS:
        window, window_xs = rebin(bins, xs)
    return window, window_xs


def assess_check(
    bins: np.ndarray,
    xs: np.ndarray,
    start: np.ndarray | float,
    floor: np.ndarray | float,
    batches: int,
    span: float,
    *,
    schedule: Schedule,
    rules: LossRules = LossRules(),
    final: bool = False,
    warming: np.ndarray | bool = False,
    excused: np.ndarray | bool = False,
    plateau_checks: np.ndarray | int = 0,
) -> LossVerdicts | None:
    """The trend verdict at one check of the monitor, over the finite bins (..., m) seen so far: ``None`` when
    the window is too short to fit a trend, or at the end of a run too short for a verdict. It judges past
    the warm-up while the learning rate is not ``warming`` (:func:`warming_up`), and at the end."""
    window, window_xs = trend_window(bins, xs, batches, span, final)
    if window.shape[-1] < MIN_TREND_POINTS or (final and batches < MIN_VERDICT_BATCHES):
        return None
    return assess_loss_batch(
        window, window_xs, level_of(bins), start, floor, batches, span, rules=rules,
        judging=final | ((batches >= schedule.warmup) & ~np.asarray(warming)), final=final,
        plateau_checks=plateau_checks, excused=excused, noise=spread(bins), patient=batches >= schedule.stuck_after,
    )  # fmt: skip


def warming_up(lr: np.ndarray | float, before: np.ndarray | float) -> np.ndarray | bool:
    """The learning rate rose since the previous check: a schedule still warming up (no verdict yet)."""
    return np.asarray(lr) > WARMING * np.asarray(before)


def annealed(lr: np.ndarray | float, peak: np.ndarray | float) -> np.ndarray | bool:
    """The schedule took the learning rate well below its peak: that explains a flat loss (no plateau)."""
    return np.asarray(lr) < ANNEALED * np.asarray(peak)


def falls_meaningfully(values: np.ndarray, xs: np.ndarray, batches: int, rules: LossRules = LossRules()) -> bool:
    """A loss component whose trend still falls significantly, by at least ``min_progress`` of its level over
    a run as long again: it carries the progress, so a flat total is no plateau (regularisation keeps it up)."""
    if len(values) < MIN_TREND_POINTS:
        return False
    high, gap = float(trend(values, xs, rules.confidence).high), float(level_of(values))
    return high < 0 and gap > 0 and -high * batches >= rules.min_progress * gap


def plateau_excused(
    lr: float | None,
    peak_lr: float,
    components: list[tuple[np.ndarray, np.ndarray]],
    batches: int,
    rules: LossRules = LossRules(),
) -> bool:
    """A flat total is explained: the schedule annealed the learning rate, or a component (its finite bins
    and centres over the trend window) still falls meaningfully."""
    if lr is not None and annealed(lr, peak_lr):
        return True
    return any(falls_meaningfully(*rebin(values, xs), batches, rules) for values, xs in components)


def first_nonfinite(values: np.ndarray, fresh: int = 0) -> list[tuple[int, int]]:
    """``(series, row)`` of the first NaN/Inf of each column of ``values`` (rows, series) from row ``fresh``."""
    finite = np.isfinite(values[fresh:])
    return [(j, fresh + int(np.argmin(finite[:, j]))) for j in range(values.shape[1]) if not finite[:, j].all()]


def stalled(code: int, far: bool, floor: float, start: float, rules: LossRules = LossRules()) -> bool:
    """A verdict that asks why (the one-batch test runs on it): far from the floor, and for a loss that
    converged, a floor far above 0 (train ~= validation: can the model fit at all?). A rise is no stall."""
    if code == DIVERGING:
        return False
    if code == CONVERGED:
        return floor > rules.plateau_level * start
    return bool(far)


def provisional_stall(check: str, final: bool, test_available: bool, test_failures: Sequence[object]) -> bool:
    """A mid-run ``loss.not_decreasing`` is an info while a one-batch memorisation test (``test_available``, with
    no failure yet) can answer whether the model learns at all; at the end of the run it is a verdict. Healthy
    small transformers and RNNs sit at chance for a third or more of a short run before they take off."""
    return not final and check == "loss.not_decreasing" and test_available and not test_failures
