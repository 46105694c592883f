"""kill -9 during a write burst: the database stays consistent and keeps what was committed."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tests_support import import_file, stored_revs, stored_telemetry

from gateway.twin.store import TwinStore, load_current

CHILD = Path(__file__).with_name("twin_crash_child.py")
CYCLES = 5
COMMITS_BEFORE_KILL = 40


@pytest.mark.slow  # five child processes, each killed mid-burst
def test_kill_9_mid_burst_leaves_a_consistent_database(tmp_path: Path) -> None:
    path = tmp_path / "twin.db"
    previous = 0
    for cycle in range(CYCLES):
        opened_at, reported = _run_and_kill(path)
        # The restarted child saw everything the killed one had reported committed.
        assert opened_at >= previous, f"cycle {cycle}: reopened at {opened_at} < {previous}"
        _check_consistent(path, reported)
        previous = reported

    # The store reopens at the database's rev and continues from it.
    with TwinStore(path, import_file(CHILD).POINTS) as store:
        assert store.rev == _max_rev(path)
        _, values = store.snapshot()
        with sqlite3.connect(path) as conn:
            current, _ = load_current(conn)
            ids = dict(conn.execute("SELECT pid, id FROM points").fetchall())
        assert {pid: v.value for pid, v in values.items() if v.rev} == {
            ids[pid]: row[3] for pid, row in current.items()
        }


def _run_and_kill(path: Path) -> tuple[int, int]:
    """Run the child until it has committed a while, SIGKILL it mid-burst; (opened, reported)."""
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("open "), (
            f"child failed: {first!r} {proc.stderr and proc.stderr.read()}"
        )
        opened_at = int(first.split()[1])
        reported = opened_at
        for _ in range(COMMITS_BEFORE_KILL):
            line = proc.stdout.readline()
            assert line, f"child died: {proc.stderr and proc.stderr.read()}"
            reported = int(line)
        # Land the kill at an arbitrary point of the burst-and-commit cycle.
        time.sleep(random.uniform(0, 0.01))
        os.kill(proc.pid, signal.SIGKILL)
        # Lines printed before the kill are commits too.
        for line in proc.stdout:
            reported = int(line)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return opened_at, reported


def _max_rev(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return load_current(conn)[1]


def _check_consistent(path: Path, reported: int) -> None:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        telemetry = stored_telemetry(conn)
        revs = stored_revs(conn)
        assert revs == list(range(1, len(revs) + 1)), "revs must be exactly 1..max, no gaps"
        assert revs[-1] >= reported
        # The current values loaded are, for every point with telemetry, its newest row.
        newest: dict[int, tuple[Any, ...]] = {}
        for row in telemetry:
            newest[row[2]] = row
        current, top = load_current(conn)
        assert top == revs[-1]
        assert current == newest
