"""The MQTT cloud sync (gateway.sync) against a real mosquitto, seen by a raw paho subscriber.

What a cloud consumer receives is checked on the wire: the birth first, then diffs whose
from/to revs chain, in rev order, `historical` on the backlog; the retained `state` with the
Last Will's `offline` when the connection dies and the clean one on stop; store-and-forward
across a broker outage and a gateway restart (every event once, by rev, no gap); `cmd/rebirth`
and `cmd/proposal` answered; a broker refusing the password reported in /health while the sync
keeps retrying. Most tests drive a TwinStore directly (fast, no plant); the proposal and /health
tests run a whole Gateway whose points are pushed (`driver: http`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml
from mqtt_support import MOSQUITTO_HINT, Mosquitto, mosquitto_binary
from tests_support import eventually, free_port

from drivers.contract import Quality, Sample
from gateway.app import Gateway
from gateway.config import SiteConfig, parse_config
from gateway.config.model import SyncConfig, SyncTlsConfig
from gateway.control.users import parse_grant
from gateway.demo import demo_config_data
from gateway.errors import ConfigError
from gateway.http import create_app
from gateway.sync import HOLD, SyncService
from gateway.sync import service as sync_service
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore
from plantsim import TankDevice

SITE, GW = "plant", "gw1"
BASE = f"aiw/v1/{SITE}/{GW}"
POINTS = [f"line1/mixer/p{i:02d}" for i in range(40)]
WAIT_S = 30.0  # generous: the machine is shared


# -- a raw subscriber: what the cloud sees --------------------------------------------------------


@dataclass
class Received:
    leaf: str
    body: Any  # the JSON payload
    retain: bool


@dataclass
class Subscriber:
    """A plain paho client subscribed to everything under the prefix, on its own thread."""

    port: int
    client_id: str = ""
    persistent: bool = False  # a broker-side session that outlives a broker restart
    messages: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=not self.persistent,
        )
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message

    def start(self) -> Subscriber:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self._subscribed.wait(WAIT_S), "the subscriber was never subscribed"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, leaf: str, payload: bytes | str, *, retain: bool = False) -> None:
        self.client.publish(f"{BASE}/{leaf}", payload, qos=1, retain=retain).wait_for_publish(
            WAIT_S
        )

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any):
        client.subscribe(f"{BASE}/#", qos=1)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage):
        leaf = message.topic[len(BASE) + 1 :]
        try:
            body = json.loads(message.payload)
        except ValueError:
            body = message.payload  # a command the test itself sent (any payload)
        with self._lock:
            self.messages.append(Received(leaf, body, message.retain))

    def of(self, leaf: str) -> list[Any]:
        with self._lock:
            return [m.body for m in self.messages if m.leaf == leaf]

    def stream(self) -> list[Received]:
        """Births and diffs, in arrival order."""
        with self._lock:
            return [m for m in self.messages if m.leaf in ("birth", "diff")]

    def events_through(self, rev: int) -> bool:
        diffs = self.of("diff")
        return bool(diffs) and max(d["to_rev"] for d in diffs) >= rev


@contextlib.contextmanager
def subscribed(port: int, **kwargs: Any) -> Iterator[Subscriber]:
    sub = Subscriber(port, **kwargs).start()
    try:
        yield sub
    finally:
        sub.stop()


def chain(received: list[Received]) -> tuple[list[int], int]:
    """Apply births and diffs as a cloud mirror does; return the revs of the events applied,
    once each, and how many events arrived again (resent after a reconnect).

    Fails on a gap: after the first diff, every diff must start at most one past the last rev
    the consumer has (resent diffs start lower and are applied from where it is).
    """
    applied: list[int] = []
    last: int | None = None
    again = 0
    for message in received:
        if message.leaf != "diff":
            continue
        diff = message.body
        if last is not None:
            assert diff["from_rev"] <= last + 1, f"gap: diff from {diff['from_rev']} after {last}"
        revs = [event["rev"] for event in diff["events"]]
        assert revs == sorted(set(revs)), "events of a diff out of order"
        assert all(diff["from_rev"] <= r <= diff["to_rev"] for r in revs)
        new = [r for r in revs if last is None or r > last]
        again += len(revs) - len(new)
        applied += new
        last = diff["to_rev"] if last is None else max(last, diff["to_rev"])
    return applied, again


# -- a twin store and its sync, without a gateway -------------------------------------------------


@dataclass
class Rig:
    path: Path
    broker: Mosquitto
    store: TwinStore
    syncs: list[SyncService] = field(default_factory=list)
    flows: list[Flow] = field(default_factory=list)
    n: int = 0

    def flow(self) -> Flow:
        """Start changes at a steady pace (stopped at the end of the test, if not before)."""
        flow = Flow(self)
        self.flows.append(flow)
        return flow

    def sync(self, **options: Any) -> SyncService:
        config = SyncConfig(broker=self.broker.url, reconnect_max_s=1.0, **options)
        points = {pid: PointDef(pid, "feed", "float64", unit="kg") for pid in POINTS}
        sync = SyncService(config, self.store, site_id=SITE, gateway_id=GW, points=points)
        self.syncs.append(sync)
        return sync

    def change(self, count: int) -> None:
        """Make `count` changes: each point in turn takes the next number."""
        samples = []
        for _ in range(count):
            self.n += 1
            samples.append(Sample(POINTS[self.n % len(POINTS)], float(self.n), Quality.GOOD))
        assert self.store.ingest(samples) == count

    async def committed(self) -> int:
        await self.store.aflush()
        return self.store.committed_rev

    async def reopen(self, **options: Any) -> None:
        """Close the store and open it again, as a restarted gateway does."""
        await asyncio.to_thread(self.store.close)
        self.store = TwinStore(self.path, list(self.store.points.values()), **options)
        await asyncio.to_thread(self.store.open)


@pytest.fixture
async def rig(tmp_path: Path, mosquitto: Mosquitto) -> AsyncIterator[Rig]:
    points = [PointDef(pid, "feed", "float64", unit="kg") for pid in POINTS]
    store = TwinStore(tmp_path / "twin.db", points)
    await asyncio.to_thread(store.open)
    rig = Rig(tmp_path / "twin.db", mosquitto, store)
    try:
        yield rig
    finally:
        for flow in rig.flows:
            await flow.stop()
        for sync in rig.syncs:
            await sync.stop()
        await asyncio.to_thread(rig.store.close)


class Flow:
    """Changes into the store at a steady pace, until stopped."""

    def __init__(self, rig: Rig, per_tick: int = 10, tick_s: float = 0.01) -> None:
        self.rig, self.per_tick, self.tick_s = rig, per_tick, tick_s
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.rig.change(self.per_tick)
            await asyncio.sleep(self.tick_s)

    async def reach(self, n: int) -> None:
        await eventually(lambda: self.rig.n >= n, WAIT_S, f"{n} changes made")

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# -- the stream -----------------------------------------------------------------------------------


async def test_birth_then_diffs_in_rev_order_from_where_the_sync_began(rig: Rig):
    rig.change(100)  # history from before the sync was configured: not replayed
    before = await rig.committed()
    with subscribed(rig.broker.port) as sub:
        sync = rig.sync(batch_max_events=250)
        await sync.start()
        await eventually(lambda: sub.of("birth"), WAIT_S, "the birth")
        for _ in range(20):
            rig.change(150)
            await asyncio.sleep(0.005)
        last = await rig.committed()
        await eventually(lambda: sub.events_through(last), WAIT_S, f"diffs through rev {last}")

        (state,) = sub.of("state")
        (birth,) = sub.of("birth")
        assert state["state"] == "online" and state["session"] == birth["session"]
        stream = sub.stream()
        assert stream[0].leaf == "birth", "the birth comes before any diff"
        assert birth["rev"] >= before and birth["twin_id"] == f"{SITE}/{GW}"
        assert set(birth["points"]) == set(POINTS)
        mixer = birth["points"][POINTS[before % len(POINTS)]]
        assert mixer["value"] == float(before) and mixer["unit"] == "kg"

        diffs = sub.of("diff")
        assert diffs[0]["from_rev"] == before + 1
        for previous, diff in itertools.pairwise(diffs):
            assert diff["from_rev"] == previous["to_rev"] + 1
        assert all(d["session"] == birth["session"] for d in diffs)
        assert all(len(d["events"]) <= 250 for d in diffs)
        applied, again = chain(stream)
        assert applied == list(range(before + 1, last + 1)) and again == 0
        events = [e for d in diffs for e in d["events"]]
        assert all(e["type"] == "TelemetryChanged" for e in events)
        assert [e["data"]["value"] for e in events] == [float(r) for r in applied]
        assert events[0]["id"] == f"cursor_{before + 1:06d}"
        assert all(d["historical"] == (d["to_rev"] <= birth["rev"]) for d in diffs)

        # The cursor follows the acks, and is persisted as the event-log hold.
        await eventually(lambda: sync.persisted == last, WAIT_S, "the cursor persisted")
        assert await asyncio.to_thread(rig.store.log_hold, HOLD) == last
        health = sync.health()
        assert health["state"] == "connected" and health["session"] == birth["session"]
        assert health["cursor"] == last and health["lag_revs"] == 0
        assert health["counts"]["diffs"] == len(diffs) and health["counts"]["births"] == 1
        assert sync.problems() == []

    # A consumer that arrives later finds the retained state.
    with subscribed(rig.broker.port) as late:
        await eventually(lambda: late.of("state"), WAIT_S, "the retained state")
        (retained,) = [m for m in late.messages if m.leaf == "state"]
        assert retained.retain and retained.body["state"] == "online"


async def test_the_last_will_says_offline_when_the_connection_dies(rig: Rig):
    with subscribed(rig.broker.port) as sub:
        sync = rig.sync()
        await sync.start()
        await eventually(lambda: sub.of("birth"), WAIT_S, "the first birth")
        first = sync.session
        # The gateway's end of the TCP connection closes without an MQTT DISCONNECT, as when
        # the process dies or the network drops it.
        conn = sync._conn
        sock = conn.client.socket() if conn is not None else None
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)

        def states() -> list[tuple[str, str]]:
            return [(s["state"], s["session"]) for s in sub.of("state")]

        await eventually(lambda: len(sub.of("birth")) >= 2, WAIT_S, "a new session's birth")
        second = sub.of("birth")[1]["session"]
        assert second != first
        assert states()[:3] == [("online", first), ("offline", first), ("online", second)]
        assert sync.counts["disconnects"] == 1 and sync.counts["connections"] == 2

        await sync.stop()  # a clean stop: `offline` published by the gateway itself
        await eventually(lambda: len(states()) >= 4, WAIT_S, "the clean offline")
        assert states()[3] == ("offline", second)
    with subscribed(rig.broker.port) as late:
        await eventually(lambda: late.of("state"), WAIT_S, "the retained state")
        assert late.of("state") == [
            {"state": "offline", "session": second, "ts": pytest.approx(time.time(), abs=60)}
        ]


def persistent_broker(tmp_path: Path) -> Mosquitto:
    """A mosquitto that keeps subscriptions and queued messages across its restart."""
    folder = tmp_path / "persistent-mosquitto"
    folder.mkdir()
    extra = f"persistence true\npersistence_location {folder}/\nautosave_interval 0"
    return Mosquitto(free_port(), folder, extra_config=extra)


async def test_a_broker_outage_under_load_loses_nothing(tmp_path: Path, rig: Rig):
    if mosquitto_binary() is None:
        pytest.skip(MOSQUITTO_HINT)
    broker = rig.broker = persistent_broker(tmp_path)
    broker.start()
    # The subscriber keeps its session across the broker's restart: what the broker queued for
    # it is not lost, so every gap would be the sync's.
    try:
        with subscribed(broker.port, client_id="cloud", persistent=True) as sub:
            sync = rig.sync(batch_max_events=50, keepalive_s=5)
            await sync.start()
            flow = rig.flow()
            await eventually(lambda: sum(len(d["events"]) for d in sub.of("diff")) >= 300, WAIT_S)
            await asyncio.to_thread(broker.stop)
            await flow.reach(rig.n + 300)  # changes keep coming while the broker is down
            await eventually(lambda: sync.state != "connected", WAIT_S, "the sync to notice")
            await asyncio.to_thread(broker.start)
            await eventually(lambda: len(sub.of("birth")) >= 2, WAIT_S, "a birth after the outage")
            await flow.reach(rig.n + 300)  # and flow on
            await flow.stop()
            last = await rig.committed()
            await eventually(lambda: sub.events_through(last), WAIT_S, f"diffs through rev {last}")

            stream = sub.stream()
            births = sub.of("birth")
            assert len({b["session"] for b in births}) == len(births) == 2
            applied, again = chain(stream)
            first = sub.of("diff")[0]["from_rev"]
            assert applied == list(range(first, last + 1)), "every event once, in rev order"
            # Only what was in flight when the broker went is sent again.
            assert again <= sync.config.max_inflight * sync.config.batch_max_events
            # After the outage: the backlog up to the new birth is historical, the rest live.
            after = births[1]
            later = [d for d in sub.of("diff") if d["session"] == after["session"]]
            assert any(d["historical"] and d["events"] for d in later)
            assert all(d["historical"] == (d["to_rev"] <= after["rev"]) for d in later)
            assert sync.counts["disconnects"] >= 1 and sync.counts["connections"] >= 2
        await sync.stop()
    finally:
        broker.kill()


async def test_the_cursor_survives_a_gateway_restart(rig: Rig):
    with subscribed(rig.broker.port) as sub:
        first = rig.sync()
        await first.start()
        rig.change(500)
        stopped_at = await rig.committed()
        await eventually(lambda: first.cursor == stopped_at, WAIT_S, "everything acknowledged")
        await first.stop()
        assert await asyncio.to_thread(rig.store.log_hold, HOLD) == stopped_at

        await rig.reopen()
        rig.change(400)  # while the gateway's sync is not running: backlog
        backlog_to = await rig.committed()
        second = rig.sync()
        await second.start()
        assert second.cursor == stopped_at
        await eventually(lambda: sub.events_through(backlog_to), WAIT_S, "the backlog")
        rig.change(100)
        last = await rig.committed()
        await eventually(lambda: sub.events_through(last), WAIT_S, "the live changes")

        births = sub.of("birth")
        assert len(births) == 2 and births[1]["rev"] >= backlog_to
        later = [d for d in sub.of("diff") if d["session"] == births[1]["session"]]
        assert later[0]["from_rev"] == stopped_at + 1, "resumed where it stopped"
        revs = [e["rev"] for d in later for e in d["events"]]
        assert revs == list(range(stopped_at + 1, last + 1)), "nothing twice, nothing missing"
        assert all(d["historical"] for d in later if d["to_rev"] <= backlog_to)
        assert not later[-1]["historical"]
        applied, again = chain(sub.stream())
        assert again == 0 and applied == sorted(set(applied))


async def test_rebirth_on_request_and_retained_commands_are_ignored(rig: Rig):
    with subscribed(rig.broker.port) as sub:
        # Left on the broker by someone: it must not make every connection rebirth.
        sub.publish("cmd/rebirth", b"", retain=True)
        sync = rig.sync()
        await sync.start()
        await eventually(lambda: sub.of("birth"), WAIT_S, "the birth")
        rig.change(20)
        await rig.committed()
        sub.publish("cmd/rebirth", b"please")
        await eventually(lambda: len(sub.of("birth")) >= 2, WAIT_S, "the rebirth")
        first, again = sub.of("birth")[:2]
        assert again["session"] == first["session"], "a rebirth keeps the session"
        assert again["rev"] >= first["rev"] + 20
        assert sync.counts["rebirth_requests"] == 1


async def test_an_expired_cursor_is_reported_and_skipped_not_stalled(rig: Rig):
    # A tiny bound on the event log, so that retention reaches past the sync's hold.
    await rig.reopen(event_log_minutes=0, event_log_max_mb=0.0005)
    sync = rig.sync()
    # The sync last delivered rev 10; then the cloud stayed away while the log outgrew its
    # bound, and retention dropped the oldest undelivered events anyway.
    await asyncio.to_thread(rig.store.hold_log, HOLD, 10)
    for _ in range(40):
        rig.change(100)
    await rig.committed()
    await asyncio.to_thread(rig.store.compact)
    start = rig.store.log_start_rev
    assert start > 11, "retention did not reach past the hold"
    with subscribed(rig.broker.port) as sub:
        await sync.start()
        last = await rig.committed()
        await eventually(lambda: sync.counts["backlog_dropped"] == 1, WAIT_S, "the drop noticed")
        await eventually(lambda: sub.events_through(last + 1), WAIT_S, "the drop's own event")
        drop = sync.last_backlog_drop
        assert drop is not None and (drop["from_rev"], drop["to_rev"]) == (11, start - 1)
        events = [e for d in sub.of("diff") for e in d["events"]]
        (dropped,) = [e for e in events if e["type"] == "SyncBacklogDropped"]
        assert (dropped["data"]["from_rev"], dropped["data"]["to_rev"]) == (11, start - 1)
        assert "event_log_max_mb" in dropped["data"]["reason"]
        revs = [e["rev"] for e in events]
        assert revs == list(range(start, last + 2)), "on from the log's start, nothing missing"
        assert sub.of("diff")[0]["from_rev"] == 11, "the chain has no hole: the event says why"
        assert sync.cursor >= last and sync.health()["last_backlog_drop"] is not None


# -- a whole gateway: proposals, credentials, /health ---------------------------------------------


VALVE = "utilities/cooling/tank1/inlet_valve"  # writable, 0-100 %


def gateway_config(tmp_path: Path, broker: str, **sync: Any) -> SiteConfig:
    """A gateway whose points are pushed (no driver, nothing to poll), syncing to `broker`."""
    data = {
        "site_id": SITE,
        "gateway_id": GW,
        "storage": {"path": str(tmp_path / "gw" / "twin.db")},
        "http": {"host": "127.0.0.1", "port": 0},
        "opcua_server": {"enabled": False},
        "devices": [
            {
                "name": "mixer",
                "driver": "http",
                "points": [{"id": pid, "datatype": "float64"} for pid in POINTS],
            }
        ],
        "sync": {"broker": broker, "reconnect_max_s": 1.0, **sync},
    }
    return parse_config(yaml.safe_dump(data), source="test")


def tank_config(tmp_path: Path, tank_port: int, broker: str) -> SiteConfig:
    """The demo's tank (a writable valve) on the simulated PLC, syncing to `broker`."""
    data = demo_config_data(device_ports={"tank1": tank_port}, http_port=0, opcua_port=0)
    data["devices"][0]["options"].update(poll_interval_s=0.1, timeout_s=0.3)
    data["storage"]["path"] = str(tmp_path / "gw" / "twin.db")
    data["opcua_server"]["enabled"] = False
    data["site_id"], data["gateway_id"] = SITE, GW
    data["sync"] = {"broker": broker, "reconnect_max_s": 1.0}
    return parse_config(yaml.safe_dump(data), source="test")


