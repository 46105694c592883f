"""The twin database: connection settings and numbered migrations.

Each migration is a registered function applied in one transaction together with its row in
`_migrations`, so a crash mid-migration leaves the previous version intact. A database newer
than this code is refused rather than guessed at.

Schema version 2 (issue 14), chosen by measurement (`bench/footprint.py`, `bench/codec.py`):
version 1 kept one `events` row per stored sample with a `(pid, ts)` index for history. Its cost
grew with the history (each commit dirtied an index leaf page per point: disk writes 30-118x the
rows written, CPU per million samples doubling within an hour) and took ~82 bytes per sample.
Version 2 keeps telemetry in two compressed forms (`codec.py`), neither indexed per sample:

- `frames(rev0, rev1, t0, t1, n, nbytes, body)`: the raw tail. One row per committed run of
  telemetry (usually one ingested batch), revs `rev0..rev1` without gaps, appended by rowid
  only, so a commit touches the last pages of one b-tree whatever the history's length. Frames
  are the telemetry part of the event log (AIW diffs, SSE, sync) and the history not yet
  compacted. They are deleted once compacted and older than the event-log window (see
  `writer.py`), so the tail stays a bounded size.
- `blocks(id, pid, t0, t1, rev0, rev1, n, body)`: the history. The writer compacts frames into
  one block per point per compaction period (minutes), indexed by `(pid, t1)`: a history query
  reads the blocks of one point that overlap its range, plus the uncompacted frames.
- `meta`: `log_start_rev` (the first rev the event log serves: below it, frames are gone),
  `compacted_rev` (every telemetry rev up to it is in blocks, every one above in frames) and
  `current_rev` (the `current` table holds every point's value as of that rev; newer values are
  replayed from the frames at open).
- `points(pid, id, device, datatype, unit, lo, hi, writable, deadband, description, declared)`:
  every point ever declared; `pid` is a small integer that the hot tables store instead of the
  path. A point dropped from the config keeps its row (`declared = 0`) so old events resolve.
- `events(rev, ts, type, pid, asset_id, data)`: every non-telemetry event (device states,
  refusals, backlog drops, later proposals and actions), payload as JSON, kept `events_days`.
- `current(pid, rev, ts, value, quality, source_ts, reason)`: a snapshot of the last accepted
  value per point, written when the writer compacts and when it closes, not per commit (per
  commit it was a page per ~80 points dirtied each time).
- `log_holds(name, rev, updated)`: cursors of consumers that must not miss an event (sync); the
  frames after the slowest stay, up to the event log's size bound.
- `qualities(code, name)`, and the views `event_log` (non-telemetry events with point paths) and
  `current_values` for people and the CLI. History is compressed: read it with `opstwin history`
  or the HTTP API, not SQL.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from drivers.contract import Quality
from gateway import sdnotify
from gateway.errors import DatabaseFault, StoreError
from gateway.twin import codec

log = logging.getLogger(__name__)

__all__ = [
    "MIGRATIONS",
    "QUALITIES",
    "QUALITY_CODE",
    "SCHEMA_VERSION",
    "TELEMETRY",
    "cache_kib",
    "check_integrity",
    "connect",
    "explain",
    "fault",
    "is_corruption",
    "migrate",
    "page_bytes",
    "recovery_steps",
]

TELEMETRY = "TelemetryChanged"

# Codes ordered by how usable the value is; aggregates take codes <= 1 (GOOD, UNCERTAIN).
QUALITIES: tuple[Quality, ...] = (Quality.GOOD, Quality.UNCERTAIN, Quality.BAD, Quality.STALE)
QUALITY_CODE: dict[str, int] = {q: i for i, q in enumerate(QUALITIES)}

# SQLite's page cache per connection. The writer only appends (frames) and compacts (blocks),
# so it needs little; history reads decode blobs rather than walk index pages. Sized from the
# point count by `cache_kib`, within these bounds.
CACHE_MIN_KIB = 2048
CACHE_MAX_KIB = 32768
CACHE_KIB_PER_POINT = 1.0
BUSY_TIMEOUT_MS = 5000
WAL_LIMIT_BYTES = 64 * 1024 * 1024
AUTO_VACUUM_INCREMENTAL = 2


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any error (a kill leaves nothing half-done)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def cache_kib(points: int) -> int:
    """The page cache for a twin of `points` points: 2 MiB plus 1 KiB a point, at most 32 MiB."""
    return int(min(max(CACHE_MIN_KIB + CACHE_KIB_PER_POINT * points, CACHE_MIN_KIB), CACHE_MAX_KIB))


def connect(
    path: str | Path, *, read_only: bool = False, cache: int = CACHE_MIN_KIB
) -> sqlite3.Connection:
    """Open a connection with the twin's settings (`cache` KiB of page cache); `read_only` ones
    refuse every write."""
    try:
        conn = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
    except sqlite3.Error as exc:
        raise fault(exc, path, "open") from exc
    try:
        conn.execute(f"PRAGMA cache_size=-{int(cache)}")
        conn.execute("PRAGMA temp_store=MEMORY")
        # WAL: readers never block the writer. NORMAL: a commit is safe against a process
        # crash (kill -9) without an fsync; only a power loss can take the last commits.
        conn.execute("PRAGMA synchronous=NORMAL")
        # After a burst (or a long read holding a snapshot) let the WAL shrink back.
        conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        if read_only:
            conn.execute("PRAGMA query_only=1")
    except sqlite3.Error as exc:
        conn.close()
        raise fault(exc, path, "open") from exc
    return conn


def check_integrity(conn: sqlite3.Connection, path: str | Path) -> None:
    """Refuse a damaged database (PRAGMA quick_check) with the steps to recover it.

    quick_check reads every page and checks each b-tree's structure, but not that indexes match
    their tables (integrity_check does, at about twice the cost): what it finds is what makes
    reads fail at run time. It reads the whole file: measured 3.1 s for 160 MB (~20 s per GB)
    on the busy 2-core development box.
    """
    try:
        rows = conn.execute("PRAGMA quick_check(5)").fetchall()
    except sqlite3.Error as exc:
        raise fault(exc, path, "check") from exc
    if rows != [("ok",)]:
        found = "; ".join(" ".join(str(row[0]).split()) for row in rows)  # one line
        raise DatabaseFault(
            f"{path}: the twin database is corrupt (quick_check: {found}); the gateway will not "
            f"run on it. {recovery_steps(path)}",
            corrupt=True,
        )


def is_corruption(exc: BaseException) -> bool:
    """Whether SQLite said the file is damaged or not a database at all."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return False
    return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def fault(exc: sqlite3.Error, path: str | Path, doing: str) -> DatabaseFault:
    """A DatabaseFault that says what SQLite's error means for the operator, and what to do."""
    corrupt = is_corruption(exc)
    message = f"{path}: cannot {doing} the twin database: {explain(exc)}"
    if corrupt:
        message += f". {recovery_steps(path)}"
    return DatabaseFault(message, corrupt=corrupt)


