"""``DecodingConsistencyCheck``: the decoder's scores must be the model's likelihood of what it decoded.

The lecture's unit test for generation: the log-probability a decoder accumulates for its output must equal
the teacher-forced log-likelihood of that same output (an off-by-one, an uncounted EOS, counted padding,
processed instead of raw scores or a different mask all break the equality), and a larger beam should almost
never find a worse-scoring best hypothesis. Runs at the start of training and, optionally, every N
validation checks; everything it touches is restored.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lightning_debug import decoding_wording as wording
from lightning_debug.arguments import require
from lightning_debug.base import DebugCallback
from lightning_debug.decoders import decode_target, find_decoder, recheck_in_float64, run_decoders
from lightning_debug.isolation import isolated
from lightning_debug.precision import module_tolerance
from lightning_debug.rules.decoding import beam_monotonicity, score_mismatches
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
        every = every_n_val_checks
        increasing = bool(beams) and all(k >= 1 for k in beams) and list(beams) == sorted(set(beams))
        require(
            ("beam_sizes", beam_sizes, increasing, "must be distinct positive integers in increasing order"),
            ("n_examples", n_examples, n_examples >= 1, "must be >= 1"),
            ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, "must be >= 1"),
            ("prompt_fraction", prompt_fraction, 0.0 < prompt_fraction <= 1.0, "must be in (0, 1]"),
            ("every_n_val_checks", every_n_val_checks, every is None or every >= 1, "must be None or >= 1"),
            ("rtol", rtol, rtol is None or rtol >= 0, "must be None or >= 0"),
            ("atol", atol, atol is None or atol >= 0, "must be None or >= 0"),
            ("beam_violation_rate", beam_violation_rate, 0.0 <= beam_violation_rate < 1.0, "must be in [0, 1)"),
            ("confidence", confidence, 0.5 < confidence < 1, "must be in (0.5, 1)"),  # as every `confidence`
        )
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
        protocol, generator = find_decoder(pl_module)
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
            target = decode_target(
                trainer,
                pl_module,
                generator,
                n_examples=self.n_examples,
                max_new_tokens=self.max_new_tokens,
                prompt_fraction=self.prompt_fraction,
            )
            if isinstance(target, str):
                self.skip(trainer, target)
                return
            run, unsupported = run_decoders(target, self.beam_sizes)
            if not run.decoder:
                self.skip(trainer, f"the decoder supports none of the beam sizes {list(self.beam_sizes)}")
                return
            rtol, atol = self._tolerance(pl_module)
            mismatch = score_mismatches(run, rtol, atol)
            recheck = recheck_in_float64(target, mismatch["beams"], rtol, atol) if mismatch["count"] else None
        beam = beam_monotonicity(run, rtol, atol, self.beam_violation_rate)
        seconds = time.perf_counter() - start
        data = wording.evidence(target, generator, run, unsupported, (rtol, atol), mismatch, beam, recheck, seconds)
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
            message, finding_data = wording.mismatch_finding(mismatch, recheck, data)
            self.emit(trainer, "decode.score_mismatch", message, data=finding_data)
        beam_alarm = beam["examples"] > 0 and beam["p_value"] < 1 - self.confidence
        if beam_alarm:
            message = wording.beam_message(beam, self.beam_violation_rate)
            self.emit(trainer, "decode.beam_not_monotonic", message, data=data)
        if not confirmed and not beam_alarm:
            self.emit(trainer, "decode.ok", wording.ok_message(mismatch, data), data=data)

    def _tolerance(self, pl_module: pl.LightningModule) -> tuple[float, float]:
        # the scores pass through float32 even for a float64 model (HF generate() upcasts logits to fp32 only)
        rtol, atol = module_tolerance(pl_module, scores_in_float32=True)
        return (self.rtol if self.rtol is not None else rtol), (self.atol if self.atol is not None else atol)
