"""The control database: users, API tokens and the audit chain, in `control.db` beside the twin.

Security data has a file of its own (not tables in the twin database) so that the twin, which is
synced to the cloud, never carries password hashes, and the audit chain can be copied, checked
and kept on its own. Same habits as the twin (`gateway/twin/schema.py`): WAL, numbered
migrations each applied in one transaction with its `_migrations` row, a database newer than this
code refused; and every write goes through one writer thread (`ControlDB.write`), so that an
audit append reads the chain's head and inserts after it with no other write in between. Async
callers use `write_async`; the event loop never waits on SQLite.

Schema version 1:
- `users(name, password_hash, grants, disabled, created, updated)`: `grants` is a JSON list of
  `rbac.Grant`, `password_hash` an argon2 PHC string.
- `tokens(id, name, secret_sha256, grants, created, last_used, revoked)`: only the SHA-256 of
  the secret is kept; `name` stays taken after revocation, so that `token x` in the audit log
  always means one token.
- `audit(seq, ts, entry, hash)`: exactly the table `gateway/audit/chain.py` documents. Triggers
  refuse UPDATE and DELETE: the table is append-only for anything that goes through SQLite's
  front door (a tamperer who drops the triggers is what `verify` is for).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from gateway.errors import DatabaseFault, StoreError
from gateway.twin.files import create_private_file
from gateway.twin.schema import explain, is_corruption, write_transaction

log = logging.getLogger(__name__)

__all__ = [
    "CONTROL_DB_NAME",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "ControlDB",
    "control_db_path",
]

T = TypeVar("T")

CONTROL_DB_NAME = "control.db"
BUSY_TIMEOUT_S = 5.0


def control_db_path(storage_path: str | Path) -> Path:
    """Return where the control database lives: `control.db` in the twin database's folder."""
    return Path(storage_path).parent / CONTROL_DB_NAME


