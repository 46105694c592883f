"""The audit log stored in control.db: appends chain, reads page, verify finds what was changed.

A real control database per test; tampering is an SQL statement on its own connection, as it
would be on a gateway (after dropping the append-only triggers, as a tamperer would).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.audit.chain import GENESIS_HASH, AuditEntry, chain_rows
from gateway.control import AuditLog, ControlDB, control_db_path
from gateway.control.db import SCHEMA_VERSION
from gateway.errors import StoreError


def entry(i: int, **fields: object) -> AuditEntry:
    return AuditEntry.model_validate(
        {"ts": 1_700_000_000.0 + i, "actor": "alice", "action": "access.read", **fields}
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "control.db"


@pytest.fixture
def db(path: Path) -> Iterator[ControlDB]:
    with ControlDB(path) as opened:
        yield opened


@pytest.fixture
def log(db: ControlDB) -> AuditLog:
    return AuditLog(db)


def tamper(path: Path, sql: str, *params: object) -> None:
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
    conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    conn.execute(sql, params)
    conn.commit()
    conn.close()


def test_control_db_lives_beside_the_twin():
    assert control_db_path(Path("/var/lib/opstwin/twin.db")) == Path("/var/lib/opstwin/control.db")


def test_a_new_database_is_wal_and_current(db, path):
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT max(version) FROM _migrations").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_reopening_does_not_migrate_again(path):
    ControlDB(path).close()
    ControlDB(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM _migrations").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_appends_chain_from_genesis(log):
    rows = [log.append(entry(i)) for i in range(5)]
    assert rows == list(chain_rows([entry(i) for i in range(5)]))
    assert log.head() == (5, rows[-1].hash)
    assert log.verify().ok and log.verify().checked == 5


def test_an_empty_log_verifies(log):
    result = log.verify()
    assert result.ok and result.checked == 0 and result.last_hash == GENESIS_HASH
    assert log.head() == (0, GENESIS_HASH)


def test_append_many_is_one_chain(log):
    log.append(entry(0))
    rows = log.append_many([entry(1), entry(2)])
    assert [r.seq for r in rows] == [2, 3]
    assert log.verify().ok


def test_async_appends_keep_order_and_chain(log):
    async def many():
        return await asyncio.gather(*(log.append_async(entry(i)) for i in range(20)))

    rows = asyncio.run(many())
    assert sorted(r.seq for r in rows) == list(range(1, 21))
    assert asyncio.run(log.append_many_async([entry(99)]))[0].seq == 21
    assert log.verify().ok


def test_appends_from_many_threads_make_one_chain(log):
    def worker(k: int) -> None:
        for i in range(10):
            log.append(entry(k * 100 + i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.verify().checked == 40


def test_two_processes_appending_make_one_chain(path, log):
    # A second ControlDB on the same file stands in for an `opstwin` command beside the gateway:
    # each append reads the head inside its own write transaction.
    with ControlDB(path) as other:
        other_log = AuditLog(other)
        for i in range(10):
            (log if i % 2 else other_log).append(entry(i))
    assert log.verify().checked == 10


def test_rows_pages_after_a_seq(log):
    log.append_many([entry(i) for i in range(10)])
    assert [r.seq for r in log.rows(0, 3)] == [1, 2, 3]
    assert [r.seq for r in log.rows(8, 100)] == [9, 10]
    assert log.rows(10) == []
    assert [r.seq for r in log.tail(3)] == [8, 9, 10]
    assert log.rows(0, 1)[0].entry == entry(0).canonical()


@pytest.mark.parametrize("limit", [0, -1, 10_001, True, 2.5])
def test_bad_limits_are_refused(log, limit):
    with pytest.raises(ValueError, match="limit must be a whole number"):
        log.rows(0, limit)


def test_the_table_refuses_update_and_delete(log, path):
    log.append(entry(0))
    conn = sqlite3.connect(path)
    for sql in ("UPDATE audit SET entry = '{}'", "DELETE FROM audit"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(sql)
    conn.close()
    assert log.verify().ok


def test_an_edited_entry_is_named(log, path):
    log.append_many([entry(i) for i in range(5)])
    edited = entry(2, actor="mallory").canonical()
    tamper(path, "UPDATE audit SET entry = ? WHERE seq = 3", edited)
    result = log.verify()
    assert (result.ok, result.broken_seq, result.problem) == (False, 3, "mismatch")
    assert result.checked == 2


def test_a_deleted_row_is_named(log, path):
    log.append_many([entry(i) for i in range(5)])
    tamper(path, "DELETE FROM audit WHERE seq = 2")
    result = log.verify()
    assert (result.broken_seq, result.problem) == (2, "missing")


def test_a_malformed_head_stops_appends(log, path):
    log.append(entry(0))
    tamper(path, "UPDATE audit SET hash = 'not a hash' WHERE seq = 1")
    with pytest.raises(StoreError, match=r"head \(seq 1\) has a malformed hash.*audit verify"):
        log.append(entry(1))
    assert log.head()[0] == 1  # nothing was added


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    n=st.integers(1, 12),
    data=st.data(),
)
def test_any_single_edit_is_found_at_its_row(tmp_path_factory, n, data):
    path = tmp_path_factory.mktemp("audit") / "control.db"
    with ControlDB(path) as db:
        log = AuditLog(db)
        reasons = data.draw(st.lists(st.text(max_size=20), min_size=n, max_size=n))
        log.append_many([entry(i, reason=r) for i, r in enumerate(reasons)])
        victim = data.draw(st.integers(1, n))
        how = data.draw(st.sampled_from(["entry", "hash", "ts-only"]))
        if how == "entry":
            tamper(path, "UPDATE audit SET entry = ? WHERE seq = ?", entry(-1).canonical(), victim)
        elif how == "hash":
            tamper(path, "UPDATE audit SET hash = ? WHERE seq = ?", "0" * 64, victim)
        else:
            # The ts column is a copy for finding rows by time; the hash covers the entry's own.
            tamper(path, "UPDATE audit SET ts = 0 WHERE seq = ?", victim)
        result = log.verify()
    if how == "ts-only":
        assert result.ok
    else:
        assert (result.ok, result.broken_seq) == (False, victim)


def test_verify_reads_while_the_writer_appends(log):
    log.append_many([entry(i) for i in range(200)])
    stop = threading.Event()

    def writer() -> None:
        i = 1000
        while not stop.is_set():
            log.append(entry(i))
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(5):
            assert log.verify().ok
    finally:
        stop.set()
        thread.join()


def test_a_read_only_copy_verifies(path, log):
    log.append_many([entry(i) for i in range(3)])
    with ControlDB(path, read_only=True) as ro:
        assert AuditLog(ro).verify().checked == 3
        with pytest.raises(StoreError, match="read-only"):
            AuditLog(ro).append(entry(9))


def test_read_only_refuses_a_file_that_is_not_a_control_database(tmp_path):
    other = tmp_path / "twin.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE events (rev INTEGER)")
    conn.close()
    with pytest.raises(StoreError, match="not a control database"):
        ControlDB(other, read_only=True)


def test_verify_after_checks_only_what_was_appended_since_a_verified_head(log, path):
    log.append_many([entry(i) for i in range(5)])
    whole = log.verify()
    assert whole.ok and whole.checked == 5
    log.append_many([entry(i) for i in range(5, 8)])
    since = log.verify_after(whole.last_seq, whole.last_hash)
    assert since.ok and since.checked == 3 and since.last_seq == 8
    assert since.last_hash == log.head()[1]
    # An edit before the verified head is not its business (the full pass finds it) ...
    tamper(path, "UPDATE audit SET entry = replace(entry, 'alice', 'mallory') WHERE seq = 2")
    assert log.verify_after(whole.last_seq, whole.last_hash).ok
    assert not log.verify().ok
    # ... an edit after it is, and so is a head that is not the one verified.
    tamper(path, "UPDATE audit SET entry = replace(entry, 'alice', 'mallory') WHERE seq = 7")
    broken = log.verify_after(whole.last_seq, whole.last_hash)
    assert not broken.ok and broken.broken_seq == 7 and broken.checked == 1
    assert not log.verify_after(whole.last_seq, GENESIS_HASH).ok
