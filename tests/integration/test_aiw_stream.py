"""AIW read streams on a real gateway over real sockets: /twin with committed ETags, /diff pages
and 410 Gone, and the /subscribe SSE stream (replay, live, resume, heartbeats, limits, shutdown).

The gateway's devices point at ports nobody listens on: after each device's one DISCONNECTED
transition the twin is quiet, and every later change is the test's own (ingest, append_event).
What a client should have received is read from the event log itself (`events_since`), never
from a count the test assumes. The server runs as serve.py runs it (an AppRunner, no handler
cancellation), so a client that leaves is noticed the way production notices it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from tests_support import eventually, free_port

from drivers.contract import Quality, Sample
from gateway.aiw.events import cursor
from gateway.aiw.stream import STREAM_ROUTES, StreamRoutes
from gateway.app import Gateway
from gateway.config import parse_config
from gateway.demo import demo_config_data
from gateway.http import create_app

LEVEL = "utilities/cooling/tank1/level"
TWIN_ID = "demo-plant/gw-demo-01"


# -- the site under test --------------------------------------------------------------------------


@dataclass
class Site:
    """A running gateway, its HTTP server and a client session to it."""

    gateway: Gateway
    routes: StreamRoutes
    runner: web.AppRunner
    url: str
    session: aiohttp.ClientSession
    values: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    stopped: bool = False

    @property
    def store(self) -> Any:
        return self.gateway.store

    def change(self, n: int = 1) -> int:
        """Ingest `n` changes of the tank level, a batch each; return the last rev."""
        for _ in range(n):
            self.store.ingest([Sample(LEVEL, float(next(self.values)), Quality.GOOD)])
        return int(self.store.rev)

    async def log(self, after: int = 0) -> list[int]:
        """The revs of every event after `after`, once all is committed."""
        await self.store.aflush()
        events = await asyncio.to_thread(self.store.events_since, after, 1_000_000)
        return [e.rev for e in events]

    async def get(self, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        return await self.session.get(path, **kwargs)

    async def json(self, path: str, status: int = 200, **kwargs: Any) -> Any:
        async with self.session.get(path, **kwargs) as resp:
            assert resp.content_type == "application/json", await resp.text()
            assert resp.status == status, await resp.text()
            return await resp.json()

    async def stop_server(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()

    async def close(self) -> None:
        await self.session.close()
        await self.stop_server()


MakeSite = Callable[..., Awaitable[Site]]


@pytest.fixture
async def make_site(tmp_path: Path) -> AsyncIterator[MakeSite]:
    sites: list[Site] = []

    async def make(http: dict[str, Any] | None = None, storage: dict[str, Any] | None = None):
        folder = tmp_path / f"site{len(sites)}"
        data = demo_config_data(
            device_ports={"tank1": free_port(), "meter1": free_port()}, http_port=0, opcua_port=0
        )
        data["storage"]["path"] = str(folder / "twin.db")
        data["storage"].update(storage or {})
        data["http"].update(http or {})
        data["opcua_server"]["enabled"] = False
        data.pop("anomalies", None)  # stale-point anomalies would add events of their own
        gateway = Gateway(parse_config(yaml.safe_dump(data), source="test"))
        app = create_app(gateway)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        site = Site(gateway, app[STREAM_ROUTES], runner, url, aiohttp.ClientSession(url))
        sites.append(site)
        # Each point goes BAD once and each device logs one DISCONNECTED: then nothing moves.
        quiet = len(gateway.points) + len(gateway.drivers)
        await eventually(
            lambda: gateway.store.committed_rev >= quiet, within=30, what="a quiet twin"
        )
        return site

    yield make
    for site in sites:
        await site.close()


# -- an SSE reader ---------------------------------------------------------------------------------


@dataclass
class Block:
    """One SSE block: an event, a comment, or a retry line."""

    id: str | None = None
    event: str | None = None
    data: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def body(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)


class Sse:
    """Reads a text/event-stream response block by block (the parsing rules of the HTML spec
    that our server uses: `field: value` lines, `:` comments, a blank line ends a block)."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        assert resp.status == 200, resp.status
        assert resp.content_type == "text/event-stream"
        self.resp = resp

    async def block(self, within: float = 30.0) -> Block | None:
        """The next block, or None at the end of the stream."""
        lines: list[str] = []
        async with asyncio.timeout(within):
            while True:
                raw = await self.resp.content.readline()
                if not raw:
                    assert not lines, f"the stream ended inside a block: {lines}"
                    return None
                line = raw.decode().rstrip("\n")
                if line:
                    lines.append(line)
                elif lines:
                    return _parse_block(lines)

    async def events(self, n: int) -> list[Block]:
        """The next `n` event blocks (comments and retry lines skipped)."""
        found: list[Block] = []
        while len(found) < n:
            block = await self.block()
            assert block is not None, f"the stream ended after {len(found)} of {n} events"
            if block.id is not None:
                found.append(block)
        return found

    async def events_until(self, rev: int) -> list[Block]:
        """Event blocks up to and including the one with rev `rev`."""
        found: list[Block] = []
        while not found or found[-1].body["rev"] < rev:
            found += await self.events(1)
        return found

    async def rest(self) -> list[Block]:
        """Every block until the stream ends (which must be a clean end)."""
        found = []
        while (block := await self.block()) is not None:
            found.append(block)
        return found


