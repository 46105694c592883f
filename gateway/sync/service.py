"""Cloud sync over MQTT with store-and-forward (DESIGN §6; the wire format is `payloads.py`).

On every connection (a new `session` id each time) the sync subscribes to its `cmd/...` topics,
publishes `state: online` (retained; `offline` is the connection's Last Will), a `birth` with the
committed snapshot at rev R, and then diffs from its cursor: first the backlog (`historical:
true`, up to R), then live changes as the twin writer commits them. Diffs are QoS 1; at most
`max_inflight` are unacknowledged at once, and the next batch is read while earlier ones travel.

Everything sent carries committed revs only: births come from `committed_snapshot()`, diffs from
the event log (which holds committed events only), so a rev handed out never names a different
event after a crash (see `gateway/twin/commits.py`).

The cursor. The sync's cursor is the event-log hold named `sync` (`TwinStore.hold_log`). It
advances to a diff's `to_rev` once that diff and every earlier one are acknowledged (PUBACK), and
is written at most every `PERSIST_INTERVAL_S` while it moves (one write in flight, off the loop),
and at stop. After a broker outage or a gateway restart the next session starts from it: what
was sent but not acknowledged is sent again (the consumer drops what it already has by rev), and
nothing acknowledged is lost. A gateway that never synced installs the hold at its committed rev
when the sync starts: it does not replay history from before the sync was configured.

The backlog bound. While the hold is set, retention keeps every event the cloud has not
acknowledged, up to `storage.event_log_max_mb` of event log. Beyond that (a broker unreachable
for long at a high change rate) retention drops the oldest events anyway, and the sync finds its
cursor expired. It then does not stall: it appends a `SyncBacklogDropped` event `{from_rev,
to_rev, reason}` (which travels to the cloud in the next diff), logs a warning, counts it in
/health (`sync.counts.backlog_dropped`, `sync.last_backlog_drop`), publishes a fresh birth so
that the cloud's state is whole again, and continues from the log's start. Only the history of
the dropped revs is lost, never the current state.

Inbound: `cmd/rebirth` publishes a birth (coalesced: at most one birth in flight); `cmd/proposal`
(when `accept_proposals`) authenticates its API token like HTTP does and puts the change through
the policy gate, answering on `reply/proposal`. A malformed or oversized command gets an error
reply and a rate-limited log line, never an exception out of the MQTT callbacks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.auth.rbac import Principal, check
from gateway.config.model import SyncConfig, SyncTlsConfig
from gateway.control.users import AuthError
from gateway.errors import ConfigError, GatewayError, StoreError, UnknownPointError
from gateway.ratelog import RateLimitedLog
from gateway.sync.mqtt import ConnectionLost, Message, MqttConnection, MqttError
from gateway.sync.payloads import (
    PayloadError,
    ProposalCommand,
    Topics,
    birth_payload,
    diff_payload,
    parse_proposal_command,
    plan_diff,
    proposal_reply,
    state_payload,
)
from gateway.twin.commits import CommitSignal
from gateway.twin.history import CursorExpiredError
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore

log = logging.getLogger(__name__)

__all__ = ["HOLD", "CommandRefused", "ProposalGate", "SyncService"]

HOLD = "sync"  # the event-log hold that is the sync's persisted cursor
PERSIST_INTERVAL_S = 0.5
BACKOFF_FIRST_S = 0.5
DEGRADED_AFTER_S = 60.0  # /health says degraded once the sync has been disconnected this long
STOP_ACK_S = 2.0  # how long a stopping sync waits for its `offline` and last diffs to be acked
MAX_PROPOSALS_IN_FLIGHT = 8
PROPOSAL_STOP_GRACE_S = 5.0
BACKLOG_DROPPED = "SyncBacklogDropped"


@dataclass(frozen=True, slots=True)
class Batch:
    """One diff, encoded, ready to publish."""

    payload: bytes
    to_rev: int
    events: int
    historical: bool


class CommandRefused(GatewayError):
    """The gate refused a command before judging it; `str()` is the reply's error."""


@dataclass(frozen=True)
class ProposalGate:
    """How `cmd/proposal` reaches the policy engine: who a token is, and the proposal itself.

    `authenticate` raises `AuthError` for a refused token (GatewayError when it cannot check);
    `propose` returns the engine's record (with `to_json()`), or raises UnknownPointError.
    """

    authenticate: Callable[[str], Awaitable[Principal]]
    propose: Callable[[Principal, ProposalCommand], Awaitable[Any]]


