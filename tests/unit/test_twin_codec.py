"""The telemetry codec: exact round trips, realistic sizes, hostile blobs, `take` and `numeric`.

Pure functions, no I/O. Round trips compare every float by its bits (nan payloads, -0.0) and
every value by its type. Hostile blobs must end in CodecError, never another exception: some
are cut or random, some are valid blobs whose payload was edited before recompressing, so that
they get past zlib's checksum to the column parser.

Hypothesis runs are derandomized, without an example database: a few seconds in all.
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import StoreError
from gateway.twin import codec
from gateway.twin.codec import (
    CodecError,
    Columns,
    TelemetryRow,
    decode,
    encode_block,
    encode_block_columns,
    encode_frame,
)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
T0 = 1_780_000_000.0
INT64 = (-(2**63), 2**63 - 1)


def exact(value: Any) -> Any:
    """A key equal for two values only if they are the same value of the same type, bit for bit."""
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if isinstance(value, bool):
        return ("int", int(value))  # stored as 0/1, decoded as int
    return (type(value).__name__, value)


def exact_rows(rows: Sequence[TelemetryRow]) -> list[tuple[Any, ...]]:
    return [tuple(exact(field) for field in row) for row in rows]


def assert_round_trip(rows: Sequence[TelemetryRow], blob: bytes) -> Columns:
    columns = decode(blob)
    assert len(columns) == len(rows)
    assert exact_rows(columns.rows()) == exact_rows(rows)
    return columns


# -- strategies -----------------------------------------------------------------------------------


def bits_to_float(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<Q", bits))[0])


any_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-0.0, 0.0, math.inf, -math.inf, 5e-324, -1.7976931348623157e308]),
    # nan with a sign and a payload, which only a bit-exact codec keeps
    st.integers(0, 2**51 - 1).map(lambda p: bits_to_float(0xFFF8_0000_0000_0000 | p)),
)
float32s = st.floats(width=32, allow_nan=False)
micros = st.integers(0, 4_000_000_000_000_000).map(lambda us: us / 1e6)
near_t0 = st.floats(T0 - 1e5, T0 + 1e5)
int64s = st.integers(*INT64)
scalars = {
    "float": any_float,
    "float32": float32s,
    "int": st.one_of(int64s, st.sampled_from(INT64)),
    "bool": st.booleans(),
    "str": st.text(max_size=20),
    "bytes": st.binary(max_size=20),
    "bigint": st.integers(2**63, 2**80) | st.integers(-(2**80), -(2**63) - 1),
}
any_value = st.one_of(st.none(), *scalars.values())


@st.composite
def value_columns(draw: st.DrawFn, n: int) -> list[Any]:
    """n values: of one kind (often with some None) or of every kind mixed."""
    kind = draw(st.sampled_from([*scalars, "mixed", "none"]))
    if kind == "none":
        return [None] * n
    if kind == "mixed":
        return draw(st.lists(any_value, min_size=n, max_size=n))
    values = draw(st.lists(scalars[kind], min_size=n, max_size=n))
    holes = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    if draw(st.booleans()):
        values = [None if hole else v for v, hole in zip(values, holes, strict=True)]
    return values


@st.composite
def time_columns(draw: st.DrawFn, n: int) -> tuple[list[float], list[float | None]]:
    """ts and source_ts: whole microseconds or not, constant or not, close or not."""
    ts_kind = draw(st.sampled_from(["micros", "constant", "any", "near"]))
    if ts_kind == "constant":
        ts = [draw(micros)] * n
    else:
        element = {"micros": micros, "any": any_float, "near": near_t0}[ts_kind]
        ts = draw(st.lists(element, min_size=n, max_size=n))
    src_kind = draw(st.sampled_from(["none", "same", "micros", "any", "some"]))
    if src_kind == "none":
        return ts, [None] * n
    if src_kind == "same":
        return ts, list(ts)
    sources: dict[str, st.SearchStrategy[float | None]] = {
        "micros": micros,
        "any": any_float,
        "some": st.none() | any_float,
    }
    return ts, draw(st.lists(sources[src_kind], min_size=n, max_size=n))


@st.composite
def rows_of(draw: st.DrawFn, *, block: bool) -> list[TelemetryRow]:
    n = draw(st.integers(1 if block else 0, 40))
    first = draw(st.integers(1, 2**62))
    gaps = draw(st.lists(st.integers(1, 2**20), min_size=n, max_size=n))
    revs = list(itertools.accumulate([first, *gaps[1:]])) if n else []
    if block:
        pids = [draw(st.integers(1, 2**40))] * n
    else:
        pids = draw(st.lists(st.integers(1, 70_000), min_size=n, max_size=n))
    ts, source = draw(time_columns(n))
    values = draw(value_columns(n))
    qualities = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    reasons: list[str | None] = [None] * n
    if draw(st.booleans()):
        reasons = draw(st.lists(st.none() | st.text(max_size=12), min_size=n, max_size=n))
    return list(zip(revs, ts, pids, values, qualities, source, reasons, strict=True))


# -- round trips ----------------------------------------------------------------------------------


@FUZZ
@given(rows_of(block=False))
def test_frames_round_trip_exactly(rows):
    assert_round_trip(rows, encode_frame(rows))


@FUZZ
@given(rows_of(block=True))
def test_blocks_round_trip_exactly(rows):
    assert_round_trip(rows, encode_block(rows))


@pytest.mark.parametrize(
    "values",
    [
        [1.5, -0.0, math.inf, -math.inf, math.nan, bits_to_float(0x7FF0_0000_0000_0001)],
        [True, False, 3, INT64[0], INT64[1], 0],
        ["", "Grüße 🌡", "\ud800", "a" * 1000, "\x00", '"]'],
        [b"", b"\x00\xff", bytes(range(256)), b"x", b"[1]", b"=="],
        [None, 1, 2.0, "3", b"4", 2**64, True, -(2**100), math.nan],
        [None, None, None, None, None, None],
    ],
    ids=["floats", "ints", "strs", "bytes", "mixed", "none"],
)
def test_each_kind_of_value_keeps_its_type_and_bits(values):
    rows = [(i + 1, T0 + i, 5, v, 0, None, None) for i, v in enumerate(values)]
    for blob in (encode_frame(rows), encode_block(rows)):
        columns = assert_round_trip(rows, blob)
        assert [type(v) for v in columns.values] == [
            int if type(v) is bool else type(v) for v in values
        ]


def test_an_empty_frame_round_trips():
    columns = decode(encode_frame([]))
    assert len(columns) == 0
    assert columns.rows() == []


def test_times_that_are_not_whole_microseconds_keep_their_bits():
    ts = [T0 + 0.1, T0 + 1 / 3, -0.0, 1e-7, math.nan, math.inf, 2.0**60]
    rows = [(i + 1, t, 1, 1.0, 0, t + 1e-9, None) for i, t in enumerate(ts)]
    assert_round_trip(rows, encode_block(rows))


def test_reasons_are_kept_on_their_rows():
    rows = [
        (i + 1, T0, i + 1, None, 2, None, "Bad_Timeout" if i % 3 == 0 else None) for i in range(10)
    ]
    rows[4] = (*rows[4][:6], "")
    assert_round_trip(rows, encode_frame(rows))


# -- compaction: frames -> columns -> blocks -----------------------------------------------------


@FUZZ
@given(rows_of(block=False), st.lists(st.integers(1, 10), max_size=6))
def test_frames_regrouped_by_point_make_the_same_blocks(rows, cuts):
    # What the writer's compaction does: decode frames, concatenate, one block per point.
    bounds = [0, *sorted({min(c * 4, len(rows)) for c in cuts}), len(rows)]
    frames = [rows[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    columns = Columns.concat([decode(encode_frame(frame)) for frame in frames])
    assert exact_rows(columns.rows()) == exact_rows(rows)
    for pid in sorted({row[2] for row in rows}):
        mine = [row for row in rows if row[2] == pid]
        blob = encode_block_columns(columns.take(columns.pid == pid))
        assert_round_trip(mine, blob)


def test_a_block_from_columns_is_the_block_from_rows():
    rows = poll_rows(200, 50, pid=77)
    rows[3] = (*rows[3][:3], None, 1, None, "Bad_Timeout")
    frames = [decode(encode_frame(rows[i : i + 7])) for i in range(0, len(rows), 7)]
    assert encode_block_columns(Columns.concat(frames)) == encode_block(rows)


def test_concat_keeps_each_parts_value_types():
    parts: list[list[TelemetryRow]] = [
        [(1, T0, 1, 1.5, 0, None, None)],  # float64 column
        [(2, T0, 1, 7, 0, T0, None)],  # int64 column
        [(3, T0, 1, None, 0, None, "why")],  # no values at all
        [(4, T0, 1, "on", 0, None, None), (5, T0, 1, b"\x00", 0, None, None)],  # objects
        [(6, T0, 1, 2**63, 0, None, None)],  # an int beyond int64
    ]
    rows = [row for part in parts for row in part]
    columns = Columns.concat([decode(encode_frame(part)) for part in parts])
    assert exact_rows(columns.rows()) == exact_rows(rows)
    assert_round_trip(rows, encode_block_columns(columns))
    assert len(Columns.concat([])) == 0
    assert exact_rows(Columns.concat([columns]).rows()) == exact_rows(rows)


def test_a_float_points_rows_of_a_mixed_frame_stay_numbers_beside_its_blocks():
    # A poll of a PLC mixes types across points; the float point's rows taken out of that frame
    # must not make its whole history (blocks of float64) a column of Python objects.
    block = decode(
        encode_block([(i + 1, T0 + i, 1, 20.0 + i / 8, 0, None, None) for i in range(300)])
    )
    mixed = decode(
        encode_frame(
            [
                (301, T0 + 301, 1, 21.5, 0, None, None),
                (302, T0 + 301, 2, "AUTO", 0, None, None),
                (303, T0 + 301, 3, True, 0, None, None),
                (304, T0 + 302, 1, 22.25, 0, None, None),
            ]
        )
    )
    ours = mixed.take(mixed.pid == 1)
    joined = Columns.concat([block, ours])
    assert joined.value_kind == "f"
    assert joined.rows()[-2:] == [
        (301, T0 + 301, 1, 21.5, 0, None, None),
        (304, T0 + 302, 1, 22.25, 0, None, None),
    ]
    # Ints beside floats, or text, still keep each value's own type.
    counts = decode(
        encode_frame([(305, T0, 4, 7, 0, None, None), (306, T0, 5, "x", 0, None, None)])
    )
    kept = Columns.concat([block, counts.take(counts.pid == 4)])
    assert kept.rows()[-1][3] == 7 and type(kept.rows()[-1][3]) is int


def test_encode_block_columns_refuses_nothing_and_several_points():
    columns = decode(encode_frame(SMALL))
    with pytest.raises(ValueError, match="at least one row"):
        encode_block_columns(columns.take(np.array([], dtype=int)))
    with pytest.raises(ValueError, match="one point"):
        encode_block_columns(columns)


# -- realistic sizes ------------------------------------------------------------------------------


def poll_rows(points: int, polls: int, pid: int | None = None) -> list[TelemetryRow]:
    """bench/codec.py's device, small: N float32 points polled every second in reads of 62.

    The whole poll (a frame) when pid is None, else that point over `polls` polls (a block).
    """
    rng = np.random.default_rng(3)
    phase = rng.uniform(0, 2 * np.pi, points)
    reads = -(-points // 62)
    start = T0 + np.arange(polls) + rng.uniform(0.001, 0.005, polls)
    read_end = start[:, None] + np.cumsum(rng.uniform(6e-4, 1e-3, (polls, reads)), axis=1)
    ts = np.round((read_end[:, -1] + rng.uniform(2e-4, 8e-4, polls)) * 1e6) / 1e6
    if pid is None:
        pids = np.arange(1, points + 1)
        k = np.zeros(points, dtype=int)
    else:
        pids = np.full(polls, pid)
        k = np.arange(polls)
    source = read_end[k, (pids - 1) // 62]
    wave = 50 + 40 * np.sin(2 * np.pi * 0.1 * (source - T0) + phase[pids - 1])
    value = (wave + rng.normal(0, 0.5, len(k))).astype(np.float32).astype(float)
    rev = k * points + pids
    n = len(rev)
    return list(
        zip(
            rev.tolist(),
            ts[k].tolist(),
            pids.tolist(),
            value.tolist(),
            [0] * n,
            source.tolist(),
            [None] * n,
            strict=True,
        )
    )


def test_a_realistic_frame_takes_at_most_8_bytes_per_sample():
    rows = poll_rows(10_000, 1)
    blob = encode_frame(rows)
    assert_round_trip(rows, blob)
    assert len(blob) / len(rows) <= 8


def test_a_realistic_block_takes_at_most_8_bytes_per_sample():
    rows = poll_rows(10_000, 600, pid=4321)
    blob = encode_block(rows)
    assert_round_trip(rows, blob)
    assert len(blob) / len(rows) <= 8


# -- what encoding refuses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([], "at least one row"),
        ([(1, T0, 1, 1.0, 0, None, None), (2, T0, 2, 1.0, 0, None, None)], "one point"),
        ([(2, T0, 1, 1.0, 0, None, None), (2, T0, 1, 1.0, 0, None, None)], "ascending"),
        ([(0, T0, 1, 1.0, 0, None, None)], "positive"),
        ([(1, T0, 0, 1.0, 0, None, None)], "pid"),
        ([(1, None, 1, 1.0, 0, None, None)], "ts"),
        ([(1, T0, 1, [1.0], 0, None, None)], "list"),
        ([(1, T0, 1, 1.0, 256, None, None)], "quality"),
        ([(1, T0, 1, 1.0, 0, "yesterday", None)], "source_ts"),
        ([(1, T0, 1, 1.0, 0, None, 7)], "reason"),
        ([(1, T0, 1, 1.0, 0, None)], "no field 6"),
    ],
    ids=["empty", "two-pids", "rev-repeats", "rev-zero", "pid-zero", "no-ts", "list-value",
         "quality", "source-text", "reason-int", "short-row"],
)  # fmt: skip
def test_encode_block_refuses_what_it_cannot_store(rows, match):
    with pytest.raises(ValueError, match=match):
        encode_block(rows)


# -- hostile blobs --------------------------------------------------------------------------------

SMALL = [
    (10, T0, 3, 1.25, 0, T0 - 0.002, None),
    (11, T0, 4, None, 1, None, "Bad_CommunicationError"),
    (12, T0 + 0.5, 3, "text", 2, T0 + 0.25, None),
]


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def header_and_payload(blob: bytes) -> tuple[bytes, bytes]:
    """Split a valid blob into its header (2 bytes, 2 varints) and its inflated payload."""
    end = 2
    for _ in range(2):
        while blob[end] & 0x80:
            end += 1
        end += 1
    return blob[:end], zlib.decompress(blob[end:])


def reblob(kind: bytes, n: int, payload: bytes) -> bytes:
    """A blob with a valid header and stream around any payload."""
    return b"\xc1" + kind + varint(n) + varint(len(payload)) + zlib.compress(payload)


def edited(rows: Sequence[TelemetryRow], old: bytes, new: bytes) -> bytes:
    """A valid frame of `rows` whose payload has `old` replaced by `new`, recompressed."""
    _, payload = header_and_payload(encode_frame(rows))
    assert payload.count(old) == 1
    return reblob(b"F", len(rows), payload.replace(old, new))


def test_every_cut_of_a_blob_is_refused():
    blob = encode_frame(SMALL)
    decode(blob)
    for cut in range(len(blob)):
        with pytest.raises(CodecError):
            decode(blob[:cut])


def test_a_flipped_byte_is_refused_or_harmless():
    # Deflate ignores a few bits (padding after the last block, unused code lengths): a flip
    # there gives the same rows back. Any other flip must be refused, never decode differently.
    blob = encode_frame(SMALL)
    refused = 0
    for i in range(len(blob)):
        for flip in (0x01, 0x80, 0xFF):
            damaged = bytearray(blob)
            damaged[i] ^= flip
            try:
                rows = decode(bytes(damaged)).rows()
            except CodecError:
                refused += 1
            else:
                assert exact_rows(rows) == exact_rows(SMALL), f"byte {i} ^ {flip:#x}"
    assert refused >= 3 * len(blob) - 6


@FUZZ
@given(st.sampled_from([b"", b"\xc1", b"\xc1F", b"\xc1B"]), st.binary(max_size=300))
def test_random_bytes_are_refused(start, data):
    with pytest.raises(CodecError):
        decode(start + data)


@FUZZ
@given(st.sampled_from([b"F", b"B"]), st.integers(0, 64), st.binary(max_size=400))
def test_any_payload_in_a_valid_envelope_decodes_or_is_refused(kind, n, payload):
    try:
        columns = decode(reblob(kind, n, payload))
    except CodecError:
        return
    assert len(columns) == n
    columns.rows()
    columns.numeric()


def test_wrong_version_and_kind_are_refused():
    blob = encode_frame(SMALL)
    with pytest.raises(CodecError, match="version 2"):
        decode(b"\xc2" + blob[1:])
    with pytest.raises(CodecError, match="not a telemetry blob"):
        decode(b"\x00" + blob[1:])
    with pytest.raises(CodecError, match="kind"):
        decode(blob[:1] + b"Z" + blob[2:])


def test_a_header_claiming_2_to_the_40_rows_is_refused_before_allocating():
    _, payload = header_and_payload(encode_frame(SMALL))
    stream = zlib.compress(payload)
    with pytest.raises(CodecError, match="rows"):
        decode(b"\xc1F" + varint(2**40) + varint(len(payload)) + stream)
    # and a size to match: more than deflate can inflate from so small a stream
    with pytest.raises(CodecError, match="claims"):
        decode(b"\xc1F" + varint(2**40) + varint(2**45) + stream)


def test_a_zlib_bomb_is_refused_after_inflating_one_byte_past_its_header():
    bomb = zlib.compress(bytes(50_000_000), 9)  # ~50 kB that inflate to 50 MB
    with pytest.raises(CodecError, match="more than"):
        decode(b"\xc1F" + varint(1) + varint(100) + bomb)


def test_a_payload_shorter_than_its_header_says_is_refused():
    _, payload = header_and_payload(encode_frame(SMALL))
    with pytest.raises(CodecError):
        decode(b"\xc1F" + varint(3) + varint(len(payload) + 1) + zlib.compress(payload))


def test_bytes_after_the_stream_are_refused():
    with pytest.raises(CodecError, match="after"):
        decode(encode_frame(SMALL) + b"\x00")


@pytest.mark.parametrize(
    ("new", "match"),
    [
        ("[" * 100_000 + "]" * 100_000, "corrupt payload"),  # deeper than json's recursion
        ('[1.25,"text","more"]', "list of 2"),
        ('[true,"text"]', "bad value"),
        ('[["b","not base64!"],"text"]', "corrupt payload"),
        ('[["f",-1],"text"]', "bad value"),
        ('[["z",1],"text"]', "bad value"),
        ('{"text":1}', "list of 2"),
        ('["\\ud800"', "corrupt payload"),
    ],
    ids=["deep", "count", "bool", "base64", "float-bits", "tag", "object", "unterminated"],
)  # fmt: skip
def test_hostile_json_values_are_refused(new, match):
    old = b'[1.25,"text"]'
    blob = edited(SMALL, varint(len(old)) + old, varint(len(new.encode())) + new.encode())
    with pytest.raises(CodecError, match=match):
        decode(blob)


@pytest.mark.parametrize(
    "new",
    ['[[1,"x"],[1,"y"]]', '[[3,"x"]]', '[[-1,"x"]]', '[["1","x"]]', "[]", "[[1,2]]", b"\xff\xfe"],
)
def test_hostile_json_reasons_are_refused(new):
    old = b'[[1,"Bad_CommunicationError"]]'
    raw = new if isinstance(new, bytes) else new.encode()
    blob = edited(SMALL, varint(len(old)) + old, varint(len(raw)) + raw)
    with pytest.raises(CodecError):
        decode(blob)


def q(value: int) -> bytes:
    return struct.pack("<q", value)


# A 2-row block built by hand from the format in the module docstring: every int64 column is
# its first value, the minimum of its deltas, then planes [lo, hi] = [0, 0] (all deltas equal).
BLOCK_PARTS = {
    "rev": q(5) + q(1) + b"\0\0",
    "pid": b"\x07",
    "ts": b"\x01" + q(1_780_000_000_000_000) + q(500_000) + b"\0\0",
    "quality": b"\x00\x02",
    "values": b"\x00I" + q(42) + q(-1) + b"\0\0",
    "source_ts": b"\x01",
    "reason": b"\x00",
}


def block_blob(**parts: bytes) -> bytes:
    return reblob(b"B", 2, b"".join({**BLOCK_PARTS, **parts}.values()))


def test_the_hand_built_block_is_valid():
    assert decode(block_blob()).rows() == [
        (5, 1_780_000_000.0, 7, 42, 0, None, None),
        (6, 1_780_000_000.5, 7, 41, 2, None, None),
    ]


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        ({"rev": q(0) + q(1) + b"\0\0"}, "revs not positive"),
        ({"rev": q(5) + q(-1) + b"\0\0"}, "strictly ascending"),
        ({"rev": q(5) + q(0) + b"\0\0"}, "strictly ascending"),
        ({"pid": b"\x00"}, "pid 0"),
        ({"pid": b"\xff" * 11}, "varint"),
        ({"pid": b"\xff" * 9 + b"\x01"}, "corrupt payload"),  # 2**64 - 1: no int64 pid
        ({"ts": b"\x05" + BLOCK_PARTS["ts"][1:]}, "ts mode"),
        ({"values": b"\x07"}, "presence flag"),
        ({"values": b"\x00Q" + q(42) + q(-1) + b"\0\0"}, "value type"),
        ({"values": b"\x00I" + q(42) + q(-1) + b"\x05\x03"}, "planes"),
        ({"values": b"\x00I" + q(42) + q(-1) + b"\x00\x09"}, "planes"),
        ({"values": b"\x00f\x00\x05"}, "planes"),
        ({"source_ts": b"\x00U" + q(0) + b"\0\0", "ts": b"\x00" + BLOCK_PARTS["ts"][1:]},
         "source_ts mode"),
        ({"source_ts": b"\x00?" + q(0) + b"\0\0"}, "source_ts mode"),
        ({"reason": b"\x00\x00"}, "after the last column"),
        ({"reason": b""}, "truncated"),
    ],
    ids=["rev-zero", "rev-down", "rev-repeats", "pid-zero", "long-varint", "huge-pid",
         "ts-mode", "presence", "value-type", "planes-reversed", "planes-beyond", "planes-f32",
         "src-us-without-ts-us", "src-mode", "trailing", "missing-reason"],
)  # fmt: skip
def test_hostile_columns_are_refused(parts, match):
    with pytest.raises(CodecError, match=match):
        decode(block_blob(**parts))


def test_the_row_bound_holds_both_ways(monkeypatch):
    blob = encode_frame(SMALL)
    monkeypatch.setattr(codec, "MAX_ROWS", 2)
    with pytest.raises(ValueError, match="at most 2"):
        encode_frame(SMALL)
    with pytest.raises(CodecError, match="more rows"):
        decode(blob)


def test_codec_errors_are_store_errors():
    assert issubclass(CodecError, StoreError)


# -- take and numeric -----------------------------------------------------------------------------

MIXED = [
    (1, T0, 1, 1.5, 0, T0, None),
    (2, T0, 2, None, 3, None, "Bad_NoCommunication"),
    (3, T0, 3, 7, 0, T0 - 0.001, None),
    (4, T0, 1, "on", 1, None, None),
    (5, T0, 2, True, 0, T0, None),
    (6, T0, 3, b"\x01", 0, None, "GoodClamped"),
    (7, T0, 1, math.nan, 0, T0 + 1e-7, None),
]


@pytest.fixture
def mixed() -> Columns:
    return decode(encode_frame(MIXED))


def expected(rows: list[TelemetryRow]) -> list[tuple[Any, ...]]:
    return exact_rows(rows)


def test_take_with_a_mask_keeps_the_selected_rows_in_order(mixed):
    picked = mixed.take(mixed.pid == 1)
    assert exact_rows(picked.rows()) == expected([MIXED[0], MIXED[3], MIXED[6]])
    assert picked.pid.tolist() == [1, 1, 1]


def test_take_with_indices_reorders_and_repeats(mixed):
    picked = mixed.take(np.array([5, 1, 1, 0]))
    assert exact_rows(picked.rows()) == expected([MIXED[5], MIXED[1], MIXED[1], MIXED[0]])


def test_take_of_nothing_is_empty(mixed):
    for index in (np.zeros(len(mixed), dtype=bool), np.array([], dtype=int), np.array([])):
        picked = mixed.take(index)
        assert len(picked) == 0
        assert picked.rows() == []
        assert picked.numeric()[0].tolist() == []


def test_take_refuses_a_mask_of_the_wrong_length(mixed):
    with pytest.raises(IndexError):
        mixed.take(np.ones(len(mixed) + 1, dtype=bool))


def test_take_of_a_take(mixed):
    picked = mixed.take(mixed.quality == 0).take(np.array([3, 0]))
    assert exact_rows(picked.rows()) == expected([MIXED[5], MIXED[0]])


def test_numeric_marks_ints_and_floats_only(mixed):
    mask, values = mixed.numeric()
    assert mask.tolist() == [True, False, True, False, True, False, True]
    assert values[[0, 2, 4]].tolist() == [1.5, 7.0, 1.0]
    assert np.isnan(values[[1, 3, 5, 6]]).all()  # not numbers, and the nan itself


def as_float(value: float) -> float:
    """The number as a float, ints beyond the float range as infinities."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


