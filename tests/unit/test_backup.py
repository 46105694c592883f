"""`opstwin backup` and `opstwin restore` on real databases: what they write, what they refuse.

In-process through `main` with a site config and real twin and control databases in a temporary
folder (the gateway itself, and a backup under its write load, are in
tests/integration/test_backup_live.py). Every refusal is checked for its exit code, a one-line
message naming the file and what to do, and for what it must not do: leave a backup that looks
whole, or replace anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from backup_support import (
    PASSWORD,
    POINTS,
    add_history,
    add_user,
    checkpoint,
    damage_page,
    digests,
    edit_manifest,
    reseal,
    set_schema_version,
    users,
    write_site,
)
from tests_support import NOBODY, as_nobody

import gateway.backup_cli  # noqa: F401  (imported before a fork: the child cannot read /root)
from gateway.backup import FORMAT, FORMAT_VERSION, read_manifest
from gateway.cli import main
from gateway.control import AccountStore, ControlDB
from gateway.control import db as control_schema
from gateway.twin import schema as twin_schema
from gateway.twin.store import TwinStore, load_current


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A config whose twin (300 rounds of 10 points) and control.db (user alice) exist."""
    config = write_site(tmp_path)
    add_history(tmp_path / "state" / "twin.db", rounds=300)
    add_user(tmp_path / "state" / "twin.db", "alice")
    return config


@pytest.fixture
def state(site: Path) -> Path:
    return site.parent / "state"


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., Any]:
    def call(*argv: str, stdin: str = "", tty: bool = False) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", _Stdin(stdin, tty))
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return call


class _Stdin(io.StringIO):
    def __init__(self, text: str, tty: bool) -> None:
        super().__init__(text)
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.fixture
def taken(site: Path, cli: Callable[..., Any]) -> Path:
    """A backup of `site`, taken with the CLI."""
    dest = site.parent / "backups" / "b1"
    code, _, err = cli("backup", "--config", str(site), str(dest))
    assert code == 0, err
    return dest


def one_line_refusal(err: str, *fragments: str) -> None:
    assert err.startswith("opstwin: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


# -- backup ---------------------------------------------------------------------------------------


def test_backup_writes_private_checked_copies_and_a_manifest(
    site: Path, state: Path, cli: Callable[..., Any]
) -> None:
    dest = site.parent / "backups" / "b1"
    code, out, err = cli("backup", "--config", str(site), str(dest))
    assert code == 0, err

    assert sorted(p.name for p in dest.iterdir()) == ["control.db", "manifest.json", "twin.db"]
    assert dest.stat().st_mode & 0o777 == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in dest.iterdir()} == dict.fromkeys(
        ["control.db", "manifest.json", "twin.db"], 0o600
    )
    assert not [p for p in dest.parent.iterdir() if p.name != "b1"], "no partial directory left"

    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["format"] == FORMAT and manifest["format_version"] == FORMAT_VERSION
    assert manifest["source"] == str(state / "twin.db")
    files = {f["name"]: f for f in manifest["files"]}
    for name, entry in files.items():
        data = (dest / name).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        # Self-contained: rollback-journal mode, so the copy needs no -wal beside it.
        assert data[18:20] == b"\x01\x01"
    assert files["twin.db"]["schema_version"] == twin_schema.SCHEMA_VERSION
    assert files["control.db"]["schema_version"] == control_schema.SCHEMA_VERSION
    assert files["twin.db"]["rev"] == 300 * len(POINTS)
    assert files["control.db"]["users"] == 1

    copy = sqlite3.connect(dest / "twin.db")
    assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert load_current(copy)[1] == 300 * len(POINTS)
    assert users(dest / "control.db") == ["alice"]

    assert f"backup written to {dest}" in out
    assert "rev 3000" in out and "1 user" in out and "integrity_check" in out
    assert f"opstwin restore --config {site} {dest}" in out


