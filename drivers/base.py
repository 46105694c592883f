"""The interface every protocol driver follows, and the supervisor that owns its connection.

A driver is given its points as opaque string keys plus protocol addresses; it turns device
responses into `Sample`s and never learns what a key means. One supervisor task per connection
connects, runs the protocol's poll/subscription loop, and on loss fails every pending request at
once with the cause, marks the points STALE, and reconnects with capped, jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from drivers.backoff import Backoff
from drivers.errors import ConnectionLostError, NotConnectedError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Quality(StrEnum):
    """Value quality, with OPC UA semantics."""

    GOOD = "GOOD"
    UNCERTAIN = "UNCERTAIN"
    BAD = "BAD"
    STALE = "STALE"


class ConnectionState(StrEnum):
    """Where a driver's connection is in its life."""

    DISCONNECTED = "DISCONNECTED"
    CONNECTING = "CONNECTING"
    CONNECTED = "CONNECTED"
    BACKOFF = "BACKOFF"
    CLOSED = "CLOSED"


@dataclass(slots=True, frozen=True)
class Sample:
    """One reading of one point.

    `value` None with a non-GOOD quality means "no new value": the consumer keeps the last one
    and only changes its quality (a lost connection, a point the device refused).
    """

    key: str
    value: Any
    quality: Quality
    source_ts: float | None = None
    reason: str | None = None


StateListener = Callable[[str, ConnectionState, "str | None"], None]


