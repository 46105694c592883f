"""The single SQLite writer thread: every twin write goes through its queue, in rev order.

The store puts whole lists of telemetry rows (one list per ingested batch), single generic-event
rows and commands on one `queue.SimpleQueue`; `put` never blocks, so the event loop never waits
on SQLite. The thread gathers rows for `flush_interval_s` or until `flush_rows`, then writes them
in one transaction: the events with multi-row INSERTs (see `MultiRowInsert`), and `current`
coalesced to one row per point.

Because the queue holds revs in ascending order, `committed_rev` (set only after COMMIT returns)
means every rev up to it is in the database. A failing commit (disk full, I/O error, a locked
file) is rolled back, logged on the transition, kept in `error`, and retried with backoff; the
rows stay in memory (the backlog), and every flush waiting meanwhile fails with the cause.

The backlog is bounded (`BACKLOG_ROWS`, `BACKLOG_BYTES`): a day-long full disk must not take the
appliance's memory. At the bound the writer drops the oldest history first, down to 90 % of the
bound, so one drop pays for many batches:
- every point's newest value survives: the dropped rows' `current` rows are kept, one per
  point, and committed with the next transaction;
- telemetry rows (history) go oldest first, whole batches at a time; other events (device
  states, refusals, later proposals and actions) go only when no history is left to drop;
- the loss is recorded, not silent: one `BacklogDropped` event commits with the first successful
  transaction, taking the newest dropped rev, with the range, counts and time span; one log line
  when dropping starts and one when it is recorded.
Oldest first rather than thinning: the lost revs form one range that one event describes exactly,
the history closest to the recovery (what an operator and the policies look at next) stays
whole, and dropping whole batches from the front costs nothing per kept row, where thinning
would walk the backlog again at every drop and leave holes across the whole outage.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from gateway.errors import StoreError
from gateway.twin.schema import TELEMETRY, connect, is_corruption, write_transaction

log = logging.getLogger(__name__)

__all__ = [
    "BACKLOG_BYTES",
    "BACKLOG_DROPPED",
    "BACKLOG_ROWS",
    "ROW_BYTES",
    "ROW_PID",
    "ROW_QUALITY",
    "ROW_SOURCE_TS",
    "ROW_VALUE",
    "EventRow",
    "PruneResult",
    "TelemetryRow",
    "Writer",
]

# (rev, ts, pid, value, quality code, source_ts, reason): bound as-is by INSERT_TELEMETRY.
TelemetryRow = tuple[int, float, int, Any, int, "float | None", "str | None"]
# Positions in a TelemetryRow. The row stays a plain tuple (bound as-is, one allocation per
# accepted sample on the hot ingest path); these names keep readers off bare indexes.
ROW_PID: Final = 2
ROW_VALUE: Final = 3
ROW_QUALITY: Final = 4
ROW_SOURCE_TS: Final = 5
# (rev, ts, type, pid, asset_id, data JSON)
EventRow = tuple[int, float, str, "int | None", "str | None", str]

INSERT_TELEMETRY = (
    "INSERT INTO events(rev, ts, type, pid, value, quality, source_ts, reason) "
    f"VALUES (?, ?, '{TELEMETRY}', ?, ?, ?, ?, ?)"
)
INSERT_EVENT = "INSERT INTO events(rev, ts, type, pid, asset_id, data) VALUES (?, ?, ?, ?, ?, ?)"
UPSERT_CURRENT = (
    "INSERT INTO current(rev, ts, pid, value, quality, source_ts, reason) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(pid) DO UPDATE SET rev = excluded.rev, "
    "ts = excluded.ts, value = excluded.value, quality = excluded.quality, "
    "source_ts = excluded.source_ts, reason = excluded.reason"
)
DELETE_TELEMETRY = f"DELETE FROM events WHERE rev >= ? AND rev < ? AND type = '{TELEMETRY}'"
DELETE_OTHER = f"DELETE FROM events WHERE rev >= ? AND rev < ? AND type != '{TELEMETRY}'"

RETRY_MIN_S = 0.05
RETRY_MAX_S = 5.0
# Rows per multi-row INSERT statement (and the sizes that take the remainder). See MultiRowInsert.
ROWS_PER_STATEMENT = (1024, 128, 16, 4, 1)
# Rows deleted per prune transaction; between chunks the writer commits what was ingested.
PRUNE_CHUNK = 20_000
# The backlog bound (see the module docstring). 250,000 rows is ~4 minutes of 1,000 points
# changing every second, hours for the demo plant; 64 MiB caps it when values are long texts.
BACKLOG_ROWS = 250_000
BACKLOG_BYTES = 64 * 1024 * 1024
# Memory of one queued row besides its text (tuple, floats, ints; tracemalloc: ~224 bytes).
ROW_BYTES = 230
BACKLOG_DROPPED = "BacklogDropped"


@dataclass(slots=True)
class PruneResult:
    """What one `prune` removed and where the event log now starts."""

    history_rows: int = 0
    events: int = 0
    log_start_rev: int = 1


@dataclass(slots=True)
class _Command:
    kind: str  # "flush" | "prune" | "stop"
    arg: Any = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


@dataclass(slots=True)
class _Loss:
    """What the backlog bound has dropped since the last successful commit."""

    reason: str
    first_rev: int = 0
    last_rev: int = 0
    first_ts: float = 0.0
    last_ts: float = 0.0
    telemetry_rows: int = 0
    events: int = 0

    def note(
        self, first: tuple[Any, ...], last: tuple[Any, ...], telemetry: int, events: int
    ) -> None:
        """Count dropped rows whose oldest is `first` and newest `last` (rows start rev, ts)."""
        if not self.first_rev or first[0] < self.first_rev:
            self.first_rev, self.first_ts = first[0], first[1]
        if last[0] > self.last_rev:
            self.last_rev, self.last_ts = last[0], last[1]
        self.telemetry_rows += telemetry
        self.events += events

    def event_row(self, bound_rows: int, bound_bytes: int) -> EventRow:
        """The BacklogDropped event, taking the newest dropped rev."""
        data = {
            "first_rev": self.first_rev,
            "last_rev": self.last_rev,
            "telemetry_rows": self.telemetry_rows,
            "events": self.events,
            "from_ts": self.first_ts,
            "to_ts": self.last_ts,
            "reason": self.reason,
            "bound_rows": bound_rows,
            "bound_bytes": bound_bytes,
        }
        return (self.last_rev, self.last_ts, BACKLOG_DROPPED, None, None, json.dumps(data))


@dataclass(slots=True)
class _PruneJob:
    command: _Command
    planned: bool = False
    moved_start: bool = False
    log_start: int = 1  # the first rev the log keeps from now on
    # [lo, hi) rev ranges still to delete, and whether every type goes or only non-telemetry.
    ranges: list[tuple[int, int, bool]] = field(default_factory=list)
    result: PruneResult = field(default_factory=PruneResult)


class Writer:
    """Owns the write connection on its own thread; fed through `submit_*`."""

    def __init__(
        self,
        path: str | Path,
        *,
        committed_rev: int,
        log_start_rev: int,
        flush_interval_s: float,
        flush_rows: int,
        history_s: float,
        events_s: float,
        backlog_rows: int = BACKLOG_ROWS,
        backlog_bytes: int = BACKLOG_BYTES,
    ) -> None:
        if backlog_rows < flush_rows or backlog_bytes < ROW_BYTES * flush_rows:
            raise ValueError("the backlog bound must hold at least flush_rows rows")
        self.path = Path(path)
        self.committed_rev = committed_rev
        self.log_start_rev = log_start_rev
        self.error: BaseException | None = None
        self.failing_since: float | None = None  # wall time of the first failed commit
        # The first corruption SQLite reported; it stays: a commit that works after it does not
        # mean the damaged pages are gone (the next start's quick_check decides).
        self.corruption: BaseException | None = None
        self.batches = 0
        self.rows_written = 0
        self.current_rows_written = 0
        self.failures = 0
        self.dropped_rows = 0  # telemetry rows dropped at the backlog bound since start
        self.dropped_events = 0  # other events dropped there
        self.backlog_rows = backlog_rows
        self.backlog_bytes = backlog_bytes
        self._flush_interval = flush_interval_s
        self._flush_rows = flush_rows
        self._history_s = history_s
        self._events_s = events_s
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._conn: sqlite3.Connection | None = None
        self._thread = threading.Thread(target=self._run, name="twin-writer", daemon=True)
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._max_pages = 0  # the connection's own max_page_count, restored after a test limit
        # Gathered, not yet committed.
        self._telemetry: deque[list[TelemetryRow]] = deque()
        self._events: deque[EventRow] = deque()
        self._pending_rows = 0
        self._pending_bytes = 0
        self._pending_top = committed_rev
        # Newest row per point among dropped telemetry, and what was dropped (see _shed).
        self._kept_current: dict[int, TelemetryRow] = {}
        self._loss: _Loss | None = None
        self._prune: _PruneJob | None = None

    @property
    def pending_rows(self) -> int:
        """Rows taken from the queue and not committed yet (the backlog while commits fail)."""
        return self._pending_rows

    @property
    def pending_bytes(self) -> int:
        """The backlog's estimated memory."""
        return self._pending_bytes

    # -- called from other threads ----------------------------------------------------------------

    def start(self) -> None:
        """Open the write connection on the writer thread; raise if that fails."""
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            cause = self._start_error
            raise StoreError(f"{self.path}: cannot start the twin writer: {cause}") from cause

    def submit_telemetry(self, rows: list[TelemetryRow]) -> None:
        """Queue one ingested batch (revs ascending, above everything queued before)."""
        self._queue.put(rows)

    def submit_event(self, row: EventRow) -> None:
        """Queue one generic event."""
        self._queue.put(row)

    def flush(self, target_rev: int, timeout: float) -> None:
        """Block until `target_rev` is committed; StoreError if a commit fails or time runs out."""
        with self._cond:
            if self.committed_rev >= target_rev:
                return
            failures = self.failures
        self._queue.put(_Command("flush"))
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.committed_rev < target_rev:
                if self.failures > failures:
                    raise StoreError(
                        f"{self.path}: twin writer cannot commit (committed rev "
                        f"{self.committed_rev}, waiting for {target_rev}): {self.error}"
                    ) from self.error
                if not self._thread.is_alive():
                    raise StoreError(f"{self.path}: twin writer has stopped") from self.error
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreError(
                        f"{self.path}: twin writer did not commit rev {target_rev} within "
                        f"{timeout:g} s (committed {self.committed_rev})"
                        + (f"; last error: {self.error}" if self.error else "")
                    ) from self.error
                self._cond.wait(min(remaining, 0.5))

    def prune(self, now: float, timeout: float) -> PruneResult:
        """Run retention on the writer thread and wait for it."""
        command = _Command("prune", now)
        self._queue.put(command)
        if not command.done.wait(timeout):
            raise StoreError(f"{self.path}: prune did not finish within {timeout:g} s")
        if command.error is not None:
            raise StoreError(f"{self.path}: prune failed: {command.error}") from command.error
        result: PruneResult = command.result
        return result

    def limit_growth(self, pages: int | None, timeout: float = 10.0) -> int:
        """Let the database grow by at most `pages` pages (None: no limit); return the cap.

        Commits that need more space fail with SQLite's own SQLITE_FULL, as on a full disk:
        this is how tests fill the disk without root or a small file system.
        """
        command = _Command("pages", pages)
        self._queue.put(command)
        if not command.done.wait(timeout):
            raise StoreError(f"{self.path}: the writer did not answer within {timeout:g} s")
        if command.error is not None:
            raise StoreError(
                f"{self.path}: cannot limit growth: {command.error}"
            ) from command.error
        return int(command.result)

    def stop(self, timeout: float) -> None:
        """Commit everything queued, stop the thread and close the connection."""
        if not self._thread.is_alive():
            return
        command = _Command("stop")
        self._queue.put(command)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise StoreError(f"{self.path}: twin writer did not stop within {timeout:g} s")
        if command.error is not None:
            raise StoreError(
                f"{self.path}: twin store closed with uncommitted changes after rev "
                f"{self.committed_rev}: {command.error}"
            ) from command.error

    # -- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._conn = connect(self.path)
            self._max_pages = int(self._conn.execute("PRAGMA max_page_count").fetchone()[0])
            self._insert_telemetry = MultiRowInsert(self._conn, INSERT_TELEMETRY)
            self._upsert_current = MultiRowInsert(self._conn, UPSERT_CURRENT)
        except BaseException as exc:
            self._start_error = exc
            self._started.set()
            return
        self._started.set()
        try:
            self._loop()
        except BaseException as exc:
            # A bug, not a database failure (those are caught per commit): say so loudly and
            # let every waiter fail with it instead of hanging.
            log.critical(
                "%s: twin writer thread crashed; nothing more will be committed",
                self.path,
                exc_info=True,
            )
            self.error = exc
        finally:
            self._conn.close()
            with self._cond:
                self._cond.notify_all()

    def _loop(self) -> None:
        get = self._queue.get
        monotonic = time.monotonic
        retry_at = 0.0
        retry_delay = RETRY_MIN_S
        deadline = 0.0
        stop: _Command | None = None
        while True:
            force = False
            if self._prune is not None and not self.error:
                wait: float | None = 0.0
            elif self._pending_rows or self._loss:
                wait = max((retry_at if self.error else deadline) - monotonic(), 0.0)
            else:
                wait = None
            try:
                item = get(timeout=wait) if wait is not None else get()
            except queue.Empty:
                item = None
            if item is not None:
                kind = type(item)
                if kind is list or kind is tuple:
                    if not self._pending_rows:
                        deadline = monotonic() + self._flush_interval
                    if kind is list:
                        self._telemetry.append(item)
                        self._pending_rows += len(item)
                        # Text lengths count only while commits fail (only then can the backlog
                        # grow; _fail recounts what is pending): the healthy path stays cheap.
                        self._pending_bytes += (
                            _batch_bytes(item) if self.error else len(item) * ROW_BYTES
                        )
                        self._pending_top = item[-1][0]
                    else:
                        self._events.append(item)
                        self._pending_rows += 1
                        self._pending_bytes += ROW_BYTES + len(item[5])
                        self._pending_top = item[0]
                    if (
                        self._pending_rows > self.backlog_rows
                        or self._pending_bytes > self.backlog_bytes
                    ):
                        self._shed()
                    # While commits fail, only the backoff decides when to try again: retrying at
                    # every batch would rewrite the whole growing backlog each time.
                    if self.error is not None:
                        if monotonic() < retry_at:
                            continue
                    elif self._pending_rows < self._flush_rows and monotonic() < deadline:
                        continue
                else:
                    force = True
                    if item.kind == "stop":
                        stop = item
                    elif item.kind == "prune":
                        self._request_prune(item)
                    elif item.kind == "pages":
                        self._limit_pages(item)
            if (self._pending_rows or self._loss) and (
                force
                or monotonic() >= (retry_at if self.error else deadline)
                or (self.error is None and self._pending_rows >= self._flush_rows)
            ):
                if self._commit():
                    retry_delay = RETRY_MIN_S
                else:
                    retry_at = monotonic() + retry_delay
                    retry_delay = min(retry_delay * 2, RETRY_MAX_S)
            if self._prune is not None and not self._pending_rows and not self.error:
                self._prune_step()
            if stop is not None:
                if self._prune is not None:
                    self._finish_prune(StoreError("the store closed during prune"))
                if self._pending_rows or self._loss:
                    stop.error = self.error
                    log.error(
                        "%s: twin store closing with uncommitted revs %d..%d (%d rows; %d more "
                        "dropped at the backlog bound): %s",
                        self.path,
                        self.committed_rev + 1,
                        self._pending_top,
                        self._pending_rows,
                        self.dropped_rows + self.dropped_events,
                        self.error,
                    )
                stop.done.set()
                return

    def _commit(self) -> bool:
        conn = self._conn
        assert conn is not None
        telemetry, events, loss = self._telemetry, self._events, self._loss
        try:
            with write_transaction(conn):
                latest = self._kept_current
                if telemetry:
                    rows = list(itertools.chain.from_iterable(telemetry))
                    self._insert_telemetry.write(conn, rows)
                    # One current row per point per transaction, the newest (revs ascend).
                    newest = {row[2]: row for row in rows}
                    latest = {**latest, **newest} if latest else newest
                if latest:
                    self._upsert_current.write(conn, list(latest.values()))
                    self.current_rows_written += len(latest)
                if events:
                    conn.executemany(INSERT_EVENT, events)
                if loss is not None:
                    conn.execute(
                        INSERT_EVENT, loss.event_row(self.backlog_rows, self.backlog_bytes)
                    )
        except Exception as exc:
            self._fail(exc, "commit")
            return False
        self.batches += 1
        self.rows_written += self._pending_rows + (loss is not None)
        self._telemetry, self._events = deque(), deque()
        self._pending_rows = self._pending_bytes = 0
        self._kept_current, self._loss = {}, None
        with self._cond:
            self.committed_rev = self._pending_top
            if loss is not None:
                log.warning(
                    "%s: twin writer recovered; committed up to rev %d. While it could not "
                    "commit (%s), %d history rows and %d events (revs %d..%d) were dropped at "
                    "the backlog bound; current values were kept. Recorded as %s event rev %d",
                    self.path,
                    self._pending_top,
                    loss.reason,
                    loss.telemetry_rows,
                    loss.events,
                    loss.first_rev,
                    loss.last_rev,
                    BACKLOG_DROPPED,
                    loss.last_rev,
                )
            elif self.error is not None:
                log.warning(
                    "%s: twin writer recovered; committed up to rev %d",
                    self.path,
                    self._pending_top,
                )
            self.error = None
            self.failing_since = None
            self._cond.notify_all()
        return True

    def _fail(self, exc: BaseException, what: str) -> None:
        with self._cond:
            if self.error is None:
                log.error(
                    "%s: twin writer %s failed, keeping %d rows in memory (at most %d rows or "
                    "%d MiB; beyond that the oldest history is dropped) and retrying: %s",
                    self.path,
                    what,
                    self._pending_rows,
                    self.backlog_rows,
                    self.backlog_bytes // (1024 * 1024),
                    exc,
                )
                self.failing_since = time.time()
                self._recount_bytes()
            if self.corruption is None and is_corruption(exc):
                self.corruption = exc
                log.critical("%s: SQLite reports the twin database is corrupt: %s", self.path, exc)
            self.error = exc
            self.failures += 1
            self._cond.notify_all()

    def _shed(self) -> None:
        """Drop the oldest history (then other events) to 90 % of the bound; see the docstring."""
        rows_goal = self.backlog_rows * 9 // 10
        bytes_goal = self.backlog_bytes * 9 // 10
        if self.error is None:
            self._recount_bytes()  # counted without text while healthy
        loss = self._loss
        if loss is None:
            reason = str(self.error) if self.error is not None else "commits too slow"
            loss = self._loss = _Loss(reason)
            log.warning(
                "%s: %d uncommitted rows (~%d MiB) reached the backlog bound (%d rows or %d MiB) "
                "while the twin writer cannot commit (%s): dropping the oldest history rows, "
                "keeping every point's current value; the loss is recorded when it recovers",
                self.path,
                self._pending_rows,
                self._pending_bytes // (1024 * 1024),
                self.backlog_rows,
                self.backlog_bytes // (1024 * 1024),
                reason,
            )
        telemetry, kept = self._telemetry, self._kept_current
        while telemetry and (self._pending_rows > rows_goal or self._pending_bytes > bytes_goal):
            batch = telemetry.popleft()
            self._pending_rows -= len(batch)
            self._pending_bytes -= _batch_bytes(batch)
            for row in batch:
                kept[row[2]] = row
            loss.note(batch[0], batch[-1], len(batch), 0)
            self.dropped_rows += len(batch)
        events = self._events
        while events and (self._pending_rows > rows_goal or self._pending_bytes > bytes_goal):
            event = events.popleft()
            self._pending_rows -= 1
            self._pending_bytes -= ROW_BYTES + len(event[5])
            loss.note(event, event, 0, 1)
            self.dropped_events += 1

    def _recount_bytes(self) -> None:
        self._pending_bytes = sum(map(_batch_bytes, self._telemetry)) + sum(
            ROW_BYTES + len(event[5]) for event in self._events
        )

    def _limit_pages(self, command: _Command) -> None:
        conn = self._conn
        assert conn is not None
        try:
            if command.arg is None:
                pages = self._max_pages
            else:
                pages = int(conn.execute("PRAGMA page_count").fetchone()[0]) + int(command.arg)
            command.result = conn.execute(f"PRAGMA max_page_count={int(pages)}").fetchone()[0]
        except Exception as exc:
            command.error = exc
        command.done.set()

    # -- retention --------------------------------------------------------------------------------

    def _request_prune(self, command: _Command) -> None:
        if self._prune is not None:
            command.error = StoreError("a prune is already running")
            command.done.set()
            return
        # Planned in the first step, once everything queued before it is committed: a row still
        # in memory must not be mistaken for a missing one.
        self._prune = _PruneJob(command)

    def _plan_prune(self, job: _PruneJob) -> None:
        conn = self._conn
        assert conn is not None
        now = float(job.command.arg)
        top = self.committed_rev
        first = conn.execute("SELECT min(rev) FROM events").fetchone()[0] or top + 1
        events_cut = now - self._events_s
        # Telemetry rows are history too: they stay while either retention still wants them.
        rows_cut = min(events_cut, now - self._history_s)
        old_start = max(self.log_start_rev, first)
        log_start = max(self._first_rev_at(old_start, events_cut, top), self.log_start_rev)
        delete_below = min(self._first_rev_at(first, rows_cut, top), log_start)
        job.log_start = log_start
        job.result.log_start_rev = log_start
        # Below `delete_below` every row goes; from there to the new log start only the
        # non-telemetry events (already gone below the old start).
        job.ranges = [(first, delete_below, True), (max(old_start, delete_below), log_start, False)]
        job.planned = True

    def _first_rev_at(self, start: int, cut: float, top: int) -> int:
        # The log is kept as a contiguous suffix: everything before the first event at or after
        # `cut` goes, so a clock step backwards cannot punch holes into it.
        assert self._conn is not None
        row = self._conn.execute(
            "SELECT rev FROM events WHERE rev >= ? AND ts >= ? ORDER BY rev LIMIT 1", (start, cut)
        ).fetchone()
        return int(row[0]) if row else top + 1

    def _prune_step(self) -> None:
        job = self._prune
        conn = self._conn
        assert job is not None and conn is not None
        try:
            if not job.planned:
                self._plan_prune(job)
            while job.ranges and job.ranges[0][0] >= job.ranges[0][1]:
                job.ranges.pop(0)
            with write_transaction(conn):
                if not job.moved_start:
                    # The log start moves first, so a reader never sees a half-deleted log:
                    # a cursor below it gets "expired", never a gap.
                    conn.execute(
                        "UPDATE meta SET value = ? WHERE key = 'log_start_rev'", (job.log_start,)
                    )
                if job.ranges:
                    lo, hi, every_type = job.ranges[0]
                    upto = min(lo + PRUNE_CHUNK, hi)
                    if every_type:
                        job.result.history_rows += conn.execute(
                            DELETE_TELEMETRY, (lo, upto)
                        ).rowcount
                    job.result.events += conn.execute(DELETE_OTHER, (lo, upto)).rowcount
                    job.ranges[0] = (upto, hi, every_type)
        except Exception as exc:
            self._finish_prune(exc)
            return
        if not job.moved_start:
            job.moved_start = True
            self.log_start_rev = job.log_start
        if not any(lo < hi for lo, hi, _ in job.ranges):
            self._finish_prune(None)

    def _finish_prune(self, error: BaseException | None) -> None:
        job, self._prune = self._prune, None
        assert job is not None
        job.command.error = error
        job.command.result = job.result
        job.command.done.set()


