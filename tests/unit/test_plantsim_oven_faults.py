"""The oven's faults and node map, and its fault commands; no server is started."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from plantsim import OpcuaFaults, OvenDevice, Plant, TankDevice
from plantsim.control import FaultSpecError, apply_fault, parse_fault
from plantsim.faults import Value, status_code, status_name
from plantsim.opcua.nodes import CELSIUS, PERCENT, NodeMap, NodeSpec, bench_identifier, oven_map

README = Path(__file__).parents[2] / "hardware-sim" / "README.md"
BAD_SENSOR = 0x808C0000
VALUES: dict[str, Value] = {"temperature": 180.0, "mode": "AUTO", "running": True, "batch_count": 7}


@pytest.fixture
def faults() -> OpcuaFaults:
    f = OpcuaFaults(VALUES, seed=1)
    f.apply(VALUES)
    return f


@pytest.mark.parametrize(
    "status", ["BadSensorFailure", BAD_SENSOR, "0x808C0000", str(BAD_SENSOR), " BadSensorFailure "]
)
def test_status_codes_by_name_or_number(status):
    assert status_code(status) == BAD_SENSOR
    assert status_name(BAD_SENSOR) == "BadSensorFailure"


@pytest.mark.parametrize("status", ["BadSensorFalure", "0x12345678", -1, 2**32, "good"])
def test_unknown_status_codes_are_refused(status):
    with pytest.raises(ValueError, match="unknown OPC UA status"):
        status_code(status)


def test_bad_status_is_per_signal_until_removed_or_cleared(faults):
    assert faults.status_of("temperature") == 0 and faults.statuses() == {}
    faults.bad_status("temperature", "BadSensorFailure")
    faults.bad_status("mode", "UncertainLastUsableValue")
    assert faults.status_of("temperature") == BAD_SENSOR
    assert faults.active()["bad_status"] == {
        "mode": "UncertainLastUsableValue",
        "temperature": "BadSensorFailure",
    }
    # A status changes how a value is served, not the value the faults hand on.
    assert faults.apply(VALUES) == VALUES
    faults.bad_status("mode", "ignored", on=False)
    assert faults.statuses() == {"temperature": BAD_SENSOR}
    faults.clear()
    assert faults.statuses() == {} and faults.active() == {}


def test_bad_status_checks_the_signal(faults):
    with pytest.raises(KeyError, match="unknown signal 'temp'"):
        faults.bad_status("temp", "BadSensorFailure")


def test_oven_faults_refuse_garbage_and_numeric_faults_on_text(faults):
    with pytest.raises(ValueError, match="not available on an OPC UA device"):
        faults.garbage(True)
    faults.garbage(False)
    with pytest.raises(ValueError, match="text signal"):
        faults.spike("mode", 1.0, 1.0)
    with pytest.raises(ValueError, match="boolean signal"):
        faults.noise("running", 1.0)
    faults.freeze("mode")
    assert faults.apply({**VALUES, "mode": "OFF"})["mode"] == "AUTO"
    faults.spike("batch_count", 2, 10.0)
    assert faults.apply(VALUES)["batch_count"] == 9


async def test_oven_fault_commands():
    oven = OvenDevice(seed=1, tick_hz=0)
    devices = {"oven": oven, "tank": TankDevice(seed=1, tick_hz=0)}
    await apply_fault(parse_fault("oven:bad_status:temperature,BadSensorFailure"), devices)
    await apply_fault(parse_fault("oven:bad_status:ambient,0x808C0000"), devices)
    assert oven.faults.statuses() == {"temperature": BAD_SENSOR, "ambient": BAD_SENSOR}
    await apply_fault(parse_fault("oven:bad_status:ambient,BadSensorFailure,off"), devices)
    assert oven.faults.statuses() == {"temperature": BAD_SENSOR}
    line = await apply_fault(parse_fault("oven:clear"), devices)
    assert oven.faults.statuses() == {} and "active: {}" in line
    for bad in [
        "oven:garbage",
        "oven:exception:4",
        "oven:bad_status:temperature",
        "oven:bad_status:temperature,BadNonsense",
        "oven:bad_status:nope,BadSensorFailure",
        "tank:bad_status:level,BadSensorFailure",
        "oven:stop",  # not started
    ]:
        with pytest.raises(FaultSpecError):
            await apply_fault(parse_fault(bad), devices)


def test_plant_has_an_oven_only_with_a_plc_port():
    assert Plant(seed=1).oven is None
    assert set(Plant(seed=1).devices) == {"tank", "meter"}
    plant = Plant(seed=1, plc_port=0, plc_extra_signals=3)
    assert plant.oven is not None and set(plant.devices) == {"tank", "meter", "oven"}
    assert plant.oven.endpoint.startswith("opc.tcp://127.0.0.1:")
    assert plant.oven.endpoint.endswith("/plantsim/oven")
    assert plant.oven.node_id("heater_setpoint") == "ns=2;s=Oven1.HeaterSetpoint"
    assert plant.oven.bench_node_id(2) == "ns=2;s=Bench.Signal00002"


def test_oven_device_options_are_checked():
    with pytest.raises(ValueError, match="unknown security policy 'Basic999'"):
        OvenDevice(security=["None", "Basic999"])
    with pytest.raises(ValueError, match="extra_signals"):
        OvenDevice(extra_signals=-1)
    with pytest.raises(ValueError, match="extra_rate_hz"):
        OvenDevice(extra_signals=1, extra_rate_hz=-1)
    assert len(OvenDevice(security=True).server.policies) == 3


def test_units_are_packed_as_opc_ua_part_8_says():
    # The worked example of OPC UA Part 8, 5.6.3: CEL → 4408652.
    assert CELSIUS.unit_id == 4408652
    assert PERCENT.unit_id == 0x5031


def test_node_specs_refuse_what_cannot_be_served():
    with pytest.raises(ValueError, match="datatype"):
        NodeSpec("X", "x", "Float")
    with pytest.raises(ValueError, match="analog"):
        NodeSpec("X", "x", "UInt32", unit=CELSIUS, eu_range=(0, 1))
    with pytest.raises(ValueError, match="both"):
        NodeSpec("X", "x", "Double", unit=CELSIUS)
    with pytest.raises(ValueError, match="duplicate names"):
        NodeMap("O", (NodeSpec("X", "x", "Double"), NodeSpec("X", "y", "Double")))
    with pytest.raises(ValueError, match="outside"):
        bench_identifier(100_000)


def test_readme_node_table_matches_the_map():
    text = README.read_text(encoding="utf-8")
    body = text.split("## Curing oven (OPC UA)", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(
        r"^\| `ns=2;s=([\w.]+)` \| (\w+) \| ([^|]+) \| ([^|]+) \| (yes|no) \|", body, re.M
    )
    documented = {
        (node, datatype, unit.strip(), rng.strip(), writable == "yes")
        for node, datatype, unit, rng, writable in rows
    }
    m = oven_map()
    expected = set()
    for spec in m.nodes:
        unit = spec.unit.display if spec.unit else "—"
        rng = f"{spec.eu_range[0]:g}..{spec.eu_range[1]:g}" if spec.eu_range else "—"
        expected.add((m.identifier(spec), spec.datatype, unit, rng, spec.writable))
    assert documented == expected
