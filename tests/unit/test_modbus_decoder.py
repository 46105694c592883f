"""The block decoder: the same samples as decoding point by point, and only the changed ones."""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Sequence
from typing import Any

import pytest

from drivers.contract import Quality, Sample
from drivers.modbus.codec import DataType, Format, Order, decode, encode
from drivers.modbus.decoder import BlockDecoder
from drivers.modbus.plan import Block, plan_reads
from drivers.modbus.point import ModbusPoint
from drivers.quality import assess

TS = 1_700_000_000.0

NUMBERS = [
    DataType.INT16,
    DataType.UINT16,
    DataType.INT32,
    DataType.UINT32,
    DataType.INT64,
    DataType.UINT64,
    DataType.FLOAT32,
    DataType.FLOAT64,
]
# Values whose bit patterns the random words would rarely hit.
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-45, 5e-324, 3.4e38, -1.5, 1e300]
SPECIAL_INTS: list[int | str] = ["min", "max", 0, -1, 1]


def per_point(block: Block, formats: dict[str, Format], data: Sequence[Any]) -> list[Sample]:
    """What the driver did before the block decoder: decode, assess and report every point."""
    out = []
    for p in block.points:
        try:
            value = decode(formats[p.key], data[block.window(p)])
        except ValueError as exc:
            out.append(Sample(p.key, None, Quality.BAD, TS, f"cannot decode {p.address}: {exc}"))
            continue
        quality, reason = assess(value, p.lo, p.hi)
        out.append(Sample(p.key, None if quality is Quality.BAD else value, quality, TS, reason))
    return out


def exact(samples: Sequence[Sample]) -> list[tuple[Any, ...]]:
    """Samples as comparable tuples that tell -0.0 from 0.0 and 1 from 1.0 and True."""
    return [
        (s.key, type(s.value).__name__, repr(s.value), s.quality, s.source_ts, s.reason)
        for s in samples
    ]


def read(decoder: BlockDecoder, data: Sequence[Any], ts: float = TS) -> list[Sample]:
    out: list[Sample] = []
    decoder.samples(data, ts, out)
    return out


def random_points(rng: random.Random, count: int) -> list[ModbusPoint]:
    """Points of every register format and order, scaled or not, limited or not, some sharing
    registers, at addresses with gaps."""
    points: list[ModbusPoint] = []
    address = rng.randrange(0, 50)
    for n in range(count):
        kind = rng.random()
        byte_order = rng.choice([None, "big", "little"])
        word_order = rng.choice([None, "big", "little"])
        if kind < 0.1:
            length = rng.randint(1, 9)
            p = ModbusPoint(f"s{n}", f"holding:{address}", "string", length, byte_order, word_order)
        elif kind < 0.2:
            p = ModbusPoint(f"b{n}", f"holding:{address}.{rng.randrange(16)}")
        else:
            dt = rng.choice(NUMBERS)
            scaled = rng.random() < 0.3
            lo = hi = None
            if rng.random() < 0.5:
                lo, hi = sorted(rng.uniform(-1e4, 1e4) for _ in range(2))
                if rng.random() < 0.2:
                    lo, hi = rng.choice([(-math.inf, hi), (lo, math.inf), (math.inf, math.inf)])
            p = ModbusPoint(
                f"n{n}",
                f"holding:{address}",
                dt,
                scale=rng.choice([0.1, -2.5, 1e-3]) if scaled else 1.0,
                offset=rng.choice([0.0, 10.0, -273.15]) if scaled else 0.0,
                lo=lo,
                hi=hi,
                byte_order=byte_order,
                word_order=word_order,
            )
        points.append(p)
        step = rng.choice([0, p.span, p.span, p.span, p.span + rng.randrange(1, 4)])
        if rng.random() < 0.05:
            step = max(p.span - 1, 0)  # overlaps the next point
        address += step
    return points


