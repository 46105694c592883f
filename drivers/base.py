"""The interface every protocol driver follows, and the supervisor that owns its connection.

A driver is given its points as opaque string keys plus protocol addresses; it turns device
responses into `Sample`s and never learns what a key means. One supervisor task per connection
connects, runs the protocol's poll/subscription loop, and on loss fails every pending request at
once with the cause, marks the points STALE, and reconnects with capped, jittered backoff.
What a driver hands upward (samples, qualities, states) is defined in `drivers.contract`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from drivers.backoff import Backoff
from drivers.contract import ConnectionState, Quality, Sample, StateListener
from drivers.errors import ConnectionLostError, NotConnectedError

# The contract types are imported from drivers.contract by everyone else, not from here.
__all__ = ["Driver", "next_tick", "summarize_keys"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Polls in a row that must fit their interval before an overrun episode is logged as over.
_FITTING_TO_RECOVER = 10


class Driver(ABC):
    """A device connection owned by one supervisor task."""

    def __init__(self, name: str, *, backoff: Backoff | None = None, queue_size: int = 256) -> None:
        self.name = name
        self.state = ConnectionState.DISCONNECTED
        self.last_error: str | None = None
        self._backoff = backoff or Backoff()
        # Bounded so a stalled consumer cannot grow memory without limit; see _emit.
        self._queue: asyncio.Queue[list[Sample] | None] = asyncio.Queue(maxsize=queue_size)
        # Keyed by a token per registration, so one unsubscribe removes exactly its own entry
        # even when the same callable was added twice.
        self._listeners: dict[object, StateListener] = {}
        # Last quality logged per key, so _log_transitions speaks on transitions only.
        self._quality: dict[str, Quality] = {}
        self._task: asyncio.Task[None] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._drop_cause: BaseException | None = None
        self._ever_connected = False
        # The connect failure last logged: a device down for hours logs its first failure and
        # each change of reason, not every retry.
        self._logged_failure: str | None = None
        self._closing = False
        self.dropped_batches = 0
        # Polls skipped because the one before overran its interval (in /health), and whether
        # the last poll overran: the log says when overrunning starts and stops, not each time.
        self.overruns = 0
        self._overrunning = False
        self._fitting = 0  # polls in a row that fit their interval since the last overrun

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

    def add_state_listener(self, listener: StateListener) -> Callable[[], None]:
        """Call `listener(name, state, reason)` on every transition; return its unsubscribe."""
        token = object()
        self._listeners[token] = listener

        def remove() -> None:
            self._listeners.pop(token, None)  # a second call finds nothing: harmless

        return remove

    @property
    def connected(self) -> bool:
        """True while the connection is up."""
        return self.state is ConnectionState.CONNECTED

    @property
    def target(self) -> str:
        """Where the device is (its endpoint), for log lines; empty if the protocol has none."""
        return ""

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
        waiters: set[asyncio.Future[Any]] = {task, lost}
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
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

    async def _poll_every(self, interval: float, poll: Callable[[], Awaitable[None]]) -> None:
        """Run `poll` on a fixed grid of `interval` seconds until the connection is lost."""
        # Taken once: _fail_pending clears self._lost, and the cause lives on this future.
        lost = self._lost
        loop = asyncio.get_running_loop()
        tick = loop.time()
        while True:
            started = loop.time()
            await poll()
            now = loop.time()
            previous, tick = tick, next_tick(tick, now, interval)
            self._count_overrun(round((tick - previous) / interval) - 1, now - started, interval)
            await self._sleep_unless_lost(tick - now, lost)

    def _count_overrun(self, skipped: int, took: float, interval: float) -> None:
        """Count the ticks a poll missed; log when polls start and stop being skipped."""
        if skipped > 0:
            self.overruns += skipped
            self._fitting = 0
            if not self._overrunning:
                self._overrunning = True
                log.warning(
                    "%s: a poll took %.3g s, longer than its %g s interval; "
                    "polls are being skipped",
                    self.name,
                    took,
                    interval,
                )
        elif self._overrunning:
            # A device whose polls sometimes wait for a timeout flaps between the two; one
            # pair of lines per episode, not per flap: "stopped" only after a run that fits.
            self._fitting += 1
            if self._fitting < _FITTING_TO_RECOVER:
                return
            self._overrunning = False
            log.info(
                "%s: polls fit their %g s interval again (%d skipped so far)",
                self.name,
                interval,
                self.overruns,
            )

    async def _sleep_unless_lost(self, delay: float, lost: asyncio.Future[None] | None) -> None:
        """Sleep `delay` seconds, but raise the cause at once if the connection drops meanwhile.

        Only for loops that run while connected, which pass the `_lost` future taken when their
        connection came up. None means that connection is already gone (or never was): sleeping
        on would poll a dead link, so it raises instead.
        """
        if lost is None:
            raise ConnectionLostError(f"{self.name}: connection lost")
        if not lost.done():
            await asyncio.wait({lost}, timeout=max(delay, 0.0))
        if lost.done():
            cause = lost.exception()
            if cause is None:
                raise ConnectionLostError(f"{self.name}: connection lost")
            raise cause

    def _log_transitions(self, samples: Iterable[Sample]) -> None:
        """Log the points whose quality changed, grouped by reason; unchanged ones stay quiet."""
        went_bad: dict[str, list[str]] = {}
        doubtful: dict[str, list[str]] = {}
        recovered: list[str] = []
        last = self._quality
        for s in samples:
            quality = s.quality
            before = last.get(s.key)
            if quality is before:
                continue
            last[s.key] = quality
            if quality is Quality.BAD:
                went_bad.setdefault(s.reason or "unknown", []).append(s.key)
            elif quality is Quality.UNCERTAIN:
                doubtful.setdefault(s.reason or "unknown", []).append(s.key)
            elif quality is Quality.GOOD and before is not None:
                # Only GOOD is recovery: a STALE point has no current value, it is not back.
                recovered.append(s.key)
        for reason, keys in went_bad.items():
            log.warning("%s: %s BAD: %s", self.name, summarize_keys(keys), reason)
        for reason, keys in doubtful.items():
            log.info("%s: %s UNCERTAIN: %s", self.name, summarize_keys(keys), reason)
        if recovered:
            log.info("%s: %s GOOD again", self.name, summarize_keys(recovered))

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
            self._logged_failure = None
            self._quality.clear()  # a new connection: its first qualities are no transition
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
        self._set_state(ConnectionState.DISCONNECTED, reason)  # logs a loss that had been up
        if was_connected:
            self._logged_failure = reason
        elif reason != self._logged_failure:
            self._logged_failure = reason
            where = f" to {self.target}" if self.target else ""
            log.warning("%s: cannot connect%s: %s; retrying with backoff", self.name, where, reason)
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
        for listener in list(self._listeners.values()):
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


def next_tick(tick: float, now: float, interval: float) -> float:
    """Return the next poll time on the fixed grid `tick + k * interval` that lies after `now`.

    No drift (the grid never moves), and a poll that overran skips the ticks it missed instead
    of firing them back to back.
    """
    tick += interval
    if tick <= now:
        tick += (math.floor((now - tick) / interval) + 1) * interval
    return tick


def summarize_keys(keys: Sequence[str], limit: int = 5) -> str:
    """Join the first `limit` keys for a log line and say how many more there are."""
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} and {len(keys) - limit} more"


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
