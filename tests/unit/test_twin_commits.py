"""Waiting for commits: CommitSignal on its own and bound to a real store, `committed_snapshot`
when the database cannot commit, and retention that keeps what a consumer's hold still needs.

The failing disk is SQLite's own SQLITE_FULL (`limit_database_growth`, as in test_twin_faults).
The writer is a real thread; where a test needs to know that a wake-up is still queued, it blocks
the event loop on purpose (joining the committing thread before awaiting anything).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests_support import EPOCH, FakeClock

from drivers.contract import Quality, Sample
from gateway.errors import StoreError
from gateway.twin.commits import CommitSignal
from gateway.twin.history import CursorExpiredError
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore

DAY = 86400.0
POINTS = [PointDef(f"area/line/asset{i}/value", "dev", "float64") for i in range(10)]
WITHIN = 30.0  # generous: the machine is shared; a wait that fails means a lost wake-up


class Revs:
    """What the writer would report as committed, counting how often the loop reads it."""

    def __init__(self) -> None:
        self.rev = 0
        self.reads = 0

    def read(self) -> int:
        self.reads += 1
        return self.rev


# -- CommitSignal alone ---------------------------------------------------------------------------


async def test_wait_past_wakes_on_a_commit_from_another_thread() -> None:
    revs = Revs()
    signal = CommitSignal(asyncio.get_running_loop(), revs.read)
    waiter = asyncio.create_task(signal.wait_past(0))
    await asyncio.sleep(0)  # the waiter is waiting now
    assert not waiter.done()

    def commit() -> None:
        revs.rev = 7
        signal.committed(7)

    threading.Thread(target=commit).start()
    async with asyncio.timeout(WITHIN):
        assert await waiter == 7
    assert signal.rev == 7


async def test_a_burst_of_commits_queues_one_wake_up() -> None:
    revs = Revs()
    signal = CommitSignal(asyncio.get_running_loop(), revs.read)
    assert revs.reads == 1

    def burst() -> None:
        for rev in range(1, 1001):
            revs.rev = rev
            signal.committed(rev)

    thread = threading.Thread(target=burst)
    thread.start()
    thread.join()  # blocks the loop: none of the wake-ups can run before the burst is over
    async with asyncio.timeout(WITHIN):
        assert await signal.wait_past(0) == 1000
    assert revs.reads == 2, "one wake-up read the rev once for the whole burst"


async def test_a_commit_landing_while_the_wake_up_reads_queues_another() -> None:
    # The writer commits again right after the loop has read the rev: the wake-up was already
    # cleared, so this commit must queue its own, or a waiter would sleep past it.
    revs = Revs()

    def read_then_commit() -> int:
        seen = revs.read()
        if seen == 1:
            revs.rev = 2
            signal.committed(2)
        return seen

    signal = CommitSignal(asyncio.get_running_loop(), read_then_commit)
    revs.rev = 1
    signal.committed(1)
    async with asyncio.timeout(WITHIN):
        assert await signal.wait_past(0) >= 1
        assert await signal.wait_past(1) == 2  # a lost wake-up would wait here forever


async def test_wait_for_a_committed_rev_returns_at_once() -> None:
    revs = Revs()
    revs.rev = 5
    signal = CommitSignal(asyncio.get_running_loop(), revs.read)
    assert await signal.wait_for(0) == 5
    assert await signal.wait_for(5) == 5
    waiter = asyncio.create_task(signal.wait_for(6))
    await asyncio.sleep(0)
    assert not waiter.done()
    revs.rev = 6
    signal.committed(6)
    async with asyncio.timeout(WITHIN):
        assert await waiter == 6


def test_a_commit_after_the_loop_closed_is_dropped_quietly() -> None:
    loop = asyncio.new_event_loop()
    signal = CommitSignal(loop, lambda: 0)
    loop.close()
    signal.committed(1)  # the writer outlives the loop at shutdown: no error
    signal.committed(2)
    assert signal.rev == 0


# -- bound to a store -----------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TwinStore]:
    twin = TwinStore(tmp_path / "twin.db", POINTS, flush_rows=100)
    twin.open()
    yield twin
    twin.close()


def burst(store: TwinStore, rounds: int, start: float = 0.0) -> None:
    """`rounds` batches, each changing every point once."""
    for r in range(rounds):
        store.ingest(
            [Sample(p.id, start + r + i / 100, Quality.GOOD) for i, p in enumerate(POINTS)]
        )


async def test_a_store_commit_wakes_the_loop_and_snapshots_wait_for_their_commit(
    store: TwinStore,
) -> None:
    signal = store.commit_signal()
    assert store.commit_signal() is signal, "one signal per store"
    before = signal.rev
    burst(store, 3)
    async with asyncio.timeout(WITHIN):
        assert await signal.wait_past(before) > before
        rev, values = await store.committed_snapshot(max_wait_s=WITHIN)
    assert rev == store.rev <= store.committed_rev
    assert values[POINTS[0].id].value == 2.0


async def test_committed_snapshot_fails_while_the_disk_is_full_and_recovers(
    store: TwinStore,
) -> None:
    burst(store, 2)
    await store.aflush()
    await asyncio.to_thread(store.limit_database_growth, 0)
    burst(store, 2000, start=1000)  # compressed history: enough that a commit needs a new page
    with pytest.raises(StoreError):
        await asyncio.to_thread(store.flush, WITHIN)
    assert store.stats.writer_error is not None
    with pytest.raises(StoreError, match=r"not committed within .*full"):
        await store.committed_snapshot(max_wait_s=0.2)
    assert store.rev > store.committed_rev, "nothing new was committed meanwhile"

    await asyncio.to_thread(store.limit_database_growth, None)
    async with asyncio.timeout(WITHIN):
        rev, _ = await store.committed_snapshot(max_wait_s=WITHIN)
    assert rev == store.rev == store.committed_rev


# -- retention and holds --------------------------------------------------------------------------


def test_prune_keeps_the_events_a_hold_has_not_delivered(tmp_path: Path) -> None:
    clock = FakeClock()
    with TwinStore(tmp_path / "twin.db", POINTS, clock=clock, events_days=7) as twin:
        revs = []
        for day in range(10):
            clock.now = EPOCH + day * DAY
            revs.append(twin.append_event("DeviceStateChanged", {"day": day}))
        twin.flush()
        twin.hold_log("sync", revs[3])  # delivered up to day 3

        result = twin.prune(EPOCH + 30 * DAY)  # every event is older than events_days
        assert result.events == 4
        assert twin.log_start_rev == result.log_start_rev == revs[4]
        kept = twin.events_since(revs[3])
        assert [e.data["day"] for e in kept] == list(range(4, 10))
        with pytest.raises(CursorExpiredError):
            twin.events_since(revs[2])

        twin.hold_log("sync", revs[7])  # delivered further: the hold moves on
        result = twin.prune(EPOCH + 30 * DAY)
        assert result.events == 4
        assert [e.data["day"] for e in twin.events_since(revs[7])] == [8, 9]

        twin.release_log("sync")
        result = twin.prune(EPOCH + 30 * DAY)
        assert result.events == 2
        assert twin.events_since(twin.log_start_rev - 1) == []
        assert twin.log_start_rev == revs[-1] + 1
