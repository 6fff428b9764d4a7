"""Persistence: a condition must hold on several consecutive checks before it is reported."""

from __future__ import annotations


def streak(previous: int, holds: bool) -> int:
    """Consecutive checks a condition has held: ``previous + 1`` while it holds, else 0."""
    return previous + 1 if holds else 0
