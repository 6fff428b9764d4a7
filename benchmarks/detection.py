"""Detection benchmark: what the default suite catches on runs it has never seen, and what it says about healthy ones.

    python benchmarks/detection.py                      # the report set (224 scenarios, 2 workers)
    python benchmarks/detection.py --quick              # 24 short tune-set scenarios, a few minutes
    python benchmarks/detection.py --set tune           # the tune set: use it freely to tune rules
    python benchmarks/detection.py --smoke              # the 15 fixed scenarios of the first benchmark
    python benchmarks/detection.py --only report-healthy-lstm-34   # one scenario again (its id in the log)
    python benchmarks/detection.py --verify             # re-derive every ground truth with a bare run
    python benchmarks/detection.py --truth-only         # only the ground truths not cached yet (no suite runs)

A scenario is a sampled set-up (architecture, data size, batch 4-512, 30-3000 optimizer steps, optimizer and
schedule, precision, regularisation, accumulation, seed; ``scenarios.py``) x one of 18 injected faults or none.
Its ground truth comes WITHOUT the library (``evidence.py``): a bare run plus direct probes must show the fault's
symptom, or, for a healthy scenario, reach its task's stated metric with finite losses. Scenarios whose evidence
fails are reported as invalid and excluded. Ground truths are cached in ``detection_truth.json`` (keyed by the
full set-up); ``--verify`` recomputes them all and reports disagreements, ``--write-truth`` stores new ones.

Then the suite, ``debug_callbacks(metric, mode)`` with default settings (plus ``--extra module:factory``
callbacks, if any), trains the same scenario. A fault counts as detected when any finding id listed for it
appears (``scenarios.FAULTS``); a healthy run has a false alarm when any finding is a warning or an error.
Output: recall per fault type and overall, the false-alarm rate (which ids on which set-ups), Wilson 95%
intervals, median detection latency in steps, runs stopped by a finding, CPU seconds per run.

**Seed sets.** ``tune`` (seeds from 100000) may be used freely to tune rules and defaults. ``report`` (seeds
from 1) is only measured, never tuned on: the numbers in docs/detection.md come from it. ``--quick`` takes its
24 scenarios from the tune set. ``holdout`` (seeds from 200000, the report set's size) is a fresh set for when the
report set has informed a change: measured once, on the final code, never looked at before. ``holdout2`` (seeds
from 300000), ``holdout3`` (400000) and ``holdout4`` (500000), the same size, are the next fresh sets, each for
when the one before it has informed a change in turn.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `lightning_debug` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRUTH_FILE = Path(__file__).with_name("detection_truth.json")
SEED_BASE = {
    "report": 1,
    "tune": 100_000,
    "holdout": 200_000,
    "holdout2": 300_000,
    "holdout3": 400_000,
    "holdout4": 500_000,
}
PER_FAULT = {"report": 8, "tune": 4, "holdout": 8, "holdout2": 8, "holdout3": 8, "holdout4": 8}
HEALTHY_SAMPLED = {"report": 68, "tune": 30, "holdout": 68, "holdout2": 68, "holdout3": 68, "holdout4": 68}
HEALTHY_ARCHS = ("mlp", "mlp", "cnn", "gru", "lstm", "rnn", "attnpool", "bert", "gpt2", "bart")


# ---- the scenario list --------------------------------------------------------------------------------------------


def scenario_list(seed_set: str, quick: bool = False) -> list[dict[str, Any]]:
    """Deterministic scenarios of a seed set: ``{"id", "setup", "fault"}`` with the set-up as a plain dict."""
    from benchmarks.scenarios import ARCHS, FAULTS, apply_fault, entropy_lm_setup, incident_setup, sample_setup

    base, out = SEED_BASE[seed_set], []
    max_steps = 300 if quick else None
    per_fault = 1 if quick else PER_FAULT[seed_set]
    for f_index, fault in enumerate(FAULTS.values()):
        for i in range(per_fault):
            rng = random.Random(f"{seed_set}:{fault.name}:{i}")
            seed = base + 1000 * (f_index + 1) + i
            arch = fault.archs[i % len(fault.archs)] if i < len(fault.archs) else rng.choice(fault.archs)
            setup = apply_fault(sample_setup(rng, arch, seed, max_steps), fault.name, rng)
            out.append({"id": f"{seed_set}-{fault.name}-{i}", "setup": setup.to_dict(), "fault": fault.name})
    n_incident, n_lm = (1, 1) if quick else ((8, 4) if seed_set.startswith(("report", "holdout")) else (2, 2))
    for i in range(n_incident):
        setup = incident_setup(base + i)
        if quick:
            setup = incident_setup(base + i).__class__(**{**setup.to_dict(), "steps": 300})
        out.append({"id": f"{seed_set}-healthy-incident-{i}", "setup": setup.to_dict(), "fault": None})
    for i in range(n_lm):
        setup = entropy_lm_setup(base + 100 + i, label_smoothing=0.1 if i % 2 else 0.0)
        out.append({"id": f"{seed_set}-healthy-entropy_lm-{i}", "setup": setup.to_dict(), "fault": None})
    for i in range(4 if quick else HEALTHY_SAMPLED[seed_set]):
        rng = random.Random(f"{seed_set}:healthy:{i}")
        arch = HEALTHY_ARCHS[i % len(HEALTHY_ARCHS)]
        if quick and ARCHS[arch]["steps"][1] > 1000:
            arch = "mlp"
        setup = sample_setup(rng, arch, base + 500 + i, max_steps)
        out.append({"id": f"{seed_set}-healthy-{arch}-{i}", "setup": setup.to_dict(), "fault": None})
    return out


# ---- one scenario (runs in a worker process) ------------------------------------------------------------------------


def _worker_init() -> None:
    import os

    import torch

    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the runs' own console output; progress comes from the parent

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def ground_truth(job: dict[str, Any]) -> dict[str, Any]:
    """A bare run and the probes, judged by the evidence rules (no library involved)."""
    from benchmarks.evidence import bare_run, onset_step, verdict
    from benchmarks.scenarios import FAULTS, Setup

    setup, fault = Setup(**job["setup"]), job["fault"]
    start = time.process_time()
    ev = bare_run(setup, fault)
    valid, text = verdict(setup, fault, FAULTS[fault].evidence if fault else None, ev)
    return {
        "setup": job["setup"],
        "fault": fault,
        "valid": bool(valid),
        "evidence": text,
        "onset_step": onset_step(fault, ev),
        "bare_cpu_seconds": round(time.process_time() - start, 2),
    }


def suite_run(job: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """The scenario trained with ``debug_callbacks(metric, mode)`` (defaults) plus the ``extra`` factories."""
    import lightning.pytorch as pl

    from benchmarks.evidence import trainer_for
    from benchmarks.models import build
    from benchmarks.scenarios import TASKS, Setup
    from lightning_debug import debug_callbacks
    from lightning_debug.base import debug_callbacks_of

    setup = Setup(**job["setup"])
    metric, mode = TASKS[setup.task][:2]
    pl.seed_everything(setup.seed, verbose=False)
    module, train, val, kwargs = build(setup, job["fault"])
    callbacks = debug_callbacks(metric, mode, report={"print_table": False}) + [_factory(e)() for e in extra]
    start, wall = time.process_time(), time.perf_counter()
    crash = None
    with tempfile.TemporaryDirectory() as root:
        trainer = trainer_for(root, callbacks, kwargs)
        try:
            trainer.fit(module, train, val)
        except Exception as err:  # a lost run is the worst outcome: it is scored, not hidden
            crash = f"{type(err).__name__}: {err}"[:300]
    findings = [f for cb in debug_callbacks_of(trainer) for f in cb.findings]
    stops = [f.data.get("reason", "") for f in findings if f.check == "stop.early"]
    return {
        "findings": [
            {"id": f.check, "severity": f.severity.value, "step": f.step, "count": f.count, "message": f.message[:400]}
            for f in findings
        ],
        "stopped_by": next((r[8:] for r in stops if r.startswith("finding:")), None),
        "steps_run": int(trainer.global_step),
        "crash": crash,
        "suite_cpu_seconds": round(time.process_time() - start, 2),
        "suite_wall_seconds": round(time.perf_counter() - wall, 2),
    }


def _factory(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def run_job(args: tuple[dict[str, Any], dict[str, Any] | None, list[str], bool]) -> dict[str, Any]:
    job, truth, extra, verify = args
    result = {"id": job["id"], "fault": job["fault"], "setup": job["setup"]}
    if truth is None or verify:
        fresh = ground_truth(job)
        if truth is not None and fresh["valid"] != truth["valid"]:
            result["truth_disagrees"] = {"cached": truth["evidence"], "fresh": fresh["evidence"]}
        truth = fresh
    result["truth"] = truth
    if truth["valid"] and not verify:
        result.update(suite_run(job, extra))
    return result


# ---- scoring --------------------------------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of k successes in n trials ((0, 1) when n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def score(results: list[dict[str, Any]]) -> dict[str, Any]:
    from benchmarks.scenarios import FAULTS, Setup

    per_fault: dict[str, dict[str, Any]] = {}
    healthy = {"n": 0, "alarms": [], "stopped": [], "invalid": [], "crashed": []}
    for r in results:
        if not r["truth"]["valid"]:
            (
                per_fault.setdefault(r["fault"], {}).setdefault("invalid", []) if r["fault"] else healthy["invalid"]
            ).append(r["id"])
            continue
        if "findings" not in r:
            continue
        summary = Setup(**r["setup"]).summary()
        if r["fault"] is None:
            healthy["n"] += 1
            alarms = sorted({f["id"] for f in r["findings"] if f["severity"] in ("warning", "error")})
            if alarms:
                healthy["alarms"].append({"id": r["id"], "setup": summary, "ids": alarms})
            if r["stopped_by"]:
                healthy["stopped"].append({"id": r["id"], "setup": summary, "by": r["stopped_by"]})
            if r["crash"]:
                healthy["crashed"].append({"id": r["id"], "setup": summary, "crash": r["crash"]})
            continue
        expect = FAULTS[r["fault"]].detected_by
        hits = [f for f in r["findings"] if f["id"] in expect]
        entry = per_fault.setdefault(r["fault"], {})
        entry.setdefault("runs", []).append(
            {
                "id": r["id"],
                "setup": summary,
                "detected": bool(hits),
                "latency": min(f["step"] for f in hits) - r["truth"]["onset_step"] if hits else None,
                "found": sorted({f["id"] for f in r["findings"]}),
                "stopped_by": r["stopped_by"],
                "crash": r["crash"],
            }
        )
    table = {}
    for name in FAULTS:
        runs = per_fault.get(name, {}).get("runs", [])
        k = sum(run["detected"] for run in runs)
        latencies = [run["latency"] for run in runs if run["latency"] is not None]
        table[name] = {
            "detected": k,
            "n": len(runs),
            "recall": k / len(runs) if runs else None,
            "interval": wilson(k, len(runs)),
            "median_latency_steps": statistics.median(latencies) if latencies else None,
            "invalid": per_fault.get(name, {}).get("invalid", []),
            "missed": [
                {"id": run["id"], "setup": run["setup"], "found": run["found"]} for run in runs if not run["detected"]
            ],
            "stopped_by_finding": sum(bool(run["stopped_by"]) for run in runs),
        }
    k_all = sum(t["detected"] for t in table.values())
    n_all = sum(t["n"] for t in table.values())
    n_alarm = len(healthy["alarms"])
    return {
        "faults": table,
        "overall_recall": {"detected": k_all, "n": n_all, "interval": wilson(k_all, n_all)},
        "false_alarms": {
            "n_alarm": n_alarm,
            "n": healthy["n"],
            "interval": wilson(n_alarm, healthy["n"]),
            "runs": healthy["alarms"],
        },
        "healthy_stopped": {
            "n_stopped": len(healthy["stopped"]),
            "n": healthy["n"],
            "interval": wilson(len(healthy["stopped"]), healthy["n"]),
            "runs": healthy["stopped"],
        },
        "healthy_crashed": healthy["crashed"],
        "healthy_invalid": healthy["invalid"],
    }


def _pct(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k}/{n} = {100 * k / n:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}%]" if n else "0/0"


def print_report(scores: dict[str, Any], results: list[dict[str, Any]], elapsed: float) -> None:
    print(f"\n{'fault type':<24} {'recall (Wilson 95%)':<24} {'median latency':>14}  invalid  stopped")
    for name, t in scores["faults"].items():
        lat = "-" if t["median_latency_steps"] is None else f"{t['median_latency_steps']:g} steps"
        recall = _pct(t["detected"], t["n"])
        print(f"{name:<24} {recall:<24} {lat:>14}  {len(t['invalid']):>7}  {t['stopped_by_finding']:>7}")
    o = scores["overall_recall"]
    print(f"{'OVERALL':<24} {_pct(o['detected'], o['n'])}")
    fa = scores["false_alarms"]
    print(f"\nhealthy runs with a warning or error: {_pct(fa['n_alarm'], fa['n'])}")
    for run in fa["runs"]:
        print(f"  {run['id']}: {', '.join(run['ids'])}   [{run['setup']}]")
    hs = scores["healthy_stopped"]
    if hs["n_stopped"]:
        print(
            f"\n!!!!!! {hs['n_stopped']} HEALTHY RUN(S) STOPPED BY A FINDING ({_pct(hs['n_stopped'], hs['n'])}) !!!!!!"
        )
        for run in hs["runs"]:
            print(f"  !!! {run['id']} stopped by {run['by']}   [{run['setup']}]")
    else:
        print(f"healthy runs stopped by a finding: 0/{hs['n']}")
    for run in scores["healthy_crashed"]:
        print(f"  !!! healthy run CRASHED: {run['id']}: {run['crash']}")
    invalid = [i for t in scores["faults"].values() for i in t["invalid"]] + scores["healthy_invalid"]
    print(f"invalid scenarios (ground truth not shown by the bare run, excluded): {len(invalid)}/{len(results)}")
    disagree = [r["id"] for r in results if "truth_disagrees" in r]
    if disagree:
        print(f"ground truth differs from the cache: {disagree}")
    suite_cpu = sum(r.get("suite_cpu_seconds", 0.0) for r in results)
    n_suite = sum("suite_cpu_seconds" in r for r in results)
    print(
        f"\n{n_suite} suite runs, {suite_cpu:.0f} CPU s ({suite_cpu / max(1, n_suite):.1f} s per run; "
        f"{suite_cpu / 2 / 60:.1f} min on 2 unshared cores); wall time here {elapsed / 60:.1f} min"
    )
    bare = [r["truth"]["bare_cpu_seconds"] for r in results if "bare_cpu_seconds" in r["truth"]]
    if bare:
        print(f"ground truth: {len(bare)} bare runs, {sum(bare):.0f} CPU s ({sum(bare) / len(bare):.1f} s per run)")


def markdown(scores: dict[str, Any]) -> str:
    """The scores as the tables of docs/detection.md."""
    lines = [
        "| fault type | detected | recall [Wilson 95%] | median latency (steps) | invalid | stopped by a finding |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in scores["faults"].items():
        lo, hi = t["interval"]
        recall = f"{100 * t['recall']:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}%]" if t["n"] else "-"
        lat = "-" if t["median_latency_steps"] is None else f"{t['median_latency_steps']:g}"
        lines.append(
            f"| `{name}` | {t['detected']}/{t['n']} | {recall} | {lat} | {len(t['invalid'])} | "
            f"{t['stopped_by_finding']} |"
        )
    o, fa, hs = scores["overall_recall"], scores["false_alarms"], scores["healthy_stopped"]
    lines.append(f"| **overall** | {o['detected']}/{o['n']} | {_pct(o['detected'], o['n']).split('= ')[-1]} | | | |")
    lines += [
        "",
        f"Healthy runs with a warning or error: **{_pct(fa['n_alarm'], fa['n'])}**. "
        f"Healthy runs stopped by a finding: **{_pct(hs['n_stopped'], hs['n'])}**.",
        "",
    ]
    lines += [f"- `{r['id']}`: {', '.join(f'`{i}`' for i in r['ids'])} ({r['setup']})" for r in fa["runs"]]
    lines += [f"- STOPPED `{r['id']}` by `{r['by']}` ({r['setup']})" for r in hs["runs"]]
    return "\n".join(lines) + "\n"


# ---- command line ---------------------------------------------------------------------------------------------------


def load_truth() -> dict[str, Any]:
    return json.loads(TRUTH_FILE.read_text()) if TRUTH_FILE.exists() else {}


def run_generated(args: argparse.Namespace) -> dict[str, Any]:
    seed_set = "tune" if args.quick else args.set
    jobs = scenario_list(seed_set, quick=args.quick)
    if args.faults:
        jobs = [j for j in jobs if (j["fault"] or "healthy") in args.faults]
    if args.only:  # one scenario again, e.g. a false alarm the log shows
        unknown = sorted(set(args.only) - {j["id"] for j in jobs})
        if unknown:
            raise SystemExit(f"--only: {unknown} not in the {seed_set} set (ids as its log gives them)")
        jobs = [j for j in jobs if j["id"] in args.only]
    if args.limit:
        jobs = jobs[: args.limit]
    cache = load_truth()
    tasks = []
    for job in jobs:
        cached = cache.get(job["id"])
        truth = cached if cached and cached["setup"] == job["setup"] and cached["fault"] == job["fault"] else None
        if args.truth_only and truth is not None:
            continue
        tasks.append((job, truth, args.extra or [], args.verify or args.truth_only))
    done = set()
    if args.resume and args.log and Path(args.log).exists():
        done = {json.loads(line)["id"] for line in Path(args.log).read_text().splitlines() if line.strip()}
    tasks = [t for t in tasks if t[0]["id"] not in done]
    # interleave the groups (each fault type, healthy) in proportion to their size: a cut run stays balanced
    size = Counter(t[0]["fault"] for t in tasks)
    position: Counter[str | None] = Counter()
    keys = []
    for t in tasks:
        keys.append((position[t[0]["fault"]] + 0.5) / size[t[0]["fault"]])
        position[t[0]["fault"]] += 1
    tasks = [t for _, t in sorted(zip(keys, tasks, strict=True), key=lambda kt: kt[0])]
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    ctx = multiprocessing.get_context("spawn")
    log = open(args.log, "a") if args.log else None  # noqa: SIM115 - one line per finished scenario
    with ctx.Pool(args.workers, initializer=_worker_init, maxtasksperchild=8) as pool:
        for i, r in enumerate(pool.imap_unordered(run_job, tasks), 1):
            results.append(r)
            if log:
                log.write(json.dumps(r) + "\n")
                log.flush()
            if args.progress:
                status = "invalid" if not r["truth"]["valid"] else ("crash" if r.get("crash") else "ok")
                print(f"[{i}/{len(tasks)}] {r['id']}: {status} {r.get('suite_cpu_seconds', '')}", flush=True)
    if log:
        log.close()
    results.sort(key=lambda r: r["id"])
    if args.write_truth or args.verify or args.truth_only:
        for r in results:
            cache[r["id"]] = r["truth"]
        TRUTH_FILE.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    elapsed = time.perf_counter() - start
    if args.truth_only:
        print(f"stored {len(results)} new ground truths ({sum(r['truth']['valid'] for r in results)} valid)")
        return {"results": results}
    if args.verify:
        disagree = [r["id"] for r in results if "truth_disagrees" in r]
        print(f"verified {len(results)} ground truths; {len(disagree)} differ from the cache: {disagree}")
        return {"results": results}
    scores = score(results)
    print_report(scores, results, elapsed)
    return {
        "set": "quick" if args.quick else args.set,
        "scores": scores,
        "results": results,
        "wall_seconds": round(elapsed, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=tuple(SEED_BASE), default="report")
    parser.add_argument("--quick", action="store_true", help="24 short tune-set scenarios")
    parser.add_argument("--smoke", action="store_true", help="the 15 fixed scenarios instead")
    parser.add_argument("--only", nargs="*", help="only these scenarios: ids of the set (names with --smoke)")
    parser.add_argument("--faults", nargs="*", help="only these fault types ('healthy' for healthy runs)")
    parser.add_argument("--limit", type=int, help="only the first N scenarios")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--extra", nargs="*", help="module:factory of extra callbacks (e.g. a future component)")
    parser.add_argument("--verify", action="store_true", help="recompute every ground truth, compare, store")
    parser.add_argument("--write-truth", action="store_true", help="store ground truths computed in this run")
    parser.add_argument("--truth-only", action="store_true", help="only compute and store the missing ground truths")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--log", help="append each finished scenario's result to this JSON-lines file")
    parser.add_argument("--resume", action="store_true", help="skip the scenarios already in the --log file")
    parser.add_argument("--rescore", help="score the results in a --log file (e.g. of a cut run) and exit")
    parser.add_argument(
        "--findings", nargs="*", help="with --rescore: count only finding ids with these prefixes (one component's)"
    )
    parser.add_argument("--json")
    parser.add_argument("--markdown", help="write the score tables (as in docs/detection.md) to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        from benchmarks import smoke

        return smoke.main(args.only, args.json)
    if args.rescore:
        results = [json.loads(line) for line in Path(args.rescore).read_text().splitlines() if line.strip()]
        if args.findings:  # e.g. grad init setup: ModelHealthCheck's own recall and false alarms
            kept = tuple(args.findings)
            results = [
                {**r, "findings": [f for f in r.get("findings", []) if f["id"].startswith(kept)]} for r in results
            ]
        if args.write_truth:
            TRUTH_FILE.write_text(
                json.dumps({**load_truth(), **{r["id"]: r["truth"] for r in results}}, indent=1, sort_keys=True) + "\n"
            )
        out = {"scores": score(results), "results": results}
        print_report(out["scores"], results, math.nan)
    else:
        out = run_generated(args)
    if args.markdown and "scores" in out:
        Path(args.markdown).write_text(markdown(out["scores"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
