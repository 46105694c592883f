"""Backups of a gateway's two databases, and restoring one (`opstwin backup`, `opstwin restore`).

A backup is a directory with `twin.db` (telemetry, events, history), `control.db` (users, API
tokens, the audit chain) and `manifest.json` (format, opstwin version, time, and per file its
size, SHA-256, schema version and what it holds). It is taken while the gateway runs and writes.

How the copy stays consistent (measured, 2-core box, 110 MiB twin database, a thread ingesting
500 points every 20 ms): SQLite's online backup API copies N pages per step, and when another
connection commits between two steps, the next step starts the copy over. With 1000-page steps
the copy restarted 799 times in 20 s and never finished: every writer commit restarts it, and
the gateway commits every few milliseconds. Holding one read transaction on the source for the
whole copy makes every step read the same snapshot: 0 restarts in 30 steps (0.4 s), the copy
passes integrity_check, and the writer committed meanwhile as usual (16 commits, 2.5 ms mean,
as without a backup). Under WAL a reader never blocks the writer; what the held snapshot costs is
that checkpoints cannot pass it, so the WAL grows by what is written during the copy (the
writer's `journal_size_limit` shrinks it back after). So: steps of `STEP_PAGES` inside one read
transaction of a read-only connection (steps, not `pages=-1`, so that a Ctrl-C or SIGTERM is
handled between steps), and a restart counted anyway and refused past `MAX_RESTARTS`, so that a
case this reasoning missed fails loudly instead of copying forever.

The copies are switched to rollback-journal mode: a backup is self-contained files that open
read-only anywhere with no -wal or -shm beside them; the gateway turns WAL back on when it opens
a restored one. Each copy must pass a full `PRAGMA integrity_check` (also checking that indexes
match their tables, which the gateway's start-up quick_check does not). A backup is written into
a hidden sibling directory and renamed to DEST at the end, with the manifest written last:
a failed or interrupted backup never leaves a DEST that looks whole.

A restore checks everything before it replaces anything: the manifest, each file's size and
SHA-256 (computed while copying it into a temporary file beside its target, so that what is
checked is what is placed), integrity_check, the tables of its kind, and a schema version not
newer than this code. It holds the twin's store lock throughout, so no gateway starts midway.
The current files are kept as `<name>.before-restore-<UTC time>`, with their -wal and -shm
renamed alongside (a WAL holds committed transactions and belongs to its database: left beside
the restored file, SQLite would replay it into it).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard

from gateway import __version__
from gateway.control import db as control_schema
from gateway.control.db import control_db_path
from gateway.errors import GatewayError, StoreError
from gateway.twin import schema as twin_schema
from gateway.twin.files import PRIVATE_DIR, PRIVATE_FILE, LockHeld, StoreLock, create_private_dirs
from gateway.twin.schema import explain
from gateway.twin.store import load_current

__all__ = [
    "CONTROL_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "TWIN_NAME",
    "BackupError",
    "BackupFile",
    "BackupResult",
    "Manifest",
    "RestoreResult",
    "backup",
    "database_paths",
    "read_manifest",
    "restore",
]

FORMAT = "opstwin-backup"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TWIN_NAME = "twin.db"
CONTROL_NAME = "control.db"
# 1024 pages (4 MiB at SQLite's default page size) a step: measured ~0.01 s a step, so a
# Ctrl-C is handled at once, and the per-step overhead is nothing next to the copy.
STEP_PAGES = 1024
MAX_RESTARTS = 3
MAX_MANIFEST_BYTES = 64 * 1024
SIDE_SUFFIXES = ("-wal", "-shm", "-journal")
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_INTEGRITY_ROWS = 10


class BackupError(GatewayError):
    """A backup or restore that cannot be done; the message names the file and what to do."""


@dataclass(frozen=True, slots=True)
class _Kind:
    """What one of the two databases is: its description, tables and newest schema."""

    what: str
    tables: frozenset[str]
    schema_version: int
    details: Callable[[sqlite3.Connection], dict[str, int]]


def _twin_details(conn: sqlite3.Connection) -> dict[str, int]:
    _, rev = load_current(conn)
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    return {"rev": int(rev), "current_rev": int(meta.get("current_rev", 0))}


def _control_details(conn: sqlite3.Connection) -> dict[str, int]:
    (users,) = conn.execute("SELECT count(*) FROM users").fetchone()
    (tokens,) = conn.execute("SELECT count(*) FROM tokens WHERE revoked IS NULL").fetchone()
    (audit_seq,) = conn.execute("SELECT coalesce(max(seq), 0) FROM audit").fetchone()
    return {"users": int(users), "tokens": int(tokens), "audit_seq": int(audit_seq)}


_KINDS: dict[str, _Kind] = {
    TWIN_NAME: _Kind(
        "twin database",
        frozenset({"_migrations", "meta", "points", "events"}),
        twin_schema.SCHEMA_VERSION,
        _twin_details,
    ),
    CONTROL_NAME: _Kind(
        "control database",
        frozenset({"_migrations", "users", "tokens", "audit"}),
        control_schema.SCHEMA_VERSION,
        _control_details,
    ),
}
_DETAIL_KEYS = ("rev", "current_rev", "users", "tokens", "audit_seq")


@dataclass(frozen=True, slots=True)
class BackupFile:
    """One database in a backup, as the manifest describes it."""

    name: str
    bytes: int
    sha256: str
    schema_version: int
    details: Mapping[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The manifest's entry for this file."""
        entry: dict[str, Any] = {
            "name": self.name,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "schema_version": self.schema_version,
        }
        entry.update(self.details)
        return entry


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a backup holds (`manifest.json`)."""

    opstwin_version: str
    created: str  # ISO 8601, UTC
    source: str  # the storage.path the backup was taken from
    files: tuple[BackupFile, ...]
    format_version: int = FORMAT_VERSION

    def file(self, name: str) -> BackupFile:
        """The entry of file `name`."""
        return next(f for f in self.files if f.name == name)

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON data."""
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "opstwin_version": self.opstwin_version,
            "created": self.created,
            "source": self.source,
            "files": [f.to_json() for f in self.files],
        }


