"""The single SQLite writer thread: every twin write goes through its queue, in rev order.

The store puts whole lists of telemetry rows (one list per ingested batch), single generic-event
rows and commands on one `queue.SimpleQueue`; `put` never blocks, so the event loop never waits
on SQLite. The thread gathers rows for `flush_interval_s` or until `flush_rows`, then writes them
in one transaction: each run of consecutive telemetry revs as one compressed frame (`codec.py`),
each other event as a row. A commit appends to the end of one b-tree per table, so its cost does
not depend on how much history there is (see `schema.py` for the layout and why).

Between commits the thread also does the slower upkeep, each step short so ingest never waits
long (and only while commits succeed):
- compaction: once the uncompacted frames hold `compact_rows` samples or the oldest is
  `compact_s` old, their rows are regrouped into one block per point (read, sorted by point,
  encoded a few thousand points per step), then written in one transaction with the new
  `compacted_rev` and a snapshot of every point's current value;
- the event-log window, in the same transaction: frames already compacted, older than
  `log_window_s` (in data time: the newest committed ts minus the frame's), and behind every
  consumer's hold (`log_holds`) are deleted and `log_start_rev` moves past them; a hold that would
  keep the frames above `log_max_bytes` loses (its consumer's cursor expires, said in the log);
- retention (`prune`, on request): blocks older than `history_s` are folded into time buckets
  (`rollup.py`) and deleted in the same transaction, buckets older than `rollup_keep_s` and
  non-telemetry events older than `events_s` deleted, in chunks;
- the size bound (`max_bytes`, checked every few seconds and as frames are written): above it,
  the oldest blocks go first (folded into buckets as retention does), then the oldest buckets,
  then the oldest events (not those a consumer's hold still needs, unless
  `bound_drops_unsynced`), until the pages in use are at 90 % of the bound. Never the current
  values, never frames (the event log has its own bound). What went is logged and reported once
  per episode through `on_bound` (the store records it as a `StorageBoundReached` event);
- after each retention or bound step, a few thousand free pages are given back to the file
  system (`PRAGMA incremental_vacuum`, the database is in auto_vacuum=INCREMENTAL), so the file
  shrinks without a VACUUM that would rewrite it whole.

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

import bisect
import collections
import itertools
import json
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, Final

import numpy as np

from gateway.errors import StoreError
from gateway.twin import codec, rollup
from gateway.twin.schema import (
    CACHE_MIN_KIB,
    connect,
    is_corruption,
    page_bytes,
    write_transaction,
)

log = logging.getLogger(__name__)

__all__ = [
    "BACKLOG_BYTES",
    "BACKLOG_DROPPED",
    "BACKLOG_ROWS",
    "COMMIT_BUCKETS_S",
    "MB",
    "ROW_BYTES",
    "ROW_PID",
    "ROW_QUALITY",
    "ROW_SOURCE_TS",
    "ROW_VALUE",
    "STORAGE_BOUND",
    "EventRow",
    "PruneResult",
    "TelemetryRow",
    "Writer",
]

# (rev, ts, pid, value, quality code, source_ts, reason): what ingest accepted, one per sample;
# the codec's type, so that frames and blocks take the rows as they are.
TelemetryRow = codec.TelemetryRow
# Positions in a TelemetryRow. The row stays a plain tuple (bound as-is, one allocation per
# accepted sample on the hot ingest path); these names keep readers off bare indexes.
ROW_PID: Final = 2
ROW_VALUE: Final = 3
ROW_QUALITY: Final = 4
ROW_SOURCE_TS: Final = 5
# (rev, ts, type, pid, asset_id, data JSON)
EventRow = tuple[int, float, str, "int | None", "str | None", str]

INSERT_FRAME = (
    "INSERT INTO frames(rev0, rev1, t0, t1, n, nbytes, body) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
INSERT_BLOCK = "INSERT INTO blocks(pid, t0, t1, rev0, rev1, n, body) VALUES (?, ?, ?, ?, ?, ?, ?)"
INSERT_EVENT = "INSERT INTO events(rev, ts, type, pid, asset_id, data) VALUES (?, ?, ?, ?, ?, ?)"
UPSERT_CURRENT = (
    "INSERT INTO current(rev, ts, pid, value, quality, source_ts, reason) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(pid) DO UPDATE SET rev = excluded.rev, "
    "ts = excluded.ts, value = excluded.value, quality = excluded.quality, "
    "source_ts = excluded.source_ts, reason = excluded.reason"
)
SET_META = "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)"

RETRY_MIN_S = 0.05
RETRY_MAX_S = 5.0
# Rows per multi-row INSERT statement (and the sizes that take the remainder). See MultiRowInsert.
ROWS_PER_STATEMENT = (1024, 128, 16, 4, 1)
# Rows deleted per prune transaction; between chunks the writer commits what was ingested.
PRUNE_CHUNK = 20_000
# Blocks folded into buckets and deleted per step (retention, size bound). Decoding costs ~0.1 ms
# a block whatever its size, so the step is bounded in blocks: with 400 a step held commits up
# to 120-290 ms (bench/retention.py); with 100, ~40 ms, for ~15 % more retention CPU.
RETIRE_CHUNK = 100
# Bucket rows (one point, one hour: ~1 KiB) deleted per step.
ROLLUP_CHUNK = 500
# Free pages given back to the file system after a retention or bound step (4 KiB pages).
VACUUM_PAGES = 4096
# The size bound: checked this often, and whenever frames grew by 1/200 of it; when above it,
# rows go until the pages in use are at BOUND_TARGET of it.
BOUND_CHECK_S = 5.0
BOUND_TARGET = 0.9
STORAGE_BOUND = "StorageBoundReached"
# Upper bounds (seconds) of the commit-latency histogram /metrics exposes; one more slot counts
# the commits above the last.
COMMIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
MB = 1024 * 1024  # as storage.max_db_mb counts
# Compaction: when the oldest uncompacted frame was committed this many seconds ago, or the
# frames hold this many samples. Seconds: blocks of 300 samples of a point polled every second
# (bench/codec.py: 8.4 bytes a sample in blocks of 60, 7.3 in 300, 7.0 in 600), and at most
# this much history that a query decodes frame by frame (~0.07 us a row). Rows: a bound for
# fast plants (20,000 changes/s: a compaction every 50 s), equal to COMPACT_CACHE_ROWS so that
# every compaction decodes its frames once: at 3,000,000 the groups re-read them, steps took
# up to 3.9 s and changes waited up to 21 s for their commit (bench/sync.py --soak-minutes 4).
COMPACT_S = 300.0
COMPACT_ROWS = 1_000_000
# Samples regrouped per compaction step (a range of points): what one step holds in memory,
# ~40 bytes a sample while regrouped. Each step writes its blocks in its own transaction;
# between steps the writer commits what was ingested.
COMPACT_GROUP_ROWS = 500_000
# Up to this many samples, a compaction decodes its frames once, LOAD_STEP_ROWS a step, keeps
# them sorted by point (~40 bytes a sample), and then encodes COMPACT_STEP_ROWS a step: no step
# takes more than ~0.1 s on a small box, where re-reading the frames for each 500,000-sample
# group made steps of ~1 s during which nothing was committed (bench/sync.py's soak). Beyond
# it (fast plants), every group re-reads the frames, in groups of COMPACT_GROUP_ROWS.
COMPACT_CACHE_ROWS = 1_000_000
COMPACT_STEP_ROWS = 100_000
LOAD_STEP_ROWS = 200_000
PID_END = 2**62  # above every pid: the last group of a compaction ends here
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

    history_rows: int = 0  # raw samples moved into buckets
    rollup_rows: int = 0  # bucket rows (one point, one hour) older than rollup_keep_s
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
    # What is left to delete: blocks with id < blocks_below, events with rev < events_below.
    block_from: int = 0
    blocks_below: int = 0
    rollup_from: int = 0
    rollups_below: int = 0
    event_from: int = 0
    events_below: int = 0
    result: PruneResult = field(default_factory=PruneResult)


@dataclass(slots=True)
class _BoundJob:
    """One episode above the size bound: what was removed, for the log and the event."""

    bound: int
    used_before: int
    used: int = 0
    history_rows: int = 0
    history_from_ts: float | None = None
    history_to_ts: float | None = None
    rollup_rows: int = 0
    rollup_to_ts: float | None = None
    events: int = 0
    events_below_rev: int = 0
    exhausted: bool = False

    def report(self) -> dict[str, Any]:
        """The StorageBoundReached event's data."""
        return {
            "bound_bytes": self.bound,
            "used_bytes_before": self.used_before,
            "used_bytes_after": self.used,
            "history_rows": self.history_rows,
            "history_from_ts": self.history_from_ts,
            "history_to_ts": self.history_to_ts,
            "rollup_rows": self.rollup_rows,
            "rollup_to_ts": self.rollup_to_ts,
            "events": self.events,
            "events_below_rev": self.events_below_rev,
            "nothing_left": self.exhausted,
        }


