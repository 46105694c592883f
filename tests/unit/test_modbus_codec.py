"""The Modbus codec, address syntax and point validation: pure, table-driven, no I/O."""

from __future__ import annotations

import math
import struct

import pytest

from drivers.contract import Quality
from drivers.errors import ConfigurationError
from drivers.modbus.codec import (
    Address,
    DataType,
    Format,
    Order,
    Table,
    decode,
    encode,
    parse_address,
    set_bit,
    tolerance,
)
from drivers.modbus.point import ModbusPoint, PointError
from drivers.quality import assess

BIG, LITTLE = Order.BIG, Order.LITTLE
ORDERS = [(BIG, BIG), (BIG, LITTLE), (LITTLE, BIG), (LITTLE, LITTLE)]


def fmt(datatype: str, **kw: object) -> Format:
    return Format(DataType(datatype), **kw)  # type: ignore[arg-type]


def layout(raw: bytes, byte_order: Order, word_order: Order) -> list[int]:
    """Registers for big-endian `raw` as the device stores them, computed independently."""
    words = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    if word_order is LITTLE:
        words.reverse()
    if byte_order is LITTLE:
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]


# -- address syntax ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("coil:0", Address(Table.COIL, 0)),
        ("discrete:17", Address(Table.DISCRETE, 17)),
        ("holding:100", Address(Table.HOLDING, 100)),
        ("input:65535", Address(Table.INPUT, 65535)),
        ("holding:100.3", Address(Table.HOLDING, 100, 3)),
        ("input:7.0", Address(Table.INPUT, 7, 0)),
        ("input:7.15", Address(Table.INPUT, 7, 15)),
        (" Holding : 12 ", Address(Table.HOLDING, 12)),
    ],
)
def test_parse_address_accepts_the_documented_syntax(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["coil:0", "discrete:9", "holding:100", "input:3.15"])
def test_address_prints_back_as_parsed(text: str) -> None:
    assert str(parse_address(text)) == text


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("", "expected TABLE:N"),
        ("holding", "expected TABLE:N"),
        ("holding:", "expected TABLE:N"),
        ("holding:-1", "expected TABLE:N"),
        ("holding:1.x", "expected TABLE:N"),
        ("holdings:1", "unknown table 'holdings'"),
        ("register:1", "unknown table"),
        ("holding:65536", "address 65536 out of range"),
        ("holding:1.16", "bit 16 out of range"),
        ("coil:1.2", "takes no .B suffix"),
        ("discrete:1.0", "takes no .B suffix"),
        ("40001", "expected TABLE:N"),
    ],
)
def test_parse_address_says_what_it_expects(text: str, hint: str) -> None:
    with pytest.raises(ValueError, match="expected TABLE:N") as err:
        parse_address(text)
    assert hint in str(err.value)
    assert repr(text) in str(err.value)


def test_parse_address_rejects_non_text() -> None:
    with pytest.raises(ValueError, match="expected TABLE:N"):
        parse_address(100)  # type: ignore[arg-type]


# -- register layout: every multi-byte type in all four orders --------------------------------

LAYOUT_CASES = [
    ("int16", -2, struct.pack(">h", -2)),
    ("uint16", 0x1234, struct.pack(">H", 0x1234)),
    ("int32", 0x01020304, struct.pack(">i", 0x01020304)),
    ("uint32", 0xA1B2C3D4, struct.pack(">I", 0xA1B2C3D4)),
    ("int64", -0x0102030405060708, struct.pack(">q", -0x0102030405060708)),
    ("uint64", 0x0102030405060708, struct.pack(">Q", 0x0102030405060708)),
    ("float32", 1.5, struct.pack(">f", 1.5)),
    ("float64", -1234.5678, struct.pack(">d", -1234.5678)),
]


@pytest.mark.parametrize(("byte_order", "word_order"), ORDERS, ids=["ABCD", "CDAB", "BADC", "DCBA"])
@pytest.mark.parametrize(
    ("datatype", "value", "raw"), LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES]
)
def test_layout_follows_byte_and_word_order(
    datatype: str, value: float, raw: bytes, byte_order: Order, word_order: Order
) -> None:
    f = fmt(datatype, byte_order=byte_order, word_order=word_order)
    registers = layout(raw, byte_order, word_order)
    assert encode(f, value) == registers
    assert decode(f, registers) == value