def random_words(rng: random.Random, block: Block, formats: dict[str, Format]) -> list[int]:
    """Random registers, with special values (NaN, inf, -0, extremes) laid out in some points."""
    words = [rng.randrange(0x10000) for _ in range(block.count)]
    for p in block.points:
        fmt = formats[p.key]
        if fmt.datatype not in NUMBERS or rng.random() < 0.5:
            continue
        raw = Format(fmt.datatype, byte_order=fmt.byte_order, word_order=fmt.word_order)
        if fmt.datatype.is_float:
            value: float = rng.choice(SPECIAL_FLOATS)
        else:
            code = {DataType.INT16: "h", DataType.INT32: "i", DataType.INT64: "q"}.get(
                fmt.datatype, "H"
            )
            bits = 8 * fmt.registers * 2
            limits = {"min": -(2 ** (bits - 1)), "max": 2 ** (bits - 1) - 1}
            if code == "H":
                limits = {"min": 0, "max": 2**bits - 1}
            choice = rng.choice(SPECIAL_INTS)
            value = limits[choice] if isinstance(choice, str) else choice
            if value < 0 and code == "H":
                value = 0
        begin = p.address.offset - block.start
        try:
            words[begin : begin + p.span] = encode(raw, value)
        except ValueError:
            continue  # 1e300 in a float32
    return words


def blocks_of(points: list[ModbusPoint], max_gap: int) -> list[Block]:
    return plan_reads(points, max_gap=max_gap)


def formats_of(points: list[ModbusPoint], byte: Order, word: Order) -> dict[str, Format]:
    return {p.key: p.format(byte, word) for p in points}


@pytest.mark.parametrize("seed", range(40))
def test_values_and_reasons_are_those_of_decoding_point_by_point(seed: int) -> None:
    rng = random.Random(seed)
    points = random_points(rng, rng.randint(1, 80))
    formats = formats_of(points, rng.choice(list(Order)), rng.choice(list(Order)))
    for block in blocks_of(points, rng.randrange(0, 9)):
        for _ in range(5):
            data = random_words(rng, block, formats)
            fresh = BlockDecoder(block, formats)
            assert exact(read(fresh, data)) == exact(per_point(block, formats, data))


@pytest.mark.parametrize(
    "garbage",
    [[70000], [-1], [0x10000, 5], [1.5]],
    ids=["above", "negative", "two", "float"],
)
@pytest.mark.parametrize("where", ["point", "gap"])
def test_a_word_that_is_no_word_makes_its_point_bad_with_todays_reason(
    garbage: list[Any], where: str
) -> None:
    points = [
        ModbusPoint("a", "holding:0", "float32"),
        ModbusPoint("b", "holding:2", "int16", lo=0, hi=10),
        ModbusPoint("c", "holding:6", "uint32", word_order="little"),
        ModbusPoint("d", "holding:8.3"),
        ModbusPoint("e", "holding:9", "string", 4),
    ]
    formats = formats_of(points, Order.BIG, Order.BIG)
    (block,) = blocks_of(points, 8)
    data: list[Any] = [0x4148, 0, 7, 0, 0, 0, 1, 2, 8, 0x4142, 0x4300]
    at = 0 if where == "point" else 3
    data[at : at + len(garbage)] = garbage
    decoder = BlockDecoder(block, formats)
    expected = per_point(block, formats, data)
    assert exact(read(decoder, data)) == exact(expected)
    if where == "point" and not isinstance(garbage[0], float):  # 1.5 decodes as 1, as before
        assert expected[0].reason is not None
        assert expected[0].reason.startswith("cannot decode holding:0: register value")
    # Reported in full again once the garbage is gone, though the good points did not change.
    clean = [0x4148, 0, 7, 0, 0, 0, 1, 2, 8, 0x4142, 0x4300]
    assert exact(read(decoder, clean)) == exact(per_point(block, formats, clean))
    assert read(decoder, clean) == []


def test_a_short_read_is_decoded_point_by_point() -> None:
    points = [ModbusPoint("a", "holding:0"), ModbusPoint("b", "holding:1", "float32")]
    formats = formats_of(points, Order.BIG, Order.BIG)
    (block,) = blocks_of(points, 0)
    decoder = BlockDecoder(block, formats)
    assert exact(read(decoder, [5, 1])) == exact(per_point(block, formats, [5, 1]))
    assert read(decoder, [5, 1])[1].reason == (
        "cannot decode holding:1: float32 expects 2 register(s), got 1"
    )


