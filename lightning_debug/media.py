"""Figures, drawn with matplotlib (the ``plots`` extra) and only when asked for.

Nothing here is imported on the training path: :class:`~lightning_debug.sinks.Sink` calls these functions
lazily (``Sink.log_figure(key, draw)``), and each imports matplotlib inside. A figure costs 0.3-0.7 s to draw,
so callbacks draw them rarely (calibration every N epochs, grokking at the end of fit and only without W&B,
which gets native charts instead).
"""

from __future__ import annotations

from typing import Any


def reliability_figure(
    edges: list[float], counts: list[float], accs: list[float], confs: list[float], s: dict[str, float], epoch: int
) -> Any:
    """Guo et al.'s Fig. 1 for one epoch: confidence histogram above, reliability diagram below."""
    import matplotlib.pyplot as plt

    width = edges[1] - edges[0]
    lefts = edges[:-1]
    total = max(sum(counts), 1.0)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 7), sharex=True, gridspec_kw={"height_ratios": [1, 2]})
    top.bar(lefts, [c / total for c in counts], width=width, align="edge", edgecolor="black", color="tab:blue")
    top.axvline(s["accuracy"], color="black", linestyle="--", label=f"accuracy {s['accuracy']:.3f}")
    top.axvline(s["confidence"], color="tab:red", linestyle="--", label=f"avg confidence {s['confidence']:.3f}")
    top.set_ylabel("fraction of predictions")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"Calibration, epoch {epoch}")
    filled = [c > 0 for c in counts]
    bar_acc = [a if f else 0.0 for a, f in zip(accs, filled, strict=True)]
    bottom.bar(lefts, bar_acc, width=width, align="edge", edgecolor="black", color="tab:blue", label="accuracy")
    gap_base = [min(a, c) if f else 0.0 for a, c, f in zip(accs, confs, filled, strict=True)]
    gap_h = [abs(c - a) if f else 0.0 for a, c, f in zip(accs, confs, filled, strict=True)]
    bottom.bar(
        lefts, gap_h, bottom=gap_base, width=width, align="edge", color="tab:red", alpha=0.3, hatch="//", label="gap"
    )
    bottom.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfect calibration")
    for left, acc, c in zip(lefts, accs, counts, strict=True):
        if c > 0:
            bottom.text(left + width / 2, min(acc, 0.97) + 0.01, f"{int(c)}", ha="center", fontsize=6)
    bottom.set_xlim(0, 1)
    bottom.set_ylim(0, 1.05)
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("accuracy")
    bottom.legend(loc="upper left", fontsize=8, title=f"ECE {s['ece']:.3f}  MCE {s['mce']:.3f}")
    fig.tight_layout()
    return fig


def grokking_figure(
    records: list[dict[str, float]],
    norms: list[tuple[int, float]],
    memorized: int | None,
    generalized: int | None,
) -> Any:
    """Metric, loss and weight norm against a log step axis, with the memorisation/generalisation steps."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    for ax, names in zip(axes[:2], (("train_acc", "val_acc"), ("train_loss", "val_loss")), strict=True):
        for name in names:
            pts = [(x["step"] + 1, x[name]) for x in records if name in x]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", label=name)
        ax.legend(loc="best", fontsize=8)
    axes[0].set_ylabel("metric")
    axes[1].set_ylabel("loss")
    axes[1].set_yscale("log")
    if norms:
        axes[2].plot([s + 1 for s, _ in norms], [v for _, v in norms], color="gray")
    axes[2].set_ylabel("L2 weight norm")
    axes[2].set_xlabel("step + 1 (log scale)")
    axes[2].set_xscale("log")
    for step, label, color in ((memorized, "memorised", "tab:orange"), (generalized, "generalised", "tab:green")):
        if step is not None:
            for ax in axes:
                ax.axvline(step + 1, color=color, linestyle="--", linewidth=1)
            axes[0].text(step + 1, 0.5, f" {label}\n step {step}", color=color, fontsize=8)
    axes[0].set_title("Grokking curves")
    fig.tight_layout()
    return fig


# viridis at 0, 1/4, 1/2, 3/4, 1: enough stops for a readable heat map without importing matplotlib
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def heatmap_pixels(panels: dict[str, Any], cell: int = 8, width: int = 512) -> Any:
    """Stacked heat maps (title -> (rows, columns) array, NaN grey) as an RGB ``uint8`` array, each panel scaled
    to its own finite range, in numpy alone: milliseconds where a labelled matplotlib figure costs 0.3-0.7 s."""
    import numpy as np

    stops = np.asarray(_VIRIDIS, dtype=float)
    out = []
    for values in panels.values():
        v = np.asarray(values, dtype=float)
        finite = np.isfinite(v)
        lo, hi = (v[finite].min(), v[finite].max()) if finite.any() else (0.0, 1.0)
        t = np.where(finite, (v - lo) / (hi - lo if hi > lo else 1.0), 0.0) * (len(stops) - 1)
        k = np.clip(np.floor(t).astype(int), 0, len(stops) - 2)
        rgb = stops[k] + (t - k)[..., None] * (stops[k + 1] - stops[k])
        rgb[~finite] = 128
        wide = max(1, width // max(v.shape[1], 1))
        out += [np.repeat(np.repeat(rgb, cell, axis=0), wide, axis=1), np.full((4, v.shape[1] * wide, 3), 255.0)]
    return np.concatenate(out[:-1]).astype(np.uint8)