def _parse_block(lines: list[str]) -> Block:
    block = Block()
    for line in lines:
        if line.startswith(":"):
            block.comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            block.id = value
        elif name == "event":
            block.event = value
        elif name == "data":
            block.data = value if block.data is None else f"{block.data}\n{value}"
        elif name == "retry":
            block.retry = int(value)
    return block


def revs_of(blocks: list[Block]) -> list[int]:
    """The revs the blocks carry, checking each block's id and type against its data."""
    revs = []
    for block in blocks:
        body = block.body
        assert block.id == body["id"] == cursor(body["rev"])
        assert block.event == body["type"]
        assert body["twin_id"] == TWIN_ID
        revs.append(body["rev"])
    return revs


# -- /twin -----------------------------------------------------------------------------------------


async def test_twin_etag_is_a_committed_rev_and_if_none_match_answers_304(make_site):
    # A long flush interval: an ingested change waits in memory before it commits.
    site = await make_site(storage={"flush_interval_ms": 300})
    changed = site.change()
    resp = await site.get("/twin")
    body = await resp.json()
    assert resp.status == 200
    rev = body["rev"]
    assert changed <= rev <= site.store.committed_rev, "the snapshot waited for its commit"
    assert resp.headers["ETag"] == f'"rev:{rev}"'
    assert body["cursor"] == cursor(rev)
    assert body["points"][LEVEL]["value"] == site.store.get(LEVEL).value
    assert body["points"][LEVEL]["rev"] == changed

    etag = resp.headers["ETag"]
    for header in [etag, f"W/{etag}", f'"rev:0", {etag}', f'W/"other" ,W/{etag}', "*"]:
        async with site.session.get("/twin", headers={"If-None-Match": header}) as again:
            assert again.status == 304, header
            assert again.headers["ETag"] == etag
            assert await again.read() == b""
    for header in ['"rev:0"', f'"rev:{rev + 1}"', f"rev:{rev}", f'"{etag}"', "W/", ",,,"]:
        async with site.session.get("/twin", headers={"If-None-Match": header}) as again:
            assert again.status == 200, header

    newer = site.change()
    async with site.session.get("/twin", headers={"If-None-Match": etag}) as again:
        assert again.status == 200
        assert (await again.json())["rev"] >= newer
        assert again.headers["ETag"] != etag


async def test_one_point_carries_the_snapshot_rev_cursor_and_etag(make_site):
    site = await make_site()
    changed = site.change()
    resp = await site.get(f"/twin/{LEVEL}")
    body = await resp.json()
    assert body["id"] == LEVEL and body["unit"] == "m"
    assert body["rev"] == changed, "`rev` is the point's last change"
    assert changed <= body["twin_rev"] <= site.store.committed_rev
    assert body["cursor"] == cursor(body["twin_rev"])
    etag = resp.headers["ETag"]
    assert etag == f'"rev:{body["twin_rev"]}"'
    async with site.session.get(f"/twin/{LEVEL}", headers={"If-None-Match": etag}) as again:
        assert again.status == 304
    body = await site.json("/twin/no/such/point", status=404)
    assert "unknown point" in body["error"]


