"""The Modbus driver over real TCP against a plain pymodbus server started in-process."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimAction, SimData, SimDevice
from tests_support import free_port

from drivers.backoff import Backoff
from drivers.base import next_tick
from drivers.contract import ConnectionState, Quality, Sample
from drivers.errors import (
    ConfigurationError,
    DeviceResponseError,
    NotConnectedError,
    WriteRejectedError,
    WriteVerifyError,
)
from drivers.modbus import ModbusDriver, ModbusPoint
from plantsim import TankDevice

pytestmark = pytest.mark.timeout(30)

FAST = {"poll_interval_s": 0.05, "timeout_s": 0.5}


def words(fmt: str, value: Any) -> list[int]:
    raw = struct.pack(">" + fmt, value)
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


# The device under test. Holding 20 is deliberately missing (unmapped address).
HOLDING = {
    0: [500],  # setpoint, raw 0.1 units
    1: words("h", -1234),
    2: words("f", 21.5),  # float32 ABCD
    4: words("I", 123456)[::-1],  # uint32 CDAB
    6: [0b0000_0000_0000_0101],  # bit field
    7: [0],
    8: words("f", math.nan),
    10: [0x5441, 0x4E4B, 0x2D30, 0x3100],  # "TANK-01"
    19: [19],
    21: [21],
    22: [0] * 8,
}
INPUT = {0: words("f", 2.75), 2: [300]}


def device(unit: int = 1, offset: int = 0, action: SimAction | None = None) -> SimDevice:
    holding = [
        SimData(
            addr,
            values=[v + offset if addr in (19, 21) else v for v in vals],
            datatype=DataType.REGISTERS,
        )
        for addr, vals in HOLDING.items()
    ]
    holding.insert(0, SimData(20, datatype=DataType.INVALID))
    return SimDevice(
        id=unit,
        action=action,
        simdata=(
            [SimData(0, count=16, values=False, datatype=DataType.BITS)],
            [SimData(0, values=[True, False] * 8, datatype=DataType.BITS)],
            holding,
            [
                SimData(addr, values=vals, datatype=DataType.REGISTERS)
                for addr, vals in INPUT.items()
            ],
        ),
    )


class Plant:
    """A pymodbus server on a fixed free port that a test can stop and start again."""

    def __init__(
        self,
        framer: FramerType = FramerType.SOCKET,
        units: tuple[int, ...] = (1,),
        action: SimAction | None = None,
    ) -> None:
        self.port = free_port()
        self.framer = framer
        self.units = units
        self.action = action
        self.server: ModbusTcpServer | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    async def start(self) -> None:
        devices = [device(u, 100 * (u - 1), self.action) for u in self.units]
        self.server = ModbusTcpServer(devices, framer=self.framer, address=("127.0.0.1", self.port))
        await self.server.serve_forever(background=True)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.shutdown()
            self.server = None

    async def read(self, table: str, address: int, count: int = 1, unit: int = 1) -> list[Any]:
        """Look at the device through a separate client, as an operator panel would."""
        client = AsyncModbusTcpClient("127.0.0.1", port=self.port, framer=self.framer, timeout=1)
        assert await client.connect()
        try:
            if table == "holding":
                return list(
                    (
                        await client.read_holding_registers(address, count=count, device_id=unit)
                    ).registers
                )
            bits = (await client.read_coils(address, count=count, device_id=unit)).bits
            return list(bits[:count])
        finally:
            client.close()


class Recorder:
    """Consumes a driver's sample stream and keeps the latest sample per key."""

    def __init__(self, driver: ModbusDriver) -> None:
        self.driver = driver
        self.latest: dict[str, Sample] = {}
        self.batches: list[list[Sample]] = []
        self.states: list[ConnectionState] = []
        driver.add_state_listener(lambda name, state, reason: self.states.append(state))
        self._task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        async for batch in self.driver.samples():
            self.batches.append(batch)
            for s in batch:
                self.latest[s.key] = s

    async def until(self, check: Callable[[dict[str, Sample]], bool], within: float = 5.0) -> None:
        deadline = time.monotonic() + within
        while not check(self.latest):
            if time.monotonic() > deadline:
                got = {k: (s.quality.value, s.value, s.reason) for k, s in self.latest.items()}
                raise AssertionError(f"condition not met within {within} s; latest: {got}")
            await asyncio.sleep(0.01)

    async def all(
        self, quality: Quality, keys: list[str] | None = None, within: float = 5.0
    ) -> None:
        wanted = keys or list(self.driver.keys)
        await self.until(
            lambda latest: all(k in latest and latest[k].quality is quality for k in wanted),
            within,
        )

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


POINTS = [
    ModbusPoint("setpoint", "holding:0", "uint16", scale=0.1, lo=0, hi=100, writable=True),
    ModbusPoint("signed", "holding:1", "int16"),
    ModbusPoint("temp", "holding:2", "float32"),
    ModbusPoint("hours", "holding:4", "uint32", word_order="little"),
    ModbusPoint("bit0", "holding:6.0", writable=True),
    ModbusPoint("bit1", "holding:6.1", writable=True),
    ModbusPoint("bit2", "holding:6.2"),
    ModbusPoint("tag", "holding:10", "string", length=8),
    ModbusPoint("level", "input:0", "float32", lo=0, hi=5),
    ModbusPoint("flow", "input:2", "int16", scale=0.01, lo=0, hi=2),
    ModbusPoint("pump", "coil:3", writable=True),
    ModbusPoint("switch0", "discrete:0"),
    ModbusPoint("switch1", "discrete:1"),
]


