"""Modbus addresses and the register codec: pure functions, no I/O.

`parse_address("holding:100.3")` turns the config syntax into an `Address`. `decode(fmt, data)`
turns the registers (or bits) read for one point into its engineering value and
`encode(fmt, value)` does the reverse; both are symmetric and raise `ValueError` for data or
values they cannot represent. Byte order is the order of the two bytes inside each register,
word order the order of the registers of a 32/64-bit value; "big" for both is the Modbus
standard (ABCD), a "little" word order is the CDAB many meters ship.
"""

from __future__ import annotations

import functools
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "Address",
    "DataType",
    "Format",
    "Order",
    "Table",
    "decode",
    "encode",
    "parse_address",
    "register_count",
    "set_bit",
    "struct_code",
    "tolerance",
]


class Table(StrEnum):
    """The four Modbus data tables."""

    COIL = "coil"
    DISCRETE = "discrete"
    HOLDING = "holding"
    INPUT = "input"

    @property
    def is_bits(self) -> bool:
        """True for the single-bit tables (coils, discrete inputs)."""
        return self in (Table.COIL, Table.DISCRETE)

    @property
    def is_writable(self) -> bool:
        """True for the tables a client may write (coils, holding registers)."""
        return self in (Table.COIL, Table.HOLDING)


class DataType(StrEnum):
    """Raw datatypes a point can have on the device."""

    BOOL = "bool"
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    STRING = "string"

    @property
    def is_integer(self) -> bool:
        """True for the signed and unsigned integer types."""
        return self in _INT_FORMATS

    @property
    def is_float(self) -> bool:
        """True for float32 and float64."""
        return self in (DataType.FLOAT32, DataType.FLOAT64)

    @property
    def is_numeric(self) -> bool:
        """True for integers and floats (the types scale, offset and limits apply to)."""
        return self.is_integer or self.is_float


class Order(StrEnum):
    """Byte order within a register, or register order within a multi-register value."""

    BIG = "big"
    LITTLE = "little"


@dataclass(frozen=True, slots=True)
class Address:
    """A place on the device: table, offset and, for a bit of a register, the bit (0 = LSB)."""

    table: Table
    offset: int
    bit: int | None = None

    def __str__(self) -> str:
        base = f"{self.table}:{self.offset}"
        return base if self.bit is None else f"{base}.{self.bit}"


_ADDRESS = re.compile(r"^\s*([a-z]+)\s*:\s*(\d+)(?:\.(\d+))?\s*$")
_EXPECTED = (
    "expected TABLE:N or TABLE:N.B, TABLE one of coil, discrete, holding, input, "
    "N a 0-based address 0..65535, B a bit 0..15 (holding and input only), e.g. holding:100.3"
)


def parse_address(text: str) -> Address:
    """Parse `coil:N`, `discrete:N`, `holding:N`, `input:N` or `holding:N.B` / `input:N.B`."""
    if not isinstance(text, str):
        raise ValueError(f"{_EXPECTED}; got {text!r}")
    match = _ADDRESS.match(text.lower())
    if match is None:
        raise ValueError(f"{_EXPECTED}; got {text!r}")
    name, number, bit_text = match.groups()
    try:
        table = Table(name)
    except ValueError:
        raise ValueError(f"unknown table {name!r}: {_EXPECTED}; got {text!r}") from None
    offset = int(number)
    if offset > 0xFFFF:
        raise ValueError(f"address {offset} out of range: {_EXPECTED}; got {text!r}")
    bit: int | None = None
    if bit_text is not None:
        if table.is_bits:
            raise ValueError(
                f"a {table} is a single bit and takes no .B suffix: {_EXPECTED}; got {text!r}"
            )
        bit = int(bit_text)
        if bit > 15:
            raise ValueError(f"bit {bit} out of range: {_EXPECTED}; got {text!r}")
    return Address(table, offset, bit)


