"""Thresholds of ``ModelHealthCheck``: false alarms on healthy runs, recall on injected faults.

    nice -n 10 python benchmarks/health_thresholds.py                  # seeds 2-4 (report), all set-ups
    nice -n 10 python benchmarks/health_thresholds.py --seeds 0 1      # the tuning seeds
    python benchmarks/health_thresholds.py --only mlp_adam gru --seeds 0 --json out/h.json
    python benchmarks/health_thresholds.py --merge out/a.json out/b.json   # one summary of runs made in parts

Ground truth is by construction: a healthy set-up has no injected fault, a faulty one has exactly the fault its
name says (each builder below injects it without the library). For every run it records the findings at
warning level or above and the statistics the thresholds bound (largest dead/saturated share, loss gap at
init, smallest vanishing ratio, largest norm growth, update ratios, clipping share), so the thresholds in
``lightning_debug/rules/health.py`` can be read against their distributions. Tune on seeds 0-1, report on 2-4.
Rates come with Wilson 95% intervals. Healthy: MLP / deep MLP / MLP+BN+dropout / CNN+BN / GRU on digits and a
tiny GPT-2 LM, SGD / Adam / AdamW, constant, warm-up+cosine and one-cycle schedules, batch sizes 8-128, clipping
on and off, 1-10 epochs.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from lightning_debug.callbacks.health import ModelHealthCheck
from lightning_debug.demos.digits import DigitsMLP, loaders
from lightning_debug.health_probes import columns
from lightning_debug.rules import health as rules


class _Digits(pl.LightningModule):
    """A digits classifier around any ``net`` taking (B, 64) inputs."""

    def __init__(self, net: nn.Module, lr: float = 1e-3, optimizer: str = "adam") -> None:
        super().__init__()
        self.net, self.lr, self.optimizer = net, lr, optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class _Image(nn.Module):
    def __init__(self, scale_bias: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(16 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.view(-1, 1, 8, 8)).flatten(1))


class _Rows(nn.Module):
    """The 8 rows of a digit as a sequence: a GRU, or a ReLU RNN whose recurrent weights can be scaled up."""

    def __init__(self, kind: str = "gru", hh_scale: float = 1.0) -> None:
        super().__init__()
        self.rnn: nn.Module = (
            nn.GRU(8, 32, batch_first=True) if kind == "gru" else nn.RNN(8, 64, nonlinearity="relu", batch_first=True)
        )
        if hh_scale != 1.0:
            with torch.no_grad():
                nn.init.orthogonal_(self.rnn.weight_hh_l0).mul_(hh_scale)  # type: ignore[arg-type]
        self.head = nn.Linear(self.rnn.hidden_size, 10)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 8, 8).repeat(1, 4, 1)  # 32 steps
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _mlp(widths: tuple[int, ...], act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip((64, *widths), widths, strict=False):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], 10))


def _scheduled(module: pl.LightningModule, kind: str, steps: int) -> pl.LightningModule:
    """Wrap the module's optimizer with a per-step schedule: warm-up + cosine, or one-cycle."""
    base = module.configure_optimizers

    def configure() -> Any:
        opt = base()
        if kind == "cosine":
            warm = torch.optim.lr_scheduler.LinearLR(opt, 0.01, 1.0, total_iters=max(steps // 10, 1))
            cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps - steps // 10, 1))
            sched: Any = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], [max(steps // 10, 1)])
        else:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=steps + 1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    module.configure_optimizers = configure  # type: ignore[method-assign]
    return module


class _NotInOptimizer(DigitsMLP):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net[0].parameters(), lr=1e-2)  # the output layer is left out


class _Unused(DigitsMLP):
    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(64, 64)  # defined, optimised, never used in forward


class _Stale(DigitsMLP):
    def __init__(self) -> None:
        super().__init__()
        self.captured = list(self.parameters())  # like an optimizer built before the head was replaced
        self.net[2] = nn.Linear(64, 10)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.captured, lr=1e-2)


def _dead_init() -> pl.LightningModule:
    m = DigitsMLP(hidden=(64, 64))
    with torch.no_grad():
        m.net[0].bias.fill_(-4.0)
    return m


def _saturated_init() -> pl.LightningModule:
    net = _mlp((64, 64), nn.Tanh)
    with torch.no_grad():
        net[2].weight.mul_(60.0)
    return _Digits(net)


def _logit_scale() -> pl.LightningModule:
    m = DigitsMLP()
    with torch.no_grad():
        m.net[-1].weight.mul_(40.0)
    return m


def _gpt2(**kw: Any) -> tuple[pl.LightningModule, Any]:
    from lightning_debug.demos.lm import TinyGPT2LM, lm_loaders

    train, _ = lm_loaders(n_train=1024)
    return TinyGPT2LM(**kw), train


# name -> (builder(seed) -> (module, train loader), trainer kwargs, expected finding or None for healthy)
Builder = Callable[[], tuple[pl.LightningModule, Any]]


def _d(make: Callable[[], pl.LightningModule], batch_size: int = 32) -> Builder:
    return lambda: (make(), loaders(batch_size=batch_size)[0])


# a gradient fault's run lasts one check interval of the default check: its finding must come within it
INTERVAL = ModelHealthCheck().check_every_n_steps

SETUPS: dict[str, tuple[Builder, dict[str, Any], str | None]] = {
    "mlp_adam": (_d(lambda: DigitsMLP(hidden=(128,), lr=3e-3)), {"max_epochs": 4}, None),
    "mlp_adam_1e-2": (_d(lambda: DigitsMLP()), {"max_epochs": 4}, None),
    "mlp_sgd": (_d(lambda: DigitsMLP(optimizer="sgd", lr=0.1)), {"max_epochs": 4}, None),
    "mlp_bn_dropout_long": (
        _d(lambda: DigitsMLP(hidden=(128, 64), batchnorm=True, dropout=0.2, lr=1e-3), 128),
        {"max_epochs": 40},
        None,
    ),
    "mlp_bs8": (_d(lambda: DigitsMLP(lr=1e-3), 8), {"max_epochs": 2}, None),
    "mlp_short": (_d(lambda: DigitsMLP(lr=3e-3)), {"max_epochs": 1}, None),
    "mlp_clip": (_d(lambda: DigitsMLP(lr=3e-3)), {"max_epochs": 4, "gradient_clip_val": 1.0}, None),
    "mlp_tanh": (_d(lambda: _Digits(_mlp((64, 64), nn.Tanh), 1e-3)), {"max_epochs": 3}, None),
    "deep_mlp": (_d(lambda: _Digits(_mlp((64, 64, 64, 64)), lr=1e-3)), {"max_epochs": 4}, None),
    "mlp_cosine": (_d(lambda: _scheduled(_Digits(_mlp((64,)), 0.05, "sgd"), "cosine", 150)), {"max_steps": 150}, None),
    "mlp_onecycle": (_d(lambda: _scheduled(_Digits(_mlp((128,)), 3e-3), "onecycle", 300)), {"max_steps": 300}, None),
    "cnn_bn": (_d(lambda: _Digits(_Image(), 1e-3)), {"max_epochs": 3}, None),
    "cnn_bn_sgd": (_d(lambda: _Digits(_Image(), 0.05, "sgd")), {"max_epochs": 3}, None),
    "gru": (_d(lambda: _Digits(_Rows("gru"), 3e-3)), {"max_epochs": 3}, None),
    "gpt2": (lambda: _gpt2(), {"max_steps": 200}, None),
    "gpt2_clip_cosine": (
        lambda: (lambda m, t: (_scheduled(m, "cosine", 200), t))(*_gpt2()),
        {"max_steps": 200, "gradient_clip_val": 1.0},
        None,
    ),
    # faults
    "dead_init": (_d(_dead_init), {"max_steps": 20}, "init.dead_units"),
    "saturated_init": (_d(_saturated_init), {"max_steps": 20}, "init.saturated_units"),
    "logit_scale": (_d(_logit_scale), {"max_steps": 20}, "init.loss_off_chance"),
    "not_in_optimizer": (_d(_NotInOptimizer), {"max_steps": 20}, "setup.params_not_in_optimizer"),
    "unused_params": (_d(_Unused), {"max_steps": 20}, "setup.optimizer_params_unused"),
    "stale_optimizer": (_d(_Stale), {"max_steps": 20}, "setup.optimizer_params_unused"),
    "lr_too_high_adam": (_d(lambda: DigitsMLP(lr=3.0)), {"max_steps": INTERVAL}, "grad.update_ratio"),
    "lr_too_high_sgd": (_d(lambda: DigitsMLP(optimizer="sgd", lr=30.0)), {"max_steps": INTERVAL}, "grad.update_ratio"),
    "lr_too_low": (_d(lambda: DigitsMLP(optimizer="sgd", lr=1e-7)), {"max_steps": INTERVAL}, "grad.update_ratio"),
    "exploding_rnn": (_d(lambda: _Digits(_Rows("rnn"), 0.2, "sgd")), {"max_steps": INTERVAL}, "grad.exploding"),
    "vanishing_sigmoid": (
        _d(lambda: _Digits(_mlp((32,) * 10, nn.Sigmoid), 0.1, "sgd")),
        {"max_steps": INTERVAL},
        "grad.vanishing",
    ),
    "clip_too_low": (
        _d(lambda: DigitsMLP(lr=3e-3)),
        {"max_steps": INTERVAL, "gradient_clip_val": 1e-3},
        "grad.clipping_always",
    ),
}


def run(name: str, seed: int, root: str) -> dict[str, Any]:
    build, trainer_kwargs, expected = SETUPS[name]
    pl.seed_everything(seed, verbose=False)
    module, train = build()
    cb = ModelHealthCheck(verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root,
        callbacks=[cb], **trainer_kwargs,
    )  # fmt: skip
    began = time.perf_counter()
    trainer.fit(module, train)
    warned = sorted({f.check for f in cb.findings if f.severity.rank >= 1})
    return {
        "setup": name,
        "seed": seed,
        "expected": expected,
        "warnings": warned,
        "layers": {f.check: f.data.get("layer") for f in cb.findings if f.severity.rank >= 1},
        "first_step": {f.check: f.step for f in cb.findings if f.severity.rank >= 1},
        "stats": statistics(cb),
        "seconds": time.perf_counter() - began,
    }


def statistics(cb: ModelHealthCheck) -> dict[str, float]:
    """The statistics each threshold bounds, at their worst over the run's check windows."""
    out: dict[str, float] = {
        "unit_share": max(cb.evidence.get("units", {}).values(), default=0.0),
        "init_gap": cb.evidence.get("init_gap", math.nan),
    }
    rows = np.asarray(cb.history["row"])
    if not len(rows):
        return out
    c = columns(rows, len(cb.layers))
    per = cb.check_every_n_steps // cb.sample_every_n_steps
    van, high, low, clip = [], [], [], []
    lrs = np.asarray(cb.history["lr"])
    for start in range(0, len(rows) - rules.MIN_SAMPLES + 1, per):
        w = slice(start, start + per)
        v = rules.vanishing(c["norm"][w] / np.sqrt(np.maximum(cb.sampler.numel, 1)), cb.layers)
        van.append(v.log10_ratio)
        u = rules.update_ratio(c["ratio"][w], cb.layers, lrs[w], cb.peak_lr)
        high.append(float(np.nanmax(c["ratio"][w])) if np.isfinite(c["ratio"][w]).any() else math.nan)
        steady = lrs[w][-1] >= rules.ANNEALED * cb.peak_lr and lrs[w][-1] <= lrs[w][0]
        low.append(u.median if steady else math.nan)
        clip.append(float(np.mean(c["clip"][w])))
    growth = rules.exploding(c["total"], c["loss"]).growth
    out.update(
        vanishing_log10=float(np.nanmin(van)) if van else math.nan,
        growth=growth,
        ratio_high=float(np.nanmax(high)) if np.isfinite(high).any() else math.nan,
        ratio_low=float(np.nanmin(low)) if np.isfinite(low).any() else math.nan,
        clip_share=float(np.nanmax(clip)) if clip else math.nan,
    )
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    healthy = [r for r in results if r["expected"] is None]
    faulty = [r for r in results if r["expected"] is not None]
    ids = sorted({c for r in results for c in r["warnings"]} | {r["expected"] for r in faulty})
    far = {}
    for check in ids:
        k = sum(check in r["warnings"] for r in healthy)
        far[check] = {
            "alarms": k,
            "runs": len(healthy),
            "rate": k / max(len(healthy), 1),
            "wilson95": wilson(k, len(healthy)),
        }
    k_any = sum(bool(r["warnings"]) for r in healthy)
    recall: dict[str, Any] = {}
    for name in sorted({r["setup"] for r in faulty}):
        rs = [r for r in faulty if r["setup"] == name]
        k = sum(r["expected"] in r["warnings"] for r in rs)
        recall[name] = {
            "expected": rs[0]["expected"],
            "caught": k,
            "runs": len(rs),
            "wilson95": wilson(k, len(rs)),
            "layers": [r["layers"].get(r["expected"]) for r in rs],
            "steps": [r["first_step"].get(r["expected"]) for r in rs],
            "other_warnings": sorted({c for r in rs for c in r["warnings"] if c != r["expected"]}),
        }
    k_all = sum(r["expected"] in r["warnings"] for r in faulty)
    return {
        "healthy_runs": len(healthy),
        "healthy_any_warning": {
            "alarms": k_any,
            "rate": k_any / max(len(healthy), 1),
            "wilson95": wilson(k_any, len(healthy)),
        },
        "false_alarms": far,
        "recall": recall,
        "recall_all": {"caught": k_all, "runs": len(faulty), "wilson95": wilson(k_all, len(faulty))},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--only", nargs="+", choices=sorted(SETUPS))
    parser.add_argument("--json")
    parser.add_argument("--merge", nargs="+", help="summarise the results of earlier --json files instead of running")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.merge:
        merged = [r for path in args.merge for r in json.loads(Path(path).read_text())["results"]]
        summary = summarise(merged)
        print(json.dumps(summary, indent=1, default=str))
        return summary
    results = []
    with tempfile.TemporaryDirectory() as root:
        for name in args.only or SETUPS:
            for seed in args.seeds:
                r = run(name, seed, root)
                results.append(r)
                stats = ", ".join(f"{k}={v:.3g}" for k, v in r["stats"].items())
                print(f"{name:>20} seed {seed}: warnings {r['warnings']} ({r['seconds']:.1f} s) {stats}", flush=True)
    summary = summarise(results)
    print(json.dumps(summary, indent=1, default=str))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results, "summary": summary}, fh, indent=1, default=str)
    return summary


if __name__ == "__main__":
    main()
