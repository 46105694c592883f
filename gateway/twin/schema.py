"""The twin database: connection settings and numbered migrations.

Each migration is a registered function applied in one transaction together with its row in
`_migrations`, so a crash mid-migration leaves the previous version intact. A database newer
than this code is refused rather than guessed at.

Schema (version 1), chosen by measurement: 1,000 points, 300,000 updates, 5,000-row
transactions, raw executemany, SQLite 3.40 (scratch runs behind `bench/ingest.py`):

    events doubles as history, partial index (pid, ts)   ~187,000 updates/s   24.5 MB
    events + separate history table, index (pid, ts)      ~151,000 updates/s   36.3 MB
    events + history WITHOUT ROWID (pid, ts, rev)         ~135,000 updates/s   31.0 MB
    no history index at all (for scale)                   ~470,000 updates/s   17.9 MB

The (pid, ts) index is most of the cost: each commit dirties one index leaf page per point.

- `points(pid, id, device, datatype, unit, lo, hi, writable, deadband, description, declared)`:
  every point ever declared; `pid` is a small integer that the hot tables store instead of the
  path. A point dropped from the config keeps its row (`declared = 0`) so old events resolve.
- `events(rev, ts, type, pid, asset_id, value, quality, source_ts, reason, data)`: the event log,
  `rev` is the rowid. A `TelemetryChanged` event keeps its payload in typed columns (`value`
  has no type affinity, so ints, floats and text come back as they went in; `quality` is a code
  from `qualities`); every other type keeps its payload as JSON in `data`. Telemetry events are
  also the point history: `events_point_ts` (a partial index on `(pid, ts)`) serves history and
  aggregates, so one row per accepted update carries both.
- `current(pid, rev, ts, value, quality, source_ts, reason)`: the last accepted value per point,
  written in the same transaction as the events that produced it.
- `meta(key, value)`: `log_start_rev`, the first rev the event log still serves (retention may
  keep older telemetry rows for history after their events have left the log).
- `qualities(code, name)` and the views `event_log`, `history`, `current_values` for people and
  the CLI (paths and quality names instead of codes).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlite_utils import Database

from drivers.contract import Quality
from gateway.errors import DatabaseFault, StoreError

__all__ = [
    "MIGRATIONS",
    "QUALITIES",
    "QUALITY_CODE",
    "SCHEMA_VERSION",
    "TELEMETRY",
    "check_integrity",
    "connect",
    "explain",
    "fault",
    "is_corruption",
    "migrate",
    "recovery_steps",
]

TELEMETRY = "TelemetryChanged"

# Codes ordered by how usable the value is; aggregates take codes <= 1 (GOOD, UNCERTAIN).
QUALITIES: tuple[Quality, ...] = (Quality.GOOD, Quality.UNCERTAIN, Quality.BAD, Quality.STALE)
QUALITY_CODE: dict[str, int] = {q: i for i, q in enumerate(QUALITIES)}

# The writer touches one index leaf page per point per commit; a cache that holds those pages
# for a few thousand points keeps commits from re-reading them (measured 10-20 % faster ingest
# than the 2 MB default at 1,000 points).
CACHE_KIB = 65536
BUSY_TIMEOUT_MS = 5000
WAL_LIMIT_BYTES = 64 * 1024 * 1024


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


def connect(path: str | Path, *, read_only: bool = False) -> sqlite3.Connection:
    """Open a connection with the twin's settings; `read_only` ones refuse every write."""
    try:
        conn = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
    except sqlite3.Error as exc:
        raise fault(exc, path, "open") from exc
    try:
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
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
        f'`sqlite3 {aside / path.name} ".recover" | sqlite3 {path}`, or restore a backup to '
        f"{path}, or start without one (the gateway creates an empty twin database)."
    )


def migrate(conn: sqlite3.Connection, *, path: str | Path = "") -> int:
    """Bring the database to the newest schema; return its version."""
    try:
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
        with db.atomic():
            apply(db)
            db.table("_migrations").insert(
                {"version": version, "name": name, "applied_at": time.time()}
            )
    return SCHEMA_VERSION


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

MIGRATIONS: list[tuple[int, str, Callable[[Database], None]]] = [
    (1, "points, events, current, meta, views", _m1_initial),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]
