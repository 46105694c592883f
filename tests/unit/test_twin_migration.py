"""Schema 1 -> 2: a database written by the previous gateway opens with its history, events and
current values intact, the history now in compressed blocks (issue 14)."""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
from pathlib import Path

import pytest
from sqlite_utils import Database
from tests_support import stored_revs

from drivers.contract import Quality, Sample
from gateway.twin import schema
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore

POINTS = [
    PointDef("plant/a/temp", "dev", "float32"),
    PointDef("plant/a/count", "dev", "int32"),
    PointDef("plant/a/running", "dev", "bool"),
    PointDef("plant/a/tag", "dev", "string"),
]
T0 = 1_700_000_000.0


def _version_1(path: Path) -> dict[str, list[tuple[int, float, object]]]:
    """A schema-1 database as the previous gateway left it; returns each point's history."""
    rng = random.Random(7)
    history: dict[str, list[tuple[int, float, object]]] = {p.id: [] for p in POINTS}
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        db = Database(conn)
        with db.atomic():
            conn.execute(
                "CREATE TABLE _migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                "applied_at REAL NOT NULL)"
            )
            schema._m1_initial(db)
            conn.execute("INSERT INTO _migrations VALUES (1, 'v1', 0)")
            for pid, p in enumerate(POINTS, 1):
                conn.execute(
                    "INSERT INTO points(pid, id, device, datatype) VALUES (?, ?, ?, ?)",
                    (pid, p.id, p.device, p.datatype),
                )
            rev, newest = 0, {}
            for i in range(5000):
                rev += 1
                ts = T0 + i * 0.25
                if i % 500 == 0:
                    data = json.dumps({"device": "dev", "state": "CONNECTED", "i": i})
                    conn.execute(
                        "INSERT INTO events(rev, ts, type, asset_id, data) "
                        "VALUES (?, ?, 'DeviceStateChanged', 'plant/a', ?)",
                        (rev, ts, data),
                    )
                    continue
                pid = rng.randrange(1, 5)
                point = POINTS[pid - 1]
                value = {
                    1: rng.uniform(-10, 300),
                    2: rng.randrange(-(2**31), 2**31),
                    3: rng.randrange(2),
                    4: rng.choice(["A", "B", "ünï"]),
                }[pid]
                quality = rng.choice([0, 0, 0, 1, 2])
                row = (rev, ts, pid, value, quality, ts - 0.1, None if quality < 2 else "bad")
                conn.execute(
                    "INSERT INTO events(rev, ts, type, pid, value, quality, source_ts, reason) "
                    "VALUES (?, ?, 'TelemetryChanged', ?, ?, ?, ?, ?)",
                    row,
                )
                history[point.id].append((rev, ts, value))
                newest[pid] = row
            conn.executemany(
                "INSERT INTO current(rev, ts, pid, value, quality, source_ts, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                newest.values(),
            )
    return history


def test_a_version_1_database_is_migrated_with_nothing_lost(tmp_path: Path) -> None:
    path = tmp_path / "twin.db"
    history = _version_1(path)
    with TwinStore(path, POINTS) as twin:
        assert twin.rev == 5000
        for point_id, expected in history.items():
            rows = twin.history(point_id, 0, T0 + 10_000, limit=100_000)
            if point_id.endswith("running"):
                expected = [(r, t, bool(v)) for r, t, v in expected]
            assert [(r.rev, r.ts, r.value) for r in rows] == expected
            assert twin.get(point_id).value == expected[-1][2]
        # The log restarts after the newest rev; the device events stay in the events table.
        assert twin.log_start_rev == 5001
        assert twin.events_since(5000) == []
        assert twin.ingest([Sample(POINTS[0].id, 1.5, Quality.GOOD)]) == 1
        twin.flush()
        assert [e.rev for e in twin.events_since(5000)] == [5001]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT max(version) FROM _migrations").fetchone() == (
            schema.SCHEMA_VERSION,
        )
        kinds = {t for (t,) in conn.execute("SELECT DISTINCT type FROM events")}
        assert kinds == {"DeviceStateChanged"}
        assert conn.execute("SELECT count(*) FROM event_log").fetchone() == (10,)
        assert stored_revs(conn) == list(range(1, 5002))
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_failed_migration_leaves_version_1_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "twin.db"
    _version_1(path)

    def broken(rows: object) -> bytes:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("gateway.twin.codec.encode_block", broken)
    with pytest.raises(Exception, match="disk on fire"):
        TwinStore(path, POINTS).open()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT max(version) FROM _migrations").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (5000,)