async def test_cloud_proposals_go_through_the_gate(
    tmp_path: Path, mosquitto: Mosquitto, aiohttp_client: Any
):
    async with TankDevice(seed=3, tick_hz=0) as tank:
        await _proposals_over_mqtt(tmp_path, mosquitto, aiohttp_client, tank.port)


async def _proposals_over_mqtt(
    tmp_path: Path, mosquitto: Mosquitto, aiohttp_client: Any, tank_port: int
) -> None:
    gw = Gateway(tank_config(tmp_path, tank_port, mosquitto.url))
    client = await aiohttp_client(create_app(gw))
    assert gw.accounts is not None and gw.sync is not None
    agent = await asyncio.to_thread(
        gw.accounts.create_token, "cloud-agent", [parse_grant("agent:utilities/*")]
    )
    viewer = await asyncio.to_thread(
        gw.accounts.create_token, "cloud-viewer", [parse_grant("viewer")]
    )
    with subscribed(mosquitto.port) as sub:
        await eventually(lambda: gw.sync is not None and gw.sync.state == "connected", WAIT_S)

        async def ask(payload: bytes | dict[str, Any]) -> dict[str, Any]:
            before = len(sub.of("reply/proposal"))
            raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            sub.publish("cmd/proposal", raw)
            await eventually(lambda: len(sub.of("reply/proposal")) > before, WAIT_S, "a reply")
            reply: dict[str, Any] = sub.of("reply/proposal")[before]
            return reply

        def proposal(token: str, request_id: str, **extra: Any) -> dict[str, Any]:
            body = {"request_id": request_id, "token": token, "point": VALVE, "value": 42.0}
            return {"reason": "the cloud optimiser says so", **body, **extra}

        ok = await ask(proposal(agent.secret, "r1"))
        assert ok["request_id"] == "r1" and ok["ok"] is True, ok
        record = ok["proposal"]
        assert record["source"] == "mqtt" and record["proposer"]["name"] == "cloud-agent"
        assert record["point"] == VALVE and record["value"] == 42.0
        assert gw.engine is not None and gw.engine.get(record["id"]).proposal.id == record["id"]

        refused = await ask(proposal("otw_not-a-token", "r2"))
        assert refused == {"request_id": "r2", "ok": False, "error": refused["error"]}
        assert "credentials refused" in refused["error"]

        denied = await ask(proposal(viewer.secret, "r3"))
        assert denied["ok"] is False and "denied" in denied["error"]
        assert denied["proposal"]["status"] == "rejected", "recorded, with an id to quote"

        unknown = await ask(proposal(agent.secret, "r4", point="utilities/cooling/tank1/nope"))
        assert not unknown["ok"] and "unknown point" in unknown["error"]

        garbage = await ask(b"\x00{not json")
        assert garbage == {
            "request_id": None,
            "ok": False,
            "error": "proposal: payload is not JSON",
        }
        missing = await ask({"request_id": "r5", "token": agent.secret, "point": VALVE})
        assert missing["request_id"] == "r5" and not missing["ok"] and "value" in missing["error"]
        text = await ask(proposal(agent.secret, "r6", value="42"))
        assert not text["ok"] and "`value`" in text["error"]
        huge = await ask(proposal(agent.secret, "r7", reason="x" * 70_000))
        assert not huge["ok"] and "exceeds" in huge["error"]

        # Still serving after all that; /health shows the sync and its counts.
        body = await (await client.get("/health")).json()
        assert body["sync"]["state"] == "connected" and body["sync"]["session"] == gw.sync.session
        counts = body["sync"]["counts"]
        assert counts["proposals"] == 1 and counts["commands_malformed"] == 4
        assert counts["proposals_refused"] == 3
        assert body["status"] == "ok", body["reasons"]


