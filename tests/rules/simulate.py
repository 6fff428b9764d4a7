"""Simulated training-loss curves for the Monte-Carlo tests of ``lightning_debug.rules.loss``, and a replay of
the loss monitor's schedule over them (probes, checks, the final verdict), vectorised over curves.

Healthy curves (each drawn at random, ``healthy``):

- a start level between ln 2 and ln 1000, and a floor: 0 (half), a label-smoothing floor (a quarter, 10-60%
  of the start), or the data's entropy (a quarter, 30-80% of the start);
- a descent towards the floor: exponential, power law ``(1 + t/tau)^-alpha`` with alpha in [0.5, 2]
  (slower power laws close under 20% of the gap per doubling of the run: by definition a plateau), linear
  warm-up + cosine decay (progress follows the integrated learning rate), or a descent that pauses for
  10-25% of the run and resumes;
- noise: multiplicative Student-t (3 degrees of freedom, heavy tails) of scale 2-40% (at most the share of the
  start the model can learn, ``1 - floor/start``: an LM near its entropy has a steady loss), an AR(1) component
  with lag-1 correlation 0-0.95 (momentum, data order), and spikes (0.1-1% of steps, x2-x10).

Faults (``faulty``): ``jump`` (a learning rate far too high: the level multiplies by 5-100 at a random step),
``growing`` (an lr schedule that grows: after descending, the loss rises exponentially to 10x its low),
``flat`` (the loss never moves: dead units, an optimizer without the model's parameters, lr 1e-7), and
``plateau`` (a capacity bottleneck: it falls 30-70% of the way in the first 10-40% of the run, then stays).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lightning_debug.rules import loss as R


@dataclass
class Curves:
    values: np.ndarray  # (N, n) per-step losses
    floor: np.ndarray  # (N,) the floor the monitor judges against (what the evidence gives it)
    lr: np.ndarray  # (N, n) relative learning rate (1 = peak), for the warm-up and annealing guards
    kind: np.ndarray  # (N,) str, the shape that generated each curve


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale: np.ndarray, rho: np.ndarray) -> np.ndarray:
    n_curves, n = shape
    t3 = rng.standard_t(3, size=shape) / math.sqrt(3.0)  # unit variance, heavy tails
    ar = np.empty(shape)
    ar[:, 0] = rng.standard_normal(n_curves)
    eps = rng.standard_normal(shape) * np.sqrt(1 - rho**2)[:, None]
    for t in range(1, n):  # AR(1): a loop over steps, vectorised over curves
        ar[:, t] = rho * ar[:, t - 1] + eps[:, t]
    return scale[:, None] * (0.7 * t3 + 0.7 * ar)


def _spikes(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    rate = rng.uniform(0.001, 0.01, size=shape[0])[:, None]
    hit = rng.random(shape) < rate
    return np.where(hit, rng.uniform(2, 10, size=shape), 1.0)


def _progress(rng: np.random.Generator, n_curves: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fraction of the gap closed at each step (N, n), the relative learning rate, and the shape's name."""
    t = np.arange(n, dtype=float)[None, :]
    kinds = rng.choice(np.array(["exponential", "power", "warmup_cosine", "pause"]), size=n_curves)
    tau = rng.uniform(0.03, 0.5, size=(n_curves, 1)) * n
    progress = 1 - np.exp(-t / tau)
    alpha = rng.uniform(0.5, 2.0, size=(n_curves, 1))
    power = 1 - (1 + t / (tau / 5)) ** -alpha
    warm = rng.uniform(0.0, 0.1, size=(n_curves, 1)) * n + 1
    lr_wc = np.minimum(1.0, (t + 1) / warm) * 0.5 * (1 + np.cos(np.pi * t / n))
    cosine = 1 - np.exp(-np.cumsum(lr_wc, axis=1) / tau)
    pause_at = rng.uniform(0.1, 0.5, size=(n_curves, 1)) * n
    pause_len = rng.uniform(0.1, 0.25, size=(n_curves, 1)) * n
    clock = np.where(t < pause_at, t, np.where(t < pause_at + pause_len, pause_at, t - pause_len))
    paused = 1 - np.exp(-clock / tau)
    out = np.select(
        [(kinds == k)[:, None] for k in ("exponential", "power", "warmup_cosine", "pause")],
        [progress, power, cosine, paused],
    )
    lr = np.where((kinds == "warmup_cosine")[:, None], lr_wc, 1.0)
    return out, np.broadcast_to(lr, (n_curves, n)).copy(), kinds


