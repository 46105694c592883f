"""Read-side queries of the twin database: history, time-bucket aggregates, the event log.

Plain blocking functions on their own read-only connections (one per calling thread), so the
event loop runs them with `asyncio.to_thread` and they never wait for the writer (WAL). They see
committed data only.

A cursor older than what retention kept raises CursorExpiredError rather than silently skipping
the dropped revs: a consumer must know it has a gap. A database that fails a read (corrupt
pages, an I/O error) raises DatabaseFault, a StoreError that says what it means, never a bare
sqlite3 error: the CLI prints it as one line and HTTP answers 503.

Times are the gateway timestamps (epoch seconds). Aggregates take only values of quality GOOD or
UNCERTAIN: a BAD or STALE row repeats the last value without measuring it.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from drivers.contract import Quality
from gateway.errors import StoreError, UnknownPointError
from gateway.twin.model import EventRecord, asset_of
from gateway.twin.schema import QUALITIES, TELEMETRY, connect, fault

__all__ = [
    "Bucket",
    "CursorExpiredError",
    "HistoryReader",
    "HistoryRow",
    "decode_value",
]

MEASURED = 1  # highest quality code aggregates take (GOOD = 0, UNCERTAIN = 1)


class CursorExpiredError(StoreError):
    """Events after the cursor were dropped by retention; re-read the twin snapshot."""

    def __init__(self, since: int, log_start_rev: int) -> None:
        super().__init__(
            f"events after rev {since} are no longer kept (the event log starts at rev "
            f"{log_start_rev}); read the current twin snapshot and continue from its rev"
        )
        self.since = since
        self.log_start_rev = log_start_rev


class HistoryRow(NamedTuple):
    """One recorded change of a point."""

    rev: int
    ts: float  # gateway timestamp
    value: Any
    quality: Quality
    source_ts: float | None
    reason: str | None


@dataclass(slots=True, frozen=True)
class Bucket:
    """Aggregates of one time bucket [start, end)."""

    start: float
    end: float
    count: int
    min: Any
    max: Any
    mean: float | None
    last: Any


def decode_value(datatype: str) -> Callable[[Any], Any] | None:
    """How to turn a stored value back into the point's Python type, or None if as stored."""
    if datatype == "bool":
        return _to_bool
    return None