@dataclass(frozen=True, slots=True)
class Format:
    """How one point's value is laid out in registers (or bits) and scaled."""

    datatype: DataType
    length: int | None = None  # characters, strings only
    byte_order: Order = Order.BIG
    word_order: Order = Order.BIG
    bit: int | None = None  # a bit of a 16-bit register (datatype bool)
    scale: float = 1.0
    offset: float = 0.0

    @property
    def registers(self) -> int:
        """Registers (or bits, for coils and discrete inputs) the value occupies."""
        return register_count(self.datatype, self.length)

    @property
    def scaled(self) -> bool:
        """True when scale or offset changes the raw value."""
        return self.scale != 1.0 or self.offset != 0.0


def register_count(datatype: DataType, length: int | None = None) -> int:
    """Return how many registers a value of `datatype` occupies (1 for a bool)."""
    if datatype is DataType.STRING:
        if length is None or length < 1:
            raise ValueError("a string needs a length of at least 1 character")
        return (length + 1) // 2
    return _WIDTH[datatype]


def decode(fmt: Format, data: Sequence[int] | Sequence[bool]) -> Any:
    """Decode one point's registers (or bits) into its engineering value."""
    dt = fmt.datatype
    if dt is DataType.BOOL:
        if len(data) != 1:
            raise ValueError(f"bool expects 1 {'register' if fmt.bit is not None else 'bit'}")
        if fmt.bit is None:
            return bool(data[0])
        return bool((_word(data[0]) >> fmt.bit) & 1)
    count = fmt.registers
    if len(data) != count:
        raise ValueError(f"{dt} expects {count} register(s), got {len(data)}")
    raw_bytes = _to_bytes(
        data, fmt.byte_order, Order.BIG if dt is DataType.STRING else fmt.word_order
    )
    if dt is DataType.STRING:
        text = raw_bytes.split(b"\x00", 1)[0].decode("latin-1")
        return text.rstrip(" ")
    raw = struct.unpack(">" + _STRUCT[dt], raw_bytes)[0]
    if not fmt.scaled:
        return raw
    return raw * fmt.scale + fmt.offset


def encode(fmt: Format, value: Any) -> list[int]:
    """Encode an engineering value into the registers (or one bit) the device expects.

    Raises ValueError when the value has the wrong type or cannot be represented exactly
    enough in the raw datatype after inverse scale/offset (out of range, not a whole number).
    A bool on a bit of a register encodes to `[0]` or `[1]`; use `set_bit` to merge it.
    """
    dt = fmt.datatype
    if dt is DataType.BOOL:
        return [1 if _as_bool(value) else 0]
    if dt is DataType.STRING:
        if not isinstance(value, str):
            raise ValueError(f"a string point needs a str, got {type(value).__name__}")
        try:
            raw_bytes = value.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(
                f"{value!r} has characters outside Latin-1 (one byte per character)"
            ) from None
        assert fmt.length is not None
        if len(raw_bytes) > fmt.length:
            raise ValueError(f"{value!r} is longer than {fmt.length} characters")
        raw_bytes = raw_bytes.ljust(fmt.registers * 2, b"\x00")
        return _from_bytes(raw_bytes, fmt.byte_order, Order.BIG)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"a {dt} point needs a number, got {type(value).__name__}")
    raw: int | float = _to_raw(fmt, value)
    try:
        raw_bytes = struct.pack(">" + _STRUCT[dt], raw)
    except (struct.error, OverflowError):
        raise ValueError(f"{value!r} does not fit in {dt}") from None
    return _from_bytes(raw_bytes, fmt.byte_order, fmt.word_order)


def set_bit(word: int, bit: int, value: bool) -> int:
    """Return `word` with `bit` set to `value` (the modify step of a read-modify-write)."""
    word = _word(word)
    return word | (1 << bit) if value else word & ~(1 << bit) & 0xFFFF


def struct_code(datatype: DataType) -> str | None:
    """Return the `struct` format character of a number's raw value (None for bool, string)."""
    return _STRUCT.get(datatype)