@dataclass(slots=True)
class _CompactJob:
    """One compaction in progress: frames (start, cut] regrouped by point, a pid range a step."""

    start: int  # compacted_rev when it began
    cut: int  # every frame with start < rev0 <= cut is compacted
    groups: list[tuple[int, int]]  # [lo, hi) pid ranges, one step each
    rows: int  # samples in those frames, as counted when planning
    # The frames decoded once (see COMPACT_CACHE_ROWS): None when they are re-read per group.
    # Each load step's rows sorted by pid (rev order within a pid; the chunks in rev order).
    loaded: list[codec.Columns] | None = None
    load_after: int = 0  # frames with rev0 above this are still to be loaded
    all_loaded: bool = False
    done: int = 0  # groups written
    blocks: int = 0
    written: int = 0  # samples written into blocks


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
        log_window_s: float,
        log_max_bytes: int,
        cache_kib: int = CACHE_MIN_KIB,
        backlog_rows: int = BACKLOG_ROWS,
        backlog_bytes: int = BACKLOG_BYTES,
        rollup_s: float = 60.0,
        rollup_keep_s: float = 365 * 86400.0,
        max_bytes: int | None = None,
        bound_drops_unsynced: bool = False,
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
        self.commit_seconds = 0.0  # spent in successful commits (encode + transaction)
        self.commit_histogram = [0] * (len(COMMIT_BUCKETS_S) + 1)  # commits per latency bucket
        # The longest upkeep step (compaction, retention, size bound) since start: while one
        # runs nothing is committed, so this is the longest such stall.
        self.longest_step_s = 0.0
        self.rows_written = 0
        self.frames_written = 0
        self.frame_bytes_written = 0
        self.current_rows_written = 0
        self.compactions = 0
        self.blocks_written = 0
        self.failures = 0
        self.dropped_rows = 0  # telemetry rows dropped at the backlog bound since start
        self.dropped_events = 0  # other events dropped there
        self.backlog_rows = backlog_rows
        self.backlog_bytes = backlog_bytes
        self.log_window_s = log_window_s
        self.log_max_bytes = log_max_bytes
        self._cache_kib = cache_kib
        self._flush_interval = flush_interval_s
        self._flush_rows = flush_rows
        self._history_s = history_s
        self._events_s = events_s
        self.rollup_s = rollup_s
        self._rollup_keep_s = rollup_keep_s
        # The size bound (see the module docstring); None: no bound.
        self.max_bytes = max_bytes
        self._bound_drops_unsynced = bound_drops_unsynced
        self._bound: _BoundJob | None = None
        self._bound_checked = 0.0  # monotonic time of the last check
        self._bound_checked_bytes = 0  # frame_bytes_written then
        self.bound_exhausted = False  # said once that nothing is left to remove
        self.file_bytes = 0  # the database file, as last measured (pages)
        self.used_bytes = 0  # its pages in use
        self.bound_episodes = 0
        self.bound_history_rows = 0  # raw samples moved into buckets at the bound
        self.bound_rollup_rows = 0
        self.bound_events = 0
        self.retired_rows = 0  # raw samples folded into buckets (retention and bound)
        # Called on this thread once per bound episode with what went (the store appends the
        # event); must not raise.
        self.on_bound: Callable[[dict[str, Any]], None] | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Called on this thread after each commit with the new committed rev (the store's
        # CommitSignal wakes the event loop with it); must be quick and must not raise.
        self.on_commit: Callable[[int], None] | None = None
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
        # The frames (read from the database at start, then kept up to date by each commit).
        self.compacted_rev = 0
        self._uncompacted_rows = 0
        self._uncompacted_since = 0.0  # monotonic time the oldest uncompacted frame committed
        self._frames_top = 0  # rev1 of the newest committed frame
        self._newest_ts = float("-inf")  # data time: the newest committed frame's t1
        self.log_bytes = 0  # body bytes of every frame kept
        # Every point's newest committed row since the last current snapshot.
        self._changed: dict[int, TelemetryRow] = {}
        # Samples per pid in the uncompacted frames, counted as they commit, so that planning a
        # compaction need not decode every frame an extra time; None when not known (frames
        # left by the previous run).
        self._pid_counts: collections.Counter[int] | None = None
        self._compact: _CompactJob | None = None
        self._compact_waiters: list[_Command] = []
        self._compact_for_bound = False  # the size bound wants the frames compacted now

    @property
    def pending_rows(self) -> int:
        """Rows taken from the queue and not committed yet (the backlog while commits fail)."""
        return self._pending_rows

    @property
    def pending_bytes(self) -> int:
        """The backlog's estimated memory."""
        return self._pending_bytes

    @property
    def queued(self) -> int:
        """Batches and commands waiting in the writer's queue (approximate, as qsize is)."""
        return self._queue.qsize()

    @property
    def uncompacted_rows(self) -> int:
        """Committed samples still only in frames."""
        return self._uncompacted_rows

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
        """Queue one ingested batch (revs ascending and consecutive, above everything queued)."""
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
        result: PruneResult = self._call("prune", now, timeout)
        return result

    def compact(self, timeout: float) -> int:
        """Compact every committed frame now (and trim the log); return the compacted rev."""
        return int(self._call("compact", None, timeout))

    def hold(self, name: str, rev: int | None, timeout: float = 10.0) -> None:
        """Set (or with None, drop) consumer `name`'s hold on the event log after `rev`."""
        self._call("hold", (name, rev), timeout)

    def limit_growth(self, pages: int | None, timeout: float = 10.0) -> int:
        """Let the database grow by at most `pages` pages (None: no limit); return the cap.

        Commits that need more space fail with SQLite's own SQLITE_FULL, as on a full disk:
        this is how tests fill the disk without root or a small file system.
        """
        return int(self._call("pages", pages, timeout))

    def stop(self, timeout: float) -> None:
        """Commit everything queued, snapshot current values, stop the thread, close."""
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

    def _call(self, kind: str, arg: Any, timeout: float) -> Any:
        command = _Command(kind, arg)
        self._queue.put(command)
        if not command.done.wait(timeout):
            raise StoreError(f"{self.path}: {kind} did not finish within {timeout:g} s")
        if command.error is not None:
            raise StoreError(f"{self.path}: {kind} failed: {command.error}") from command.error
        return command.result

    # -- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._conn = connect(self.path, cache=self._cache_kib)
            self._max_pages = int(self._conn.execute("PRAGMA max_page_count").fetchone()[0])
            self._upsert_current = MultiRowInsert(self._conn, UPSERT_CURRENT)
            self._insert_blocks = MultiRowInsert(self._conn, INSERT_BLOCK)
            # Blocks a compaction left unfinished are ignored by readers (past the watermark)
            # and dropped when the next compaction plans (_plan_compaction).
            self._read_frames_state()
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
            for waiter in self._compact_waiters:
                waiter.error = exc
                waiter.done.set()
        finally:
            self._conn.close()
            with self._cond:
                self._cond.notify_all()

    def _read_frames_state(self) -> None:
        conn = self._conn
        assert conn is not None
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        self.compacted_rev = int(meta.get("compacted_rev", 0))
        n, nbytes, top, newest = conn.execute(
            "SELECT coalesce(sum(CASE WHEN rev0 > ? THEN n END), 0), coalesce(sum(nbytes), 0), "
            "coalesce(max(rev1), 0), max(t1) FROM frames",
            (self.compacted_rev,),
        ).fetchone()
        self._uncompacted_rows = int(n)
        self._pid_counts = collections.Counter() if not n else None
        self._uncompacted_since = time.monotonic()
        self.log_bytes = int(nbytes)
        self._frames_top = int(top)
        self._newest_ts = float(newest) if newest is not None else float("-inf")
        self.file_bytes, self.used_bytes = page_bytes(conn)

    def _loop(self) -> None:
        get = self._queue.get
        monotonic = time.monotonic
        retry_at = 0.0
        retry_delay = RETRY_MIN_S
        deadline = 0.0
        stop: _Command | None = None
        while True:
            force = False
            if self._pending_rows or self._loss:
                wait: float | None = max((retry_at if self.error else deadline) - monotonic(), 0.0)
            elif (
                self._prune is not None or self._bound is not None or self._compact_due()
            ) and not self.error:
                wait = 0.0  # upkeep to do: take what is queued, then do a step
            else:
                # Idle: wake up for a compaction that comes due by age, and to check the size
                # bound after the last commits.
                wait = COMPACT_S if self._uncompacted_rows else None
                if self.max_bytes is not None and self._bound_checked_bytes != (
                    self.frame_bytes_written + self.rows_written
                ):
                    wait = min(wait or BOUND_CHECK_S, BOUND_CHECK_S)
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
                    elif item.kind == "compact":
                        self._compact_waiters.append(item)
                    elif item.kind == "pages":
                        self._limit_pages(item)
                    elif item.kind == "hold":
                        self._hold(item)
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
            if not self._pending_rows and not self.error:
                began = time.perf_counter()
                if self._compact is not None or self._compact_due():
                    self._compact_step()
                elif self._bound is not None or self._bound_due():
                    self._bound_step()
                elif self._prune is not None:
                    self._prune_step()
                self.longest_step_s = max(self.longest_step_s, time.perf_counter() - began)
            if stop is not None:
                if self._prune is not None:
                    self._finish_prune(StoreError("the store closed during prune"))
                if not self._pending_rows and not self.error:
                    # A clean stop leaves a fresh current snapshot: the next open replays nothing.
                    self._snapshot_current()
                self._answer_compact_waiters(StoreError("the store closed during compaction"))
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
        telemetry, events, loss, kept = (
            self._telemetry,
            self._events,
            self._loss,
            self._kept_current,
        )
        started = time.perf_counter()
        try:
            # Encoded inside the try: a row the codec cannot take fails this commit like a
            # database error would (reported, retried, shed at the backlog bound), rather than
            # ending the thread.
            frames = [_frame(run) for run in _runs(telemetry)]
            with write_transaction(conn):
                if frames:
                    conn.executemany(INSERT_FRAME, frames)
                if kept:
                    # Rows dropped at the backlog bound: their revs are gone, but every point's
                    # newest value of them is not (see the module docstring).
                    self._upsert_current.write(conn, list(kept.values()))
                    self.current_rows_written += len(kept)
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
        # Encoding and the transaction, for /metrics: a sum and a histogram.
        took = time.perf_counter() - started
        self.commit_seconds += took
        self.commit_histogram[bisect.bisect_left(COMMIT_BUCKETS_S, took)] += 1
        self.rows_written += self._pending_rows + (loss is not None)
        if frames:
            if not self._uncompacted_rows:
                self._uncompacted_since = time.monotonic()
            changed, counts = self._changed, self._pid_counts
            for batch in telemetry:
                for row in batch:
                    changed[row[2]] = row
                if counts is not None:
                    counts.update(map(itemgetter(2), batch))
            for frame in frames:
                self._uncompacted_rows += frame[4]
                self.log_bytes += frame[5]
                self.frame_bytes_written += frame[5]
                self._newest_ts = max(self._newest_ts, frame[3])
            self._frames_top = frames[-1][1]
            self.frames_written += len(frames)
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
        if self.on_commit is not None:
            try:
                self.on_commit(self.committed_rev)
            except Exception:
                log.exception("%s: commit callback failed", self.path)
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

    def _hold(self, command: _Command) -> None:
        conn = self._conn
        assert conn is not None
        name, rev = command.arg
        try:
            with write_transaction(conn):
                if rev is None:
                    conn.execute("DELETE FROM log_holds WHERE name = ?", (name,))
                else:
                    conn.execute(
                        "INSERT OR REPLACE INTO log_holds(name, rev, updated) VALUES (?, ?, ?)",
                        (name, int(rev), time.time()),
                    )
        except Exception as exc:
            command.error = exc
        command.done.set()

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

    # -- compaction and the event-log window ------------------------------------------------------

    def _compact_due(self) -> bool:
        if self._compact is not None:
            return True
        if not self._uncompacted_rows:
            return bool(self._compact_waiters)
        return (
            bool(self._compact_waiters)
            or self._compact_for_bound
            or self._uncompacted_rows >= COMPACT_ROWS
            or time.monotonic() - self._uncompacted_since >= COMPACT_S
        )

    def _compact_step(self) -> None:
        """Plan, write the blocks of one pid range, or (last step) move the watermark."""
        try:
            job = self._compact
            if job is None:
                job = self._compact = self._plan_compaction()
            elif job.loaded is not None and not job.all_loaded:
                self._load_frames(job)
            elif job.done < len(job.groups):
                blocks, rows = self._write_blocks(job, *job.groups[job.done])
                job.blocks += blocks
                job.written += rows
                job.done += 1
            else:
                self._finish_compaction(job)
        except Exception as exc:
            self._compact = None
            self._compact_for_bound = False  # the bound's next check asks again
            self._pid_counts = None  # the next plan counts from the frames themselves
            if isinstance(exc, sqlite3.Error):
                self._fail(exc, "compaction")
            else:
                log.exception("%s: compaction failed", self.path)
            self._answer_compact_waiters(exc)
            # Try again a period later, not in a tight loop.
            self._uncompacted_since = time.monotonic()
            return
        if self._compact is None:
            self._answer_compact_waiters(None)

    def _frames_to_compact(self, job: _CompactJob) -> Iterator[codec.Columns]:
        assert self._conn is not None
        for (body,) in self._conn.execute(
            "SELECT body FROM frames WHERE rev0 > ? AND rev0 <= ? ORDER BY rev0",
            (job.start, job.cut),
        ):
            yield codec.decode(body)

    def _plan_compaction(self) -> _CompactJob:
        """Count each point's samples in the frames, and cut the pids into groups."""
        # A compaction that failed part-way left blocks past the watermark; this one's cut
        # covers their revs, so they must go first or those rows would be read twice.
        self._drop_unfinished_blocks()
        job = _CompactJob(self.compacted_rev, self._frames_top, [], 0)
        counts = np.zeros(1, dtype=np.int64)
        if self._pid_counts is not None:
            # Counted at commit: everything up to _frames_top, which is this job's cut.
            known, self._pid_counts = self._pid_counts, collections.Counter()
            if known:
                counts = np.zeros(max(known) + 1, dtype=np.int64)
                counts[list(known)] = list(known.values())
        else:
            for cols in self._frames_to_compact(job):
                found = np.bincount(cols.pid)
                if len(found) > len(counts):
                    counts = np.pad(counts, (0, len(found) - len(counts)))
                counts[: len(found)] += found
        job.rows = int(counts.sum())
        if job.rows <= COMPACT_CACHE_ROWS:
            job.loaded, job.load_after = [], job.start
            group_rows = COMPACT_STEP_ROWS
        else:
            group_rows = COMPACT_GROUP_ROWS
        lo, held = 0, 0
        for pid in np.flatnonzero(counts):
            if held and held + counts[pid] > group_rows:
                job.groups.append((lo, int(pid)))
                lo, held = int(pid), 0
            held += int(counts[pid])
        if held or not job.groups:
            # Open-ended: a pid the counts missed is still compacted, never skipped.
            job.groups.append((lo, PID_END))
        return job

    def _load_frames(self, job: _CompactJob) -> None:
        """Decode the next frames of the job (about LOAD_STEP_ROWS samples) into one chunk
        sorted by point. Sorting a chunk a step, not everything at the end: one sort of a
        million rows held commits 140-390 ms (bench/sync.py's soak)."""
        assert self._conn is not None and job.loaded is not None
        frames = []
        rows = 0
        for rev0, body in self._conn.execute(
            "SELECT rev0, body FROM frames WHERE rev0 > ? AND rev0 <= ? ORDER BY rev0",
            (job.load_after, job.cut),
        ):
            frames.append(codec.decode(body))
            job.load_after = rev0
            rows += len(frames[-1])
            if rows >= LOAD_STEP_ROWS:
                break
        else:
            job.all_loaded = True
        if rows:
            chunk = codec.Columns.concat(frames)
            job.loaded.append(chunk.take(np.argsort(chunk.pid, kind="stable")))

    def _write_blocks(self, job: _CompactJob, lo: int, hi: int) -> tuple[int, int]:
        """Encode and write the blocks of points lo <= pid < hi; return (blocks, samples)."""
        parts = []
        if job.loaded is not None:
            for chunk in job.loaded:  # each sorted by pid: the range is a slice
                first, last = np.searchsorted(chunk.pid, [lo, hi])
                parts.append(chunk.take(np.arange(first, last)))
        else:
            for frame in self._frames_to_compact(job):
                pid = frame.pid
                parts.append(frame.take((pid >= lo) & (pid < hi)))
        cols = codec.Columns.concat(parts)
        # Stable: the parts are in rev order, so each point's rows stay in rev order.
        order = np.argsort(cols.pid, kind="stable")
        if not len(cols):
            return 0, 0
        pids = cols.pid[order]
        bounds = np.concatenate(([0], np.flatnonzero(np.diff(pids)) + 1, [len(pids)]))
        blocks = []
        for begin, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            part = cols.take(order[begin:end])
            ts = part.ts
            blocks.append(
                (
                    int(part.pid[0]),
                    float(ts.min()),
                    float(ts.max()),
                    int(part.rev[0]),
                    int(part.rev[-1]),
                    len(part),
                    codec.encode_block_columns(part),
                )
            )
        conn = self._conn
        assert conn is not None
        # Readers take blocks up to compacted_rev only: these count once the last step commits.
        with write_transaction(conn):
            self._insert_blocks.write(conn, blocks)
        return len(blocks), len(cols)

    def _finish_compaction(self, job: _CompactJob) -> None:
        conn = self._conn
        assert conn is not None
        with write_transaction(conn):
            conn.execute(SET_META, ("compacted_rev", job.cut))
            self._write_current(conn)
            trimmed = self._trim_log(conn, job.cut)
        self._compact = None
        self._compact_for_bound = False
        if self._pid_counts is None and self._frames_top == job.cut:
            self._pid_counts = collections.Counter()  # nothing uncompacted: count from here
        self.compactions += 1
        self.blocks_written += job.blocks
        self.compacted_rev = job.cut
        self._uncompacted_rows -= job.written
        self._uncompacted_since = time.monotonic()
        self._changed = {}
        if trimmed is not None:
            self.log_start_rev, freed = trimmed
            self.log_bytes -= freed

    def _drop_unfinished_blocks(self) -> None:
        """Delete blocks an interrupted or failed compaction wrote past the watermark (they
        have the newest ids, so the walk stops at the first block below it)."""
        conn = self._conn
        assert conn is not None
        orphans = []
        for block_id, rev1 in conn.execute("SELECT id, rev1 FROM blocks ORDER BY id DESC"):
            if rev1 <= self.compacted_rev:
                break
            orphans.append(block_id)
        if orphans:
            with write_transaction(conn):
                conn.executemany("DELETE FROM blocks WHERE id = ?", [(i,) for i in orphans])
            log.info(
                "%s: removed %d blocks of a compaction that did not finish (its frames are "
                "kept and compacted again)",
                self.path,
                len(orphans),
            )

    def _write_current(self, conn: sqlite3.Connection) -> None:
        """Every point's newest committed value, and the rev it is complete to."""
        if self._changed:
            self._upsert_current.write(conn, list(self._changed.values()))
            self.current_rows_written += len(self._changed)
        conn.execute(SET_META, ("current_rev", self.committed_rev))

    def _snapshot_current(self) -> None:
        conn = self._conn
        assert conn is not None
        if not self._changed:
            return
        try:
            with write_transaction(conn):
                self._write_current(conn)
        except Exception as exc:
            # Not a loss: the frames hold every value, the next open replays them.
            log.warning("%s: could not snapshot current values at close: %s", self.path, exc)
            return
        self._changed = {}

    def _trim_log(self, conn: sqlite3.Connection, compacted: int) -> tuple[int, int] | None:
        """Delete the frames the event log no longer serves; return (new log start, bytes freed).

        A frame goes when it is compacted, older than the window (data time) and behind every
        hold; or, whatever the holds, when the frames beyond it exceed `log_max_bytes`.
        """
        window_cut = self._newest_ts - self.log_window_s
        hold = conn.execute("SELECT min(rev) FROM log_holds").fetchone()[0]
        rows = conn.execute(
            "SELECT rev1, t1, nbytes FROM frames WHERE rev0 <= ? ORDER BY rev0", (compacted,)
        ).fetchall()
        kept = self.log_bytes
        last = None  # the newest frame that goes
        freed = 0
        for rev1, t1, nbytes in rows:
            over = kept > self.log_max_bytes
            if not over and (t1 >= window_cut or (hold is not None and rev1 > hold)):
                break
            if over and hold is not None and rev1 > hold:
                log.warning(
                    "%s: the event log is at its bound (storage.event_log_max_mb); frames up "
                    "to rev %d go although a consumer holds rev %d: its cursor will expire",
                    self.path,
                    rev1,
                    hold,
                )
                hold = None
            last = rev1
            kept -= nbytes
            freed += nbytes
        if last is None:
            return None
        conn.execute("DELETE FROM frames WHERE rev0 <= ?", (last,))
        start = max(self.log_start_rev, last + 1)
        conn.execute(SET_META, ("log_start_rev", start))
        return start, freed

    def _answer_compact_waiters(self, error: BaseException | None) -> None:
        waiters, self._compact_waiters = self._compact_waiters, []
        for waiter in waiters:
            waiter.error = error
            waiter.result = self.compacted_rev
            waiter.done.set()

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
        history_cut, events_cut = now - self._history_s, now - self._events_s
        # Blocks and events are appended in time order, so what retention drops is a prefix of
        # each table: found by walking from the start (only over what goes), deleted by id.
        # Walking, not an index on time: a clock step backwards cannot punch holes into them.
        job.block_from = conn.execute("SELECT coalesce(min(id), 0) FROM blocks").fetchone()[0]
        job.blocks_below = self._first_at(
            "SELECT id FROM blocks WHERE t1 >= ? ORDER BY id LIMIT 1",
            history_cut,
            "SELECT coalesce(max(id), 0) + 1 FROM blocks",
        )
        job.rollup_from = conn.execute("SELECT coalesce(min(id), 0) FROM rollups").fetchone()[0]
        # Bucket rows are inserted in time order (`_retire`), so their ids are too.
        job.rollups_below = self._first_at(
            "SELECT id FROM rollups WHERE t1 >= ? ORDER BY id LIMIT 1",
            now - self._rollup_keep_s,
            "SELECT coalesce(max(id), 0) + 1 FROM rollups",
        )
        job.event_from = conn.execute("SELECT coalesce(min(rev), 0) FROM events").fetchone()[0]
        job.events_below = self._first_at(
            "SELECT rev FROM events WHERE ts >= ? ORDER BY rev LIMIT 1",
            events_cut,
            "SELECT coalesce(max(rev), 0) + 1 FROM events",
        )
        # A consumer's hold (sync) keeps events it has not delivered, like the frames; while
        # the log is over its bound the holds lose here too (see _trim_log).
        hold = conn.execute("SELECT min(rev) FROM log_holds").fetchone()[0]
        if hold is not None and self.log_bytes <= self.log_max_bytes:
            job.events_below = min(job.events_below, int(hold) + 1)
        # The log is a contiguous suffix: it cannot serve a rev whose event is gone.
        job.log_start = self.log_start_rev
        if job.events_below > job.event_from:
            job.log_start = max(job.log_start, job.events_below)
        job.result.log_start_rev = job.log_start
        job.planned = True

    def _first_at(self, sql: str, cut: float, otherwise: str) -> int:
        assert self._conn is not None
        row = self._conn.execute(sql, (cut,)).fetchone()
        if row is not None:
            return int(row[0])
        return int(self._conn.execute(otherwise).fetchone()[0])

    def _prune_step(self) -> None:
        job = self._prune
        conn = self._conn
        assert job is not None and conn is not None
        try:
            if not job.planned:
                self._plan_prune(job)
            with write_transaction(conn):
                if not job.moved_start:
                    # The log start moves first, so a reader never sees a half-deleted log:
                    # a cursor below it gets "expired", never a gap.
                    conn.execute(SET_META, ("log_start_rev", job.log_start))
                if job.block_from < job.blocks_below:
                    upto = min(job.block_from + RETIRE_CHUNK, job.blocks_below)
                    job.result.history_rows += self._retire(conn, job.block_from, upto)[0]
                    job.block_from = upto
                elif job.rollup_from < job.rollups_below:
                    upto = min(job.rollup_from + ROLLUP_CHUNK, job.rollups_below)
                    job.result.rollup_rows += conn.execute(
                        "DELETE FROM rollups WHERE id >= ? AND id < ?", (job.rollup_from, upto)
                    ).rowcount
                    job.rollup_from = upto
                elif job.event_from < job.events_below:
                    upto = min(job.event_from + PRUNE_CHUNK, job.events_below)
                    job.result.events += conn.execute(
                        "DELETE FROM events WHERE rev >= ? AND rev < ?", (job.event_from, upto)
                    ).rowcount
                    job.event_from = upto
        except Exception as exc:
            self._finish_prune(exc)
            return
        if not job.moved_start:
            job.moved_start = True
            self.log_start_rev = job.log_start
        self._vacuum_some()
        if (
            job.block_from >= job.blocks_below
            and job.rollup_from >= job.rollups_below
            and job.event_from >= job.events_below
        ):
            self._finish_prune(None)

    def _finish_prune(self, error: BaseException | None) -> None:
        job, self._prune = self._prune, None
        assert job is not None
        job.command.error = error
        job.command.result = job.result
        job.command.done.set()

    # -- downsampling and the size bound ----------------------------------------------------------

    def _retire(
        self, conn: sqlite3.Connection, lo: int, hi: int
    ) -> tuple[int, float | None, float | None]:
        """Fold the blocks lo <= id < hi into bucket rows and delete them, in the caller's
        transaction; return (samples, oldest ts, newest ts)."""
        by_pid: dict[int, list[codec.Columns]] = {}
        samples, oldest, newest = 0, None, None
        found = conn.execute(
            "SELECT pid, t0, t1, n, body FROM blocks WHERE id >= ? AND id < ? AND rev1 <= ? "
            "ORDER BY id",
            (lo, hi, self.compacted_rev),
        )
        for pid, t0, t1, n, body in found:
            by_pid.setdefault(pid, []).append(codec.decode(body))
            samples += n
            oldest = t0 if oldest is None else min(oldest, t0)
            newest = t1 if newest is None else max(newest, t1)
        rows = []
        for pid, parts in by_pid.items():
            folded = rollup.fold(codec.Columns.concat(parts), self.rollup_s)
            for hour, part in rollup.periods(folded):
                have = conn.execute(
                    "SELECT body FROM rollups WHERE pid = ? AND t0 = ?", (pid, hour)
                ).fetchone()
                if have is not None:
                    older = rollup.decode(have[0])
                    if older.size == part.size:
                        part = rollup.merge(older, part)
                    # else: rollup_s changed within this hour; the newer size wins the hour.
                end = float(part.start[-1]) + part.size
                rows.append((hour, pid, end, int(part.n.sum()), rollup.encode(part)))
        # In time order, so that ids are too (retention deletes bucket rows as an id prefix).
        rows.sort(key=itemgetter(0, 1))
        conn.executemany(
            "INSERT INTO rollups(t0, pid, t1, n, body) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(pid, t0) DO UPDATE SET t1 = excluded.t1, n = excluded.n, "
            "body = excluded.body",
            rows,
        )
        conn.execute(
            "DELETE FROM blocks WHERE id >= ? AND id < ? AND rev1 <= ?",
            (lo, hi, self.compacted_rev),
        )
        self.retired_rows += samples
        return samples, oldest, newest

    def _vacuum_some(self) -> None:
        """Give up to VACUUM_PAGES free pages back to the file system (the file shrinks)."""
        conn = self._conn
        assert conn is not None
        try:
            if not conn.execute("PRAGMA freelist_count").fetchone()[0]:
                return
            # executescript steps the pragma to its end: through execute() Python's sqlite3
            # steps it once, which frees one page (found by test_twin_retention).
            conn.executescript(f"PRAGMA incremental_vacuum({VACUUM_PAGES});")
            # In WAL mode the file is truncated when the checkpoint copies the vacuum back into
            # it; PASSIVE never waits for readers (a reader's snapshot defers it to a later one).
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self.file_bytes, self.used_bytes = page_bytes(conn)
        except sqlite3.Error as exc:
            # Not a loss: the pages stay free and are reused; the next step tries again.
            log.debug("%s: incremental vacuum failed: %s", self.path, exc)

    def _bound_due(self) -> bool:
        """Whether the database is above its size bound (measured every few seconds, and as
        frames are written); starts a bound job when it is."""
        if self.max_bytes is None or self.error is not None:
            return False
        now = time.monotonic()
        # Anything committed since the last check (frame bytes for telemetry, one per other
        # row: an event burst grows the file too); only compared with itself.
        written = self.frame_bytes_written + self.rows_written
        if now - self._bound_checked < BOUND_CHECK_S and (
            written - self._bound_checked_bytes < self.max_bytes / 200
        ):
            return False
        self._bound_checked, self._bound_checked_bytes = now, written
        conn = self._conn
        assert conn is not None
        self.file_bytes, self.used_bytes = page_bytes(conn)
        if self.used_bytes <= self.max_bytes:
            self.bound_exhausted = False
            return False
        if self.bound_exhausted:
            return False  # said already; wait until something changes
        if self._uncompacted_rows and self._compact is None:
            # History still in frames can go only once compacted: compact first (the loop
            # runs a due compaction before the bound's steps), then remove.
            self._compact_for_bound = True
        self._bound = _BoundJob(self.max_bytes, self.used_bytes)
        log.warning(
            "%s: the twin database uses %.1f MB, above its bound of %.1f MB "
            "(storage.max_db_mb): removing the oldest raw history (kept as %g s buckets), "
            "then the oldest buckets, then the oldest events, down to %.0f %% of the bound",
            self.path,
            self.used_bytes / MB,
            self.max_bytes / MB,
            self.rollup_s,
            BOUND_TARGET * 100,
        )
        # With a compaction to do first, the job's steps come after it, from the next turn.
        return not self._compact_due()

    def _bound_step(self) -> None:
        job = self._bound
        conn = self._conn
        assert job is not None and conn is not None
        try:
            self.file_bytes, self.used_bytes = page_bytes(conn)
            job.used = self.used_bytes
            if self.used_bytes <= job.bound * BOUND_TARGET:
                self._finish_bound(job)
                return
            with write_transaction(conn):
                if not self._bound_remove(conn, job):
                    job.exhausted = True
            self._vacuum_some()
            job.used = self.used_bytes
        except Exception as exc:
            # Like a failed commit, the next check tries again; nothing is half-removed (each
            # step is one transaction).
            log.warning("%s: could not remove rows at the size bound: %s", self.path, exc)
            self._bound = None
            return
        if job.exhausted:
            self._finish_bound(job)

    def _bound_remove(self, conn: sqlite3.Connection, job: _BoundJob) -> bool:
        """Remove the next chunk, oldest raw history first; False when nothing may go."""
        first = conn.execute(
            "SELECT min(id) FROM blocks WHERE rev1 <= ?", (self.compacted_rev,)
        ).fetchone()[0]
        if first is not None:
            samples, oldest, newest = self._retire(conn, first, first + RETIRE_CHUNK)
            job.history_rows += samples
            if oldest is not None:
                job.history_from_ts = job.history_from_ts or oldest
                job.history_to_ts = max(job.history_to_ts or newest or 0.0, newest or 0.0)
            return True
        gone = conn.execute(
            "DELETE FROM rollups WHERE id IN (SELECT id FROM rollups ORDER BY id LIMIT ?) "
            "RETURNING t1",
            (ROLLUP_CHUNK,),
        ).fetchall()
        if gone:
            job.rollup_rows += len(gone)
            job.rollup_to_ts = max([job.rollup_to_ts or 0.0] + [t1 for (t1,) in gone])
            return True
        below = conn.execute(
            "SELECT rev FROM events ORDER BY rev LIMIT 1 OFFSET ?", (PRUNE_CHUNK,)
        ).fetchone()
        upto = (
            int(below[0])
            if below is not None
            else int(conn.execute("SELECT coalesce(max(rev), 0) + 1 FROM events").fetchone()[0])
        )
        hold = conn.execute("SELECT min(rev) FROM log_holds").fetchone()[0]
        if hold is not None and not self._bound_drops_unsynced:
            upto = min(upto, int(hold) + 1)  # a consumer has not had the events above its hold
        deleted = conn.execute("DELETE FROM events WHERE rev < ?", (upto,)).rowcount
        if not deleted:
            return False
        job.events += deleted
        job.events_below_rev = max(job.events_below_rev, upto)
        # The log is a contiguous suffix: it cannot serve a rev whose event is gone.
        if upto > self.log_start_rev:
            conn.execute(SET_META, ("log_start_rev", upto))
            self.log_start_rev = upto
        return True

    def _finish_bound(self, job: _BoundJob) -> None:
        self._bound = None
        self.bound_episodes += 1
        self.bound_history_rows += job.history_rows
        self.bound_rollup_rows += job.rollup_rows
        self.bound_events += job.events
        if job.exhausted:
            self.bound_exhausted = True
            log.error(
                "%s: the twin database uses %.1f MB, above its bound of %.1f MB, and nothing "
                "more may go: what is left is current values, the event log (up to "
                "storage.event_log_max_mb) and events sync has not delivered. Raise "
                "storage.max_db_mb or lower storage.event_log_max_mb",
                self.path,
                job.used / MB,
                job.bound / MB,
            )
        log.warning(
            "%s: at the size bound, removed %d raw samples (kept as buckets), %d bucket rows "
            "and %d events; the database uses %.1f MB of %.1f MB",
            self.path,
            job.history_rows,
            job.rollup_rows,
            job.events,
            job.used / MB,
            job.bound / MB,
        )
        if self.on_bound is not None:
            try:
                self.on_bound(job.report())
            except Exception:
                log.exception("%s: could not record the size bound event", self.path)


def _runs(batches: deque[list[TelemetryRow]]) -> list[list[TelemetryRow]]:
    """The batches joined into runs of consecutive revs (a generic event's rev splits them)."""
    runs: list[list[TelemetryRow]] = []
    for batch in batches:
        if runs and runs[-1][-1][0] + 1 == batch[0][0]:
            runs[-1] = runs[-1] + batch
        else:
            runs.append(batch)
    return runs


def _frame(rows: list[TelemetryRow]) -> tuple[Any, ...]:
    """The frames row of one run: (rev0, rev1, t0, t1, n, nbytes, body)."""
    body = codec.encode_frame(rows)
    first, last = rows[0][1], rows[-1][1]
    if first == last:  # one ingest batch: one ts
        t0 = t1 = first
    else:
        stamps = [row[1] for row in rows]
        t0, t1 = min(stamps), max(stamps)
    return (rows[0][0], rows[-1][0], t0, t1, len(rows), len(body), body)


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
