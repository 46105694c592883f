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

History is in three places (`schema.py`): per-point blocks for every rev up to meta
`compacted_rev`, frames above it, and for what retention moved out of the blocks (older than
`storage.history_days`, or removed at the size bound) time buckets in `rollups` (`rollup.py`).
Each query reads all of them in one read transaction, so a compaction or a retention step
committing meanwhile can neither hide rows nor show them twice. The event log's telemetry is
the frames (decoded here into one event per sample); its other events are rows of `events`.

Across the two resolutions: an aggregate adds the stored buckets to the raw ones of the same
grid bucket (counts, sums, minima and maxima add up exactly; `last` is the raw one's, newer); a
stored bucket falls wholly into the grid bucket its start is in, so buckets finer than
`rollup_s` over downsampled history come back at that resolution. A history query returns one
row per stored bucket there (`downsampled` true, rev 0, the mean as value, or the last value for
points whose values are whole numbers), then the raw rows.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from drivers.contract import Quality
from gateway.errors import StoreError, UnknownPointError
from gateway.twin import codec, rollup
from gateway.twin.model import EventRecord, asset_of
from gateway.twin.schema import CACHE_MIN_KIB, QUALITIES, TELEMETRY, connect, fault

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
    downsampled: bool = False  # a stored bucket's figure, not a recorded change (see above)


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

    def __init__(self, path: str | Path, *, cache: int = CACHE_MIN_KIB) -> None:
        self.path = Path(path)
        self._cache = cache
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        self._by_id: dict[str, tuple[int, str]] = {}
        self._by_pid: dict[int, tuple[str, str]] = {}
        self._telemetry_of: dict[int, tuple[Any, str, Callable[[Any], Any] | None]] = {}

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
            with _snapshot(conn):
                old = self._rollups(conn, pid, start, end, overlapping=False)
                if len(old) > limit:
                    old = old.take(np.arange(limit))
                room = limit - len(old)
                cols = self._range(conn, pid, start, end, room) if room else None
        decode = decode_value(datatype)
        whole = _whole_numbers(datatype)
        out = [
            HistoryRow(
                0,
                t,
                _as_point(last if whole else total / n, datatype, decode),
                Quality.GOOD,
                None,
                None,
                True,
            )
            for t, n, total, last in zip(
                old.start.tolist(),
                old.n.tolist(),
                old.total.tolist(),
                old.last.tolist(),
                strict=True,
            )
        ]
        if cols is not None:
            out.extend(
                HistoryRow(
                    rev,
                    ts,
                    decode(value) if decode else value,
                    QUALITIES[quality],
                    source_ts,
                    reason,
                )
                for rev, ts, _pid, value, quality, source_ts, reason in cols.rows()
            )
        return out

    def aggregate(self, point_id: str, start: float, end: float, bucket_s: float) -> list[Bucket]:
        """Per bucket of `bucket_s` seconds from `start`: count, min, max, mean, last value."""
        _check_range(start, end)
        if not (math.isfinite(bucket_s) and bucket_s > 0):
            raise StoreError(f"bucket_s must be a positive number, got {bucket_s}")
        with self._reading():
            conn = self._conn()
            pid, datatype = self._point(conn, point_id)
            with _snapshot(conn):
                old = self._rollups(conn, pid, start, end, overlapping=True)
                cols = self._range(conn, pid, start, end, None)
        raw = _buckets(cols, start, bucket_s)
        if not len(old):
            return raw
        return _with_stored(raw, rollup.regroup(old, start, bucket_s), start, bucket_s, datatype)

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
                others = conn.execute(
                    "SELECT rev, ts, type, pid, asset_id, data FROM events "
                    "WHERE rev > ? ORDER BY rev LIMIT ?",
                    (rev, limit),
                ).fetchall()
                # Telemetry: frames from the one holding rev + 1, until `limit` rows are past rev.
                telemetry: list[tuple[Any, ...]] = []
                first = conn.execute(
                    "SELECT coalesce(max(rev0), 0) FROM frames WHERE rev0 <= ?", (rev + 1,)
                ).fetchone()[0]
                frames = conn.execute(
                    "SELECT body FROM frames WHERE rev0 >= ? ORDER BY rev0", (first,)
                )
                for (body,) in frames:
                    rows = codec.decode(body).rows()
                    telemetry.extend(row for row in rows if row[0] > rev)
                    if len(telemetry) >= limit:
                        break
            finally:
                conn.execute("COMMIT")
            merged = sorted(
                [self._telemetry_event(conn, row) for row in telemetry[:limit]]
                + [self._event(conn, row) for row in others],
                key=lambda event: event.rev,
            )
            return merged[:limit]

    def log_hold(self, name: str) -> int | None:
        """The rev consumer `name` holds the event log at, or None when it holds nothing."""
        with self._reading():
            row = (
                self._conn().execute("SELECT rev FROM log_holds WHERE name = ?", (name,)).fetchone()
            )
        return None if row is None else int(row[0])

    def footprint(self) -> dict[str, int]:
        """How much history is stored and in how many bytes: blocks, and frames not compacted."""
        with self._reading():
            conn = self._conn()
            conn.execute("BEGIN")
            try:
                (compacted,) = conn.execute(
                    "SELECT value FROM meta WHERE key = 'compacted_rev'"
                ).fetchone()
                blocks, block_samples, block_bytes = conn.execute(
                    "SELECT count(*), coalesce(sum(n), 0), coalesce(sum(length(body)), 0) "
                    "FROM blocks WHERE rev1 <= ?",
                    (compacted,),
                ).fetchone()
                frames, frame_samples, frame_bytes = conn.execute(
                    "SELECT count(*), coalesce(sum(n), 0), coalesce(sum(nbytes), 0) "
                    "FROM frames WHERE rev0 > ?",
                    (compacted,),
                ).fetchone()
            finally:
                conn.execute("COMMIT")
        return {
            "blocks": blocks,
            "block_samples": block_samples,
            "block_bytes": block_bytes,
            "uncompacted_frames": frames,
            "frame_samples": frame_samples,
            "frame_bytes": frame_bytes,
        }

    def forget_points(self) -> None:
        """Read the points table again at the next query (their definitions changed)."""
        self._by_id, self._by_pid, self._telemetry_of = {}, {}, {}

    def close(self) -> None:
        """Close every connection this reader opened."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    # -- helpers ----------------------------------------------------------------------------------

    def _rollups(
        self, conn: sqlite3.Connection, pid: int, start: float, end: float, overlapping: bool
    ) -> rollup.Partial:
        """A point's stored buckets that start within [start, end] (`overlapping`: that overlap
        it, so also the one that begins before `start`), oldest first."""
        parts = []
        rows = conn.execute(
            "SELECT body FROM rollups WHERE pid = ? AND t0 > ? AND t0 <= ? AND t1 > ? ORDER BY t0",
            (pid, start - rollup.PERIOD_S, end, start),
        )
        for (body,) in rows:
            try:
                part = rollup.decode(body)
            except ValueError as exc:
                raise StoreError(
                    f"{self.path}: a downsampled history row is damaged: {exc}"
                ) from exc
            first = part.start + part.size > start if overlapping else part.start >= start
            inside = first & (part.start <= end)
            parts.append(part if inside.all() else part.take(inside))
        if not parts:
            return rollup.Partial.empty(60.0)
        return rollup.Partial(
            parts[0].size,
            *(np.concatenate([getattr(p, name) for p in parts]) for name in _COLUMNS),
        )

    def _range(
        self, conn: sqlite3.Connection, pid: int, start: float, end: float, limit: int | None
    ) -> codec.Columns:
        """A point's rows with start <= ts <= end in (ts, rev) order, the first `limit` of them."""
        with _snapshot(conn):  # blocks and frames from one snapshot
            compacted = int(
                conn.execute("SELECT value FROM meta WHERE key = 'compacted_rev'").fetchone()[0]
            )
            parts: list[codec.Columns] = []
            found = 0
            # Blocks that overlap the range, oldest first; with a limit, stop once the rows
            # found are more than it and the next block starts after the limit-th of them.
            blocks = conn.execute(
                "SELECT t0, body FROM blocks WHERE pid = ? AND t1 >= ? AND t0 <= ? "
                "AND rev1 <= ? ORDER BY t0, rev0",
                (pid, start, end, compacted),
            )
            for t0, body in blocks:
                if limit is not None and found >= limit and t0 > _kth_ts(parts, limit):
                    break
                part = _within(codec.decode(body), start, end)
                parts.append(part)
                found += len(part)
            frames = conn.execute(
                "SELECT body FROM frames WHERE rev0 > ? AND t1 >= ? AND t0 <= ? ORDER BY rev0",
                (compacted, start, end),
            )
            for (body,) in frames:
                cols = codec.decode(body)
                parts.append(_within(cols.take(cols.pid == pid), start, end))
        cols = codec.Columns.concat(parts)
        order = np.lexsort((cols.rev, cols.ts))
        if limit is not None:
            order = order[:limit]
        return cols.take(order)

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
            conn = connect(self.path, read_only=True, cache=self._cache)
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
        self._telemetry_of = {}

    def _point_of(self, conn: sqlite3.Connection, pid: int | None) -> tuple[Any, Any]:
        if pid is None:
            return None, None
        if pid not in self._by_pid:
            self._load_points(conn)
        return self._by_pid.get(pid, (None, None))

    def _telemetry_event(self, conn: sqlite3.Connection, row: tuple[Any, ...]) -> EventRecord:
        rev, ts, pid, value, quality, source_ts, reason = row
        # Per point, worked out once: the sync reads every change through here (bench/sync.py).
        known = self._telemetry_of.get(pid)
        if known is None:
            point_id, datatype = self._point_of(conn, pid)
            known = (point_id, asset_of(point_id or ""), decode_value(datatype or ""))
            self._telemetry_of[pid] = known
        point_id, asset_id, decode = known
        payload = {
            "value": decode(value) if decode else value,
            "quality": QUALITIES[quality],
            "source_ts": source_ts,
            "reason": reason,
        }
        return EventRecord(rev, ts, TELEMETRY, asset_id, point_id, payload)

    def _event(self, conn: sqlite3.Connection, row: tuple[Any, ...]) -> EventRecord:
        rev, ts, kind, pid, asset_id, data = row
        point_id, _ = self._point_of(conn, pid)
        return EventRecord(rev, ts, kind, asset_id, point_id, json.loads(data) if data else {})


