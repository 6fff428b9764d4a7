"""The wording of :class:`~lightning_debug.callbacks.decoding.DecodingConsistencyCheck`'s findings
(``decode.*``) and the evidence they carry in ``data``. The numbers come from :mod:`lightning_debug.decoders`,
the verdicts from :mod:`lightning_debug.rules.decoding`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_debug.decoders import DecodeTarget
    from lightning_debug.rules.decoding import Scores


def evidence(
    target: DecodeTarget,
    generator: tuple[str, Any] | None,
    run: Scores,
    unsupported: list[int],
    tolerance: tuple[float, float],
    mismatch: dict[str, Any],
    beam: dict[str, Any],
    recheck: dict[str, Any] | str | None,
    seconds: float,
) -> dict[str, Any]:
    """The ``data`` every ``decode.*`` finding carries: the path and beam sizes decoded, the tolerance, the
    largest differences, the beam test, the cost and, after a float64 re-run, its largest difference."""
    rtol, atol = tolerance
    data: dict[str, Any] = {
        "path": target.kind,
        "attribute": generator[0] if generator is not None else None,
        "examples": len(next(iter(run.decoder.values()))),
        "beam_sizes": sorted(run.decoder),
        "unsupported_beam_sizes": unsupported,
        "rtol": rtol,
        "atol_per_token": atol,
        "max_abs_diff": mismatch["max_abs"],
        "max_rel_diff": mismatch["max_rel"],
        "beam": beam,
        "cost": {
            "seconds": round(seconds, 4),
            "generate_calls": target.calls["generate"],
            "forward_calls": target.calls["forward"],
        },
    }
    if hasattr(target, "settings"):
        data["settings"] = target.settings()
    if isinstance(recheck, dict):
        data["float64_max_abs_diff"] = recheck["max_abs"]
    return data


def mismatch_finding(
    mismatch: dict[str, Any], recheck: dict[str, Any] | str, data: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The ``decode.score_mismatch`` message and data: the worst hypotheses, with their float64 difference."""
    worst = [dict(row) for row in mismatch["worst"]]
    for row in worst:
        diffs = recheck["diffs"].get(row["beam"]) if isinstance(recheck, dict) else None
        row["diff_float64"] = None if diffs is None else float(diffs[row["example"]])
    w = worst[0]
    f64 = f"float64 re-check Δ {w['diff_float64']:.4g}" if w["diff_float64"] is not None else str(recheck)
    message = (
        f"Decoder scores differ from the teacher-forced log-likelihood of the decoded output on "
        f"{mismatch['count']}/{mismatch['total']} hypotheses; worst: beam {w['beam']}, example {w['example']}: "
        f"decoder {w['decoder']:.4f} vs model {w['model']:.4f}, Δ {w['diff']:.4g} > tolerance "
        f"{w['tolerance']:.2g} ({f64})."
    )
    return message, {**data, "mismatched": mismatch["count"], "worst": worst}


def beam_message(beam: dict[str, Any], violation_rate: float) -> str:
    """The ``decode.beam_not_monotonic`` message."""
    return (
        f"A larger beam found a worse-scoring best hypothesis on {beam['worse']}/{beam['examples']} "
        f"examples ({beam['fraction']:.0%}; beam search alone explains about "
        f"{violation_rate:.0%}, p={beam['p_value']:.2g}); worst: beam {beam['worst']['beam']} "
        f"scored {beam['worst']['drop']:.3g} below beam {beam['worst']['than']} (length_penalty=0)."
    )


def ok_message(mismatch: dict[str, Any], data: dict[str, Any]) -> str:
    """The ``decode.ok`` message: the largest difference, float noise if any, the beam test and the cost."""
    beam, cost = data["beam"], data["cost"]
    noise = ""
    if "float64_max_abs_diff" in data:
        noise = (
            f"; {mismatch['count']} float32 differences above tolerance shrank to "
            f"{data['float64_max_abs_diff']:.2g} in float64 (float noise)"
        )
    beams = (
        f"larger beams scored worse on {beam['worse']}/{beam['examples']} examples"
        if beam["examples"]
        else "beam search not checked (one beam size)"
    )
    return (
        f"Decoder scores match the teacher-forced log-likelihood on {mismatch['total']} hypotheses "
        f"(max |Δ| {mismatch['max_abs']:.2g}, {mismatch['max_rel']:.2g} relative){noise}; {beams}. "
        f"Cost {cost['seconds']:.2f} s, {cost['generate_calls']} decode + {cost['forward_calls']} forward calls."
    )
