"""End to end: a gateway's cloud sync through a real mosquitto to the mirror, and back to equal.

Each test drives a stream of twin changes, disturbs the path (the broker stopped under load, the
gateway killed with SIGKILL, a diff lost on the way), lets the stream pause, and then checks
what a cloud user would: the mirror's twin equals the gateway's `/twin` point by point (value,
quality, timestamps, rev, reason), no gap is left unrepaired, and the events the mirror recorded
are the gateway's own committed events, in strictly increasing rev order, none missing.

In-process gateways are fed through `store.ingest` (a `driver: http` device: no polling, so the
stream pauses when the test says); the SIGKILL test runs `opstwin run` as a subprocess polling
the simulated plant over Modbus.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from mqtt_support import MOSQUITTO_HINT, Mosquitto, mosquitto_binary
from tests_support import free_port, stored_revs

from drivers.contract import Quality, Sample
from gateway.app import Gateway
from gateway.config import SiteConfig, parse_config
from gateway.http import create_app
from gateway.mirror.client import Mirror

SITE, GW = "plant", "gw1"
POINTS = [f"line1/feed/p{i:02d}" for i in range(20)]
# What a mirrored point and a /twin point must agree on.
COMPARED = ("value", "quality", "source_ts", "gateway_ts", "rev", "reason")
CONVERGE_S = 30.0


def site_config(tmp_path: Path, broker: str, **sync: Any) -> SiteConfig:
    """A gateway whose 20 points are pushed (no driver), syncing to `broker`."""
    data = {
        "site_id": SITE,
        "gateway_id": GW,
        "storage": {"path": str(tmp_path / "twin.db")},
        "http": {"host": "127.0.0.1", "port": 0},
        "opcua_server": {"enabled": False},
        "devices": [
            {
                "name": "feed",
                "driver": "http",
                "points": [{"id": pid, "datatype": "float64", "unit": "kg"} for pid in POINTS],
            }
        ],
        "sync": {
            "broker": broker,
            "keepalive_s": 5,
            "reconnect_max_s": 1.0,
            "batch_max_events": 50,  # many small diffs: more chances for things to go wrong
            **sync,
        },
    }
    return parse_config(yaml.safe_dump(data), source="test")


class Stream:
    """Changes into a twin store at a steady pace, until paused."""

    def __init__(self, gw: Gateway, per_tick: int = 5, tick_s: float = 0.01) -> None:
        self.gw, self.per_tick, self.tick_s = gw, per_tick, tick_s
        self.n = 0
        self._task: asyncio.Task[None] | None = None
        self._moved = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def pause(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            samples = []
            for _ in range(self.per_tick):
                self.n += 1
                quality = Quality.UNCERTAIN if self.n % 17 == 0 else Quality.GOOD
                reason = "drifting" if quality is Quality.UNCERTAIN else None
                pid = POINTS[self.n % len(POINTS)]
                samples.append(Sample(pid, float(self.n), quality, time.time(), reason))
            self.gw.store.ingest(samples)
            moved, self._moved = self._moved, asyncio.Event()
            moved.set()
            await asyncio.sleep(self.tick_s)

    async def reach(self, n: int) -> None:
        """Wait until `n` changes have been made in all."""
        while self.n < n:
            await self._moved.wait()


@contextlib.asynccontextmanager
async def running_gateway(
    config: SiteConfig, aiohttp_client: Any
) -> AsyncIterator[tuple[Gateway, Any]]:
    """A gateway with its HTTP app; the app starts and stops it, and with it the cloud sync."""
    gw = Gateway(config)
    client = await aiohttp_client(create_app(gw))
    assert gw.sync is not None, "sync.broker is set: the gateway runs the cloud sync"
    yield gw, client


async def twin_points(client: Any) -> tuple[int, dict[str, dict[str, Any]]]:
    resp = await client.get("/twin")
    assert resp.status == 200
    body = await resp.json()
    return body["rev"], {pid: {k: p[k] for k in COMPARED} for pid, p in body["points"].items()}


def mirrored_points(mirror: Mirror) -> dict[str, dict[str, Any]]:
    twin = mirror.twin(SITE, GW)
    return {pid: {k: p[k] for k in COMPARED} for pid, p in twin["points"].items()}


async def converge(
    mirror: Mirror, committed: Callable[[], int], within_s: float = CONVERGE_S
) -> None:
    """Wait until the mirror holds every committed rev and awaits no birth."""

    def caught_up() -> bool:
        found = mirror.state.find(SITE, GW)
        return (
            found is not None
            and not found.awaiting
            and found.covered_rev is not None
            and found.covered_rev >= committed()
        )

    try:
        await mirror.wait_until(caught_up, within_s)
    except TimeoutError:
        found = mirror.state.find(SITE, GW)
        stats = found.stats() if found is not None else None
        pytest.fail(f"the mirror did not catch up with rev {committed()} in {within_s}s: {stats}")


async def assert_mirror_equals_twin(mirror: Mirror, client: Any) -> None:
    rev, points = await twin_points(client)
    assert mirror.twin(SITE, GW)["rev"] == rev
    assert mirrored_points(mirror) == points


def assert_history_whole(mirror: Mirror, logged: list[Any]) -> None:
    """The mirror's events are the gateway's committed events after the mirror's first birth:
    same revs, same types and data, strictly increasing."""
    history = mirror.history(SITE, GW)
    assert history, "the mirror recorded no events"
    revs = [e["rev"] for e in history]
    assert revs == sorted(set(revs)), "the mirror's events are not in strictly increasing order"
    expected = [e for e in logged if revs[0] <= e.rev <= revs[-1]]
    missing = sorted({e.rev for e in expected} - set(revs))
    assert not missing, f"{len(missing)} events missing from the mirror, first {missing[:5]}"
    assert revs == [e.rev for e in expected]
    for got, want in zip(history, expected, strict=True):
        assert (got["type"], got["point_id"]) == (want.type, want.point_id)
        if want.type == "TelemetryChanged":
            assert got["data"]["value"] == want.data["value"]
            assert got["data"]["quality"] == str(want.data["quality"])


async def logged_events(gw: Gateway) -> list[Any]:
    await gw.store.aflush()
    return await asyncio.to_thread(gw.store.events_since, 0, 10_000_000)


def persistent_broker(tmp_path: Path) -> Mosquitto:
    """A mosquitto that keeps sessions and queued messages across a restart (to disk on stop)."""
    if mosquitto_binary() is None:
        pytest.skip(MOSQUITTO_HINT)
    folder = tmp_path / "mosquitto"
    folder.mkdir()
    # The later `persistence` line overrides the helper's `persistence false`.
    extra = f"persistence true\npersistence_location {folder}/\nautosave_interval 0"
    return Mosquitto(free_port(), folder, extra_config=extra)


# -- the tests ------------------------------------------------------------------------------------


async def test_steady_stream_mirror_equals_twin(tmp_path, mosquitto, aiohttp_client):
    config = site_config(tmp_path, mosquitto.url)
    async with running_gateway(config, aiohttp_client) as (gw, client):
        stream = Stream(gw)
        stream.start()
        await asyncio.sleep(0.3)  # the mirror joins a gateway that is already streaming
        async with Mirror("127.0.0.1", mosquitto.port) as mirror:
            await _wait_events(mirror, 300)
            await stream.pause()
            await gw.store.aflush()
            await converge(mirror, lambda: gw.store.committed_rev)
            await assert_mirror_equals_twin(mirror, client)
            stats = mirror.stats(SITE, GW)
            assert stats["gaps"] == 0 and stats["malformed"] == 0
            assert_history_whole(mirror, await logged_events(gw))


async def _wait_events(mirror: Mirror, n: int) -> None:
    def enough() -> bool:
        found = mirror.state.find(SITE, GW)
        return found is not None and found.counts["events"] >= n

    await mirror.wait_until(enough, CONVERGE_S)


async def test_broker_stopped_under_load_then_restarted(tmp_path, aiohttp_client):
    broker = persistent_broker(tmp_path)
    broker.start()
    try:
        config = site_config(tmp_path, broker.url)
        # A persistent session: the broker keeps what the mirror has not read across its own
        # restart, so the mirror's event history can be whole, not only its state.
        mirror = Mirror(
            "127.0.0.1", broker.port, client_id="e2e-mirror", persistent=True, reconnect_max_s=1.0
        )
        async with running_gateway(config, aiohttp_client) as (gw, client), mirror:
            stream = Stream(gw)
            stream.start()
            await _wait_events(mirror, 200)
            await asyncio.to_thread(broker.stop)
            during = stream.n
            await stream.reach(during + 300)  # changes keep coming while the broker is down
            seen = mirror.stats(SITE, GW)["events"]
            await asyncio.to_thread(broker.start)
            await _wait_events(mirror, seen + 500)  # flowing again, backlog and live
            await stream.pause()
            await gw.store.aflush()
            await converge(mirror, lambda: gw.store.committed_rev)
            await assert_mirror_equals_twin(mirror, client)
            stats = mirror.stats(SITE, GW)
            assert stats["historical_events"] > 0, "the outage's backlog was not historical"
            assert stats["gaps"] == 0 and not stats["awaiting_birth"], stats
            assert_history_whole(mirror, await logged_events(gw))
    finally:
        broker.kill()


async def test_a_dropped_diff_is_detected_and_repaired_by_a_rebirth(
    tmp_path, mosquitto, aiohttp_client
):
    config = site_config(tmp_path, mosquitto.url)
    mirror = Mirror("127.0.0.1", mosquitto.port)
    async with running_gateway(config, aiohttp_client) as (gw, client), mirror:
        diffs: list[tuple[int, int]] = []

        def drop_the_fifth(site: str, gateway: str, payload: bytes) -> bool:
            body = json.loads(payload)
            diffs.append((body["from_rev"], body["to_rev"]))
            return len(diffs) == 5

        stream = Stream(gw)
        stream.start()
        # Once the mirror follows the chain (born, applying diffs): a diff lost now is a gap.
        # (Before its first birth the mirror holds diffs, and the birth covers a lost one.)
        await _wait_events(mirror, 100)
        mirror.drop_diff = drop_the_fifth
        await _wait_events(mirror, 400)
        await stream.pause()
        await gw.store.aflush()
        await converge(mirror, lambda: gw.store.committed_rev)
        await assert_mirror_equals_twin(mirror, client)
        stats = mirror.stats(SITE, GW)
        assert mirror.dropped == 1
        assert stats["gaps"] == 1 and stats["rebirths"] >= 1 and stats["births"] >= 2
        # The lost diff's events are the one hole in the history; the state has them.
        found = mirror.state.find(SITE, GW)
        assert found is not None and found.history_holes == [diffs[4]]
        lost = set(range(diffs[4][0], diffs[4][1] + 1))
        logged = [e for e in await logged_events(gw) if e.rev not in lost]
        history = mirror.history(SITE, GW)
        split = next(i for i, e in enumerate(history) if e["rev"] > diffs[4][1])
        assert_history_whole_parts(mirror, logged, split)


def assert_history_whole_parts(mirror: Mirror, logged: list[Any], split: int) -> None:
    """`assert_history_whole` on each side of a hole."""
    history = mirror.history(SITE, GW)
    for part in (history[:split], history[split:]):
        revs = [e["rev"] for e in part]
        assert revs == sorted(set(revs))
        assert revs == [e.rev for e in logged if revs[0] <= e.rev <= revs[-1]]


async def test_cli_once_prints_the_twin_of_a_running_gateway(tmp_path, mosquitto, aiohttp_client):
    config = site_config(tmp_path, mosquitto.url)
    async with running_gateway(config, aiohttp_client) as (gw, client):
        stream = Stream(gw)
        stream.start()
        await stream.reach(200)
        await stream.pause()
        await gw.store.aflush()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "mirror",
            "--broker",
            mosquitto.url,
            "--once",
            "--timeout",
            "20",
            "--json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        (line,) = out.decode().splitlines()
        twin = json.loads(line)
        rev, points = await twin_points(client)
        assert (twin["site_id"], twin["gateway_id"], twin["rev"]) == (SITE, GW, rev)
        assert {pid: {k: p[k] for k in COMPARED} for pid, p in twin["points"].items()} == points
        assert {p["unit"] for p in twin["points"].values()} == {"kg"}


# -- a gateway process killed with SIGKILL mid-stream ---------------------------------------------


def plant_site_file(
    tmp_path: Path, tank_port: int, meter_port: int, http_port: int, broker: str
) -> Path:
    from gateway.demo import demo_config_data

    data = demo_config_data(
        device_ports={"tank1": tank_port, "meter1": meter_port}, http_port=http_port, opcua_port=0
    )
    for device in data["devices"]:
        device["options"].update(poll_interval_s=0.05, timeout_s=0.5)
    data["site_id"], data["gateway_id"] = SITE, GW
    data["storage"]["path"] = str(tmp_path / "twin.db")
    data["opcua_server"]["enabled"] = False
    data["http"]["host"] = "127.0.0.1"
    data["sync"] = {
        "broker": broker,
        "keepalive_s": 5,
        "reconnect_max_s": 1.0,
        "batch_max_events": 20,
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


class GatewayProcess:
    """`opstwin run` as a child process, killed or stopped by the test."""

    def __init__(self, config: Path, http_port: int, log: Path) -> None:
        self.config, self.http_port, self.log = config, http_port, log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, session: Any) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway.cli",
                "run",
                "--config",
                str(self.config),
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.returncode is None, (
                f"the gateway exited: {self.log.read_text()[-3000:]}"
            )
            with contextlib.suppress(OSError, TimeoutError):
                async with session.get(self.url("/health"), timeout=2) as resp:
                    if resp.status == 200:
                        return
            assert time.monotonic() < deadline, f"no /health: {self.log.read_text()[-3000:]}"
            await asyncio.sleep(0.2)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def test_gateway_killed_mid_stream_and_restarted(tmp_path, mosquitto):
    import aiohttp

    from plantsim import MeterDevice, TankDevice

    http_port = free_port()
    async with (
        TankDevice(seed=3, tick_hz=0) as tank,
        MeterDevice(seed=3, tick_hz=0, word_order="little") as meter,
        aiohttp.ClientSession() as session,
        Mirror("127.0.0.1", mosquitto.port) as mirror,
    ):
        site = plant_site_file(tmp_path, tank.port, meter.port, http_port, mosquitto.url)
        gateway = GatewayProcess(site, http_port, tmp_path / "gateway.log")

        async def plant_moves() -> None:
            while True:
                tank.advance(2.0)
                meter.advance(2.0)
                await asyncio.sleep(0.02)

        mover = asyncio.create_task(plant_moves())
        try:
            await gateway.start(session)
            await _wait_events(mirror, 100)
            await gateway.kill()  # mid-stream: the plant keeps moving
            killed_at = mirror.stats(SITE, GW)["events"]
            await gateway.start(session)
            await _wait_events(mirror, killed_at + 100)
            mover.cancel()
            # The plant is still; wait until the gateway has committed its last change.
            health = await _quiet_health(session, gateway)
            await converge(mirror, lambda: health["storage"]["committed_rev"])
            async with session.get(gateway.url("/twin")) as resp:
                body = await resp.json()
            points = {pid: {k: p[k] for k in COMPARED} for pid, p in body["points"].items()}
            assert mirror.twin(SITE, GW)["rev"] == body["rev"]
            assert mirrored_points(mirror) == points
            stats = mirror.stats(SITE, GW)
            assert not stats["awaiting_birth"] and stats["births"] >= 2
            assert stats["resets"] == 0
        finally:
            mover.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await mover
            await gateway.stop()  # never leave a gateway process behind a failed test
        # Every committed rev the gateway's database holds, from the mirror's first: all there.
        with contextlib.closing(sqlite3.connect(tmp_path / "twin.db")) as conn:
            revs = stored_revs(conn)
        history = [e["rev"] for e in mirror.history(SITE, GW)]
        assert history == sorted(set(history))
        first, last = history[0], history[-1]
        assert history == [r for r in revs if first <= r <= last]
        # The restarted gateway resent from its persisted cursor: overlaps, never a gap.
        assert stats["gaps"] == 0 and stats["history_holes"] == 0, stats


async def _quiet_health(session: Any, gateway: GatewayProcess) -> dict[str, Any]:
    """/health once the gateway's rev stops moving and is committed."""
    last = None
    deadline = time.monotonic() + CONVERGE_S
    while True:
        async with session.get(gateway.url("/health")) as resp:
            health = await resp.json()
        if health["rev"] == health["storage"]["committed_rev"] == last:
            return health
        last = health["rev"] if health["rev"] == health["storage"]["committed_rev"] else None
        assert time.monotonic() < deadline, f"the gateway did not go quiet: {health}"
        await asyncio.sleep(0.5)