class SyncService:
    """The MQTT sync task: one supervisor, one connection at a time, the cursor in the store."""

    def __init__(
        self,
        config: SyncConfig,
        store: TwinStore,
        *,
        site_id: str,
        gateway_id: str,
        points: Mapping[str, PointDef],
        gate: ProposalGate | None = None,
        version: str = __version__,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if config.broker is None:
            raise ConfigError("sync.broker is not set: there is no broker to sync to")
        self.config = config
        self.store = store
        self.site_id = site_id
        self.gateway_id = gateway_id
        self.points = points
        self.gate = gate if config.accept_proposals else None
        self.version = version
        self.topics = Topics(config.topic_prefix, site_id, gateway_id)
        self.twin = f"{site_id}/{gateway_id}"
        self.host, self.port, self.tls = config.endpoint
        self.client_id = config.client_id or f"opstwin-{site_id}-{gateway_id}"
        self._clock = clock
        self._lines = RateLimitedLog(log, 60.0)

        self.state = "stopped"  # stopped, connecting, connected, backoff
        self.session: str | None = None
        self.cursor = 0  # highest to_rev acknowledged with everything before it
        self.persisted = 0  # what the hold says
        self.last_error: str | None = None
        self.last_backlog_drop: dict[str, Any] | None = None
        self.counts: collections.Counter[str] = collections.Counter()
        self._disconnected_since: float | None = None
        self._password: str | None = None
        self._tls_context: ssl.SSLContext | None = None
        self._signal: CommitSignal | None = None
        self._task: asyncio.Task[None] | None = None
        self._persist_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._conn: MqttConnection | None = None
        # Per connection: diffs in flight (mid -> [to_rev, acked]) in publish order, and what
        # other acknowledged publishes resolve.
        self._inflight: collections.OrderedDict[int, list[Any]] = collections.OrderedDict()
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._birth_pending: asyncio.Future[None] | None = None
        self._rebirth_wanted = False
        self._established = False  # this connection's birth was acknowledged
        self._last_birth_rev = -1
        self._kick = asyncio.Event()
        self._persist_now = asyncio.Event()
        self._proposals: set[asyncio.Task[None]] = set()

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the credentials, install the hold, start the supervisor (ConfigError if the
        password or TLS files cannot be used)."""
        if self._task is not None:
            raise GatewayError("the cloud sync is already running")
        self._password = _read_password(self.config)
        self._tls_context = _tls_context(self.config.tls) if self.tls else None
        self._signal = self.store.commit_signal()
        hold = await asyncio.to_thread(self.store.log_hold, HOLD)
        committed = self._signal.rev
        if hold is None:
            # Installed now, so that retention keeps what the cloud has not had from the start.
            hold = committed
            await asyncio.to_thread(self.store.hold_log, HOLD, hold)
        elif hold > committed:
            # Cannot happen with one database, but resuming above the log would skip the
            # revs a crash hands out again: resend a little rather than lose.
            log.warning(
                "sync: cursor %d is above the committed rev %d; resuming there", hold, committed
            )
            hold = committed
        self.cursor = self.persisted = hold
        self._stopping = False
        # New each start: an asyncio.Event belongs to the loop that first waits on it.
        self._kick = asyncio.Event()
        self._persist_now = asyncio.Event()
        self._disconnected_since = time.monotonic()
        self.state = "connecting"
        self._task = asyncio.create_task(self._supervise(), name="sync:supervisor")
        log.info(
            "cloud sync to %s as %s from rev %d (topics %s/...)",
            self.broker_url,
            self.client_id,
            hold,
            self.topics.base,
        )

    async def stop(self) -> None:
        """Stop: publish `offline`, let acks in flight arrive, disconnect, persist the cursor."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self._finish_proposals()
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._say_goodbye(conn)
        self._reset_connection()
        # Never cancelled mid-write: an older cursor written after the last one would win.
        self._persist_now.set()
        if self._persist_task is not None:
            with contextlib.suppress(StoreError):
                await self._persist_task
            self._persist_task = None
        if self.cursor != self.persisted:
            await asyncio.to_thread(self.store.hold_log, HOLD, self.cursor)
            self.persisted = self.cursor
        self.state = "stopped"
        self.session = None
        log.info("cloud sync stopped at rev %d", self.cursor)

    def request_rebirth(self) -> None:
        """Publish a birth soon (the point set changed: a config reload), as cmd/rebirth does."""
        self._rebirth_wanted = True
        self._kick.set()

    @property
    def broker_url(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def health(self) -> dict[str, Any]:
        """What /health shows under `sync`."""
        committed = self._signal.rev if self._signal is not None else self.store.committed_rev
        since = self._disconnected_since
        return {
            "state": self.state,
            "broker": self.broker_url,
            "client_id": self.client_id,
            "session": self.session,
            "cursor": self.cursor,
            "persisted_cursor": self.persisted,
            "committed_rev": committed,
            "lag_revs": max(committed - self.cursor, 0),
            "inflight_diffs": len(self._inflight),
            "backlog_bound_mb": self.store.event_log_max_mb,
            "disconnected_s": None if since is None else round(time.monotonic() - since, 3),
            "last_error": self.last_error,
            "last_backlog_drop": self.last_backlog_drop,
            "counts": dict(self.counts),
        }

    def problems(self) -> list[str]:
        """Why /health should say degraded because of the sync (disconnected > 60 s)."""
        since = self._disconnected_since
        if self._task is None or since is None:
            return []
        down = time.monotonic() - since
        if down <= DEGRADED_AFTER_S:
            return []
        why = f": {self.last_error}" if self.last_error else ""
        return [
            f"cloud sync: not connected to {self.broker_url} for {down:.0f} s{why}; the cloud "
            f"is {max(self.store.committed_rev - self.cursor, 0)} revs behind (kept up to "
            f"storage.event_log_max_mb = {self.store.event_log_max_mb:g} MB)"
        ]

    # -- the supervisor: one connection at a time, capped jittered backoff ------------------------

    async def _supervise(self) -> None:
        failures = 0
        while True:
            session = uuid.uuid4().hex
            self.state = "connecting"
            conn = MqttConnection(
                host=self.host,
                port=self.port,
                client_id=self.client_id,
                keepalive_s=self.config.keepalive_s,
                will=(self.topics.state, state_payload("offline", session, self._clock())),
                username=self.config.username,
                password=self._password,
                tls=self._tls_context,
                tls_check_hostname=self.config.tls.verify_hostname,
                on_message=self._on_message,
                on_published=self._on_published,
            )
            self._conn = conn
            self._established = False
            try:
                await conn.open()
                self.counts["connections"] += 1
                await self._run_session(conn, session)
                why = conn.lost.result() if conn.lost.done() else "connection closed"
            except ConnectionLost as exc:
                # Why the connection went, rather than the publish it broke.
                why = conn.lost.result() if conn.lost.done() else str(exc)
            except (MqttError, StoreError) as exc:
                why = str(exc)
            except Exception as exc:
                # A bug must not end the sync for good: logged in full, then a new session.
                log.exception("cloud sync: the session failed")
                why = f"internal error: {type(exc).__name__}: {exc}"
                self._established = False  # backs off to the cap: one traceback per retry
            finally:
                if not self._stopping:
                    self._conn = None
                    conn.abort()
                    self._reset_connection()
            if self._established:
                failures = 0
            failures += 1
            self._lost(why)
            delay = _backoff(failures, self.config.reconnect_max_s)
            self.state = "backoff"
            await asyncio.sleep(delay)

    def _lost(self, why: str) -> None:
        was_connected = self.session is not None
        self.session = None
        self.last_error = why
        if self._disconnected_since is None:
            self._disconnected_since = time.monotonic()
        self.counts["connect_failures" if not was_connected else "disconnects"] += 1
        if was_connected:
            log.warning("cloud sync: %s; reconnecting (cursor at rev %d)", why, self.cursor)
        else:
            self._lines.log(logging.WARNING, "connect", "cloud sync: %s; will retry", why)

    def _reset_connection(self) -> None:
        self._inflight.clear()
        for future in self._acks.values():
            if not future.done():
                future.cancel()
        self._acks.clear()
        self._birth_pending = None

    # -- one session ------------------------------------------------------------------------------

    async def _run_session(self, conn: MqttConnection, session: str) -> None:
        """Birth, backlog, live diffs until the connection is lost."""
        assert self._signal is not None
        signal = self._signal
        topics = self.topics
        limit = self.config.batch_max_events
        max_inflight = self.config.max_inflight

        subscriptions = [topics.cmd_rebirth]
        if self.gate is not None:
            subscriptions.append(topics.cmd_proposal)
        conn.subscribe(subscriptions)
        conn.publish(topics.state, state_payload("online", session, self._clock()), retain=True)
        self.session = session
        self.state = "connected"
        self._disconnected_since = None
        self.last_error = None
        log.info("cloud sync connected to %s (session %s)", self.broker_url, session)

        self._rebirth_wanted = False
        birth_rev = await self._publish_birth(conn, session)
        sent_to = read_after = self.cursor  # the cursor is what the cloud has; resend the rest
        while True:
            # Cleared before the checks: whatever kicks from here on makes _wait return at once.
            self._kick.clear()
            if conn.lost.done():
                return
            if self._rebirth_wanted and self._birth_pending is None:
                self._rebirth_wanted = False
                await self._publish_birth(conn, session)
            if len(self._inflight) >= max_inflight:
                await self._wait(conn, None)
                continue
            seen = signal.rev
            batch: Batch | None = None
            if seen > read_after:
                try:
                    # Read and encoded off the loop: ~10 ms for 1,000 events.
                    batch = await asyncio.to_thread(
                        self._read_batch, read_after, sent_to, birth_rev, session, limit
                    )
                except CursorExpiredError as exc:
                    read_after = self._backlog_dropped(read_after, exc)
                    continue
            if batch is None:
                # Nothing up to `seen` is in the log (seen is read before the query), so the
                # next thing to send is committed above it.
                await self._wait(conn, max(read_after, seen))
                continue
            mid = conn.publish(topics.diff, batch.payload)
            self._inflight[mid] = [batch.to_rev, False]
            self.counts["diffs"] += 1
            self.counts["events"] += batch.events
            if batch.historical:
                self.counts["historical_diffs"] += 1
            sent_to = read_after = batch.to_rev

    def _read_batch(
        self, read_after: int, sent_to: int, birth_rev: int, session: str, limit: int
    ) -> Batch | None:
        """The next diff after `read_after` (blocking: a worker thread), or None if the log has
        nothing after it yet."""
        events = self.store.events_since(read_after, limit)
        if not events:
            return None
        events, to_rev, historical = plan_diff(events, sent_to, birth_rev)
        payload = diff_payload(
            session=session,
            from_rev=sent_to + 1,
            to_rev=to_rev,
            historical=historical,
            events=events,
            twin=self.twin,
        )
        return Batch(payload, to_rev, len(events), historical)

    async def _publish_birth(self, conn: MqttConnection, session: str) -> int:
        rev, values = await self.store.committed_snapshot()
        payload = birth_payload(
            session=session,
            rev=rev,
            ts=self._clock(),
            site_id=self.site_id,
            gateway_id=self.gateway_id,
            version=self.version,
            values=values,
            points=self.points,
        )
        mid = conn.publish(self.topics.birth, payload)
        future = self._birth_pending = self._ack_future(mid)
        future.add_done_callback(self._birth_acked)
        self._last_birth_rev = rev
        self.counts["births"] += 1
        return rev

    def _birth_acked(self, future: asyncio.Future[None]) -> None:
        if not future.cancelled():
            self._established = True  # the broker took a birth: this connection really works
        if self._birth_pending is future:
            self._birth_pending = None
            self._kick.set()  # a rebirth may be waiting for this one

    def _backlog_dropped(self, after: int, exc: CursorExpiredError) -> int:
        """Retention dropped events the cloud has not had: say so, rebirth, go on from the log
        start; return the rev to read after."""
        start = exc.log_start_rev
        dropped = {
            "from_rev": after + 1,
            "to_rev": start - 1,
            "reason": (
                f"the event log outgrew storage.event_log_max_mb "
                f"({self.store.event_log_max_mb:g} MB) while the cloud was not acknowledging; "
                "retention dropped the oldest undelivered events"
            ),
        }
        self.store.append_event(BACKLOG_DROPPED, dropped)
        self.counts["backlog_dropped"] += 1
        self.last_backlog_drop = {**dropped, "ts": self._clock()}
        log.warning(
            "cloud sync: revs %d-%d were dropped by retention before the cloud had them "
            "(storage.event_log_max_mb = %g); sending a fresh birth and continuing from rev %d",
            after + 1,
            start - 1,
            self.store.event_log_max_mb,
            start,
        )
        # Nothing at or below start - 1 can be sent again: the cursor may pass it.
        if start - 1 > self.cursor:
            self.cursor = start - 1
            self._persist_soon()
        if self._last_birth_rev < start - 1:
            self._rebirth_wanted = True
        return start - 1

    async def _wait(self, conn: MqttConnection, commit_past: int | None) -> None:
        """Until something may be sendable: a commit above `commit_past` (None: do not wait
        for commits), an ack, a rebirth request, or the connection's end."""
        waits: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(self._kick.wait()),
            conn.lost,
        ]
        if commit_past is not None:
            assert self._signal is not None
            waits.append(asyncio.ensure_future(self._signal.wait_past(commit_past)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in waits:
                if future is not conn.lost and not future.done():
                    future.cancel()

    # -- acknowledgements and the cursor ----------------------------------------------------------

    def _ack_future(self, mid: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks[mid] = future
        return future

    def _on_published(self, mid: int) -> None:
        entry = self._inflight.get(mid)
        if entry is None:
            future = self._acks.pop(mid, None)
            if future is not None and not future.done():
                future.set_result(None)
            return
        entry[1] = True
        inflight = self._inflight
        moved = False
        while inflight:
            head = next(iter(inflight.values()))
            if not head[1]:
                break
            inflight.popitem(last=False)
            if head[0] > self.cursor:
                self.cursor = head[0]
                moved = True
        if moved:
            self._persist_soon()
        self._kick.set()

    def _persist_soon(self) -> None:
        if self._persist_task is None or self._persist_task.done():
            self._persist_task = asyncio.create_task(self._persist(), name="sync:cursor")

    async def _persist(self) -> None:
        # One write in flight; after each, a pause (cut short at stop), so a moving cursor
        # costs two writes a second, not one per ack.
        while self.persisted != self.cursor:
            rev = self.cursor
            try:
                await asyncio.to_thread(self.store.hold_log, HOLD, rev)
            except StoreError as exc:
                self._lines.log(
                    logging.ERROR, "persist", "cloud sync: cannot save the cursor: %s", exc
                )
                if self._stopping:
                    raise
            else:
                self.persisted = rev
            if not self._stopping:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PERSIST_INTERVAL_S):
                        await self._persist_now.wait()

    async def _say_goodbye(self, conn: MqttConnection) -> None:
        """`offline` (retained), then a clean DISCONNECT, so the Last Will is not needed."""
        if not conn.lost.done():
            try:
                mid = conn.publish(
                    self.topics.state,
                    state_payload("offline", self.session or "", self._clock()),
                    retain=True,
                )
                # Acks arrive in order: once `offline` is acked, so are the diffs before it.
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    async with asyncio.timeout(STOP_ACK_S):
                        await self._ack_future(mid)
            except ConnectionLost:
                pass
        await conn.close()

    # -- inbound commands -------------------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        topic = message.topic
        if message.retain:
            # A retained command would run again on every reconnect (a proposal executed
            # twice): commands are events, not state.
            self._lines.log(logging.WARNING, "retained", "cloud sync: ignored a retained %s", topic)
            return
        if topic == self.topics.cmd_rebirth:
            self.counts["rebirth_requests"] += 1
            self._rebirth_wanted = True
            self._kick.set()
        elif topic == self.topics.cmd_proposal and self.gate is not None:
            payload = bytes(message.payload)
            if len(self._proposals) >= MAX_PROPOSALS_IN_FLIGHT:
                self._refuse(payload, "too many proposals in progress; retry in a few seconds")
                return
            task = asyncio.get_running_loop().create_task(
                self._proposal(payload), name="sync:proposal"
            )
            self._proposals.add(task)
            task.add_done_callback(self._proposals.discard)

    async def _proposal(self, payload: bytes) -> None:
        """One `cmd/proposal`: parse, authenticate, propose, reply; never raises."""
        gate = self.gate
        assert gate is not None
        try:
            command = parse_proposal_command(payload)
        except PayloadError as exc:
            self.counts["commands_malformed"] += 1
            self._lines.log(
                logging.WARNING, "malformed", "cloud sync: refused a cmd/proposal: %s", exc
            )
            self._reply(proposal_reply(exc.request_id, error=str(exc)))
            return
        rid = command.request_id
        try:
            principal = await gate.authenticate(command.token)
        except CommandRefused as exc:
            self.counts["proposals_refused"] += 1
            self._reply(proposal_reply(rid, error=str(exc)))
            return
        except AuthError:
            self.counts["proposals_refused"] += 1
            self._lines.log(
                logging.WARNING, "auth", "cloud sync: cmd/proposal with a refused token"
            )
            self._reply(
                proposal_reply(
                    rid,
                    error="credentials refused: give a valid API token (`opstwin token create`)",
                )
            )
            return
        except GatewayError as exc:
            self._reply(proposal_reply(rid, error=f"the gateway cannot check credentials: {exc}"))
            return
        try:
            record = await gate.propose(principal, command)
        except UnknownPointError:
            self.counts["proposals_refused"] += 1
            self._reply(proposal_reply(rid, error=f"unknown point {command.point!r}"))
            return
        except GatewayError as exc:
            self.counts["proposals_refused"] += 1
            self._reply(proposal_reply(rid, error=str(exc)))
            return
        except Exception:
            log.exception("cloud sync: proposal %s failed", rid)
            self._reply(
                proposal_reply(rid, error="the gateway failed to handle the proposal; see its log")
            )
            return
        proposal = record.to_json()
        access = check(principal, "propose", command.point)
        if not access.allowed:
            # Recorded as rejected by the engine, as over HTTP: the id can be quoted.
            self.counts["proposals_refused"] += 1
            self._reply(proposal_reply(rid, proposal=proposal, error=access.reason))
            return
        self.counts["proposals"] += 1
        self._reply(proposal_reply(rid, proposal=proposal))

    def _refuse(self, payload: bytes, why: str) -> None:
        rid: str | None
        try:
            rid = parse_proposal_command(payload).request_id
        except PayloadError as exc:
            rid = exc.request_id
        self._reply(proposal_reply(rid, error=why))

    def _reply(self, payload: bytes) -> None:
        conn = self._conn
        if conn is None or conn.lost.done():
            self._lines.log(
                logging.WARNING, "reply", "cloud sync: a proposal reply was lost (not connected)"
            )
            return
        try:
            mid = conn.publish(self.topics.reply_proposal, payload)
        except ConnectionLost:
            return
        self._ack_future(mid)  # nobody waits; dropped with the connection

    async def _finish_proposals(self) -> None:
        if not self._proposals:
            return
        _, pending = await asyncio.wait(self._proposals, timeout=PROPOSAL_STOP_GRACE_S)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task


# -- helpers --------------------------------------------------------------------------------------


def _backoff(failures: int, cap: float) -> float:
    """Capped exponential backoff with jitter (half to full), so a fleet does not reconnect in
    step after a broker restart."""
    ceiling = min(cap, BACKOFF_FIRST_S * 2 ** min(failures - 1, 30))
    return ceiling * random.uniform(0.5, 1.0)


def _read_password(config: SyncConfig) -> str | None:
    path = config.password_file
    if path is None:
        return None
    if config.username is None:
        raise ConfigError(
            "sync.password_file is set but sync.username is not: MQTT sends a password only "
            "with a user name"
        )
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"sync.password_file {str(path)!r}: cannot read the broker password ({why}); "
            "create it with the password on its first line, readable by the gateway only"
        ) from exc
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise ConfigError(
            f"sync.password_file {str(path)!r}: the first line (the password) is empty"
        )
    return lines[0]


def _tls_context(tls: SyncTlsConfig) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"sync.tls.ca_file {str(tls.ca_file)!r}: cannot load CA certificates: {exc}"
        ) from exc
    if tls.key_file is not None and tls.cert_file is None:
        raise ConfigError("sync.tls.key_file is set but sync.tls.cert_file is not")
    if tls.cert_file is not None:
        try:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"sync.tls.cert_file {str(tls.cert_file)!r} / sync.tls.key_file: cannot load the "
                f"client certificate and key: {exc}"
            ) from exc
    context.check_hostname = tls.verify_hostname
    return context