@pytest.fixture
async def plant() -> AsyncIterator[Plant]:
    p = Plant()
    await p.start()
    yield p
    await p.stop()


@contextlib.asynccontextmanager
async def running(
    plant: Plant, points: list[ModbusPoint] = POINTS, merge_retry_s: float = 60.0, **options: Any
) -> AsyncIterator[tuple[ModbusDriver, Recorder]]:
    driver = ModbusDriver(
        "tank",
        plant.endpoint,
        {**FAST, **options},
        points,
        backoff=Backoff(initial=0.05, cap=0.5),
        merge_retry_s=merge_retry_s,
    )
    recorder = Recorder(driver)
    await driver.start()
    try:
        yield driver, recorder
    finally:
        await driver.close()
        await recorder.stop()


async def test_polling_produces_good_samples_with_the_right_values(plant: Plant) -> None:
    async with running(plant) as (driver, rec):
        await rec.until(lambda latest: len(latest) == len(POINTS))
        values = {k: s.value for k, s in rec.latest.items()}
        assert values == {
            "setpoint": pytest.approx(50.0),
            "signed": -1234,
            "temp": 21.5,
            "hours": 123456,
            "bit0": True,
            "bit1": False,
            "bit2": True,
            "tag": "TANK-01",
            "level": 2.75,
            "flow": pytest.approx(3.0),
            "pump": False,
            "switch0": True,
            "switch1": False,
        }
        quality = {k: s.quality for k, s in rec.latest.items()}
        assert quality.pop("flow") is Quality.UNCERTAIN  # 3.0 outside [0, 2]
        assert set(quality.values()) == {Quality.GOOD}
        assert "outside engineering range [0, 2]" in (rec.latest["flow"].reason or "")
        # One batch per poll cycle carrying every point, stamped with the response time.
        full = [b for b in rec.batches if len(b) == len(POINTS)]
        assert full and {s.key for s in full[0]} == set(driver.keys)
        ts = rec.latest["temp"].source_ts
        assert ts is not None and abs(ts - time.time()) < 2
        # Merged: coils, discretes, holding 0..13 (gap 7 <= 8), inputs.
        assert [str(b) for b in driver.read_plan] == [
            "coil 3",
            "discrete 0..1",
            "holding 0..13",
            "input 0..2",
        ]


async def test_polls_at_a_fixed_rate(plant: Plant, monkeypatch: pytest.MonkeyPatch) -> None:
    # The grid arithmetic is tested on its own (test_driver_base); this checks the poll loop
    # follows it, by recording the wake-ups the driver asks for after each poll, never by
    # counting polls in a wall-clock window (that measures the machine, not the driver).
    interval = 0.05
    calls: list[tuple[float, float]] = []  # (loop time a poll ended, the wake-up it asked for)

    def recording_next_tick(tick: float, now: float, step: float) -> float:
        wake = next_tick(tick, now, step)
        calls.append((now, wake))
        return wake

    monkeypatch.setattr("drivers.base.next_tick", recording_next_tick)
    async with running(plant, poll_interval_s=interval) as (_, rec):
        await rec.until(lambda _: len(calls) >= 6)
    wakes = [wake for _, wake in calls]
    periods = [(b - a) / interval for a, b in itertools.pairwise(wakes)]
    # On one grid (no drift), forward only; a slow machine may skip ticks, never add any.
    assert all(p == pytest.approx(round(p), abs=1e-6) and round(p) >= 1 for p in periods)
    # Always ahead of the poll that just ended, and never more than one period away.
    assert all(now < wake <= now + interval for now, wake in calls)
    # Each poll starts only once the wake-up asked for has come: no bursts.
    assert all(later[0] >= earlier[1] - 1e-6 for earlier, later in itertools.pairwise(calls))


@pytest.mark.parametrize("write_multiple", [False, True], ids=["FC6", "FC16"])
async def test_write_to_a_holding_register_is_read_back(plant: Plant, write_multiple: bool) -> None:
    async with running(plant, write_multiple=write_multiple) as (driver, rec):
        await rec.all(Quality.GOOD, ["setpoint"])
        assert await driver.write("setpoint", 42.5) == pytest.approx(42.5)
        assert await plant.read("holding", 0) == [425]
        await rec.until(lambda latest: latest["setpoint"].value == pytest.approx(42.5))
        assert rec.latest["setpoint"].quality is Quality.GOOD


@pytest.mark.parametrize("write_multiple", [False, True], ids=["FC5", "FC15"])
async def test_coil_write(plant: Plant, write_multiple: bool) -> None:
    async with running(plant, write_multiple=write_multiple) as (driver, rec):
        await rec.all(Quality.GOOD, ["pump"])
        assert await driver.write("pump", True) is True
        assert await plant.read("coil", 0, 5) == [False, False, False, True, False]
        assert await driver.write("pump", False) is False
        assert await plant.read("coil", 3) == [False]