async def test_twin_still_serves_values_without_a_rev_while_the_database_cannot_commit(make_site):
    site = await make_site()
    store = site.store
    await asyncio.to_thread(store.limit_database_growth, 0)  # the disk is full from now on

    def changes_until_the_writer_fails() -> bool:
        site.change(50)  # until a commit needs a new page
        return store.stats.writer_error is not None

    await eventually(changes_until_the_writer_fails, what="the writer to fail")
    site.change()
    resp = await site.get("/twin", headers={"If-None-Match": "*"})
    assert resp.status == 200, "no rev, so nothing to be unmodified against"
    body = await resp.json()
    assert "ETag" not in resp.headers
    assert body["rev"] is None and body["cursor"] is None
    assert "not committing" in body["warning"]
    assert body["points"][LEVEL]["value"] == store.get(LEVEL).value, "the newest value, in memory"
    one = await site.json(f"/twin/{LEVEL}")
    assert one["twin_rev"] is None and one["cursor"] is None and "not committing" in one["warning"]
    assert one["value"] == store.get(LEVEL).value

    await asyncio.to_thread(store.limit_database_growth, None)
    await store.aflush()
    resp = await site.get("/twin")
    body = await resp.json()
    assert body["rev"] == store.rev and "warning" not in body
    assert resp.headers["ETag"] == f'"rev:{store.rev}"'


# -- /diff -----------------------------------------------------------------------------------------


async def test_diff_pages_walk_every_event_exactly_once(make_site):
    site = await make_site()
    for run in range(12):
        site.change(100)
        site.store.append_event("SimulationCompleted", {"run": run})
    log = await site.log()

    seen: list[dict[str, Any]] = []
    since = "0"
    while True:
        body = await site.json("/diff", params={"since": since, "limit": "137"})
        assert len(body["events"]) <= 137
        if not body["events"]:
            assert body["next_cursor"] == body["since"] == since
            break
        assert body["next_cursor"] == body["events"][-1]["id"]
        seen += body["events"]
        since = body["next_cursor"]
    assert [e["rev"] for e in seen] == log
    assert all(e["id"] == cursor(e["rev"]) and e["twin_id"] == TWIN_ID for e in seen)
    assert [e["data"]["run"] for e in seen if e["type"] == "SimulationCompleted"] == list(range(12))
    good = [e["data"]["value"] for e in seen if e["data"].get("quality") == "GOOD"]
    assert good == [float(v) for v in range(1, 1201)]

    default = await site.json("/diff", params={"since": "0"})
    assert [e["rev"] for e in default["events"]] == log[:500]

    # A client goes on from a snapshot's cursor.
    twin = await site.json("/twin")
    site.change(3)
    await site.store.aflush()  # /diff serves committed events only
    body = await site.json("/diff", params={"since": twin["cursor"]})
    assert [e["rev"] for e in body["events"]] == await site.log(twin["rev"])
    assert len(body["events"]) == 3


async def test_diff_and_sse_send_a_non_finite_value_as_null_never_invalid_json(make_site):
    # A Modbus float register can hold NaN or infinity; the event log keeps it as it is, and
    # JSON has neither: the wire must carry null (a strict parser refuses `NaN`).
    site = await make_site()
    since = site.store.committed_rev
    site.store.ingest([Sample(LEVEL, float("nan"), Quality.BAD)])
    site.store.ingest([Sample(LEVEL, float("inf"), Quality.BAD)])
    await site.store.aflush()
    async with site.session.get("/diff", params={"since": cursor(since)}) as resp:
        text = await resp.text()
    assert resp.status == 200, text
    body = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} on the wire"))
    values = [e["data"]["value"] for e in body["events"] if e["point_id"] == LEVEL]
    assert values == [None, None]
    async with site.session.get("/subscribe", params={"since": cursor(since)}) as resp:
        lines: list[str] = []
        while len([x for x in lines if x.startswith("data:")]) < 2:
            lines.append((await resp.content.readline()).decode().strip())
    data = [json.loads(x[5:], parse_constant=pytest.fail) for x in lines if x.startswith("data:")]
    assert [d["data"]["value"] for d in data] == [None, None]