@pytest.mark.parametrize(
    ("values", "mask"),
    [
        ([2.5, None, -1.0], [True, False, True]),
        ([3, None, -(2**63)], [True, False, True]),
        ([None, None, None], [False, False, False]),
        (["a", 2**70, 1.0], [False, True, True]),
        ([10**400, -(10**400), b"", 0.5], [True, True, False, True]),
    ],
    ids=["floats", "ints", "none", "generic", "beyond-float"],
)
def test_numeric_of_each_column_type(values, mask):
    rows = [(i + 1, T0, 9, v, 0, None, None) for i, v in enumerate(values)]
    columns = decode(encode_block(rows))
    got_mask, got = columns.numeric()
    assert got_mask.tolist() == mask
    want = [as_float(v) if m else math.nan for v, m in zip(values, mask, strict=True)]
    np.testing.assert_array_equal(got, np.array(want))
    # and through a take that drops the first row
    got_mask, got = columns.take(np.arange(1, len(values))).numeric()
    assert got_mask.tolist() == mask[1:]
    np.testing.assert_array_equal(got, np.array(want[1:]))


def test_lists_are_built_once_and_match_the_rows(mixed):
    assert mixed.values is mixed.values
    assert [exact(v) for v in mixed.values] == [exact(r[3]) for r in MIXED]
    assert [exact(s) for s in mixed.source_ts] == [exact(r[5]) for r in MIXED]
    assert mixed.reason == [r[6] for r in MIXED]
    assert mixed.rev.dtype == np.int64 and mixed.pid.dtype == np.int64
    assert mixed.ts.dtype == np.float64 and mixed.quality.dtype == np.uint8