async def test_a_refused_password_is_reported_and_retried(
    tmp_path: Path, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
):
    if mosquitto_binary() is None:
        pytest.skip(MOSQUITTO_HINT)
    broker = Mosquitto(free_port(), tmp_path / "mq", passwords={"gw1": "right"})
    broker.start()
    try:
        secret = tmp_path / "broker-password"
        secret.write_text("wrong\n", encoding="utf-8")
        config = gateway_config(tmp_path, broker.url, username="gw1", password_file=str(secret))
        # Degraded after 60 s in production; a test does not wait that long.
        monkeypatch.setattr(sync_service, "DEGRADED_AFTER_S", 0.5)
        gw = Gateway(config)
        client = await aiohttp_client(create_app(gw))
        sync = gw.sync
        assert sync is not None
        await eventually(lambda: sync.counts["connect_failures"] >= 2, WAIT_S, "retries")
        await eventually(sync.problems, WAIT_S, "disconnected for longer than the bound")
        body = await (await client.get("/health")).json()
        assert (
            body["sync"]["state"] in ("connecting", "backoff") and body["sync"]["session"] is None
        )
        assert "refused the connection" in body["sync"]["last_error"]
        assert body["status"] == "degraded"
        (reason,) = [r for r in body["reasons"] if r.startswith("cloud sync")]
        assert broker.url in reason and "refused" in reason
        assert "wrong" not in json.dumps(body), "the password is never shown"

        # The right password (read at start): connected, and no longer degraded.
        await gw.stop()
        secret.write_text("right\n", encoding="utf-8")
        await gw.start()
        await eventually(lambda: gw.sync is not None and gw.sync.state == "connected", WAIT_S)
        body = await (await client.get("/health")).json()
        assert body["status"] == "ok", body["reasons"]
    finally:
        broker.kill()