def _levels_and_noise(
    rng: np.random.Generator, n_curves: int, n: int, level: np.ndarray, noise_max: float | np.ndarray = 0.4
) -> np.ndarray:
    scale = rng.uniform(0.02, 1.0, size=n_curves) * noise_max
    rho = rng.uniform(0.0, 0.95, size=n_curves)
    return level * np.exp(_noise(rng, (n_curves, n), scale, rho)) * _spikes(rng, (n_curves, n))


def healthy(n_curves: int, n: int, seed: int = 0) -> Curves:
    rng = np.random.default_rng(seed)
    start = np.exp(rng.uniform(math.log(math.log(2)), math.log(math.log(1000)), size=n_curves))
    which = rng.choice(3, size=n_curves, p=[0.5, 0.25, 0.25])
    floor = np.select(
        [which == 0, which == 1],
        [0.0, rng.uniform(0.1, 0.6, n_curves) * start],
        rng.uniform(0.3, 0.8, n_curves) * start,
    )
    progress, lr, kinds = _progress(rng, n_curves, n)
    level = floor[:, None] + (start - floor)[:, None] * (1 - progress)
    # the relative noise of a batch's loss is at most the relative gap the model can close (40% at most)
    values = _levels_and_noise(rng, n_curves, n, level, noise_max=np.minimum(0.4, 1 - floor / start))
    values[:, 0] = start * np.exp(0.05 * rng.standard_normal(n_curves))  # an untrained model: ~ln C on any batch
    return Curves(values=values, floor=floor, lr=lr, kind=kinds)


def faulty(kind: str, n_curves: int, n: int, seed: int = 0) -> Curves:
    rng = np.random.default_rng(seed)
    start = np.exp(rng.uniform(math.log(math.log(2)), math.log(math.log(1000)), size=n_curves))
    t = np.arange(n, dtype=float)[None, :]
    tau = rng.uniform(0.03, 0.3, size=(n_curves, 1)) * n
    healthy_level = start[:, None] * np.exp(-t / tau)
    if kind == "jump":
        at = rng.uniform(0.0, 0.7, size=(n_curves, 1)) * n
        level = np.where(t < at, healthy_level, start[:, None] * rng.uniform(5, 100, size=(n_curves, 1)))
    elif kind == "growing":
        low_at = rng.uniform(0.2, 0.6, size=(n_curves, 1)) * n
        low = start[:, None] * np.exp(-low_at / tau)
        rate = np.log(10 * start[:, None] / low) / (n - low_at)
        level = np.where(t < low_at, healthy_level, low * np.exp(rate * (t - low_at)))
    elif kind == "flat":
        level = np.broadcast_to(start[:, None], (n_curves, n)) * (1 - rng.uniform(0, 0.03, (n_curves, 1)) * t / n)
    elif kind == "plateau":
        depth = rng.uniform(0.3, 0.7, size=(n_curves, 1))
        reach = rng.uniform(0.1, 0.4, size=(n_curves, 1)) * n
        level = start[:, None] * (1 - depth * (1 - np.exp(-t / (reach / 4))))
    else:
        raise ValueError(kind)
    values = _levels_and_noise(rng, n_curves, n, level, noise_max=0.2)
    values[:, 0] = start  # the first loss is the untrained model's
    return Curves(values=values, floor=np.zeros(n_curves), lr=np.ones((n_curves, n)), kind=np.full(n_curves, kind))


