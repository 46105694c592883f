"""One block's registers (or bits) to samples of the points that changed. Pure, no I/O.

A poll reads the same blocks again and again, and on most plants most values stay put. A
`BlockDecoder` is built once per block read: one `struct` pattern that decodes every point of
the block from a single packing of its registers, and what it last reported. Registers equal to
the last ones cost the packing and one bytes comparison and report nothing; otherwise a point
whose value is unchanged is skipped before any quality check or `Sample`. At 10,000 float32
points (bench/modbus_decode.py) a poll cost ~7 us per point when it decoded and reported each
one; now ~0.06 us when nothing changed, ~0.1 us when 1 % did and ~2.5 us when all did, most of
that the `Sample` objects (a NamedTuple: ~0.6 us each to build). Values, qualities and
reasons are those of `codec.decode` and `quality.assess` point by point (the tests compare the
two over every format); a block holding a word that is no 16-bit word is decoded point by
point, so the BAD sample names the point and the word, exactly as before.

"Last reported" must stay what the consumer (the twin) last got for the point, so a point is
reported again whenever that may no longer hold: a BAD point on every read (as before: the
twin keeps its quality, /health counts it), and every point after `reset()` (a new connection,
a read that failed or was split, batches dropped on the way) or `forget(key)` (a write
reported the point's value itself).
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Any

from drivers.contract import Quality, Sample
from drivers.modbus.codec import DataType, Format, Order, decode, struct_code
from drivers.modbus.plan import Block
from drivers.quality import assess

__all__ = ["BlockDecoder"]

# Never equal to a value: the point is reported at the next read whatever it holds.
_UNSENT: Any = object()

_GOOD = Quality.GOOD
_BAD = Quality.BAD

# (how the registers are packed, how the struct reads them), see _views.
_View = tuple[str, str]
_VIEWS: tuple[_View, ...] = ((">", ">"), ("<", "<"), ("<", ">"), (">", "<"))


class BlockDecoder:
    """Turns successive reads of one block into samples of the points that changed."""

    def __init__(self, block: Block, formats: Mapping[str, Format]) -> None:
        points = block.points
        self.block = block
        self._formats = [formats[p.key] for p in points]
        self._keys = [p.key for p in points]
        self._index = {key: i for i, key in enumerate(self._keys)}
        self._limits = [(p.lo, p.hi) for p in points]
        # Bounds for the one comparison that proves a value GOOD (see _within).
        self._low = [_within(p.lo, -1) for p in points]
        self._high = [_within(p.hi, 1) for p in points]
        self._bits_table = block.table.is_bits
        if self._bits_table:
            offsets = [p.address.offset - block.start for p in points]
            self._pick: Callable[[Sequence[Any]], Sequence[Any]] = (
                itemgetter(*offsets) if len(offsets) > 1 else _one(offsets[0])
            )
        else:
            self._layout(block)
        # What the last read held: the packed registers, or the bits; None after a reset.
        self._seen: bytes | list[Any] | None = None
        self._last: list[Any] = [_UNSENT] * len(points)
        self._unsent = True

    def samples(self, data: Sequence[Any], ts: float, out: list[Sample]) -> None:
        """Append to `out` a sample per point that changed since the last read, or is BAD."""
        values: Sequence[Any] | None = None
        if len(data) == self.block.count:
            if self._bits_table:
                if data == self._seen and not self._unsent:
                    return
                self._seen = list(data)
                values = [bool(bit) for bit in self._pick(data)]
            else:
                try:
                    packed = self._pack(*data)
                except struct.error:
                    packed = None  # a word that is no 16-bit word: see _decode_each
                if packed is not None:
                    # The bytes, not the words: packing is needed anyway, and comparing 124
                    # words as a list took 1.6 us against 0.05 us for their bytes.
                    if packed == self._seen and not self._unsent:
                        return
                    values = self._register_values(packed, data)
                    self._seen = packed
        if values is None:
            self._decode_each(data, ts, out)
            return
        last, keys, low, high = self._last, self._keys, self._low, self._high
        append = out.append
        unsent = False
        for i, value in enumerate(values):
            # Equal values are unchanged whatever their words (-0.0 after 0.0, two int64 raws
            # one float apart once scaled): the twin compares values and would drop them too.
            if value == last[i]:
                continue
            try:
                good = low[i] <= value <= high[i]
            except TypeError:  # text: assess decides
                good = False
            if good:
                append(Sample(keys[i], value, _GOOD, ts))
                last[i] = value
                continue
            quality, reason = assess(value, *self._limits[i])
            if quality is _BAD:
                append(Sample(keys[i], None, _BAD, ts, reason))
                last[i] = _UNSENT
                unsent = True
            else:
                append(Sample(keys[i], value, quality, ts, reason))
                last[i] = value
        self._unsent = unsent

    def reset(self) -> None:
        """Forget what was reported: the next read reports every point."""
        self._seen = None
        self._last = [_UNSENT] * len(self._last)
        self._unsent = True

    def forget(self, key: str) -> None:
        """Report `key` at the next read even if it did not change (no-op for other keys)."""
        index = self._index.get(key)
        if index is not None:
            self._last[index] = _UNSENT
            self._unsent = True

    # -- decoding -------------------------------------------------------------------------------

    def _layout(self, block: Block) -> None:
        """Build the struct that unpacks every point it can express from the packed block.

        Each point is one field at its offset (pad bytes over gaps) or, when the struct cannot
        express it (text, a bit, a byte/word order other than the block's most common one, an
        overlap), an empty `0s` field whose place `_register_values` fills per point. So the
        unpacked tuple has one item per point, in the block's point order.
        """
        formats = self._formats
        view = max(_VIEWS, key=lambda v: sum(v in _views(f) for f in formats))
        pack, read = view
        fields: list[str] = []
        cursor = 0  # bytes
        self._scaled: list[tuple[int, float, float]] = []
        self._bits: list[tuple[int, int, int]] = []
        self._slow: list[tuple[int, Format, int, int]] = []
        for i, (p, fmt) in enumerate(zip(block.points, formats, strict=True)):
            begin = p.address.offset - block.start
            code = struct_code(fmt.datatype)
            if code is not None and view in _views(fmt) and 2 * begin >= cursor:
                if 2 * begin > cursor:
                    fields.append(f"{2 * begin - cursor}x")
                fields.append(code)
                cursor = 2 * (begin + fmt.registers)
                if fmt.scaled:
                    self._scaled.append((i, fmt.scale, fmt.offset))
                continue
            fields.append("0s")
            if fmt.datatype is DataType.BOOL and fmt.bit is not None:
                self._bits.append((i, begin, fmt.bit))
            else:
                self._slow.append((i, fmt, begin, begin + fmt.registers))
        if 2 * block.count > cursor:
            fields.append(f"{2 * block.count - cursor}x")
        self._pack = struct.Struct(f"{pack}{block.count}H").pack
        self._unpack = struct.Struct(read + "".join(fields)).unpack
        self._plain = not (self._scaled or self._bits or self._slow)

    def _register_values(self, packed: bytes, data: Sequence[Any]) -> Sequence[Any] | None:
        """Every point's value, in point order; None if a point's words do not decode."""
        raw = self._unpack(packed)
        if self._plain:
            return raw
        values = list(raw)
        for i, scale, offset in self._scaled:
            values[i] = values[i] * scale + offset
        for i, word, bit in self._bits:
            values[i] = bool((data[word] >> bit) & 1)
        for i, fmt, begin, end in self._slow:
            try:
                values[i] = decode(fmt, data[begin:end])
            except ValueError:
                return None
        return values

    def _decode_each(self, data: Sequence[Any], ts: float, out: list[Sample]) -> None:
        """Decode point by point, reporting every point (a block that holds garbage)."""
        block = self.block
        for p, fmt in zip(block.points, self._formats, strict=True):
            try:
                value = decode(fmt, data[block.window(p)])
            except ValueError as exc:
                out.append(
                    Sample(p.key, None, Quality.BAD, ts, f"cannot decode {p.address}: {exc}")
                )
                continue
            quality, reason = assess(value, p.lo, p.hi)
            shown = None if quality is Quality.BAD else value
            out.append(Sample(p.key, shown, quality, ts, reason))
        self.reset()


# -- helpers ------------------------------------------------------------------------------------


def _views(fmt: Format) -> tuple[_View, ...]:
    """The block packings and struct byte orders under which a struct field reads `fmt` right.

    With the block's registers packed big-endian (AB CD), a field read big-endian gives ABCD
    and one read little-endian gives DCBA; packed little-endian (BA DC), they give BADC and
    CDAB. A one-register value has no word order: any view that keeps or swaps its bytes fits.
    """
    if fmt.registers == 1:
        if fmt.byte_order is Order.BIG:
            return ((">", ">"), ("<", "<"))
        return (("<", ">"), (">", "<"))
    pack = ">" if fmt.byte_order is fmt.word_order else "<"
    read = ">" if fmt.word_order is Order.BIG else "<"
    return ((pack, read),)


def _within(limit: float | None, side: int) -> float:
    """The bound for `low <= value <= high`, which must prove `assess` would say GOOD.

    A missing limit (or -inf below, inf above) becomes the largest finite float of that side,
    so the test also rejects inf, -inf and NaN (NaN fails every comparison): those go to
    `assess` for their reason.
    """
    if limit is None or limit == side * math.inf:
        return side * sys.float_info.max
    return limit


def _one(offset: int) -> Callable[[Sequence[Any]], Sequence[Any]]:
    def pick(data: Sequence[Any]) -> Sequence[Any]:
        return (data[offset],)

    return pick
