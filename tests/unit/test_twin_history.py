"""Twin reads: history ranges, time-bucket aggregates, the event log, and retention.

Every expected value is computed here from what the test fed in, not read back from SQLite.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests_support import EPOCH, FakeClock

from drivers.contract import Quality, Sample
from gateway.errors import StoreError, UnknownPointError
from gateway.twin import writer as writer_module
from gateway.twin.history import CursorExpiredError, HistoryReader
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore

DAY = 86400.0
T0 = EPOCH  # where the fake clock starts
FLOW = "utilities/cooling/pump1/flow"
PRESSURE = "utilities/cooling/pump1/pressure"
POINTS = [PointDef(FLOW, "pump1", "float32"), PointDef(PRESSURE, "pump1", "float32")]


@dataclass
class Fed:
    """One accepted change as the test fed it."""

    rev: int
    ts: float
    value: float
    quality: Quality


@pytest.fixture
def store(tmp_path: Path, fake_clock: FakeClock) -> Iterator[TwinStore]:
    twin = TwinStore(tmp_path / "twin.db", POINTS, clock=fake_clock, history_days=30, events_days=7)
    twin.open()
    yield twin
    twin.close()


# Where the history is when it is read: all still in frames, all compacted into blocks, or
# compacted every so often (blocks, then frames) as the writer does on its own.
LAYOUTS = ["frames", "blocks", "mixed"]


@pytest.fixture(params=LAYOUTS)
def layout(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def feed(
    store: TwinStore, clock: FakeClock, n: int, seed: int = 1, layout: str = "frames"
) -> dict[str, list[Fed]]:
    """Ingest n irregularly spaced changes of both points, some of them not GOOD."""
    rng = random.Random(seed)
    fed: dict[str, list[Fed]] = {FLOW: [], PRESSURE: []}
    for i in range(n):
        if layout == "mixed" and i % 97 == 96:
            store.compact()
        clock.now += rng.uniform(0.05, 2.0)
        point = FLOW if rng.random() < 0.7 else PRESSURE
        value = round(rng.uniform(-50, 150), 3)
        quality = rng.choices(list(Quality), weights=[80, 8, 6, 6])[0]
        if store.ingest([Sample(point, value, quality, clock.now - 0.01)]):
            fed[point].append(Fed(store.rev, clock.now, value, quality))
    store.flush()
    if layout == "blocks":
        store.compact()
    return fed


def test_history_returns_the_range_oldest_first(
    store: TwinStore, fake_clock: FakeClock, layout: str
) -> None:
    fed = feed(store, fake_clock, 600, layout=layout)
    flows = fed[FLOW]
    start, end = flows[100].ts, flows[300].ts
    expected = [f for f in flows if start <= f.ts <= end]
    rows = store.history(FLOW, start, end, limit=10_000)
    assert [(r.rev, r.ts, r.value, r.quality) for r in rows] == [
        (f.rev, f.ts, f.value, f.quality) for f in expected
    ]
    assert all(r.source_ts == pytest.approx(r.ts - 0.01) for r in rows)
    # The limit keeps the oldest rows.
    assert store.history(FLOW, start, end, limit=7) == rows[:7]
    # A range between two samples is empty; the bounds are inclusive.
    assert store.history(FLOW, flows[5].ts + 1e-6, flows[6].ts - 1e-6) == []
    assert [r.rev for r in store.history(FLOW, flows[5].ts, flows[5].ts)] == [flows[5].rev]


def test_history_checks_its_arguments(store: TwinStore) -> None:
    with pytest.raises(UnknownPointError):
        store.history("no/such/point", 0, 1)
    with pytest.raises(StoreError):
        store.history(FLOW, 10, 5)
    with pytest.raises(StoreError):
        store.history(FLOW, 0, math.inf)
    with pytest.raises(StoreError):
        store.aggregate(FLOW, 0, 10, 0)


@pytest.mark.parametrize("bucket_s", [1.0, 17.5, 60.0, 3600.0])
def test_aggregates_match_an_independent_computation(
    store: TwinStore, fake_clock: FakeClock, bucket_s: float, layout: str
) -> None:
    fed = feed(store, fake_clock, 800, seed=3, layout=layout)
    flows = fed[FLOW]
    start, end = flows[20].ts - 0.3, flows[-30].ts + 0.2
    groups: dict[int, list[Fed]] = {}
    for f in flows:
        # Aggregates take measured values only: GOOD and UNCERTAIN.
        if start <= f.ts <= end and f.quality in (Quality.GOOD, Quality.UNCERTAIN):
            groups.setdefault(math.floor((f.ts - start) / bucket_s), []).append(f)
    buckets = store.aggregate(FLOW, start, end, bucket_s)
    assert [round((b.start - start) / bucket_s) for b in buckets] == sorted(groups)
    for bucket in buckets:
        k = round((bucket.start - start) / bucket_s)
        values = [f.value for f in groups[k]]
        assert bucket.end == pytest.approx(bucket.start + bucket_s)
        assert bucket.count == len(values)
        assert bucket.min == min(values)
        assert bucket.max == max(values)
        assert bucket.mean == pytest.approx(sum(values) / len(values))
        assert bucket.last == groups[k][-1].value
    assert sum(b.count for b in buckets) == sum(len(g) for g in groups.values())


def test_events_since_pages_through_the_log(store: TwinStore, fake_clock: FakeClock) -> None:
    feed(store, fake_clock, 250, layout="mixed")  # the window keeps every frame: 10 minutes
    store.append_event("DeviceStateChanged", {"device": "pump1", "state": "CONNECTED"})
    store.flush()
    seen, cursor = [], 0
    while page := store.events_since(cursor, limit=40):
        assert len(page) <= 40
        seen.extend(page)
        cursor = page[-1].rev
    assert [e.rev for e in seen] == list(range(1, store.rev + 1))
    assert seen[-1].type == "DeviceStateChanged"
    assert store.events_since(store.rev) == []


def test_reads_see_only_committed_events(tmp_path: Path, fake_clock: FakeClock) -> None:
    # A flush interval long enough that nothing commits unless asked.
    with TwinStore(tmp_path / "twin.db", POINTS, clock=fake_clock, flush_interval_s=30) as twin:
        twin.ingest([Sample(FLOW, 1.0, Quality.GOOD)])
        assert twin.rev == 1
        assert twin.events_since(0) == []
        twin.flush()
        assert [e.rev for e in twin.events_since(0)] == [1]


def test_prune_drops_old_history_and_events_and_moves_the_log_start(
    tmp_path: Path, fake_clock: FakeClock
) -> None:
    path = tmp_path / "twin.db"
    twin = TwinStore(path, POINTS, clock=fake_clock, history_days=30, events_days=7)
    twin.open()
    # One change of each kind per day for 40 days, compacted daily (the writer compacts every
    # few minutes on its own): one block a day.
    day_revs: list[tuple[float, int, int]] = []
    for day in range(40):
        fake_clock.now = T0 + day * DAY
        twin.ingest([Sample(FLOW, float(day), Quality.GOOD)])
        telemetry = twin.rev
        other = twin.append_event("DeviceStateChanged", {"day": day})
        day_revs.append((fake_clock.now, telemetry, other))
        twin.compact()
    # The event log kept the telemetry of its window only (15 minutes: the last day's sample),
    # so it starts right after the last frame that left it: day 38's device event.
    assert twin.log_start_rev == day_revs[-2][2]
    now = T0 + 39.5 * DAY
    result = twin.prune(now)

    history_cut, events_cut = now - 30 * DAY, now - 7 * DAY
    kept_history = [t for ts, t, _ in day_revs if ts >= history_cut]
    log_start = day_revs[-2][2]
    assert result.log_start_rev == log_start == twin.log_start_rev
    assert result.history_rows == 40 - len(kept_history)
    assert result.events == sum(1 for ts, _, _ in day_revs if ts < events_cut)
    rows = twin.history(FLOW, 0, now)
    assert [r.rev for r in rows if not r.downsampled] == kept_history
    # What left the raw history is kept as one-minute buckets: here one sample each.
    pruned = [(ts, day) for day, (ts, t, _) in enumerate(day_revs) if ts < history_cut]
    assert [(r.ts, r.value, r.rev) for r in rows if r.downsampled] == [
        (ts // 60 * 60, float(day), 0) for ts, day in pruned
    ]
    assert rows[: len(pruned)] == [r for r in rows if r.downsampled]  # oldest first
    # The log is a contiguous suffix; anything before it is gone for cursors.
    log = twin.events_since(log_start - 1, limit=1000)
    assert [e.rev for e in log] == list(range(log_start, twin.rev + 1))
    with pytest.raises(CursorExpiredError) as expired:
        twin.events_since(log_start - 2)
    assert expired.value.log_start_rev == log_start
    # Pruning again changes nothing.
    again = twin.prune(now)
    assert (again.history_rows, again.events, again.log_start_rev) == (0, 0, log_start)
    twin.close()

    # The log start, history and rev survive a restart.
    with TwinStore(path, POINTS, clock=fake_clock) as reopened:
        assert reopened.rev == 80
        assert reopened.log_start_rev == log_start
        assert [r.rev for r in reopened.history(FLOW, 0, now) if not r.downsampled] == kept_history


def test_prune_of_everything_never_lets_the_rev_go_back(
    tmp_path: Path, fake_clock: FakeClock
) -> None:
    path = tmp_path / "twin.db"
    with TwinStore(path, POINTS, clock=fake_clock, history_days=1, events_days=1) as twin:
        twin.ingest([Sample(FLOW, 1.0, Quality.GOOD)])
        twin.append_event("DeviceStateChanged", {})
        result = twin.prune(T0 + 10 * DAY)
        assert result.log_start_rev == 3
        assert result.history_rows == 1
        assert twin.events_since(2) == []
        assert [(r.value, r.downsampled) for r in twin.history(FLOW, 0, T0 + 10 * DAY)] == [
            (1.0, True)
        ]
        assert twin.prune(T0 + 400 * DAY).rollup_rows == 1  # past rollup_days (365)
        assert twin.history(FLOW, 0, T0 + 400 * DAY) == []
        assert twin.get(FLOW).value == 1.0  # the current value is not history
    with TwinStore(path, POINTS, clock=fake_clock) as reopened:
        assert reopened.rev == 2
        assert reopened.get(FLOW).value == 1.0
        assert reopened.ingest([Sample(FLOW, 2.0, Quality.GOOD)]) == 1
        assert reopened.rev == 3
        reopened.flush()
        assert [e.rev for e in reopened.events_since(2)] == [3]


def test_prune_deletes_in_chunks_while_ingest_continues(
    tmp_path: Path, fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "PRUNE_CHUNK", 3)  # events per delete transaction
    monkeypatch.setattr(writer_module, "RETIRE_CHUNK", 3)  # blocks per retention step
    with TwinStore(
        tmp_path / "twin.db", POINTS, clock=fake_clock, history_days=1, events_days=1
    ) as twin:
        for i in range(30_000):
            fake_clock.now = T0 + i
            twin.ingest([Sample(FLOW, float(i), Quality.GOOD)])
            if i % 1000 == 999:
                twin.compact()  # blocks of 1,000 samples
        twin.flush()
        fake_clock.now = T0 + DAY + 10_000  # blocks of revs 1..10_000 are older than a day
        stop, running = threading.Event(), threading.Event()
        ingested: list[float] = []

        def keep_ingesting() -> None:
            while not stop.wait(0.0005):  # a driver's pace, not a spin
                ingested.append(float(len(ingested) + 1))
                twin.ingest([Sample(PRESSURE, ingested[-1], Quality.GOOD)])
                running.set()

        thread = threading.Thread(target=keep_ingesting)
        thread.start()
        try:
            running.wait(5)
            result = twin.prune()  # at the store's fake_clock
        finally:
            stop.set()
            thread.join()
        twin.flush()
        assert result.history_rows == 10_000
        raw = [r for r in twin.history(FLOW, 0, fake_clock.now, limit=100_000) if not r.downsampled]
        assert raw[0].value == 10_000.0
        assert len(raw) == 20_000
        # The 10,000 samples that left are in minute buckets, whole: counts, sums, extremes.
        old = twin.aggregate(FLOW, T0, T0 + 10_000, 60)
        assert sum(b.count for b in old) == 10_001  # and the first raw one, at T0 + 10,000
        assert old[0].min == 0.0 and old[-1].max == 10_000.0
        assert sum((b.mean or 0.0) * b.count for b in old) == sum(range(10_001))
        # What was ingested meanwhile is all there.
        pressure = twin.history(PRESSURE, 0, fake_clock.now, limit=100_000)
        assert [r.value for r in pressure] == ingested
        log = twin.events_since(twin.log_start_rev - 1, limit=10_000_000)
        assert [e.rev for e in log] == list(range(twin.log_start_rev, twin.rev + 1))


def test_the_event_log_keeps_its_window_and_what_a_consumer_holds(
    tmp_path: Path, fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    with TwinStore(tmp_path / "twin.db", POINTS, clock=fake_clock, event_log_minutes=10) as twin:

        def minute(m: int) -> int:
            fake_clock.now = T0 + 60 * m
            twin.ingest([Sample(FLOW, float(m), Quality.GOOD)])
            twin.flush()  # a commit (a frame) a minute, as minutes apart would give
            return twin.rev

        revs = [minute(m) for m in range(30)]
        twin.compact()
        # Minutes 19..29 are within 10 minutes of the newest sample; the log starts there.
        assert twin.log_start_rev == revs[19]
        twin.hold_log("sync", revs[22])
        revs += [minute(m) for m in range(30, 60)]
        twin.compact()
        # The window alone would start at minute 49; the consumer's cursor keeps 23 onwards.
        assert twin.log_start_rev == revs[23]
        log = twin.events_since(revs[22], limit=1000)
        assert [e.rev for e in log] == revs[23:]
        assert [e.data["value"] for e in log] == [float(m) for m in range(23, 60)]
        twin.release_log("sync")
        twin.compact()
        assert twin.log_start_rev == revs[49]
        # History is whole whatever the log kept.
        assert [r.value for r in twin.history(FLOW, 0, fake_clock.now)] == [
            float(m) for m in range(60)
        ]


def test_a_hold_gives_way_at_the_log_size_bound(
    tmp_path: Path, fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    with TwinStore(
        tmp_path / "twin.db",
        POINTS,
        clock=fake_clock,
        event_log_minutes=0,
        event_log_max_mb=0.001,  # ~1 kB of frames
    ) as twin:
        twin.hold_log("sync", 0)
        for i in range(200):
            fake_clock.now = T0 + i
            twin.ingest([Sample(FLOW, i * 1.5, Quality.GOOD)])
            twin.flush()  # a frame per sample
        with caplog.at_level(logging.WARNING, logger="gateway.twin"):
            twin.compact()
        assert twin.stats.log_bytes <= 1024
        assert twin.log_start_rev > 1
        assert any("cursor will expire" in r.getMessage() for r in caplog.records)
        with pytest.raises(CursorExpiredError):
            twin.events_since(0)


def test_a_reader_on_its_own_sees_what_the_store_committed(store: TwinStore, fake_clock: FakeClock):
    fed = feed(store, fake_clock, 50)
    reader = HistoryReader(store.path)
    try:
        rows = reader.history(FLOW, 0, fake_clock.now + 1)
        assert [r.rev for r in rows] == [f.rev for f in fed[FLOW]]
    finally:
        reader.close()
    with pytest.raises(StoreError):
        reader.history(FLOW, 0, 1)


@pytest.mark.parametrize("frames", ["loaded once", "read per group"])
def test_a_failed_compaction_loses_nothing_and_the_next_one_does_it_all(
    tmp_path: Path, fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch, frames: str
) -> None:
    from gateway.twin import codec

    # Several steps per compaction, both ways: frames decoded once (a few at a time), or read
    # again for each group of points (compactions above COMPACT_CACHE_ROWS).
    monkeypatch.setattr(writer_module, "COMPACT_GROUP_ROWS", 50)
    monkeypatch.setattr(writer_module, "COMPACT_STEP_ROWS", 50)
    monkeypatch.setattr(writer_module, "LOAD_STEP_ROWS", 30)
    if frames == "read per group":
        monkeypatch.setattr(writer_module, "COMPACT_CACHE_ROWS", 0)
    real = codec.encode_block_columns
    calls = 0

    def fails_on_the_second(columns: codec.Columns) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 2:  # the second point's group: the first one's blocks are written
            raise RuntimeError("encoder bug")
        return real(columns)

    with TwinStore(tmp_path / "twin.db", POINTS, clock=fake_clock) as twin:
        fed = feed(twin, fake_clock, 400)
        monkeypatch.setattr(codec, "encode_block_columns", fails_on_the_second)
        with pytest.raises(StoreError, match="encoder bug"):
            twin.compact()
        # Blocks of the failed attempt may be written; readers ignore them (past the watermark).
        assert twin.stats.compactions == 0
        assert [r.rev for r in twin.history(FLOW, 0, fake_clock.now)] == [f.rev for f in fed[FLOW]]
        more = feed(twin, fake_clock, 200, seed=2)
        assert twin.compact() == twin.rev
        assert twin.stats.uncompacted_rows == 0
        for point in (FLOW, PRESSURE):
            expected = [f.rev for f in fed[point] + more[point]]
            assert [r.rev for r in twin.history(point, 0, fake_clock.now, limit=10_000)] == expected


def test_a_frame_that_cannot_be_encoded_fails_the_commit_not_the_writer(
    store: TwinStore, fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.twin import codec

    real = codec.encode_frame
    broken = True

    def encode(rows: list[writer_module.TelemetryRow]) -> bytes:
        if broken:
            raise ValueError("codec bug")
        return real(rows)

    monkeypatch.setattr(codec, "encode_frame", encode)
    store.ingest([Sample(FLOW, 1.0, Quality.GOOD)])
    with pytest.raises(StoreError, match="codec bug"):
        store.flush(timeout=5)
    assert store.problems(), "reported, as a failing commit is"
    broken = False
    store.ingest([Sample(FLOW, 2.0, Quality.GOOD)])
    store.flush(timeout=10)  # the retry commits both
    assert store.problems() == []
    assert [r.value for r in store.history(FLOW, 0, fake_clock.now)] == [1.0, 2.0]
