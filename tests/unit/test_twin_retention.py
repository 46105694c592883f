"""Retention over months: downsampled history, the database size bound, files that shrink.

The store runs on a fake clock, so a generator writes weeks of plant history in seconds; every
expected figure is computed here from what the test fed in.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests_support import EPOCH, FakeClock

from drivers.contract import Quality, Sample
from gateway.twin.model import PointDef
from gateway.twin.schema import AUTO_VACUUM_INCREMENTAL, page_bytes
from gateway.twin.store import TwinStore

DAY = 86400.0
MB = 1024 * 1024
T0 = EPOCH


def points(n: int) -> list[PointDef]:
    return [
        PointDef(f"plant/line{i % 4}/asset{i}/value", f"dev{i % 3}", "float64") for i in range(n)
    ]


def used_bytes(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path)
    try:
        return page_bytes(conn)
    finally:
        conn.close()


def bound_events(path: Path) -> list[dict]:
    """The StorageBoundReached events' data, read from the table (the event log serves only
    its window)."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT data FROM events WHERE type = 'StorageBoundReached' ORDER BY rev"
        ).fetchall()
    finally:
        conn.close()
    return [json.loads(data) for (data,) in rows]


def wait_for(condition: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_aggregates_span_the_raw_window_and_the_buckets_exactly(
    tmp_path: Path, fake_clock: FakeClock
) -> None:
    """Three days of one sample every 7 s; raw kept one day: hourly aggregates over all three
    days are the same as computed from every sample fed, across the boundary. (On a grid that
    is not aligned with the minute buckets, an edge bucket is exact only to the minute.)"""
    point = points(1)[0]
    base = T0 - T0 % 3600 + 3600
    fed: list[tuple[float, float]] = []
    with TwinStore(tmp_path / "twin.db", [point], clock=fake_clock, history_days=1) as twin:
        rng = random.Random(4)
        for i in range(int(3 * DAY / 7)):
            fake_clock.now = base + 7 * i
            value = round(50 + 20 * math.sin(i / 500) + rng.gauss(0, 1), 3)
            if twin.ingest([Sample(point.id, value, Quality.GOOD)]):
                fed.append((fake_clock.now, value))
            if i % 5000 == 0:
                twin.compact()
        result = twin.prune()
        cut = fake_clock.now - DAY
        # Whole blocks go (a block straddling the cut stays raw until it is all older).
        assert 0 < result.history_rows <= sum(1 for ts, _ in fed if ts < cut)
        start, end = base, fake_clock.now
        buckets = twin.aggregate(point.id, start, end, 3600)
        expected: dict[int, list[float]] = {}
        for ts, value in fed:
            expected.setdefault(int((ts - start) // 3600), []).append(value)
        assert len(buckets) == len(expected)
        for bucket, (k, values) in zip(buckets, sorted(expected.items()), strict=True):
            assert bucket.start == start + 3600 * k
            assert bucket.count == len(values)
            assert (bucket.min, bucket.max, bucket.last) == (min(values), max(values), values[-1])
            assert bucket.mean == pytest.approx(sum(values) / len(values))
        # A query wholly before the raw window is answered from the buckets alone.
        old = twin.aggregate(point.id, base + 3600, base + 7200, 60)
        minute = [v for ts, v in fed if base + 3600 <= ts // 60 * 60 <= base + 7200]
        assert sum(b.count for b in old) == len(minute)
        rows = twin.history(point.id, base, end, limit=100_000)
        downsampled = [r for r in rows if r.downsampled]
        assert len(downsampled) > 0 and rows[: len(downsampled)] == downsampled
        assert sum(1 for r in rows if not r.downsampled) == len(fed) - result.history_rows


def test_the_database_stays_under_its_bound_while_a_generator_writes_for_months(
    tmp_path: Path, fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """4 points of noisy values every second for 4 simulated days, raw kept 2 days, buckets a
    year, under a 4 MB bound: the bound, not the day counts, decides what stays (raw history of
    noise takes ~2.5 MB a day here, its one-minute buckets ~0.2 MB)."""
    caplog.set_level(logging.WARNING, logger="gateway.twin")
    path = tmp_path / "twin.db"
    defs = points(4)
    bound = 4 * MB
    twin = TwinStore(
        path,
        defs,
        clock=fake_clock,
        history_days=2,
        rollup_days=365,
        max_db_mb=4,
        event_log_max_mb=1,
        event_log_minutes=5,
    )
    rng = random.Random(9)
    peak_file = 0
    with twin:
        for step in range(int(4 * DAY)):
            fake_clock.now = T0 + step
            twin.ingest([Sample(p.id, round(rng.uniform(0, 1000), 2), Quality.GOOD) for p in defs])
            if step % 21600 == 21599:  # every 6 simulated hours
                twin.prune()
                twin.flush()
                peak_file = max(peak_file, path.stat().st_size)
        twin.flush()
        wait_for(lambda: twin._writer is not None and twin._writer._bound is None)
        info = twin.storage_info()
        # Every point's current value is there, whatever went.
        assert all(twin.get(p.id).value is not None for p in defs)
        newest = twin.history(defs[0].id, fake_clock.now - 3600, fake_clock.now, limit=10_000)
        assert newest and not any(r.downsampled for r in newest)
    events = bound_events(path)
    file_bytes, used = used_bytes(path)
    assert used <= bound, f"{used / MB:.1f} MB used of {bound / MB:.0f}"
    # The file follows: free pages go back to the file system (a step's growth at most over).
    assert file_bytes <= bound * 1.1 and peak_file <= bound * 1.1, (file_bytes, peak_file)
    assert info["bound_episodes"] >= 1 and info["bound_bytes"] == bound
    assert events, "each episode at the bound is recorded as an event"
    report = events[-1]
    assert report["bound_bytes"] == bound and report["used_bytes_after"] <= bound
    assert report["history_rows"] > 0
    assert any("above its bound" in r.getMessage() for r in caplog.records)


def test_the_bound_takes_old_events_but_not_what_sync_has_not_delivered(
    tmp_path: Path, fake_clock: FakeClock
) -> None:
    path = tmp_path / "twin.db"
    blob = "x" * 3000  # events that take room: a refusal's text, a proposal's inputs
    with TwinStore(
        path, points(1), clock=fake_clock, max_db_mb=2, event_log_max_mb=1, events_days=365
    ) as twin:
        first = [twin.append_event("WriteRefused", {"text": blob, "n": i}) for i in range(300)]
        twin.flush()
        twin.hold_log("sync", first[-1])  # sync delivered everything so far
        held = [twin.append_event("WriteRefused", {"text": blob, "n": i}) for i in range(800)]
        twin.flush()
        wait_for(lambda: twin.storage_info()["bound_episodes"] >= 1)
        wait_for(lambda: twin._writer is not None and twin._writer._bound is None)
        kept = {e.rev for e in twin.events_since(first[-1], 10_000)}
        assert set(held) <= kept, "events after the hold are kept"
        assert twin.log_start_rev > first[0], "delivered events went first"
        assert twin.storage_info()["used_bytes"] > 2 * MB  # nothing more may go
        wait_for(lambda: any("storage.max_db_mb" in p for p in twin.problems()))  # in /health
    # Allowed to take undelivered events, the bound is kept.
    with TwinStore(
        path,
        points(1),
        clock=fake_clock,
        max_db_mb=2,
        event_log_max_mb=1,
        events_days=365,
        bound_drops_unsynced=True,
    ) as twin:
        twin.append_event("WriteRefused", {"text": blob})
        twin.flush()
        wait_for(lambda: twin.storage_info()["bound_episodes"] >= 1)
        wait_for(lambda: twin.storage_info()["used_bytes"] <= 2 * MB)
        assert twin.log_start_rev > held[0]


def test_the_file_shrinks_when_retention_removes_history(
    tmp_path: Path, fake_clock: FakeClock
) -> None:
    path = tmp_path / "twin.db"
    defs = points(20)
    rng = random.Random(1)
    with TwinStore(path, defs, clock=fake_clock, history_days=1, rollup_days=1) as twin:
        for step in range(20_000):
            fake_clock.now = T0 + 10 * step
            twin.ingest([Sample(p.id, rng.random(), Quality.GOOD) for p in defs])
        twin.compact()
        before = path.stat().st_size
        fake_clock.now += 3 * DAY  # everything is older than both windows
        twin.prune()
        twin.prune()  # vacuum steps are bounded: the second pass gives back what remains
        after = path.stat().st_size
    assert after < before / 4, (before, after)


def test_an_old_database_is_converted_to_incremental_vacuum_once(
    tmp_path: Path, fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "twin.db"
    defs = points(2)
    with TwinStore(path, defs, clock=fake_clock) as twin:
        twin.ingest([Sample(defs[0].id, 1.5, Quality.GOOD)])
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == AUTO_VACUUM_INCREMENTAL
    conn.execute("PRAGMA auto_vacuum=NONE")
    conn.execute("VACUUM")  # as a database made before this version is
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    conn.close()
    caplog.set_level(logging.INFO, logger="gateway.twin")
    with TwinStore(path, defs, clock=fake_clock) as twin:
        assert twin.get(defs[0].id).value == 1.5
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == AUTO_VACUUM_INCREMENTAL
    conn.close()
    assert any("converting" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with TwinStore(path, defs, clock=fake_clock):
        pass
    assert not any("converting" in r.getMessage() for r in caplog.records)


def test_the_bound_event_says_what_went(tmp_path: Path, fake_clock: FakeClock) -> None:
    """One episode, read back as the event an operator sees in the log and /diff."""
    path = tmp_path / "twin.db"
    defs = points(30)
    rng = random.Random(2)
    with TwinStore(
        path, defs, clock=fake_clock, max_db_mb=3, event_log_max_mb=1, event_log_minutes=1
    ) as twin:
        step = 0
        while twin.storage_info()["bound_episodes"] == 0:
            fake_clock.now = T0 + step
            twin.ingest([Sample(p.id, rng.uniform(0, 1e6), Quality.GOOD) for p in defs])
            step += 1
            if step % 500 == 0:
                # A plant's pace, not a tight loop the writer cannot keep up with: the first
                # episode ends before much more is written (later ones would take the buckets).
                twin.flush(timeout=60)
            assert step < 200_000, "the bound never engaged"
        twin.flush(timeout=60)
        wait_for(lambda: bool(bound_events(path)))
        data = bound_events(path)[0]
        assert data["history_from_ts"] >= T0
        assert data["history_to_ts"] > data["history_from_ts"]
        assert data["used_bytes_before"] > data["bound_bytes"] >= data["used_bytes_after"]
        # The removed history is still there as buckets.
        old = twin.aggregate(defs[0].id, data["history_from_ts"], data["history_to_ts"], 600)
        assert old and sum(b.count for b in old) > 0, (data, bound_events(path))
