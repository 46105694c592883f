"""AIW reads that carry a rev: the twin snapshot and its ETag, `/diff` pages, the `/subscribe`
SSE stream (DESIGN §5).

Committed revs only. The store assigns revs in memory at ingest, and a crash loses the
uncommitted tail, whose revs the reopened store hands out again for other changes. So no rev
leaves here before it is committed: snapshots come from `TwinStore.committed_snapshot()` (taken,
then its rev waited for: one flush interval, 5 ms by default), events from the event log, which
holds committed events only. An ETag, a cursor or an SSE id therefore names the same state or
event before and after a `kill -9` (a power loss can still lose the last commits: SQLite runs
with synchronous=NORMAL). A boot id in every cursor was the alternative; it would make every
client start over after every restart, even a clean one.

- `GET /twin`, `GET /twin/{point}`: values at a committed rev, `ETag: "rev:N"`, `If-None-Match`
  (a list, `*`, weak `W/` tags) → 304, and `cursor` to continue with `/diff` from the snapshot.
  When the database cannot commit, the values in memory are still served (operators need them
  most when the disk fails), without a rev or an ETag and with a `warning`.
- `GET /diff?since=&limit=`: a page of the event log after a cursor; `next_cursor` is where the
  next page starts (`since` again when there is nothing new, so a client can simply loop). A
  cursor older than retention is 410 Gone with where the log starts now and what to do; one
  ahead of the newest committed rev was not handed out by this gateway and is a 400.
- `GET /subscribe`: Server-Sent Events whose ids are cursors. It starts after `Last-Event-ID`,
  else `?since=`, else the newest committed rev (live only); replays the log in pages, then reads
  it once per commit (`CommitSignal`, never per event, never before the commit). A client that
  stops reading holds one page at most: `write` waits for the socket to drain, and a write that
  cannot finish within `WRITE_TIMEOUT_S` ends the stream. An expired cursor, even in mid-stream,
  is one `expired` event carrying the 410 body, then the end of the stream; so is a database
  that cannot be read (`error`). Streams end at once on shutdown, and within `LIVENESS_S` of a
  client going away even when no event flows.

Cursor `0` (or `cursor_000000`) means "from the oldest event kept", never "expired".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from gateway.aiw.events import CursorError, cursor, dumps, event_json, parse_cursor, twin_id
from gateway.app import Gateway
from gateway.errors import StoreError
from gateway.ratelog import RateLimitedLog
from gateway.twin.commits import CommitSignal
from gateway.twin.history import CursorExpiredError
from gateway.twin.model import EventRecord, PointDef, PointValue
from gateway.twin.store import TwinStore

__all__ = ["STREAM_ROUTES", "StreamRoutes", "add_stream_routes", "point_json"]

log = logging.getLogger(__name__)

# How long /twin waits for its snapshot's rev to commit (plus two flush intervals) before it
# answers without a rev: a healthy writer commits within one flush interval.
TWIN_WAIT_S = 1.0
DIFF_LIMIT = 500
DIFF_MAX_LIMIT = 5000
# Events per read and per write of a stream: ~150 kB of JSON, one drain per page.
SSE_PAGE = 500
SSE_RETRY_MS = 2000
# A client that has not taken one page in this long is gone or hopelessly slow: its slot (of
# `http.max_subscribers`) goes to someone who reads.
WRITE_TIMEOUT_S = 60.0
# aiohttp does not tell a handler that its client left (unless handler_cancellation, off in
# serve.py); an idle stream looks at its connection this often, to free the slot.
LIVENESS_S = 1.0
EXPIRED_HINT = "re-read /twin and continue /diff from its cursor"

_IF_NONE_MATCH = re.compile(r'\s*(?:(\*)|(?:W/)?"([^"]*)")\s*(?:,|$)')
_ETAG_REV = re.compile(r"rev:([0-9]{1,18})")


def add_stream_routes(app: web.Application, gateway_key: web.AppKey[Gateway]) -> StreamRoutes:
    """Register /twin, /twin/{point}, /diff and /subscribe on `app`, whose gateway is under
    `gateway_key`; open streams end when the app shuts down."""
    routes = StreamRoutes(gateway_key)
    routes.register(app)
    return routes


class StreamRoutes:
    """The read-stream routes of one app, and the SSE streams it has open."""

    def __init__(self, gateway_key: web.AppKey[Gateway]) -> None:
        self._key = gateway_key
        self._streams: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._lines = RateLimitedLog(log, 60.0)

    def register(self, app: web.Application) -> None:
        """Add the routes to `app`, and the shutdown hook that ends the streams."""
        app[STREAM_ROUTES] = self
        app.router.add_get("/twin", self.twin)
        app.router.add_get("/twin/{point_id:.+}", self.twin_point)
        app.router.add_get("/diff", self.diff)
        # No HEAD: it would hold a stream slot for a response that never has a body.
        app.router.add_get("/subscribe", self.subscribe, allow_head=False)
        # on_shutdown runs before aiohttp waits for handlers to finish: without it, shutdown
        # would wait for every stream's next heartbeat and then cut it.
        app.on_shutdown.append(self._end_streams)

    @property
    def subscribers(self) -> int:
        """SSE streams open now."""
        return len(self._streams)

    # -- handlers ---------------------------------------------------------------------------------

    async def twin(self, request: web.Request) -> web.StreamResponse:
        """Every point's current value at a committed rev."""
        gateway = request.app[self._key]
        rev, values, warning = await self._committed_snapshot(request, gateway)
        if rev is not None and _not_modified(request, rev):
            return _not_modified_response(rev)
        body: dict[str, Any] = {
            "site_id": gateway.config.site_id,
            "gateway_id": gateway.config.gateway_id,
            "rev": rev,
            "cursor": None if rev is None else cursor(rev),
            "points": {
                pid: point_json(gateway.points[pid], v)
                for pid, v in sorted(values.items())
                if pid in gateway.points
            },
        }
        if warning is not None:
            body["warning"] = warning
        return web.json_response(body, headers=_validators(rev))

    async def twin_point(self, request: web.Request) -> web.StreamResponse:
        """One point's current value and metadata at a committed rev (`rev` is the rev of the
        point's last change, `twin_rev` the snapshot's)."""
        gateway = request.app[self._key]
        point_id = request.match_info["point_id"]
        if point_id not in gateway.points:
            raise _error(404, f"unknown point {point_id[:200]!r}; GET /twin lists the points")
        rev, values, warning = await self._committed_snapshot(request, gateway)
        if rev is not None and _not_modified(request, rev):
            return _not_modified_response(rev)
        body = {
            **point_json(gateway.points[point_id], values[point_id]),
            "twin_rev": rev,
            "cursor": None if rev is None else cursor(rev),
        }
        if warning is not None:
            body["warning"] = warning
        return web.json_response(body, headers=_validators(rev))

    async def diff(self, request: web.Request) -> web.Response:
        """The committed events after `since`, oldest first, at most `limit`."""
        gateway = request.app[self._key]
        store = gateway.store
        text = request.query.get("since")
        if text is None:
            raise _error(
                400,
                "query parameter `since` is required: a cursor from /twin, /diff or /subscribe, "
                "or 0 for the oldest event kept",
            )
        since = _cursor_arg("since", text, store)
        limit = _limit_arg(request)
        try:
            events = await asyncio.to_thread(_events_after, store, since, limit)
        except CursorExpiredError as exc:
            raise web.HTTPGone(
                text=json.dumps(_expired_body(exc)), content_type="application/json"
            ) from None
        except StoreError as exc:
            raise self._unreadable(request, exc) from None
        twin = twin_id(gateway.config.site_id, gateway.config.gateway_id)
        return web.json_response(
            {
                "since": cursor(since),
                "next_cursor": cursor(events[-1].rev if events else since),
                "events": [event_json(e, twin) for e in events],
            },
            dumps=_dumps,
        )

    async def subscribe(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: replay the event log after the client's cursor, then go live."""
        gateway = request.app[self._key]
        if self._closing:
            raise _error(503, "the gateway is shutting down; reconnect when it is back")
        limit = gateway.config.http.max_subscribers
        if len(self._streams) >= limit:
            raise _error(
                503,
                f"{limit} streams are open, the most `http.max_subscribers` allows; try again "
                "later, or raise it",
                headers={"Retry-After": str(SSE_RETRY_MS // 1000)},
            )
        start = _start_rev(request, gateway.store)
        task = asyncio.current_task()
        assert task is not None
        # Taken before the first await: concurrent requests cannot all pass the check above.
        self._streams.add(task)
        stream = _Stream(self, request, gateway, start)
        try:
            await stream.run()
        except asyncio.CancelledError:
            # Our own cancellation at shutdown ends the stream cleanly; any other (aiohttp's,
            # when the client went away) goes on.
            if not self._closing or task.uncancel() > 0:
                raise
        finally:
            self._streams.discard(task)
        if stream.response is None:
            raise _error(503, "the gateway is shutting down; reconnect when it is back")
        await stream.finish()
        return stream.response

    # -- helpers ----------------------------------------------------------------------------------

    async def _committed_snapshot(
        self, request: web.Request, gateway: Gateway
    ) -> tuple[int | None, dict[str, PointValue], str | None]:
        """The values at a committed rev; when the database does not commit, the values in
        memory with no rev and a warning saying why."""
        store = gateway.store
        try:
            rev, values = await store.committed_snapshot(TWIN_WAIT_S + 2 * store.flush_interval_s)
            return rev, values, None
        except StoreError as exc:
            self._lines.log(
                logging.WARNING, "twin", "%s: answered without a rev: %s", request.path, exc
            )
            _, values = store.snapshot()
            return (
                None,
                values,
                f"the twin database is not committing ({exc}): these are the values in memory, "
                "without a rev, cursor or ETag; GET /health says what is wrong",
            )

    def _unreadable(self, request: web.Request, exc: StoreError) -> web.HTTPException:
        self._lines.log(logging.WARNING, request.path, "%s: answered 503: %s", request.path, exc)
        return _error(503, f"the twin database cannot be read: {exc}")

    async def _end_streams(self, app: web.Application) -> None:
        self._closing = True
        for task in list(self._streams):
            task.cancel()


STREAM_ROUTES = web.AppKey("stream_routes", StreamRoutes)


class _ClientGone(Exception):
    """The client closed the connection, or stopped reading."""


class _Stream:
    """One `/subscribe` stream: replay after `start`, then one log read per commit."""

    def __init__(
        self, routes: StreamRoutes, request: web.Request, gateway: Gateway, start: int
    ) -> None:
        self.routes = routes
        self.request = request
        self.store = gateway.store
        self.twin = twin_id(gateway.config.site_id, gateway.config.gateway_id)
        self.heartbeat_s = gateway.config.http.sse_heartbeat_s
        self.last = start
        self.response: web.StreamResponse | None = None

    async def run(self) -> None:
        """Send events until the client goes, the log expires under it, or shutdown."""
        store = self.store
        try:
            signal = store.commit_signal()
        except StoreError as exc:
            raise self.routes._unreadable(self.request, exc) from None
        # Taken before each read: every event up to it is visible to that read, so when the
        # read finds nothing new, the next one waits for a commit past it (revs can skip: a
        # BacklogDropped event stands for revs lost while the disk failed).
        top = store.committed_rev
        # The first page is read before the response starts: a database that cannot be read
        # is a 503 the client sees, not an empty stream.
        try:
            page: Sequence[EventRecord] = await self._read()
        except CursorExpiredError as exc:
            await self._start()
            await self._close_with("expired", _expired_body(exc))
            return
        except StoreError as exc:
            raise self.routes._unreadable(self.request, exc) from None
        await self._start()
        try:
            while True:
                if page:
                    await self._send(_sse_events(page, self.twin))
                    self.last = page[-1].rev
                if len(page) < SSE_PAGE:
                    await self._idle(signal, max(self.last, top))
                top = store.committed_rev
                page = await self._read()
        except _ClientGone:
            return
        except CursorExpiredError as exc:
            # Retention passed the cursor while this client lagged (the log's size bound).
            await self._close_with("expired", _expired_body(exc))
        except StoreError as exc:
            self.routes._lines.log(
                logging.WARNING, "subscribe", "/subscribe: stream ended: %s", exc
            )
            await self._close_with("error", {"error": f"the twin database cannot be read: {exc}"})

    async def finish(self) -> None:
        """End the response; a client that is gone or does not read is not waited for."""
        if self.response is None:
            return
        try:
            async with asyncio.timeout(LIVENESS_S):
                await self.response.write_eof()
        except (ConnectionError, TimeoutError):
            pass

    async def _start(self) -> None:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                # nginx would otherwise hold events back to fill its buffer.
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(self.request)
        self.response = response
        with contextlib.suppress(_ClientGone):  # the loop's next write or wait notices too
            await self._send(f"retry: {SSE_RETRY_MS}\n\n".encode())

    async def _read(self) -> list[EventRecord]:
        return await asyncio.to_thread(_events_after, self.store, self.last, SSE_PAGE)

    async def _idle(self, signal: CommitSignal, after: int) -> None:
        """Wait for a commit past `after`, with a heartbeat each `heartbeat_s` meanwhile."""
        loop = asyncio.get_running_loop()
        beat_at = loop.time() + self.heartbeat_s
        while True:
            transport = self.request.transport
            if transport is None or transport.is_closing():
                raise _ClientGone
            remaining = beat_at - loop.time()
            if remaining <= 0:
                await self._send(b": heartbeat\n\n")
                beat_at = loop.time() + self.heartbeat_s
                continue
            try:
                async with asyncio.timeout(min(remaining, LIVENESS_S)):
                    await signal.wait_past(after)
                return
            except TimeoutError:
                continue

    async def _send(self, data: bytes) -> None:
        assert self.response is not None
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await self.response.write(data)
        except ConnectionError:
            raise _ClientGone from None
        except TimeoutError:
            self.routes._lines.log(
                logging.INFO,
                "subscribe-slow",
                "/subscribe: a client took no data for %g s; its stream ends",
                WRITE_TIMEOUT_S,
            )
            raise _ClientGone from None

    async def _close_with(self, event: str, body: dict[str, Any]) -> None:
        with contextlib.suppress(_ClientGone):
            await self._send(f"event: {event}\ndata: {_dumps(body)}\n\n".encode())


# -- pure helpers ---------------------------------------------------------------------------------


def point_json(point: PointDef, value: PointValue) -> dict[str, Any]:
    """One point as /twin shows it: its current value, quality and metadata."""
    return {
        "id": point.id,
        "value": _plain(value.value),
        "quality": str(value.quality),
        "reason": value.reason,
        "source_ts": value.source_ts,
        "gateway_ts": value.gateway_ts,
        "rev": value.rev,
        "unit": point.unit,
        "range": None if point.lo is None else {"lo": point.lo, "hi": point.hi},
        "writable": point.writable,
        "datatype": point.datatype,
        "device": point.device,
        "description": point.description,
    }


def _events_after(store: TwinStore, rev: int, limit: int) -> list[EventRecord]:
    """Committed events after `rev`; rev 0 means from the oldest kept (blocking)."""
    if rev:
        return store.events_since(rev, limit)
    # Retention may move the start between reading it and reading the log: try again then.
    for _ in range(3):
        try:
            return store.events_since(max(store.log_start_rev - 1, 0), limit)
        except CursorExpiredError:
            continue
    return store.events_since(max(store.log_start_rev - 1, 0), limit)


def _start_rev(request: web.Request, store: TwinStore) -> int:
    """Where a stream starts: after Last-Event-ID, else `since`, else the newest commit."""
    header = request.headers.get("Last-Event-ID", "").strip()
    if header:
        return _cursor_arg("Last-Event-ID", header, store)
    text = request.query.get("since")
    if text is not None:
        return _cursor_arg("since", text, store)
    return store.committed_rev


def _cursor_arg(name: str, text: str, store: TwinStore) -> int:
    try:
        rev = parse_cursor(text)
    except CursorError:
        raise _error(
            400,
            f"{name} {text[:64]!r} is not a cursor: give one this gateway handed out "
            "(e.g. cursor_000123, from /twin, /diff or /subscribe), or 0 for the oldest event kept",
        ) from None
    committed = store.committed_rev
    if rev > committed:
        raise _error(
            400,
            f"{name} {text[:64]!r} is ahead of this gateway's newest committed event "
            f"({cursor(committed)}): it was not handed out by this gateway (another gateway's "
            "cursor, or a database restored from a backup); re-read /twin and continue from its "
            "cursor",
        )
    return rev


def _limit_arg(request: web.Request) -> int:
    text = request.query.get("limit")
    if text is None:
        return DIFF_LIMIT
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= DIFF_MAX_LIMIT:
        raise _error(400, f"limit must be an integer in [1, {DIFF_MAX_LIMIT}], got {text[:32]!r}")
    return limit


def _expired_body(exc: CursorExpiredError) -> dict[str, Any]:
    """The 410 body (and the SSE `expired` event's data)."""
    return {
        "error": str(exc),
        # The oldest cursor still accepted: events after it are all kept.
        "log_start_cursor": cursor(max(exc.log_start_rev - 1, 0)),
        "twin": "/twin",
        "hint": EXPIRED_HINT,
    }


def _not_modified(request: web.Request, rev: int) -> bool:
    """Whether `If-None-Match` names the representation at `rev` (weak comparison, RFC 9110
    §13.1.2); a header we cannot parse matches nothing, so the client gets the full answer."""
    header = request.headers.get("If-None-Match")
    if not header:
        return False
    pos = 0
    while pos < len(header):
        match = _IF_NONE_MATCH.match(header, pos)
        if match is None:
            return False
        if match.group(1) is not None:
            return True
        tag = _ETAG_REV.fullmatch(match.group(2))
        if tag is not None and int(tag.group(1)) == rev:
            return True
        pos = match.end()
    return False


def _not_modified_response(rev: int) -> web.Response:
    return web.Response(status=304, headers=_validators(rev))


def _validators(rev: int | None) -> dict[str, str]:
    # no-cache: a cache may keep the answer but must ask again (and gets a 304 while the rev
    # holds); without a rev there is nothing to revalidate with, so nothing may be stored.
    if rev is None:
        return {"Cache-Control": "no-store"}
    return {"ETag": f'"rev:{rev}"', "Cache-Control": "no-cache"}


def _sse_events(events: Sequence[EventRecord], twin: str) -> bytes:
    # _dumps escapes newlines inside strings: one `data:` line per event.
    return "".join(
        f"id: {cursor(e.rev)}\nevent: {e.type}\ndata: {_dumps(event_json(e, twin))}\n\n"
        for e in events
    ).encode()


def _dumps(body: Any) -> str:
    # events.dumps: NaN and infinities (a BAD point may carry one) become null, never invalid
    # JSON; it also escapes newlines inside strings, so each event stays one `data:` line.
    return dumps(body).decode()


def _plain(value: Any) -> Any:
    # JSON has no NaN; a BAD point may still carry one.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.hex()
    return value


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.HTTPException:
    cls: type[web.HTTPException] = {
        400: web.HTTPBadRequest,
        404: web.HTTPNotFound,
        503: web.HTTPServiceUnavailable,
    }[status]
    return cls(
        text=json.dumps({"error": message}), content_type="application/json", headers=headers
    )