def test_float32_orders_by_name() -> None:
    # 0x3F800000 = 1.0, the four layouts as device manuals print them.
    assert encode(fmt("float32"), 1.0) == [0x3F80, 0x0000]  # ABCD
    assert encode(fmt("float32", word_order=LITTLE), 1.0) == [0x0000, 0x3F80]  # CDAB
    assert encode(fmt("float32", byte_order=LITTLE), 1.0) == [0x803F, 0x0000]  # BADC
    assert encode(fmt("float32", byte_order=LITTLE, word_order=LITTLE), 1.0) == [0x0000, 0x803F]


# -- edge values and round trips --------------------------------------------------------------

INT_LIMITS = [
    ("int16", -(2**15), 2**15 - 1),
    ("uint16", 0, 2**16 - 1),
    ("int32", -(2**31), 2**31 - 1),
    ("uint32", 0, 2**32 - 1),
    ("int64", -(2**63), 2**63 - 1),
    ("uint64", 0, 2**64 - 1),
]


@pytest.mark.parametrize(("byte_order", "word_order"), ORDERS, ids=["ABCD", "CDAB", "BADC", "DCBA"])
@pytest.mark.parametrize(("datatype", "lo", "hi"), INT_LIMITS, ids=[c[0] for c in INT_LIMITS])
def test_integer_limits_round_trip_and_one_past_is_refused(
    datatype: str, lo: int, hi: int, byte_order: Order, word_order: Order
) -> None:
    f = fmt(datatype, byte_order=byte_order, word_order=word_order)
    for value in (lo, lo + 1, 0, 1, hi - 1, hi):
        assert decode(f, encode(f, value)) == value
        assert type(decode(f, encode(f, value))) is int
    for outside in (lo - 1, hi + 1):
        with pytest.raises(ValueError, match=f"outside the range of {datatype}"):
            encode(f, outside)


def test_integer_extremes_of_uint64_keep_every_bit() -> None:
    f = fmt("uint64")
    assert encode(f, 2**64 - 1) == [0xFFFF] * 4
    assert decode(f, [0xFFFF] * 4) == 2**64 - 1
    assert decode(fmt("int64"), [0x8000, 0, 0, 0]) == -(2**63)


@pytest.mark.parametrize("datatype", ["float32", "float64"])
@pytest.mark.parametrize(("byte_order", "word_order"), ORDERS, ids=["ABCD", "CDAB", "BADC", "DCBA"])
def test_float_specials_round_trip(datatype: str, byte_order: Order, word_order: Order) -> None:
    f = fmt(datatype, byte_order=byte_order, word_order=word_order)
    negative_zero = decode(f, encode(f, -0.0))
    assert negative_zero == 0.0 and math.copysign(1.0, negative_zero) == -1.0
    assert decode(f, encode(f, math.inf)) == math.inf
    assert decode(f, encode(f, -math.inf)) == -math.inf
    assert math.isnan(decode(f, encode(f, math.nan)))
    assert decode(f, encode(f, 0.25)) == 0.25


def test_float32_extremes() -> None:
    f = fmt("float32")
    biggest = struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]
    assert decode(f, encode(f, biggest)) == biggest
    tiny = struct.unpack(">f", b"\x00\x00\x00\x01")[0]  # smallest subnormal
    assert decode(f, encode(f, tiny)) == tiny
    with pytest.raises(ValueError, match="does not fit in float32"):
        encode(f, 1e39)
    # A float32 keeps ~7 digits: 0.1 comes back as the nearest float32, within tolerance.
    back = decode(f, encode(f, 0.1))
    assert back != 0.1 and abs(back - 0.1) <= tolerance(f, 0.1)


def test_float64_extremes() -> None:
    f = fmt("float64", word_order=LITTLE)
    for value in (1.7976931348623157e308, 5e-324, -2.2250738585072014e-308):
        assert decode(f, encode(f, value)) == value


def test_decoding_a_stored_nan_gives_nan_and_is_bad_quality() -> None:
    value = decode(fmt("float32"), [0x7FC0, 0x0000])
    assert math.isnan(value)
    assert assess(value) == (Quality.BAD, "value not finite (nan)")
    assert assess(decode(fmt("float64"), [0x7FF0, 0, 0, 0]))[0] is Quality.BAD


