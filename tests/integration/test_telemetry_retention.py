"""`/telemetry/query` and `/telemetry/aggregate` over raw and downsampled history, through the
gateway's real HTTP app on a database whose older history retention has folded into buckets."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from tests_support import FakeClock, plant_config

from drivers.contract import Quality, Sample
from gateway.app import Gateway
from gateway.devices import point_defs
from gateway.http import create_app
from gateway.twin.store import TwinStore
from plantsim import MeterDevice, TankDevice

LEVEL = "utilities/cooling/tank1/level"
DAY = 86400.0


@pytest.fixture
async def plant() -> AsyncIterator[tuple[TankDevice, MeterDevice]]:
    async with (
        TankDevice(seed=5, tick_hz=0) as tank,
        MeterDevice(seed=5, tick_hz=0, word_order="little") as meter,
    ):
        yield tank, meter


async def test_reads_span_raw_and_downsampled_history(tmp_path, plant, aiohttp_client) -> None:
    tank, meter = plant
    config = plant_config(tmp_path, tank.port, meter.port)
    # 40 days of the level, one sample a minute, ending an hour ago; the gateway keeps 30 days
    # raw: retention folds the first 10 into one-minute buckets.
    now = time.time()
    start = (now - 40 * DAY) // 3600 * 3600
    clock = FakeClock(start)
    fed: list[tuple[float, float]] = []
    with TwinStore(config.storage.path, point_defs(config), clock=clock) as store:
        t = start
        while t < now - 3600:
            clock.now = t
            value = round(2.0 + ((t - start) / 3600) % 24 / 10, 2)
            if store.ingest([Sample(LEVEL, value, Quality.GOOD)]):  # past the deadband
                fed.append((t, value))
            t += 60
            if t % DAY == 0:
                store.compact()  # a block a day (the writer compacts every few minutes)
        store.compact()
        result = store.prune(now)
    assert result.history_rows > 0

    gateway = Gateway(config)
    client = await aiohttp_client(create_app(gateway))
    params: dict[str, Any] = {"point": LEVEL, "start": str(start), "end": str(now - 3600)}
    answer = await client.get("/telemetry/aggregate", params={**params, "bucket_s": str(DAY)})
    assert answer.status == 200
    buckets = (await answer.json())["buckets"]
    by_day: dict[int, list[float]] = {}
    for ts, value in fed:
        by_day.setdefault(int((ts - start) // DAY), []).append(value)
    assert [b["count"] for b in buckets] == [len(v) for _, v in sorted(by_day.items())]
    assert [b["max"] for b in buckets] == [max(v) for _, v in sorted(by_day.items())]
    for bucket, (_, values) in zip(buckets, sorted(by_day.items()), strict=True):
        assert bucket["mean"] == pytest.approx(sum(values) / len(values))

    # The oldest day as rows: one per stored minute, marked; the newest as recorded changes.
    first_day = {**params, "end": str(start + DAY - 1), "limit": "5000"}
    rows = (await (await client.get("/telemetry/query", params=first_day)).json())["rows"]
    assert len(rows) == len(by_day[0]) and all(r["downsampled"] for r in rows)
    assert all(r["rev"] == 0 for r in rows)
    recent = {**params, "start": str(now - 2 * DAY)}
    rows = (await (await client.get("/telemetry/query", params=recent)).json())["rows"]
    assert rows and not any(r["downsampled"] for r in rows) and all(r["rev"] > 0 for r in rows)
    storage = (await (await client.get("/health")).json())["storage"]
    assert 0 < storage["used_bytes"] <= storage["bound_bytes"]
