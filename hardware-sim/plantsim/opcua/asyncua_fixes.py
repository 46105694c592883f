"""A narrow fix for asyncua 2.1's server, applied when the simulated PLC's server is imported.

`MonitoredItemService._is_deadband_exceeded` subtracts the old value from the new one. A Bad
status carries a null value (OPC UA Part 4, 7.7.1), so a monitored item with an absolute
deadband raised TypeError there and the notification was lost: a SCADA client was never told
its point went Bad. A change to or from a non-numeric value always passes the deadband.
(The gateway's own OPC UA server carries the same fix; plantsim may not import the gateway.)
"""

from __future__ import annotations

from typing import Any

from asyncua.server.monitored_item_service import MonitoredItemService


def apply() -> None:
    """Make the deadband check null-safe; idempotent."""
    original = MonitoredItemService._is_deadband_exceeded
    if getattr(original, "_null_safe", False):
        return

    def is_deadband_exceeded(self: Any, values: Any, flt: Any) -> bool:
        try:
            return original(self, values, flt)
        except TypeError:
            return True

    is_deadband_exceeded._null_safe = True  # type: ignore[attr-defined]
    MonitoredItemService._is_deadband_exceeded = is_deadband_exceeded  # type: ignore[method-assign]