class MultiRowInsert:
    """One INSERT written as `VALUES (…), (…), …` statements of up to 1,024 rows each.

    `executemany` steps SQLite once per row and releases the GIL around every step. When another
    thread is busy in Python (the event loop in a burst), getting the GIL back takes up to the
    switch interval (5 ms), so a per-row writer crawls: measured ~1,300 rows/s against a thread
    spinning in Python, versus ~30,000 rows/s with these statements (about 13 steps per 5,000
    rows). Without contention both run at the same speed (bench/ingest.py).
    """

    def __init__(self, conn: sqlite3.Connection, sql: str) -> None:
        head, values, tail = _split_values(sql)
        width = values.count("?")
        # Old SQLite builds allow only 999 parameters per statement.
        limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        sizes = sorted({min(n, max(limit // width, 1)) for n in ROWS_PER_STATEMENT}, reverse=True)
        self._width = width
        self._plans = [(n, f"{head} VALUES {', '.join([values] * n)}{tail}") for n in sizes]

    def write(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        """Insert every row, in order."""
        done, total = 0, len(rows)
        for size, sql in self._plans:
            count = (total - done) // size * size
            if not count:
                continue
            if size == 1:
                conn.executemany(sql, rows[done : done + count])
            else:
                flat = list(itertools.chain.from_iterable(rows[done : done + count]))
                step = size * self._width
                conn.executemany(sql, [flat[i : i + step] for i in range(0, len(flat), step)])
            done += count


def _batch_bytes(rows: list[TelemetryRow]) -> int:
    """Estimated memory of one telemetry batch: the rows plus their text values."""
    size = len(rows) * ROW_BYTES
    for row in rows:
        value = row[3]
        if type(value) is str or type(value) is bytes:
            size += len(value)
    return size


def _split_values(sql: str) -> tuple[str, str, str]:
    """`INSERT … VALUES (?, …) rest` → ("INSERT …", "(?, …)", " rest")."""
    head, _, rest = sql.partition(" VALUES ")
    close = rest.index(")") + 1
    return head, rest[:close], rest[close:]
