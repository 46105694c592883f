"""The simulated devices over real TCP, read and written with pymodbus's plain client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest
from pymodbus import FramerType
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from plantsim import MeterDevice, Plant, TankDevice

DT = AsyncModbusTcpClient.DATATYPE
FRAMERS = {"socket": FramerType.SOCKET, "rtu": FramerType.RTU}


@pytest.fixture
async def tank():
    """A tank that only moves when the test says so (`advance`)."""
    async with TankDevice(seed=1, port=0, tick_hz=0) as device:
        yield device


@pytest.fixture
async def connect():
    """Open pymodbus clients to devices; close them at the end."""
    clients: list[AsyncModbusTcpClient] = []

    async def make(device, framer: str = "socket", wait_s: float = 1.0) -> AsyncModbusTcpClient:
        client = AsyncModbusTcpClient(
            "127.0.0.1", port=device.port, framer=FRAMERS[framer], timeout=wait_s, retries=0
        )
        assert await client.connect()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def value(client, words, datatype, word_order="big"):
    return client.convert_from_registers(words, datatype, word_order=word_order)


async def read_level(client) -> float:
    r = await client.read_input_registers(0, count=2, device_id=1)
    assert not r.isError(), r
    return value(client, r.registers, DT.FLOAT32)


# -- the register maps ------------------------------------------------------------------------


@pytest.mark.parametrize("framer", ["socket", "rtu"])
async def test_tank_serves_every_register_as_the_model_says(framer, connect):
    async with TankDevice(seed=2, port=0, tick_hz=0, framer=framer) as tank:
        tank.advance(30.0)
        s = tank.model.signals()
        c = await connect(tank, framer)
        hr = (await c.read_holding_registers(0, count=1, device_id=1)).registers
        tag = (await c.read_holding_registers(10, count=8, device_id=1)).registers
        hours = (await c.read_holding_registers(20, count=2, device_id=1)).registers
        ir = (await c.read_input_registers(0, count=7, device_id=1)).registers
        coil = (await c.read_coils(0, count=1, device_id=1)).bits[0]
        switches = (await c.read_discrete_inputs(0, count=2, device_id=1)).bits[:2]

    assert hr[0] * 0.1 == pytest.approx(s["valve_pct"])
    assert value(c, tag, DT.STRING) == "TANK-01"
    assert value(c, hours, DT.UINT32) == round(s["run_hours"] * 10)
    assert value(c, ir[0:2], DT.FLOAT32) == pytest.approx(s["level"], rel=1e-6)
    assert value(c, ir[2:3], DT.INT16) == round(s["outlet_flow"] * 100)
    assert value(c, ir[3:5], DT.FLOAT32) == pytest.approx(s["vibration"], rel=1e-6)
    assert ir[5] == int(s["high_alarm"]) | int(s["low_alarm"]) << 1
    assert value(c, ir[6:7], DT.INT16) == round(s["water_temp"] * 10)
    assert coil is s["pump_on"] is True
    assert switches == [s["high_switch"], s["low_switch"]]


@pytest.mark.parametrize("word_order", ["little", "big"])
async def test_meter_serves_every_register_as_the_model_says(word_order, connect):
    async with MeterDevice(seed=2, port=0, tick_hz=0, word_order=word_order) as meter:
        meter.advance(120.0)
        s = meter.model.signals()
        c = await connect(meter)
        ir = (await c.read_input_registers(0, count=10, device_id=1)).registers
        window = (await c.read_holding_registers(100, count=1, device_id=1)).registers[0]

    assert value(c, ir[0:2], DT.FLOAT32, word_order) == pytest.approx(s["power"], rel=1e-6)
    assert value(c, ir[2:6], DT.FLOAT64, word_order) == s["energy"]
    assert value(c, ir[6:8], DT.FLOAT32, word_order) == pytest.approx(s["demand"], rel=1e-6)
    assert ir[8] == round(s["voltage"] * 10)
    assert value(c, ir[9:10], DT.INT16) == round(s["power_factor"] * 1000)
    assert window == 15


async def test_meter_word_order_really_differs_on_the_wire(connect):
    words = {}
    for order in ("little", "big"):
        async with MeterDevice(seed=3, port=0, tick_hz=0, word_order=order) as meter:
            c = await connect(meter)
            words[order] = (await c.read_input_registers(0, count=2, device_id=1)).registers
    assert words["little"] == words["big"][::-1]


# -- writes -----------------------------------------------------------------------------------


async def test_valve_and_pump_writes_drive_the_physics(tank, connect):
    c = await connect(tank)
    assert not (await c.write_register(0, 1000, device_id=1)).isError()
    assert not (await c.write_coil(0, False, device_id=1)).isError()
    assert (tank.model.valve_pct, tank.model.pump_on) == (100.0, False)
    assert (await c.read_holding_registers(0, count=1, device_id=1)).registers == [1000]
    before = await read_level(c)
    tank.advance(60.0)
    assert await read_level(c) > before + 0.5

    # The multi-write function codes reach the same points.
    assert not (await c.write_registers(0, [0], device_id=1)).isError()
    assert not (await c.write_coils(0, [True], device_id=1)).isError()
    assert (tank.model.valve_pct, tank.model.pump_on) == (0.0, True)
    before = await read_level(c)
    tank.advance(60.0)
    assert await read_level(c) < before


async def test_the_clock_steps_the_physics_in_wall_time(connect):
    async with TankDevice(seed=1, port=0, tick_hz=20, speed=600) as tank:
        c = await connect(tank)
        await c.write_coil(0, False, device_id=1)
        await c.write_register(0, 1000, device_id=1)
        before = await read_level(c)
        await asyncio.sleep(0.5)
        # ≈ 300 plant seconds at 45 m/h: well over 1 m, however the ticks fell.
        assert await read_level(c) > before + 1.0


async def test_meter_demand_window_is_writable(connect):
    async with MeterDevice(seed=1, port=0, tick_hz=0) as meter:
        c = await connect(meter)
        assert not (await c.write_register(100, 5, device_id=1)).isError()
        assert meter.model.demand_window_min == 5
        assert (await c.read_holding_registers(100, count=1, device_id=1)).registers == [5]


@pytest.mark.parametrize(
    ("device_type", "address", "raw"),
    [(TankDevice, 0, 1001), (MeterDevice, 100, 0), (MeterDevice, 100, 61)],
)
async def test_writes_outside_the_accepted_range_get_exception_3(
    device_type, address, raw, connect
):
    async with device_type(seed=1, port=0, tick_hz=0) as device:
        c = await connect(device)
        before = device.model.signals()
        r = await c.write_register(address, raw, device_id=1)
        assert r.isError() and r.exception_code == 3
        assert device.model.signals() == before


@pytest.mark.parametrize(
    "request_",
    [
        lambda c: c.read_holding_registers(1, count=1, device_id=1),  # hole in the map
        lambda c: c.read_holding_registers(0, count=2, device_id=1),  # runs into the hole
        lambda c: c.read_input_registers(7, count=1, device_id=1),
        lambda c: c.read_coils(1, count=1, device_id=1),
        lambda c: c.read_discrete_inputs(0, count=3, device_id=1),
        lambda c: c.write_register(10, 1, device_id=1),  # the tag is read-only
        lambda c: c.write_register(5, 1, device_id=1),
    ],
)
async def test_unmapped_or_read_only_addresses_get_exception_2(request_, tank, connect):
    c = await connect(tank)
    r = await request_(c)
    assert r.isError() and r.exception_code == 2


async def test_a_meter_has_no_coils(connect):
    async with MeterDevice(seed=1, port=0, tick_hz=0) as meter:
        c = await connect(meter)
        r = await c.read_coils(0, count=1, device_id=1)
        assert r.isError() and r.exception_code == 2


async def test_other_unit_ids_are_not_answered_as_unit_1(tank, connect):
    c = await connect(tank)
    r = await c.read_input_registers(0, count=2, device_id=7)
    assert r.isError() and r.exception_code == 11
    async with TankDevice(seed=1, port=0, tick_hz=0, framer="rtu") as rtu_tank:
        c = await connect(rtu_tank, "rtu", wait_s=0.3)
        # An RTU slave stays silent for another address.
        with pytest.raises(ModbusException):
            await c.read_input_registers(0, count=2, device_id=7)


# -- faults -----------------------------------------------------------------------------------


async def _closed_by_peer(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(100), 1.0) == b""
    except ConnectionResetError:
        return True


async def test_refuse_closes_new_connections_but_keeps_the_port(tank, connect):
    c = await connect(tank)
    tank.faults.refuse(True)
    reader, writer = await asyncio.open_connection("127.0.0.1", tank.port)
    assert await _closed_by_peer(reader)
    writer.close()
    # Still bound: nobody else can take the port meanwhile.
    with socket.socket() as other, pytest.raises(OSError):
        other.bind(("127.0.0.1", tank.port))
    # A connection made before keeps working.
    assert not (await c.read_input_registers(0, count=2, device_id=1)).isError()
    tank.faults.refuse(False)
    reader, writer = await asyncio.open_connection("127.0.0.1", tank.port)
    writer.write(bytes.fromhex("0001 0000 0006 01 04 0000 0002"))
    assert len(await asyncio.wait_for(reader.read(100), 1.0)) == 13
    writer.close()


async def test_refuse_fails_a_pymodbus_client(tank):
    tank.faults.refuse(True)
    client = AsyncModbusTcpClient(
        "127.0.0.1", port=tank.port, timeout=0.3, retries=0, reconnect_delay=0
    )
    try:
        await client.connect()
        with pytest.raises(ModbusException):
            await client.read_input_registers(0, count=2, device_id=1)
    finally:
        client.close()


async def test_drop_connections_closes_every_client(tank):
    streams = [await asyncio.open_connection("127.0.0.1", tank.port) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert tank.drop_connections() == 2
    for reader, writer in streams:
        assert await _closed_by_peer(reader)
        writer.close()
    assert tank.server.connections == 0
    # The listener is untouched: reconnecting works at once.
    _, writer = await asyncio.open_connection("127.0.0.1", tank.port)
    writer.close()


async def test_a_pymodbus_client_sees_the_drop_and_reconnects(tank):
    client = AsyncModbusTcpClient(
        "127.0.0.1", port=tank.port, timeout=1.0, retries=0, reconnect_delay=2.0
    )
    try:
        assert await client.connect()
        assert tank.faults.drop_connections() == 1
        await asyncio.sleep(0.05)
        assert not client.connected
        with pytest.raises(ModbusException):
            await client.read_input_registers(0, count=2, device_id=1)
        # The device takes it back at once.
        assert await client.connect()
        assert not (await client.read_input_registers(0, count=2, device_id=1)).isError()
        assert tank.server.connections == 1
    finally:
        client.close()


async def test_restart_comes_back_on_the_same_port(tank, connect):
    port = tank.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.sleep(0.05)
    restart = asyncio.create_task(tank.restart(downtime=0.4))
    assert await _closed_by_peer(reader)
    writer.close()
    await asyncio.sleep(0.1)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    await restart
    assert tank.port == port
    c = await connect(tank)
    assert not (await c.read_input_registers(0, count=2, device_id=1)).isError()


async def test_restart_without_downtime_rebinds_at_once(tank, connect):
    c = await connect(tank)
    await c.read_input_registers(0, count=2, device_id=1)
    for _ in range(3):
        await tank.faults.restart()
    c2 = await connect(tank)
    assert not (await c2.read_input_registers(0, count=2, device_id=1)).isError()


async def test_exception_fault_answers_with_the_code(tank, connect):
    c = await connect(tank)
    tank.faults.exception(4)
    r = await c.read_holding_registers(0, count=1, device_id=1)
    assert r.isError() and r.exception_code == 4
    r = await c.write_register(0, 100, device_id=1)
    assert r.isError() and r.exception_code == 4
    assert tank.model.valve_pct == 50.0
    tank.faults.clear()
    tank.faults.exception(6, table="input", addresses=[3])
    r = await c.read_input_registers(3, count=2, device_id=1)
    assert r.isError() and r.exception_code == 6
    assert not (await c.read_input_registers(0, count=2, device_id=1)).isError()
    assert not (await c.read_holding_registers(0, count=1, device_id=1)).isError()
    tank.faults.clear()
    assert not (await c.read_input_registers(0, count=7, device_id=1)).isError()


async def test_freeze_holds_a_register_while_the_physics_moves(tank, connect):
    c = await connect(tank)
    tank.model.valve_pct, tank.model.pump_on = 100.0, False
    held = await read_level(c)
    tank.faults.freeze("level")
    tank.advance(120.0)
    assert tank.model.level_m > held + 1.0
    assert await read_level(c) == held
    tank.faults.freeze("level", False)
    assert await read_level(c) == pytest.approx(tank.model.level_m, rel=1e-6)


async def test_spike_shows_in_the_register_then_ends(tank, connect):
    c = await connect(tank)
    tank.faults.spike("level", 1.0, duration_s=0.3)
    assert await read_level(c) == pytest.approx(tank.model.level_m + 1.0, rel=1e-6)
    await asyncio.sleep(0.35)
    tank.advance(0.0)
    assert await read_level(c) == pytest.approx(tank.model.level_m, rel=1e-6)


async def test_noise_scatters_a_register_around_the_model(tank, connect):
    c = await connect(tank)
    tank.faults.noise("level", 0.5)
    readings = []
    for _ in range(30):
        tank.advance(0.0)
        readings.append(await read_level(c) - tank.model.level_m)
    assert max(readings) - min(readings) > 0.5
    assert abs(sum(readings) / len(readings)) < 0.5


async def test_slow_delays_every_response(tank, connect):
    c = await connect(tank)
    tank.faults.slow(0.3)
    t0 = time.monotonic()
    assert not (await c.read_input_registers(0, count=2, device_id=1)).isError()
    r = await c.read_holding_registers(1, count=1, device_id=1)
    assert r.isError()  # exception responses are just as slow
    assert time.monotonic() - t0 >= 0.5


@pytest.mark.parametrize("framer", ["socket", "rtu"])
async def test_garbage_gives_the_client_an_error_then_recovers(framer, connect):
    async with TankDevice(seed=1, port=0, tick_hz=0, framer=framer) as tank:
        c = await connect(tank, framer, wait_s=0.4)
        tank.faults.garbage(True)
        with pytest.raises(ModbusException):
            await c.read_input_registers(0, count=2, device_id=1)
        tank.faults.garbage(False)
        for _ in range(40):
            with contextlib.suppress(ModbusException):
                if not (await c.read_input_registers(0, count=2, device_id=1)).isError():
                    break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("no good read after garbage was switched off")


async def test_garbage_is_malformed_on_the_wire(tank):
    tank.faults.garbage(True)
    reader, writer = await asyncio.open_connection("127.0.0.1", tank.port)
    writer.write(bytes.fromhex("0001 0000 0006 01 04 0000 0002"))
    frame = await asyncio.wait_for(reader.read(100), 1.0)
    writer.close()
    assert frame[:7] == bytes.fromhex("0001 0000 0007 01")  # the envelope is intact...
    assert frame[7] not in (0x04, 0x84)  # ...its content is not a response


# -- the plant --------------------------------------------------------------------------------


async def test_plant_starts_both_devices_on_free_ports(connect):
    async with Plant(seed=5, tick_hz=0) as plant:
        assert set(plant.devices) == {"tank", "meter"}
        assert plant.tank.port != plant.meter.port
        assert plant.meter.word_order == "little"
        for device in plant.devices.values():
            c = await connect(device)
            assert not (await c.read_input_registers(0, count=2, device_id=1)).isError()
    for device in plant.devices.values():
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", device.port)


async def test_a_device_restarts_on_a_port_given_explicitly():
    async with TankDevice(seed=1, port=0, tick_hz=0) as first:
        port = first.port
    async with TankDevice(seed=1, port=port, tick_hz=0) as second:
        assert second.port == port
        await second.restart()
        assert second.port == port