def tolerance(fmt: Format, value: float) -> float:
    """How far a value read back may differ from `value` and still count as written."""
    dt = fmt.datatype
    if dt.is_integer:
        # Encoding rejects values that are not whole raw steps, so the read-back must land on
        # the same step; half a step absorbs the float arithmetic of scale and offset.
        return abs(fmt.scale) / 2
    if dt.is_float:
        mantissa = 23 if dt is DataType.FLOAT32 else 52
        raw = (value - fmt.offset) / fmt.scale if fmt.scale else value
        return abs(fmt.scale * raw) * 2.0 ** (1 - mantissa) + 1e-12 * max(1.0, abs(value))
    return 0.0


# -- helpers ------------------------------------------------------------------------------------

_INT_FORMATS = {
    DataType.INT16: "h",
    DataType.UINT16: "H",
    DataType.INT32: "i",
    DataType.UINT32: "I",
    DataType.INT64: "q",
    DataType.UINT64: "Q",
}
_STRUCT = {**_INT_FORMATS, DataType.FLOAT32: "f", DataType.FLOAT64: "d"}
_WIDTH = {
    DataType.BOOL: 1,
    DataType.INT16: 1,
    DataType.UINT16: 1,
    DataType.INT32: 2,
    DataType.UINT32: 2,
    DataType.INT64: 4,
    DataType.UINT64: 4,
    DataType.FLOAT32: 2,
    DataType.FLOAT64: 4,
}
_INT_RANGE = {
    dt: (0, 2 ** (8 * struct.calcsize(code)) - 1)
    if code.isupper()
    else (-(2 ** (8 * struct.calcsize(code) - 1)), 2 ** (8 * struct.calcsize(code) - 1) - 1)
    for dt, code in _INT_FORMATS.items()
}


def _word(value: int | bool) -> int:
    word = int(value)
    if not 0 <= word <= 0xFFFF:
        raise ValueError(f"register value {word} is not a 16-bit word")
    return word


def _to_bytes(words: Sequence[int] | Sequence[bool], byte_order: Order, word_order: Order) -> bytes:
    ordered = list(words) if word_order is Order.BIG else list(reversed(words))
    # One struct.pack per value instead of a generator of int.to_bytes: decoding was ~10 % of
    # the event loop's CPU at 10,000 points/s (issue 14's profile). struct refuses what is not a
    # 16-bit word; the slow path then says which word and why.
    try:
        return _packer(byte_order, len(ordered))(*ordered)
    except struct.error:
        return b"".join(_word(w).to_bytes(2, byte_order.value) for w in ordered)


@functools.cache
def _packer(byte_order: Order, count: int) -> Callable[..., bytes]:
    return struct.Struct(f"{'>' if byte_order is Order.BIG else '<'}{count}H").pack


def _from_bytes(raw: bytes, byte_order: Order, word_order: Order) -> list[int]:
    words = [int.from_bytes(raw[i : i + 2], byte_order.value) for i in range(0, len(raw), 2)]
    return words if word_order is Order.BIG else words[::-1]


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"a bool point needs true/false (or 0/1), got {value!r}")


def _to_raw(fmt: Format, value: int | float) -> int | float:
    dt = fmt.datatype
    if dt.is_float:
        if not fmt.scaled:
            return float(value)
        return (value - fmt.offset) / fmt.scale
    if isinstance(value, int) and not fmt.scaled:
        raw_int = value
    else:
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        raw = (value - fmt.offset) / fmt.scale if fmt.scaled else float(value)
        raw_int = round(raw)
        # Not a whole raw step (beyond float noise): writing it would silently round.
        if abs(raw - raw_int) > 1e-6 * max(1.0, abs(raw)):
            step = f" (steps of {fmt.scale:g})" if fmt.scaled else ""
            raise ValueError(f"{value!r} is not representable in {dt}{step}")
    lo, hi = _INT_RANGE[dt]
    if not lo <= raw_int <= hi:
        raise ValueError(f"{value!r} is outside the range of {dt} (raw {raw_int}, {lo}..{hi})")
    return raw_int
