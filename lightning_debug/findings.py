"""Findings and the check catalogue.

A :class:`Finding` is what every check produces: a stable check id, a severity, one sentence with the
numbers, a hint and the evidence. The :data:`CATALOGUE` lists every id the package can emit, with its
meaning and its likely causes in the order the debugging lecture diagnoses them: model capacity, then
optimizer / learning rate / initialisation / batch size, then implementation bugs, then train/test
disconnect, then search, then overfitting, then loss-metric mismatch.

A number the code owns (a callback argument's default) is never written into the prose: write
``{default:ClassName.argument}`` and it is read from the signature when the catalogue is rendered
(:func:`with_defaults`), so ``docs/checks.md`` follows the code.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any


class Severity(str, Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return {"info": 0, "warning": 1, "error": 2}[self.value]


@dataclass(frozen=True)
class Finding:
    """One diagnosis. ``data`` holds the evidence and must be JSON-serialisable."""

    check: str
    severity: Severity
    message: str
    hint: str = ""
    step: int = 0
    epoch: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    count: int = 1
    last_step: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "severity", Severity(self.severity))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["severity"] = self.severity.value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        return cls(**d)

    def repeated(self, step: int) -> Finding:
        """The same finding seen once more, at ``step``."""
        return replace(self, count=self.count + 1, last_step=step)


def jsonable(value: Any) -> Any:
    """Turn tensors, numpy scalars and tuples in evidence into plain JSON types."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return jsonable(value.tolist())
    if isinstance(value, float):
        # JSON has no NaN/Inf; keep them readable and loadable.
        return value if value == value and abs(value) != float("inf") else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


@dataclass(frozen=True)
class CheckInfo:
    """What a check id means, what usually causes it (most likely first) and what to try."""

    id: str
    severity: Severity
    title: str
    meaning: str
    causes: tuple[str, ...]
    fixes: tuple[str, ...]
    emitted_by: str

    @property
    def hint(self) -> str:
        return "Try, most likely first: " + "; ".join(self.fixes) + "."

    @property
    def description(self) -> str:
        """``meaning`` with its ``{default:Class.argument}`` placeholders replaced by the current defaults."""
        return with_defaults(self.meaning)


_DEFAULT = re.compile(r"\{default:(\w+)\.(\w+)\}")


@functools.cache
def callback_default(owner: str, argument: str) -> Any:
    """The default of ``argument`` in the ``__init__`` of the callback class ``owner`` (imported lazily: the
    callbacks import this module)."""
    import lightning_debug.callbacks as callbacks

    return inspect.signature(getattr(callbacks, owner).__init__).parameters[argument].default


def with_defaults(text: str) -> str:
    """Replace every ``{default:Class.argument}`` in ``text`` by that default, so catalogue prose never repeats
    (and never goes stale on) a number the code owns."""

    def value(match: re.Match[str]) -> str:
        v = callback_default(match.group(1), match.group(2))
        return f"{v:g}" if isinstance(v, float) else str(v)

    return _DEFAULT.sub(value, text)


def _c(
    id: str,
    severity: str,
    title: str,
    meaning: str,
    causes: tuple[str, ...],
    fixes: tuple[str, ...],
    emitted_by: str,
) -> CheckInfo:
    return CheckInfo(id, Severity(severity), title, meaning, causes, fixes, emitted_by)


