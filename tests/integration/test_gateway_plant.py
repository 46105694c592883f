"""The whole path over real TCP: simulated plant → Modbus driver → twin → SQLite (and HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator

import pytest
from tests_support import eventually, plant_config

from drivers.contract import Quality
from gateway.app import Gateway
from gateway.errors import DeviceError, StoreError
from gateway.http import create_app
from gateway.twin.history import HistoryReader
from gateway.twin.store import TwinStore, load_current
from plantsim import MeterDevice, TankDevice

LEVEL = "utilities/cooling/tank1/level"
VALVE = "utilities/cooling/tank1/inlet_valve"
VIBRATION = "utilities/cooling/tank1/pump_vibration"
PUMP = "utilities/cooling/tank1/pump_run"
TAG = "utilities/cooling/tank1/tag"
POWER = "utilities/power/meter1/power"
ENERGY = "utilities/power/meter1/energy"


@pytest.fixture
async def tank() -> AsyncIterator[TankDevice]:
    # tick_hz=0: the plant only moves when a test advances it, so values can be compared exactly.
    async with TankDevice(seed=3, tick_hz=0) as device:
        yield device


@pytest.fixture
async def meter() -> AsyncIterator[MeterDevice]:
    async with MeterDevice(seed=3, tick_hz=0, word_order="little") as device:
        yield device


@pytest.fixture
async def gateway(tmp_path, tank, meter) -> AsyncIterator[Gateway]:
    gw = Gateway(plant_config(tmp_path, tank.port, meter.port))
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


def all_good(gw: Gateway) -> bool:
    _, values = gw.store.snapshot()
    return all(v.quality is Quality.GOOD for v in values.values())


def quality(gw: Gateway, point: str) -> Quality:
    return gw.store.get(point).quality


async def test_twin_follows_the_plant_and_sqlite_holds_it(gateway, tank, meter):
    await eventually(lambda: all_good(gateway), what="every point GOOD")
    level = tank.served["level"]
    assert gateway.store.get(LEVEL).value == pytest.approx(level, rel=1e-6)
    assert gateway.store.get(POWER).value == pytest.approx(meter.served["power"], rel=1e-6)
    assert gateway.store.get(ENERGY).value == pytest.approx(meter.served["energy"], rel=1e-12)
    assert gateway.store.get(TAG).value == "TANK-01"

    tank.advance(30.0)  # half a minute of plant time: the level moves
    moved = tank.served["level"]
    assert moved != level
    await eventually(
        lambda: gateway.store.get(LEVEL).value == pytest.approx(moved, rel=1e-6),
        what="the twin to follow the new level",
    )
    await gateway.store.aflush()

    # Read back from the file, as another process would: current values, history, the log.
    path = gateway.config.storage.path
    with contextlib.closing(sqlite3.connect(path)) as db:
        current, _ = load_current(db)
        (level_pid,) = db.execute("SELECT pid FROM points WHERE id = ?", (LEVEL,)).fetchone()
    assert current[level_pid][3] == pytest.approx(moved, rel=1e-6)
    reader = HistoryReader(path)
    try:
        history = [r.value for r in reader.history(LEVEL, 0, time.time() + 60, limit=100_000)]
        log = reader.events_since(0, limit=1_000_000)
    finally:
        reader.close()
    assert history[0] == pytest.approx(level, rel=1e-6)
    assert history[-1] == pytest.approx(moved, rel=1e-6)
    revs = [e.rev for e in log]
    assert revs == list(range(1, len(revs) + 1)), "revs must be contiguous"
    states = [e.data for e in log if e.type == "DeviceStateChanged"]
    assert any(d.get("state") == "CONNECTED" for d in states)


async def test_setpoint_written_to_the_valve_is_read_back(gateway, tank):
    await eventually(lambda: all_good(gateway), what="every point GOOD")
    readback = await gateway.write_point(VALVE, 65.0)
    assert readback == pytest.approx(65.0)
    assert tank.model.signals()["valve_pct"] == pytest.approx(65.0)
    await eventually(
        lambda: gateway.store.get(VALVE).value == pytest.approx(65.0),
        what="the twin to show the new setpoint",
    )

    assert await gateway.write_point(PUMP, False) is False
    assert tank.model.signals()["pump_on"] is False


@pytest.mark.parametrize("value", [150.0, -1.0, float("nan")])
async def test_setpoint_outside_limits_never_reaches_the_device(gateway, tank, value):
    await eventually(lambda: all_good(gateway), what="every point GOOD")
    before = tank.model.signals()["valve_pct"]
    with pytest.raises(DeviceError, match="outside limits"):
        await gateway.write_point(VALVE, value)
    assert tank.model.signals()["valve_pct"] == before
    with pytest.raises(DeviceError, match="not writable"):
        await gateway.write_point(LEVEL, 1.0)


async def test_restart_mid_poll_points_go_stale_then_recover(gateway, tank):
    await eventually(lambda: all_good(gateway), what="every point GOOD")
    restart = asyncio.create_task(tank.restart(downtime=1.5))
    await eventually(lambda: quality(gateway, LEVEL) is Quality.STALE, what="level STALE")
    stale = gateway.store.get(LEVEL)
    assert "disconnected" in (stale.reason or "")
    assert stale.value is not None, "a STALE point keeps its last value"
    assert gateway.drivers["tank1"].state.value != "CONNECTED"
    await restart
    await eventually(
        lambda: quality(gateway, LEVEL) is Quality.GOOD,
        within=15,
        what="level GOOD again after the restart, without a gateway restart",
    )
    # the meter was never affected
    assert quality(gateway, POWER) is Quality.GOOD
    await gateway.store.aflush()
    events = gateway.store.events_since(0, limit=100_000)
    tank_states = [
        e.data["state"]
        for e in events
        if e.type == "DeviceStateChanged" and e.data["device"] == "tank1"
    ]
    assert tank_states[-3:] == ["CONNECTED", "DISCONNECTED", "CONNECTED"]
    level_q = [e.data["quality"] for e in events if e.point_id == LEVEL]
    assert "STALE" in level_q and level_q[-1] == "GOOD"


async def test_device_killed_and_replaced_on_the_same_port(gateway, tank, tmp_path):
    await eventually(lambda: all_good(gateway), what="every point GOOD")
    port = tank.port
    await tank.stop()  # the controller dies: every connection closes, the port stops answering
    await eventually(lambda: quality(gateway, LEVEL) is Quality.STALE, what="level STALE")
    await asyncio.sleep(1.0)  # several reconnect attempts fail meanwhile
    async with TankDevice(seed=9, port=port, tick_hz=0) as replacement:
        await eventually(
            lambda: (
                gateway.store.get(LEVEL).quality is Quality.GOOD
                and gateway.store.get(LEVEL).value == pytest.approx(replacement.served["level"])
            ),
            within=15,
            what="the replacement's values GOOD",
        )


async def test_illegal_address_marks_only_those_points_bad(gateway, tank):
    await eventually(lambda: all_good(gateway), what="every point GOOD")
    tank.faults.exception(2, table="input", addresses=[3, 4])  # the vibration registers
    await eventually(lambda: quality(gateway, VIBRATION) is Quality.BAD, what="vibration BAD")
    assert "exception 2" in (gateway.store.get(VIBRATION).reason or "").lower()
    # The driver splits the block read so the points around the bad registers stay GOOD.
    await eventually(lambda: quality(gateway, LEVEL) is Quality.GOOD, what="level GOOD again")
    await asyncio.sleep(0.5)
    assert quality(gateway, LEVEL) is Quality.GOOD, "the rest keeps polling"
    assert quality(gateway, VIBRATION) is Quality.BAD
    tank.faults.clear()
    await eventually(
        lambda: quality(gateway, VIBRATION) is Quality.GOOD,
        within=15,
        what="vibration GOOD after the fault clears",
    )


async def test_device_failure_marks_the_block_bad_and_the_rest_keeps_polling(gateway, tank):
    await eventually(lambda: all_good(gateway), what="every point GOOD")
    tank.faults.exception(4, table="input")  # SERVER DEVICE FAILURE on every input read
    await eventually(lambda: quality(gateway, LEVEL) is Quality.BAD, what="level BAD")
    assert "exception 4" in (gateway.store.get(LEVEL).reason or "").lower()
    await asyncio.sleep(0.5)
    assert quality(gateway, VALVE) is Quality.GOOD, "holding registers keep polling"
    assert gateway.drivers["tank1"].connected
    tank.faults.clear()
    await eventually(
        lambda: quality(gateway, LEVEL) is Quality.GOOD,
        within=15,
        what="level GOOD after the fault clears",
    )


@pytest.mark.parametrize("fault", ["garbage", "slow"])
async def test_garbage_or_timeouts_mark_points_bad_then_recover(gateway, tank, fault):
    await eventually(lambda: all_good(gateway), what="every point GOOD")
    if fault == "garbage":
        tank.faults.garbage(True)
    else:
        tank.faults.slow(1.0)  # beyond the 0.3 s timeout
    await eventually(
        lambda: quality(gateway, LEVEL) in (Quality.BAD, Quality.STALE),
        what=f"level not GOOD under {fault}",
    )
    assert quality(gateway, POWER) is Quality.GOOD
    tank.faults.clear()
    await eventually(
        lambda: quality(gateway, LEVEL) is Quality.GOOD,
        within=15,
        what=f"level GOOD after {fault} clears",
    )


async def test_http_reads_of_the_twin(tmp_path, tank, meter, aiohttp_client):
    gw = Gateway(plant_config(tmp_path, tank.port, meter.port))
    client = await aiohttp_client(create_app(gw))
    await eventually(lambda: all_good(gw), what="every point GOOD")

    health = await (await client.get("/health")).json()
    assert health["status"] == "ok"
    assert health["devices"]["tank1"]["state"] == "CONNECTED"

    resp = await client.get("/twin")
    body = await resp.json()
    etag = resp.headers["ETag"]
    assert etag == f'"rev:{body["rev"]}"'
    assert body["points"][LEVEL]["unit"] == "m"
    assert body["points"][LEVEL]["range"] == {"lo": 0.0, "hi": 5.0}
    assert body["points"][LEVEL]["quality"] == "GOOD"
    assert (await client.get("/twin", headers={"If-None-Match": etag})).status == 304

    one = await (await client.get(f"/twin/{LEVEL}")).json()
    assert one["value"] == pytest.approx(tank.served["level"], rel=1e-6)
    assert (await client.get("/twin/no/such/point")).status == 404

    await gw.store.aflush()
    rows = await (await client.get("/telemetry/query", params={"point": LEVEL})).json()
    assert rows["rows"] and rows["rows"][0]["quality"] == "GOOD"
    agg = await (
        await client.get("/telemetry/aggregate", params={"point": LEVEL, "bucket_s": "60"})
    ).json()
    assert agg["buckets"][0]["count"] >= 1

    for params in (
        {},
        {"point": LEVEL, "start": "soon"},
        {"point": LEVEL, "limit": "0"},
        {"point": LEVEL, "start": "10", "end": "5"},
    ):
        resp = await client.get("/telemetry/query", params=params)
        assert resp.status == 400, params
        assert "error" in await resp.json()
    resp = await client.get("/telemetry/aggregate", params={"point": LEVEL, "bucket_s": "-1"})
    assert resp.status == 400


async def test_a_second_gateway_on_the_same_database_connects_to_no_device(tmp_path):
    accepted = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    servers = [await asyncio.start_server(count, "127.0.0.1", 0) for _ in range(2)]
    tank_port, meter_port = (s.sockets[0].getsockname()[1] for s in servers)
    config = plant_config(tmp_path, tank_port, meter_port)
    # The first gateway's store (another process in real life: see tests/unit/test_twin_faults.py).
    holder = TwinStore(config.storage.path, [])
    holder.open()
    try:
        gw = Gateway(config)
        with pytest.raises(StoreError, match=rf"another gateway \(pid {os.getpid()}\) is running"):
            await gw.start()
        await asyncio.sleep(0.3)  # a connect started before the refusal would land meanwhile
        assert accepted == 0
    finally:
        holder.close()
        for server in servers:
            server.close()
            await server.wait_closed()