@dataclass(frozen=True, slots=True)
class BackupResult:
    """A backup written: where, what, how long, and how often a copy had to start over."""

    dest: Path
    manifest: Manifest
    seconds: float
    restarts: int


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """A restore done: the files placed and where the ones they replaced were kept."""

    manifest: Manifest
    placed: tuple[Path, ...]
    kept: tuple[Path, ...]
    seconds: float


def database_paths(storage_path: Path) -> dict[str, Path]:
    """Where each file of a backup lives on a gateway whose twin database is `storage_path`."""
    return {TWIN_NAME: storage_path, CONTROL_NAME: control_db_path(storage_path)}


# -- backup --------------------------------------------------------------------------------------


def backup(
    storage_path: Path,
    dest: Path,
    *,
    step_pages: int = STEP_PAGES,
    clock: Callable[[], float] = time.time,
) -> BackupResult:
    """Copy the twin and control databases into the new directory `dest`, checked (blocking)."""
    started = time.monotonic()
    dest = Path(os.path.abspath(dest))  # `.` and `..` have no name to put a sibling beside
    sources = database_paths(storage_path)
    for name, path in sources.items():
        if not path.is_file():
            raise BackupError(
                f"no {_KINDS[name].what} at {path}: has the gateway run with this config "
                "(it creates both databases at start)? Check storage.path"
            )
    _check_dest(dest)
    _make_dirs(dest.parent)
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    except OSError as exc:
        raise BackupError(
            f"{dest.parent}: cannot write the backup there ({exc.strerror}); choose a "
            "directory this user can write"
        ) from None
    try:
        os.chmod(work, PRIVATE_DIR)
        files = []
        restarts = 0
        for name, source in sources.items():
            copy = work / name
            restarts += _copy_database(source, copy, _KINDS[name].what, step_pages)
            files.append(_describe_copy(copy, name, source, dest))
        manifest = Manifest(
            opstwin_version=__version__,
            created=_iso(clock()),
            source=str(storage_path),
            files=tuple(files),
        )
        text = json.dumps(manifest.to_json(), indent=2) + "\n"
        _write_private(work / MANIFEST_NAME, text.encode())
        _fsync_dir(work)
        _move_into_place(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _fsync_dir(dest.parent)
    return BackupResult(dest, manifest, time.monotonic() - started, restarts)


def _check_dest(dest: Path) -> None:
    try:
        if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
            raise BackupError(
                f"{dest}: exists and is not a directory; give a new directory for the backup"
            )
        if dest.exists() and any(dest.iterdir()):
            raise BackupError(
                f"{dest}: the directory is not empty; a backup goes into a new or empty "
                "directory (it never overwrites or merges with another), e.g. one named by date"
            )
    except OSError as exc:
        raise BackupError(f"{dest}: cannot use it for the backup ({exc.strerror})") from None


def _make_dirs(directory: Path) -> None:
    """`mkdir -p` with mode 0700 for what it creates; refusals name the directory."""
    try:
        create_private_dirs(directory)
    except StoreError as exc:
        raise BackupError(f"{exc}; create it, or choose a directory this user can write") from None


def _copy_database(source: Path, target: Path, what: str, step_pages: int) -> int:
    """Copy `source` into the new file `target` with the online backup API; return restarts."""
    src = _connect_read_only(source, what, "back up")
    restarts = 0
    try:
        _create_private(target)
        dst = sqlite3.connect(str(target), isolation_level=None)
        try:
            last_remaining: int | None = None

            def progress(_status: int, remaining: int, _total: int) -> None:
                nonlocal restarts, last_remaining
                if last_remaining is not None and remaining > last_remaining:
                    restarts += 1
                    if restarts > MAX_RESTARTS:
                        raise BackupError(
                            f"{source}: the copy of the {what} started over {restarts} times "
                            "(it changed under the copy); try again, and report this"
                        )
                last_remaining = remaining

            # One read transaction for the whole copy: each step reads the same snapshot, so a
            # commit by the gateway does not restart it (see the module docstring).
            src.execute("BEGIN")
            src.execute("SELECT count(*) FROM sqlite_master").fetchone()
            src.backup(dst, pages=step_pages, progress=progress)
            src.execute("COMMIT")
            # Self-contained: the copy opens anywhere without a -wal beside it.
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
    except sqlite3.Error as exc:
        raise _db_error(exc, source, what, "back up") from None
    finally:
        src.close()
    _fsync_file(target)
    return restarts


def _describe_copy(copy: Path, name: str, source: Path, dest: Path) -> BackupFile:
    """Check a fresh copy (integrity, kind) and describe it for the manifest."""
    kind = _KINDS[name]
    try:
        problems, version, details = _inspect(
            copy, kind, source, f"check storage.path; nothing was written to {dest}", details=True
        )
    except sqlite3.Error as exc:
        raise BackupError(
            f"{source}: cannot check the copy of the {kind.what}: {explain(exc)}; nothing was "
            f"written to {dest}"
        ) from None
    if problems:
        raise BackupError(
            f"{source}: the copy of the {kind.what} fails PRAGMA integrity_check ({problems}): "
            f"the database is damaged; nothing was written to {dest}. "
            + _damaged_remedy(name, source)
        )
    size, digest = _hash_file(copy)
    return BackupFile(name, size, digest, version, details)


def _move_into_place(work: Path, dest: Path) -> None:
    try:
        # rename(2) replaces an empty directory and refuses a non-empty one (ENOTEMPTY), so a
        # DEST filled meanwhile is not overwritten.
        os.rename(work, dest)
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.EXDEV):
            raise BackupError(
                f"{dest}: cannot rename the finished backup onto it (a mount point?): give a "
                f"new directory inside it, e.g. {dest / 'opstwin-backup'}"
            ) from None
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise BackupError(
                f"{dest}: something was written into it during the backup; nothing was "
                "written there: give a new directory"
            ) from None
        raise BackupError(f"{dest}: cannot put the backup there ({exc.strerror})") from None