_CHECKS: tuple[CheckInfo, ...] = (
    _c(
        "check.error",
        "warning",
        "A check failed internally",
        "One of lightning-debug's own checks raised. Training went on; the check's result is missing.",
        ("an input the check does not handle (the message names it)", "a bug in lightning-debug"),
        (
            "read the exception text in `data`",
            "pass the offending argument explicitly",
            "report it with the traceback; `raise_errors=True` on the callback re-raises",
        ),
        "every DebugCallback",
    ),
    _c(
        "check.skipped",
        "info",
        "A check could not run",
        "A check found nothing it can judge (missing metric, batch of one, coupled loss, ...) and says why.",
        (
            "the monitored key is not logged, or logged under another name",
            "the data or model shape is outside what the check supports",
        ),
        (
            "log the key the callback monitors, or name the one you log",
            "provide the documented hook (e.g. `split_fn`, `forward_fn`)",
        ),
        "every DebugCallback",
    ),
    _c(
        "loss.nonfinite",
        "error",
        "Training loss is NaN or Inf",
        "The training loss (or one of its components) became NaN or infinite.",
        (
            "learning rate far too high (updates blow up)",
            "bad initialisation scale",
            "a bug: log of 0, division by 0, fp16 overflow, NaN in the inputs",
            "exploding gradients in a deep/recurrent model",
        ),
        (
            "lower the learning rate 10x",
            "add gradient clipping (`Trainer(gradient_clip_val=1.0)`)",
            "check inputs and labels for NaN/Inf",
            "use bf16 or fp32 instead of fp16",
            "run with `Trainer(detect_anomaly=True)` to find the op",
        ),
        "LossConvergenceMonitor",
    ),
    _c(
        "loss.diverging",
        "error",
        "Training loss is diverging",
        "The smoothed training loss rises significantly (trend test), or sits far above its best value.",
        (
            "learning rate too high, or a warm-up that is too short",
            "too small a batch for this learning rate",
            "a bug in the loss or the data pipeline (labels changing, shuffled targets)",
            "numerical instability (fp16, missing normalisation)",
        ),
        (
            "lower the learning rate 3-10x",
            "add or lengthen learning-rate warm-up",
            "add gradient clipping",
            "increase the batch size",
        ),
        "LossConvergenceMonitor",
    ),
    _c(
        "loss.not_decreasing",
        "warning",
        "Training loss is not going down",
        "After warm-up the training loss has not moved meaningfully from its starting level "
        "(e.g. still at ln(num_classes)). Mid-run it is an info while a one-batch memorisation test can still "
        "answer whether the model learns at all (healthy small transformers sit at chance for a while before "
        "they take off), and becomes a warning if the run ends still flat.",
        (
            "model capacity too low to fit anything",
            "learning rate far too low or the optimizer not stepping",
            "bad initialisation (dead units, saturated activations)",
            "a bug: detached graph, frozen parameters, labels unrelated to inputs",
        ),
        (
            "check the optimizer gets all parameters and `optimizer.step()` runs",
            "raise the learning rate 10x",
            "make sure logits are not detached and targets match inputs",
            "try overfitting one batch (`OverfitBatchCheck`)",
        ),
        "LossConvergenceMonitor",
    ),
    _c(
        "loss.plateau",
        "warning",
        "Training loss has plateaued far above its floor",
        "After warm-up the smoothed loss has levelled off far above the best achievable loss (`floor`): even the "
        "fastest descent its slope's confidence interval allows would close less than 20% of the remaining gap if "
        "training ran as long again, and it falls at most half as fast as on average since the start.",
        (
            "too little model capacity (too small, a bottleneck layer)",
            "learning rate too low or too high to make progress; poor optimizer; bad initialisation; batch size",
            "a bug that caps what the model can learn (masking, label mismatch)",
            "regularisation so strong it keeps the total loss up",
        ),
        (
            "increase model size / remove bottlenecks",
            "tune the learning rate (try 3x up and down) or use Adam",
            "try a learning-rate schedule",
            "check masking and labels with `BatchConsistencyCheck`",
            "track the likelihood separately from regularisation (`components=`)",
        ),
        "LossConvergenceMonitor",
    ),
    _c(
        "loss.converged",
        "info",
        "Training loss reached its floor",
        "The smoothed training loss is close to its floor (within 5% of the way from its first value): the model "
        "fits the training data.",
        ("healthy training",),
        ("look at the dev metric next: overfitting or loss-metric mismatch are the remaining questions",),
        "LossConvergenceMonitor",
    ),
    _c(
        "loss.still_decreasing",
        "info",
        "The run ended while the training loss still fell",
        "The run ended (at its planned end, an early stop, `max_steps` or an interruption) before the training loss "
        "levelled off or reached its floor: no stall, no convergence yet. When the loss is still far from its floor, "
        "a deferred `OverfitBatchCheck` runs its one-batch test at the end of fit.",
        ("a run shorter than the model needs (healthy)", "a learning rate on the low side"),
        ("train longer if the dev metric still improves", "try a higher learning rate or a schedule"),
        "LossConvergenceMonitor",
    ),
    _c(
        "loss.floor_high",
        "info",
        "The loss cannot go below a level far above its floor",
        "On one fixed batch (`OverfitBatchCheck`), the loss fell and then levelled off far above the floor: the model "
        "cannot become confident even where it can memorise. The level is named; 1.461 for 10 classes (log(1 + "
        "(C-1)/e)) is the signature of probabilities fed to a loss that expects logits, and then it is a warning. "
        "Without that signature it is info: label smoothing passed in the loss call, soft targets or an entropy "
        "in the data level off the same way, and the checks cannot see them.",
        (
            "an output too weak to express confidence (a 1-unit or bounded head, e.g. tanh/sigmoid before the loss)",
            "a learning rate so low the test's steps cannot reach the floor (rare: the curve is flat, not falling)",
            "a bug: probabilities (softmax output) fed to `cross_entropy`, which applies log-softmax again; a "
            "temperature or scale applied to the logits",
            "a real floor the checks do not know: label smoothing or soft targets (set `floor`)",
        ),
        (
            "pass logits (not softmax outputs) to `cross_entropy` / `CrossEntropyLoss`",
            "remove bounded activations in front of the loss",
            "set `floor=` to the true floor when the loss cannot reach 0 by design",
        ),
        "OverfitBatchCheck",
    ),
    _c(
        "startup.cannot_overfit",
        "error",
        "The model cannot overfit one batch",
        "On a copy of the model (before the first step, or once the loss stalls with `when='stall'` or a deferred "
        "`when='auto'`), repeated "
        "training on a single fixed batch did not drive the loss near its floor. A correct model of reasonable "
        "size memorises one batch easily. A warning instead of an error "
        "when the loss got at least a quarter of the way (it learns, but too slowly).",
        (
            "model capacity far too low for even one batch",
            "learning rate / optimizer that cannot make progress",
            "a bug: detached logits, wrong loss inputs, targets that change every step, frozen parameters",
        ),
        (
            "check the loss uses the model's (non-detached) outputs and the batch's labels",
            "check `configure_optimizers` returns all trainable parameters",
            "raise the learning rate (or `max_steps` if the loss was still falling)",
            "make the model larger",
        ),
        "OverfitBatchCheck",
    ),
    _c(
        "startup.overfit_ok",
        "info",
        "The model can overfit one batch",
        "On a copy of the model (before the first step, or once the loss stalls with `when='stall'` or a "
        "deferred `when='auto'`), the loss on one fixed batch fell to near its floor.",
        ("healthy model and loss",),
        ("nothing to do",),
        "OverfitBatchCheck",
    ),
    _c(
        "startup.overfit_deferred",
        "info",
        "The one-batch memorisation test waits for a stall",
        "With `when='auto'` (the default) the test runs before the first step only when its `max_steps` are at "
        "most 5% of an epoch's steps. In shorter epochs it would cost more than the budget, so it runs instead "
        "if the loss monitor reports `loss.not_decreasing` or `loss.plateau`, as the diagnosis of the stall, or at the "
        "end of a run that ended far from its floor.",
        ("short epochs: the test would cost a large share of one",),
        (
            "nothing to do on a healthy run",
            "pass `when='start'` to run it before the first step anyway (up to `max_steps` steps on a copy)",
        ),
        "OverfitBatchCheck",
    ),
    _c(
        "val.loss_metric_divergence",
        "warning",
        "Dev loss rises while the dev metric improves",
        "Over the trailing window of validation checks the dev loss trends up significantly while the "
        "evaluation metric is flat or improving and above chance: the model grows confident in its wrong "
        "answers (overconfidence).",
        (
            "overconfidence: wrong predictions become more confident as weights grow (overfitting the loss, "
            "not the 0/1 metric)",
            "loss-metric mismatch: the loss is not the thing you evaluate",
        ),
        (
            "early-stop and select checkpoints on the evaluation metric, not the loss",
            "watch calibration (`CalibrationMonitor`); apply temperature scaling after training",
            "use label smoothing or stronger weight decay",
        ),
        "LossMetricDivergence",
    ),
    _c(
        "val.overfitting",
        "warning",
        "Training loss falls while dev loss rises",
        "The generalisation gap is growing: training loss keeps falling while dev loss trends up.",
        (
            "too much capacity for the data / too little regularisation",
            "train/test disconnect (different distributions)",
            "training too long",
        ),
        (
            "add regularisation (dropout, weight decay) or more data",
            "early-stop on the dev metric",
            "check the dev data comes from the same distribution",
        ),
        "LossMetricDivergence",
    ),
    _c(
        "stop.early",
        "info",
        "Early stopping stopped the run",
        "MetricEarlyStopping ended training; `data.reason` says why "
        "(patience, threshold, divergence, nonfinite, finding:<id>).",
        ("the monitored metric stopped improving", "a threshold or another finding requested the stop"),
        ("if it stopped too early, raise `patience` or `warmup`, or use `smoothing`",),
        "MetricEarlyStopping",
    ),
    _c(
        "stop.deferred",
        "info",
        "Early stopping deferred (possible grokking)",
        "Patience is not counted while the run is in a phase that precedes late generalisation (grokking): "
        "the training metric still rising while the dev metric sits at chance, or the training metric "
        "saturated while the dev loss is falling or the weight norm shrinking. Bounded by `max_deferral`.",
        ("memorisation phase before late generalisation", "slow cleanup under weight decay after memorisation"),
        (
            "nothing: the run goes on while it may still generalise",
            "set `grokking_guard=False` (or a smaller `max_deferral`) to stop on plain patience",
        ),
        "MetricEarlyStopping",
    ),
    _c(
        "check.metric_missing",
        "warning",
        "The monitored metric is not logged",
        "After the first validation, the metric a callback monitors is not in `trainer.callback_metrics`, so "
        "that check is off for the run. `data.close` lists the logged names closest to it.",
        (
            "a typo in `metric=` / `monitor=`",
            "the module logs the metric under another name (`val/acc` vs `val_acc`) or not at all",
        ),
        ("pass the name the module logs (see `data.logged`)", "log the metric with `self.log` in validation_step"),
        "MetricEarlyStopping",
    ),
    _c(
        "check.metric_resolved",
        "info",
        "The monitored metric was read from the first validation loader",
        "With several validation loaders Lightning logs `<metric>/dataloader_idx_<i>`; the first loader's copy "
        "is monitored.",
        ("several validation dataloaders",),
        ("pass the exact key (e.g. `val_acc/dataloader_idx_1`) to monitor another loader",),
        "MetricEarlyStopping",
    ),
    _c(
        "batch.loss_mismatch",
        "error",
        "Batched loss differs from per-example losses",
        "The loss of a mini-batch is not the mean/token-mean/sum of the losses of its examples collated "
        "alone, also when re-computed in float64: padding, masking or the reduction is broken.",
        (
            "a bug: padding positions are scored, the mask is ignored, or the reduction is wrong",
            "examples leak into each other (reported alongside as `batch.cross_sample_dependence`)",
            "a loss that couples examples by design (declare `coupled_loss=True`)",
        ),
        (
            "mask padded positions out of the loss (labels = -100 / ignore_index)",
            "pass the attention mask to every pooling/softmax",
            "check the loss reduction",
        ),
        "BatchConsistencyCheck",
    ),
    _c(
        "batch.padding_dependence",
        "error",
        "An example's loss depends on how much it was padded",
        "Re-collated next to the longest example, only the examples that received padding change their loss "
        "(unpadded ones match); `data` gives the padding amounts and the rank correlation of mismatch and padding.",
        ("a bug: attention/pooling over padded positions, position ids not shifted for left padding",),
        (
            "apply the attention mask in every softmax/mean over positions",
            "mask targets whose context is padding",
            "compute position ids from the mask",
        ),
        "BatchConsistencyCheck",
    ),
    _c(
        "batch.target_visible",
        "error",
        "A causal LM is scored on the token it reads",
        "The training loss of a causal language model has a gradient with respect to the input embedding at the "
        "last position of the sequence. With labels shifted against the inputs nothing reads that position (its "
        "prediction is dropped and causal attention hides it), so the gradient there is exactly 0; here it is of "
        "the order of the other positions': each position predicts the token it already sees, the loss falls to "
        "~0 on training and validation data alike and the model learns to copy.",
        (
            "a bug: labels not shifted against the logits (score `logits[:, :-1]` against `labels[:, 1:]`, or "
            "pass `labels=` to a Hugging Face model, which shifts them itself)",
            "the labels were shifted twice in opposite directions, or the inputs were shifted instead",
        ),
        (
            "score logits[:, t] against the token at t + 1",
            "compare your loss with the Hugging Face model's own loss for `labels=input_ids`",
        ),
        "BatchConsistencyCheck",
    ),
    _c(
        "batch.cross_sample_dependence",
        "error",
        "Information crosses the batch dimension",
        "An example's output depends on another example's input: an off-diagonal entry of the full BxB "
        "gradient dependency matrix, with the model (and its batch-statistics layers) in eval mode, "
        "confirmed in float64.",
        (
            "a bug: a softmax/mean/norm over the batch dimension, a wrong `view`/`transpose`, seq-first vs "
            "batch-first mix-up",
            "a layer that uses batch statistics even in eval (BatchNorm with track_running_stats=False)",
        ),
        (
            "check every reduction's `dim=`",
            "check `batch_first` of recurrent/attention layers",
            "replace `view` after a transpose with `permute` + `reshape`",
        ),
        "BatchConsistencyCheck",
    ),
    _c(
        "batch.ok",
        "info",
        "Mini-batch consistency holds",
        "Batched loss equals the aggregated per-example losses and no example depends on another.",
        ("healthy batching",),
        ("nothing to do",),
        "BatchConsistencyCheck",
    ),
    _c(
        "decode.score_mismatch",
        "error",
        "Decoder scores differ from the loss of the decoded output",
        "The log-probability the decoder accumulated for its output differs from the model's teacher-forced "
        "log-likelihood of that same output.",
        (
            "a bug in score accumulation (off-by-one, EOS not counted, padding after EOS counted)",
            "processed scores (temperature, top-k, penalties) compared with raw likelihoods",
            "decode and loss use different masks or position ids",
            "the cached (incremental) decoding path disagrees with the full forward: a KV-cache, position or "
            "causal-mask bug in the model",
        ),
        (
            "accumulate log_softmax of raw logits at the chosen token, including EOS",
            "mask everything after the first EOS",
            "use the same attention mask/position ids in both paths",
            "compare one cached decoding step with a full forward on the same prefix",
        ),
        "DecodingConsistencyCheck",
    ),
    _c(
        "decode.beam_not_monotonic",
        "warning",
        "Bigger beams often score worse",
        "Across examples, the best hypothesis of a larger beam has a worse model score (summed log-probability, "
        "length_penalty=0) than a smaller beam's, more often than beam search's own non-monotonicity explains.",
        (
            "a search bug: hypotheses dropped, finished beams mishandled, scores normalised inconsistently",
            "hypotheses ranked by another score than the model's (length normalisation, penalties)",
            "early stopping of the beam search",
        ),
        (
            "compare scores with `length_penalty=0`",
            "check how finished hypotheses are kept",
            "try `early_stopping=False`",
        ),
        "DecodingConsistencyCheck",
    ),
    _c(
        "decode.ok",
        "info",
        "Decoder scores match the loss",
        "The decoder's scores equal the teacher-forced likelihood of its outputs and larger beams score "
        "at least as well (up to beam search's own rare exceptions).",
        ("healthy decoding",),
        ("nothing to do",),
        "DecodingConsistencyCheck",
    ),
    _c(
        "calibration.overconfident",
        "warning",
        "The model is overconfident",
        "ECE >= {default:CalibrationMonitor.ece_threshold} (default) over enough validation predictions, mean "
        "confidence above accuracy by more than {default:CalibrationMonitor.z} standard errors and a fitted "
        "temperature above 1, for {default:CalibrationMonitor.patience} evaluations in a row.",
        (
            "overfitting the likelihood: large weights, long training, little regularisation",
            "loss-metric mismatch: accuracy still fine while confidence grows",
        ),
        (
            "apply temperature scaling on the dev set",
            "use label smoothing or more weight decay",
            "early-stop on the metric and check calibration of the selected checkpoint",
        ),
        "CalibrationMonitor",
    ),
    _c(
        "calibration.underconfident",
        "info",
        "The model is underconfident",
        "ECE >= {default:CalibrationMonitor.ece_threshold} (default) with accuracy above mean confidence "
        "({default:CalibrationMonitor.z} standard errors, fitted temperature below 1) for the last "
        "{default:CalibrationMonitor.patience} evaluations of the fit: judged at the end, as every run starts "
        "underconfident. Info: a run that ends underconfident is usually short of training or regularised (label "
        "smoothing puts 1 - eps + eps/C on the label, so it is underconfident by design); temperature scaling "
        "fixes what is left.",
        ("too much regularisation or label smoothing", "training stopped very early"),
        ("reduce label smoothing / regularisation", "apply temperature scaling (T < 1)"),
        "CalibrationMonitor",
    ),
    _c(
        "grokking.memorized",
        "info",
        "Training data memorised, dev metric far behind",
        "The training metric reached its threshold ({default:GrokkingMonitor.threshold}) while the dev metric is at "
        "least {default:GrokkingMonitor.min_gap} below it.",
        ("memorisation before generalisation (normal early in grokking)", "overfitting"),
        ("keep training with weight decay if you expect late generalisation; do not stop on dev loss",),
        "GrokkingMonitor",
    ),
    _c(
        "grokking.generalized",
        "info",
        "Dev metric caught up after memorisation",
        "The dev metric reached its threshold after the training metric had; `data` gives the delay ratio.",
        ("grokking: late generalisation",),
        ("nothing to do",),
        "GrokkingMonitor",
    ),
    _c(
        "grokking.stalled",
        "warning",
        "Memorised long ago, no sign of generalising",
        "Memorised for {default:GrokkingMonitor.stall_factor}x the steps memorising took; over the last "
        "{default:GrokkingMonitor.stall_window} evaluations the dev metric shows no significant rise and the "
        "weight norm no significant fall (Theil-Sen 95% CIs).",
        ("too little weight decay for late generalisation", "too little training data", "plain overfitting"),
        ("increase weight decay", "add training data", "stop the run and regularise"),
        "GrokkingMonitor",
    ),
    # ------------------------------------------------------------------ ModelHealthCheck (issue 15)
    _c(
        "setup.params_not_in_optimizer",
        "error",
        "Parameters get gradients but no optimizer updates them",
        "At start, one backward of the training loss reached these trainable tensors, but no optimizer param group "
        "holds them: they keep their initial values for the whole run.",
        (
            "the optimizer was built over the wrong parameters (a sub-module's `.parameters()`, a filtered list)",
            "a layer was replaced after the optimizer captured `self.parameters()` (stale parameter list)",
            "a bug: parameters created in `setup`/`forward` after `configure_optimizers`",
        ),
        (
            "build the optimizer from `self.parameters()` inside `configure_optimizers`",
            "create every layer in `__init__`, before the optimizer exists",
            "list param groups by name and check each layer appears once",
        ),
        "ModelHealthCheck",
    ),
    _c(
        "setup.optimizer_params_unused",
        "warning",
        "Optimizer parameters get no gradient",
        "At start, tensors held by the optimizer (and requiring grad) got no gradient from a backward of the training "
        "loss: the forward never uses them (DDP then needs `find_unused_parameters=True`).",
        (
            "a stale optimizer: it holds tensors of a layer that was replaced, not the new layer's",
            "a bug: a layer defined but skipped in `forward` (a wrong branch, a typo in the attribute used)",
            "by design: heads used only at validation, or frozen by `torch.no_grad` in `forward`",
        ),
        (
            "rebuild the optimizer after changing layers",
            "use the layer in `forward`, or delete it",
            "freeze by design with `requires_grad_(False)` so the check (and DDP) know",
        ),
        "ModelHealthCheck",
    ),
    _c(
        "init.loss_off_chance",
        "warning",
        "Loss at initialisation is far from ln(C)",
        "A C-class cross-entropy on the first batch, before any step, is more than 1 nat above ln C (what "
        "uniform predictions score), or more than 1 nat below the label-prior entropy (no input-blind model can "
        "do that). `data` says whether the logit scale alone explains the gap.",
        (
            "initialisation: an output layer initialised too large, logits scaled up (missing temperature, a "
            "multiplier), inputs not normalised",
            "a bug: the loss applied to probabilities or log-probabilities twice, labels leaking into the inputs",
        ),
        (
            "initialise the last layer small (std ~0.01) and its bias to the log label prior",
            "normalise the inputs",
            "pass raw logits to `cross_entropy` (no softmax before it)",
        ),
        "ModelHealthCheck",
    ),
    _c(
        "init.dead_units",
        "warning",
        "Dead ReLU units at initialisation",
        "At start, at least 70% of a ReLU layer's units output zero for every example of the first batch: "
        "they pass no gradient and may never recover.",
        (
            "initialisation: negative bias init, too large a weight scale, inputs with a large negative offset",
            "learning rate: none yet at step 0, but a high one kills more units in the first steps",
            "a bug: inputs not normalised, or all zero",
        ),
        (
            "use He (Kaiming) init and zero biases",
            "normalise the inputs",
            "use LeakyReLU/GELU, or add normalisation before the activation",
        ),
        "ModelHealthCheck",
    ),
    _c(
        "init.saturated_units",
        "warning",
        "Saturated tanh/sigmoid units at initialisation",
        "At start, at least half of a tanh/sigmoid layer's outputs on the first batch are saturated (|tanh| > 0.99, "
        "sigmoid outside [0.01, 0.99]): their gradient is close to zero.",
        (
            "initialisation: weights too large for a saturating activation (use Xavier/Glorot)",
            "inputs not normalised (large magnitudes)",
        ),
        ("use Xavier init", "normalise the inputs", "add normalisation before the activation, or use ReLU/GELU"),
        "ModelHealthCheck",
    ),
    _c(
        "grad.vanishing",
        "warning",
        "Vanishing gradients in the lower layers",
        "Over a check interval, the first layer's gradient RMS is more than 1000x below the last layer's (median of "
        "the sampled steps) and not recovering, while the loss has not covered half its way from its start to its "
        "floor (a declared label smoothing's, else 0; a fitted model has small gradients everywhere).",
        (
            "depth without normalisation or residual connections; saturating activations",
            "initialisation too small for the depth",
            "a bug: a detach/no_grad in the middle of the forward",
        ),
        (
            "add residual connections or normalisation (BatchNorm/LayerNorm)",
            "use ReLU/GELU and He init",
            "look for `.detach()` or `torch.no_grad()` between the layers",
        ),
        "ModelHealthCheck",
    ),
    _c(
        "grad.exploding",
        "error",
        "Exploding gradients",
        "The global gradient norm (sampled before clipping) became NaN/Inf, or grew 1000x over its smallest earlier "
        "level while the loss did not fall.",
        (
            "learning rate too high",
            "a recurrent model without gradient clipping; an initialisation too large for the depth",
            "a bug: a loss that is not averaged (grows with batch/sequence length), fp16 overflow",
        ),
        (
            "add gradient clipping (`Trainer(gradient_clip_val=1.0)`)",
            "lower the learning rate 10x",
            "check the loss reduction",
        ),
        "ModelHealthCheck",
    ),
    _c(
        "grad.update_ratio",
        "warning",
        "Update/weight ratio far from the usual range",
        "Over a check interval, the per-step update ||dW|| / ||W|| (measured on sampled steps) is above 0.3 for a "
        "layer, or below 1e-6 for the median layer at a learning rate not in warm-up or decay. The usual value is "
        "around 1e-3.",
        (
            "learning rate far too high (ratio high) or far too low (ratio low) for this model and optimizer",
            "initialisation: weights near zero make any update large relative to them",
            "a bug: the optimizer steps on the wrong parameters, or the learning rate is scaled twice",
        ),
        ("scale the learning rate towards a ratio of ~1e-3", "check the scheduler's values", "check weight init"),
        "ModelHealthCheck",
    ),
    _c(
        "grad.clipping_always",
        "warning",
        "Gradient clipping is active on nearly every step",
        "The pre-clip gradient norm (or largest entry, for `gradient_clip_algorithm='value'`) exceeded "
        "`gradient_clip_val` on at least 95% of the sampled steps of a check interval: every update is rescaled.",
        (
            "learning rate too high (large gradients from an unstable run)",
            "`gradient_clip_val` set far below the usual gradient norm of this model",
            "a bug: a loss summed instead of averaged",
        ),
        ("lower the learning rate", "raise `gradient_clip_val` to about the median pre-clip norm", "average the loss"),
        "ModelHealthCheck",
    ),
    _c(
        "eval.weak_slice",
        "info",
        "One slice of the dev set is much worse than the rest",
        "The accuracy of one slice (a label, an input-length bucket, a metadata value such as a source or a "
        "language, or a target-token frequency bucket) is below the rest of its column by at least 0.05, with at "
        "least 30 examples, and a one-sided Fisher exact test is significant at family-wise 0.005 after Holm's "
        "correction over every slice tested. `data` holds the slice, its size, interval and the gap.",
        (
            "too little capacity or data for this phenomenon (rare words, long inputs, a low-resource language)",
            "training stopped before the slice was learned",
            "a bug that hits only these examples: truncation of long inputs, a tokenizer or preprocessing path "
            "for one source, wrong labels in one source",
            "train/test disconnect: the slice is rare or absent in training",
        ),
        (
            "read the sampled rows of this slice in `debug/errors/samples` (filter by the column)",
            "check the slice's preprocessing and labels (truncation, encoding, label mapping)",
            "add training data for the slice or up-weight it",
            "track the slice's accuracy (`debug/slices/<column>/<value>/acc`) across changes",
        ),
        "ErrorAnalysis",
    ),
    _c(
        "eval.slice_regression",
        "warning",
        "A slice got worse while the overall metric improved",
        "Since the previous analysed evaluation, the accuracy of one slice fell by at least 0.05 (one-sided "
        "Fisher exact test, Holm-corrected at 0.005 over the slices compared, at least 30 examples) while the "
        "overall accuracy rose: the aggregate hides a loss on this phenomenon.",
        (
            "capacity traded away from a minority slice as the majority is fitted",
            "a learning-rate or schedule change that helps the bulk of the data",
            "overfitting to the majority of the training data",
            "loss-metric mismatch: the average improves while a slice you care about does not",
        ),
        (
            "compare the slice's rows between the two evaluations in `debug/errors/samples`",
            "select checkpoints on the slice metric too, not only the aggregate",
            "re-balance or up-weight the slice in training",
        ),
        "ErrorAnalysis",
    ),
)