_COLUMNS = ("start", "n", "lo", "hi", "total", "last")


@contextlib.contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction around the reads inside (joined if one is open already)."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


def _whole_numbers(datatype: str) -> bool:
    """Whether a point's values are whole numbers (bool and integer datatypes)."""
    return datatype == "bool" or datatype.startswith(("int", "uint"))


def _as_point(value: float, datatype: str, decode: Callable[[Any], Any] | None) -> Any:
    """A stored bucket's float as the point's values are: ints stay ints, bools bools."""
    if _whole_numbers(datatype) and value.is_integer():
        whole = int(value)
        return decode(whole) if decode else whole
    return value


def _with_stored(
    raw: list[Bucket], stored: rollup.Partial, start: float, size: float, datatype: str
) -> list[Bucket]:
    """Raw buckets and stored ones (regrouped to the same grid) as one list, by start."""
    by_key: dict[int, Bucket] = {}
    for t, n, lo, hi, total, last in zip(
        *(getattr(stored, name).tolist() for name in _COLUMNS), strict=True
    ):
        k = round((t - start) / size)
        by_key[k] = Bucket(
            t,
            t + size,
            n,
            _as_point(lo, datatype, None),
            _as_point(hi, datatype, None),
            total / n,
            _as_point(last, datatype, None),
        )
    for bucket in raw:
        k = round((bucket.start - start) / size)
        old = by_key.get(k)
        if old is None or bucket.mean is None:
            by_key[k] = bucket  # a text bucket has no stored part to add
            continue
        n = old.count + bucket.count
        by_key[k] = Bucket(
            bucket.start,
            bucket.end,
            n,
            min(old.min, bucket.min),
            max(old.max, bucket.max),
            ((old.mean or 0.0) * old.count + bucket.mean * bucket.count) / n,
            bucket.last,  # raw history is the newer part
        )
    return [by_key[k] for k in sorted(by_key)]


