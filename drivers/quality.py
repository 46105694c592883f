"""The quality a decoded value deserves, by the same rules for every driver. Pure."""

from __future__ import annotations

import math
from typing import Any

from drivers.contract import Quality

__all__ = ["assess", "format_range"]


def assess(
    value: Any, lo: float | None = None, hi: float | None = None
) -> tuple[Quality, str | None]:
    """Return (quality, reason) for a value just read from a device.

    A float that is NaN or infinite is BAD ("value not finite"): no consumer can use it. A
    number outside the engineering range [lo, hi] is UNCERTAIN: the device answered, but the
    value is not believable (a broken sensor, a wrong scale). Bools and strings are GOOD.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return Quality.GOOD, None
    if isinstance(value, float) and not math.isfinite(value):
        return Quality.BAD, f"value not finite ({value})"
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        return Quality.UNCERTAIN, f"{value:g} outside engineering range {format_range(lo, hi)}"
    return Quality.GOOD, None


def format_range(lo: float | None, hi: float | None) -> str:
    """Render limits as `[lo, hi]`, with -inf/inf for a missing side."""
    low = "-inf" if lo is None else f"{lo:g}"
    high = "inf" if hi is None else f"{hi:g}"
    return f"[{low}, {high}]"