def test_backup_into_an_existing_empty_directory(site: Path, cli: Callable[..., Any]) -> None:
    dest = site.parent / "empty"
    dest.mkdir(mode=0o755)
    code, _, err = cli("backup", "--config", str(site), str(dest))
    assert code == 0, err
    assert (dest / "manifest.json").is_file()
    assert dest.stat().st_mode & 0o777 == 0o700


def test_backup_refuses_a_directory_that_is_not_empty(
    site: Path, taken: Path, cli: Callable[..., Any]
) -> None:
    before = digests(taken)
    code, _, err = cli("backup", "--config", str(site), str(taken))
    assert code == 1
    one_line_refusal(err, str(taken), "not empty", "new or empty directory")
    assert digests(taken) == before
    assert [p.name for p in taken.parent.iterdir()] == ["b1"]


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_backup_refuses_a_destination_that_cannot_be_a_directory(
    site: Path, cli: Callable[..., Any], where: str
) -> None:
    blocker = site.parent / "blocker"
    blocker.write_text("not a directory")
    dest = blocker if where == "a file" else blocker / "b1"
    code, _, err = cli("backup", "--config", str(site), str(dest))
    assert code == 1
    one_line_refusal(err, str(blocker))
    assert blocker.read_text() == "not a directory"


@pytest.fixture
def open_tree() -> Iterator[Path]:
    """A folder under /tmp that user nobody can traverse (pytest's own are 0700 root)."""
    folder = Path(tempfile.mkdtemp(prefix="opstwin-backup-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.mark.skipif(os.geteuid() != 0, reason="drops to user nobody, which needs root")
def test_backup_refuses_a_destination_it_cannot_write(open_tree: Path) -> None:
    # As root, permission bits do not apply: the command runs as nobody, who owns the state
    # (it must read it) but not the folder the backup is asked to go in.
    config = write_site(open_tree)
    db = open_tree / "state" / "twin.db"
    add_history(db, rounds=5)
    add_user(db, "alice")
    for path in [db.parent, *db.parent.iterdir()]:
        os.chown(path, NOBODY, NOBODY)
    config.chmod(0o644)
    locked = open_tree / "root-only"
    locked.mkdir(mode=0o755)
    code, err = main_as_nobody("backup", "-c", str(config), str(locked / "b1"))
    assert code == 1, err
    one_line_refusal(err, str(locked), "Permission denied", "choose a directory")
    assert list(locked.iterdir()) == []


def main_as_nobody(*argv: str) -> tuple[int, str]:
    """Run `main(argv)` as user nobody (tests_support.as_nobody); its exit code and stderr."""

    def run() -> str:
        sys.stderr = io.StringIO()
        sys.stdout = io.StringIO()
        try:
            code = main(list(argv))
        except BaseException as exc:
            code, sys.stderr = 99, io.StringIO(f"{type(exc).__name__}: {exc}")
        return json.dumps([code, sys.stderr.getvalue()])

    code, err = json.loads(as_nobody(run))
    return code, err


@pytest.mark.parametrize("name, table", [("twin.db", "points"), ("control.db", "users")])
def test_backup_of_a_damaged_database_fails_and_leaves_nothing(
    site: Path, state: Path, cli: Callable[..., Any], name: str, table: str
) -> None:
    checkpoint(state / name)
    damage_page(state / name, table)
    dest = site.parent / "backups" / "b1"
    code, _, err = cli("backup", "--config", str(site), str(dest))
    assert code == 1
    one_line_refusal(err, str(state / name), "integrity_check", "nothing was written")
    # The twin is copied first: a damaged control.db shows that its copy is removed too.
    assert list(dest.parent.iterdir()) == []


def test_backup_of_a_file_that_is_not_a_database(
    site: Path, state: Path, cli: Callable[..., Any]
) -> None:
    for side in state.glob("control.db-*"):
        side.unlink()
    (state / "control.db").write_bytes(os.urandom(8192))
    dest = site.parent / "backups" / "b1"
    code, _, err = cli("backup", "--config", str(site), str(dest))
    assert code == 1
    one_line_refusal(err, str(state / "control.db"), "not an SQLite database")
    assert list(dest.parent.iterdir()) == []


def test_backup_of_another_kind_of_database(
    site: Path, state: Path, cli: Callable[..., Any]
) -> None:
    for path in state.glob("twin.db*"):
        path.unlink()
    other = sqlite3.connect(state / "twin.db")
    other.execute("CREATE TABLE recipes(name TEXT)")
    other.commit()
    other.close()
    dest = site.parent / "backups" / "b1"
    code, _, err = cli("backup", "--config", str(site), str(dest))
    assert code == 1
    one_line_refusal(err, str(state / "twin.db"), "not a twin database", "check storage.path")
    assert list(dest.parent.iterdir()) == []


def test_backup_of_a_gateway_that_never_ran(tmp_path: Path, cli: Callable[..., Any]) -> None:
    config = write_site(tmp_path)
    code, _, err = cli("backup", "--config", str(config), str(tmp_path / "b1"))
    assert code == 1
    one_line_refusal(err, "no twin database", str(tmp_path / "state" / "twin.db"), "storage.path")
    assert not (tmp_path / "b1").exists()


# -- restore --------------------------------------------------------------------------------------


def test_restore_brings_the_backup_back_and_keeps_what_it_replaced(
    site: Path, state: Path, taken: Path, cli: Callable[..., Any]
) -> None:
    backup_rev = read_manifest(taken).file("twin.db").details["rev"]
    newer_rev = add_history(state / "twin.db", rounds=50, start=1000)
    add_user(state / "twin.db", "bob")  # after the backup: the restore takes bob away
    # control.db as the gateway leaves it when its read-only connection closes last: the
    # main file nearly empty, the users in the WAL. Deleting that WAL would lose them.
    assert (state / "control.db-wal").stat().st_size > 0

    code, out, err = cli("restore", "--config", str(site), str(taken), "--yes")
    assert code == 0, err

    assert users(state / "control.db") == ["alice"]
    twin = sqlite3.connect(state / "twin.db")
    assert load_current(twin)[1] == backup_rev
    twin.close()
    for name in ("twin.db", "control.db"):
        assert (state / name).stat().st_mode & 0o777 == 0o600
        assert not (state / f"{name}-wal").exists(), "an old WAL left beside a restored file"
    assert not list(state.glob(".*restore-*")), "temporary copies left"

    # Undo is possible: the replaced files, each with its WAL, hold the newer data.
    (kept_control,) = state.glob("control.db.before-restore-*[0-9]Z")
    assert Path(f"{kept_control}-wal").exists()
    assert users(kept_control) == ["alice", "bob"]
    (kept_twin,) = state.glob("twin.db.before-restore-*[0-9]Z")
    assert load_current(sqlite3.connect(kept_twin))[1] == newer_rev > backup_rev
    for kept in (kept_control, kept_twin):
        assert str(kept) in out
    assert "systemctl start opstwin-gateway" in out

    # The gateway's own stores open what was restored, and alice's password works.
    with TwinStore(state / "twin.db", POINTS) as store:
        assert store.committed_rev == backup_rev
    with ControlDB(state / "control.db") as control:
        assert AccountStore(control).authenticate_user("alice", PASSWORD).name == "alice"


def test_restore_onto_a_machine_without_state(
    site: Path, state: Path, taken: Path, cli: Callable[..., Any]
) -> None:
    shutil.rmtree(state)
    code, out, err = cli("restore", "--config", str(site), str(taken), "--yes")
    assert code == 0, err
    assert state.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in state.iterdir()) == ["control.db", "twin.db", "twin.db.lock"]
    assert "there were no files to replace" in out
    with TwinStore(state / "twin.db", POINTS) as store:
        assert store.committed_rev == 300 * len(POINTS)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_restore_by_root_leaves_files_the_service_user_can_open(
    site: Path, state: Path, taken: Path, cli: Callable[..., Any]
) -> None:
    # The service's DynamicUser owns its state folder; root runs the restore.
    (state / "twin.db.lock").unlink()  # a folder tidied by hand: root creates the lock file
    for path in [state, *state.iterdir()]:
        os.chown(path, NOBODY, NOBODY)
    code, _, err = cli("restore", "--config", str(site), str(taken), "--yes")
    assert code == 0, err
    for name in ("twin.db", "control.db", "twin.db.lock"):
        assert (state / name).stat().st_uid == NOBODY, name


def test_restore_needs_yes_when_it_cannot_ask(
    site: Path, state: Path, taken: Path, cli: Callable[..., Any]
) -> None:
    before = digests(state)
    code, _, err = cli("restore", "--config", str(site), str(taken))
    assert code == 2
    one_line_refusal(err, "--yes")
    assert digests(state) == before


@pytest.mark.parametrize("answer, restored", [("yes\n", True), ("no\n", False), ("", False)])
def test_restore_asks_on_a_terminal(
    site: Path, state: Path, taken: Path, cli: Callable[..., Any], answer: str, restored: bool
) -> None:
    add_user(state / "twin.db", "bob")
    code, _, err = cli("restore", "--config", str(site), str(taken), stdin=answer, tty=True)
    assert "passes every check" in err and str(state / "twin.db") in err and "type yes" in err
    if restored:
        assert code == 0, err
        assert users(state / "control.db") == ["alice"]
    else:
        assert code == 1
        assert err.rstrip().endswith("opstwin: restore cancelled; nothing was replaced")
        assert users(state / "control.db") == ["alice", "bob"]
        assert not list(state.glob("*before-restore*")) and not list(state.glob(".*"))


def test_restore_refused_while_a_gateway_runs(
    site: Path, state: Path, taken: Path, cli: Callable[..., Any]
) -> None:
    with TwinStore(state / "twin.db", POINTS):  # holds the store lock, as a gateway does
        before = digests(state)
        code, _, err = cli("restore", "--config", str(site), str(taken), "--yes")
        assert digests(state) == before
    assert code == 1
    one_line_refusal(
        err, f"pid {os.getpid()}", "systemctl stop opstwin-gateway", "nothing was replaced"
    )
    assert not list(state.glob("*before-restore*"))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])