def _within(cols: codec.Columns, start: float, end: float) -> codec.Columns:
    ts = cols.ts
    inside = (ts >= start) & (ts <= end)
    return cols if inside.all() else cols.take(inside)


def _kth_ts(parts: list[codec.Columns], k: int) -> float:
    """The k-th smallest ts among the rows found so far (k <= their number)."""
    stamps = np.concatenate([part.ts for part in parts])
    return float(np.partition(stamps, k - 1)[k - 1])


def _buckets(cols: codec.Columns, start: float, size: float) -> list[Bucket]:
    """Count, min, max, mean and last of the measured values per bucket of `size` seconds."""
    cols = cols.take(cols.quality <= MEASURED)
    numeric, as_float = cols.numeric()
    if cols.value_kind != "O":
        # Numbers only: the rows that are not numbers have no value (None). No Python lists.
        cols, as_float = cols.take(numeric), as_float[numeric]
    else:
        # Text or mixed: rows without a value take no part, not even as "last".
        keep = np.fromiter((v is not None for v in cols.values), dtype=bool, count=len(cols))
        if not keep.all():
            cols, as_float = cols.take(keep), as_float[keep]
    if not len(cols):
        return []
    keys = ((cols.ts - start) // size).astype(np.int64)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    bounds = np.concatenate(([0], np.flatnonzero(np.diff(keys)) + 1, [len(keys)]))
    firsts = bounds[:-1]
    counts = np.diff(bounds)
    # The last value of a bucket is its newest rev's.
    revs = cols.rev[order]
    newest = np.maximum.reduceat(revs, firsts)
    last_at = order[np.flatnonzero(np.isin(revs, newest))]
    if cols.value_kind != "O":
        ints = cols.value_kind == "i"
        data = cols.int_values() if ints else as_float
        ordered = data[order]
        lows = np.minimum.reduceat(ordered, firsts).tolist()
        highs = np.maximum.reduceat(ordered, firsts).tolist()
        means = (np.add.reduceat(as_float[order], firsts) / counts).tolist()
        lasts = data[last_at].tolist()
        return [
            Bucket(start + k * size, start + (k + 1) * size, n, lo, hi, mean, last)
            for k, n, lo, hi, mean, last in zip(
                keys[firsts].tolist(), counts.tolist(), lows, highs, means, lasts, strict=True
            )
        ]
    values = cols.values
    out: list[Bucket] = []
    for i, (begin, end) in enumerate(itertools.pairwise(bounds)):
        measured = [values[j] for j in order[begin:end]]
        k = int(keys[begin])
        if all(type(v) is int or type(v) is float for v in measured):
            lo, hi = min(measured), max(measured)
            mean: float | None = math.fsum(measured) / len(measured)
        else:  # text: ordered as SQLite orders values (numbers before text), no mean
            ordered_values = sorted(measured, key=_sqlite_order)
            lo, hi, mean = ordered_values[0], ordered_values[-1], None
        last = values[last_at[i]]
        out.append(
            Bucket(start + k * size, start + (k + 1) * size, len(measured), lo, hi, mean, last)
        )
    return out


def _sqlite_order(value: Any) -> tuple[int, Any]:
    if isinstance(value, (int, float)):
        return (0, value)
    if isinstance(value, str):
        return (1, value)
    return (2, bytes(value))


def _check_range(start: float, end: float) -> None:
    if not (math.isfinite(start) and math.isfinite(end)):
        raise StoreError(f"start and end must be finite, got {start}, {end}")
    if start > end:
        raise StoreError(f"start ({start}) is after end ({end})")


def _to_bool(value: Any) -> Any:
    return None if value is None else bool(value)
