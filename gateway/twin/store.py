"""The twin store: in-memory current state in front of the SQLite event log and history.

Nothing here waits on SQLite on the event loop: ingest and append_event hand rows to the writer
thread; the methods that do wait (open, close, flush, prune and the history reads) say so in their
docstrings, and the loop runs them through `asyncio.to_thread`.

Ingest filters on change: the first sample of a point is always accepted; a quality change is
always accepted; otherwise a value is accepted when it differs from the last accepted one by more
than the point's deadband (deadband 0: any change). A sample with `value=None` keeps the last
value and can only change the quality. Values outside a point's lo/hi are stored unchanged; the
driver decides quality. Every accepted change gets the next rev and becomes a `TelemetryChanged`
event whose data is the point's state after it (value, quality, source_ts, reason).

History is stored compressed (frames, then per-point blocks: see `schema.py`); `current` in the
database is a snapshot, and open() replays the frames committed after it, so the values loaded
are the last committed ones however the previous run ended.

Revs are assigned in memory at ingest, in the same order the writer commits them. Until the
writer commits, `rev` is ahead of `committed_rev`; a crash loses that tail, and the reopened
store hands the same rev numbers out again. Anything that leaves the process with a rev (an ETag,
an SSE id, an MQTT diff) is safe when it comes from the event log, which only holds committed
events; a rev taken from `rev`/`snapshot()` may be reused after a crash.

Opening takes the database for this store alone (an exclusive lock beside it: see `files.py`),
creates what is missing private (0700 directories, 0600 files), refuses a read-only location
saying so, and refuses a damaged database (PRAGMA quick_check) with the steps to recover it.
While open, `problems()` says what is wrong with storage (a writer that cannot commit, SQLite
reporting corruption) for /health.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import numbers
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from drivers.contract import Quality, Sample
from gateway import sdnotify
from gateway.errors import DatabaseFault, StoreError, UnknownPointError
from gateway.twin import codec
from gateway.twin.commits import CommitSignal
from gateway.twin.files import StoreLock, check_writable, create_private_dirs, create_private_file
from gateway.twin.history import Bucket, HistoryReader, HistoryRow, decode_value
from gateway.twin.model import EventRecord, PointDef, PointValue, asset_of
from gateway.twin.schema import (
    QUALITIES,
    QUALITY_CODE,
    TELEMETRY,
    cache_kib,
    check_integrity,
    connect,
    explain,
    fault,
    migrate,
    recovery_steps,
    write_transaction,
)
from gateway.twin.writer import (
    BACKLOG_BYTES,
    BACKLOG_ROWS,
    COMMIT_BUCKETS_S,
    MB,
    ROW_BYTES,
    ROW_PID,
    ROW_QUALITY,
    ROW_SOURCE_TS,
    ROW_VALUE,
    STORAGE_BOUND,
    PruneResult,
    TelemetryRow,
    Writer,
)

log = logging.getLogger(__name__)

__all__ = ["ChangeListener", "PruneResult", "StoreStats", "TwinStore", "clock_us", "load_current"]

ChangeListener = Callable[[list[PointValue]], None]
_T = TypeVar("_T")

DAY_S = 86400.0
# Above this size the start-up integrity check is announced (log, systemd status and timeout).
CHECK_NOTICE_BYTES = 256 * 1024 * 1024
# Logged once each, then only counted: a misconfigured device would otherwise flood the log.
MAX_LOGGED_UNKNOWN = 100
_INT64 = (-(2**63), 2**63 - 1)


def clock_us() -> float:
    """Wall time rounded to the microsecond: a whole number of microseconds compresses to a
    byte or two per sample in the history (`codec.py`), any float to about six."""
    return round(time.time() * 1e6) / 1e6


@dataclass(slots=True)
class StoreStats:
    """Counters since open."""

    accepted: int
    filtered: int
    unknown: int
    invalid: int
    rev: int
    committed_rev: int
    batches: int  # transactions committed
    rows_written: int
    current_rows_written: int
    uncommitted_revs: int
    writer_error: str | None
    backlog_rows: int  # taken by the writer, not committed (grows while commits fail)
    backlog_bytes: int  # its estimated memory
    dropped_rows: int  # history rows dropped at the backlog bound since open
    dropped_events: int  # other events dropped there
    corruption: str | None  # what SQLite said when it first reported corruption
    frames_written: int  # compressed runs of telemetry committed
    frame_bytes_written: int
    uncompacted_rows: int  # committed samples only in frames yet
    compactions: int
    blocks_written: int
    log_bytes: int  # frames kept for the event log and the uncompacted history


class WriterLoad(NamedTuple):
    """What /metrics shows of the writer thread."""

    queued: int  # batches and commands waiting
    commits: int
    commit_seconds: float  # their total time
    commit_histogram: list[int]  # commits per COMMIT_BUCKETS_S bucket, and above the last
    longest_step_s: float  # the longest compaction, retention or bound step since start


class TwinStore:
    """The twin's current state in memory, its event log and history in SQLite."""

    def __init__(
        self,
        path: str | Path,
        points: Sequence[PointDef],
        *,
        flush_interval_s: float = 0.005,
        flush_rows: int = 5000,
        history_days: float = 30,
        events_days: float = 7,
        event_log_minutes: float = 15,
        event_log_max_mb: float = 512,
        clock: Callable[[], float] = clock_us,
        backlog_rows: int = BACKLOG_ROWS,
        backlog_bytes: int = BACKLOG_BYTES,
        rollup_s: float = 60.0,
        rollup_days: float = 365.0,
        max_db_mb: float | None = None,
        bound_drops_unsynced: bool = False,
    ) -> None:
        if flush_interval_s <= 0 or flush_rows < 1:
            raise ValueError("flush_interval_s must be > 0 and flush_rows >= 1")
        if history_days <= 0 or events_days <= 0 or event_log_minutes < 0 or event_log_max_mb <= 0:
            raise ValueError(
                "history_days, events_days and event_log_max_mb must be > 0, event_log_minutes >= 0"
            )
        if backlog_rows < flush_rows or backlog_bytes < ROW_BYTES * flush_rows:
            raise ValueError("the backlog bound must hold at least flush_rows rows")
        self.path = Path(path)
        self.points: dict[str, PointDef] = {}
        for point in points:
            if point.id in self.points:
                raise StoreError(f"point {point.id!r} is declared twice")
            self.points[point.id] = point
        self.flush_interval_s = flush_interval_s
        self.flush_rows = flush_rows
        self.history_days = history_days
        self.events_days = events_days
        self.event_log_minutes = event_log_minutes
        self.event_log_max_mb = event_log_max_mb
        self.backlog_rows = backlog_rows
        self.backlog_bytes = backlog_bytes
        self.rollup_s = rollup_s
        self.rollup_days = rollup_days
        self.max_db_mb = max_db_mb
        self.bound_drops_unsynced = bound_drops_unsynced
        self._clock = clock
        self._lock = threading.Lock()
        self._file_lock: StoreLock | None = None
        self._corruption: DatabaseFault | None = None  # found by a read
        self._writer: Writer | None = None
        self._reader: HistoryReader | None = None
        self._open = False
        self._rev = 0
        # pid is known once open() has read the points table.
        self._state: dict[str, _PointState] = {
            p.id: _PointState(0, max(p.deadband or 0.0, 0.0), None) for p in self.points.values()
        }
        self._accepted = 0
        self._filtered = 0
        self._unknown = 0
        self._invalid = 0
        self._unknown_seen: set[str] = set()
        self._listeners: list[ChangeListener] = []
        self._id_of_pid: dict[int, str] = {}
        self._commits: CommitSignal | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def open(self) -> None:
        """Lock and check the database, migrate it, load current values, start the writer.

        Blocking. Refuses (StoreError, before touching the database) another gateway's database,
        a read-only location and a damaged database, each with what to do about it.
        """
        if self._open:
            raise StoreError(f"{self.path}: twin store is already open")
        create_private_dirs(self.path.parent)
        check_writable(self.path)
        file_lock = StoreLock(self.path)
        file_lock.acquire()
        try:
            self._open_locked()
        except BaseException:
            file_lock.release()
            raise
        self._file_lock = file_lock
        self._open = True
        log.info(
            "%s: twin store open at rev %d with %d points", self.path, self._rev, len(self.points)
        )

    def close(self) -> None:
        """Commit everything ingested so far, stop the writer, close connections (blocking)."""
        with self._lock:
            if not self._open:
                return
            self._open = False
        self._commits = None
        try:
            if self._writer is not None:
                self._writer.stop(timeout=60.0)
        finally:
            try:
                if self._reader is not None:
                    self._reader.close()
            finally:
                if self._file_lock is not None:
                    self._file_lock.release()
                    self._file_lock = None

    def __enter__(self) -> TwinStore:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def declare_points(self, points: Sequence[PointDef]) -> None:
        """Declare exactly `points` from now on, as open() does with the points it is given.

        For a config reload (gateway/reload.py): a new point is served at once, with its last
        committed value if an earlier config had it (as at open); a changed one takes its new
        definition and keeps its value; one left out stops being served, and its row stays
        (`declared = 0`) so that its history and events still resolve. The database is written
        off the loop (its own short transaction, beside the writer's); the in-memory swap
        happens on the loop in one step just before this returns, so a caller that updates its
        own view of the points right after the await is never seen half done. Call on the event
        loop; StoreError, with nothing changed, when the database cannot be written.
        """
        wanted: dict[str, PointDef] = {}
        for point in points:
            if point.id in wanted:
                raise StoreError(f"point {point.id!r} is declared twice")
            wanted[point.id] = point
        if not self._open:
            raise StoreError(f"{self.path}: twin store is not open")
        fresh = [point_id for point_id in wanted if point_id not in self._state]

        def write() -> tuple[dict[str, int], dict[int, TelemetryRow]]:
            conn = connect(self.path)
            try:
                pids = self._declare_points(conn, wanted.values())
                # Only a point new to memory needs its last value: the others have theirs.
                current = load_current(conn)[0] if fresh else {}
            except StoreError:
                raise
            except sqlite3.Error as exc:
                raise fault(exc, self.path, "declare the points in") from exc
            finally:
                conn.close()
            return pids, current

        pids, current = await asyncio.to_thread(write)
        with self._lock:
            state: dict[str, _PointState] = {}
            for point_id, point in wanted.items():
                deadband = point.deadband if point.deadband and point.deadband > 0 else 0.0
                entry = self._state.get(point_id)
                if entry is None:
                    pid = pids[point_id]
                    row = current.get(pid)
                    decode = decode_value(point.datatype) if row is not None else None
                    if row is not None and decode is not None:
                        row = (*row[:ROW_VALUE], decode(row[ROW_VALUE]), *row[ROW_VALUE + 1 :])
                    entry = _PointState(pid, deadband, row)
                else:
                    entry.deadband = deadband
                state[point_id] = entry
            self.points = wanted
            self._state = state
            self._id_of_pid.update({pid: point_id for point_id, pid in pids.items()})
        if self._reader is not None:
            self._reader.forget_points()  # a changed datatype decodes history its new way

    # -- writes -----------------------------------------------------------------------------------

    def ingest(self, batch: Iterable[Sample]) -> int:
        """Apply a batch of samples; return how many were accepted as changes."""
        now = self._clock()
        rows: list[TelemetryRow] = []
        append = rows.append
        state = self._state
        qcode = QUALITY_CODE
        plain = _PLAIN_TYPES
        filtered = unknown = invalid = 0
        with self._lock:
            if not self._open:
                raise StoreError(f"{self.path}: twin store is not open")
            rev = self._rev
            for sample in batch:
                entry = state.get(sample.key)
                if entry is None:
                    unknown += 1
                    self._note_unknown(sample.key)
                    continue
                quality = qcode.get(sample.quality)
                value = sample.value
                if quality is None or (value is not None and type(value) not in plain):
                    value = _coerce(value)
                    if quality is None or value is _INVALID:
                        invalid += 1
                        continue
                source_ts = sample.source_ts
                last = entry.last
                if last is not None:
                    if value is None:
                        if quality == last[ROW_QUALITY]:
                            filtered += 1
                            continue
                        # No new reading: the value and its source time stay the last ones.
                        value = last[ROW_VALUE]
                        if source_ts is None:
                            source_ts = last[ROW_SOURCE_TS]
                    elif quality == last[ROW_QUALITY]:
                        previous = last[ROW_VALUE]
                        if value == previous:
                            filtered += 1
                            continue
                        deadband = entry.deadband
                        if deadband:
                            try:
                                if abs(value - previous) <= deadband:
                                    filtered += 1
                                    continue
                            except TypeError:
                                pass  # not numbers (text, a None previous): changed is changed
                rev += 1
                row = (rev, now, entry.pid, value, quality, source_ts, sample.reason)
                entry.last = row
                append(row)
            if rows:
                self._rev = rev
                assert self._writer is not None
                self._writer.submit_telemetry(rows)
            self._accepted += len(rows)
            self._filtered += filtered
            self._unknown += unknown
            self._invalid += invalid
        if rows and self._listeners:
            self._notify(rows)
        return len(rows)

    def add_listener(self, listener: ChangeListener) -> Callable[[], None]:
        """Call `listener(changes)` after every ingest that accepted changes; return its remover.

        Listeners run on the thread that called ingest() (the event loop), in rev order, with
        the new values; they must be quick and must not raise (a failure is logged and the
        listener stays registered). The remover is idempotent, so a subsystem can hand it to its
        teardown stack without tracking whether it already ran.
        """
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    def append_event(
        self,
        type: str,
        data: dict[str, Any],
        *,
        point_id: str | None = None,
        asset_id: str | None = None,
    ) -> int:
        """Append a non-telemetry event (e.g. `DeviceStateChanged`); return its rev."""
        if type == TELEMETRY:
            raise StoreError(f"{TELEMETRY} events come from ingest(), not append_event()")
        if not type:
            raise StoreError("an event needs a type")
        try:
            payload = json.dumps(data, separators=(",", ":"), default=str)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{type}: event data is not JSON-serialisable: {exc}") from exc
        now = self._clock()
        with self._lock:
            if not self._open:
                raise StoreError(f"{self.path}: twin store is not open")
            pid = None
            if point_id is not None:
                entry = self._state.get(point_id)
                if entry is None:
                    raise UnknownPointError(f"unknown point {point_id!r}")
                pid = entry.pid
                if asset_id is None:
                    asset_id = asset_of(point_id)
            self._rev += 1
            rev = self._rev
            assert self._writer is not None
            self._writer.submit_event((rev, now, type, pid, asset_id, payload))
        return rev

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything ingested so far is committed; StoreError if not (blocking)."""
        writer = self._require_writer()
        writer.flush(self._rev, timeout)

    async def aflush(self) -> None:
        """Wait, off the event loop, until everything ingested so far is committed."""
        await asyncio.to_thread(self.flush)

    def prune(self, now: float | None = None, timeout: float = 600.0) -> PruneResult:
        """Drop history older than `history_days`, events older than `events_days` (blocking).

        Compacts first, so that history still in frames is subject to retention too.
        """
        writer = self._require_writer()
        writer.compact(timeout)
        result = writer.prune(self._clock() if now is None else now, timeout)
        log.info(
            "%s: retention moved %d raw samples into %g s buckets, removed %d bucket rows and "
            "%d events; the event log starts at rev %d",
            self.path,
            result.history_rows,
            self.rollup_s,
            result.rollup_rows,
            result.events,
            result.log_start_rev,
        )
        return result

    def compact(self, timeout: float = 600.0) -> int:
        """Compact every committed frame into blocks now and trim the event log to its window
        (the writer does both on its own as frames accumulate); return the compacted rev."""
        self.flush(timeout)
        return self._require_writer().compact(timeout)

    def commit_signal(self) -> CommitSignal:
        """The committed rev as the running event loop sees it, and a way to wait for commits.

        Created on first call, bound to the calling thread's running loop; call it on the loop
        that will wait, after open().
        """
        if self._commits is None:
            writer = self._require_writer()
            self._commits = CommitSignal(asyncio.get_running_loop(), lambda: writer.committed_rev)
            writer.on_commit = self._commits.committed
            # A commit between the signal's first read and the line above woke no one.
            self._commits.committed(writer.committed_rev)
        return self._commits

    async def committed_snapshot(
        self, max_wait_s: float = 2.0
    ) -> tuple[int, dict[str, PointValue]]:
        """Every point's current value at a rev that is committed: the snapshot is taken, then
        its rev waited for (a few ms: the writer's flush interval). StoreError when the writer
        cannot commit it within `max_wait_s` (the database is failing)."""
        rev, values = self.snapshot()
        try:
            async with asyncio.timeout(max_wait_s):
                await self.commit_signal().wait_for(rev)
        except TimeoutError:
            raise StoreError(
                f"{self.path}: rev {rev} not committed within {max_wait_s:g} s"
                + (f": {self.stats.writer_error}" if self.stats.writer_error else "")
            ) from None
        return rev, values

    def log_hold(self, name: str) -> int | None:
        """Consumer `name`'s hold on the event log (its persisted cursor), or None (blocking)."""
        return self._reading(self._require_reader().log_hold, name)

    def hold_log(self, name: str, rev: int) -> None:
        """Keep the event log after `rev` for consumer `name` (sync: its cursor), within the
        log's size bound (`event_log_max_mb`); blocking."""
        if not name:
            raise StoreError("a log hold needs a name")
        self._require_writer().hold(name, rev)

    def release_log(self, name: str) -> None:
        """Drop consumer `name`'s hold on the event log (blocking)."""
        self._require_writer().hold(name, None)

    # -- reads ------------------------------------------------------------------------------------

    @property
    def rev(self) -> int:
        """The newest rev assigned (in memory; see `committed_rev` for what is durable)."""
        return self._rev

    @property
    def committed_rev(self) -> int:
        """The newest rev known to be committed to the database."""
        return self._writer.committed_rev if self._writer is not None else self._rev

    @property
    def log_start_rev(self) -> int:
        """The oldest rev the event log still serves (retention moves it up)."""
        return self._writer.log_start_rev if self._writer is not None else 1

    def get(self, point_id: str) -> PointValue:
        """The current value of one point."""
        entry = self._state.get(point_id)
        if entry is None:
            raise UnknownPointError(f"unknown point {point_id!r}")
        return self._value_of(point_id, entry.last)

    def snapshot(self) -> tuple[int, dict[str, PointValue]]:
        """Every point's current value and the rev they were taken at."""
        with self._lock:
            rev = self._rev
            rows = [(point_id, entry.last) for point_id, entry in self._state.items()]
        return rev, {point_id: self._value_of(point_id, row) for point_id, row in rows}

    def history(
        self, point_id: str, start: float, end: float, limit: int = 1000
    ) -> list[HistoryRow]:
        """One point's committed history in [start, end], oldest first (blocking)."""
        return self._reading(self._require_reader().history, point_id, start, end, limit)

    def aggregate(self, point_id: str, start: float, end: float, bucket_s: float) -> list[Bucket]:
        """Time-bucket min/max/mean/last/count of one point (blocking)."""
        return self._reading(self._require_reader().aggregate, point_id, start, end, bucket_s)

    def events_since(self, rev: int, limit: int = 1000) -> list[EventRecord]:
        """Committed events after `rev`, in rev order (blocking)."""
        return self._reading(self._require_reader().events_since, rev, limit)

    def history_footprint(self) -> dict[str, int]:
        """Samples and bytes of the stored history, compacted and not (blocking)."""
        return self._reading(self._require_reader().footprint)

    def storage_info(self) -> dict[str, int]:
        """Where the log and the history stand, and the files' size, for /health (no I/O but
        two stat calls)."""
        writer = self._require_writer()
        size = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                size += Path(f"{self.path}{suffix}").stat().st_size
        return {
            "committed_rev": writer.committed_rev,
            "log_start_rev": writer.log_start_rev,
            "compacted_rev": writer.compacted_rev,
            "uncompacted_samples": writer.uncompacted_rows,
            "event_log_bytes": writer.log_bytes,
            "database_bytes": size,
            "used_bytes": writer.used_bytes,
            "bound_bytes": writer.max_bytes or 0,
            "bound_episodes": writer.bound_episodes,
            "downsampled_samples": writer.retired_rows,
        }

    def writer_load(self) -> WriterLoad:
        """The writer's queue depth, commits, their latency and its longest step, for /metrics."""
        writer = self._writer
        if writer is None:
            return WriterLoad(0, 0, 0.0, [0] * (len(COMMIT_BUCKETS_S) + 1), 0.0)
        return WriterLoad(
            writer.queued,
            writer.batches,
            writer.commit_seconds,
            list(writer.commit_histogram),
            writer.longest_step_s,
        )

    @property
    def stats(self) -> StoreStats:
        """Ingest and writer counters."""
        writer = self._writer
        corruption = (writer.corruption if writer else None) or self._corruption
        return StoreStats(
            accepted=self._accepted,
            filtered=self._filtered,
            unknown=self._unknown,
            invalid=self._invalid,
            rev=self._rev,
            committed_rev=self.committed_rev,
            batches=writer.batches if writer else 0,
            rows_written=writer.rows_written if writer else 0,
            current_rows_written=writer.current_rows_written if writer else 0,
            uncommitted_revs=self._rev - self.committed_rev,
            writer_error=None if writer is None or writer.error is None else str(writer.error),
            backlog_rows=writer.pending_rows if writer else 0,
            backlog_bytes=writer.pending_bytes if writer else 0,
            dropped_rows=writer.dropped_rows if writer else 0,
            dropped_events=writer.dropped_events if writer else 0,
            corruption=None if corruption is None else str(corruption),
            frames_written=writer.frames_written if writer else 0,
            frame_bytes_written=writer.frame_bytes_written if writer else 0,
            uncompacted_rows=writer.uncompacted_rows if writer else 0,
            compactions=writer.compactions if writer else 0,
            blocks_written=writer.blocks_written if writer else 0,
            log_bytes=writer.log_bytes if writer else 0,
        )

    def problems(self) -> list[str]:
        """What is wrong with storage now, one sentence each; empty when all is well."""
        writer = self._writer
        if writer is None:
            return []
        found = []
        error, since = writer.error, writer.failing_since
        if error is not None:
            when = time.strftime("%H:%M:%S", time.localtime(since)) if since else "now"
            found.append(
                f"{self.path}: the twin database cannot be written since {when}: "
                f"{explain(error)}; {writer.pending_rows} rows held in memory (at most "
                f"{writer.backlog_rows}), {writer.dropped_rows} history rows and "
                f"{writer.dropped_events} events dropped"
            )
        if writer.bound_exhausted:
            found.append(
                f"{self.path}: the twin database uses {writer.used_bytes / MB:.0f} MB, above "
                f"storage.max_db_mb ({(writer.max_bytes or 0) / MB:.0f} MB), and only current "
                "values, the event log and undelivered events are left: raise the bound or "
                "lower storage.event_log_max_mb"
            )
        corruption = writer.corruption or self._corruption
        if corruption is not None:
            found.append(
                f"{self.path}: SQLite reports the twin database is corrupt ({corruption}); "
                f"current values are still served. {recovery_steps(self.path)}"
            )
        return found

    def limit_database_growth(self, pages: int | None) -> int:
        """Let the database grow by at most `pages` pages, None for no limit (blocking).

        A commit that needs more gets SQLITE_FULL, exactly as on a full disk: tests use it to
        fill the disk without root. Returns the page cap now in effect.
        """
        return self._require_writer().limit_growth(pages)

    # -- helpers ----------------------------------------------------------------------------------

    def _open_locked(self) -> None:
        create_private_file(self.path)  # 0600 before SQLite creates it: -wal and -shm follow
        size = self.path.stat().st_size
        if size > CHECK_NOTICE_BYTES:
            # quick_check reads the whole file: measured ~20 s per GB on a busy 2-core box.
            # Stretch systemd's start timeout rather than have it kill a gateway mid-check.
            log.info("%s: checking the twin database (%d MiB)", self.path, size >> 20)
            allow_us = int((30 + 60 * size / 1e9) * 1e6)
            sdnotify.notify(
                f"STATUS=checking the twin database ({size >> 20} MiB)\n"
                f"EXTEND_TIMEOUT_USEC={allow_us}"
            )
        conn = connect(self.path, cache=cache_kib(len(self.points)))
        try:
            check_integrity(conn, self.path)
            migrate(conn, path=self.path)
            pids = self._declare_points(conn, self.points.values())
            rev, log_start = self._load(conn, pids)
        except StoreError:
            raise
        except sqlite3.Error as exc:
            raise fault(exc, self.path, "open") from exc
        except Exception as exc:
            raise StoreError(f"{self.path}: cannot open the twin store: {exc}") from exc
        finally:
            conn.close()
        self._rev = rev
        self._id_of_pid = {pid: point_id for point_id, pid in pids.items()}
        writer = Writer(
            self.path,
            committed_rev=rev,
            log_start_rev=log_start,
            flush_interval_s=self.flush_interval_s,
            flush_rows=self.flush_rows,
            history_s=self.history_days * DAY_S,
            events_s=self.events_days * DAY_S,
            log_window_s=self.event_log_minutes * 60,
            log_max_bytes=int(self.event_log_max_mb * 1024 * 1024),
            cache_kib=cache_kib(len(self.points)),
            backlog_rows=self.backlog_rows,
            backlog_bytes=self.backlog_bytes,
            rollup_s=self.rollup_s,
            rollup_keep_s=self.rollup_days * DAY_S,
            max_bytes=None if self.max_db_mb is None else int(self.max_db_mb * 1024 * 1024),
            bound_drops_unsynced=self.bound_drops_unsynced,
        )
        writer.on_bound = self._record_bound
        writer.start()
        self._writer = writer
        self._reader = HistoryReader(self.path, cache=cache_kib(len(self.points)))

    def _record_bound(self, report: dict[str, Any]) -> None:
        """The writer's report of one episode at the size bound, as an event (writer thread)."""
        with contextlib.suppress(StoreError):  # closing: the log line has said it
            self.append_event(STORAGE_BOUND, report)

    def _reading(self, read: Callable[..., _T], *args: Any) -> _T:
        """Run a reader query; remember corruption it finds, for problems()."""
        try:
            return read(*args)
        except DatabaseFault as exc:
            if exc.corrupt and self._corruption is None:
                self._corruption = exc
                log.critical("%s", exc)
            raise

    def _notify(self, rows: list[TelemetryRow]) -> None:
        ids = self._id_of_pid
        changes = [
            PointValue(ids[pid], value, QUALITIES[quality], source_ts, ts, rev, reason)
            for rev, ts, pid, value, quality, source_ts, reason in rows
        ]
        for listener in list(self._listeners):
            try:
                listener(changes)
            except Exception:
                log.exception("twin change listener %r failed", listener)

    def _value_of(self, point_id: str, row: TelemetryRow | None) -> PointValue:
        if row is None:
            # Declared, never heard from: OPC UA's BadWaitingForInitialData.
            return PointValue(point_id, None, Quality.BAD, None, 0.0, 0, "waiting for initial data")
        rev, ts, _pid, value, quality, source_ts, reason = row
        return PointValue(point_id, value, QUALITIES[quality], source_ts, ts, rev, reason)

    def _declare_points(self, conn: Any, points: Iterable[PointDef]) -> dict[str, int]:
        with write_transaction(conn):
            conn.execute("UPDATE points SET declared = 0")
            conn.executemany(
                "INSERT INTO points(id, device, datatype, unit, lo, hi, writable, deadband, "
                "description, declared) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1) "
                "ON CONFLICT(id) DO UPDATE SET device = excluded.device, "
                "datatype = excluded.datatype, unit = excluded.unit, lo = excluded.lo, "
                "hi = excluded.hi, writable = excluded.writable, deadband = excluded.deadband, "
                "description = excluded.description, declared = 1",
                [
                    (
                        p.id,
                        p.device,
                        p.datatype,
                        p.unit,
                        p.lo,
                        p.hi,
                        int(p.writable),
                        p.deadband,
                        p.description,
                    )
                    for p in points
                ],
            )
        return dict(conn.execute("SELECT id, pid FROM points WHERE declared = 1").fetchall())

    def _load(self, conn: Any, pids: dict[str, int]) -> tuple[int, int]:
        current, top = load_current(conn)
        self._state = {}
        for point_id, point in self.points.items():
            pid = pids[point_id]
            row = current.get(pid)
            if row is not None:
                decode = decode_value(point.datatype)
                if decode is not None:
                    row = (*row[:ROW_VALUE], decode(row[ROW_VALUE]), *row[ROW_VALUE + 1 :])
            deadband = point.deadband if point.deadband and point.deadband > 0 else 0.0
            self._state[point_id] = _PointState(pid, deadband, row)
        log_start = int(
            conn.execute("SELECT value FROM meta WHERE key = 'log_start_rev'").fetchone()[0]
        )
        # Retention may have emptied the log; the rev still never goes back.
        return max(top, log_start - 1), log_start

    def _note_unknown(self, key: str) -> None:
        if key not in self._unknown_seen and len(self._unknown_seen) < MAX_LOGGED_UNKNOWN:
            self._unknown_seen.add(key)
            log.warning("%s: ignoring samples of undeclared point %r", self.path, key)

    def _require_writer(self) -> Writer:
        if self._writer is None:
            raise StoreError(f"{self.path}: twin store was never opened")
        return self._writer

    def _require_reader(self) -> HistoryReader:
        if self._reader is None:
            raise StoreError(f"{self.path}: twin store was never opened")
        return self._reader


@dataclass(slots=True)
class _PointState:
    """What ingest keeps per point."""

    pid: int
    deadband: float
    # The TelemetryRow the writer also got: an accepted update allocates one tuple, nothing else.
    last: TelemetryRow | None


# -- value checks ----------------------------------------------------------------------------------

# Types SQLite binds as they are. int is not here: it has a range to check (see _coerce).
_PLAIN_TYPES = frozenset({float, str})
_INVALID = object()


def _coerce(value: Any) -> Any:
    """A value SQLite can store and compare, or _INVALID (lists, dicts, huge ints, …)."""
    if value is None or type(value) is bool:
        return value
    if isinstance(value, str):  # a StrEnum member and the like: store the text
        return str(value)
    if isinstance(value, int):
        return value if _INT64[0] <= value <= _INT64[1] else float(value)
    if isinstance(value, numbers.Integral):  # numpy integers
        return _coerce(int(value))
    if isinstance(value, numbers.Real):  # numpy floats, Decimal, Fraction
        return float(value)
    if isinstance(value, bytes):
        return value
    return _INVALID


def load_current(conn: sqlite3.Connection) -> tuple[dict[int, TelemetryRow], int]:
    """Every point's last committed row by pid, and the newest rev the database holds.

    The `current` table is a snapshot as of meta `current_rev`; the frames committed after it
    are replayed over it (at most one compaction period of them: well under a second to read).
    """
    current: dict[int, TelemetryRow] = {
        row[ROW_PID]: row
        for row in conn.execute(
            "SELECT rev, ts, pid, value, quality, source_ts, reason FROM current"
        )
    }
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    since = int(meta.get("current_rev", 0))
    top = max(
        since, int(meta.get("compacted_rev", 0)), max((r[0] for r in current.values()), default=0)
    )
    # The frame holding rev since + 1 may start at or below it.
    first = conn.execute(
        "SELECT coalesce(max(rev0), 0) FROM frames WHERE rev0 <= ?", (since + 1,)
    ).fetchone()[0]
    for (body,) in conn.execute("SELECT body FROM frames WHERE rev0 >= ? ORDER BY rev0", (first,)):
        for row in codec.decode(body).rows():
            if row[0] > since:
                current[row[ROW_PID]] = row
                top = max(top, row[0])
    top_event = conn.execute("SELECT coalesce(max(rev), 0) FROM events").fetchone()[0]
    return current, max(top, int(top_event))
