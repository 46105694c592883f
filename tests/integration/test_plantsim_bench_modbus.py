"""The Modbus bench device over real TCP, read with pymodbus's plain client."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from pymodbus.client import AsyncModbusTcpClient

from plantsim import BenchModbusDevice, BenchModel, Plant
from plantsim.__main__ import _parser

POINTS = 300  # 600 registers: several reads of at most 125


@pytest.fixture
async def bench():
    """A bench device that only changes when the test says so (`advance`)."""
    async with BenchModbusDevice(POINTS, seed=3, port=0, tick_hz=0) as device:
        client = AsyncModbusTcpClient("127.0.0.1", port=device.port, timeout=2, retries=0)
        assert await client.connect()
        yield device, client
        client.close()


async def read_all(client: AsyncModbusTcpClient) -> list[float]:
    words: list[int] = []
    for start in range(0, 2 * POINTS, 124):
        count = min(124, 2 * POINTS - start)
        r = await client.read_holding_registers(start, count=count, device_id=1)
        assert not r.isError(), r
        words += r.registers
    # ABCD float32, decoded independently of the device's NumPy encoding.
    return list(struct.unpack(f">{POINTS}f", struct.pack(f">{2 * POINTS}H", *words)))


async def test_every_value_is_a_float32_in_range_and_changes_on_every_tick(bench):
    device, client = bench
    first = await read_all(client)
    device.advance(0.1)
    second = await read_all(client)

    assert len(first) == len(second) == POINTS
    assert all(5.0 < v < 95.0 for v in first + second)  # 50 ± 40 plus noise of sigma 0.5
    assert all(a != b for a, b in zip(first, second, strict=True))
    expected = device.words.view(">f4").astype(np.float64).tolist()
    assert second == expected
    # A read that reaches the last register ends a sweep: one per full read above.
    assert (device.sweeps, device.registers_read) == (2, 4 * POINTS)


async def test_reads_past_the_end_and_writes_are_refused(bench):
    device, client = bench
    past = await client.read_holding_registers(2 * POINTS - 2, count=4, device_id=1)
    inputs = await client.read_input_registers(0, count=2, device_id=1)
    write = await client.write_register(0, 1, device_id=1)

    assert (past.exception_code, inputs.exception_code, write.exception_code) == (2, 2, 2)
    assert device.sweeps == 0


def test_same_seed_gives_same_values_and_bad_counts_are_refused():
    a, b = BenchModel(50, seed=1), BenchModel(50, seed=1)
    assert np.array_equal(a.words(), b.words())
    with pytest.raises(ValueError, match=r"outside 1\.\.32767"):
        BenchModel(40_000)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--bench-points", "40000"])


async def test_plant_runs_the_bench_device_when_asked():
    async with Plant(seed=1, bench_points=10, bench_port=0) as plant:
        assert plant.bench is not None
        assert plant.devices["bench"] is plant.bench
        assert plant.bench.port > 0
        assert plant.bench.summary.endswith("10 float32 in holding 0..19")