CATALOGUE: dict[str, CheckInfo] = {c.id: c for c in _CHECKS}


def check_info(check: str) -> CheckInfo:
    try:
        return CATALOGUE[check]
    except KeyError:
        raise ValueError(f"Unknown check id {check!r}; known ids: {sorted(CATALOGUE)}") from None


def render_catalogue() -> str:
    """The catalogue as Markdown: the source of ``docs/checks.md``."""
    lines = [
        "# Check catalogue",
        "",
        "Every finding id lightning-debug can emit. Causes are listed most likely first, in the order the",
        "debugging lecture diagnoses them: capacity, then optimizer / learning rate / initialisation / batch",
        "size, then implementation bugs, then train/test disconnect, then search, then overfitting, then",
        "loss-metric mismatch.",
        "",
        "Generated from `lightning_debug/findings.py` by `python -m lightning_debug checks > docs/checks.md`.",
        "",
        "| id | severity | emitted by | title |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{c.id}` | {c.severity.value} | {c.emitted_by} | {c.title} |" for c in _CHECKS]
    for c in _CHECKS:
        lines += ["", f"## `{c.id}`", "", f"**{c.title}** ({c.severity.value}, {c.emitted_by})", "", c.description]
        lines += ["", "Likely causes, most likely first:", ""]
        lines += [f"{i}. {cause}" for i, cause in enumerate(c.causes, 1)]
        lines += ["", "What to try:", ""]
        lines += [f"- {fix}" for fix in c.fixes]
    return "\n".join(lines) + "\n"
