"""``DebugCallback``: what every lightning-debug callback shares.

- one :meth:`DebugCallback.emit` path: catalogue lookup, de-duplication, one rank-zero console line, a W&B
  alert for errors;
- every Lightning hook a subclass defines is guarded: an exception inside the check becomes a
  ``check.error`` finding and training goes on (``raise_errors=True`` re-raises);
- :meth:`DebugCallback.skip`: the one way to say "this check cannot run here, and why" (``check.skipped``);
- callbacks learn about each other's findings through the base class, never by looking for each other:
  :meth:`DebugCallback.findings_on` (the findings of every debug callback on a trainer),
  :meth:`DebugCallback.emissions_on` (a per-trainer count of ``emit`` calls: a free "anything new?") and the
  :meth:`DebugCallback.on_finding` hook (called on every other debug callback of the trainer at each ``emit``);
- ``state_dict`` holds findings as plain types so checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_debug.findings import Finding, Severity, check_info, jsonable
from lightning_debug.sinks import Sink

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger("lightning_debug")
if not log.handlers:  # like Lightning's own logger: visible by default, configurable by the user
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("[lightning-debug] %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False

_HOOK_PREFIXES = ("on_", "setup", "teardown")
_UNGUARDED = {"on_exception", "on_save_checkpoint", "on_load_checkpoint"}
# per-trainer state of the findings exchange, kept on the trainer itself (it dies with it)
_EMISSIONS = "_lightning_debug_emissions"
_NOTIFYING = "_lightning_debug_notifying"
_DISPATCHED_HOOKS = tuple(  # the hooks Lightning calls through `_call_callback_hooks`
    name
    for name, attr in vars(Callback).items()
    if callable(attr) and name.startswith(_HOOK_PREFIXES) and name not in ("on_save_checkpoint", "on_load_checkpoint")
)


class LeanCallback(Callback):
    """A callback whose hooks cost nothing where it does not define them.

    Lightning's `_call_callback_hooks` calls a callback's hook only if it is callable, and pays a profiler
    context and a ``state_key`` for each one it does call, no-op or not: about 2 us per hook per callback, six
    hooks per training step. For the nine callbacks of the suite that alone was 3-6% of a 1.7 ms MLP step. So
    the hooks a subclass does not define are set to ``None`` and never dispatched (a subclass that defines one
    must not call ``super()`` for it: there is nothing to call). A hook with work on some steps only can be a
    property returning its body (``on_<hook>_due``, guarded like the hooks) on those steps and ``None`` else.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _DISPATCHED_HOOKS:
            if getattr(cls, name) is getattr(Callback, name):
                setattr(cls, name, None)


