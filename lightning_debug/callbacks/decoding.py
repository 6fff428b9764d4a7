"""``DecodingConsistencyCheck``: the decoder's scores must be the model's likelihood of what it decoded.

The lecture's unit test for generation: the log-probability a decoder accumulates for its output must equal
the teacher-forced log-likelihood of that same output (an off-by-one, an uncounted EOS, counted padding,
processed instead of raw scores or a different mask all break the equality), and a larger beam should almost
never find a worse-scoring best hypothesis. Runs at the start of training and, optionally, every N
validation checks; everything it touches is restored.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lightning_debug.base import DebugCallback
from lightning_debug.batching import batch_mover
from lightning_debug.decoders import DecodeTarget, ProtocolTarget, first_examples, run_decoders
from lightning_debug.integrations import hf
from lightning_debug.isolation import isolated
from lightning_debug.precision import module_tolerance
from lightning_debug.rules.decoding import beam_monotonicity, difference, score_mismatches
from lightning_debug.sinks import Sink

if TYPE_CHECKING:
    import lightning.pytorch as pl

_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


class DecodingConsistencyCheck(DebugCallback):
    """Decoder scores vs the teacher-forced likelihood of the decoded output, and beam monotonicity.

    Zero config for a Hugging Face ``PreTrainedModel`` held by the LightningModule (decoder-only or
    encoder-decoder); prompts are the first ``n_examples`` of the validation (else training) data
    (``input_ids``, ``attention_mask``; decoder-only models get the first ``prompt_fraction`` of each row).
    A hand-written decoder takes part by defining on the LightningModule

    - ``decode_with_scores(batch, beam_size) -> (outputs, scores)``: decode ``batch`` and return the outputs and
      the summed log-probability the decoder accumulated for each (EOS included, nothing after it); raise
      ``NotImplementedError`` for beam sizes it does not support;
    - ``score_outputs(batch, outputs) -> scores``: the model's teacher-forced summed log-likelihood of
      ``outputs`` (plain NLL: no label smoothing).

    The protocol wins over the Hugging Face path when both apply (it is the decoder the user ships).

    Args:
        beam_sizes: beam sizes to decode with, increasing; the first is the greedy/reference decode. Greedy and
            one beam exercise both search paths and the beam test; each more size costs another decode.
        n_examples: prompts taken from the data.
        max_new_tokens: generation length limit (Hugging Face path).
        prompt_fraction: share of each row's real tokens used as the prompt (decoder-only Hugging Face path).
        every_n_val_checks: also run after every N-th validation during fitting (``None``: at start only).
        rtol / atol: per-hypothesis tolerance ``|Δ| <= rtol·|model| + atol·n_tokens``; ``None`` picks it from
            the parameter dtype and device (fp32 CPU: 1e-5 and 1e-6 per token).
        beam_violation_rate: share of examples on which a larger beam may score worse through beam search's
            own non-monotonicity (finished hypotheses, early stopping); warn only above it.
        confidence: of the one-sided binomial test that the observed share exceeds ``beam_violation_rate``.
    """

    def __init__(
        self,
        beam_sizes: Sequence[int] = (1, 4),
        n_examples: int = 8,
        max_new_tokens: int = 16,
        prompt_fraction: float = 0.5,
        every_n_val_checks: int | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        beam_violation_rate: float = 0.02,
        confidence: float = 0.99,
        *,
        raise_errors: bool = False,
        print_findings: bool = True,
        strict: bool | None = None,
        verbose: bool | None = None,
    ) -> None:
        super().__init__(raise_errors=raise_errors, print_findings=print_findings, strict=strict, verbose=verbose)
        beams = tuple(int(k) for k in beam_sizes)
        if not beams or any(k < 1 for k in beams) or list(beams) != sorted(set(beams)):
            raise ValueError(f"`beam_sizes` must be distinct positive integers in increasing order, got {beam_sizes}")
        if n_examples < 1:
            raise ValueError(f"`n_examples` must be >= 1, got {n_examples}")
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}")
        if not 0.0 < prompt_fraction <= 1.0:
            raise ValueError(f"`prompt_fraction` must be in (0, 1], got {prompt_fraction}")
        if every_n_val_checks is not None and every_n_val_checks < 1:
            raise ValueError(f"`every_n_val_checks` must be None or >= 1, got {every_n_val_checks}")
        for name, value in (("rtol", rtol), ("atol", atol)):
            if value is not None and value < 0:
                raise ValueError(f"`{name}` must be None or >= 0, got {value}")
        if not 0.0 <= beam_violation_rate < 1.0:
            raise ValueError(f"`beam_violation_rate` must be in [0, 1), got {beam_violation_rate}")
        if not 0.5 < confidence < 1:  # the same range as every other `confidence` argument
            raise ValueError(f"`confidence` must be in (0.5, 1), got {confidence}")
        self.beam_sizes = beams
        self.n_examples = n_examples
        self.max_new_tokens = max_new_tokens
        self.prompt_fraction = prompt_fraction
        self.every_n_val_checks = every_n_val_checks
        self.rtol = rtol
        self.atol = atol
        self.beam_violation_rate = beam_violation_rate
        self.confidence = confidence
        self._val_checks = 0
        self._started = False  # the start-of-training check ran (once per run, also across checkpoint resume)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._started:
            return
        self._started = True
        self.check(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_val_checks is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._val_checks += 1
        if self._val_checks % self.every_n_val_checks == 0:
            self.check(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "val_checks": self._val_checks, "started": self._started}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._val_checks = int(state_dict.get("val_checks", 0))
        self._started = bool(state_dict.get("started", False))

    # ------------------------------------------------------------------ the check
    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the check now. Rank zero only: it uses no collective, so the other ranks just go on."""
        if trainer.global_rank != 0:
            return
        if type(trainer.strategy).__name__ in _SHARDED:
            self.skip(trainer, f"a sharded strategy ({type(trainer.strategy).__name__}) needs every rank to decode")
            return
        protocol, generator = self._decoder(pl_module)
        if not protocol and generator is None:  # decided before any isolation work: a model without a decoder is free
            self.skip(
                trainer,
                "the module neither defines `decode_with_scores`/`score_outputs` nor holds a Hugging Face model "
                "that can `generate()`",
            )
            return
        start = time.perf_counter()
        with isolated(pl_module), torch.no_grad():
            pl_module.eval()
            target = self._target(trainer, pl_module, generator)
            if isinstance(target, str):
                self.skip(trainer, target)
                return
            run, unsupported = run_decoders(target, self.beam_sizes)
            if not run.decoder:
                self.skip(trainer, f"the decoder supports none of the beam sizes {list(self.beam_sizes)}")
                return
            rtol, atol = self._tolerance(pl_module)
            mismatch = score_mismatches(run, rtol, atol)
            recheck = self._float64(target, mismatch["beams"], rtol, atol) if mismatch["count"] else None
        beam = beam_monotonicity(run, rtol, atol, self.beam_violation_rate)
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
                "seconds": round(time.perf_counter() - start, 4),
                "generate_calls": target.calls["generate"],
                "forward_calls": target.calls["forward"],
            },
        }
        if hasattr(target, "settings"):
            data["settings"] = target.settings()
        if isinstance(recheck, dict):
            data["float64_max_abs_diff"] = recheck["max_abs"]
        self._report(trainer, mismatch, recheck, data)

    def _report(
        self, trainer: pl.Trainer, mismatch: dict[str, Any], recheck: dict[str, Any] | str | None, data: dict[str, Any]
    ) -> None:
        """Log the scalars; a mismatch the float64 re-run confirms, a beam-search alarm, or else ``decode.ok``."""
        beam = data["beam"]
        Sink(trainer).log_scalars(
            {
                "debug/decode/max_abs_diff": mismatch["max_abs"],
                "debug/decode/seconds": data["cost"]["seconds"],
                **({"debug/decode/beam_worse_fraction": beam["fraction"]} if beam["examples"] else {}),
            },
            step=trainer.global_step,
        )
        confirmed = isinstance(recheck, str) or (recheck is not None and bool(recheck["confirmed"]))
        if recheck is not None and confirmed:
            self._report_mismatch(trainer, mismatch, recheck, data)
        beam_alarm = beam["examples"] > 0 and beam["p_value"] < 1 - self.confidence
        if beam_alarm:
            self.emit(
                trainer,
                "decode.beam_not_monotonic",
                f"A larger beam found a worse-scoring best hypothesis on {beam['worse']}/{beam['examples']} "
                f"examples ({beam['fraction']:.0%}; beam search alone explains about "
                f"{self.beam_violation_rate:.0%}, p={beam['p_value']:.2g}); worst: beam {beam['worst']['beam']} "
                f"scored {beam['worst']['drop']:.3g} below beam {beam['worst']['than']} (length_penalty=0).",
                data=data,
            )
        if not confirmed and not beam_alarm:
            self._report_ok(trainer, mismatch, data)

    def _tolerance(self, pl_module: pl.LightningModule) -> tuple[float, float]:
        # the scores pass through float32 even for a float64 model (HF generate() upcasts logits to fp32 only)
        rtol, atol = module_tolerance(pl_module, scores_in_float32=True)
        return (self.rtol if self.rtol is not None else rtol), (self.atol if self.atol is not None else atol)

    @staticmethod
    def _decoder(pl_module: pl.LightningModule) -> tuple[bool, tuple[str, Any] | None]:
        """Whether the module speaks the protocol; else the Hugging Face model it holds (attribute path, model)."""
        if callable(getattr(pl_module, "decode_with_scores", None)) and callable(
            getattr(pl_module, "score_outputs", None)
        ):
            return True, None
        # the full transformers import costs ~0.1 s: it happens only for a module that holds a transformers class
        if not hf.holds_transformers(pl_module):
            return False, None
        try:
            return False, hf.find_generator(pl_module)
        except ImportError:  # a transformers too old or broken to use: no zero-config path
            return False, None

    def _target(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, generator: tuple[str, Any] | None
    ) -> DecodeTarget | str:
        """What to decode with (the protocol when ``generator`` is None), or the reason why nothing can be."""
        batch = first_examples(trainer, self.n_examples)
        if batch is None:
            return "no validation or training dataloader to take prompts from"
        batch = batch_mover(trainer, pl_module)(batch)
        if generator is None:
            return ProtocolTarget(pl_module, batch)
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            return "the batch is not a mapping with `input_ids` (define `decode_with_scores`/`score_outputs`)"
        return hf.HFTarget(generator[1], batch, self.max_new_tokens, self.prompt_fraction)

    def _float64(self, target: DecodeTarget, beams: list[int], rtol: float, atol: float) -> dict[str, Any] | str:
        """Re-run the failing beam sizes in float64 on the CPU (reference §4): noise vanishes, a bug stays."""
        try:
            with target.in_float64() as target64:
                run64, _ = run_decoders(target64, beams)
        except Exception as err:  # a model that cannot run in float64: alarm on the float32 evidence
            return f"float64 re-check unavailable ({type(err).__name__}: {err})"
        mism = score_mismatches(run64, rtol, atol)
        diffs = {k: difference(run64.decoder[k], run64.model[k]) for k in run64.decoder}
        return {"confirmed": mism["count"] > 0, "max_abs": mism["max_abs"], "diffs": diffs}

    def _report_mismatch(
        self, trainer: pl.Trainer, mismatch: dict[str, Any], recheck: dict[str, Any] | str, data: dict[str, Any]
    ) -> None:
        worst = [dict(row) for row in mismatch["worst"]]
        for row in worst:
            diffs = recheck["diffs"].get(row["beam"]) if isinstance(recheck, dict) else None
            row["diff_float64"] = None if diffs is None else float(diffs[row["example"]])
        w = worst[0]
        f64 = f"float64 re-check Δ {w['diff_float64']:.4g}" if w["diff_float64"] is not None else str(recheck)
        self.emit(
            trainer,
            "decode.score_mismatch",
            f"Decoder scores differ from the teacher-forced log-likelihood of the decoded output on "
            f"{mismatch['count']}/{mismatch['total']} hypotheses; worst: beam {w['beam']}, example {w['example']}: "
            f"decoder {w['decoder']:.4f} vs model {w['model']:.4f}, Δ {w['diff']:.4g} > tolerance "
            f"{w['tolerance']:.2g} ({f64}).",
            data={**data, "mismatched": mismatch["count"], "worst": worst},
        )

    def _report_ok(self, trainer: pl.Trainer, mismatch: dict[str, Any], data: dict[str, Any]) -> None:
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
        self.emit(
            trainer,
            "decode.ok",
            f"Decoder scores match the teacher-forced log-likelihood on {mismatch['total']} hypotheses "
            f"(max |Δ| {mismatch['max_abs']:.2g}, {mismatch['max_rel']:.2g} relative){noise}; {beams}. "
            f"Cost {cost['seconds']:.2f} s, {cost['generate_calls']} decode + {cost['forward_calls']} forward calls.",
            data=data,
        )