# -- restore -------------------------------------------------------------------------------------


def read_manifest(src: Path) -> Manifest:
    """Read and validate `src/manifest.json` (no database is opened)."""
    path = src / MANIFEST_NAME
    if not src.is_dir():
        what = "does not exist" if not src.exists() else "is not a directory"
        raise BackupError(f"{src}: {what}; give the directory `opstwin backup` wrote")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise BackupError(
            f"{path}: no manifest: {src} is not a finished backup (an interrupted one has "
            "none); give the directory `opstwin backup` wrote"
        ) from None
    except OSError as exc:
        raise BackupError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise BackupError(
            f"{path}: larger than {MAX_MANIFEST_BYTES // 1024} KiB: not a backup manifest"
        )
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BackupError(
            f"{path}: not a backup manifest (not JSON: {exc}); the backup is damaged, use "
            "another one"
        ) from None
    return _manifest_from_json(doc, path)


def restore(
    storage_path: Path,
    src: Path,
    *,
    confirm: Callable[[Manifest, Sequence[Path]], bool] | None = None,
    clock: Callable[[], float] = time.time,
) -> RestoreResult:
    """Replace the twin and control databases with a checked backup, keeping the current ones.

    Holds the store lock throughout. `confirm(manifest, existing)` is asked after every check
    passed and before anything is replaced; False cancels.
    """
    started = time.monotonic()
    manifest = read_manifest(src)
    targets = database_paths(storage_path)
    _make_dirs(storage_path.parent)
    lock = _lock_store(storage_path)
    staged: dict[str, Path] = {}
    try:
        for entry in manifest.files:
            staged[entry.name] = _stage(src / entry.name, entry, targets[entry.name])
        existing = [p for p in targets.values() if p.exists()]
        if confirm is not None and not confirm(manifest, existing):
            raise BackupError("restore cancelled; nothing was replaced")
        stamp = _keep_stamp(list(targets.values()), clock())
        with _signals_held():
            placed, kept = _place(staged, targets, stamp)
    finally:
        for tmp in staged.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        lock.release()
    return RestoreResult(manifest, placed, kept, time.monotonic() - started)


