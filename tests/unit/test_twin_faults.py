"""Twin store under broken storage: full disk, corrupt pages, read-only state, a second gateway.

Everything is real: a full disk is SQLite's own SQLITE_FULL (the write connection's
`max_page_count`, lowered through `limit_database_growth`); corruption is garbage written over
pages of a closed database file; a read-only state directory is one the opening process really
cannot write (as root, which ignores permission bits, a forked child drops to `nobody` first);
a second gateway is another process holding the same store open.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests_support import FakeClock, as_nobody, stored_revs

from drivers.contract import Quality, Sample
from gateway.demo import write_demo_config
from gateway.errors import StoreError
from gateway.twin import store as store_module
from gateway.twin import writer as writer_module
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore

POINTS = [PointDef(f"area/line/asset{i}/value", "dev", "float64") for i in range(10)]
TEXT = PointDef("area/line/asset/label", "dev", "string")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "twin.db"


def wait_for(check: Callable[[], object], what: str, within: float = 10.0) -> object:
    """Poll `check` until it is truthy (a worker thread is the subject, not the clock)."""
    deadline = time.monotonic() + within
    while not (result := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)
    return result


def burst(store: TwinStore, rounds: int, start: float = 0.0) -> None:
    """`rounds` batches, each changing every point once."""
    for r in range(rounds):
        store.ingest(
            [Sample(p.id, start + r + i / 100, Quality.GOOD) for i, p in enumerate(POINTS)]
        )


# -- 5: one gateway per database -------------------------------------------------------------------

HOLDER = """
import sys
from gateway.twin.store import TwinStore
from gateway.twin import store as store_module
from gateway.twin import writer as writer_module
from gateway.twin.model import PointDef
store = TwinStore(sys.argv[1], [PointDef("a/b/c", "dev", "float64")])
store.open()
print("open", flush=True)
sys.stdin.read()
store.close()
"""


@pytest.fixture
def held_by_other_process(db_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process with the store open on `db_path`, until the test ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(db_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()
    assert line == "open\n", f"holder failed: {line!r} {proc.stderr and proc.stderr.read()}"
    yield proc
    proc.stdin.close()
    proc.wait(10)


def test_a_second_store_on_the_same_database_is_refused_with_the_holders_pid(
    db_path: Path, held_by_other_process: subprocess.Popen[str]
) -> None:
    store = TwinStore(db_path, POINTS)
    with pytest.raises(StoreError) as caught:
        store.open()
    message = str(caught.value)
    assert f"another gateway (pid {held_by_other_process.pid}) is running on {db_path}" in message
    # Refused before touching the database: the holder's schema has only its own point.
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT id FROM points").fetchall() == [("a/b/c",)]


def test_the_lock_goes_with_the_store_and_readers_never_take_it(db_path: Path) -> None:
    first = TwinStore(db_path, POINTS)
    first.open()
    with pytest.raises(StoreError, match=f"pid {os.getpid()}"):
        TwinStore(db_path, POINTS).open()
    # The CLI's read views open the database read-only beside a running gateway.
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT count(*) FROM points").fetchone() == (len(POINTS),)
    first.close()
    with TwinStore(db_path, POINTS) as second:
        assert second.rev == 0


def test_a_store_that_fails_to_open_releases_the_lock(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not a database" * 200)
    with pytest.raises(StoreError):
        TwinStore(db_path, POINTS).open()
    db_path.unlink()
    with TwinStore(db_path, POINTS) as store:  # not "another gateway (pid <ours>)"
        assert store.rev == 0


# -- 10: private files whatever the umask ----------------------------------------------------------


@pytest.fixture
def lax_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_files_are_private_whatever_the_umask(tmp_path: Path, lax_umask: None) -> None:
    base = tmp_path / "base"
    base.mkdir()
    base.chmod(0o755)
    path = base / "var" / "state" / "twin.db"
    with TwinStore(path, POINTS) as store:
        burst(store, 3)
        store.flush()
        files = {p.name: mode(p) for p in path.parent.iterdir()}
        assert files == {
            "twin.db": 0o600,
            "twin.db-wal": 0o600,
            "twin.db-shm": 0o600,
            "twin.db.lock": 0o600,
        }
    assert mode(path.parent) == 0o700
    assert mode(path.parent.parent) == 0o700, "every directory the store creates"
    assert mode(base) == 0o755, "a directory it did not create is left alone"


def test_the_control_database_with_password_hashes_is_private(
    tmp_path: Path, lax_umask: None
) -> None:
    from gateway.control.db import ControlDB

    path = tmp_path / "control.db"
    with ControlDB(path) as control:
        assert control.path == path
    assert mode(path) == 0o600
    assert all(mode(p) == 0o600 for p in tmp_path.glob("control.db*"))


def test_the_demo_config_with_password_hashes_is_private(tmp_path: Path, lax_umask: None) -> None:
    path = write_demo_config(tmp_path, device_ports={}, http_port=8000, opcua_port=4840)
    assert mode(path) == 0o600


# -- 4c: a corrupt database is refused at open, with the way out -----------------------------------


def make_history(path: Path, rounds: int = 400) -> None:
    with TwinStore(path, POINTS) as store:
        burst(store, rounds)


def overwrite_pages(path: Path, every: int = 3) -> None:
    """Garbage over every `every`-th page after the header page of a closed database."""
    data = path.read_bytes()
    page = int.from_bytes(data[16:18], "big")
    garbage = random.Random(7)
    with path.open("r+b") as f:
        for number in range(2, len(data) // page + 1, every):
            f.seek((number - 1) * page)
            f.write(garbage.randbytes(page))


def test_a_corrupt_database_is_refused_at_open_with_recovery_steps(db_path: Path) -> None:
    make_history(db_path)
    overwrite_pages(db_path)
    with pytest.raises(StoreError) as caught:
        TwinStore(db_path, POINTS).open()
    message = str(caught.value)
    assert str(db_path) in message
    assert "corrupt" in message
    assert ".recover" in message and "backup" in message
    assert "\n" not in message and "Traceback" not in message


def test_a_file_that_is_not_a_database_is_refused_with_recovery_steps(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(StoreError, match=r"not an SQLite database.*\.recover"):
        TwinStore(db_path, POINTS).open()


# -- 4e: read-only state says so -------------------------------------------------------------------


def open_unprivileged(directory: Path, name: str) -> str:
    """Open a store on `directory/name` in a forked child that cannot override permissions.

    As root, permission bits do not apply, so the child drops to `nobody` (after changing into
    the directory, so the path up to it need not be traversable). Returns the outcome as text.
    """

    def open_store() -> str:
        try:
            TwinStore(Path(name), POINTS).open()
        except StoreError as exc:
            return f"StoreError: {exc}"
        return "opened"

    return as_nobody(open_store, cwd=directory)


def test_a_read_only_state_directory_says_read_only(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_history(state / "twin.db", rounds=5)  # an existing database, lock file and all
    for path in state.iterdir():
        path.chmod(0o666)  # the files are writable; SQLite must still create -wal and -shm
    state.chmod(0o555)
    try:
        outcome = open_unprivileged(state, "twin.db")
    finally:
        state.chmod(0o700)
    assert outcome.startswith("StoreError: "), outcome
    assert "read-only" in outcome and "unable to open" not in outcome
    assert "twin.db" in outcome and "directory" in outcome


def test_a_read_only_database_file_says_read_only(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_history(state / "twin.db", rounds=5)
    state.chmod(0o777)  # the directory is writable; the files are not
    for path in state.iterdir():
        path.chmod(0o444)
    outcome = open_unprivileged(state, "twin.db")
    assert outcome.startswith("StoreError: "), outcome
    assert "read-only" in outcome and "twin.db" in outcome


# -- 4a/4b: a full disk is visible, and what it keeps in memory is bounded ------------------------


def test_a_full_disk_is_reported_and_nothing_is_lost_within_the_bound(
    db_path: Path, fake_clock: FakeClock
) -> None:
    with TwinStore(db_path, POINTS, flush_rows=100, clock=fake_clock) as store:
        burst(store, 2)
        store.flush()
        assert store.problems() == []
        store.limit_database_growth(0)
        # History is compressed (~4 bytes a sample): enough that the commit needs a new page.
        burst(store, 2000, start=1000)
        with pytest.raises(StoreError, match="full"):
            store.flush(timeout=10)
        wait_for(store.problems, "a problem reported")
        problems = store.problems()
        assert any("cannot be written" in p and "full" in p for p in problems), problems
        assert store.stats.writer_error and store.stats.backlog_rows > 0

        store.limit_database_growth(None)
        store.flush(timeout=10)
        assert store.problems() == []
        assert store.stats.dropped_rows == 0
        events = store.events_since(0, limit=100_000)
        assert [e.rev for e in events] == list(range(1, store.rev + 1))


@pytest.mark.parametrize("bound", ["rows", "bytes"])
def test_the_backlog_is_bounded_keeps_current_values_and_records_what_was_dropped(
    db_path: Path, fake_clock: FakeClock, caplog: pytest.LogCaptureFixture, bound: str
) -> None:
    points = [*POINTS, TEXT]
    store = TwinStore(
        db_path,
        points,
        flush_rows=100,
        clock=fake_clock,
        backlog_rows=1000 if bound == "rows" else writer_module.BACKLOG_ROWS,
        backlog_bytes=256 * 1024 if bound == "bytes" else writer_module.BACKLOG_BYTES,
    )
    with store:
        burst(store, 2)
        store.flush()
        store.limit_database_growth(0)
        store.append_event("DeviceStateChanged", {"device": "dev", "state": "CONNECTED"})
        for r in range(400):
            fake_clock.advance(1)
            batch = [Sample(p.id, 1000.0 + r + i / 100, Quality.GOOD) for i, p in enumerate(POINTS)]
            batch.append(Sample(TEXT.id, f"{r:04d}" + "x" * 2000, Quality.GOOD))
            store.ingest(batch)
        wait_for(lambda: store.stats.writer_error, "the writer to fail")
        # Every uncommitted rev is either held or dropped once the writer has caught up.
        wait_for(
            lambda: (
                (st := store.stats).backlog_rows + st.dropped_rows + st.dropped_events
                == st.uncommitted_revs
            ),
            "the writer to drain its queue",
        )
        stats = store.stats
        assert stats.dropped_rows > 0
        assert stats.dropped_events == 0, "non-telemetry events go only after all history"
        if bound == "rows":
            assert stats.backlog_rows <= 1000
        else:
            assert stats.backlog_bytes <= 256 * 1024
        _, expected = store.snapshot()

        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gateway.twin"):
            store.limit_database_growth(None)
            store.flush(timeout=10)
        assert store.problems() == []

    with sqlite3.connect(db_path) as conn:
        # Current values survive in full.
        current = dict(conn.execute("SELECT point_id, value FROM current_values").fetchall())
        assert current == {pid: v.value for pid, v in expected.items()}
        # The oldest history went; the newest is there; the device event was kept.
        ((marker_rev, data),) = conn.execute(
            "SELECT rev, data FROM events WHERE type = 'BacklogDropped'"
        ).fetchall()
        lost = json.loads(data)
        assert lost["telemetry_rows"] == stats.dropped_rows
        assert lost["events"] == 0
        assert lost["last_rev"] == marker_rev
        revs = set(stored_revs(conn))
        missing = set(range(1, max(revs) + 1)) - revs
        assert len(missing) == stats.dropped_rows - 1  # the marker took one of the lost revs
        assert min(missing) == lost["first_rev"] and max(missing) < marker_rev
        assert max(revs) == expected[TEXT.id].rev
        assert conn.execute(
            "SELECT count(*) FROM events WHERE type = 'DeviceStateChanged'"
        ).fetchone() == (1,)
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    dropping = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropping) == 1, [r.getMessage() for r in caplog.records]
    assert f"{stats.dropped_rows} history rows" in dropping[0].getMessage()


# -- 4a/4d: corruption found while running --------------------------------------------------------


def test_corruption_found_by_a_read_is_a_store_error_and_a_problem(db_path: Path) -> None:
    make_history(db_path)
    with TwinStore(db_path, POINTS) as store:
        overwrite_pages(db_path, every=2)
        with pytest.raises(StoreError, match="corrupt") as caught:
            store.history(POINTS[0].id, 0, 1e12, limit=100_000)
        assert not isinstance(caught.value, sqlite3.Error)
        assert any("corrupt" in p for p in store.problems())


def test_a_long_integrity_check_stretches_the_systemd_start_timeout(
    db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_history(db_path, rounds=5)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = tmp_path / "notify.sock"
    listener.bind(str(address))
    listener.settimeout(10)  # a missing notification fails the test instead of hanging it
    monkeypatch.setenv("NOTIFY_SOCKET", str(address))
    monkeypatch.setattr(store_module, "CHECK_NOTICE_BYTES", 0)  # every database is "large"
    try:
        with TwinStore(db_path, POINTS):
            message = listener.recv(4096).decode()
    finally:
        listener.close()
    assert "STATUS=checking the twin database" in message
    assert "EXTEND_TIMEOUT_USEC=" in message
