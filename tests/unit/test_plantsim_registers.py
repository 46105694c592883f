"""Register encoding of the simulator's maps, checked against pymodbus's own converters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pymodbus.client.mixin import ModbusClientMixin

from plantsim import MeterModel, TankModel
from plantsim.modbus.codec import Point, RegisterMap, decode, encode
from plantsim.modbus.maps import TANK_TAG, meter_map, tank_map

DT = ModbusClientMixin.DATATYPE
README = Path(__file__).parents[2] / "hardware-sim" / "README.md"


def pymodbus_decode(words, datatype, word_order):
    return ModbusClientMixin.convert_from_registers(
        words, DT.__members__[datatype.upper()], word_order
    )


@pytest.mark.parametrize(
    ("datatype", "value", "big"),
    [
        ("float32", 1.0, [0x3F80, 0x0000]),
        ("float32", -2.5, [0xC020, 0x0000]),
        ("float64", 1.0, [0x3FF0, 0, 0, 0]),
        ("uint32", 0x0001_0002, [0x0001, 0x0002]),
        ("int32", -2, [0xFFFF, 0xFFFE]),
    ],
)
@pytest.mark.parametrize("word_order", ["big", "little"])
def test_multi_register_values_in_both_word_orders(datatype, value, big, word_order):
    point = Point("input", 0, datatype, "x")
    words = encode(point, value, word_order)
    assert words == (big if word_order == "big" else big[::-1])
    assert decode(point, words, word_order) == value
    assert pymodbus_decode(words, datatype, word_order) == value


@pytest.mark.parametrize("word_order", ["big", "little"])
@pytest.mark.parametrize("value", [123_456.789_012_345, 0.1, 1e-300])
def test_float64_round_trips_bit_exactly_through_pymodbus(word_order, value):
    point = Point("input", 2, "float64", "energy")
    words = encode(point, value, word_order)
    assert ModbusClientMixin.convert_to_registers(value, DT.FLOAT64, word_order) == words
    assert pymodbus_decode(words, "float64", word_order) == value


def test_string_tag_is_nul_padded_ascii_two_chars_per_register():
    point = Point("holding", 10, "string", length=16, const=TANK_TAG)
    words = encode(point, TANK_TAG)
    assert len(words) == 8
    assert words[:4] == [0x5441, 0x4E4B, 0x2D30, 0x3100]  # "TA" "NK" "-0" "1\0"
    assert words[4:] == [0, 0, 0, 0]
    assert pymodbus_decode(words, "string", "big") == TANK_TAG
    with pytest.raises(ValueError, match="longer than 16"):
        encode(point, "X" * 17)


def test_run_hours_are_uint32_tenths_big_word_order():
    found = tank_map().at("holding", 20)
    assert found is not None
    point = found[0]
    assert point.word_order is not None
    words = encode(point, 70_000.04, point.word_order)  # raw 700000 = 0x000A_AE60
    assert words == [0x000A, 0xAE60]
    assert pymodbus_decode(words, "uint32", "big") == 700_000


@pytest.mark.parametrize(
    ("datatype", "scale", "value", "raw"),
    [
        ("uint16", 0.1, 50.0, 500),
        ("uint16", 0.1, 33.34, 333),
        ("int16", 0.1, -5.25, -52),
        ("int16", 0.01, 18.0, 1800),
        ("int16", 0.001, 0.921, 921),
        ("int16", 0.01, 1000.0, 32767),  # a transmitter pins at its limit, it does not wrap
        ("uint16", 1.0, -3.0, 0),
    ],
)
def test_scaled_integers_round_and_saturate(datatype, scale, value, raw):
    point = Point("input", 0, datatype, "x", scale=scale)
    words = encode(point, value)
    assert pymodbus_decode(words, datatype, "big") == raw


def test_alarm_bits_pack_into_one_register_bit_0_first():
    rmap = tank_map()
    base = TankModel().signals()
    for high, low, word in [(False, False, 0), (True, False, 1), (False, True, 2)]:
        image = rmap.build_image({**base, "high_alarm": high, "low_alarm": low})
        assert image.registers["input"][5] == word


def test_tank_image_decodes_back_to_the_model():
    model = TankModel(seed=9)
    model.step(10.0)
    s = model.signals()
    image = tank_map().build_image(s)
    h, i = image.registers["holding"], image.registers["input"]
    assert sorted(h) == [0, *range(10, 18), 20, 21]
    assert sorted(i) == list(range(7))
    assert h[0] == round(s["valve_pct"] * 10)
    assert pymodbus_decode([h[a] for a in range(10, 18)], "string", "big") == "TANK-01"
    assert pymodbus_decode([h[20], h[21]], "uint32", "big") == round(s["run_hours"] * 10)
    assert pymodbus_decode([i[0], i[1]], "float32", "big") == pytest.approx(s["level"], rel=1e-6)
    assert pymodbus_decode([i[2]], "int16", "big") == round(s["outlet_flow"] * 100)
    vib = pymodbus_decode([i[3], i[4]], "float32", "big")
    assert vib == pytest.approx(s["vibration"], rel=1e-6)
    assert pymodbus_decode([i[6]], "int16", "big") == round(s["water_temp"] * 10)
    assert image.bits["coil"] == {0: True}
    assert image.bits["discrete"] == {0: False, 1: False}


@pytest.mark.parametrize("word_order", ["big", "little"])
def test_meter_image_decodes_back_to_the_model(word_order):
    model = MeterModel(seed=9)
    model.step(10.0)
    s = model.signals()
    i = meter_map(word_order).build_image(s).registers["input"]
    words = [i[a] for a in range(10)]
    power = pymodbus_decode(words[0:2], "float32", word_order)
    assert power == pytest.approx(s["power"], rel=1e-6)
    assert pymodbus_decode(words[2:6], "float64", word_order) == s["energy"]
    assert pymodbus_decode(words[6:8], "float32", word_order) == pytest.approx(s["demand"], 1e-6)
    assert pymodbus_decode([words[8]], "uint16", "big") == round(s["voltage"] * 10)
    assert pymodbus_decode([words[9]], "int16", "big") == round(s["power_factor"] * 1000)
    holding = meter_map(word_order).build_image(s).registers["holding"]
    assert holding == {100: 15}


def test_a_map_rejects_overlapping_points():
    with pytest.raises(ValueError, match="overlaps"):
        RegisterMap([Point("input", 0, "float32", "a"), Point("input", 1, "int16", "b")])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"table": "input", "datatype": "bool"}, "coil/discrete"),
        ({"table": "coil", "datatype": "uint16"}, "coil/discrete"),
        ({"table": "input", "datatype": "uint16", "writable": True}, "read-only"),
        ({"table": "holding", "datatype": "string", "length": 3}, "even"),
        ({"table": "holding", "datatype": "float16"}, "unknown datatype"),
    ],
)
def test_a_point_rejects_what_cannot_be_encoded(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Point(address=0, signal="x", **kwargs)


def _readme_rows(section: str) -> set[tuple[str, int]]:
    text = README.read_text(encoding="utf-8")
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = set()
    for m in re.finditer(r"^\| (coil|discrete|holding|input) \| (\d+)", body, re.M):
        rows.add((m.group(1), int(m.group(2))))
    return rows


@pytest.mark.parametrize(
    ("section", "rmap"),
    [("Cooling-water tank", tank_map()), ("Energy meter", meter_map())],
)
def test_readme_register_tables_match_the_maps(section, rmap):
    assert _readme_rows(section) == {(p.table, p.address) for p in rmap.points}
