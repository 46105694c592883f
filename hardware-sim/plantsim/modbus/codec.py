"""Register maps and their encoding: pure functions from signal values to 16-bit words.

A `RegisterMap` is a list of `Point`s, each tying a table address to a datatype and a signal (or
a constant, or a bit field of several boolean signals). `build_image` turns a dict of signal
values into the words and bits a device serves. Byte order inside a register is always big
endian (Modbus); word order of 32/64-bit values is `big` (ABCD) or `little` (CDAB; for 64-bit
values every word reversed, as pymodbus's `word_order="little"` does).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Table = Literal["coil", "discrete", "holding", "input"]
WordOrder = Literal["big", "little"]
TABLES: tuple[Table, ...] = ("coil", "discrete", "holding", "input")
BIT_TABLES = ("coil", "discrete")

_STRUCT = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}
DATATYPES = (*_STRUCT, "bool", "string", "bits")


@dataclass(frozen=True)
class Point:
    """One entry of a register map.

    `signal` names the model value; `const` is served instead for fixed data (a tag name);
    `bits` packs several boolean signals into one register, bit 0 first. Engineering value =
    raw * `scale`. `raw_range` is the raw range a client may write (writable points only).
    """

    table: Table
    address: int
    datatype: str
    signal: str | None = None
    scale: float = 1.0
    writable: bool = False
    raw_range: tuple[int, int] | None = None
    length: int = 0
    word_order: WordOrder | None = None
    const: str | None = None
    bits: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Reject combinations that cannot be encoded."""
        if self.table not in TABLES:
            raise ValueError(f"point at {self.address}: unknown table {self.table!r}")
        if self.datatype not in DATATYPES:
            raise ValueError(f"{self.where}: unknown datatype {self.datatype!r}")
        if (self.table in BIT_TABLES) != (self.datatype == "bool"):
            raise ValueError(f"{self.where}: `bool` goes with coil/discrete tables only")
        if self.datatype == "string" and (self.length <= 0 or self.length % 2):
            raise ValueError(f"{self.where}: string length must be even and positive")
        if self.writable and self.table in ("discrete", "input"):
            raise ValueError(f"{self.where}: {self.table} table is read-only")

    @property
    def where(self) -> str:
        """Return `table:address`, for messages."""
        return f"{self.table}:{self.address}"

    @property
    def size(self) -> int:
        """Registers (or bits) the point occupies."""
        if self.datatype in ("bool", "bits"):
            return 1
        if self.datatype == "string":
            return self.length // 2
        return struct.calcsize(_STRUCT[self.datatype]) // 2

    @property
    def signals(self) -> tuple[str, ...]:
        """Signal names the point reads."""
        if self.bits:
            return self.bits
        return (self.signal,) if self.signal else ()


@dataclass
class Image:
    """What a device serves right now: words of the register tables, bits of the bit tables."""

    registers: dict[str, dict[int, int]] = field(
        default_factory=lambda: {"holding": {}, "input": {}}
    )
    bits: dict[str, dict[int, bool]] = field(default_factory=lambda: {"coil": {}, "discrete": {}})


class RegisterMap:
    """A device's register map: points, looked up by table and address."""

    def __init__(self, points: Sequence[Point], word_order: WordOrder = "big") -> None:
        """Index `points`; overlapping points are an error."""
        self.points = tuple(points)
        self.word_order = word_order
        self._at: dict[tuple[str, int], tuple[Point, int]] = {}
        for point in self.points:
            for offset in range(point.size):
                key = (point.table, point.address + offset)
                if key in self._at:
                    other = self._at[key][0]
                    raise ValueError(f"{point.where} overlaps {other.where}")
                self._at[key] = (point, offset)

    def at(self, table: str, address: int) -> tuple[Point, int] | None:
        """Return the point covering `table:address` and the offset into it, or None."""
        return self._at.get((table, address))

    def signals(self) -> set[str]:
        """Every signal name the map serves."""
        return {name for point in self.points for name in point.signals}

    def words_of(self, point: Point, value: float | str | int) -> list[int]:
        """Encode one point's engineering value with this map's word order."""
        return encode(point, value, point.word_order or self.word_order)

    def value_of(self, point: Point, words: Sequence[int]) -> float | str | int:
        """Decode one point's words to an engineering value with this map's word order."""
        return decode(point, words, point.word_order or self.word_order)

    def build_image(self, values: Mapping[str, float | bool | int | str]) -> Image:
        """Encode every point from `values` (signal name → engineering value)."""
        image = Image()
        for point in self.points:
            if point.datatype == "bool":
                image.bits[point.table][point.address] = bool(values[point.signal or ""])
                continue
            if point.bits:
                word = sum(1 << i for i, name in enumerate(point.bits) if values[name])
                words = [word]
            elif point.const is not None:
                words = self.words_of(point, point.const)
            else:
                words = self.words_of(point, values[point.signal or ""])
            for offset, word in enumerate(words):
                image.registers[point.table][point.address + offset] = word
        return image


def encode(point: Point, value: float | str | int, word_order: WordOrder = "big") -> list[int]:
    """Encode an engineering value into the point's registers."""
    if point.datatype == "string":
        raw = str(value).encode("ascii")
        if len(raw) > point.length:
            raise ValueError(f"{point.where}: {value!r} longer than {point.length} chars")
        raw = raw.ljust(point.length, b"\x00")
        return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    code = _STRUCT.get(point.datatype, "H")
    scaled = float(value) / point.scale
    number: float | int = scaled if code in "fd" else _saturate(code, scaled)
    data = struct.pack(f">{code}", number)
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    return words[::-1] if word_order == "little" else words


def decode(point: Point, words: Sequence[int], word_order: WordOrder = "big") -> float | str | int:
    """Decode the point's registers into an engineering value (inverse of `encode`)."""
    if len(words) != point.size:
        raise ValueError(f"{point.where}: {len(words)} registers, expected {point.size}")
    if point.datatype == "string":
        raw = b"".join(w.to_bytes(2, "big") for w in words)
        return raw.rstrip(b"\x00").decode("ascii")
    ordered = list(words)[::-1] if word_order == "little" else list(words)
    code = _STRUCT.get(point.datatype, "H")
    raw = struct.unpack(f">{code}", b"".join(w.to_bytes(2, "big") for w in ordered))[0]
    if point.scale == 1.0 and code not in "fd":
        return raw
    return raw * point.scale


def _saturate(code: str, value: float) -> int:
    # A real transmitter pins at its range limits instead of wrapping around.
    bits = struct.calcsize(code) * 8
    lo, hi = (0, 2**bits - 1) if code.isupper() else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if math.isnan(value):
        return 0
    if math.isinf(value):
        return hi if value > 0 else lo
    return min(max(round(value), lo), hi)
