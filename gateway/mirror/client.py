"""The mirror on a live broker: `Mirror` subscribes, feeds the state machine, asks for rebirths.

It runs on the caller's event loop over the sync's MQTT connection (`gateway/sync/mqtt.py`:
paho-mqtt driven by asyncio, no thread per message), so a test or the demo starts it in-process
beside a gateway. Messages are handled in paho's callback, on the loop thread, as they are read:
the state machine does no I/O, and what it asks for (a `cmd/rebirth`) is a queued publish.

One supervisor task owns the connection: it reconnects with capped, jittered backoff and
subscribes again. A clean session loses what was published while the mirror was away, so after
a reconnect every gateway that is not known to be offline is asked for a rebirth. With
`persistent=True` (a fixed client id and a broker-side session) the broker keeps those messages
for the mirror instead, and the event history stays whole across a broker restart when the
broker persists its sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
import uuid
from collections.abc import Callable
from typing import Any

from gateway.mirror.state import LEAVES, MAX_PAYLOAD, GatewayMirror, Kind, MirrorState, Notice
from gateway.ratelog import RateLimitedLog
from gateway.sync.mqtt import Message, MqttConnection, MqttError
from gateway.sync.payloads import split_topic

log = logging.getLogger(__name__)

__all__ = ["DropHook", "Mirror", "MqttError"]

# Called with (site_id, gateway_id, payload) for every diff before the state machine sees it;
# True drops the diff, as if the broker had lost it (tests simulate a lost message with it).
DropHook = Callable[[str, str, bytes], bool]
NoticeHook = Callable[[Notice], None]

TICK_S = 1.0
RECONNECT_MIN_S = 0.2


class Mirror:
    """Every gateway's twin under a topic prefix, rebuilt from a broker."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        prefix: str = "aiw/v1",
        site_id: str | None = None,
        gateway_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        tls_check_hostname: bool = True,
        client_id: str | None = None,
        persistent: bool = False,
        keepalive_s: int = 30,
        reconnect_max_s: float = 10.0,
        rebirth_retry_s: float = 10.0,
        history_events: int = 100_000,
        max_payload: int = MAX_PAYLOAD,
        on_notice: NoticeHook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if persistent and client_id is None:
            raise ValueError("a persistent session needs a fixed client_id")
        self.host, self.port = host, port
        self.prefix = prefix.strip("/")
        self.site_id, self.gateway_id = site_id, gateway_id
        self.state = MirrorState(
            self.prefix,
            rebirth_retry_s=rebirth_retry_s,
            history_events=history_events,
            max_payload=max_payload,
        )
        self.drop_diff: DropHook | None = None
        self.dropped = 0  # diffs the drop hook discarded
        self.on_notice = on_notice
        self.connects = 0
        self._username, self._password = username, password
        self._tls, self._tls_check_hostname = tls, tls_check_hostname
        self._client_id = client_id or f"opstwin-mirror-{uuid.uuid4().hex[:12]}"
        self._persistent = persistent
        self._keepalive_s = keepalive_s
        self._reconnect_max_s = reconnect_max_s
        self._clock = clock
        self._conn: MqttConnection | None = None
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._malformed_log = RateLimitedLog(log, 60.0)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self, timeout_s: float = 10.0) -> None:
        """Connect (retrying within `timeout_s`), subscribe, and keep the connection up.

        MqttError with the last cause when the broker cannot be reached within the time.
        """
        deadline = time.monotonic() + timeout_s
        delay = RECONNECT_MIN_S
        while True:
            try:
                await self._connect(first=True)
                break
            except MqttError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, self._reconnect_max_s)
        self._tasks = [
            asyncio.create_task(self._supervise(), name="mirror-supervisor"),
            asyncio.create_task(self._ticker(), name="mirror-ticker"),
        ]

    async def stop(self) -> None:
        """Disconnect and stop every task the mirror started."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def __aenter__(self) -> Mirror:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- reading it -------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the connection to the broker is up."""
        return self._conn is not None and not self._conn.lost.done()

    def twin(self, site_id: str, gateway_id: str) -> dict[str, Any]:
        """One gateway's mirrored twin (`/twin`'s shape); KeyError if never heard from."""
        return self._gateway(site_id, gateway_id).twin()

    def stats(self, site_id: str, gateway_id: str) -> dict[str, Any]:
        """One gateway's counters; KeyError if never heard from."""
        return self._gateway(site_id, gateway_id).stats()

    def history(self, site_id: str, gateway_id: str) -> list[dict[str, Any]]:
        """The events the mirror recorded for one gateway, oldest first."""
        return list(self._gateway(site_id, gateway_id).history)

    def gateways(self) -> list[dict[str, Any]]:
        """Every gateway's counters."""
        return self.state.all_stats()

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Wait until `predicate()` holds, checking after every message; TimeoutError after
        `timeout_s`."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                changed = self._changed
                await changed.wait()

    def request_rebirth(self, site_id: str, gateway_id: str) -> bool:
        """Publish `cmd/rebirth` to one gateway; False when not connected."""
        conn = self._conn
        if conn is None or conn.lost.done():
            return False
        try:
            conn.publish(f"{self.prefix}/{site_id}/{gateway_id}/cmd/rebirth", b"{}", qos=1)
        except MqttError as exc:
            log.info("mirror: cannot ask %s/%s for a rebirth now: %s", site_id, gateway_id, exc)
            return False
        return True

    # -- internals --------------------------------------------------------------------------------

    def _gateway(self, site_id: str, gateway_id: str) -> GatewayMirror:
        found = self.state.find(site_id, gateway_id)
        if found is None:
            raise KeyError(f"no message from gateway {site_id}/{gateway_id} yet")
        return found

    def _topics(self) -> list[str]:
        site, gw = self.site_id or "+", self.gateway_id or "+"
        return [f"{self.prefix}/{site}/{gw}/{leaf}" for leaf in LEAVES]

    async def _connect(self, *, first: bool) -> None:
        conn = MqttConnection(
            host=self.host,
            port=self.port,
            client_id=self._client_id,
            keepalive_s=self._keepalive_s,
            clean_session=not self._persistent,
            username=self._username,
            password=self._password,
            tls=self._tls,
            tls_check_hostname=self._tls_check_hostname,
            on_message=self._message,
        )
        await conn.open()
        try:
            conn.subscribe(self._topics(), qos=1)
        except MqttError:
            conn.abort()
            raise
        self._conn = conn
        self.connects += 1
        log.info(
            "mirror: connected to %s:%d, subscribed to %s", self.host, self.port, self._topics()
        )
        if not first:
            self._emit(self.state.resync(self._clock()))

    async def _supervise(self) -> None:
        """Reconnect whenever the connection is lost, with capped, jittered backoff."""
        while True:
            conn = self._conn
            if conn is not None:
                why = await asyncio.shield(conn.lost)
                log.warning("mirror: %s; reconnecting", why)
                conn.abort()
            delay = RECONNECT_MIN_S
            while True:
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                try:
                    await self._connect(first=False)
                    break
                except MqttError as exc:
                    log.info("mirror: %s", exc)
                    delay = min(delay * 2, self._reconnect_max_s)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self._emit(self.state.tick(self._clock()))

    def _message(self, msg: Message) -> None:
        """One inbound message, on the loop thread (paho's callback)."""
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self.state.ignored += 1
            return
        payload = bytes(msg.payload)
        hook = self.drop_diff
        if hook is not None and topic.endswith("/diff"):
            where = split_topic(topic, self.prefix)
            if where is not None and hook(where[0], where[1], payload):
                self.dropped += 1
                return
        try:
            notices = self.state.handle(topic, payload, self._clock(), retained=bool(msg.retain))
        except Exception:
            # The state machine checks every field it reads; this is the net under a bug in it,
            # so that one message can never stop the mirror.
            log.exception("mirror: message on %s could not be handled", topic)
            return
        self._emit(notices)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _emit(self, notices: list[Notice]) -> None:
        for notice in notices:
            if notice.kind is Kind.REBIRTH:
                self.request_rebirth(notice.site_id, notice.gateway_id)
            elif notice.kind is Kind.MALFORMED:
                key = f"{notice.site_id}/{notice.gateway_id}/{notice.detail.get('leaf')}"
                self._malformed_log.log(
                    logging.WARNING,
                    key,
                    "mirror: dropped a message on %s: %s",
                    key,
                    notice.detail.get("error"),
                )
            if self.on_notice is not None:
                try:
                    self.on_notice(notice)
                except Exception:
                    log.exception("mirror: notice hook failed")