async def test_bit_field_write_changes_only_its_bit(plant: Plant) -> None:
    async with running(plant) as (driver, rec):
        await rec.all(Quality.GOOD, ["bit1"])
        assert await driver.write("bit1", True) is True
        assert await plant.read("holding", 6) == [0b111]
        assert await driver.write("bit0", False) is False
        assert await plant.read("holding", 6) == [0b110]
        await rec.until(
            lambda latest: latest["bit0"].value is False and latest["bit2"].value is True
        )


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("setpoint", 150, "outside the point's limits"),
        ("setpoint", -0.1, "outside the point's limits"),
        ("setpoint", math.nan, "not finite"),
        ("setpoint", "50", "takes a number"),
        ("setpoint", True, "takes a number"),
        ("setpoint", 42.55, "not representable in uint16"),
        ("temp", 20.0, "not writable"),
        ("pump", 2, "true/false"),
        ("nope", 1, "no point 'nope'"),
    ],
)
async def test_refused_write_never_reaches_the_device(
    plant: Plant, key: str, value: Any, why: str
) -> None:
    async with running(plant) as (driver, rec):
        await rec.all(Quality.GOOD, ["setpoint"])
        with pytest.raises(WriteRejectedError, match=why) as err:
            await driver.write(key, value)
        if key == "setpoint":
            # The message says which device, address and value, and what the limits are.
            text = str(err.value)
            assert text.startswith("tank holding:0 (setpoint, limits [0, 100])")
            assert repr(value) in text
        assert await plant.read("holding", 0) == [500]


async def stubborn(
    function_code: int,
    start_address: int,
    address: int,
    count: int,
    registers: list[int],
    set_values: list[int] | list[bool] | None,
) -> ExcCodes | None:
    """A device that clamps holding 0 to 300 and refuses any write to holding 7."""
    if function_code in (6, 16) and set_values is not None:
        if address <= 7 < address + count:
            return ExcCodes.ILLEGAL_VALUE
        if address == 0:
            registers = cast("list[int]", set_values)  # FC 6/16 write registers, not bits
            registers[0] = min(int(registers[0]), 300)
    return None


async def test_write_that_does_not_stick_fails_verification() -> None:
    plant = Plant(action=stubborn)
    await plant.start()
    points = [
        ModbusPoint("setpoint", "holding:0", "uint16", scale=0.1, lo=0, hi=100, writable=True),
        ModbusPoint("locked", "holding:7", "uint16", writable=True),
    ]
    try:
        async with running(plant, points) as (driver, rec):
            await rec.all(Quality.GOOD)
            assert await driver.write("setpoint", 25.0) == pytest.approx(25.0)
            with pytest.raises(WriteVerifyError, match=r"wrote 42.5 but read back 30.0"):
                await driver.write("setpoint", 42.5)
            with pytest.raises(
                DeviceResponseError, match=r"Modbus exception 3 \(ILLEGAL DATA VALUE\)"
            ):
                await driver.write("locked", 1)
            assert driver.connected
    finally:
        await plant.stop()


async def test_unmapped_address_marks_only_its_point_bad(
    plant: Plant, caplog: pytest.LogCaptureFixture
) -> None:
    points = [
        ModbusPoint("h19", "holding:19"),
        ModbusPoint("h20", "holding:20"),  # not on the device
        ModbusPoint("h21", "holding:21"),
        ModbusPoint("h22", "holding:22", "float64"),
    ]
    caplog.set_level(logging.DEBUG, logger="drivers")
    async with running(plant, points, merge_retry_s=0.3) as (driver, rec):
        assert [str(b) for b in driver.read_plan] == ["holding 19..25"]
        await rec.until(lambda latest: len(latest) == 4)
        assert {k: s.quality for k, s in rec.latest.items()} == {
            "h19": Quality.GOOD,
            "h20": Quality.BAD,
            "h21": Quality.GOOD,
            "h22": Quality.GOOD,
        }
        assert (
            rec.latest["h20"].reason
            == "Modbus exception 2 (ILLEGAL DATA ADDRESS) reading holding 20"
        )
        assert rec.latest["h20"].value is None
        assert (rec.latest["h19"].value, rec.latest["h21"].value) == (19, 21)
        # Later polls keep it that way: the split plan is reused, and the merged read is tried
        # again after merge_retry_s (a device may have been reconfigured meanwhile). The BAD
        # point is in every poll's batch; the GOOD ones, which do not change, only when the
        # plan is made again (each retry), and never other than GOOD.
        seen = len(rec.batches)
        await rec.until(lambda _: len(rec.batches) >= seen + 12)
        later = rec.batches[seen:]
        assert all(
            [(s.key, s.quality) for s in batch].count(("h20", Quality.BAD)) == 1 for batch in later
        )
        good = [s for batch in later for s in batch if s.key != "h20"]
        assert {s.key for s in good} == {"h19", "h21", "h22"}
        assert {s.quality for s in good} == {Quality.GOOD}
        assert driver.connected
        retries = [r.levelno for r in caplog.records if "refused as a whole" in r.getMessage()]
        assert retries[0] == logging.INFO and len(retries) >= 2
        assert set(retries[1:]) == {logging.DEBUG}
        # Logged on the transition only, not on every poll.
        went_bad = [r for r in caplog.records if "h20 BAD" in r.getMessage()]
        assert len(went_bad) == 1


