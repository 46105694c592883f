"""Twin store: ingest filtering, rev order, restart recovery, unknown points, writer failures.

Real SQLite files in tmp_path; time is a fake clock wherever timestamps are the subject.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests_support import FakeClock

from drivers.contract import Quality, Sample
from gateway.errors import StoreError, UnknownPointError
from gateway.twin.model import PointDef, PointValue
from gateway.twin.schema import SCHEMA_VERSION
from gateway.twin.store import TwinStore

GOOD, UNCERTAIN, BAD, STALE = Quality.GOOD, Quality.UNCERTAIN, Quality.BAD, Quality.STALE

TEMP = "line1/oven1/temperature"  # deadband 0.5
LEVEL = "utilities/tank1/level"  # deadband 0
COUNT = "line1/press1/count"  # int
MODE = "line1/press1/mode"  # text
RUN = "utilities/tank1/pump_run"  # bool

POINTS = [
    PointDef(TEMP, "plc1", "float32", unit="°C", lo=0, hi=300, deadband=0.5),
    PointDef(LEVEL, "tank1", "float32", unit="m", lo=0, hi=5),
    PointDef(COUNT, "plc1", "uint32"),
    PointDef(MODE, "plc1", "string"),
    PointDef(RUN, "tank1", "bool", writable=True),
]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "twin.db"


@pytest.fixture
def store(db_path: Path, fake_clock: FakeClock) -> Iterator[TwinStore]:
    twin = TwinStore(db_path, POINTS, clock=fake_clock)
    twin.open()
    yield twin
    twin.close()


def s(key: str, value: object, quality: Quality = GOOD, **kw: object) -> Sample:
    return Sample(key, value, quality, **kw)  # type: ignore[arg-type]


def all_events(store: TwinStore) -> list:
    store.flush()
    return store.events_since(0, limit=100_000)


# -- ordering --------------------------------------------------------------------------------------


def test_revs_strictly_increase_and_the_log_is_in_rev_order(store: TwinStore) -> None:
    revs = []
    for i in range(50):
        store.ingest([s(LEVEL, float(i)), s(COUNT, i), s(TEMP, 10.0 * i)])
        revs.append(store.rev)
        if i % 7 == 0:
            revs.append(store.append_event("DeviceStateChanged", {"device": "tank1", "n": i}))
    assert revs == sorted(set(revs))
    events = all_events(store)
    assert [e.rev for e in events] == list(range(1, store.rev + 1))
    assert store.committed_rev == store.rev
    # Each point's telemetry appears in the order it was ingested.
    levels = [e.data["value"] for e in events if e.point_id == LEVEL]
    assert levels == [float(i) for i in range(50)]
    device_events = [e for e in events if e.type == "DeviceStateChanged"]
    assert [e.data["n"] for e in device_events] == list(range(0, 50, 7))
    assert all(e.point_id is None and e.asset_id is None for e in device_events)


def test_ingest_returns_the_accepted_count_and_the_values_carry_their_revs(
    store: TwinStore, fake_clock: FakeClock
) -> None:
    assert store.ingest([s(LEVEL, 1.0, source_ts=123.0), s(TEMP, 20.0)]) == 2
    fake_clock.advance(1.5)
    assert store.ingest([s(LEVEL, 1.0), s(TEMP, 21.0)]) == 1
    level, temp = store.get(LEVEL), store.get(TEMP)
    assert (level.value, level.quality, level.rev, level.source_ts) == (1.0, GOOD, 1, 123.0)
    assert level.gateway_ts == fake_clock.now - 1.5
    assert (temp.value, temp.rev, temp.gateway_ts) == (21.0, 3, fake_clock.now)
    telemetry = all_events(store)[-1]
    assert telemetry.type == "TelemetryChanged"
    assert telemetry.point_id == TEMP and telemetry.asset_id == "line1/oven1"
    assert telemetry.ts == fake_clock.now
    assert telemetry.data == {"value": 21.0, "quality": GOOD, "source_ts": None, "reason": None}


def test_append_event_tied_to_a_point_gets_its_asset(store: TwinStore) -> None:
    rev = store.append_event("AnomalyDetected", {"score": 3.5}, point_id=TEMP)
    event = all_events(store)[-1]
    assert (event.rev, event.type, event.point_id, event.asset_id) == (
        rev,
        "AnomalyDetected",
        TEMP,
        "line1/oven1",
    )
    assert event.data == {"score": 3.5}
    with pytest.raises(UnknownPointError):
        store.append_event("AnomalyDetected", {}, point_id="no/such/point")
    with pytest.raises(StoreError):
        store.append_event("TelemetryChanged", {"value": 1})
    assert store.rev == rev


# -- on-change and deadband ------------------------------------------------------------------------


def test_first_value_is_always_accepted_even_bad_without_value(store: TwinStore) -> None:
    assert store.get(LEVEL).rev == 0  # declared, never heard from
    assert store.get(LEVEL).quality is BAD
    assert store.ingest([s(LEVEL, None, BAD, reason="device disconnected: refused")]) == 1
    value = store.get(LEVEL)
    assert (value.value, value.quality, value.rev) == (None, BAD, 1)
    assert value.reason == "device disconnected: refused"
    assert store.ingest([s(TEMP, 0.0)]) == 1  # first value, whatever the deadband


def test_deadband_zero_accepts_any_change_and_drops_repeats(store: TwinStore) -> None:
    values = [1.0, 1.0, 1.0000001, 1.0000001, 2, 2.0, 1.0]
    accepted = [store.ingest([s(LEVEL, v)]) for v in values]
    assert accepted == [1, 0, 1, 0, 1, 0, 1]
    assert store.stats.filtered == 3


def test_deadband_compares_with_the_last_accepted_value(store: TwinStore) -> None:
    samples = [10.0, 10.3, 10.5, 10.6, 10.2, 11.0, 11.2, 11.8]
    accepted = [v for v in samples if store.ingest([s(TEMP, v)])]
    # A change must exceed 0.5: 10.5 does not; 10.2 and 11.0 are 0.4 from 10.6, not from 11.0.
    assert accepted == [10.0, 10.6, 11.2, 11.8]
    store.flush()
    assert [row.value for row in store.history(TEMP, 0, 2e9)] == accepted


def test_a_quality_change_is_always_accepted(store: TwinStore) -> None:
    store.ingest([s(TEMP, 100.0)])
    assert store.ingest([s(TEMP, 100.1, UNCERTAIN)]) == 1  # inside the deadband, new quality
    assert store.ingest([s(TEMP, 100.1, UNCERTAIN)]) == 0
    assert store.ingest([s(TEMP, 100.1, GOOD)]) == 1
    value = store.get(TEMP)
    assert (value.value, value.quality) == (100.1, GOOD)


def test_value_none_keeps_the_last_value_and_changes_only_the_quality(store: TwinStore) -> None:
    store.ingest([s(LEVEL, 2.5, source_ts=50.0)])
    reason = "device disconnected: ConnectionResetError"
    assert store.ingest([s(LEVEL, None, STALE, reason=reason)]) == 1
    stale = store.get(LEVEL)
    assert (stale.value, stale.quality, stale.reason, stale.rev) == (2.5, STALE, reason, 2)
    # Still disconnected: nothing new to say.
    assert store.ingest([s(LEVEL, None, STALE, reason=reason)]) == 0
    # Reconnected with the same value: the quality change makes it an event.
    assert store.ingest([s(LEVEL, 2.5)]) == 1
    events = [e for e in all_events(store) if e.point_id == LEVEL]
    assert [(e.data["value"], e.data["quality"]) for e in events] == [
        (2.5, GOOD),
        (2.5, STALE),
        (2.5, GOOD),
    ]


def test_values_outside_the_range_are_stored_with_the_drivers_quality(store: TwinStore) -> None:
    assert store.ingest([s(TEMP, 999.0), s(LEVEL, -3.0, UNCERTAIN)]) == 2
    assert (store.get(TEMP).value, store.get(TEMP).quality) == (999.0, GOOD)
    assert (store.get(LEVEL).value, store.get(LEVEL).quality) == (-3.0, UNCERTAIN)
    store.flush()
    assert store.history(TEMP, 0, 2e9)[0].value == 999.0


def test_quality_given_as_plain_text_is_understood(store: TwinStore) -> None:
    assert store.ingest([s(LEVEL, 1.0, "UNCERTAIN")]) == 1  # type: ignore[arg-type]
    assert store.get(LEVEL).quality is UNCERTAIN


# -- unknown points and bad values -----------------------------------------------------------------


def test_unknown_points_are_skipped_and_counted(store: TwinStore) -> None:
    batch = [s("nowhere/x", 1.0), s(LEVEL, 1.0), s("nowhere/x", 2.0), s(TEMP, 5.0)]
    assert store.ingest(batch) == 2
    assert store.stats.unknown == 2
    assert store.stats.accepted == 2
    with pytest.raises(UnknownPointError):
        store.get("nowhere/x")
    assert [e.point_id for e in all_events(store)] == [LEVEL, TEMP]


def test_values_sqlite_cannot_hold_are_rejected_not_fatal(store: TwinStore) -> None:
    batch = [s(LEVEL, [1, 2]), s(TEMP, {"a": 1}), s(COUNT, 7), s(MODE, "auto")]
    batch.append(s(LEVEL, 1.0, "EXCELLENT"))  # type: ignore[arg-type]
    assert store.ingest(batch) == 2
    assert store.stats.invalid == 3
    assert store.ingest([s(COUNT, 2**70)]) == 1  # too big for SQLite's int64: kept as a float
    store.flush()
    assert store.get(COUNT).value == float(2**70)


def test_ingest_and_events_need_an_open_store(db_path: Path) -> None:
    twin = TwinStore(db_path, POINTS)
    assert twin.get(LEVEL).quality is BAD  # declared, nothing known yet
    with pytest.raises(StoreError):
        twin.ingest([s(LEVEL, 1.0)])
    twin.open()
    twin.close()
    with pytest.raises(StoreError):
        twin.ingest([s(LEVEL, 1.0)])
    with pytest.raises(StoreError):
        twin.append_event("DeviceStateChanged", {})


def test_snapshot_holds_every_declared_point_at_one_rev(store: TwinStore) -> None:
    store.ingest([s(LEVEL, 1.0), s(TEMP, 20.0)])
    rev, values = store.snapshot()
    assert rev == 2
    assert set(values) == {p.id for p in POINTS}
    assert values[LEVEL].value == 1.0
    assert values[MODE].rev == 0 and values[MODE].quality is BAD


# -- restart ---------------------------------------------------------------------------------------


def test_values_rev_and_log_survive_a_restart(db_path: Path, fake_clock: FakeClock) -> None:
    first = TwinStore(db_path, POINTS, clock=fake_clock)
    first.open()
    first.ingest([s(LEVEL, 1.25, source_ts=9.0), s(COUNT, 42), s(MODE, "auto"), s(RUN, True)])
    first.ingest([s(TEMP, 180.0, UNCERTAIN, reason="sensor drift")])
    first.ingest([s(LEVEL, None, STALE, reason="device disconnected: timeout")])
    first.append_event("DeviceStateChanged", {"device": "tank1", "state": "DISCONNECTED"})
    before_rev, before = first.snapshot()
    first.flush()
    before_log = first.events_since(0)
    first.close()

    second = TwinStore(db_path, POINTS, clock=fake_clock)
    second.open()
    try:
        after_rev, after = second.snapshot()
        assert after_rev == before_rev == 7
        assert after == before
        assert type(after[COUNT].value) is int and type(after[RUN].value) is bool
        assert second.events_since(0) == before_log
        # The rev continues, and deadband/quality state continues too.
        assert second.ingest([s(LEVEL, None, STALE, reason="again")]) == 0
        assert second.ingest([s(LEVEL, 1.25)]) == 1
        assert second.get(LEVEL).rev == 8
        assert second.append_event("DeviceStateChanged", {"state": "CONNECTED"}) == 9
        second.flush()
        assert [e.rev for e in second.events_since(0)] == list(range(1, 10))
    finally:
        second.close()


def test_a_point_removed_from_the_config_keeps_its_history(db_path: Path) -> None:
    with TwinStore(db_path, POINTS) as first:
        first.ingest([s(LEVEL, 1.0), s(TEMP, 2.0)])
    with TwinStore(db_path, [p for p in POINTS if p.id != LEVEL]) as second:
        with pytest.raises(UnknownPointError):
            second.get(LEVEL)
        assert second.ingest([s(LEVEL, 5.0)]) == 0
        assert [e.point_id for e in second.events_since(0)] == [LEVEL, TEMP]
    with TwinStore(db_path, POINTS) as third:
        assert third.get(LEVEL).value == 1.0
        assert third.rev == 2


def test_migrations_are_recorded_once(db_path: Path) -> None:
    for _ in range(2):
        with TwinStore(db_path, POINTS):
            pass
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("SELECT version FROM _migrations").fetchall()
        assert rows == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_database_from_a_newer_gateway_is_refused(db_path: Path) -> None:
    with TwinStore(db_path, POINTS):
        pass
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "INSERT INTO _migrations VALUES (?, 'from the future', 0)", (SCHEMA_VERSION + 1,)
        )
    with pytest.raises(StoreError, match="newer than this gateway supports"):
        TwinStore(db_path, POINTS).open()


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "twin.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=str(path)):
        TwinStore(path, POINTS).open()


# -- writer failures -------------------------------------------------------------------------------


def _break_writes(path: Path) -> None:
    """Make every telemetry commit fail, as a full disk would."""
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TRIGGER disk_full BEFORE INSERT ON frames "
            "BEGIN SELECT RAISE(ABORT, 'database or disk is full (simulated)'); END"
        )


def _repair_writes(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TRIGGER disk_full")


def test_writer_failure_surfaces_in_flush_and_recovers(store: TwinStore, db_path: Path) -> None:
    store.ingest([s(LEVEL, 1.0)])
    store.flush()
    _break_writes(db_path)
    # Ingest keeps working in memory; the loop never sees SQLite fail.
    assert store.ingest([s(LEVEL, 2.0), s(TEMP, 3.0)]) == 2
    store.append_event("DeviceStateChanged", {"state": "CONNECTED"})
    with pytest.raises(StoreError, match="disk is full") as failure:
        store.flush(timeout=5)
    assert isinstance(failure.value.__cause__, sqlite3.Error)
    assert store.committed_rev == 1
    assert "disk is full" in (store.stats.writer_error or "")
    assert store.get(LEVEL).value == 2.0

    _repair_writes(db_path)
    store.flush(timeout=5)
    assert store.committed_rev == store.rev == 4
    assert store.stats.writer_error is None
    assert [e.rev for e in store.events_since(0)] == [1, 2, 3, 4]


def test_closing_with_a_failing_writer_says_what_was_lost(db_path: Path) -> None:
    twin = TwinStore(db_path, POINTS)
    twin.open()
    twin.ingest([s(LEVEL, 1.0)])
    twin.flush()
    _break_writes(db_path)
    twin.ingest([s(LEVEL, 2.0)])
    with pytest.raises(StoreError, match="uncommitted changes after rev 1"):
        twin.close()
    _repair_writes(db_path)
    with TwinStore(db_path, POINTS) as reopened:
        assert reopened.rev == 1
        assert reopened.get(LEVEL).value == 1.0


def test_ingest_never_waits_for_a_locked_database(store: TwinStore, db_path: Path) -> None:
    # Another process holds the write lock: the writer thread waits, ingest does not.
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        for i in range(200):
            assert store.ingest([s(LEVEL, float(i)), s(TEMP, float(i))]) == 2
        assert store.get(LEVEL).value == 199.0
        assert store.rev == 400
        assert store.committed_rev == 0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    store.flush()
    assert store.committed_rev == 400


async def test_aflush_keeps_the_event_loop_running_while_the_commit_waits(
    store: TwinStore, db_path: Path
) -> None:
    # Another connection holds the write lock, so the writer's commit waits in SQLite's busy
    # handler until a task on this loop lets go. A flush that blocked the loop would never let
    # that task run: it would fail with "database is locked" after the busy timeout instead.
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    store.ingest([s(LEVEL, 1.0), s(TEMP, 2.0)])
    committed_at_ticks: list[int] = []

    async def tick_then_unlock() -> None:
        try:
            for _ in range(5):
                await asyncio.sleep(0.01)
                committed_at_ticks.append(store.committed_rev)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()

    unlocker = asyncio.create_task(tick_then_unlock())
    try:
        await store.aflush()
    finally:
        await unlocker
    # Every tick ran during the await, while the flush was still waiting for its commit.
    assert committed_at_ticks == [0, 0, 0, 0, 0]
    assert store.committed_rev == 2


def test_listeners_get_each_accepted_change_in_rev_order(tmp_path):
    points = [
        PointDef(id="a/x", device="d", datatype="float64", deadband=0.5),
        PointDef(id="a/y", device="d", datatype="float64"),
    ]
    store = TwinStore(tmp_path / "t.db", points)
    store.open()
    try:
        seen: list[list[tuple[str, object, str, int]]] = []
        store.add_listener(
            lambda changes: seen.append(
                [(c.point_id, c.value, str(c.quality), c.rev) for c in changes]
            )
        )
        store.add_listener(_broken_listener)  # a broken listener harms no one
        store.ingest([Sample("a/x", 1.0, Quality.GOOD), Sample("a/y", 2.0, Quality.GOOD)])
        store.ingest([Sample("a/x", 1.2, Quality.GOOD)])  # inside the deadband: no change
        store.ingest([Sample("a/x", None, Quality.STALE, reason="gone")])
        assert seen == [
            [("a/x", 1.0, "GOOD", 1), ("a/y", 2.0, "GOOD", 2)],
            [("a/x", 1.0, "STALE", 3)],
        ]
        assert store.get("a/x").rev == 3
    finally:
        store.close()


def _broken_listener(changes: list[PointValue]) -> None:
    raise RuntimeError(f"listener bug, {len(changes)} changes lost")


def test_a_stale_point_keeps_the_source_time_of_its_last_reading(tmp_path):
    store = TwinStore(tmp_path / "t.db", [PointDef(id="a/x", device="d", datatype="float64")])
    store.open()
    try:
        store.ingest([Sample("a/x", 4.0, Quality.GOOD, source_ts=1000.0)])
        store.ingest([Sample("a/x", None, Quality.STALE, reason="device disconnected")])
        stale = store.get("a/x")
        assert (stale.value, stale.quality, stale.source_ts) == (4.0, Quality.STALE, 1000.0)
    finally:
        store.close()
    store = TwinStore(tmp_path / "t.db", [PointDef(id="a/x", device="d", datatype="float64")])
    store.open()
    try:
        assert store.get("a/x").source_ts == 1000.0, "and after a restart"
    finally:
        store.close()
