"""The twin's files on disk: one gateway per database, and private modes whatever the umask.

Two gateways on one database once both connected to every device before one died on a UNIQUE
constraint, so the store takes an exclusive `flock` on `<database>.lock` before it touches
anything else, and keeps it until it closes. flock belongs to the open file description, so a
second store is refused whether it is another process or the same one; the kernel drops the lock
when the holder dies, even by `kill -9`, so a stale file never blocks a restart. The file is never
deleted: unlinking a lock file lets a third process lock a new inode while a second still waits
on the old one. It holds the holder's pid, for the refusal message only.

The database holds the plant's history and the demo config holds password hashes: whatever the
umask, the store creates its directories 0700 and its files 0600. SQLite creates `-wal` and
`-shm` with the main file's mode, so creating the main file 0600 covers them. Files and
directories that already exist keep the mode an administrator gave them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from gateway.errors import DatabaseFault, StoreError

__all__ = [
    "PRIVATE_DIR",
    "PRIVATE_FILE",
    "LockHeld",
    "StoreLock",
    "create_private_dirs",
    "create_private_file",
    "lock_path",
    "read_only_fault",
]

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
_READ_ONLY_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


class LockHeld(StoreError):
    """Another process (a gateway, a restore) holds the database's lock."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder  # its pid as the lock file says, or "unknown"


def lock_path(db_path: Path) -> Path:
    """Where the lock file of the database at `db_path` lives."""
    return db_path.with_name(db_path.name + ".lock")


class StoreLock:
    """An exclusive lock on one database, held from `acquire` until `release`."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.path = lock_path(db_path)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise StoreError naming the gateway that holds it."""
        fd = _open_private(self.path, os.O_RDWR, what="lock file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise LockHeld(
                f"another gateway (pid {holder}) is running on {self.db_path}: stop it first "
                f"(systemctl stop opstwin-gateway), or give this one its own storage.path "
                f"(the lock is {self.path})",
                holder,
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"{self.path}: cannot lock the twin database: {exc}") from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise read_only_fault(self.path, exc) from exc
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (closing the descriptor drops the flock)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def create_private_dirs(directory: Path) -> None:
    """Create `directory` and its missing parents with mode 0700; leave existing ones alone."""
    missing = []
    probe = directory
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            continue
        except OSError as exc:
            raise read_only_fault(path, exc, what="directory") from exc
        os.chmod(path, PRIVATE_DIR)  # mkdir's mode is filtered by the umask


def create_private_file(path: Path, what: str = "twin database") -> None:
    """Create `path` empty with mode 0600 unless it exists; refuse if it cannot be written."""
    os.close(_open_private(path, os.O_RDWR, what=what))


def read_only_fault(path: Path, exc: OSError, *, what: str = "file") -> StoreError:
    """The StoreError for an OSError on `path`: "read-only" when that is what it means."""
    if exc.errno not in _READ_ONLY_ERRNOS:
        return DatabaseFault(f"{path}: cannot use the {what}: {exc.strerror or exc}")
    return DatabaseFault(f"{describe_read_only(path)} ({exc.strerror}); {_REMEDY}")


def describe_read_only(path: Path) -> str:
    """Say which of `path` and its directory is read-only, and for whom."""
    directory = path.parent if path.name else path
    on_ro_fs = False
    with contextlib.suppress(OSError):
        on_ro_fs = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    if on_ro_fs:
        return f"{path}: read-only: {directory} is on a read-only file system"
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path}: read-only: the file is not writable by uid {os.geteuid()}"
    return f"{path}: read-only: the directory {directory} is not writable by uid {os.geteuid()}"


def check_writable(db_path: Path) -> None:
    """Refuse, saying "read-only", a database or directory this process cannot write.

    SQLite creates `-wal`, `-shm` beside the database at every open, so the directory must be
    writable too; without this check the error is SQLite's "unable to open database file".
    `os.access` also answers for root, which permission bits do not stop but a read-only mount
    or an immutable directory does.
    """
    directory = db_path.parent
    for path in (db_path, directory):
        if path.exists() and not os.access(path, os.W_OK | (os.X_OK if path is directory else 0)):
            raise DatabaseFault(f"{describe_read_only(db_path)}; {_REMEDY}")


_REMEDY = (
    "the gateway writes the database, its -wal, -shm and .lock files there: make the directory "
    "and files writable by the gateway's user, or set storage.path to a writable place"
)


def _open_private(path: Path, flags: int, *, what: str) -> int:
    """Open `path`, creating it 0600 if missing (the umask does not apply)."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:
        pass
    except OSError as exc:
        raise read_only_fault(path, exc, what=what) from exc
    else:
        os.fchmod(fd, PRIVATE_FILE)
        return fd
    try:
        return os.open(path, flags)
    except OSError as exc:
        raise read_only_fault(path, exc, what=what) from exc


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"