class HistoryReader:
    """Read-only queries on connections of their own, one per calling thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        self._by_id: dict[str, tuple[int, str]] = {}
        self._by_pid: dict[int, tuple[str, str]] = {}

    def history(
        self, point_id: str, start: float, end: float, limit: int = 1000
    ) -> list[HistoryRow]:
        """A point's recorded changes with `start <= ts <= end`, oldest first, at most `limit`."""
        _check_range(start, end)
        if limit < 1:
            raise StoreError(f"limit must be >= 1, got {limit}")
        with self._reading():
            conn = self._conn()
            pid, datatype = self._point(conn, point_id)
            rows = conn.execute(
                "SELECT rev, ts, value, quality, source_ts, reason FROM events "
                f"WHERE pid = ? AND type = '{TELEMETRY}' AND ts >= ? AND ts <= ? "
                "ORDER BY ts, rev LIMIT ?",
                (pid, start, end, limit),
            ).fetchall()
        decode = decode_value(datatype)
        return [
            HistoryRow(
                rev, ts, decode(value) if decode else value, QUALITIES[quality], source_ts, reason
            )
            for rev, ts, value, quality, source_ts, reason in rows
        ]

    def aggregate(self, point_id: str, start: float, end: float, bucket_s: float) -> list[Bucket]:
        """Per bucket of `bucket_s` seconds from `start`: count, min, max, mean, last value."""
        _check_range(start, end)
        if not (math.isfinite(bucket_s) and bucket_s > 0):
            raise StoreError(f"bucket_s must be a positive number, got {bucket_s}")
        with self._reading():
            conn = self._conn()
            pid, _ = self._point(conn, point_id)
            rows = self._aggregate(conn, pid, start, end, bucket_s)
        return [
            Bucket(start + k * bucket_s, start + (k + 1) * bucket_s, n, lo, hi, mean, last)
            for k, n, lo, hi, mean, last in rows
        ]

    def events_since(self, rev: int, limit: int = 1000) -> list[EventRecord]:
        """Committed events with rev > `rev`, in rev order, at most `limit`."""
        if limit < 1:
            raise StoreError(f"limit must be >= 1, got {limit}")
        with self._reading():
            conn = self._conn()
            # One read transaction: a prune between the two reads could otherwise open a gap.
            conn.execute("BEGIN")
            try:
                log_start = int(
                    conn.execute("SELECT value FROM meta WHERE key = 'log_start_rev'").fetchone()[0]
                )
                if rev < log_start - 1:
                    raise CursorExpiredError(rev, log_start)
                rows = conn.execute(
                    "SELECT rev, ts, type, pid, asset_id, value, quality, source_ts, reason, data "
                    "FROM events WHERE rev > ? ORDER BY rev LIMIT ?",
                    (rev, limit),
                ).fetchall()
            finally:
                conn.execute("COMMIT")
            return [self._event(conn, row) for row in rows]

    def close(self) -> None:
        """Close every connection this reader opened."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    # -- helpers ----------------------------------------------------------------------------------

    def _aggregate(
        self, conn: sqlite3.Connection, pid: int, start: float, end: float, bucket_s: float
    ) -> list[Any]:
        return conn.execute(
            "WITH b AS ("
            "  SELECT CAST((ts - :start) / :size AS INTEGER) AS k, count(*) AS n,"
            "         min(value) AS lo, max(value) AS hi, avg(value) AS mean, max(rev) AS last_rev"
            "  FROM events"
            f"  WHERE pid = :pid AND type = '{TELEMETRY}' AND ts >= :start AND ts <= :end"
            "    AND quality <= :measured AND value IS NOT NULL"
            "  GROUP BY k)"
            " SELECT b.k, b.n, b.lo, b.hi, b.mean, e.value FROM b"
            " JOIN events e ON e.rev = b.last_rev ORDER BY b.k",
            {"start": start, "end": end, "size": bucket_s, "pid": pid, "measured": MEASURED},
        ).fetchall()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise fault(exc, self.path, "read") from exc

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and not self._closed:
            return conn
        with self._lock:
            if self._closed:
                raise StoreError(f"{self.path}: twin store is closed")
            conn = connect(self.path, read_only=True)
            self._connections.append(conn)
        self._local.conn = conn
        return conn

    def _point(self, conn: sqlite3.Connection, point_id: str) -> tuple[int, str]:
        found = self._by_id.get(point_id)
        if found is None:
            self._load_points(conn)
            found = self._by_id.get(point_id)
            if found is None:
                raise UnknownPointError(f"unknown point {point_id!r}")
        return found

    def _load_points(self, conn: sqlite3.Connection) -> None:
        rows = conn.execute("SELECT pid, id, datatype FROM points").fetchall()
        self._by_id = {point_id: (pid, datatype) for pid, point_id, datatype in rows}
        self._by_pid = {pid: (point_id, datatype) for pid, point_id, datatype in rows}

    def _event(self, conn: sqlite3.Connection, row: tuple[Any, ...]) -> EventRecord:
        rev, ts, kind, pid, asset_id, value, quality, source_ts, reason, data = row
        point_id = datatype = None
        if pid is not None:
            if pid not in self._by_pid:
                self._load_points(conn)
            point_id, datatype = self._by_pid.get(pid, (None, None))
        if kind == TELEMETRY:
            decode = decode_value(datatype or "")
            payload = {
                "value": decode(value) if decode else value,
                "quality": QUALITIES[quality],
                "source_ts": source_ts,
                "reason": reason,
            }
            return EventRecord(rev, ts, kind, asset_of(point_id or ""), point_id, payload)
        return EventRecord(rev, ts, kind, asset_id, point_id, json.loads(data) if data else {})


def _check_range(start: float, end: float) -> None:
    if not (math.isfinite(start) and math.isfinite(end)):
        raise StoreError(f"start and end must be finite, got {start}, {end}")
    if start > end:
        raise StoreError(f"start ({start}) is after end ({end})")


def _to_bool(value: Any) -> Any:
    return None if value is None else bool(value)