class ControlDB:
    """An open control database: one writer thread for every write, one shared read connection.

    `read_only` opens an existing database without a writer (the CLI's `list`, `show` and
    `verify` beside a running gateway, or on a copy); its schema must be the current one.
    """

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._read_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._write_conn: sqlite3.Connection | None = None
        self._closed = False
        if read_only:
            self._read_conn = _connect(self.path, read_only=True)
            try:
                _check_version(self._read_conn, self.path)
            except BaseException:
                self._read_conn.close()
                raise
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="control-writer")
        try:
            self._executor.submit(self._open_writer).result()
            self._read_conn = _connect(self.path, read_only=True)
        except BaseException:
            self._executor.submit(self._close_writer).result()
            self._executor.shutdown(wait=True)
            raise

    def __enter__(self) -> ControlDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` in one write transaction on the writer thread; return what it returns."""
        return self.submit(fn).result()

    async def write_async(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`write` for the event loop: awaits the writer thread instead of blocking."""
        return await asyncio.wrap_future(self.submit(fn))

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> Future[T]:
        """Queue `fn(conn)` for the writer thread (in order) and return its future."""
        if self._closed:
            raise StoreError(f"{self.path}: the control database is closed")
        if self._executor is None:
            raise StoreError(
                f"{self.path}: the control database was opened read-only; open it without "
                "read_only to change it"
            )
        return self._executor.submit(self._run_write, fn)

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` on the shared read connection (short lookups; one at a time)."""
        if self._closed:
            raise StoreError(f"{self.path}: the control database is closed")
        with self._read_lock, self.reading():
            return fn(self._read_conn)

    @contextlib.contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        """A read connection of the caller's own, for long reads (verify) that must not hold
        the shared one; closed on exit."""
        conn = _connect(self.path, read_only=True)
        try:
            with self.reading():
                yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Turn SQLite's errors while reading into one StoreError saying what to do."""
        try:
            yield
        except sqlite3.Error as exc:
            raise _fault(exc, self.path, "read") from exc

    def close(self) -> None:
        """Finish queued writes, then close both connections; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.submit(self._close_writer).result()
            self._executor.shutdown(wait=True)
        self._read_conn.close()

    # -- on the writer thread ----------------------------------------------------------------

    def _open_writer(self) -> None:
        self._write_conn = _connect(self.path, read_only=False)
        migrate(self._write_conn, self.path)

    def _close_writer(self) -> None:
        if self._write_conn is not None:
            self._write_conn.close()
            self._write_conn = None

    def _run_write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._write_conn
        assert conn is not None, "the writer connection is opened before any write is queued"
        try:
            with write_transaction(conn):
                return fn(conn)
        except sqlite3.Error as exc:
            raise _fault(exc, self.path, "write") from exc


def migrate(conn: sqlite3.Connection, path: str | Path = "") -> int:
    """Bring the control database to the newest schema; return its version."""
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    except sqlite3.Error as exc:
        raise _fault(exc, path, "open") from exc
    if str(mode).lower() != "wal":
        raise StoreError(
            f"{path}: SQLite refused WAL journal mode (got {mode!r}); the control database "
            "needs WAL so that readers never block the writer. Put it on a local filesystem."
        )
    try:
        with write_transaction(conn):
            conn.execute(
                "CREATE TABLE IF NOT EXISTS _migrations ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
        newest = _version(conn)
        if newest > SCHEMA_VERSION:
            raise StoreError(_too_new(path, newest))
        for version, name, apply in MIGRATIONS:
            if version <= newest:
                continue
            with write_transaction(conn):
                apply(conn)
                conn.execute(
                    "INSERT INTO _migrations(version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, time.time()),
                )
            if newest:
                log.info("%s: control database migrated to schema %d (%s)", path, version, name)
    except sqlite3.Error as exc:
        raise _fault(exc, path, "migrate") from exc
    return SCHEMA_VERSION


# -- migrations ----------------------------------------------------------------------------------


def _m1_initial(conn: sqlite3.Connection) -> None:
    for statement in _M1:
        conn.execute(statement)


_M1 = (
    """CREATE TABLE users (
        name TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        grants TEXT NOT NULL,
        disabled INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL,
        updated REAL NOT NULL
    )""",
    """CREATE TABLE tokens (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        secret_sha256 TEXT NOT NULL UNIQUE,
        grants TEXT NOT NULL,
        created REAL NOT NULL,
        last_used REAL,
        revoked REAL
    )""",
    """CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        entry TEXT NOT NULL,
        hash TEXT NOT NULL
    )""",
    "CREATE INDEX audit_ts ON audit(ts)",
    """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
    """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
)

MIGRATIONS: list[tuple[int, str, Callable[[sqlite3.Connection], None]]] = [
    (1, "users, tokens, append-only audit", _m1_initial),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


# -- helpers -------------------------------------------------------------------------------------


def _connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    try:
        if read_only:
            # A URI, so that a read never creates the file; as_uri() escapes `?` and `#`.
            conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=BUSY_TIMEOUT_S,
            )
        else:
            # 0600 before SQLite creates it (its -wal and -shm take the same mode): it holds
            # password and token hashes, whatever the umask (the twin's files do the same).
            create_private_file(path, what="control database")
            conn = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
            )
    except (sqlite3.Error, StoreError) as exc:
        if isinstance(exc, StoreError):
            raise
        raise _fault(exc, path, "open") from exc
    try:
        # FULL, not the twin's NORMAL: a commit here is an account change or an audit entry,
        # rare next to telemetry, and an audit entry lost to a power cut is a hole in the record.
        conn.execute("PRAGMA synchronous=FULL")
        if read_only:
            conn.execute("PRAGMA query_only=1")
    except sqlite3.Error as exc:
        conn.close()
        raise _fault(exc, path, "open") from exc
    return conn


def _version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(version), 0) FROM _migrations").fetchone()[0])


def _check_version(conn: sqlite3.Connection, path: Path) -> None:
    try:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if not {"_migrations", "users", "tokens", "audit"} <= names:
            raise StoreError(
                f"{path}: not a control database (no users, tokens and audit tables); it is "
                f"`{CONTROL_DB_NAME}` beside the twin database"
            )
        version = _version(conn)
    except sqlite3.Error as exc:
        raise _fault(exc, path, "read") from exc
    if version > SCHEMA_VERSION:
        raise StoreError(_too_new(path, version))
    if version < SCHEMA_VERSION:
        raise StoreError(
            f"{path}: the control database has schema {version}; start the gateway (or run any "
            f"`opstwin user` command that changes it) to migrate it to {SCHEMA_VERSION}"
        )


def _too_new(path: str | Path, version: int) -> str:
    return (
        f"{path}: control database schema version {version} is newer than this gateway "
        f"supports ({SCHEMA_VERSION}); run the newer gateway or restore a matching backup."
    )


def _fault(exc: sqlite3.Error, path: str | Path, doing: str) -> DatabaseFault:
    corrupt = is_corruption(exc)
    message = f"{path}: cannot {doing} the control database: {explain(exc)}"
    if corrupt:
        message += (
            f". Stop the gateway, move {path} aside and restore a backup (users, tokens and the "
            "audit log are in it; a new empty one has no users)"
        )
    return DatabaseFault(message, corrupt=corrupt)