# -- strings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "length", "registers"),
    [
        ("TANK-01", 8, [0x5441, 0x4E4B, 0x2D30, 0x3100]),
        ("AB", 2, [0x4142]),
        ("ABC", 3, [0x4142, 0x4300]),
        ("", 4, [0, 0]),
        ("A", 6, [0x4100, 0, 0]),
    ],
)
def test_string_layout_two_characters_per_register(
    value: str, length: int, registers: list[int]
) -> None:
    f = fmt("string", length=length)
    assert encode(f, value) == registers
    assert decode(f, registers) == value


def test_string_byte_order_swaps_characters_and_word_order_is_ignored() -> None:
    f = fmt("string", length=4, byte_order=LITTLE, word_order=LITTLE)
    assert encode(f, "ABCD") == [0x4241, 0x4443]
    assert decode(f, [0x4241, 0x4443]) == "ABCD"


def test_string_padding_with_nul_or_spaces_is_dropped() -> None:
    f = fmt("string", length=8)
    assert decode(f, [0x4142, 0x2020, 0x2020, 0x2020]) == "AB"
    assert decode(f, [0x4142, 0x0000, 0x5858, 0x5858]) == "AB"  # stops at the first NUL
    assert decode(f, [0x2041, 0x2042, 0, 0]) == " A B"  # leading and inner spaces stay


def test_string_non_ascii_is_one_byte_per_character() -> None:
    f = fmt("string", length=4)
    assert encode(f, "°C") == [0xB043, 0]
    assert decode(f, [0xB043, 0]) == "°C"
    with pytest.raises(ValueError, match="outside Latin-1"):
        encode(f, "温度")


def test_string_longer_than_length_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than 3 characters"):
        encode(fmt("string", length=3), "ABCD")
    with pytest.raises(ValueError, match="needs a str"):
        encode(fmt("string", length=3), 12)


# -- bits and bools ---------------------------------------------------------------------------


@pytest.mark.parametrize(("bit", "expected"), [(0, True), (1, False), (14, False), (15, True)])
def test_bit_field_reads_one_bit_of_a_register(bit: int, expected: bool) -> None:
    assert decode(fmt("bool", bit=bit), [0x8001]) is expected


def test_set_bit_changes_only_that_bit() -> None:
    assert set_bit(0x0000, 0, True) == 0x0001
    assert set_bit(0x0000, 15, True) == 0x8000
    assert set_bit(0xFFFF, 15, False) == 0x7FFF
    assert set_bit(0xFFFF, 0, False) == 0xFFFE
    assert set_bit(0x00F0, 4, True) == 0x00F0


def test_coil_bool_encodes_to_one_bit() -> None:
    f = fmt("bool")
    assert decode(f, [True]) is True and decode(f, [False]) is False
    assert encode(f, True) == [1] and encode(f, 0) == [0]
    for wrong in ("yes", 2, 0.5, None):
        with pytest.raises(ValueError, match="true/false"):
            encode(f, wrong)


# -- scale, offset and representability -------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "scale", "offset", "registers", "value"),
    [
        ("uint16", 0.1, 0.0, [1234], 123.4),
        ("int16", 0.01, 0.0, [0xFF9C], -1.0),  # raw -100
        ("uint16", 0.5, -40.0, [100], 10.0),
        ("int16", -1.0, 0.0, [5], -5.0),
        ("uint32", 0.001, 0.0, [0x0001, 0x86A0], 100.0),  # raw 100000
        ("float32", 2.0, 1.0, [0x3F80, 0x0000], 3.0),  # raw 1.0
    ],
)
def test_scale_and_offset_give_engineering_values(
    datatype: str, scale: float, offset: float, registers: list[int], value: float
) -> None:
    f = fmt(datatype, scale=scale, offset=offset)
    assert decode(f, registers) == pytest.approx(value)
    assert encode(f, value) == registers


def test_unscaled_integers_stay_integers_and_scaled_ones_become_floats() -> None:
    assert decode(fmt("uint16"), [7]) == 7 and isinstance(decode(fmt("uint16"), [7]), int)
    assert isinstance(decode(fmt("uint16", scale=0.1), [7]), float)


def test_value_between_raw_steps_is_not_representable() -> None:
    f = fmt("uint16", scale=0.1)
    assert encode(f, 42.5) == [425]
    with pytest.raises(ValueError, match=r"not representable in uint16 \(steps of 0.1\)"):
        encode(f, 42.55)
    with pytest.raises(ValueError, match="not representable in int16"):
        encode(fmt("int16"), 1.5)
    assert encode(fmt("int16"), 2.0) == [2]