def failing_at(code: ExcCodes, target: int) -> SimAction:
    """A device action answering reads that cover holding `target` with exception `code`."""

    async def action(
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if function_code == 3 and address <= target < address + count:
            return code
        return None

    return action


@pytest.mark.parametrize(
    ("code", "bad"),
    [
        (ExcCodes.DEVICE_FAILURE, {"b"}),  # a failed module: only its registers are bad
        (ExcCodes.DEVICE_BUSY, {"a", "b"}),  # "try later" is about the device: no split
    ],
    ids=["4-split", "6-whole"],
)
async def test_exception_codes_split_only_when_they_can_concern_addresses(
    code: ExcCodes, bad: set[str]
) -> None:
    plant = Plant(action=failing_at(code, 1))
    await plant.start()
    points = [ModbusPoint("a", "holding:0"), ModbusPoint("b", "holding:1")]
    try:
        async with running(plant, points) as (driver, rec):
            assert [str(b) for b in driver.read_plan] == ["holding 0..1"]
            await rec.until(lambda latest: len(latest) == 2)
            assert {k for k, s in rec.latest.items() if s.quality is Quality.BAD} == bad
            assert f"Modbus exception {int(code)}" in (rec.latest["b"].reason or "")
    finally:
        await plant.stop()


async def test_hole_between_points_does_not_make_them_bad(plant: Plant) -> None:
    points = [ModbusPoint("h19", "holding:19"), ModbusPoint("h21", "holding:21")]
    async with running(plant, points) as (driver, rec):
        assert [str(b) for b in driver.read_plan] == ["holding 19..21"]  # reads through 20
        await rec.all(Quality.GOOD)
        assert (rec.latest["h19"].value, rec.latest["h21"].value) == (19, 21)


async def test_nan_is_bad_and_device_keeps_being_polled(plant: Plant) -> None:
    points = [
        ModbusPoint("nan", "holding:8", "float32"),
        ModbusPoint("temp", "holding:2", "float32"),
    ]
    async with running(plant, points) as (_, rec):
        await rec.until(lambda latest: len(latest) == 2)
        assert rec.latest["nan"].quality is Quality.BAD
        assert rec.latest["nan"].reason == "value not finite (nan)"
        assert rec.latest["temp"].quality is Quality.GOOD


async def test_server_restart_goes_stale_then_recovers_by_itself(plant: Plant) -> None:
    async with running(plant) as (driver, rec):
        await rec.all(Quality.GOOD, ["temp", "pump", "level"])
        await plant.stop()
        await rec.all(Quality.STALE)
        assert all(
            s.value is None and "disconnected" in (s.reason or "") for s in rec.latest.values()
        )
        assert ConnectionState.DISCONNECTED in rec.states
        assert not driver.connected
        with pytest.raises(NotConnectedError):
            await driver.write("setpoint", 10)
        await asyncio.sleep(0.3)  # a few refused reconnect attempts
        await plant.start()
        await rec.all(Quality.GOOD, ["temp", "pump", "level"])
        assert driver.connected and rec.states[-1] is ConnectionState.CONNECTED
        assert rec.latest["temp"].value == 21.5


class Watch:
    """A device action that counts holding-register reads and lets a test set registers."""

    def __init__(self) -> None:
        self.reads = 0
        self._memory: tuple[int, list[int]] | None = None

    async def action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if function_code == 3:
            self.reads += 1
            self._memory = (start_address, registers)
        return None

    def set(self, address: int, values: list[int]) -> None:
        """Change holding registers inside the device, as its own program would."""
        assert self._memory is not None, "the device has not been read yet"
        start, registers = self._memory
        registers[address - start : address - start + len(values)] = values

    async def polls(self, count: int, within: float = 5.0) -> None:
        """Wait until the device has been read `count` more times."""
        target, deadline = self.reads + count, time.monotonic() + within
        while self.reads < target:
            assert time.monotonic() < deadline, f"{self.reads} reads, waiting for {target}"
            await asyncio.sleep(0.01)


# One block (holding 0..13): one holding read per poll.
HOLDING_POINTS = [p for p in POINTS if p.address.table == "holding"]


@pytest.fixture
async def watched() -> AsyncIterator[tuple[Plant, Watch]]:
    watch = Watch()
    plant = Plant(action=watch.action)
    await plant.start()
    yield plant, watch
    await plant.stop()


async def test_a_poll_hands_over_only_the_points_that_changed(
    watched: tuple[Plant, Watch],
) -> None:
    plant, watch = watched
    async with running(plant, HOLDING_POINTS) as (_, rec):
        await rec.until(lambda latest: len(latest) == len(HOLDING_POINTS))
        await watch.polls(3)
        assert len(rec.batches) == 1  # the first poll; the registers have not changed since

        watch.set(2, words("f", 30.25))
        await rec.until(lambda latest: latest["temp"].value == 30.25)
        await watch.polls(3)
        assert [[s.key for s in b] for b in rec.batches[1:]] == [["temp"]]

        watch.set(0, [2000])  # setpoint 200.0, above its limit of 100
        await rec.until(lambda latest: latest["setpoint"].quality is Quality.UNCERTAIN)
        await watch.polls(3)
        assert rec.batches[2:] == [[rec.latest["setpoint"]]]
        assert rec.latest["setpoint"].value == pytest.approx(200.0)
        assert rec.latest["setpoint"].reason == "200 outside engineering range [0, 100]"

        # A BAD point is handed over in every poll, as before; the others still are not.
        watch.set(2, words("f", math.nan))
        await rec.until(lambda latest: latest["temp"].quality is Quality.BAD)
        seen = len(rec.batches)
        await watch.polls(3)
        assert len(rec.batches) >= seen + 2
        assert {(s.key, s.quality, s.reason) for b in rec.batches[3:] for s in b} == {
            ("temp", Quality.BAD, "value not finite (nan)")
        }


async def test_after_a_reconnect_every_point_is_handed_over_again(
    watched: tuple[Plant, Watch],
) -> None:
    plant, watch = watched
    async with running(plant, HOLDING_POINTS) as (_, rec):
        await rec.all(Quality.GOOD)
        await watch.polls(2)
        await plant.stop()
        await rec.all(Quality.STALE)
        seen = len(rec.batches)
        await plant.start()  # the same registers as before
        await rec.all(Quality.GOOD)
        again = [s for batch in rec.batches[seen:] for s in batch]
        assert sorted(s.key for s in again) == sorted(p.key for p in HOLDING_POINTS)


async def test_a_value_the_device_puts_back_after_a_write_is_handed_over(
    watched: tuple[Plant, Watch],
) -> None:
    plant, watch = watched
    async with running(plant, HOLDING_POINTS) as (driver, rec):
        await rec.all(Quality.GOOD)
        assert await driver.write("setpoint", 42.5) == pytest.approx(42.5)
        assert rec.latest["setpoint"].value == pytest.approx(50.0)  # not consumed yet
        # The device's own program restores the old setpoint before the next poll: its
        # registers read as they did before the write, but the write reported 42.5.
        watch.set(0, [500])
        await rec.until(lambda latest: latest["setpoint"].value == pytest.approx(42.5))
        await rec.until(lambda latest: latest["setpoint"].value == pytest.approx(50.0))


async def test_batches_dropped_for_a_slow_consumer_lose_no_point(
    watched: tuple[Plant, Watch],
) -> None:
    plant, watch = watched
    driver = ModbusDriver(
        "tank", plant.endpoint, FAST, HOLDING_POINTS, backoff=Backoff(0.05, 0.5), queue_size=1
    )
    await driver.start()
    rec: Recorder | None = None
    try:
        await watch.polls(2)  # the first poll's batch waits in the queue, nobody takes it
        watch.set(2, words("f", 30.25))
        # The batch with only the change pushes out the one with every point's first value.
        await watch.polls(3)
        assert driver.dropped_batches >= 1
        rec = Recorder(driver)
        await rec.until(
            lambda latest: len(latest) == len(HOLDING_POINTS) and latest["temp"].value == 30.25
        )
    finally:
        await driver.close()
        if rec is not None:
            await rec.stop()


async def test_rtu_framer_over_tcp() -> None:
    plant = Plant(framer=FramerType.RTU)
    await plant.start()
    try:
        async with running(plant, framer="rtu") as (driver, rec):
            await rec.until(lambda latest: len(latest) == len(POINTS))
            assert rec.latest["temp"].value == 21.5
            assert rec.latest["tag"].value == "TANK-01"
            assert await driver.write("setpoint", 12.3) == pytest.approx(12.3)
            assert await plant.read("holding", 0) == [123]
    finally:
        await plant.stop()


async def test_devices_on_one_rtu_bus_share_the_connection() -> None:
    plant = Plant(framer=FramerType.RTU, units=(1, 2))
    await plant.start()
    points = [ModbusPoint("h19", "holding:19"), ModbusPoint("h21", "holding:21")]
    options = {**FAST, "framer": "rtu"}
    backoff = Backoff(initial=0.05, cap=0.5)
    one = ModbusDriver("one", plant.endpoint, {**options, "unit_id": 1}, points, backoff=backoff)
    two = ModbusDriver("two", plant.endpoint, {**options, "unit_id": 2}, points, backoff=backoff)
    rec_one, rec_two = Recorder(one), Recorder(two)
    try:
        assert one._bus is two._bus
        await one.start()
        await two.start()
        await rec_one.all(Quality.GOOD)
        await rec_two.all(Quality.GOOD)
        assert (rec_one.latest["h19"].value, rec_two.latest["h19"].value) == (19, 119)
        assert one._bus.users == 2
        with pytest.raises(ConfigurationError, match="one bus"):
            ModbusDriver("three", plant.endpoint, {**options, "timeout_s": 2}, points)
    finally:
        for d in (one, two):
            await d.close()
        await rec_one.stop()
        await rec_two.stop()
        await plant.stop()


class FakeDevice:
    """A raw TCP server that answers Modbus requests badly, counting the connections made."""

    def __init__(self, answer: Callable[[bytes], bytes | None]) -> None:
        self.answer = answer
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> FakeDevice:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"tcp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(Exception):
            while request := await reader.read(256):
                reply = self.answer(request)
                if reply:
                    writer.write(reply)
                    await writer.drain()
        writer.close()


def silent(request: bytes) -> None:
    return None


def noise(request: bytes) -> bytes:
    return b"\x00\x01\xff\xfe\x00\x03\x01\x83"


def short_answer(request: bytes) -> bytes:
    """A well-formed Modbus TCP response carrying one register, whatever was asked."""
    tid, unit, fc = request[:2], request[6:7], request[7:8]
    return tid + b"\x00\x00\x00\x05" + unit + fc + b"\x02\x00\x07"


QUIET = {"poll_interval_s": 0.05, "timeout_s": 0.1, "failures_before_reconnect": 2}


async def test_silent_device_times_out_and_the_driver_reconnects() -> None:
    points = [ModbusPoint("a", "holding:0"), ModbusPoint("b", "input:0")]
    async with FakeDevice(silent) as dev:
        driver = ModbusDriver("mute", dev.endpoint, QUIET, points, backoff=Backoff(0.05, 0.2))
        rec = Recorder(driver)
        try:
            await driver.start()
            await rec.until(lambda latest: "a" in latest and latest["a"].quality is Quality.BAD)
            assert rec.latest["a"].reason == "no response within 0.1 s reading holding 0"
            await rec.until(lambda _: dev.connections >= 2)  # gave up on the link, reopened it
            assert ConnectionState.DISCONNECTED in rec.states
            assert driver._task is not None and not driver._task.done()
        finally:
            await driver.close()
            await rec.stop()


async def test_dead_shared_bus_is_reopened_for_all_its_devices() -> None:
    """Two devices behind one RTU-over-TCP converter that stopped answering (half-open link)."""
    points = [ModbusPoint("a", "holding:0")]
    options = {**QUIET, "framer": "rtu"}
    async with FakeDevice(silent) as dev:
        one = ModbusDriver(
            "one", dev.endpoint, {**options, "unit_id": 1}, points, backoff=Backoff(0.05, 0.2)
        )
        # The other device's driver is patient: it alone would never leave the bus.
        patient = {**options, "unit_id": 2, "failures_before_reconnect": 1000}
        two = ModbusDriver("two", dev.endpoint, patient, points, backoff=Backoff(0.05, 0.2))
        recs = [Recorder(one), Recorder(two)]
        try:
            await one.start()
            await two.start()
            # Each driver alone leaving and rejoining would keep the dead link open for ever.
            await recs[0].until(lambda _: dev.connections >= 2)
        finally:
            for d, r in zip((one, two), recs, strict=True):
                await d.close()
                await r.stop()


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (noise, "malformed response reading holding 0..1: 8 bytes that form no Modbus frame"),
        (short_answer, "malformed response reading holding 0..1: 1 registers for 2"),
    ],
    ids=["noise", "short"],
)
@pytest.mark.parametrize("in_flight", [1, 4])
async def test_garbage_answers_mark_points_bad_and_keep_the_connection(
    answer: Callable[[bytes], bytes], reason: str, in_flight: int
) -> None:
    async with FakeDevice(answer) as dev:
        driver = ModbusDriver(
            "junk",
            dev.endpoint,
            {**QUIET, "max_in_flight": in_flight},
            [ModbusPoint("a", "holding:0", "float32")],
            backoff=Backoff(0.05, 0.2),
        )
        rec = Recorder(driver)
        try:
            await driver.start()
            await rec.until(lambda latest: "a" in latest and latest["a"].quality is Quality.BAD)
            assert rec.latest["a"].reason == reason
            # Well past failures_before_reconnect (2) polls: an answer, even garbage, proves
            # the link; reconnecting would only flap the device's state.
            batches = len(rec.batches)
            await rec.until(lambda _: len(rec.batches) >= batches + 4)
            assert dev.connections == 1 and driver.connected
            assert ConnectionState.DISCONNECTED not in rec.states
            assert all(s.quality is not Quality.GOOD for b in rec.batches for s in b)
        finally:
            await driver.close()
            await rec.stop()


