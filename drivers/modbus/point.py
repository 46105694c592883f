"""A Modbus point as the driver sees it, and the pure checks that reject impossible ones."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from drivers.errors import PointError
from drivers.modbus.codec import (
    Address,
    DataType,
    Format,
    Order,
    parse_address,
    register_count,
)

__all__ = ["MAX_STRING_LENGTH", "ModbusPoint", "PointError", "validate_point"]

# One read request carries at most 125 registers, and a point is never split across requests.
MAX_STRING_LENGTH = 250

E = TypeVar("E", bound=StrEnum)


@dataclass(frozen=True, slots=True, init=False)
class ModbusPoint:
    """One point: an opaque key, where it lives on the device, and how to decode it.

    `address` may be given as text (`holding:100.3`) and is parsed. `datatype` None means
    `bool` for coils, discrete inputs and register bits, `uint16` otherwise. `byte_order` and
    `word_order` None take the device defaults. `lo`/`hi` are engineering limits: reads outside
    them are UNCERTAIN, writes outside them are refused. `unit_id` None is the device's unit.
    """

    key: str
    address: Address
    datatype: DataType
    length: int | None
    byte_order: Order | None
    word_order: Order | None
    scale: float
    offset: float
    lo: float | None
    hi: float | None
    writable: bool
    unit_id: int | None

    # Written out rather than generated: it takes the text forms a config hands over, while
    # the attributes are always parsed (an Address, a DataType), so readers need no checks.
    def __init__(
        self,
        key: str,
        address: Address | str,
        datatype: DataType | str | None = None,
        length: int | None = None,
        byte_order: Order | str | None = None,
        word_order: Order | str | None = None,
        scale: float = 1.0,
        offset: float = 0.0,
        lo: float | None = None,
        hi: float | None = None,
        writable: bool = False,
        *,
        unit_id: int | None = None,
    ) -> None:
        """Parse the text forms, fill the default datatype, then check the combination."""
        if isinstance(address, str):
            try:
                address = parse_address(address)
            except ValueError as exc:
                raise PointError("address", str(exc)) from None
        if not isinstance(address, Address):
            raise PointError("address", f"expected an address like holding:100, got {address!r}")
        if datatype is None:
            bitlike = address.table.is_bits or address.bit is not None
            datatype = DataType.BOOL if bitlike else DataType.UINT16
        fields = {
            "key": key,
            "address": address,
            "datatype": _member(DataType, "datatype", datatype),
            "length": length,
            "byte_order": _member(Order, "byte_order", byte_order),
            "word_order": _member(Order, "word_order", word_order),
            "scale": scale,
            "offset": offset,
            "lo": lo,
            "hi": hi,
            "writable": writable,
            "unit_id": unit_id,
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)  # frozen: set once, here
        validate_point(self)

    def format(
        self, byte_order: Order | str = Order.BIG, word_order: Order | str = Order.BIG
    ) -> Format:
        """Return the codec format, filling unset orders with the device defaults given."""
        return Format(
            datatype=self.datatype,
            length=self.length,
            byte_order=self.byte_order or Order(byte_order),
            word_order=self.word_order or Order(word_order),
            bit=self.address.bit,
            scale=self.scale,
            offset=self.offset,
        )

    @property
    def span(self) -> int:
        """Registers (or bits) the point occupies on the device."""
        return register_count(self.datatype, self.length)


def validate_point(point: ModbusPoint) -> None:
    """Raise PointError (naming the field) if the point's settings cannot work together."""
    addr, dt = point.address, point.datatype
    if not isinstance(addr, Address):
        raise PointError("address", f"expected an address like holding:100, got {addr!r}")
    if not isinstance(point.key, str) or not point.key:
        raise PointError("key", "a point needs a non-empty key")
    if addr.table.is_bits and dt is not DataType.BOOL:
        raise PointError(
            "datatype",
            f"datatype {dt} is not possible on a {addr.table}: coils and discrete inputs hold "
            "one bit (use datatype bool)",
        )
    if addr.bit is not None and dt is not DataType.BOOL:
        raise PointError(
            "address",
            f"a bit address ({addr}) selects one bit of a register and needs datatype bool, "
            f"not {dt} (drop the .{addr.bit} to read the whole register)",
        )
    if dt is DataType.BOOL and not addr.table.is_bits and addr.bit is None:
        raise PointError(
            "datatype",
            f"datatype bool on a register needs a bit: write the address as {addr}.B with B 0..15",
        )
    if dt is DataType.STRING:
        if point.length is None:
            raise PointError("length", "a string point needs length (characters, 2 per register)")
        if not isinstance(point.length, int) or not 1 <= point.length <= MAX_STRING_LENGTH:
            raise PointError(
                "length", f"length must be 1..{MAX_STRING_LENGTH} characters, got {point.length!r}"
            )
    elif point.length is not None:
        raise PointError("length", f"length applies only to string points, not {dt}")
    span = point.span
    if addr.offset + span - 1 > 0xFFFF:
        raise PointError(
            "address", f"{dt} at {addr} needs {span} registers and runs past address 65535"
        )
    if point.writable and not addr.table.is_writable:
        raise PointError(
            "writable",
            f"{addr.table} is read-only in Modbus: only coils and holding registers can be written",
        )
    numeric = dt.is_numeric
    for name in ("scale", "offset"):
        value = getattr(point, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise PointError(name, f"{name} must be a finite number, got {value!r}")
    if point.scale == 0:
        raise PointError("scale", "scale must not be 0 (engineering = raw * scale + offset)")
    if not numeric and (point.scale != 1.0 or point.offset != 0.0):
        raise PointError(
            "scale" if point.scale != 1.0 else "offset",
            f"scale and offset apply only to numeric points, not {dt}",
        )
    for name in ("lo", "hi"):
        value = getattr(point, name)
        if value is None:
            continue
        if not numeric:
            raise PointError(name, f"engineering limits apply only to numeric points, not {dt}")
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise PointError(name, f"{name} must be a number, got {value!r}")
    if point.lo is not None and point.hi is not None and point.lo > point.hi:
        raise PointError("hi", f"hi ({point.hi:g}) is below lo ({point.lo:g})")
    if point.unit_id is not None and (
        isinstance(point.unit_id, bool)
        or not isinstance(point.unit_id, int)
        or not 0 <= point.unit_id <= 247
    ):
        raise PointError("unit_id", f"unit_id must be 0..247, got {point.unit_id!r}")


def _member(enum: type[E], name: str, value: E | str | None) -> E | None:
    """`value` as a member of `enum` (None stays None); PointError naming `name` if not one."""
    if value is None or isinstance(value, enum):
        return value
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(m.value for m in enum)
        raise PointError(name, f"{value!r} is not one of {choices}") from None
