"""The `ignore_writes` fault: a Modbus device that acknowledges a write and keeps its old value.

Through `ModbusServer.respond` on a tank that is not started: the PDUs a client would send, the
answers it would get, and what reading back shows; no sockets.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from plantsim import ModbusFaults, OpcuaFaults, TankDevice
from plantsim.control import FaultSpecError, apply_fault, parse_fault
from plantsim.modbus.pdu import Frame

VALVE = 0  # holding:0, the inlet valve in tenths of a percent (hardware-sim/README.md)
PUMP = 0  # coil:0


@pytest.fixture
def tank() -> TankDevice:
    return TankDevice(seed=1, tick_hz=0)


def ask(tank: TankDevice, pdu: str) -> bytes:
    answer = tank.server.respond(Frame(1, bytes.fromhex(pdu)))
    assert answer is not None
    return answer


def write_valve(tank: TankDevice, raw: int) -> bytes:
    return ask(tank, f"06 {VALVE:04x} {raw:04x}")


def read_valve(tank: TankDevice) -> int:
    answer = ask(tank, f"03 {VALVE:04x} 0001")
    return int(struct.unpack(">H", answer[2:4])[0])


def test_a_write_above_the_threshold_is_acknowledged_and_not_applied(tank):
    tank.faults.ignore_writes(above=600, table="holding", addresses=[VALVE])
    assert write_valve(tank, 700) == bytes.fromhex("06 0000 02bc"), "the usual echo"
    assert tank.model.valve_pct == 50.0
    assert read_valve(tank) == 500, "reading back shows the old value"


def test_a_write_at_or_below_the_threshold_goes_through(tank):
    tank.faults.ignore_writes(above=600, table="holding", addresses=[VALVE])
    write_valve(tank, 600)
    assert tank.model.valve_pct == 60.0 and read_valve(tank) == 600
    write_valve(tank, 250)
    assert tank.model.valve_pct == 25.0


def test_without_the_fault_every_accepted_write_applies(tank):
    write_valve(tank, 900)
    assert tank.model.valve_pct == 90.0 and read_valve(tank) == 900


def test_a_multi_register_write_is_ignored_whole():
    faults = ModbusFaults({"x"})
    faults.ignore_writes(above=10, table="holding", addresses=[3])
    assert faults.ignores("holding", 2, [99, 11]), "address 3 gets 11"
    assert not faults.ignores("holding", 2, [99, 10])
    assert not faults.ignores("holding", 3, []), "nothing written, nothing above"


def test_table_and_address_narrow_the_rule(tank):
    tank.faults.ignore_writes(above=0, table="coil", addresses=[PUMP])
    assert not tank.faults.ignores("holding", PUMP, [1])
    assert ask(tank, f"05 {PUMP:04x} 0000") == bytes.fromhex("05 0000 0000")
    assert tank.model.pump_on is False, "0 is not above 0: applied"
    ask(tank, f"05 {PUMP:04x} ff00")
    assert tank.model.pump_on is False, "a coil's True is 1, above 0: ignored"
    write_valve(tank, 1000)
    assert tank.model.valve_pct == 100.0, "another table is untouched"


def test_the_default_ignores_every_write_and_rules_add_up(tank):
    tank.faults.ignore_writes()
    write_valve(tank, 0)
    assert tank.model.valve_pct == 50.0
    tank.faults.clear()
    tank.faults.ignore_writes(above=900, addresses=[VALVE])
    tank.faults.ignore_writes(above=100, table="holding")
    write_valve(tank, 200)
    assert tank.model.valve_pct == 50.0, "the second rule matches"
    assert tank.faults.active()["ignore_writes"] == [(900, None, [VALVE]), (100, "holding", None)]


def test_reads_and_refusals_are_unchanged(tank):
    tank.faults.ignore_writes()
    assert ask(tank, "04 0000 0002")[:2] == bytes.fromhex("04 04"), "reads still answer"
    # An address the device does not have, or a value outside the accepted range, are checked
    # by what the device has, not by the fault: the first is still exception 2.
    assert ask(tank, "06 0063 0001") == bytes.fromhex("86 02")
    tank.faults.exception(4, table="holding")
    assert write_valve(tank, 700) == bytes.fromhex("86 04"), "an exception rule comes first"


def test_clear_removes_the_rules(tank):
    tank.faults.ignore_writes(above=1)
    tank.faults.clear()
    assert "ignore_writes" not in tank.faults.active()
    write_valve(tank, 700)
    assert tank.model.valve_pct == 70.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"above": -2}, "-1..65535"),
        ({"above": 65536}, "-1..65535"),
        ({"above": 1.5}, "whole number"),
        ({"above": True}, "whole number"),
        ({"above": "600"}, "whole number"),
        ({"above": 1, "table": "holdings"}, "table 'holdings'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModbusFaults({"x"}).ignore_writes(**kwargs)


async def test_the_fault_command_sets_the_rule(tank):
    line = await apply_fault(parse_fault("tank:ignore_writes:600,holding,0-1"), {"tank": tank})
    assert "ignore_writes" in line
    assert tank.faults.active()["ignore_writes"] == [(600, "holding", [0, 1])]
    write_valve(tank, 700)
    assert tank.model.valve_pct == 50.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tank:ignore_writes", "missing ABOVE"),
        ("tank:ignore_writes:abc", "not a number"),
        ("tank:ignore_writes:1.5", "whole raw value"),
        ("tank:ignore_writes:inf", "whole raw value"),
        ("tank:ignore_writes:nan", "whole raw value"),
        ("tank:ignore_writes:70000", "-1..65535"),
        ("tank:ignore_writes:1,nope", "table 'nope'"),
        ("tank:ignore_writes:1,holding,x", "address 'x'"),
        ("oven:ignore_writes:1", "no Modbus ignore_writes fault"),
    ],
)
async def test_malformed_fault_commands_are_refused(tank, text, message):
    oven = SimpleNamespace(name="oven", faults=OpcuaFaults({"temperature"}), halted=False)
    devices = {"tank": tank, "oven": oven}
    with pytest.raises(FaultSpecError, match=message):
        await apply_fault(parse_fault(text), devices)
    assert "ignore_writes" not in tank.faults.active()