def _guard(hook: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(hook)
    def guarded(self: DebugCallback, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> Any:
        try:
            return hook(self, trainer, *args, **kwargs)
        except Exception as err:
            if self.raise_errors or isinstance(err, MisconfigurationException):  # the user's to fix: not ours
                raise
            self.emit(
                trainer,
                "check.error",
                f"{type(self).__name__}.{hook.__name__} failed: {type(err).__name__}: {err}",
                data={"hook": hook.__name__, "exception": type(err).__name__, "text": str(err)},
                key=f"{hook.__name__}:{type(err).__name__}",
            )
            return None

    guarded.__lightning_debug_guarded__ = True  # type: ignore[attr-defined]
    return guarded


class DebugCallback(LeanCallback):
    """Base class: findings, de-duplication, guarded hooks, skips, and what the other callbacks found.

    Args:
        raise_errors: re-raise the callback's own exceptions instead of reporting them as ``check.error``.
        print_findings: print each new finding to the console (rank zero only).
        strict / verbose: the former names of ``raise_errors`` / ``print_findings``, still accepted (they
            override the new names when given). ``MetricEarlyStopping`` gives them Lightning's meaning instead.

    Reading other callbacks' findings (never ``trainer.callbacks`` or a class-level counter):

    - ``self.findings_on(trainer)``: the findings of the other debug callbacks on ``trainer`` (restored ones
      included), ``check=`` to filter by id, ``include_self=True`` for this callback's too;
    - ``self.watched_on(trainer, check)``: whether another debug callback on ``trainer`` can emit ``check``;
    - ``self.emissions_on(trainer)``: how many times any debug callback on ``trainer`` called ``emit``
      (repeats included); compare it with the value at the last look to skip work when nothing happened;
    - override ``on_finding(trainer, finding)``: called on every other debug callback of the trainer for each
      ``emit`` (a repeat passes the finding with its updated ``count``). Guarded like the Lightning hooks.
    """

    #: Deprecated (use :meth:`emissions_on`): ``emit`` calls by every debug callback in this process.
    total_emissions: ClassVar[int] = 0

    def __init__(
        self,
        *,
        raise_errors: bool = False,
        print_findings: bool = True,
        strict: bool | None = None,
        verbose: bool | None = None,
    ) -> None:
        self.raise_errors = raise_errors if strict is None else strict
        self.print_findings = print_findings if verbose is None else verbose
        self.findings: list[Finding] = []
        self._seen: dict[str, int] = {}  # dedup key -> index into findings

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, attr in list(vars(cls).items()):
            if (
                callable(attr)
                and name.startswith(_HOOK_PREFIXES)
                and name not in _UNGUARDED
                and not getattr(attr, "__lightning_debug_guarded__", False)
            ):
                setattr(cls, name, _guard(attr))

    def emit(
        self,
        trainer: pl.Trainer,
        check: str,
        message: str,
        *,
        data: dict[str, Any] | None = None,
        hint: str | None = None,
        severity: Severity | str | None = None,
        key: str | None = None,
    ) -> Finding:
        """Record a finding. A repeat of the same ``check`` and ``key`` is counted, not printed again, unless it
        comes with a higher severity (a provisional info confirmed as a warning): then it takes that severity,
        message and evidence, and is printed."""
        info = check_info(check)
        DebugCallback.total_emissions += 1
        if trainer is not None:
            setattr(trainer, _EMISSIONS, getattr(trainer, _EMISSIONS, 0) + 1)
        step = int(trainer.global_step) if trainer is not None else 0
        level = Severity(severity) if severity is not None else info.severity
        dedup = f"{check}|{key or ''}"
        if dedup in self._seen:
            i = self._seen[dedup]
            seen = self.findings[i].repeated(step)
            if level.rank > seen.severity.rank:  # a provisional finding confirmed: announced again, with its evidence
                seen = replace(seen, severity=level, message=message, data=jsonable(data or {}))
                self._announce(trainer, seen)
            self.findings[i] = seen
            self._notify(trainer, seen)
            return seen
        finding = Finding(
            check=check,
            severity=level,
            message=message,
            hint=hint if hint is not None else info.hint,
            step=step,
            epoch=int(trainer.current_epoch) if trainer is not None else 0,
            data=jsonable(data or {}),
            source=type(self).__name__,
        )
        self._seen[dedup] = len(self.findings)
        self.findings.append(finding)
        self._announce(trainer, finding)
        self._notify(trainer, finding)
        return finding

    def skip(
        self, trainer: pl.Trainer, reason: str, *, key: str | None = None, data: dict[str, Any] | None = None
    ) -> Finding:
        """Say that (part of) the check cannot run here and why: a ``check.skipped`` finding worded
        ``"<Class>: <reason>"``. Repeats with the same ``key`` (default: one per callback) are counted."""
        return self.emit(
            trainer,
            "check.skipped",
            f"{type(self).__name__}: {reason}",
            data={"reason": reason, **(data or {})},
            key=key if key is not None else type(self).__name__,
        )

    # -- what the other debug callbacks found --------------------------------------------------------------
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Send the scalars the sink holds back (a subclass that overrides this calls ``super()``)."""
        Sink(trainer).flush()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        Sink(trainer).flush()

    def on_finding(self, trainer: pl.Trainer, finding: Finding) -> None:
        """Called when another debug callback on ``trainer`` emits ``finding`` (new or repeated). Override it."""

    def findings_on(
        self, trainer: pl.Trainer, check: str | None = None, *, include_self: bool = False
    ) -> list[Finding]:
        """The findings of the debug callbacks on ``trainer`` (the others unless ``include_self``), of one id
        if ``check`` is given."""
        return [
            f
            for cb in debug_callbacks_of(trainer)
            if include_self or cb is not self
            for f in cb.findings
            if check is None or f.check == check
        ]

    def watched_on(self, trainer: pl.Trainer, check: str) -> bool:
        """Another debug callback on ``trainer`` can emit ``check`` (the catalogue's ``emitted_by``): e.g. "is
        anything watching for ``loss.plateau``?", without naming or importing that callback's class."""
        owner = check_info(check).emitted_by
        return any(type(cb).__name__ == owner for cb in debug_callbacks_of(trainer) if cb is not self)

    @staticmethod
    def emissions_on(trainer: pl.Trainer) -> int:
        """``emit`` calls by the debug callbacks on ``trainer`` so far, repeats included."""
        return int(getattr(trainer, _EMISSIONS, 0))

    def _notify(self, trainer: pl.Trainer | None, finding: Finding) -> None:
        """``on_finding`` on every other debug callback that defines it; not re-entered from inside one (a
        failing ``on_finding`` emits ``check.error``, which must not notify again)."""
        if trainer is None or getattr(trainer, _NOTIFYING, False):
            return
        listeners = [
            cb
            for cb in debug_callbacks_of(trainer)
            if cb is not self and type(cb).on_finding is not DebugCallback.on_finding
        ]
        if not listeners:
            return
        setattr(trainer, _NOTIFYING, True)
        try:
            for cb in listeners:
                cb.on_finding(trainer, finding)
        finally:
            setattr(trainer, _NOTIFYING, False)

    @rank_zero_only
    def _announce(self, trainer: pl.Trainer | None, finding: Finding) -> None:
        if self.print_findings:
            level = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
            log.log(level[finding.severity.value], "%s [%s] %s", finding.check, finding.severity.value, finding.message)
        if trainer is not None and finding.severity is Severity.ERROR:
            title = f"{finding.check}: {check_info(finding.check).title}"
            Sink(trainer).alert(title, f"{finding.message}\n{finding.hint}")

    def has_finding(self, check: str) -> bool:
        return any(f.check == check for f in self.findings)

    def state_dict(self) -> dict[str, Any]:
        return {"findings": [f.to_dict() for f in self.findings], "seen": dict(self._seen)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.findings = [Finding.from_dict(d) for d in state_dict.get("findings", [])]
        self._seen = dict(state_dict.get("seen", {}))


def debug_callbacks_of(trainer: pl.Trainer) -> list[DebugCallback]:
    """The debug callbacks on ``trainer`` (for the report and benchmarks; callbacks use ``findings_on``)."""
    return [cb for cb in trainer.callbacks if isinstance(cb, DebugCallback)]  # type: ignore[attr-defined]
