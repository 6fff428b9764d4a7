"""Decisions as pure functions over plain arrays and dataclasses: no trainer, no emit, no logging."""
