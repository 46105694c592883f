"""The one rule for whether a number may be written within a point's engineering limits."""

from __future__ import annotations

import math
from typing import Any

import pytest

from drivers.limits import limit_violation

BELOW = "outside the point's limits: below the minimum"
ABOVE = "outside the point's limits: above the maximum"


@pytest.mark.parametrize(
    ("value", "lo", "hi", "problem"),
    [
        # both limits
        (50, 0, 100, None),
        (0, 0, 100, None),  # the limits themselves are allowed
        (100.0, 0, 100, None),
        (-0.1, 0, 100, f"{BELOW} 0"),
        (100.5, 0, 100, f"{ABOVE} 100"),
        # only a lower limit: everything above it goes, however large
        (1e9, 10, None, None),
        (9.99, 10, None, f"{BELOW} 10"),
        # only an upper limit: everything below it goes, however negative
        (-1e9, None, 2.5, None),
        (2.51, None, 2.5, f"{ABOVE} 2.5"),
        # no limits
        (-1e300, None, None, None),
        # not finite: never writable, limits or not
        (math.nan, None, None, "the value is not finite"),
        (math.nan, 0, 100, "the value is not finite"),
        (math.inf, None, None, "the value is not finite"),
        (-math.inf, 0, None, "the value is not finite"),
        # not numbers: the datatype's business, not this check's
        (True, 5, 10, None),
        (False, 5, 10, None),
        ("abc", 0, 1, None),
        (None, 0, 1, None),
        ([1], 0, 1, None),
    ],
)
def test_limit_violation(
    value: Any, lo: float | None, hi: float | None, problem: str | None
) -> None:
    assert limit_violation(value, lo, hi) == problem