def f32(value: float) -> list[int]:
    raw = struct.pack(">f", value)
    return [int.from_bytes(raw[:2], "big"), int.from_bytes(raw[2:], "big")]


TANK = [
    ModbusPoint("level", "holding:0", "float32", lo=0, hi=5),
    ModbusPoint("temp", "holding:2", "float32"),
    ModbusPoint("flow", "holding:4", "int16", scale=0.01, lo=0, hi=2),
    ModbusPoint("run", "holding:5.0"),
    ModbusPoint("alarm", "holding:5.1"),
    ModbusPoint("tag", "holding:6", "string", 4),
]
TANK_WORDS = [*f32(2.5), *f32(21.0), 150, 0b01, 0x5431, 0x0000]


@pytest.fixture
def tank() -> BlockDecoder:
    (block,) = plan_reads(TANK)
    return BlockDecoder(block, formats_of(TANK, Order.BIG, Order.BIG))


def test_an_unchanged_block_reports_nothing_the_second_time(tank: BlockDecoder) -> None:
    first = read(tank, TANK_WORDS)
    assert [(s.key, s.value, s.quality) for s in first] == [
        ("level", 2.5, Quality.GOOD),
        ("temp", 21.0, Quality.GOOD),
        ("flow", pytest.approx(1.5), Quality.GOOD),
        ("alarm", False, Quality.GOOD),  # bits of one register in key order
        ("run", True, Quality.GOOD),
        ("tag", "T1", Quality.GOOD),
    ]
    assert read(tank, list(TANK_WORDS)) == []
    assert read(tank, list(TANK_WORDS)) == []


@pytest.mark.parametrize(
    ("at", "words", "key", "value"),
    [
        (2, f32(22.5), "temp", 22.5),
        (4, [151], "flow", 1.51),
        (5, [0b11], "alarm", True),
        (6, [0x5432], "tag", "T2"),
    ],
)
def test_a_changed_point_alone_is_reported(
    tank: BlockDecoder, at: int, words: list[int], key: str, value: Any
) -> None:
    read(tank, TANK_WORDS)
    data = list(TANK_WORDS)
    data[at : at + len(words)] = words
    (sample,) = read(tank, data, TS + 1)
    assert (sample.key, sample.value, sample.quality, sample.source_ts) == (
        key,
        pytest.approx(value),
        Quality.GOOD,
        TS + 1,
    )
    assert read(tank, data) == []


def test_a_value_leaving_its_limits_turns_uncertain_once(tank: BlockDecoder) -> None:
    read(tank, TANK_WORDS)
    data = list(TANK_WORDS)
    data[0:2] = f32(7.5)
    assert read(tank, data) == [
        Sample("level", 7.5, Quality.UNCERTAIN, TS, "7.5 outside engineering range [0, 5]")
    ]
    assert read(tank, data) == []
    data[0:2] = f32(4.0)
    assert read(tank, data) == [Sample("level", 4.0, Quality.GOOD, TS)]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_bad_point_is_reported_every_time_the_others_not(tank: BlockDecoder, bad: float) -> None:
    read(tank, TANK_WORDS)
    data = list(TANK_WORDS)
    data[2:4] = f32(bad)
    for _ in range(3):
        assert read(tank, data) == [
            Sample("temp", None, Quality.BAD, TS, f"value not finite ({bad})")
        ]
    data[2:4] = f32(21.0)  # back to what it was before it went BAD: reported all the same
    assert read(tank, data) == [Sample("temp", 21.0, Quality.GOOD, TS)]
    assert read(tank, data) == []


def test_reset_reports_every_point_and_forget_one(tank: BlockDecoder) -> None:
    first = read(tank, TANK_WORDS)
    tank.reset()
    assert read(tank, TANK_WORDS) == first
    tank.forget("flow")
    tank.forget("not-here")
    assert [s.key for s in read(tank, TANK_WORDS)] == ["flow"]
    assert read(tank, TANK_WORDS) == []


def test_a_change_in_a_gap_reports_nothing() -> None:
    points = [ModbusPoint("a", "holding:0"), ModbusPoint("b", "holding:5")]
    (block,) = plan_reads(points, max_gap=8)
    decoder = BlockDecoder(block, formats_of(points, Order.BIG, Order.BIG))
    read(decoder, [1, 0, 0, 0, 0, 2])
    assert read(decoder, [1, 9, 9, 9, 9, 2]) == []


