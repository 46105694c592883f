"""The driver supervisor, its backoff, schedule and shared helpers, with a scripted in-memory
driver (no sockets)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Any

import pytest

from drivers.backoff import Backoff
from drivers.base import Driver, next_tick
from drivers.contract import ConnectionState, Quality, Sample
from drivers.errors import ConnectionLostError, NotConnectedError

# -- backoff ----------------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_within_half_to_full_ceiling() -> None:
    b = Backoff(initial=0.5, cap=30.0, rng=random.Random(1))
    for attempt in range(12):
        ceiling = min(30.0, 0.5 * 2**attempt)
        delays = [
            Backoff(initial=0.5, cap=30.0, rng=random.Random(s), _attempt=attempt).next_delay()
            for s in range(200)
        ]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4  # really jittered, not a constant
        d = b.next_delay()
        assert ceiling / 2 <= d <= ceiling
    assert b.attempts == 12


def test_backoff_is_capped_and_never_zero_even_after_a_very_long_outage() -> None:
    b = Backoff(initial=0.1, cap=5.0, rng=random.Random(3))
    delays = [b.next_delay() for _ in range(5000)]  # ~7 h of outage at the cap; 2**5000 overflows
    assert max(delays) <= 5.0
    assert min(delays) >= 0.05
    assert all(2.5 <= d <= 5.0 for d in delays[10:])


def test_backoff_reset_starts_again_from_initial() -> None:
    b = Backoff(initial=1.0, cap=60.0)
    for _ in range(6):
        b.next_delay()
    b.reset()
    assert b.attempts == 0
    assert 0.5 <= b.next_delay() <= 1.0


# -- poll schedule ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tick", "now", "expected"),
    [
        (10.0, 10.2, 11.0),  # a quick poll: the next grid point
        (10.0, 10.999, 11.0),
        (10.0, 11.0, 12.0),  # finished exactly on the next tick: that one is missed
        (10.0, 11.5, 12.0),  # overran one tick: skip it, don't fire twice
        (10.0, 13.7, 14.0),  # overran three
    ],
)
def test_next_tick_stays_on_the_grid_and_skips_missed_ticks(
    tick: float, now: float, expected: float
) -> None:
    assert next_tick(tick, now, 1.0) == pytest.approx(expected)


def test_next_tick_does_not_drift() -> None:
    tick, now = 0.0, 0.0
    for _ in range(10_000):
        now = tick + 0.03  # every poll takes 30 ms of a 100 ms period
        tick = next_tick(tick, now, 0.1)
    assert tick == pytest.approx(1000.0)


# -- supervisor -------------------------------------------------------------------------------


class ScriptedDriver(Driver):
    """A driver whose connection the test opens, refuses and drops at will."""

    def __init__(self, *, refuse: int = 0) -> None:
        super().__init__("fake", backoff=Backoff(initial=0.01, cap=0.05, rng=random.Random(0)))
        self.refuse = refuse  # connection attempts to refuse before accepting
        self.connects = 0
        self.disconnects = 0
        self.drop: asyncio.Future[None] | None = None
        self.polled = asyncio.Event()
        self.states: list[ConnectionState] = []
        self.add_state_listener(lambda name, state, reason: self.states.append(state))

    @property
    def keys(self) -> Sequence[str]:
        return ("a", "b")

    async def _connect(self) -> None:
        self.connects += 1
        if self.refuse:
            self.refuse -= 1
            raise ConnectionRefusedError("refused by script")
        self.drop = asyncio.get_running_loop().create_future()

    async def _disconnect(self) -> None:
        self.disconnects += 1

    async def _run(self) -> None:
        self._emit([Sample("a", 1, Quality.GOOD), Sample("b", 2, Quality.GOOD)])
        self._mark_healthy()
        self.polled.set()
        assert self.drop is not None
        await self.drop  # raises whatever the test sets: the connection is gone

    async def write(self, key: str, value: Any) -> Any:
        return await self._call(asyncio.sleep(10, result=value))


@pytest.fixture
async def driver() -> Any:
    d = ScriptedDriver()
    yield d
    await d.close()


async def drain(d: Driver) -> list[Sample]:
    out: list[Sample] = []
    while not d._queue.empty():
        batch = d._queue.get_nowait()
        if batch:
            out.extend(batch)
    return out


async def test_pending_request_fails_at_once_when_the_connection_drops(
    driver: ScriptedDriver,
) -> None:
    await driver.start()
    await asyncio.wait_for(driver.polled.wait(), 1)
    pending = asyncio.create_task(driver.write("a", 5))  # would take 10 s
    await asyncio.sleep(0.01)
    assert not pending.done()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert driver.drop is not None
    driver.drop.set_exception(ConnectionResetError("peer reset"))
    with pytest.raises(
        ConnectionLostError, match=r"connection lost during request.*peer reset"
    ) as err:
        await asyncio.wait_for(pending, 1)
    assert loop.time() - started < 0.5
    assert isinstance(err.value.__cause__, ConnectionResetError)


async def test_loss_marks_every_point_stale_and_reconnects_by_itself(
    driver: ScriptedDriver,
) -> None:
    await driver.start()
    await asyncio.wait_for(driver.polled.wait(), 1)
    assert driver.connected
    await drain(driver)
    driver.polled.clear()
    assert driver.drop is not None
    driver.drop.set_exception(ConnectionResetError("gone"))
    await asyncio.wait_for(driver.polled.wait(), 1)  # polled again: reconnected
    samples = await drain(driver)
    stale = [s for s in samples if s.quality is Quality.STALE]
    assert sorted(s.key for s in stale) == ["a", "b"]
    assert all(s.value is None and "gone" in (s.reason or "") for s in stale)
    assert driver.connects == 2 and driver.disconnects >= 1
    assert driver.states[:6] == [
        ConnectionState.CONNECTING,
        ConnectionState.CONNECTED,
        ConnectionState.DISCONNECTED,
        ConnectionState.BACKOFF,
        ConnectionState.CONNECTING,
        ConnectionState.CONNECTED,
    ]


async def test_never_connected_points_are_bad_not_stale_and_reported_once() -> None:
    d = ScriptedDriver(refuse=3)
    try:
        await d.start()
        await asyncio.wait_for(d.polled.wait(), 2)
        samples = await drain(d)
        failed = [s for s in samples if s.quality is not Quality.GOOD]
        # One BAD per point for the first failure, not one per refused attempt.
        assert [(s.key, s.quality) for s in failed] == [("a", Quality.BAD), ("b", Quality.BAD)]
        assert "refused by script" in (failed[0].reason or "")
        assert d.connects == 4
    finally:
        await d.close()


async def test_request_without_connection_fails_fast(driver: ScriptedDriver) -> None:
    with pytest.raises(NotConnectedError, match="fake: not connected"):
        await driver.write("a", 1)


async def test_cancelled_caller_cancels_its_request(driver: ScriptedDriver) -> None:
    await driver.start()
    await asyncio.wait_for(driver.polled.wait(), 1)
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow() -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    caller = asyncio.create_task(driver._call(slow()))
    await asyncio.wait_for(started.wait(), 1)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_close_fails_pending_ends_the_stream_and_stops_reconnecting(
    driver: ScriptedDriver,
) -> None:
    await driver.start()
    await asyncio.wait_for(driver.polled.wait(), 1)
    pending = asyncio.create_task(driver.write("a", 1))
    await asyncio.sleep(0.01)
    await driver.close()
    with pytest.raises(ConnectionLostError, match="driver closed"):
        await pending
    assert driver.state is ConnectionState.CLOSED
    # What was emitted before closing is still delivered, then the stream ends: no STALE
    # batch, since a closed driver did not lose its device.
    batches = [batch async for batch in driver.samples()]
    assert batches == [[Sample("a", 1, Quality.GOOD), Sample("b", 2, Quality.GOOD)]]
    connects = driver.connects
    await asyncio.sleep(0.1)
    assert driver.connects == connects


async def test_healthy_poll_resets_the_backoff(driver: ScriptedDriver) -> None:
    driver._backoff.next_delay()
    driver._backoff.next_delay()
    await driver.start()
    await asyncio.wait_for(driver.polled.wait(), 1)
    assert driver._backoff.attempts == 0


async def test_caller_cancelled_while_a_lost_request_cleans_up_stays_cancelled(
    driver: ScriptedDriver,
) -> None:
    await driver.start()
    await asyncio.wait_for(driver.polled.wait(), 1)

    async def slow_to_die() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)  # a request that takes a while to tear down
            raise

    caller = asyncio.create_task(driver._call(slow_to_die()))
    await asyncio.sleep(0.01)
    assert driver.drop is not None
    driver.drop.set_exception(ConnectionResetError("gone"))
    await asyncio.sleep(0.05)  # the caller is now waiting for the request to finish cancelling
    caller.cancel()
    # A cancellation must never turn into an ordinary error: close() relies on it.
    with pytest.raises(asyncio.CancelledError):
        await caller


class CancellationEatingDriver(ScriptedDriver):
    """Connects the way pymodbus does on Python 3.11: asyncio.wait_for around a connect that
    fails at once, so a cancellation arriving together with the failure comes out as the
    failure (wait_for returns the inner result when both happen in one loop step)."""

    async def _connect(self) -> None:
        self.connects += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise ConnectionRefusedError("refused, reported instead of the cancellation") from None


@pytest.mark.parametrize("phase", ["connecting", "backoff"])
async def test_close_stops_the_supervisor_even_when_a_library_eats_the_cancellation(phase):
    driver = CancellationEatingDriver()
    if phase == "backoff":
        driver._backoff = Backoff(initial=3600, cap=3600)
    await driver.start()
    await asyncio.sleep(0.05)
    assert driver.connects == 1
    await asyncio.wait_for(driver.close(), 2)
    assert driver.state is ConnectionState.CLOSED
    await asyncio.sleep(0.05)
    assert driver.connects == 1, "a closed driver must never try to connect again"


# -- listeners --------------------------------------------------------------------------------


async def test_add_state_listener_returns_its_unsubscribe_which_is_idempotent() -> None:
    d = ScriptedDriver()
    kept: list[ConnectionState] = []
    removed: list[ConnectionState] = []
    unsubscribe = d.add_state_listener(lambda name, state, reason: removed.append(state))
    d.add_state_listener(lambda name, state, reason: kept.append(state))
    d._set_state(ConnectionState.CONNECTING, None)
    unsubscribe()
    unsubscribe()  # a second call is harmless and removes nothing else
    d._set_state(ConnectionState.CONNECTED, None)
    assert removed == [ConnectionState.CONNECTING]
    assert kept == [ConnectionState.CONNECTING, ConnectionState.CONNECTED]


async def test_unsubscribe_removes_only_its_own_registration_of_a_listener() -> None:
    d = ScriptedDriver()
    seen: list[ConnectionState] = []

    def listener(name: str, state: ConnectionState, reason: str | None) -> None:
        seen.append(state)

    first = d.add_state_listener(listener)
    d.add_state_listener(listener)
    first()
    first()
    d._set_state(ConnectionState.CONNECTING, None)
    assert seen == [ConnectionState.CONNECTING]  # the second registration still hears


# -- shared protocol helpers ------------------------------------------------------------------


def good_again(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "GOOD again" in r.getMessage()]


async def test_quality_transitions_are_logged_once_and_stale_is_not_good_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = ScriptedDriver()
    caplog.set_level(logging.INFO, logger="drivers.base")
    d._log_transitions([Sample("a", 1, Quality.GOOD), Sample("b", 2, Quality.GOOD)])
    d._log_transitions([Sample("a", None, Quality.BAD, reason="refused")])
    d._log_transitions([Sample("a", None, Quality.BAD, reason="refused")])  # no news
    assert [r.getMessage() for r in caplog.records] == ["fake: a BAD: refused"]
    caplog.clear()
    d._log_transitions([Sample("a", None, Quality.STALE, reason="device disconnected")])
    assert good_again(caplog) == []  # a STALE point has no current value: not recovered
    d._log_transitions([Sample("a", 3, Quality.GOOD), Sample("b", 2, Quality.GOOD)])
    assert good_again(caplog) == ["fake: a GOOD again"]  # b never left GOOD


async def test_sleep_unless_lost_raises_at_once_without_a_connection() -> None:
    d = ScriptedDriver()
    # A poll loop that has no lost-future has no connection: sleeping on would poll a dead link.
    with pytest.raises(ConnectionLostError, match="fake: connection lost"):
        await asyncio.wait_for(d._sleep_unless_lost(3600, None), 1)


async def test_sleep_unless_lost_raises_the_cause_of_a_loss_before_the_delay() -> None:
    d = ScriptedDriver()
    loop = asyncio.get_running_loop()
    cause = ConnectionResetError("peer reset")
    already: asyncio.Future[None] = loop.create_future()
    already.set_exception(cause)
    with pytest.raises(ConnectionResetError) as err:
        await asyncio.wait_for(d._sleep_unless_lost(3600, already), 1)
    assert err.value is cause

    meanwhile: asyncio.Future[None] = loop.create_future()
    loop.call_later(0.01, meanwhile.set_exception, cause)
    with pytest.raises(ConnectionResetError) as err:
        await asyncio.wait_for(d._sleep_unless_lost(3600, meanwhile), 1)
    assert err.value is cause


async def test_sleep_unless_lost_returns_after_the_delay_while_connected() -> None:
    d = ScriptedDriver()
    lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    await asyncio.wait_for(d._sleep_unless_lost(0.01, lost), 1)
    assert not lost.done()


# -- connection-failure log lines ---------------------------------------------------------------


class UnreachableDriver(ScriptedDriver):
    """Fails to connect with each of `failures` in turn, then connects."""

    def __init__(self, failures: list[Exception]) -> None:
        super().__init__()
        self.failures = failures

    @property
    def target(self) -> str:
        return "tcp://10.0.0.9:502"

    async def _connect(self) -> None:
        self.connects += 1
        if self.failures:
            raise self.failures.pop(0)
        self.drop = asyncio.get_running_loop().create_future()


def lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


async def test_connect_failures_are_logged_first_and_when_the_reason_changes_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.base")
    d = UnreachableDriver([ConnectionRefusedError("refused")] * 3 + [TimeoutError("no answer")] * 2)
    try:
        await d.start()
        await asyncio.wait_for(d.polled.wait(), 2)
        assert d.connects == 6
        # Five failed attempts, two reasons: two lines, not five (and not none).
        assert lines(caplog, logging.WARNING) == [
            "fake: cannot connect to tcp://10.0.0.9:502: ConnectionRefusedError: refused; "
            "retrying with backoff",
            "fake: cannot connect to tcp://10.0.0.9:502: TimeoutError: no answer; "
            "retrying with backoff",
        ]
        assert lines(caplog, logging.INFO) == ["fake: connected"]

        # Up, then lost, then refused while it is down: the loss, then the first refusal.
        caplog.clear()
        d.failures = [ConnectionRefusedError("refused")] * 3
        d.polled.clear()
        assert d.drop is not None
        d.drop.set_exception(ConnectionResetError("gone"))
        await asyncio.wait_for(d.polled.wait(), 2)
        assert lines(caplog, logging.WARNING) == [
            "fake: connection lost: ConnectionResetError: gone",
            "fake: cannot connect to tcp://10.0.0.9:502: ConnectionRefusedError: refused; "
            "retrying with backoff",
        ]
        assert lines(caplog, logging.INFO) == ["fake: connected"]
    finally:
        await d.close()