def test_scaled_value_outside_the_raw_range_is_refused() -> None:
    with pytest.raises(ValueError, match="outside the range of uint16"):
        encode(fmt("uint16", scale=0.1), 6553.6)
    with pytest.raises(ValueError, match="outside the range of uint16"):
        encode(fmt("uint16", offset=10.0), 9.0)


@pytest.mark.parametrize("wrong", ["12", True, None, [1]])
def test_numeric_points_refuse_non_numbers(wrong: object) -> None:
    with pytest.raises(ValueError, match="needs a number"):
        encode(fmt("int16"), wrong)


def test_decode_refuses_data_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="expects 2 register"):
        decode(fmt("float32"), [1])
    with pytest.raises(ValueError, match="not a 16-bit word"):
        decode(fmt("uint16"), [70000])


def test_tolerance_follows_resolution_and_scale() -> None:
    assert tolerance(fmt("uint16", scale=0.1), 42.0) == pytest.approx(0.05)
    assert tolerance(fmt("int32"), 5) == 0.5
    assert tolerance(fmt("float32"), 100.0) == pytest.approx(100.0 * 2**-22, rel=1e-3)
    assert tolerance(fmt("float64"), 100.0) < 1e-9
    assert tolerance(fmt("string", length=2), 0) == 0.0


# -- point validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [
        (
            {"address": "coil:1", "datatype": "string", "length": 4},
            "datatype",
            "not possible on a coil",
        ),
        ({"address": "discrete:1", "datatype": "uint16"}, "datatype", "use datatype bool"),
        ({"address": "holding:1.3", "datatype": "float32"}, "address", "needs datatype bool"),
        ({"address": "holding:1", "datatype": "bool"}, "datatype", "needs a bit"),
        ({"address": "input:1", "writable": True}, "writable", "read-only"),
        ({"address": "discrete:1", "writable": True}, "writable", "read-only"),
        ({"address": "holding:1", "datatype": "string"}, "length", "needs length"),
        ({"address": "holding:1", "datatype": "string", "length": 0}, "length", "1..250"),
        ({"address": "holding:1", "datatype": "string", "length": 251}, "length", "1..250"),
        ({"address": "holding:1", "datatype": "uint16", "length": 2}, "length", "only to string"),
        ({"address": "holding:1.2", "scale": 2.0}, "scale", "only to numeric"),
        ({"address": "coil:1", "offset": 1.0}, "offset", "only to numeric"),
        ({"address": "holding:1", "scale": 0}, "scale", "must not be 0"),
        ({"address": "holding:1", "scale": math.inf}, "scale", "finite"),
        ({"address": "holding:1", "lo": 10, "hi": 5}, "hi", "below lo"),
        ({"address": "coil:1", "lo": 0}, "lo", "only to numeric"),
        ({"address": "holding:65534", "datatype": "float64"}, "address", "past address 65535"),
        ({"address": "holdng:1"}, "address", "expected TABLE:N"),
        ({"address": "holding:1", "datatype": "float"}, "datatype", "not one of bool"),
        ({"address": "holding:1", "byte_order": "middle"}, "byte_order", "not one of big"),
        ({"address": "holding:1", "unit_id": 300}, "unit_id", "0..247"),
    ],
)
def test_impossible_points_are_refused_naming_the_field(
    kwargs: dict[str, object], field: str, hint: str
) -> None:
    with pytest.raises(PointError) as err:
        ModbusPoint("p", **kwargs)  # type: ignore[arg-type]
    assert err.value.field == field
    assert hint in str(err.value)
    # The config loader catches ValueError too; the driver's own callers catch DriverError.
    assert isinstance(err.value, ValueError) and isinstance(err.value, ConfigurationError)


@pytest.mark.parametrize(
    ("address", "datatype"),
    [
        ("coil:1", DataType.BOOL),
        ("discrete:1", DataType.BOOL),
        ("holding:1.4", DataType.BOOL),
        ("holding:1", DataType.UINT16),
        ("input:9", DataType.UINT16),
    ],
)
def test_datatype_defaults_by_address(address: str, datatype: DataType) -> None:
    assert ModbusPoint("p", address).datatype is datatype


def test_point_fills_device_default_orders() -> None:
    p = ModbusPoint("p", "holding:0", "float32", word_order="little")
    f = p.format(byte_order="little", word_order="big")
    assert (f.byte_order, f.word_order) == (LITTLE, LITTLE)
    assert ModbusPoint("s", "holding:0", "string", length=5).span == 3
