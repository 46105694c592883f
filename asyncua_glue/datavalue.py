"""A DataValue that subscriptions may keep as it is.

asyncua deep-copies the DataValue of every change for every monitored item that watches it
("to prevent referencing the inner value"): for a float with two timestamps that copy costs more
than everything else a server does per change, five times over (~30 µs of a notification). Both
servers make a fresh DataValue per change and never mutate it afterwards, so the copy can be the
original.
"""

from __future__ import annotations

from typing import Any

from asyncua import ua


class SharedDataValue(ua.DataValue):
    """A DataValue never changed after it is made, so copying it returns it.

    It encodes as a plain DataValue: asyncua serialises by the declared field type.
    """

    # No per-instance dict: as small and as fast to make as the DataValue it stands for.
    __slots__ = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedDataValue:
        return self

    def __copy__(self) -> SharedDataValue:
        return self