async def test_an_unreadable_password_file_stops_the_start_naming_the_key(
    tmp_path: Path, mosquitto: Mosquitto
):
    secret = tmp_path / "broker-password"
    secret.write_text("pw\n", encoding="utf-8")
    config = gateway_config(tmp_path, mosquitto.url, username="gw1", password_file=str(secret))
    secret.unlink()
    gw = Gateway(config)
    with pytest.raises(ConfigError, match=r"sync\.password_file .*broker-password"):
        await gw.start()


# -- TLS ----------------------------------------------------------------------------------------


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a broker certificate for `localhost` only, and a client certificate (EC keys)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir()
    now = datetime.datetime.now(datetime.UTC)
    files: dict[str, Path] = {}

    def write(name: str, key: Any, cert: x509.Certificate) -> None:
        files[f"{name}_key"] = folder / f"{name}.key"
        files[f"{name}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        files[name] = folder / f"{name}.pem"
        files[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        name: str, issuer: x509.Name, signer: Any, key: Any, *, ca: bool = False, dns: str = ""
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if dns:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    write("ca", ca_key, issue("test CA", ca_name, ca_key, ca_key, ca=True))
    server_key = ec.generate_private_key(ec.SECP256R1())
    write("server", server_key, issue("localhost", ca_name, ca_key, server_key, dns="localhost"))
    client_key = ec.generate_private_key(ec.SECP256R1())
    write("client", client_key, issue("gw1", ca_name, ca_key, client_key))
    return files


async def test_tls_with_a_client_certificate_and_the_hostname_checked(tmp_path: Path, rig: Rig):
    pki = make_pki(tmp_path / "pki")
    tls_port = free_port()
    broker = Mosquitto(
        free_port(),
        tmp_path / "tls-mosquitto",
        extra_config=(
            f"listener {tls_port} 127.0.0.1\ncafile {pki['ca']}\ncertfile {pki['server']}\n"
            f"keyfile {pki['server_key']}\nrequire_certificate true"
        ),
    )
    broker.start()
    tls = {
        "ca_file": str(pki["ca"]),
        "cert_file": str(pki["client"]),
        "key_file": str(pki["client_key"]),
    }
    points = {pid: PointDef(pid, "feed", "float64") for pid in POINTS}

    def sync_to(host: str, **extra: Any) -> SyncService:
        config = SyncConfig.model_validate(
            {"broker": f"mqtts://{host}:{tls_port}", "reconnect_max_s": 1.0, "tls": tls | extra}
        )
        sync = SyncService(config, rig.store, site_id=SITE, gateway_id=GW, points=points)
        rig.syncs.append(sync)
        return sync

    try:
        with subscribed(broker.port) as sub:  # the plain listener of the same broker
            good = sync_to("localhost")
            await good.start()
            await eventually(lambda: sub.of("birth"), WAIT_S, "a birth over TLS")
            rig.change(10)
            last = await rig.committed()
            await eventually(lambda: sub.events_through(last), WAIT_S, "diffs over TLS")
            await good.stop()

            # The certificate names localhost, not 127.0.0.1: refused, unless told not to check.
            strict = sync_to("127.0.0.1")
            await strict.start()
            await eventually(lambda: strict.counts["connect_failures"] >= 1, WAIT_S)
            assert strict.session is None and "certificate" in (strict.last_error or "")
            await strict.stop()
            lax = sync_to("127.0.0.1", verify_hostname=False)
            await lax.start()
            await eventually(lambda: lax.state == "connected", WAIT_S, "connected by IP")
            await lax.stop()
    finally:
        broker.kill()


async def test_unusable_tls_files_stop_the_start_naming_the_key(tmp_path: Path, rig: Rig):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n", encoding="utf-8")
    config = SyncConfig(broker="mqtts://localhost:8883", tls=SyncTlsConfig(ca_file=junk))
    sync = SyncService(config, rig.store, site_id=SITE, gateway_id=GW, points={})
    with pytest.raises(ConfigError, match=r"sync\.tls\.ca_file .*junk\.pem"):
        await sync.start()
    config = SyncConfig(broker="mqtts://localhost:8883", tls=SyncTlsConfig(cert_file=junk))
    sync = SyncService(config, rig.store, site_id=SITE, gateway_id=GW, points={})
    with pytest.raises(ConfigError, match=r"sync\.tls\.cert_file .*junk\.pem"):
        await sync.start()
