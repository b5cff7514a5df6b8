"""The range check behind the validated settings dataclasses and the command line's number arguments."""

from __future__ import annotations

import math


def check_range(
    value: object,
    low: float,
    high: float | None = None,
    *,
    name: str = "",
    low_open: bool = False,
    integer: bool = False,
) -> None:
    """Raise a `ValueError` ("`name` must be > 0, got -1") unless `value` is a finite number (an `int`, not a `bool`,
    when `integer`) in [low, high], or (low, high] when `low_open`; no `high` means no upper bound."""
    bounds = f"{'>' if low_open else '>='} {low}" if high is None else f"in {'(' if low_open else '['}{low}, {high}]"
    is_number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if (
        not is_number
        or not math.isfinite(value)
        or value < low
        or (low_open and value == low)
        or (high is not None and value > high)
    ):
        subject = f"{name} must be" if name else "must be"
        raise ValueError(f"{subject} {'an integer ' if integer else ''}{bounds}, got {value!r}")
