"""/health and the read endpoints when storage or a device fails, over the real HTTP app.

The plant is hardware-sim over real Modbus sockets; storage failures are real SQLite ones (a full
database through `limit_database_growth`, garbage written over pages of the open file).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tests_support import eventually, free_port, plant_config

from drivers.contract import Quality, Sample
from gateway.app import Gateway
from gateway.http import create_app
from gateway.twin.store import TwinStore
from plantsim import MeterDevice, TankDevice

LEVEL = "utilities/cooling/tank1/level"


@pytest.fixture
async def plant() -> AsyncIterator[tuple[TankDevice, MeterDevice]]:
    async with (
        TankDevice(seed=3, tick_hz=0) as tank,
        MeterDevice(seed=3, tick_hz=0, word_order="little") as meter,
    ):
        yield tank, meter


async def health(client: Any) -> dict[str, Any]:
    resp = await client.get("/health")
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


async def test_health_is_degraded_while_the_twin_cannot_commit(tmp_path, plant, aiohttp_client):
    tank, meter = plant
    gw = Gateway(plant_config(tmp_path, tank.port, meter.port))
    client = await aiohttp_client(create_app(gw))
    await eventually(lambda: gw.store.stats.committed_rev > 0, what="first commits")
    assert (await health(client))["status"] == "ok"

    gw.store.limit_database_growth(0)  # the disk is full from now on

    def plant_moves_until_the_writer_fails() -> bool:
        tank.advance(5.0)  # the level moves: rows to commit, until a commit needs a new page
        return gw.store.stats.writer_error is not None

    await eventually(plant_moves_until_the_writer_fails, what="the writer to fail")
    body = await health(client)
    assert body["status"] == "degraded"
    (reason,) = [r for r in body["reasons"] if "twin database" in r]
    assert "cannot be written" in reason and "full" in reason and str(gw.store.path) in reason

    gw.store.limit_database_growth(None)
    await gw.store.aflush()
    body = await health(client)
    assert body["status"] == "ok", body["reasons"]
    assert body["reasons"] == []
    # Where the log and the history stand: everything committed, nothing compacted yet.
    storage = body["storage"]
    assert storage["committed_rev"] == gw.store.committed_rev >= storage["uncompacted_samples"] > 0
    assert storage["compacted_rev"] == 0 and storage["log_start_rev"] == 1
    assert storage["event_log_bytes"] > 0
    assert storage["database_bytes"] >= gw.store.path.stat().st_size
    await asyncio.to_thread(gw.store.compact)
    storage = (await health(client))["storage"]
    assert storage["compacted_rev"] > 0
    assert storage["uncompacted_samples"] < gw.store.committed_rev


async def test_health_is_degraded_when_every_point_of_a_connected_device_is_bad(
    tmp_path, plant, aiohttp_client
):
    tank, meter = plant
    gw = Gateway(plant_config(tmp_path, tank.port, meter.port))
    client = await aiohttp_client(create_app(gw))
    await eventually(
        lambda: all(v.quality is Quality.GOOD for v in gw.store.snapshot()[1].values()),
        what="every point GOOD",
    )
    assert (await health(client))["status"] == "ok"

    tank.faults.exception(4)  # every request to the tank is refused; the connection stays up
    await eventually(
        lambda: all(
            v.quality is Quality.BAD
            for pid, v in gw.store.snapshot()[1].items()
            if gw.points[pid].device == "tank1"
        ),
        what="every tank point BAD",
    )
    body = await health(client)
    assert body["devices"]["tank1"]["state"] == "CONNECTED"
    assert body["status"] == "degraded"
    (reason,) = body["reasons"]
    assert reason.startswith("device tank1: all") and "BAD" in reason
    assert "exception 4" in reason.lower()

    tank.faults.clear()
    await eventually(
        lambda: gw.store.get(LEVEL).quality is Quality.GOOD, within=15, what="level GOOD"
    )
    await eventually(
        lambda: all(
            v.quality is Quality.GOOD
            for pid, v in gw.store.snapshot()[1].items()
            if gw.points[pid].device == "tank1"
        ),
        within=15,
        what="every tank point GOOD",
    )
    assert (await health(client))["status"] == "ok"


async def test_reads_of_a_corrupted_database_answer_503_and_health_says_corrupt(
    tmp_path, aiohttp_client
):
    # Devices nobody answers: the writer stays idle, so nothing rewrites the damaged pages.
    config = plant_config(tmp_path, free_port(), free_port())
    points = list(Gateway(config).points.values())
    with TwinStore(config.storage.path, points) as store:  # history from an earlier run
        for i in range(3000):
            store.ingest([Sample(LEVEL, float(i), Quality.GOOD)])
            store.flush()  # a frame each: pages of history not compacted yet
    gw = Gateway(config)
    client = await aiohttp_client(create_app(gw))
    _overwrite_pages(config.storage.path)

    for path, params in (
        ("/telemetry/query", {"point": LEVEL, "start": "0"}),
        ("/telemetry/aggregate", {"point": LEVEL, "bucket_s": "60"}),  # the last hour
    ):
        resp = await client.get(path, params=params)
        assert resp.status == 503, await resp.text()
        body = await resp.json()
        assert "corrupt" in body["error"] and "Traceback" not in body["error"]
    body = await health(client)
    assert body["status"] == "degraded"
    assert any("corrupt" in r for r in body["reasons"]), body["reasons"]
    # What the twin holds in memory is still served.
    assert (await client.get(f"/twin/{LEVEL}")).status == 200


def _overwrite_pages(path: Path) -> None:
    """Garbage over the older leaf pages of the frames table (recent history), in the main file.

    Only old leaves: the running writer appends at the right edge of the tree and never reads
    them, so the damage stays where a history read finds it and shutdown still commits cleanly.
    """
    with sqlite3.connect(path) as conn:
        # Every page into the main file. The running gateway may hold the WAL for a moment (a
        # device state event committing): a checkpoint that could not finish leaves the newest
        # copies of the pages in the WAL, where reads would find them undamaged.
        for _ in range(100):
            busy, wal_pages, copied = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy == 0 and wal_pages in (0, copied):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("could not checkpoint the WAL into the main file")
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'frames'"
        ).fetchone()
    data = path.read_bytes()
    size = int.from_bytes(data[16:18], "big")
    leaves = _table_leaves(data, size, root)
    assert len(leaves) > 4, "not enough history to damage"
    garbage = random.Random(11)
    with path.open("r+b") as f:
        for number in leaves[:-2]:
            f.seek((number - 1) * size)
            f.write(garbage.randbytes(size))


def _table_leaves(data: bytes, size: int, page: int) -> list[int]:
    """Leaf page numbers of the table b-tree rooted at `page`, left to right."""
    base = (page - 1) * size
    header = base + (100 if page == 1 else 0)
    kind = data[header]
    if kind == 0x0D:  # table leaf
        return [page]
    assert kind == 0x05, f"page {page}: not a table b-tree page ({kind:#x})"
    cells = int.from_bytes(data[header + 3 : header + 5], "big")
    rightmost = int.from_bytes(data[header + 8 : header + 12], "big")
    children = []
    for i in range(cells):
        offset = int.from_bytes(data[header + 12 + 2 * i : header + 14 + 2 * i], "big")
        children.append(int.from_bytes(data[base + offset : base + offset + 4], "big"))
    return [leaf for child in [*children, rightmost] for leaf in _table_leaves(data, size, child)]
