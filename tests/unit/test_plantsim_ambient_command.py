"""`oven:ambient:OFFSET`: the command `opstwin demo` sends to warm the oven's hall."""

from __future__ import annotations

import pytest

from plantsim import OvenDevice, TankDevice
from plantsim.control import FaultSpecError, apply_fault, parse_fault


async def test_the_hall_warms_the_oven_and_cools_back():
    oven = OvenDevice(seed=7, tick_hz=0)
    devices = {"oven": oven}
    before = oven.model.steady_state_c()
    said = await apply_fault(parse_fault("oven:ambient:10"), devices)
    assert "ambient(10) applied" in said
    oven.model.step(0.1)
    assert oven.model.steady_state_c() == pytest.approx(before + 10.0, abs=0.01)
    await apply_fault(parse_fault("oven:ambient:0"), devices)
    assert oven.model.ambient_offset_c == 0.0


@pytest.mark.parametrize(
    "text",
    [
        "oven:ambient",  # no offset
        "oven:ambient:warm",
        "oven:ambient:nan",
        "oven:ambient:inf",
        "oven:ambient:-1e9",
        "oven:ambient:40.5",
        "tank:ambient:5",  # the tank has no hall to warm
    ],
)
async def test_a_bad_ambient_command_is_refused_and_changes_nothing(text):
    oven = OvenDevice(seed=7, tick_hz=0)
    with pytest.raises(FaultSpecError):
        await apply_fault(parse_fault(text), {"oven": oven, "tank": TankDevice(seed=1, tick_hz=0)})
    assert oven.model.ambient_offset_c == 0.0
