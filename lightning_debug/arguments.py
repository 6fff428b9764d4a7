"""Validating a callback's arguments in ``__init__``: one row per argument, one wording for every error.

Each check is ``(name, value, ok, rule)``; the first that is not ``ok`` raises ``error`` (a ``ValueError`` by
default) as ``"<where>`name` <rule>, got <value>"``, so the message names the argument the user got wrong.
"""

from __future__ import annotations

from typing import Any

Check = tuple[str, Any, bool, str]


def require(*checks: Check, error: type[Exception] = ValueError, where: str = "") -> None:
    """Raise for the first check that fails (the conditions are evaluated up front: keep each one safe for any
    value the earlier ones let through)."""
    for name, value, ok, rule in checks:
        if not ok:
            raise error(f"{where}`{name}` {rule}, got {value!r}")


def optional_callable(name: str, value: Any) -> Check:
    """``value`` is ``None`` or callable."""
    return (name, value, value is None or callable(value), "must be callable or None")