async def test_diff_answers_410_for_a_cursor_older_than_the_log(make_site):
    # A window of 0 minutes: compaction drops every frame but the newest from the event log.
    site = await make_site(storage={"event_log_minutes": 0})
    store = site.store
    old = store.committed_rev
    for _ in range(5):
        site.change()
        await store.aflush()  # a frame each, each newer than the one before
    await asyncio.to_thread(store.compact)
    start = store.log_start_rev
    assert start > old + 1

    body = await site.json("/diff", status=410, params={"since": cursor(old)})
    assert body["twin"] == "/twin"
    assert body["hint"] == "re-read /twin and continue /diff from its cursor"
    assert f"rev {start}" in body["error"]
    assert body["log_start_cursor"] == cursor(start - 1)

    kept = await site.json("/diff", params={"since": body["log_start_cursor"]})
    assert [e["rev"] for e in kept["events"]] == await site.log(start - 1)
    assert kept["events"], "the newest frame stays"
    oldest = await site.json("/diff", params={"since": "0"})
    assert oldest["events"] == kept["events"], "0 is the oldest event kept, never expired"


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({}, "since"),
        ({"since": ""}, "since"),
        ({"since": "abc"}, "since"),
        ({"since": "cursor_-1"}, "since"),
        ({"since": "cursor_12x"}, "since"),
        ({"since": "cursor_" + "9" * 19}, "since"),
        ({"since": "7" * 4000}, "since"),
        ({"since": "\x00"}, "since"),
        ({"since": "0", "limit": "0"}, "limit"),
        ({"since": "0", "limit": "5001"}, "limit"),
        ({"since": "0", "limit": "ten"}, "limit"),
        ({"since": "0", "limit": "1e3"}, "limit"),
        ({"since": "0", "limit": "-1"}, "limit"),
        ({"since": "0", "limit": ""}, "limit"),
    ],
)
async def test_diff_refuses_malformed_arguments_naming_them(make_site, params, named):
    site = await make_site()
    body = await site.json("/diff", status=400, params=params)
    assert body["error"].startswith(named) or f"`{named}`" in body["error"]
    assert len(body["error"]) < 500, "a hostile value is not echoed whole"


async def test_diff_refuses_a_cursor_ahead_of_the_committed_log(make_site):
    site = await make_site()
    ahead = cursor(site.store.committed_rev + 1000)
    body = await site.json("/diff", status=400, params={"since": ahead})
    assert "ahead" in body["error"] and "not handed out by this gateway" in body["error"]
    body = await site.json("/subscribe", status=400, params={"since": ahead})
    assert "ahead" in body["error"]


# -- /subscribe ------------------------------------------------------------------------------------


async def test_subscribe_replays_after_since_then_goes_live(make_site):
    site = await make_site()
    start = site.store.committed_rev
    replayed_to = site.change(700)  # more than a page
    await site.store.aflush()
    async with site.session.get("/subscribe", params={"since": cursor(start)}) as resp:
        sse = Sse(resp)
        first = await sse.block()
        assert first is not None and first.retry == 2000
        replayed = await sse.events_until(replayed_to)
        site.change(5)
        site.store.append_event("SimulationCompleted", {"run": 1})
        live = await sse.events_until(site.store.rev)
        assert revs_of(replayed + live) == await site.log(start)
        assert live[-1].event == "SimulationCompleted" and live[-1].body["data"] == {"run": 1}


async def test_subscribe_without_a_cursor_sends_only_what_comes_next(make_site):
    site = await make_site()
    start = site.store.committed_rev
    async with site.session.get("/subscribe") as resp:
        sse = Sse(resp)
        await sse.block()  # retry: the stream has started, at the committed rev
        top = site.change(3)
        assert revs_of(await sse.events_until(top)) == await site.log(start)


async def test_a_resumed_stream_delivers_every_missed_event_once_in_order(make_site):
    site = await make_site()
    start = site.store.committed_rev
    site.change(1500)
    async with site.session.get("/subscribe", params={"since": cursor(start)}) as resp:
        sse = Sse(resp)
        got = await sse.events(250)  # the client leaves in the middle of the replay
    await eventually(lambda: site.routes.subscribers == 0, what="the server to end the stream")
    site.change(500)  # missed while away
    site.store.append_event("SimulationCompleted", {"run": 2})

    # Last-Event-ID wins over `since`: starting from `since` would repeat 250 events.
    headers = {"Last-Event-ID": got[-1].id}
    async with site.session.get(
        "/subscribe", headers=headers, params={"since": cursor(start)}
    ) as resp:
        sse = Sse(resp)
        missed = await sse.events_until(site.store.rev)
        top = site.change(10)  # and live again
        live = await sse.events_until(top)
    revs = revs_of(got + missed + live)
    assert len(set(revs)) == len(revs), "no event twice"
    assert revs == await site.log(start), "every event, in order"