@dataclass
class Replay:
    first: np.ndarray  # (N,) int: the first verdict code fired (R.NONE if none)
    at: np.ndarray  # (N,) int: the batch it fired at (-1 if none)
    codes: np.ndarray  # (N, len(R.VERDICTS)) bool: every verdict fired at some point


def replay(curves: Curves, rules: R.LossRules | None = None) -> Replay:
    """Run the monitor's decisions over the curves as ``LossConvergenceMonitor`` does: the jump rule on new bins
    at every probe and check, the check's trend verdict (:func:`R.assess_check`, the monitor's own) at every
    check and at the end (``n`` = the planned length)."""
    rules = rules or R.LossRules()
    values = curves.values
    n_curves, n = values.shape
    sched = R.schedule_for(n)
    b = sched.bin_steps
    m_all = n // b
    bins = np.median(values[:, : m_all * b].reshape(n_curves, m_all, b), axis=2)
    xs = np.arange(m_all) * b + (b + 1) / 2
    start = values[:, 0]
    first = np.full(n_curves, R.NONE)
    at = np.full(n_curves, -1)
    codes = np.zeros((n_curves, len(R.VERDICTS)), dtype=bool)
    streak = np.zeros(n_curves, dtype=int)
    checks = sorted(set(range(sched.check_every, n + 1, sched.check_every)) | {n})
    points = [(p, False) for p in sched.probes()] + [(c, True) for c in checks]
    seen_bins, peak = 0, np.zeros(n_curves)
    for batches, is_check in points:
        m = batches // b
        new = m - seen_bins
        peak = np.maximum(peak, curves.lr[:, :batches].max(axis=1))
        fired_codes = np.full(n_curves, R.NONE)
        if new > 0:
            jump = R.assess_jump(bins[:, :m], new, start, curves.floor, bin_steps=b, margin=rules.diverge_margin)
            fired_codes = np.where(jump.fired.any(axis=1), R.DIVERGING, fired_codes)
            seen_bins = m
        if is_check:
            lr_now, lr_before = curves.lr[:, batches - 1], curves.lr[:, max(0, batches - sched.check_every - 1)]
            v = R.assess_check(
                bins[:, :m], xs[:m], start, curves.floor, batches, batches / 2, schedule=sched, rules=rules,
                final=batches == n, warming=R.warming_up(lr_now, lr_before), excused=R.annealed(lr_now, peak),
                plateau_checks=streak,
            )  # fmt: skip
            if v is not None:
                streak = v.plateau_checks
                fired_codes = np.where(fired_codes == R.NONE, v.code, fired_codes)
        codes[np.arange(n_curves), fired_codes] = True
        new_first = (first == R.NONE) & (fired_codes != R.NONE) & (fired_codes != R.STILL_DECREASING)
        first = np.where(new_first, fired_codes, first)
        at = np.where(new_first, batches, at)
    return Replay(first=first, at=at, codes=codes)


def table(n_curves: int = 10_000, lengths: tuple[int, ...] = (30, 60, 200, 1000, 3000)) -> str:
    """False-alarm rates on healthy curves and powers on faults per run length, as a Markdown table."""
    verdict = {"jump": "diverging", "growing": "diverging", "flat": "not_decreasing", "plateau": "plateau"}
    rows = ["| steps | healthy: diverging | not_decreasing | plateau | " + " | ".join(verdict) + " |"]
    rows.append("|---" * (4 + len(verdict)) + "|")
    for n in lengths:
        h = replay(healthy(n_curves, n, seed=n)).codes
        cells = [f"{h[:, R.VERDICTS.index(k)].mean():.2%}" for k in ("diverging", "not_decreasing", "plateau")]
        for fault, k in verdict.items():
            f = replay(faulty(fault, n_curves, n, seed=n + 1)).codes
            cells.append(f"{f[:, R.VERDICTS.index(k)].mean():.1%}")
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":  # python tests/rules/simulate.py [n_curves]
    import sys

    print(table(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000))