def explain(exc: BaseException) -> str:
    """What a database error means for the operator and what to do, in a phrase."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code == sqlite3.SQLITE_NOTADB:
        return f"not an SQLite database ({exc})"
    if code == sqlite3.SQLITE_CORRUPT:
        return f"the database is corrupt ({exc})"
    if code == sqlite3.SQLITE_READONLY:
        return (
            f"read-only ({exc}); make the file and its directory writable by the gateway's "
            "user, or set storage.path to a writable place"
        )
    if code == sqlite3.SQLITE_FULL:
        return f"the disk is full ({exc}); free space on its file system"
    if code == sqlite3.SQLITE_IOERR:
        return f"I/O error ({exc}); check the disk and the kernel log"
    return str(exc)


def recovery_steps(path: str | Path) -> str:
    """What an operator does with a damaged database (one line)."""
    path = Path(path)
    aside = path.parent / "damaged"
    return (
        f"To recover: stop the gateway; move the database and its -wal and -shm files aside "
        f"(mkdir {aside} && mv {path}* {aside}/); then salvage what is readable with "
        f'`sqlite3 {aside / path.name} ".recover" | sqlite3 {path}`, or restore a backup '
        f"(`opstwin restore`), or start without one (the gateway creates an empty twin database)."
    )


def migrate(conn: sqlite3.Connection, *, path: str | Path = "") -> int:
    """Bring the database to the newest schema; return its version."""
    try:
        if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
            # A new file: free pages go back to the file system as retention deletes (see
            # `incremental_vacuum`). Only possible before the first table is created.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: not a usable SQLite database: {exc}") from exc
    if str(mode).lower() != "wal":
        raise StoreError(
            f"{path}: SQLite refused WAL journal mode (got {mode!r}); the twin needs WAL so that "
            "readers never block the writer. Put the database on a local filesystem."
        )
    db = Database(conn, execute_plugins=False)
    with db.atomic():
        db.execute(
            "CREATE TABLE IF NOT EXISTS _migrations ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
    applied = {row["version"] for row in db.query("SELECT version FROM _migrations")}
    newest = max(applied, default=0)
    if newest > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: database schema version {newest} is newer than this gateway supports "
            f"({SCHEMA_VERSION}); run the newer gateway or restore a matching backup."
        )
    for version, name, apply in MIGRATIONS:
        if version in applied:
            continue
        started = time.monotonic()
        if applied:  # an existing database, not a new one: say what takes the time
            log.info("%s: migrating the twin database to schema %d (%s)", path, version, name)
        with db.atomic():
            apply(db)
            db.table("_migrations").insert(
                {"version": version, "name": name, "applied_at": time.time()}
            )
        if applied:
            log.info(
                "%s: schema %d in place after %.1f s", path, version, time.monotonic() - started
            )
    _convert_to_incremental_vacuum(conn, path)
    return SCHEMA_VERSION


def _convert_to_incremental_vacuum(conn: sqlite3.Connection, path: str | Path) -> None:
    """Once, for a database made before auto_vacuum was set: rewrite it with it on.

    Without it, what retention deletes becomes free pages that SQLite reuses but never gives
    back, so the file never shrinks. VACUUM rewrites the whole file (and needs its size free on
    the disk); it is done once, logged, and skipped with a warning when it cannot be done: the
    gateway still works, only the file does not shrink.
    """
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == AUTO_VACUUM_INCREMENTAL:
        return
    started = time.monotonic()
    size = page_bytes(conn)[0]
    log.info(
        "%s: converting the twin database (%.1f MB) to incremental vacuum, once, so that it "
        "shrinks when history is removed",
        path,
        size / 1e6,
    )
    # VACUUM rewrites the file: give systemd's start timeout room for it (generous: ~2 min/GB).
    sdnotify.notify(
        f"STATUS=converting the twin database ({size >> 20} MiB) to incremental vacuum\n"
        f"EXTEND_TIMEOUT_USEC={int((60 + 120 * size / 1e9) * 1e6)}"
    )
    try:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("VACUUM")
    except sqlite3.Error as exc:
        log.warning(
            "%s: could not convert to incremental vacuum (%s); the file will not shrink when "
            "history is removed (retention and the size bound still apply)",
            path,
            explain(exc),
        )
        return
    log.info("%s: converted in %.1f s", path, time.monotonic() - started)


def page_bytes(conn: sqlite3.Connection) -> tuple[int, int]:
    """(file bytes, bytes in use): pages times page size, without and with the free pages."""
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return pages * size, (pages - free) * size


# -- migrations ----------------------------------------------------------------------------------


def _m1_initial(db: Database) -> None:
    for statement in _M1_TABLES:
        db.execute(statement)
    for code, quality in enumerate(QUALITIES):
        db.execute("INSERT INTO qualities(code, name) VALUES (?, ?)", (code, str(quality)))
    db.execute("INSERT INTO meta(key, value) VALUES ('log_start_rev', 1)")
    for name, sql in _M1_VIEWS.items():
        db.create_view(name, sql)


_M1_TABLES = (
    """CREATE TABLE points (
        pid INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        device TEXT NOT NULL,
        datatype TEXT NOT NULL,
        unit TEXT NOT NULL DEFAULT '',
        lo REAL,
        hi REAL,
        writable INTEGER NOT NULL DEFAULT 0,
        deadband REAL NOT NULL DEFAULT 0,
        description TEXT NOT NULL DEFAULT '',
        declared INTEGER NOT NULL DEFAULT 1
    )""",
    "CREATE TABLE qualities (code INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
    # No foreign-key enforcement (PRAGMA foreign_keys stays off): the writer is the only
    # producer and checks ids before they get here; REFERENCES documents the join.
    """CREATE TABLE events (
        rev INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        type TEXT NOT NULL,
        pid INTEGER REFERENCES points(pid),
        asset_id TEXT,
        value,
        quality INTEGER REFERENCES qualities(code),
        source_ts REAL,
        reason TEXT,
        data TEXT
    )""",
    f"CREATE INDEX events_point_ts ON events(pid, ts) WHERE type = '{TELEMETRY}'",
    """CREATE TABLE current (
        pid INTEGER PRIMARY KEY REFERENCES points(pid),
        rev INTEGER NOT NULL,
        ts REAL NOT NULL,
        value,
        quality INTEGER NOT NULL REFERENCES qualities(code),
        source_ts REAL,
        reason TEXT
    )""",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value)",
)

_M1_VIEWS = {
    "event_log": f"""SELECT e.rev, e.ts, e.type,
            coalesce(e.asset_id, rtrim(rtrim(p.id, replace(p.id, '/', '')), '/')) AS asset_id,
            p.id AS point_id,
            CASE WHEN e.type = '{TELEMETRY}' THEN json_object(
                'value', e.value, 'quality', q.name, 'source_ts', e.source_ts,
                'reason', e.reason) ELSE e.data END AS data
        FROM events e
        LEFT JOIN points p ON p.pid = e.pid
        LEFT JOIN qualities q ON q.code = e.quality
        WHERE e.rev >= (SELECT value FROM meta WHERE key = 'log_start_rev')""",
    "history": f"""SELECT p.id AS point_id, e.rev, e.ts, e.value, q.name AS quality,
            e.source_ts, e.reason
        FROM events e
        JOIN points p ON p.pid = e.pid
        JOIN qualities q ON q.code = e.quality
        WHERE e.type = '{TELEMETRY}'""",
    "current_values": """SELECT p.id AS point_id, c.value, q.name AS quality, c.source_ts,
            c.ts AS gateway_ts, c.rev, c.reason
        FROM current c
        JOIN points p ON p.pid = c.pid
        JOIN qualities q ON q.code = c.quality""",
}

# Rows per block when a version-1 history is converted (the writer's own blocks hold whatever
# one compaction period brought).
MIGRATE_BLOCK_ROWS = 4096


def _m2_compressed_history(db: Database) -> None:
    """Version 1 -> 2: history rows into per-point blocks, non-telemetry events into their own
    table; the event log restarts after the newest rev (nothing consumed it in version 1)."""
    conn = db.conn
    for statement in _M2_TABLES:
        conn.execute(statement)
    top = conn.execute("SELECT coalesce(max(rev), 0) FROM events").fetchone()[0]
    top = max(top, conn.execute("SELECT coalesce(max(rev), 0) FROM current").fetchone()[0])
    rows = conn.execute(
        "SELECT rev, ts, pid, value, quality, source_ts, reason FROM events "
        f"WHERE type = '{TELEMETRY}' ORDER BY pid, rev"
    )
    block: list[Any] = []

    def put(block: list[Any]) -> None:
        conn.execute(
            "INSERT INTO blocks(pid, t0, t1, rev0, rev1, n, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                block[0][2],
                min(r[1] for r in block),
                max(r[1] for r in block),
                block[0][0],
                block[-1][0],
                len(block),
                codec.encode_block(block),
            ),
        )

    for row in rows:
        if block and (row[2] != block[0][2] or len(block) >= MIGRATE_BLOCK_ROWS):
            put(block)
            block = []
        block.append(row)
    if block:
        put(block)
    conn.execute(
        "INSERT INTO events_v2(rev, ts, type, pid, asset_id, data) SELECT rev, ts, type, pid, "
        f"asset_id, data FROM events WHERE type != '{TELEMETRY}'"
    )
    for name in _M1_VIEWS:
        conn.execute(f"DROP VIEW IF EXISTS {name}")
    conn.execute("DROP TABLE events")  # its partial index goes with it
    conn.execute("ALTER TABLE events_v2 RENAME TO events")
    conn.executemany(
        "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
        [("log_start_rev", top + 1), ("compacted_rev", top), ("current_rev", top)],
    )
    for name, sql in _M2_VIEWS.items():
        db.create_view(name, sql)


_M2_TABLES = (
    """CREATE TABLE events_v2 (
        rev INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        type TEXT NOT NULL,
        pid INTEGER REFERENCES points(pid),
        asset_id TEXT,
        data TEXT NOT NULL DEFAULT '{}'
    )""",
    """CREATE TABLE frames (
        rev0 INTEGER PRIMARY KEY,
        rev1 INTEGER NOT NULL,
        t0 REAL NOT NULL,
        t1 REAL NOT NULL,
        n INTEGER NOT NULL,
        nbytes INTEGER NOT NULL,
        body BLOB NOT NULL
    )""",
    """CREATE TABLE blocks (
        id INTEGER PRIMARY KEY,
        pid INTEGER NOT NULL REFERENCES points(pid),
        t0 REAL NOT NULL,
        t1 REAL NOT NULL,
        rev0 INTEGER NOT NULL,
        rev1 INTEGER NOT NULL,
        n INTEGER NOT NULL,
        body BLOB NOT NULL
    )""",
    "CREATE INDEX blocks_pid_t1 ON blocks(pid, t1)",
    """CREATE TABLE log_holds (
        name TEXT PRIMARY KEY,
        rev INTEGER NOT NULL,
        updated REAL NOT NULL
    )""",
)

_M2_VIEWS = {
    "event_log": """SELECT e.rev, e.ts, e.type,
            coalesce(e.asset_id, rtrim(rtrim(p.id, replace(p.id, '/', '')), '/')) AS asset_id,
            p.id AS point_id, e.data
        FROM events e
        LEFT JOIN points p ON p.pid = e.pid""",
    "current_values": _M1_VIEWS["current_values"],
}


def _m3_rollups(db: Database) -> None:
    """Version 2 -> 3: downsampled history (`rollup.py`), one row per point per hour."""
    db.execute(
        """CREATE TABLE rollups (
            id INTEGER PRIMARY KEY,
            pid INTEGER NOT NULL REFERENCES points(pid),
            t0 REAL NOT NULL,
            t1 REAL NOT NULL,
            n INTEGER NOT NULL,
            body BLOB NOT NULL,
            UNIQUE (pid, t0)
        )"""
    )


MIGRATIONS: list[tuple[int, str, Callable[[Database], None]]] = [
    (1, "points, events, current, meta, views", _m1_initial),
    (2, "history in compressed per-point blocks, telemetry log in frames", _m2_compressed_history),
    (3, "downsampled history: per-point time buckets", _m3_rollups),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]
