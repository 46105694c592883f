"""Telemetry rows as compressed blobs: frames (one ingested batch) and blocks (one point's rows).

Pure functions, no I/O: `encode_frame(rows)`, `encode_block(rows)`, `decode(body)` for both, and
for compaction `Columns.concat(decoded frames)` -> `take` one point -> `encode_block_columns`.
Every row comes back exactly: floats bit for bit (nan payloads, -0.0, inf) in ts, source_ts and
values; ints in int64 range (bools come back as 0/1), str, bytes, None, and columns mixing them.

Blob: a header, then one zlib stream of the payload.

    bytes   field
    1       0xC0 | format version (1)
    1       kind: b"F" frame (rows of any points) or b"B" block (rows of one point)
    1-10    n, the row count (LEB128 varint)
    1-10    the payload's size (varint): decode inflates one byte more, never further
    rest    zlib stream of the payload, whose columns follow one another:

    rev        ints: deltas
    pid        frames: ints: deltas; blocks: the one pid as a varint
    ts         1 byte mode: 1 when every ts is exactly us / 1e6 (bit for bit), else 0;
               ints: deltas of us (mode 1) or of the float64 bits read as int64 (mode 0)
    quality    n bytes
    values     presence: 1 byte, 0 = every row has a value, 1 = none has, 2 = a mask of
               ceil(n / 8) bytes follows (np.packbits); then, if m > 0 rows have one, 1 byte type:
               "f"  every value is a float32 widened: byte planes of the float32 bits
               "F"  other floats: ints: deltas of the float64 bits read as int64
               "I"  ints and bools, within int64: ints: deltas
               "J"  anything else (str, bytes, mixed types, ints beyond int64): varint length,
                    then a JSON list: str, int and finite float as themselves, bytes as
                    ["b", base64], nan and inf as ["f", their float64 bits as an int]
    source_ts  presence, as for values; then 1 byte mode: "U" when ts and source_ts are whole
               microseconds: ints: offsets of us from the row's ts; else "X": ints: offsets of
               the float64 bits (as int64) from the row's ts bits
    reason     varint length (0 when every reason is None), then JSON [[row, text], ...]

    ints, deltas   the first value (int64 LE), then the m - 1 deltas between neighbours as offsets
    ints, offsets  their minimum (int64 LE), then each one's excess over it, as byte planes;
                   arithmetic wraps modulo 2**64 both ways, so any int64s come back exactly
    byte planes    bytes lo and hi, then planes lo..hi-1: plane k is byte k (little-endian) of
                   every row in turn; planes outside lo..hi are zero in every row, so not stored

Why (figures from `bench/codec.py` on the footprint device: 10,000 float32 points polled every
second, source_ts the Modbus driver's time.time() of each 62-point read, ts whole microseconds;
the old `events` row took ~82 bytes per sample plus its index):

    rows                 bytes/sample   CPU us/sample: encode    decode      decode + rows()
    frame, 10,000 rows        3.44                0.35-0.61        0.05-0.07   0.34-0.55
    block of 60               8.35                2.4-4.4          1.7-2.7     1.8-3.2
    block of 600              7.03                0.54-0.99        0.2-0.32    0.37-0.68
      from columns                                0.36-0.51
    block of 6,000            6.56                0.4-0.76         0.06-0.09   0.32-0.6

Ranges: runs on a shared 2-core development VM, medians of 5 repeats each. Blocks of 100 rows
and more stay under 8 bytes per sample; under that, deflate's fixed costs and numpy's per-call
ones (~100-250 us a block) dominate. Each choice was measured against its alternative:
- Columns in byte planes, then zlib: a column's random low bytes stay apart from its constant
  high ones, which cost nothing. With all-zero planes left out and deltas stored as excess over
  their minimum (frame of reference) rather than zigzag, a column's spread, not its sign or a
  byte boundary it happens to cross, sets its planes: block of 600 7.59 -> 7.29, block of 60
  9.15 -> 8.88, frame 3.83 -> 3.62 bytes per sample.
- float32 readings kept as float32 (4 planes, not float64's 5 partial ones): -0.18 (frame),
  -0.26 (block of 600), -0.53 (block of 60) bytes per sample.
- Other floats as deltas of their bits, not XOR with the previous value (Gorilla): XOR flips
  high bits that then cost a plane; deltas were 0.06-0.11 bytes per sample smaller on float64
  series, and for non-microsecond ts.
- ts as first deltas, not delta-of-delta: a poll's time is a grid time plus jitter, so the
  second difference carries the jitter twice; it was never better (+0 on frames, whose ts is
  constant, to +0.3 bytes per sample).
- source_ts as offsets from the row's ts (a read time is ts minus a few ms): whole microseconds
  6.87, float bits 7.03 bytes per sample in blocks of 600; a constant offset costs nothing.
  Deltas of the offsets were worse (+0.02 to +0.1) but on frames (-0.01).
- zlib level 1: level 6 is 3.5 % smaller on frames and 0.2-2 % on blocks, for twice the
  compression time (0.10 -> 0.20 us per row); frames are transient, blocks barely gain.
- Decode keeps values, source_ts and reason as arrays and builds their Python lists on first
  use (`Columns.values`, ...), so `take` and `numeric` stay vectorised; `rows()` (a tuple per
  row) costs more than the decode itself.

Hostile input: `decode` raises `CodecError` for any blob it cannot read, never another
exception. Lengths are checked against the blob before anything is allocated: the payload size
may not exceed what deflate can inflate from the stream (1032:1), the row count neither the
payload size (every row has a quality byte) nor `MAX_ROWS`; inflating stops one byte past the
stated size; every read checks that its bytes are there; JSON is parsed, never evaluated.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Final

import numpy as np

from gateway.errors import StoreError

__all__ = [
    "CodecError",
    "Columns",
    "TelemetryRow",
    "decode",
    "encode_block",
    "encode_block_columns",
    "encode_frame",
]

# The writer's row, (rev, ts, pid, value, quality code, source_ts, reason): the same type as
# gateway.twin.writer.TelemetryRow, spelled here so that the codec depends on nothing in the twin.
TelemetryRow = tuple[int, float, int, Any, int, "float | None", "str | None"]

MAGIC: Final = 0xC0
VERSION: Final = 1
FRAME: Final = ord("F")
BLOCK: Final = ord("B")
KIND_NAMES: Final = {FRAME: "frame", BLOCK: "block"}
LEVEL: Final = 1  # zlib level: see the module docstring
# Deflate cannot inflate more than 1032 bytes per byte of stream; a size claiming more is a lie.
MAX_RATIO: Final = 1032
# The most rows a blob may hold: far above a batch or a block, far below a memory problem.
MAX_ROWS: Final = 1 << 22
# Whole microseconds up to 2**53 (year 2255) are exact in a float64, and their deltas fit int64.
US_LIMIT: Final = 2.0**53 / 1e6

TS_BITS, TS_MICROS = 0, 1
ALL_PRESENT, NONE_PRESENT, MASKED = 0, 1, 2
FLOAT64, FLOAT32, INTS, GENERIC = ord("F"), ord("f"), ord("I"), ord("J")
SRC_MICROS, SRC_BITS = ord("U"), ord("X")


class CodecError(StoreError):
    """A blob that cannot be decoded: corrupt, truncated, of an unknown version, or hostile."""


@dataclass(slots=True, eq=False)
class Columns:
    """Decoded rows, column by column; `values`, `source_ts` and `reason` are built on first use."""

    rev: np.ndarray  # int64
    ts: np.ndarray  # float64
    pid: np.ndarray  # int64
    quality: np.ndarray  # uint8
    _values: _Sparse
    _source_ts: _Sparse
    _reason: _Sparse
    _lists: dict[str, list[Any]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.rev)

    @property
    def values(self) -> list[Any]:
        """Each row's value: None, int, float, str or bytes."""
        return self._list("values", self._values)

    @property
    def source_ts(self) -> list[float | None]:
        """Each row's source time, or None."""
        return self._list("source_ts", self._source_ts)

    @property
    def reason(self) -> list[str | None]:
        """Each row's reason, or None."""
        return self._list("reason", self._reason)

    def rows(self) -> list[TelemetryRow]:
        """Return the rows as the tuples that were encoded (bools come back as ints)."""
        return list(
            zip(
                self.rev.tolist(),
                self.ts.tolist(),
                self.pid.tolist(),
                self.values,
                self.quality.tolist(),
                self.source_ts,
                self.reason,
                strict=True,
            )
        )

    def take(self, index: np.ndarray) -> Columns:
        """Return the rows a boolean mask or an array of integer indices selects."""
        index = np.asarray(index)
        if index.dtype == np.bool_:
            if index.shape != self.rev.shape:
                raise IndexError(f"mask of shape {index.shape} for {len(self)} rows")
            index = np.flatnonzero(index)
        elif index.size == 0:
            index = index.astype(np.intp)
        return Columns(
            self.rev[index],
            self.ts[index],
            self.pid[index],
            self.quality[index],
            self._values.take(index),
            self._source_ts.take(index),
            self._reason.take(index),
        )

    @property
    def value_kind(self) -> str:
        """ "f" when every value present is a float, "i" an int, "O" otherwise (text, mixed)."""
        kind = str(self._values.data.dtype.kind)
        return kind if kind in ("f", "i") else "O"

    def int_values(self) -> np.ndarray:
        """Every row's value as int64; only for `value_kind` "i" with a value in every row."""
        column = self._values
        if column.data.dtype.kind != "i" or column.present is not None:
            raise ValueError("int_values needs an int column with a value in every row")
        return column.data

    def numeric(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (mask of rows whose value is an int or float, float64 of them, nan elsewhere)."""
        column = self._values
        data = column.data
        if data.dtype == object:
            is_number = np.fromiter(
                (type(v) is int or type(v) is float for v in data), dtype=bool, count=len(data)
            )
            numbers = np.array([_as_float(v) for v in data[is_number]], dtype=np.float64)
        else:
            is_number = np.ones(len(data), dtype=bool)
            numbers = data.astype(np.float64)
        mask = np.zeros(len(self), dtype=bool)
        if column.present is None:
            mask[:] = is_number
        else:
            mask[column.present] = is_number
        out = np.full(len(self), np.nan)
        out[mask] = numbers
        return mask, out

    @staticmethod
    def concat(parts: Sequence[Columns]) -> Columns:
        """Return the rows of every part, part after part, as one Columns."""
        if len(parts) == 1:
            return parts[0]
        return Columns(
            _cat([p.rev for p in parts], np.int64),
            _cat([p.ts for p in parts], np.float64),
            _cat([p.pid for p in parts], np.int64),
            _cat([p.quality for p in parts], np.uint8),
            _Sparse.concat([p._values for p in parts]),
            _Sparse.concat([p._source_ts for p in parts]),
            _Sparse.concat([p._reason for p in parts]),
        )

    def _list(self, name: str, column: _Sparse) -> list[Any]:
        cached = self._lists.get(name)
        if cached is None:
            cached = self._lists[name] = column.to_list()
        return cached


@dataclass(slots=True)
class _Sparse:
    """A column of n optional values: the present ones in row order, and which rows have one."""

    n: int
    present: np.ndarray | None  # bool per row; None when every row has a value
    data: np.ndarray  # the present values: float64, int64 or object
    # Row -> position in data, computed once: compaction takes one point at a time from a
    # column of a quarter million rows, a cumsum each time was most of its cost.
    _where: np.ndarray | None = None

    def to_list(self) -> list[Any]:
        if self.present is None:
            return self.data.tolist()
        out = np.full(self.n, None, dtype=object)
        out[self.present] = self.data
        return out.tolist()

    def take(self, index: np.ndarray) -> _Sparse:
        if self.present is None:
            return _Sparse(len(index), None, self.data[index])
        keep = self.present[index]
        if not keep.any():
            return _Sparse(len(index), keep, self.data[:0])
        if self._where is None:
            self._where = np.cumsum(self.present) - 1
        return _Sparse.of(len(index), keep, self.data[self._where[index][keep]])

    @staticmethod
    def concat(parts: Sequence[_Sparse]) -> _Sparse:
        present = None
        if any(p.present is not None for p in parts):
            masks = [np.ones(p.n, dtype=bool) if p.present is None else p.present for p in parts]
            present = np.concatenate(masks)
        data = [p.data for p in parts if len(p.data)]
        if len({d.dtype for d in data}) > 1:
            # A frame mixing points of several types decodes as objects even for the rows of a
            # float point: narrowed back first, one such frame does not turn a week of blocks
            # into Python objects (bench/web.py: x1.3-1.7 on a 7-day chart).
            data = [_narrowed(d) for d in data]
        if len({d.dtype for d in data}) > 1:
            data = [d.astype(object) for d in data]  # floats and ints stay what they are
        return _Sparse.of(sum(p.n for p in parts), present, _cat(data))

    @staticmethod
    def of(n: int, present: np.ndarray | None, data: np.ndarray) -> _Sparse:
        """Return the column, its mask dropped when every row has a value."""
        return _Sparse(n, None if present is None or present.all() else present, data)


def _narrowed(data: np.ndarray) -> np.ndarray:
    """An object array holding only floats (or only ints) as float64 (int64); else as it is."""
    if data.dtype != object:
        return data
    kinds = {type(v) for v in data}
    if kinds == {float}:
        return data.astype(np.float64)
    if kinds == {int}:
        try:
            return data.astype(np.int64)
        except OverflowError:
            return data
    return data


# -- encoding -------------------------------------------------------------------------------------


def encode_frame(rows: Sequence[TelemetryRow]) -> bytes:
    """Encode an ingested batch: rows of any points, revs strictly ascending."""
    return _encode(FRAME, _from_rows(rows))


def encode_block(rows: Sequence[TelemetryRow]) -> bytes:
    """Encode one point's rows, revs strictly ascending; ValueError if empty or of several pids."""
    if not rows:
        raise ValueError("a block needs at least one row")
    return _encode(BLOCK, _from_rows(rows))


def encode_block_columns(columns: Columns) -> bytes:
    """Encode one point's rows already in columns (a `take` of decoded frames), as encode_block."""
    if not len(columns):
        raise ValueError("a block needs at least one row")
    return _encode(BLOCK, columns)


def _from_rows(rows: Sequence[TelemetryRow]) -> Columns:
    """Return rows as columns, each value column typed as narrowly as its values allow."""
    n = len(rows)
    ts = _column(rows, 1, np.float64, "ts")
    if np.isnan(ts).any() and any(row[1] is None for row in rows):  # numpy reads None as nan
        raise ValueError("every row needs a ts")
    values = _field(rows, 3)
    present = None
    if None in values:
        present = np.fromiter((v is not None for v in values), dtype=bool, count=n)
        values = [v for v in values if v is not None]
    sources = _field(rows, 5)
    try:
        src = np.array(sources, dtype=np.float64)  # None reads as nan
    except (TypeError, ValueError) as exc:
        raise ValueError(f"source_ts: not a float or None: {exc}") from exc
    has_src = None
    if np.isnan(src).any() and None in sources:
        has_src = np.fromiter((s is not None for s in sources), dtype=bool, count=n)
        src = src[has_src]
    reasons = _field(rows, 6)
    texts: list[str] = []
    has_reason = np.zeros(n, dtype=bool)
    if reasons.count(None) != n:
        texts = [r for r in reasons if r is not None]
        if any(not isinstance(r, str) for r in texts):
            raise ValueError("reasons must be str or None")
        has_reason = np.fromiter((r is not None for r in reasons), dtype=bool, count=n)
    return Columns(
        _column(rows, 0, np.int64, "rev"),
        ts,
        _column(rows, 2, np.int64, "pid"),
        _column(rows, 4, np.uint8, "quality"),
        _Sparse.of(n, present, _typed(values)),
        _Sparse.of(n, has_src, src),
        _Sparse.of(n, has_reason, _objects(texts)),
    )


def _encode(kind: int, columns: Columns) -> bytes:
    n = len(columns)
    if n > MAX_ROWS:
        raise ValueError(f"{n} rows: a frame or block holds at most {MAX_ROWS}")
    rev, pid, ts = columns.rev, columns.pid, columns.ts
    if n and (rev[0] <= 0 or np.any(rev[1:] <= rev[:-1])):
        raise ValueError("revs must be positive and strictly ascending")
    if n and pid.min() < 1:
        raise ValueError(f"pids must be >= 1, got {pid.min()}")
    parts = [_deltas(rev)]
    if kind == FRAME:
        parts.append(_deltas(pid))
    elif np.any(pid != pid[0]):
        raise ValueError(f"a block holds one point's rows, got pids {np.unique(pid)[:5].tolist()}")
    else:
        parts.append(_varint(int(pid[0])))
    ts_us = _micros(ts)
    if ts_us is not None:
        parts += [bytes([TS_MICROS]), _deltas(ts_us)]
    else:
        parts += [bytes([TS_BITS]), _deltas(ts.view(np.int64))]
    parts.append(columns.quality.tobytes())
    parts += _encode_values(columns._values)
    parts += _encode_source_ts(columns._source_ts, ts, ts_us)
    parts.append(_encode_reason(columns._reason))
    payload = b"".join(parts)
    header = bytes([MAGIC | VERSION, kind]) + _varint(n) + _varint(len(payload))
    return header + zlib.compress(payload, LEVEL)


def _encode_values(column: _Sparse) -> list[bytes]:
    head = _presence(column)
    data = column.data if column.data.dtype != object else _typed(column.data)
    if not len(data):
        return [head]
    if data.dtype == np.float64:
        with np.errstate(over="ignore", invalid="ignore"):
            narrow = data.astype(np.float32)
        # float32 readings (most field devices' reals) as themselves: 4 bytes, planes unchanged.
        if np.array_equal(narrow.astype(np.float64).view(np.uint64), data.view(np.uint64)):
            return [head, bytes([FLOAT32]), _planes(narrow.view(np.uint32))]
        return [head, bytes([FLOAT64]), _deltas(data.view(np.int64))]
    if data.dtype == np.int64:
        return [head, bytes([INTS]), _deltas(data)]
    text = json.dumps([_to_json(v) for v in data], separators=(",", ":")).encode()
    return [head, bytes([GENERIC]), _varint(len(text)), text]


def _encode_source_ts(column: _Sparse, ts: np.ndarray, ts_us: np.ndarray | None) -> list[bytes]:
    head = _presence(column)
    src = column.data
    if not len(src):
        return [head]
    if column.present is not None:
        ts = ts[column.present]
        ts_us = None if ts_us is None else ts_us[column.present]
    src_us = None if ts_us is None else _micros(src)
    if ts_us is not None and src_us is not None:
        return [head, bytes([SRC_MICROS]), _offsets(src_us - ts_us)]
    return [head, bytes([SRC_BITS]), _offsets(src.view(np.int64) - ts.view(np.int64))]


def _encode_reason(column: _Sparse) -> bytes:
    if not len(column.data):
        return _varint(0)
    rows = range(column.n) if column.present is None else np.flatnonzero(column.present).tolist()
    text = json.dumps(list(zip(rows, column.data.tolist(), strict=True)), separators=(",", ":"))
    return _varint(len(text.encode())) + text.encode()


def _typed(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Return values as float64 if all are floats, int64 if all are ints that fit, else objects."""
    types = set(map(type, values))
    if types and all(issubclass(t, float) for t in types):
        return np.array(values, dtype=np.float64)
    if types and all(issubclass(t, int) for t in types):
        try:
            return np.array(values, dtype=np.int64)  # bools become 0/1
        except OverflowError:
            pass  # beyond int64: JSON keeps it exact
    for t in types:
        if not issubclass(t, str | bytes | bytearray | int | float):
            raise ValueError(f"cannot store a value of type {t.__name__}")
    return _objects(values)


def _objects(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _cat(arrays: Sequence[np.ndarray], dtype: type[np.generic] = np.float64) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=dtype)


def _to_json(v: Any) -> Any:
    """Return a value as JSON can hold it exactly (see "J" in the module docstring)."""
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return int(v)  # bool -> 0/1, as the int columns store it
    if isinstance(v, float):
        v = float(v)
        return v if v - v == 0 else ["f", _float_bits(v)]  # v - v is nan for nan and inf
    return ["b", base64.b64encode(v).decode("ascii")]  # bytes: `_typed` let nothing else by


def _column(rows: Sequence[TelemetryRow], k: int, dtype: type[np.generic], name: str) -> np.ndarray:
    """Return field k of every row as an array (column by column: zip(*rows) took 2x longer)."""
    try:
        return np.fromiter(map(itemgetter(k), rows), dtype=dtype, count=len(rows))
    except (TypeError, ValueError, OverflowError, IndexError) as exc:
        raise ValueError(f"{name}: cannot store as {np.dtype(dtype).name}: {exc}") from exc


def _field(rows: Sequence[TelemetryRow], k: int) -> list[Any]:
    try:
        return list(map(itemgetter(k), rows))
    except IndexError as exc:
        raise ValueError(f"a row has no field {k}: rows are (rev, ts, pid, value, ...)") from exc


def _micros(t: np.ndarray) -> np.ndarray | None:
    """Return `t` as whole microseconds if every one is exactly `us / 1e6`, else None."""
    if not np.all(np.abs(t) < US_LIMIT):  # also refuses nan and inf
        return None
    us = np.rint(t * 1e6).astype(np.int64)
    # Compared as bits: -0.0 == 0.0, but 0 / 1e6 gives +0.0 back.
    return us if np.array_equal((us / 1e6).view(np.int64), t.view(np.int64)) else None


def _presence(column: _Sparse) -> bytes:
    """Return a column's presence byte, and its mask when some rows have a value."""
    present = column.present
    if present is None:
        return bytes([ALL_PRESENT])
    if not present.any():
        return bytes([NONE_PRESENT])
    return bytes([MASKED]) + np.packbits(present).tobytes()


def _deltas(x: np.ndarray) -> bytes:
    """Return int64s as the first one, then the deltas between neighbours as `_offsets`."""
    if not len(x):
        return b""
    return struct.pack("<q", x[0]) + _offsets(np.diff(x))


def _offsets(x: np.ndarray) -> bytes:
    """Return int64s as their minimum, then the byte planes of each one's excess over it."""
    low = int(x.min()) if len(x) else 0
    # Arithmetic wraps modulo 2**64 here and where decoding undoes it: exact for any int64s.
    return struct.pack("<q", low) + _planes((x - low).view(np.uint64))


def _planes(x: np.ndarray) -> bytes:
    """Return unsigned ints as [lo, hi], then planes lo..hi-1: every row's byte lo, and so on.

    The planes left out are all zero: small deltas clear the high ones, float32 values held in
    float64s the low ones.
    """
    used = int(np.bitwise_or.reduce(x)) if len(x) else 0
    if not used:
        return bytes([0, 0])
    lo = ((used & -used).bit_length() - 1) >> 3
    hi = (used.bit_length() + 7) >> 3
    little = x.astype(x.dtype.newbyteorder("<"), copy=False)
    return bytes([lo, hi]) + little.view(np.uint8).reshape(-1, x.itemsize).T[lo:hi].tobytes()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _float_bits(v: float) -> int:
    return int(struct.unpack("<Q", struct.pack("<d", v))[0])


# -- decoding -------------------------------------------------------------------------------------


def decode(body: bytes) -> Columns:
    """Decode a frame or a block; CodecError if it cannot be read."""
    head = _Reader(memoryview(body), "header")
    magic = head.byte()
    if magic & 0xF0 != MAGIC:
        raise CodecError(f"not a telemetry blob: first byte 0x{magic:02x}")
    if magic & 0x0F != VERSION:
        raise CodecError(f"telemetry blob of format version {magic & 0x0F}; this reads {VERSION}")
    kind = head.byte()
    if kind not in KIND_NAMES:
        raise CodecError(f"telemetry blob of unknown kind 0x{kind:02x}")
    n = head.varint()
    size = head.varint()
    stream = head.buf[head.pos :]
    name = f"{KIND_NAMES[kind]} of {n} rows"
    if size > MAX_RATIO * len(stream):
        raise CodecError(f"{name}: header claims {size} bytes from a {len(stream)}-byte stream")
    if n > min(size, MAX_ROWS):  # every row has a quality byte in the payload
        raise CodecError(f"{name}: more rows than {size} bytes of payload can hold")
    if kind == BLOCK and n == 0:
        raise CodecError("block of 0 rows")
    payload = _inflate(stream, size, name)
    try:
        return _parse(kind, n, _Reader(memoryview(payload), name))
    except (ValueError, TypeError, IndexError, OverflowError, RecursionError) as exc:
        # JSON and numpy refusing what a corrupt payload holds: same contract, one type.
        raise CodecError(f"{name}: corrupt payload: {exc}") from exc


def _inflate(stream: memoryview, size: int, name: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        # One byte more than the header allows: enough to tell a bomb, never more.
        payload = inflater.decompress(stream, size + 1)
    except zlib.error as exc:
        raise CodecError(f"{name}: corrupt zlib stream: {exc}") from exc
    if len(payload) > size:
        raise CodecError(f"{name}: inflates to more than the {size} bytes its header says")
    if not inflater.eof:
        raise CodecError(f"{name}: truncated zlib stream")
    if inflater.unused_data or len(payload) != size:
        raise CodecError(
            f"{name}: {len(payload)} bytes inflated for {size} in the header, "
            f"{len(inflater.unused_data)} bytes after the stream"
        )
    return payload


def _parse(kind: int, n: int, r: _Reader) -> Columns:
    rev = _read_deltas(r, n, "rev")
    if n and (rev[0] <= 0 or np.any(rev[1:] <= rev[:-1])):
        raise CodecError(f"{r.name}: revs not positive and strictly ascending")
    pid = _read_deltas(r, n, "pid") if kind == FRAME else np.full(n, r.varint(), np.int64)
    if n and pid.min() < 1:
        raise CodecError(f"{r.name}: pid {pid.min()} < 1")
    mode = r.byte()
    ts_us: np.ndarray | None = None
    if mode == TS_MICROS:
        ts_us = _read_deltas(r, n, "ts")
        ts = ts_us / 1e6
    elif mode == TS_BITS:
        ts = _read_deltas(r, n, "ts").view(np.float64)
    else:
        raise CodecError(f"{r.name}: unknown ts mode {mode}")
    quality = np.frombuffer(r.take(n, "quality"), dtype=np.uint8).copy()
    values = _read_values(r, n)
    source_ts = _read_source_ts(r, n, ts, ts_us)
    reason = _read_reason(r, n)
    if r.pos != len(r.buf):
        raise CodecError(f"{r.name}: {len(r.buf) - r.pos} bytes after the last column")
    return Columns(rev, ts, pid, quality, values, source_ts, reason)


def _read_values(r: _Reader, n: int) -> _Sparse:
    present, m = _read_presence(r, n, "values")
    if m == 0:
        return _Sparse(n, present, np.empty(0))
    kind = r.byte()
    if kind == FLOAT32:
        narrow = _read_planes(r, m, "values", np.uint32).view(np.float32)
        return _Sparse(n, present, narrow.astype(np.float64))
    if kind == FLOAT64:
        return _Sparse(n, present, _read_deltas(r, m, "values").view(np.float64))
    if kind == INTS:
        return _Sparse(n, present, _read_deltas(r, m, "values"))
    if kind != GENERIC:
        raise CodecError(f"{r.name}: unknown value type 0x{kind:02x}")
    items = json.loads(r.take(r.varint(), "values").tobytes().decode())
    if not isinstance(items, list) or len(items) != m:
        raise CodecError(f"{r.name}: values JSON is not a list of {m}")
    data = np.empty(m, dtype=object)
    data[:] = [_from_json(item, r.name) for item in items]
    return _Sparse(n, present, data)


def _read_source_ts(r: _Reader, n: int, ts: np.ndarray, ts_us: np.ndarray | None) -> _Sparse:
    present, m = _read_presence(r, n, "source_ts")
    if m == 0:
        return _Sparse(n, present, np.empty(0))
    mode = r.byte()
    if present is not None:
        ts = ts[present]
        ts_us = None if ts_us is None else ts_us[present]
    if mode == SRC_MICROS and ts_us is not None:
        return _Sparse(n, present, (ts_us + _read_offsets(r, m, "source_ts")) / 1e6)
    if mode == SRC_BITS:
        bits = ts.view(np.int64) + _read_offsets(r, m, "source_ts")
        return _Sparse(n, present, bits.view(np.float64))
    raise CodecError(f"{r.name}: source_ts mode 0x{mode:02x} with ts mode of the blob")


def _read_reason(r: _Reader, n: int) -> _Sparse:
    size = r.varint()
    if size == 0:
        return _Sparse(n, np.zeros(n, dtype=bool) if n else None, np.empty(0, dtype=object))
    pairs = json.loads(r.take(size, "reason").tobytes().decode())
    if not isinstance(pairs, list) or not pairs:
        raise CodecError(f"{r.name}: reason JSON is not a list of [row, text]")
    present = np.zeros(n, dtype=bool)
    texts = np.empty(len(pairs), dtype=object)
    last = -1
    for k, pair in enumerate(pairs):
        match pair:
            case [int(row), str(text)] if last < row < n:
                present[row] = True
                texts[k] = text
                last = row
            case _:
                raise CodecError(f"{r.name}: bad reason entry {str(pair)[:80]}")
    return _Sparse(n, None if present.all() else present, texts)


def _read_presence(r: _Reader, n: int, name: str) -> tuple[np.ndarray | None, int]:
    """Return (mask, or None when every row has a value; number of rows with one)."""
    flag = r.byte()
    if flag == ALL_PRESENT:
        return None, n
    if flag == NONE_PRESENT:
        return np.zeros(n, dtype=bool), 0
    if flag != MASKED:
        raise CodecError(f"{r.name}: unknown {name} presence flag {flag}")
    packed = np.frombuffer(r.take((n + 7) // 8, name), dtype=np.uint8)
    present = np.unpackbits(packed, count=n).astype(bool)
    return present, int(present.sum())


def _from_json(item: Any, name: str) -> Any:
    if type(item) in (str, int, float):
        return item
    match item:
        case ["b", str(text)]:
            return base64.b64decode(text, validate=True)
        case ["f", int(bits)] if 0 <= bits < 2**64:
            return float(struct.unpack("<d", struct.pack("<Q", bits))[0])
    raise CodecError(f"{name}: bad value in JSON: {str(item)[:80]}")


def _read_deltas(r: _Reader, m: int, what: str) -> np.ndarray:
    out = np.empty(m, dtype=np.int64)
    if m:
        out[0] = first = r.int64(what)
        out[1:] = first + np.cumsum(_read_offsets(r, m - 1, what))
    return out


def _read_offsets(r: _Reader, m: int, what: str) -> np.ndarray:
    low = r.int64(what)
    return low + _read_planes(r, m, what).view(np.int64)


def _read_planes(r: _Reader, m: int, what: str, dtype: type[np.generic] = np.uint64) -> np.ndarray:
    width = np.dtype(dtype).itemsize
    lo, hi = r.byte(), r.byte()
    if not lo <= hi <= width:
        raise CodecError(f"{r.name}: {what}: byte planes {lo}..{hi} of {width}")
    planes = np.frombuffer(r.take((hi - lo) * m, what), np.uint8).reshape(hi - lo, m)
    # Shifted in plane by plane: 2-3x faster than a byte transpose for the few planes of a
    # typical column (measured), and free of byte order.
    out = np.zeros(m, dtype=dtype)
    for k in range(lo, hi):
        out |= planes[k - lo].astype(dtype) << dtype(8 * k)
    return out


def _as_float(v: int | float) -> float:
    try:
        return float(v)
    except OverflowError:  # an int beyond float range (only JSON columns hold one)
        return float("inf") if v > 0 else float("-inf")


class _Reader:
    """Reads a buffer front to back; every read checks that the bytes are there."""

    __slots__ = ("buf", "name", "pos")

    def __init__(self, buf: memoryview, name: str) -> None:
        self.buf = buf
        self.name = name
        self.pos = 0

    def take(self, size: int, what: str) -> memoryview:
        end = self.pos + size
        if end > len(self.buf):
            raise CodecError(
                f"{self.name}: truncated: {what} needs {size} bytes at offset {self.pos}, "
                f"{len(self.buf) - self.pos} left"
            )
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def byte(self) -> int:
        return int(self.take(1, "a byte")[0])

    def int64(self, what: str) -> np.int64:
        return np.frombuffer(self.take(8, what), dtype="<i8")[0].astype(np.int64)

    def varint(self) -> int:
        value = shift = 0
        while shift < 64:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
        raise CodecError(f"{self.name}: varint longer than 10 bytes at offset {self.pos}")