def _lock_store(storage_path: Path) -> StoreLock:
    """Take the twin's store lock, as a gateway does, or say which gateway holds it."""
    lock = StoreLock(storage_path)
    try:
        lock.acquire()
    except LockHeld as exc:
        raise BackupError(
            f"a gateway (pid {exc.holder}) is running on {storage_path}: stop "
            "it first (systemctl stop opstwin-gateway), then restore; nothing was replaced"
        ) from None
    except StoreError as exc:  # DatabaseFault among them: the directory, the lock file
        raise BackupError(f"cannot restore into {storage_path.parent}: {exc}") from None
    try:
        # A lock file this (root) restore created must stay openable by the service's user.
        _own_like(lock.path, storage_path.parent)
    except OSError as exc:
        lock.release()
        raise BackupError(f"{lock.path}: cannot give it the directory's owner: {exc}") from None
    return lock


def _stage(source: Path, entry: BackupFile, target: Path) -> Path:
    """Copy a backup file beside its target and check the copy; return the copy's path."""
    kind = _KINDS[entry.name]
    if source.is_symlink() or not source.is_file():
        raise BackupError(
            f"{source}: missing (or not a regular file) but named in the manifest; the backup "
            "is incomplete: use another one. Nothing was replaced"
        )
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.restore-", dir=target.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, PRIVATE_FILE)
        digest = hashlib.sha256()
        size = 0
        with open(source, "rb") as f, open(fd, "wb", closefd=False) as out:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(fd)
        if size != entry.bytes or digest.hexdigest() != entry.sha256:
            raise BackupError(
                f"{source}: does not match the manifest ({size} bytes, SHA-256 "
                f"{digest.hexdigest()[:12]}…; the manifest says {entry.bytes} bytes, "
                f"{entry.sha256[:12]}…): the file changed or was damaged after the backup was "
                "written. Use another backup; nothing was replaced"
            )
        _check_staged(tmp, source, entry, kind)
        _own_like(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BackupError(
            f"cannot copy {source} to {target.parent} ({exc.strerror}); nothing was replaced"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return tmp


def _check_staged(tmp: Path, source: Path, entry: BackupFile, kind: _Kind) -> None:
    remedy = "Use another backup; nothing was replaced"
    try:
        problems, version, _ = _inspect(
            tmp, kind, source, f"the backup is damaged or its files were mixed up. {remedy}"
        )
    except sqlite3.Error as exc:
        raise BackupError(
            f"{source}: cannot read the {kind.what} of the backup: {explain(exc)}. {remedy}"
        ) from None
    if problems:
        raise BackupError(
            f"{source}: fails PRAGMA integrity_check ({problems}): the {kind.what} in the "
            f"backup is damaged. {remedy}"
        )
    if version > kind.schema_version:
        raise BackupError(
            f"{source}: {kind.what} schema version {version} is newer than this opstwin "
            f"{__version__} supports ({kind.schema_version}); restore it with the opstwin that "
            "wrote it (or a newer one), or use an older backup. Nothing was replaced"
        )
    if version != entry.schema_version:
        raise BackupError(
            f"{source}: has schema version {version}, the manifest says "
            f"{entry.schema_version}: the backup was altered. Use another backup; nothing was "
            "replaced"
        )


def _place(
    staged: Mapping[str, Path], targets: Mapping[str, Path], stamp: str
) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """Keep the current files aside and rename the staged ones in; undo all if one step fails."""
    undo: list[Callable[[], None]] = []
    kept: list[Path] = []
    placed: list[Path] = []
    try:
        for name, target in targets.items():
            keep = target.with_name(f"{target.name}.before-restore-{stamp}")
            existed = target.exists()
            if existed:
                # A hard link first, so that twin.db names a whole database at every instant
                # (the old one, then the restored one): a crash mid-restore never leaves a
                # gateway to start on no database at all, which it would create empty.
                os.link(target, keep)
                undo.append(functools.partial(keep.unlink, missing_ok=True))
                kept.append(keep)
            # Before the new file arrives: SQLite would replay an old WAL into it.
            for suffix in SIDE_SUFFIXES:
                side = Path(f"{target}{suffix}")
                if side.exists():
                    kept_side = Path(f"{keep}{suffix}")
                    os.rename(side, kept_side)
                    undo.append(functools.partial(os.rename, kept_side, side))
                    kept.append(kept_side)
            os.replace(staged[name], target)
            if existed:
                undo.append(functools.partial(os.rename, keep, target))
            else:
                undo.append(target.unlink)
            placed.append(target)
        for directory in {t.parent for t in targets.values()}:
            _fsync_dir(directory)
    except OSError as exc:
        failed = _undo(undo)
        state = (
            "nothing was replaced"
            if not failed
            else f"undoing it failed too ({failed}): check the files there by hand"
        )
        raise BackupError(f"cannot put the restored files in place ({exc}); {state}") from None
    return tuple(placed), tuple(kept)


def _undo(steps: list[Callable[[], None]]) -> str:
    errors = []
    for step in reversed(steps):
        try:
            step()
        except OSError as exc:
            errors.append(str(exc))
    return "; ".join(errors)


def _keep_stamp(targets: Sequence[Path], now: float) -> str:
    """A UTC time for the kept files' names, made unique among what is already there."""
    base = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        stamp = base if n == 1 else f"{base}-{n}"
        names = [f"{t}.before-restore-{stamp}{s}" for t in targets for s in ("", *SIDE_SUFFIXES)]
        if not any(os.path.lexists(name) for name in names):
            return stamp
    raise BackupError(f"too many restores at {base}; move the .before-restore- files away")


def _own_like(path: Path, target: Path) -> None:
    """As root, give `path` the owner of `target` (or of its directory if it does not exist).

    The service runs as a DynamicUser that owns its state directory; a restore run by root
    would otherwise leave it files it cannot open (0600 root).
    """
    if os.geteuid() != 0:
        return
    reference = target if target.exists() else target.parent
    st = reference.stat()
    if (st.st_uid, st.st_gid) != (path.stat().st_uid, path.stat().st_gid):
        os.chown(path, st.st_uid, st.st_gid)


# -- manifest ------------------------------------------------------------------------------------


def _manifest_from_json(doc: Any, path: Path) -> Manifest:
    def bad(why: str) -> BackupError:
        return BackupError(f"{path}: {why}; the backup is damaged or not one: use another")

    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f'not an opstwin backup manifest (no "format": "{FORMAT}")')
    version = doc.get("format_version")
    if not _is_int(version):
        raise bad("`format_version` is not a whole number")
    if version > FORMAT_VERSION:
        raise BackupError(
            f"{path}: backup format {version} is newer than this opstwin {__version__} reads "
            f"({FORMAT_VERSION}); restore it with the opstwin that wrote it "
            f"({_text(doc.get('opstwin_version'))})"
        )
    entries = doc.get("files")
    if not isinstance(entries, list):
        raise bad("`files` is not a list")
    files: dict[str, BackupFile] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise bad(f"files[{i}] is not an object")
        name = entry.get("name")
        if not isinstance(name, str) or name not in _KINDS:
            raise bad(
                f"files[{i}] names {_text(name)!r}; a backup holds only "
                f"{' and '.join(_KINDS)} (no other names, no paths)"
            )
        if name in files:
            raise bad(f"{name} is listed twice")
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise bad(f"{name}: `sha256` is not 64 lower-case hex digits")
        for key in ("bytes", "schema_version", *_DETAIL_KEYS):
            value = entry.get(key)
            if (key in ("bytes", "schema_version") or value is not None) and not (
                _is_int(value) and value >= 0
            ):
                raise bad(f"{name}: `{key}` is not a whole number >= 0")
        details = {k: entry[k] for k in _DETAIL_KEYS if entry.get(k) is not None}
        files[name] = BackupFile(name, entry["bytes"], digest, entry["schema_version"], details)
    missing = [name for name in _KINDS if name not in files]
    if missing:
        raise bad(f"it lists no {' and no '.join(missing)}")
    return Manifest(
        opstwin_version=_text(doc.get("opstwin_version")),
        created=_text(doc.get("created")),
        source=_text(doc.get("source")),
        files=tuple(files[name] for name in _KINDS),
        format_version=version,
    )


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> str:
    """A manifest string for messages: printable and short, whatever the file holds."""
    text = value if isinstance(value, str) else "?"
    text = "".join(c if c.isprintable() else "?" for c in text[:200])
    return text


# -- SQLite and file helpers ---------------------------------------------------------------------


def _connect_read_only(
    path: Path, what: str, doing: str, *, immutable: bool = False
) -> sqlite3.Connection:
    """A connection that never writes `path`; `immutable` (a file nobody else has open) also
    creates no -wal or -shm beside it."""
    uri = f"{path.resolve().as_uri()}?mode=ro" + ("&immutable=1" if immutable else "")
    try:
        return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise _db_error(exc, path, what, doing) from None


def _inspect(
    path: Path, kind: _Kind, shown: Path, remedy: str, *, details: bool = False
) -> tuple[str, int, dict[str, int]]:
    """Check a private copy of a database of `kind`: (integrity problems, schema version, and
    with `details` what it holds). Problems are '' when it passes; then the rest is read.

    SQLite's "malformed" (the damage stops the check itself) counts as a problem found; other
    SQLite errors (not a database at all, I/O) are raised.
    """
    conn = _connect_read_only(path, kind.what, "check", immutable=True)
    try:
        try:
            problems = _integrity_problems(conn)
        except sqlite3.DatabaseError as exc:
            if (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF != sqlite3.SQLITE_CORRUPT:
                raise
            problems = " ".join(str(exc).split())
        if problems:
            return problems, 0, {}
        version = _schema_version(conn, shown, kind, remedy)
        return "", version, kind.details(conn) if details else {}
    finally:
        conn.close()


def _integrity_problems(conn: sqlite3.Connection) -> str:
    """'' if PRAGMA integrity_check passes, else its first findings on one line."""
    rows = conn.execute(f"PRAGMA integrity_check({_INTEGRITY_ROWS})").fetchall()
    if rows == [("ok",)]:
        return ""
    return "; ".join(" ".join(str(row[0]).split()) for row in rows)


def _schema_version(conn: sqlite3.Connection, path: Path, kind: _Kind, remedy: str) -> int:
    """The schema version of a database of `kind`; a file without its tables is refused."""
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    missing = kind.tables - names
    if missing:
        tables = ", ".join(sorted(missing))
        raise BackupError(f"{path}: not a {kind.what} (it has no {tables} table); {remedy}")
    (version,) = conn.execute("SELECT coalesce(max(version), 0) FROM _migrations").fetchone()
    return int(version)


def _db_error(exc: sqlite3.Error, path: Path, what: str, doing: str) -> BackupError:
    return BackupError(f"{path}: cannot {doing} the {what}: {explain(exc)}")


def _damaged_remedy(name: str, source: Path) -> str:
    if name == TWIN_NAME:
        return twin_schema.recovery_steps(source)
    return (
        f"Stop the gateway, move {source} aside and restore an earlier backup (users, tokens "
        "and the audit log are in it)"
    )


def _hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _create_private(path: Path) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)  # the umask does not apply
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make renames and new names in `directory` durable (a power cut keeps them)."""
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while files are renamed into place (microseconds): an
    exception between two renames would leave half a restore. They are delivered after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
