"""Fault switches and the text commands that flip them; a fake clock, no sockets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tests_support import FakeClock

from plantsim import Faults, ModbusFaults, OpcuaFaults, TankDevice
from plantsim.control import FaultSpecError, apply_fault, parse_fault

README = Path(__file__).parents[2] / "hardware-sim" / "README.md"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def faults(clock) -> ModbusFaults:
    f = ModbusFaults({"level", "flow", "pump_on"}, seed=1, clock=clock)
    f.apply({"level": 2.0, "flow": 10.0, "pump_on": True})
    return f


VALUES = {"level": 2.0, "flow": 10.0, "pump_on": True}


def test_no_fault_passes_values_through(faults):
    assert faults.apply(VALUES) == VALUES


def test_spike_adds_delta_until_it_expires(faults, clock):
    faults.spike("level", 1.5, duration_s=2.0)
    assert faults.apply(VALUES)["level"] == 3.5
    clock.now += 1.9
    assert faults.apply(VALUES)["level"] == 3.5
    clock.now += 0.2
    assert faults.apply(VALUES)["level"] == 2.0
    assert "spike" not in faults.active()


def test_freeze_holds_the_value_served_when_frozen(faults):
    faults.freeze("level")
    assert faults.apply({**VALUES, "level": 4.0})["level"] == 2.0
    faults.freeze("pump_on")
    assert faults.apply({**VALUES, "pump_on": False})["pump_on"] is True
    faults.freeze("level", False)
    assert faults.apply({**VALUES, "level": 4.0})["level"] == 4.0


def test_freeze_at_a_value_holds_a_reading_of_its_own(faults):
    # A transmitter stuck reading high while the water is elsewhere.
    faults.freeze("level", value=4.4)
    assert faults.apply({**VALUES, "level": 2.5})["level"] == 4.4
    assert faults.active()["freeze"] == ["level"]
    faults.freeze("level", False)
    assert faults.apply({**VALUES, "level": 2.5})["level"] == 2.5


def test_freeze_at_a_number_is_refused_on_a_switch(faults):
    with pytest.raises(ValueError, match="boolean"):
        faults.freeze("pump_on", value=1.5)
    faults.freeze("pump_on", value=False)
    assert faults.apply(VALUES)["pump_on"] is False


def test_noise_is_gaussian_with_the_given_sigma_and_seeded(clock):
    def draws(seed):
        f = Faults({"level"}, seed=seed, clock=clock)
        f.noise("level", 0.5)
        return [f.apply({"level": 2.0})["level"] for _ in range(2000)]

    values = draws(1)
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    assert mean == pytest.approx(2.0, abs=0.05)
    assert sd == pytest.approx(0.5, rel=0.1)
    assert values == draws(1) and values != draws(2)


def test_signal_faults_check_the_signal(faults):
    with pytest.raises(KeyError, match=r"unknown signal 'lvl'.*level"):
        faults.spike("lvl", 1.0, 1.0)
    with pytest.raises(ValueError, match="boolean"):
        faults.noise("pump_on", 1.0)
    with pytest.raises(ValueError, match="positive"):
        faults.spike("level", 1.0, 0.0)


def test_exception_rules_match_table_and_addresses(faults):
    assert faults.exception_for("input", 0, 10) is None
    faults.exception(2, table="input", addresses=[3])
    assert faults.exception_for("input", 0, 3) is None
    assert faults.exception_for("input", 2, 2) == 2
    assert faults.exception_for("holding", 3, 1) is None
    faults.exception(6)
    assert faults.exception_for("holding", 0, 1) == 6
    faults.clear()
    assert faults.exception_for("input", 3, 1) is None
    with pytest.raises(ValueError, match="table"):
        faults.exception(4, table="inputs")


def test_clear_turns_everything_off(faults):
    faults.refuse(True)
    faults.slow(0.5)
    faults.garbage(True)
    faults.freeze("level")
    faults.noise("flow", 1.0)
    faults.exception(4)
    assert set(faults.active()) == {"refuse", "slow", "garbage", "freeze", "noise", "exception"}
    faults.clear()
    assert faults.active() == {}
    assert (faults.refusing, faults.delay_s, faults.garbled) == (False, 0.0, False)


def test_link_faults_need_a_device():
    with pytest.raises(RuntimeError, match="not attached"):
        Faults({"x"}).drop_connections()


@pytest.mark.parametrize(
    ("text", "device", "fault", "args", "delay"),
    [
        ("tank:clear", "tank", "clear", (), 0.0),
        ("tank:spike:level,1.0,10", "tank", "spike", ("level", "1.0", "10"), 0.0),
        (
            "meter:exception:4,input,0-1,5@30",
            "meter",
            "exception",
            ("4", "input", "0-1", "5"),
            30.0,
        ),
    ],
)
def test_fault_commands_parse(text, device, fault, args, delay):
    command = parse_fault(text)
    assert (command.device, command.fault, command.args, command.delay_s) == (
        device,
        fault,
        args,
        delay,
    )


@pytest.mark.parametrize("text", ["tank", ":spike", "tank:spike@soon"])
def test_malformed_fault_commands_are_refused(text):
    with pytest.raises(FaultSpecError):
        parse_fault(text)


async def test_fault_commands_flip_the_device_switches():
    tank = TankDevice(seed=1, tick_hz=0)
    devices = {"tank": tank}
    await apply_fault(parse_fault("tank:exception:4,input,0-1,5"), devices)
    f = tank.faults
    assert [f.exception_for("input", a, 1) for a in range(7)] == [4, 4, None, None, None, 4, None]
    await apply_fault(parse_fault("tank:refuse"), devices)
    await apply_fault(parse_fault("tank:slow:0.25"), devices)
    await apply_fault(parse_fault("tank:freeze:level,on"), devices)
    assert f.refusing and f.delay_s == 0.25 and f.active()["freeze"] == ["level"]
    await apply_fault(parse_fault("tank:refuse:off"), devices)
    assert not f.refusing
    await apply_fault(parse_fault("tank:freeze:level,4.4"), devices)
    assert tank.served["level"] == 4.4, "stuck at a reading of its own"
    await apply_fault(parse_fault("tank:freeze:level,off"), devices)
    assert tank.served["level"] == tank.model.level_m
    for bad in [
        "pump:clear",
        "tank:explode",
        "tank:freeze:level,high",
        "tank:freeze:pump_on,1.5",
        "tank:spike:level,1",
        "tank:noise:nope,1",
        "tank:garbage:maybe",
    ]:
        with pytest.raises(FaultSpecError):
            await apply_fault(parse_fault(bad), devices)


def test_readme_lists_every_fault_switch():
    text = README.read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(\w+)\(", text, re.M))
    switches = {
        "drop_connections",
        "refuse",
        "stop",
        "start",
        "restart",
        "exception",
        "ignore_writes",
        "bad_status",
        "shutdown_notice",
        "freeze",
        "spike",
        "noise",
        "slow",
        "garbage",
        "clear",
    }
    assert documented == switches
    for name in switches:
        assert callable(getattr(ModbusFaults, name, None) or getattr(OpcuaFaults, name))