class Driver(ABC):
    """A device connection owned by one supervisor task."""

    def __init__(self, name: str, *, backoff: Backoff | None = None, queue_size: int = 256) -> None:
        self.name = name
        self.state = ConnectionState.DISCONNECTED
        self.last_error: str | None = None
        self._backoff = backoff or Backoff()
        # Bounded so a stalled consumer cannot grow memory without limit; see _emit.
        self._queue: asyncio.Queue[list[Sample] | None] = asyncio.Queue(maxsize=queue_size)
        self._listeners: list[StateListener] = []
        self._task: asyncio.Task[None] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._drop_cause: BaseException | None = None
        self._ever_connected = False
        self._closing = False
        self.dropped_batches = 0

    # -- what a protocol implements -------------------------------------------------------------

    @property
    @abstractmethod
    def keys(self) -> Sequence[str]:
        """Keys of every point this driver serves."""

    @abstractmethod
    async def _connect(self) -> None:
        """Open the connection; raise on failure."""

    @abstractmethod
    async def _disconnect(self) -> None:
        """Close the connection; must not raise."""

    @abstractmethod
    async def _run(self) -> None:
        """Poll or subscribe while connected; return or raise when the connection is lost."""

    @abstractmethod
    async def write(self, key: str, value: Any) -> Any:
        """Write a value, read it back, verify it, and return the value read back."""

    # -- public API -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the supervisor task; it connects and reconnects by itself."""
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name=f"driver:{self.name}")

    async def close(self) -> None:
        """Stop the supervisor, close the connection and end the sample stream."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._fail_pending(ConnectionLostError(f"{self.name}: driver closed"))
        await self._disconnect()
        self._set_state(ConnectionState.CLOSED, None)
        self._put(None)

    async def samples(self) -> AsyncIterator[list[Sample]]:
        """Yield sample batches until the driver is closed."""
        while True:
            batch = await self._queue.get()
            if batch is None:
                return
            yield batch

    def add_state_listener(self, listener: StateListener) -> None:
        """Call `listener(name, state, reason)` on every connection-state transition."""
        self._listeners.append(listener)

    @property
    def connected(self) -> bool:
        """True while the connection is up."""
        return self.state is ConnectionState.CONNECTED

    # -- helpers for protocols ------------------------------------------------------------------

    def _emit(self, batch: list[Sample]) -> None:
        """Hand a batch to the consumer without ever blocking the poll loop."""
        if batch:
            self._put(batch)

    def _mark_healthy(self) -> None:
        """Tell the supervisor the connection really works (a poll succeeded)."""
        # Resetting only here, not on connect, keeps a device that accepts and then drops
        # every connection from being hammered at the initial delay.
        self._backoff.reset()

    async def _call(self, awaitable: Awaitable[T]) -> T:
        """Run one request; if the connection drops meanwhile, fail at once with the cause."""
        lost = self._lost
        if lost is None or self.state is not ConnectionState.CONNECTED:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            # Between a drop and the supervisor noticing it, last_error is still unset; the
            # cause that failed the pending requests is the honest reason.
            dropped = _describe(self._drop_cause) if self._drop_cause else None
            why = self.last_error or dropped or "starting"
            raise NotConnectedError(f"{self.name}: not connected ({why})")
        task = asyncio.ensure_future(awaitable)
        try:
            done, _ = await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # asyncio.wait does not cancel what it waits for: without this the request would
            # run on, orphaned, after its caller gave up.
            task.cancel()
            raise
        if task in done:
            self._raise_if_closing()
            return task.result()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # we were cancelled ourselves while cleaning up: never swallow that
        except BaseException:
            pass  # the request's own failure is moot: the connection is gone
        cause = lost.exception()
        raise ConnectionLostError(
            f"{self.name}: connection lost during request: {cause}"
        ) from cause

    # -- the supervisor -------------------------------------------------------------------------

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._set_state(ConnectionState.CONNECTING, self.last_error)
            try:
                await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._raise_if_closing()
                await self._disconnect()
                self._lose(exc, was_connected=False)
                await self._sleep_backoff()
                continue
            self._raise_if_closing()
            self._lost = loop.create_future()
            self._drop_cause = None
            self._ever_connected = True
            self.last_error = None
            self._set_state(ConnectionState.CONNECTED, None)
            try:
                await self._run()
                cause: BaseException = ConnectionLostError(f"{self.name}: poll loop ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                cause = exc
            self._raise_if_closing()
            self._fail_pending(cause)
            await self._disconnect()
            self._lose(cause, was_connected=True)
            await self._sleep_backoff()

    def _lose(self, cause: BaseException, *, was_connected: bool) -> None:
        reason = _describe(cause)
        first_failure = self.last_error is None or was_connected
        self.last_error = reason
        self._set_state(ConnectionState.DISCONNECTED, reason)
        if first_failure:
            # A point whose device is gone keeps its last value but stops being current: STALE.
            # One that never had a value from this device has nothing to be stale about: BAD.
            quality = Quality.STALE if self._ever_connected else Quality.BAD
            text = f"device disconnected: {reason}"
            self._emit([Sample(k, None, quality, None, text) for k in self.keys])

    def _raise_if_closing(self) -> None:
        # Python 3.11's asyncio.wait_for, which protocol libraries use around connect and
        # requests, hands back the inner result when a cancellation and that result arrive in
        # the same loop step: our cancellation comes out as "connection refused". Without this
        # check the supervisor would treat close() as one more failure and retry forever.
        task = asyncio.current_task()
        if self._closing or (task is not None and task.cancelling()):
            raise asyncio.CancelledError

    async def _sleep_backoff(self) -> None:
        self._raise_if_closing()
        delay = self._backoff.next_delay()
        self._set_state(ConnectionState.BACKOFF, self.last_error)
        await asyncio.sleep(delay)

    def _fail_pending(self, cause: BaseException) -> None:
        lost, self._lost = self._lost, None
        if lost is not None and not lost.done():
            self._drop_cause = cause
            lost.set_exception(cause)
            # Mark retrieved: nobody may be waiting, and that is fine.
            lost.exception()

    def _set_state(self, state: ConnectionState, reason: str | None) -> None:
        if state is self.state:
            return
        previous, self.state = self.state, state
        if state is ConnectionState.CONNECTED:
            log.info("%s: connected", self.name)
        elif state is ConnectionState.DISCONNECTED and previous is ConnectionState.CONNECTED:
            log.warning("%s: connection lost: %s", self.name, reason)
        for listener in list(self._listeners):
            try:
                listener(self.name, state, reason)
            except Exception:
                log.exception("%s: state listener failed", self.name)

    def _put(self, item: list[Sample] | None) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            # The consumer is far behind; drop the oldest batch rather than stall the device
            # loop. Later batches carry newer values of the same points.
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
            self.dropped_batches += 1
            self._queue.put_nowait(item)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