async def test_device_down_at_start_is_logged_once_with_its_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="drivers")
    port = free_port()  # nothing listens there
    driver = ModbusDriver(
        "tank1",
        f"tcp://127.0.0.1:{port}",
        FAST,
        [ModbusPoint("a", "holding:0")],
        backoff=Backoff(initial=0.01, cap=0.05),
    )
    rec = Recorder(driver)
    try:
        await driver.start()
        await rec.until(lambda _: rec.states.count(ConnectionState.CONNECTING) >= 5)
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.name.startswith("drivers") and r.levelno >= logging.WARNING
        ]
        assert len(warnings) == 1, warnings
        assert warnings[0].startswith(
            f"tank1: cannot connect to tcp://127.0.0.1:{port}: ConnectionRefusedError: "
        )
        assert warnings[0].endswith("; retrying with backoff")
        assert rec.latest["a"].quality is Quality.BAD
    finally:
        await driver.close()
        await rec.stop()


TANK_POINTS = [
    ModbusPoint("valve", "holding:0", "uint16", scale=0.1),
    ModbusPoint("level", "input:0", "float32"),
    ModbusPoint("pump", "coil:0"),
]


@pytest.mark.parametrize(
    ("framer", "in_flight"), [("socket", 1), ("socket", 4), ("rtu", 1)], ids=["tcp", "tcp4", "rtu"]
)
async def test_device_answering_garbage_is_bad_once_and_keeps_its_connection(
    framer: str, in_flight: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A device whose answers are garbled (plantsim's `garbage` fault: wrecked PDUs, bad CRCs)."""
    caplog.set_level(logging.INFO)
    async with TankDevice(seed=3, tick_hz=0, framer=framer) as tank:
        driver = ModbusDriver(
            "tank1",
            f"tcp://127.0.0.1:{tank.port}",
            # A garbled RTU answer often holds no frame at all: it shows only at the timeout.
            {
                **FAST,
                "timeout_s": 0.2,
                "framer": framer,
                "failures_before_reconnect": 2,
                "max_in_flight": in_flight,
            },
            TANK_POINTS,
            backoff=Backoff(initial=0.05, cap=0.5),
        )
        rec = Recorder(driver)
        try:
            await driver.start()
            await rec.all(Quality.GOOD)
            states_before = len(rec.states)
            caplog.clear()
            tank.faults.garbage(True)
            await rec.all(Quality.BAD)
            assert all(
                (s.reason or "").startswith("malformed response reading")
                for s in rec.latest.values()
            ), {k: s.reason for k, s in rec.latest.items()}
            # Many more polls, each answered with garbage: no new state, no new connection.
            batches = len(rec.batches)
            await rec.until(lambda _: len(rec.batches) >= batches + 4)
            assert rec.states[states_before:] == []
            assert driver.connected and tank.server.connections == 1
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
            ours = [r.getMessage() for r in warnings if r.name.startswith("drivers")]
            # Polls that wait for a 0.2 s timeout overrun their 0.05 s interval: said once.
            overruns = [m for m in ours if "polls are being skipped" in m]
            assert len(overruns) <= 1, overruns
            ours = [m for m in ours if m not in overruns]
            # One transition per point (a line per block's reason), nothing per poll.
            for key in ("valve", "level", "pump"):
                assert len([m for m in ours if f" {key}" in m and "BAD: malformed" in m]) == 1
            assert len(ours) == 3, ours
            assert not [r for r in warnings if r.exc_info], "no traceback for a garbled frame"

            tank.faults.garbage(False)
            await rec.all(Quality.GOOD)
            assert rec.states[states_before:] == [] and tank.server.connections == 1
        finally:
            await driver.close()
            await rec.stop()


async def test_serial_endpoint_builds_an_rtu_serial_client(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Any] = []

    async def fake_connect(self: AsyncModbusSerialClient) -> bool:
        built.append(self.comm_params)
        return False  # no hardware here: the port "cannot be opened"

    monkeypatch.setattr(AsyncModbusSerialClient, "connect", fake_connect)
    driver = ModbusDriver(
        "rs485",
        "serial:///dev/ttyUSB-test",
        {"baudrate": 9600, "parity": "E", "stopbits": 2, "bytesize": 7, "timeout_s": 0.2},
        [ModbusPoint("a", "holding:0")],
        backoff=Backoff(initial=0.05, cap=0.1),
    )
    rec = Recorder(driver)
    try:
        await driver.start()
        await rec.all(Quality.BAD)  # never connected: BAD, with the reason
        assert "cannot connect to serial:///dev/ttyUSB-test" in (rec.latest["a"].reason or "")
        params = built[0]
        assert (params.host, params.baudrate, params.parity, params.stopbits, params.bytesize) == (
            "/dev/ttyUSB-test",
            9600,
            "E",
            2,
            7,
        )
        assert params.timeout_connect == 0.2
        # 3.5 characters of 11 bits at 9600 bit/s.
        assert driver._bus.settings.inter_frame_delay_s == pytest.approx(0.00401, abs=1e-4)
    finally:
        await driver.close()
        await rec.stop()


@pytest.mark.parametrize(
    ("endpoint", "options", "hint"),
    [
        ("udp://1.2.3.4:502", {}, "expected tcp://HOST:PORT"),
        ("tcp://:502", {}, "expected tcp://HOST:PORT"),
        ("tcp://host:99999", {}, "port 1..65535"),
        ("serial:///dev/ttyUSB0", {"framer": "socket"}, "needs framer rtu"),
        ("tcp://h:502", {"unit_id": 300}, "invalid options"),
    ],
)
def test_bad_endpoint_or_framer_is_a_configuration_error(
    endpoint: str, options: dict[str, Any], hint: str
) -> None:
    with pytest.raises(ConfigurationError, match=hint):
        ModbusDriver("x", endpoint, options, [ModbusPoint("a", "holding:0")])


def test_duplicate_keys_and_oversized_points_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="'a' appears twice"):
        ModbusDriver(
            "x", "tcp://h:502", {}, [ModbusPoint("a", "holding:0"), ModbusPoint("a", "coil:0")]
        )
    with pytest.raises(ConfigurationError, match=r"x: point 'd'.*max_registers = 2"):
        ModbusDriver(
            "x", "tcp://h:502", {"max_registers": 2}, [ModbusPoint("d", "holding:0", "float64")]
        )


# The tank's map read in many small blocks (max_registers 2, max_gap 0): eight requests a poll.
BLOCKY = [
    ModbusPoint("valve", "holding:0", "uint16", scale=0.1),
    ModbusPoint("hours", "holding:20", "uint32", scale=0.1),
    ModbusPoint("level", "input:0", "float32"),
    ModbusPoint("flow", "input:2", "int16", scale=0.01),
    ModbusPoint("vibration", "input:3", "float32"),
    ModbusPoint("temp", "input:6", "int16", scale=0.1),
    ModbusPoint("pump", "coil:0"),
    ModbusPoint("high", "discrete:0"),
]


@pytest.mark.parametrize(
    ("framer", "in_flight"), [("socket", 4), ("socket", 1), ("rtu", 1)], ids=["tcp4", "tcp1", "rtu"]
)
async def test_a_poll_keeps_up_to_max_in_flight_requests_at_the_device(
    framer: str, in_flight: int
) -> None:
    async with TankDevice(seed=3, tick_hz=0, framer=framer) as tank:
        # A slow device: requests sent before it answers the first wait in its queue, where
        # the server counts them.
        tank.faults.slow(0.03)
        tank.faults.exception(2, "input", [6])  # one refused block: only its point goes BAD
        options = {"framer": framer, "max_in_flight": in_flight, "max_registers": 2, "max_gap": 0}
        driver = ModbusDriver(
            "tank1",
            f"tcp://127.0.0.1:{tank.port}",
            {**FAST, "timeout_s": 2.0, **options},
            BLOCKY,
            backoff=Backoff(initial=0.05, cap=0.5),
        )
        assert len(driver.read_plan) == 8
        rec = Recorder(driver)
        try:
            await driver.start()
            good = [p.key for p in BLOCKY if p.key != "temp"]
            await rec.all(Quality.GOOD, good, within=10)
            await rec.until(lambda _: len(rec.batches) >= 3, within=10)
            assert rec.latest["temp"].quality is Quality.BAD
            assert "ILLEGAL DATA ADDRESS" in (rec.latest["temp"].reason or "")
            assert rec.latest["valve"].value == pytest.approx(tank.model.valve_pct)
            # Answers are applied in plan order, whichever came back first.
            order = [p.key for block in driver.read_plan for p in block.points]
            polls = [[s.key for s in b] for b in rec.batches if len(b) == len(BLOCKY)]
            assert polls and all(keys == order for keys in polls)
            # Exactly max_in_flight at once: pipelined over Modbus TCP when asked, never more
            # than one on a serial-style bus.
            assert tank.server.most_in_flight == in_flight
        finally:
            await driver.close()
            await rec.stop()


def test_an_rtu_bus_refuses_more_than_one_request_in_flight() -> None:
    with pytest.raises(ConfigurationError, match="serial bus carries one frame at a time"):
        ModbusDriver("tank1", "tcp://127.0.0.1:502", {"framer": "rtu", "max_in_flight": 2})
    with pytest.raises(ConfigurationError, match="max_in_flight 4 needs Modbus TCP"):
        ModbusDriver("meter", "serial:///dev/ttyUSB0", {"max_in_flight": 4})


async def test_an_overrunning_poll_is_logged_once_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="drivers")
    async with TankDevice(seed=3, tick_hz=0) as tank:
        tank.faults.slow(0.12)  # each poll takes longer than its 0.05 s interval
        driver = ModbusDriver(
            "tank1",
            f"tcp://127.0.0.1:{tank.port}",
            {**FAST, "timeout_s": 2.0},
            TANK_POINTS,
            backoff=Backoff(initial=0.05, cap=0.5),
        )
        rec = Recorder(driver)
        try:
            await driver.start()
            await rec.until(lambda _: driver.overruns >= 10, within=15)
            skipping = [m for m in caplog.messages if "polls are being skipped" in m]
            assert len(skipping) == 1, skipping
            assert skipping[0].startswith("tank1: a poll took ")
            assert "longer than its 0.05 s interval" in skipping[0]
            assert caplog.records[caplog.messages.index(skipping[0])].levelno == logging.WARNING

            tank.faults.slow(0)
            await rec.until(lambda _: any("fit their" in m for m in caplog.messages), within=10)
            skipped = driver.overruns
            fit = [r for r in caplog.records if "fit their 0.05 s interval again" in r.message]
            assert len(fit) == 1 and fit[0].levelno == logging.INFO
            assert f"({skipped} skipped so far)" in fit[0].message
            assert len([m for m in caplog.messages if "polls are being skipped" in m]) == 1
        finally:
            await driver.close()
            await rec.stop()
