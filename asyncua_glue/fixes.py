"""A narrow fix for asyncua 2.1's server; each of our servers applies it when imported.

`MonitoredItemService._is_deadband_exceeded` subtracts the old value from the new one. A Bad
status carries a null value (OPC UA Part 4, 7.7.1), so a monitored item with an absolute
deadband raised TypeError there and the notification was lost: a SCADA client was never told
its point went Bad. A change to or from a non-numeric value always passes the deadband.
The upstream patch, and a reproduction, are in docs/upstream/; once a release carries it, this
part goes.

The same check also swallowed a change of status alone (Good 5.0 -> UncertainLastUsableValue
5.0: the value moved 0, so it "failed" the deadband). A deadband filters value changes (Part 4,
DataChangeFilter); with the default trigger STATUS_VALUE a status change is always reported. The
gateway serves a STALE point exactly that way, so without this a deadband subscriber would never
see its point go stale. Not yet offered upstream (docs/upstream/README.md, "Related").

And it measured the deadband from the previous *sample*, not from the last value *reported*
(Part 4, 7.22.2: "the last cached value", the one sent): a value that creeps less than the
deadband per sample was never reported at all. The closed-loop bench (bench/closed_loop.py)
found it: the oven's heater wear (deadband 0.0001) grows ~0.00004 a sample, so the twin kept the
wear it read at connect, and the maintenance policy never saw it cross 80 %. The reference is
now the last value that passed, kept on the monitored item's values.
"""

from __future__ import annotations

import functools
from typing import Any

from asyncua.server.monitored_item_service import MonitoredItemService


def apply() -> None:
    """Make the deadband check null-safe and status-aware; idempotent."""
    original = MonitoredItemService._is_deadband_exceeded
    if getattr(original, "_null_safe", False):
        return

    # `wraps` also keeps the original as `__wrapped__`, so a test can tell whether asyncua
    # still needs this.
    @functools.wraps(original)
    def is_deadband_exceeded(self: Any, values: Any, flt: Any) -> bool:
        cur = values.get_current_datavalue()
        # The last value reported; before the first report asyncua's own previous sample.
        old = getattr(values, _REPORTED, None)
        if old is None:
            old = values.get_old_datavalue()
        if cur is not None and old is not None and _status(cur) != _status(old):
            passed = True
        else:
            try:
                passed = original(self, _Pair(cur, old), flt)
            except TypeError:
                passed = True
        if passed:
            setattr(values, _REPORTED, cur)
        return passed

    is_deadband_exceeded._null_safe = True  # type: ignore[attr-defined]
    MonitoredItemService._is_deadband_exceeded = is_deadband_exceeded


_REPORTED = "_opstwin_reported"


class _Pair:
    """The two DataValues asyncua's check compares, as its MonitoredItemValues offers them."""

    def __init__(self, current: Any, old: Any) -> None:
        self._current, self._old = current, old

    def get_current_datavalue(self) -> Any:
        return self._current

    def get_old_datavalue(self) -> Any:
        return self._old


def _status(dv: Any) -> int:
    return dv.StatusCode.value if dv.StatusCode is not None else 0
