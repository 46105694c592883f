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
        cur, old = values.get_current_datavalue(), values.get_old_datavalue()
        if cur is not None and old is not None and _status(cur) != _status(old):
            return True
        try:
            return original(self, values, flt)
        except TypeError:
            return True

    is_deadband_exceeded._null_safe = True  # type: ignore[attr-defined]
    MonitoredItemService._is_deadband_exceeded = is_deadband_exceeded


def _status(dv: Any) -> int:
    return dv.StatusCode.value if dv.StatusCode is not None else 0