def _swap(backup: Path) -> None:
    twin, control = backup / "twin.db", backup / "control.db"
    twin.rename(backup / "x")
    control.rename(twin)
    (backup / "x").rename(control)


def _files(change: Callable[[list[dict[str, Any]]], Any]) -> Callable[[Path], None]:
    def apply(doc: dict[str, Any]) -> None:
        change(doc["files"])

    return lambda backup: edit_manifest(backup, apply)


def _entry(file: str, **values: Any) -> Callable[[Path], None]:
    def change(files: list[dict[str, Any]]) -> None:
        next(f for f in files if f["name"] == file).update(values)

    return _files(change)


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    def apply(backup: Path) -> None:
        (backup / name).write_bytes(data)

    return apply


def _symlinked(name: str) -> Callable[[Path], None]:
    def apply(backup: Path) -> None:
        (backup / name).rename(backup / "elsewhere")
        (backup / name).symlink_to("elsewhere")

    return apply


def _then_reseal(*steps: Callable[[Path], Any]) -> Callable[[Path], None]:
    def apply(backup: Path) -> None:
        for step in steps:
            step(backup)
        reseal(backup)

    return apply


# (what is done to the backup, fragments the refusal must hold). The manifest is "resealed"
# where the test is about what SQLite finds, not about the checksum that would catch it first.
HOSTILE: dict[str, tuple[Callable[[Path], Any], tuple[str, ...]]] = {
    "manifest missing": (
        lambda b: (b / "manifest.json").unlink(),
        ("manifest.json", "no manifest", "give the directory `opstwin backup` wrote"),
    ),
    "manifest garbage": (
        _write("manifest.json", b"\x00\xff{garbage"),
        ("manifest.json", "not JSON", "use another"),
    ),
    "manifest a list": (_write("manifest.json", b"[1, 2]"), ("manifest.json", "not an opstwin")),
    "manifest huge": (_write("manifest.json", b" " * 70_000), ("manifest.json", "larger than")),
    "manifest from a newer format": (
        lambda b: edit_manifest(b, lambda d: d.update(format_version=99)),
        ("manifest.json", "format 99 is newer"),
    ),
    "a path in the manifest": (_entry("twin.db", name="../twin.db"), ("'../twin.db'", "no paths")),
    "an unknown file": (_entry("control.db", name="passwd"), ("'passwd'", "only twin.db")),
    "a file listed twice": (
        _files(lambda files: files.append(dict(files[0]))),
        ("twin.db is listed twice",),
    ),
    "a file not listed": (_files(lambda files: files.pop()), ("lists no control.db",)),
    "a bad checksum field": (_entry("twin.db", sha256="abc"), ("`sha256` is not",)),
    "a bad size field": (_entry("twin.db", bytes=-1), ("`bytes` is not",)),
    "a file missing": (lambda b: (b / "control.db").unlink(), ("control.db", "missing")),
    "a file that is a symlink": (_symlinked("control.db"), ("control.db", "not a regular file")),
    "a checksum mismatch": (lambda b: _flip_byte(b / "twin.db"), ("twin.db", "SHA-256")),
    "a truncated file": (
        _then_reseal(lambda b: _truncate(b / "twin.db")),
        ("twin.db", "another backup"),
    ),
    "a damaged page": (
        _then_reseal(lambda b: damage_page(b / "control.db", "users")),
        ("control.db", "integrity_check", "another backup"),
    ),
    "a file that is not SQLite": (
        _then_reseal(_write("twin.db", b"SQLite format 2\x00" + os.urandom(8000))),
        ("twin.db", "not an SQLite database"),
    ),
    "files swapped": (_then_reseal(_swap), ("twin.db", "not a twin database")),
    "a newer twin schema": (
        _then_reseal(
            lambda b: set_schema_version(b / "twin.db", 99),
            _entry("twin.db", schema_version=99),
        ),
        ("twin.db", "schema version 99 is newer", "older backup"),
    ),
    "a newer control schema": (
        _then_reseal(
            lambda b: set_schema_version(b / "control.db", 42),
            _entry("control.db", schema_version=42),
        ),
        ("control.db", "schema version 42 is newer"),
    ),
    "a schema the manifest misstates": (
        _entry("twin.db", schema_version=1),
        ("twin.db", f"schema version {twin_schema.SCHEMA_VERSION}", "altered"),
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_restore_refuses_a_bad_backup_and_replaces_nothing(
    site: Path, state: Path, taken: Path, cli: Callable[..., Any], case: str
) -> None:
    damage, fragments = HOSTILE[case]
    damage(taken)
    before = digests(state)
    code, _, err = cli("restore", "--config", str(site), str(taken), "--yes")
    assert code == 1, err
    one_line_refusal(err, *fragments)
    assert digests(state) == before
    assert not list(state.glob("*before-restore*")) and not list(state.glob(".*"))


@pytest.mark.parametrize("make", ["missing", "a file"])
def test_restore_refuses_a_source_that_is_no_directory(
    site: Path, state: Path, cli: Callable[..., Any], make: str
) -> None:
    src = site.parent / "nothing-here"
    if make == "a file":
        src.write_text("x")
    before = digests(state)
    code, _, err = cli("restore", "--config", str(site), str(src), "--yes")
    assert code == 1
    one_line_refusal(err, str(src), "give the directory `opstwin backup` wrote")
    assert digests(state) == before


def test_a_restore_that_fails_midway_is_undone(
    site: Path, state: Path, taken: Path, cli: Callable[..., Any]
) -> None:
    # control.db replaced by a directory: the twin is placed first, then control.db cannot be
    # kept aside (no hard link to a directory), and the twin must go back to what it was.
    add_history(state / "twin.db", rounds=5, start=5000)
    for path in state.glob("control.db*"):
        path.unlink()
    (state / "control.db").mkdir()
    before = digests(state)
    code, _, err = cli("restore", "--config", str(site), str(taken), "--yes")
    assert code == 1
    one_line_refusal(err, "cannot put the restored files in place", "nothing was replaced")
    assert digests(state) == before
    assert not list(state.glob("*before-restore*")) and not list(state.glob(".*"))
