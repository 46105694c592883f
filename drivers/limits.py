"""Whether a number may be written to a point with engineering limits. Pure.

One rule for every writer (both drivers' pre-write checks, the gateway's setpoint check), so a
value the gateway lets through is never refused by a driver for a different reason, and a
one-sided limit (only `lo`, or only `hi`) is honoured everywhere.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["limit_violation"]


def limit_violation(value: Any, lo: float | None, hi: float | None) -> str | None:
    """Return why numeric `value` may not be written within [lo, hi], or None if it may.

    A missing side is no limit. Bools and non-numbers are not this check's business (the
    point's datatype decides those) and return None.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return "the value is not finite"
    if lo is not None and value < lo:
        return f"outside the point's limits: below the minimum {lo:g}"
    if hi is not None and value > hi:
        return f"outside the point's limits: above the maximum {hi:g}"
    return None