async def test_subscribe_with_an_expired_cursor_sends_expired_and_ends(make_site):
    site = await make_site(storage={"event_log_minutes": 0})
    store = site.store
    old = store.committed_rev
    for _ in range(5):
        site.change()
        await store.aflush()
    await asyncio.to_thread(store.compact)
    async with site.session.get("/subscribe", params={"since": cursor(old)}) as resp:
        blocks = await Sse(resp).rest()
    assert [b.retry for b in blocks[:1]] == [2000]
    (expired,) = blocks[1:]
    assert expired.event == "expired" and expired.id is None
    body = expired.body
    assert body["log_start_cursor"] == cursor(store.log_start_rev - 1)
    assert body["twin"] == "/twin" and "re-read /twin" in body["hint"]


async def test_an_idle_stream_sends_heartbeats(make_site):
    site = await make_site(http={"sse_heartbeat_s": 0.2})
    async with site.session.get("/subscribe") as resp:
        sse = Sse(resp)
        beats = 0
        while beats < 3:
            block = await sse.block()
            assert block is not None
            beats += block.comments == ["heartbeat"]
        top = site.change()
        assert [b.body["rev"] for b in await sse.events_until(top)] == [top]


async def test_subscribers_beyond_the_limit_get_503_until_one_leaves(make_site):
    site = await make_site(http={"max_subscribers": 2})
    first = await site.get("/subscribe")
    second = await site.get("/subscribe")
    for resp in (first, second):
        assert (await Sse(resp).block()) is not None
    body = await site.json("/subscribe", status=503)
    assert "max_subscribers" in body["error"]
    async with site.session.get("/subscribe") as refused:
        assert refused.headers["Retry-After"]
    await site.json("/diff", params={"since": "0"})  # other reads are not limited

    first.close()  # the client goes away without a word
    await eventually(lambda: site.routes.subscribers < 2, what="the server to free the slot")
    async with site.session.get("/subscribe") as third:
        assert (await Sse(third).block()) is not None
    second.close()


def small_receive_buffer(addr_info: Any) -> socket.socket:
    """A client socket with a tiny fixed receive buffer (no autotuning up to 32 MB)."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def test_a_client_that_stops_reading_holds_up_no_one_and_loses_nothing(make_site):
    site = await make_site()
    start = site.store.committed_rev
    connector = aiohttp.TCPConnector(socket_factory=small_receive_buffer)
    async with aiohttp.ClientSession(site.url, connector=connector) as lagging:
        slow = await lagging.get("/subscribe")
        assert (await Sse(slow).block()) is not None  # started; now it reads nothing
        async with site.session.get("/subscribe") as fast:
            sse = Sse(fast)
            await sse.block()
            # ~7 MB of events, more than the server's socket buffer (4 MB at most) and the
            # lagging client's (8 kB): its stream waits for the socket to drain, holding one
            # page, while the other stream goes on.
            top = site.change(20_000)
            assert revs_of(await sse.events_until(top)) == await site.log(start)
        async with slow:
            assert revs_of(await Sse(slow).events_until(top)) == await site.log(start)


async def test_head_is_not_a_way_to_hold_a_stream(make_site):
    site = await make_site()
    async with site.session.head("/subscribe") as resp:
        assert resp.status == 405
    assert site.routes.subscribers == 0


async def test_a_malformed_last_event_id_is_refused_naming_it(make_site):
    site = await make_site()
    body = await site.json("/subscribe", status=400, headers={"Last-Event-ID": "x" * 300})
    assert body["error"].startswith("Last-Event-ID") and len(body["error"]) < 500
    body = await site.json("/subscribe", status=400, params={"since": "yesterday"})
    assert body["error"].startswith("since")
    assert site.routes.subscribers == 0


async def test_shutdown_ends_open_streams_cleanly_without_waiting_for_a_heartbeat(make_site):
    site = await make_site()  # heartbeats every 15 s: shutdown must not wait for one
    async with site.session.get("/subscribe") as resp:
        sse = Sse(resp)
        await sse.block()
        # Far below aiohttp's shutdown timeout (60 s), which it would wait out for a stream
        # that does not end on its own, then cut it.
        async with asyncio.timeout(40):
            await site.stop_server()
        # A clean end of the chunked body: a stream cut at aiohttp's shutdown timeout would
        # raise ClientPayloadError here instead.
        assert await sse.rest() == []
    assert site.routes.subscribers == 0
