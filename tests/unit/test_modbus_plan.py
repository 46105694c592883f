"""The read planner and the device options it takes its limits from."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from drivers.errors import ConfigurationError
from drivers.modbus.codec import Table
from drivers.modbus.options import ModbusOptions
from drivers.modbus.plan import Block, plan_reads, split_block
from drivers.modbus.point import ModbusPoint


def pt(key: str, address: str, datatype: str | None = None, **kw: object) -> ModbusPoint:
    return ModbusPoint(key, address, datatype, **kw)  # type: ignore[arg-type]


def shape(blocks: list[Block]) -> list[tuple[str, int, int, list[str]]]:
    return [(str(b.table), b.start, b.count, [p.key for p in b.points]) for b in blocks]


def test_adjacent_points_merge_into_one_block() -> None:
    points = [pt("a", "holding:0"), pt("b", "holding:1"), pt("c", "holding:2", "float32")]
    assert shape(plan_reads(points)) == [("holding", 0, 4, ["a", "b", "c"])]


def test_gap_up_to_max_gap_is_read_through_and_beyond_it_splits() -> None:
    points = [pt("a", "holding:0"), pt("b", "holding:3"), pt("c", "holding:7")]
    # 0 | gap 1..2 (2) | 3 | gap 4..6 (3) | 7
    assert shape(plan_reads(points, max_gap=2)) == [
        ("holding", 0, 4, ["a", "b"]),
        ("holding", 7, 1, ["c"]),
    ]
    assert shape(plan_reads(points, max_gap=3)) == [("holding", 0, 8, ["a", "b", "c"])]
    assert len(plan_reads(points, max_gap=0)) == 3


def test_blocks_respect_max_count() -> None:
    points = [pt(f"r{i}", f"holding:{i}") for i in range(130)]
    blocks = plan_reads(points)
    assert [(b.start, b.count) for b in blocks] == [(0, 125), (125, 5)]
    small = plan_reads(points, max_registers=10)
    assert len(small) == 13 and all(b.count <= 10 for b in small)
    coils = [pt(f"c{i}", f"coil:{i}") for i in range(2100)]
    assert [(b.start, b.count) for b in plan_reads(coils)] == [(0, 2000), (2000, 100)]
    assert [(b.start, b.count) for b in plan_reads(coils[:20], max_bits=8)] == [
        (0, 8),
        (8, 8),
        (16, 4),
    ]


def test_tables_are_kept_apart() -> None:
    points = [
        pt("h", "holding:0"),
        pt("i", "input:0"),
        pt("c", "coil:0"),
        pt("d", "discrete:0"),
        pt("h1", "holding:1"),
        pt("c1", "coil:1"),
    ]
    assert shape(plan_reads(points)) == [
        ("coil", 0, 2, ["c", "c1"]),
        ("discrete", 0, 1, ["d"]),
        ("holding", 0, 2, ["h", "h1"]),
        ("input", 0, 1, ["i"]),
    ]


def test_units_are_kept_apart() -> None:
    points = [
        pt("a", "holding:0"),
        pt("b", "holding:1", unit_id=2),
        pt("c", "holding:2", unit_id=1),
    ]
    blocks = plan_reads(points, unit=1, max_gap=1)
    assert [(b.unit, b.start, b.count, [p.key for p in b.points]) for b in blocks] == [
        (1, 0, 3, ["a", "c"]),
        (2, 1, 1, ["b"]),
    ]


def test_bit_points_sharing_a_register_read_it_once() -> None:
    points = [pt("b15", "holding:5.15"), pt("b0", "holding:5.0"), pt("b3", "holding:5.3")]
    (block,) = plan_reads(points)
    assert (block.start, block.count) == (5, 1)
    assert sorted(p.key for p in block.points) == ["b0", "b15", "b3"]
    assert all(block.window(p) == slice(0, 1) for p in block.points)
    # Split for error isolation, they still stay together: they are one register.
    assert len(split_block(block)) == 1


def test_multi_register_values_are_never_split() -> None:
    points = [
        pt("u", "holding:0"),
        pt("f1", "holding:1", "float32"),
        pt("f2", "holding:3", "float32"),
        pt("d", "holding:5", "float64"),
    ]
    blocks = plan_reads(points, max_registers=4)
    assert shape(blocks) == [
        ("holding", 0, 3, ["u", "f1"]),
        ("holding", 3, 2, ["f2"]),
        ("holding", 5, 4, ["d"]),
    ]
    for b in blocks:
        for p in b.points:
            window = b.window(p)
            assert window.start >= 0 and window.stop <= b.count


def test_point_larger_than_a_request_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"'d' at holding:0 needs 4 .* max_registers = 2"):
        plan_reads([pt("d", "holding:0", "float64")], max_registers=2)


def test_overlapping_points_share_a_block() -> None:
    points = [
        pt("whole", "holding:10", "uint32"),
        pt("low", "holding:11"),
        pt("bit", "holding:10.1"),
    ]
    (block,) = plan_reads(points)
    assert (block.start, block.count) == (10, 2)
    windows = {p.key: block.window(p) for p in block.points}
    assert windows == {"whole": slice(0, 2), "low": slice(1, 2), "bit": slice(0, 1)}


def test_plan_does_not_depend_on_input_order() -> None:
    points = [pt(f"p{i}", f"holding:{i * 3}", "uint32") for i in range(40)] + [
        pt(f"c{i}", f"coil:{i * 5}") for i in range(40)
    ]
    expected = shape(plan_reads(points, max_gap=1, max_registers=20, max_bits=50))
    shuffled = points[:]
    random.Random(7).shuffle(shuffled)
    assert shape(plan_reads(shuffled, max_gap=1, max_registers=20, max_bits=50)) == expected


def test_split_block_gives_one_read_per_distinct_span() -> None:
    points = [pt("a", "holding:100"), pt("b", "holding:102", "float32"), pt("c", "holding:108")]
    (block,) = plan_reads(points, max_gap=10)
    assert str(block) == "holding 100..108"
    parts = split_block(block)
    assert [(str(b), [p.key for p in b.points]) for b in parts] == [
        ("holding 100", ["a"]),
        ("holding 102..103", ["b"]),
        ("holding 108", ["c"]),
    ]


def test_empty_plan() -> None:
    assert plan_reads([]) == []


def test_block_text_names_table_and_range() -> None:
    assert str(Block(1, Table.HOLDING, 100, 10, ())) == "holding 100..109"
    assert str(Block(1, Table.COIL, 7, 1, ())) == "coil 7"


# -- options ----------------------------------------------------------------------------------


def test_options_defaults_are_sane() -> None:
    o = ModbusOptions()
    assert (o.unit_id, o.framer, o.poll_interval_s, o.timeout_s) == (1, None, 1.0, 1.0)
    assert (o.max_registers, o.max_bits) == (125, 2000)
    assert (o.byte_order, o.word_order, o.write_multiple) == ("big", "big", False)
    assert o.failures_before_reconnect >= 1
    assert (o.baudrate, o.parity, o.stopbits, o.bytesize) == (19200, "N", 1, 8)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("unit_id", 248),
        ("unit_id", -1),
        ("max_registers", 126),
        ("max_registers", 0),
        ("max_bits", 2001),
        ("max_gap", -1),
        ("timeout_s", 0),
        ("poll_interval_s", 0),
        ("framer", "ascii"),
        ("byte_order", "middle"),
        ("parity", "X"),
        ("stopbits", 3),
        ("failures_before_reconnect", 0),
        ("colour", "blue"),
    ],
)
def test_options_refuse_out_of_bounds_and_unknown_keys(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as err:
        ModbusOptions.model_validate({field: value})
    assert err.value.errors()[0]["loc"] == (field,)


def test_options_describe_every_field_for_the_docs() -> None:
    for name, info in ModbusOptions.model_fields.items():
        assert info.description and len(info.description) > 20, name