def test_coils_are_reported_on_change_only() -> None:
    points = [ModbusPoint(f"c{i}", f"coil:{i * 3}") for i in range(4)]
    (block,) = plan_reads(points, max_gap=8)
    decoder = BlockDecoder(block, formats_of(points, Order.BIG, Order.BIG))
    bits = [False] * block.count
    assert [s.value for s in read(decoder, bits)] == [False] * 4
    assert read(decoder, list(bits)) == []
    bits[6] = True
    bits[7] = True  # not a point's bit
    assert read(decoder, bits) == [Sample("c2", True, Quality.GOOD, TS)]
    one = [ModbusPoint("x", "discrete:4")]
    (single,) = plan_reads(one)
    lone = BlockDecoder(single, formats_of(one, Order.BIG, Order.BIG))
    assert read(lone, [1]) == [Sample("x", True, Quality.GOOD, TS)]
    assert read(lone, [1]) == []


@pytest.mark.parametrize(
    ("byte", "word"),
    [(b, w) for b in Order for w in Order],
    ids=lambda o: str(o),
)
def test_every_device_order_decodes_in_one_struct(byte: Order, word: Order) -> None:
    points = [
        ModbusPoint("i16", "holding:0", "int16"),
        ModbusPoint("f32", "holding:1", "float32"),
        ModbusPoint("u64", "holding:3", "uint64"),
        ModbusPoint("f64", "holding:7", "float64"),
    ]
    formats = formats_of(points, byte, word)
    (block,) = plan_reads(points)
    decoder = BlockDecoder(block, formats)
    assert decoder._plain  # no point decoded on its own
    values = {"i16": -2, "f32": 1.25, "u64": 2**60 + 3, "f64": -1e-300}
    data = [w for p in points for w in encode(formats[p.key], values[p.key])]
    assert {s.key: s.value for s in read(decoder, data)} == values


class Twin:
    """The twin's filter (first sample taken; a quality change taken; an equal value not)."""

    def __init__(self) -> None:
        self.state: dict[str, tuple[str, Quality, float | None, str | None]] = {}
        self.last_value: dict[str, Any] = {}

    def ingest(self, samples: Sequence[Sample]) -> None:
        for s in samples:
            before = self.state.get(s.key)
            value, ts = s.value, s.source_ts
            if before is not None:
                if value is None:
                    if s.quality is before[1]:
                        continue
                    value, ts = self.last_value[s.key], ts if ts is not None else before[2]
                elif s.quality is before[1] and value == self.last_value[s.key]:
                    continue
            self.last_value[s.key] = value
            self.state[s.key] = (repr(value), s.quality, ts, s.reason)


@pytest.mark.parametrize("seed", range(25))
def test_the_twin_ends_up_the_same_as_when_every_point_was_reported(seed: int) -> None:
    rng = random.Random(1000 + seed)
    points = random_points(rng, rng.randint(1, 60))
    formats = formats_of(points, rng.choice(list(Order)), rng.choice(list(Order)))
    for block in blocks_of(points, rng.randrange(0, 9)):
        decoder = BlockDecoder(block, formats)
        everything, changes = Twin(), Twin()
        data = random_words(rng, block, formats)
        for poll in range(30):
            # A few registers change per poll, sometimes garbage, sometimes a special value.
            if rng.random() < 0.3:
                data = random_words(rng, block, formats)
            for _ in range(rng.randrange(3)):
                data[rng.randrange(len(data))] = rng.randrange(0x10000)
            polled: list[Any] = list(data)
            if rng.random() < 0.05:
                polled[rng.randrange(len(polled))] = 70000
            if rng.random() < 0.05:
                decoder.reset()
            ts = TS + poll
            everything.ingest([replace_ts(s, ts) for s in per_point(block, formats, polled)])
            changes.ingest(read(decoder, polled, ts))
            assert changes.state == everything.state, f"poll {poll}"


def replace_ts(sample: Sample, ts: float) -> Sample:
    return Sample(sample.key, sample.value, sample.quality, ts, sample.reason)
