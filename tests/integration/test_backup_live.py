"""Backups under a real write load, and a restore that a real gateway then runs on.

Two loads: a TwinStore fed from a thread as fast as it takes samples (many commits during the
copy), and `opstwin run` reading the simulated plant, with the CLI as a subprocess beside it, as
an operator would use it. Refusals of bad input are in tests/unit/test_backup.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests_support import stored_revs, stored_telemetry

from drivers.contract import Quality, Sample
from gateway.backup import backup, read_manifest
from gateway.control import AccountStore, ControlDB
from gateway.control.users import parse_grant
from gateway.demo import demo_config_data
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore, load_current
from plantsim import Plant

pytestmark = pytest.mark.slow

LEVEL = "utilities/cooling/tank1/level"


def test_a_backup_under_write_load_is_one_consistent_snapshot(tmp_path: Path) -> None:
    db = tmp_path / "state" / "twin.db"
    points = [PointDef(f"area1/line1/m{i}/value", "plc", "float64") for i in range(200)]
    store = TwinStore(db, points, history_days=3650, events_days=3650)
    store.open()
    with ControlDB(db.parent / "control.db") as control:
        AccountStore(control).add_user("alice", "correct horse", [parse_grant("viewer")])
    stop = threading.Event()
    rounds = 0

    def ingest() -> None:
        nonlocal rounds
        while not stop.is_set():
            rounds += 1
            store.ingest(
                [Sample(p.id, rounds + i / 1000, Quality.GOOD) for i, p in enumerate(points)]
            )
            time.sleep(0.0005)  # lets the writer commit in small batches: many commits

    # State first: 300 k samples of history and 3000 events of 8 KiB (~27 MB), so that the copy
    # takes ~800 steps of 8 pages, and the writer commits many times meanwhile.
    for k in range(1500):
        store.ingest([Sample(p.id, -k - i / 1000, Quality.GOOD) for i, p in enumerate(points)])
    for k in range(3000):
        store.append_event("OperatorNote", {"n": k, "text": "x" * 8192})
    store.flush()
    start_rev = store.committed_rev
    writer = threading.Thread(target=ingest, name="load")
    writer.start()
    try:
        deadline = time.monotonic() + 30
        while store.committed_rev <= start_rev:
            assert time.monotonic() < deadline, "the load never committed"
            time.sleep(0.01)
        rev_at_start = store.committed_rev
        commits_before = store.writer_load()[1]
        # A copy that does not hold one snapshot starts over at each of these commits.
        result = backup(db, tmp_path / "b1", step_pages=8)
        commits_during = store.writer_load()[1] - commits_before
        rev_after = store.committed_rev
    finally:
        stop.set()
        writer.join()
        store.close()

    assert commits_during > 0, "the writer committed during the copy (else this shows nothing)"
    assert result.restarts == 0
    rev = result.manifest.file("twin.db").details["rev"]
    assert rev_at_start <= rev <= rev_after
    copy = sqlite3.connect(tmp_path / "b1" / "twin.db")
    assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    # One moment's state: every rev up to the backup's, none missing, none after.
    assert stored_revs(copy) == list(range(1, rev + 1))
    assert load_current(copy)[1] == rev


async def test_backup_beside_a_running_gateway_and_restore_it_runs_on(
    tmp_path: Path, unused_tcp_port: int
) -> None:
    async with Plant(seed=5) as plant:
        port = unused_tcp_port
        data = demo_config_data(
            device_ports={"tank1": plant.tank.port, "meter1": plant.meter.port},
            http_port=port,
            opcua_port=0,
        )
        data["http"]["read_access"] = "token"  # so that a token from the backup must work
        data["opcua_server"]["enabled"] = False
        for device in data["devices"]:
            device["options"]["poll_interval_s"] = 0.1  # more revs sooner
        config = tmp_path / "site.yaml"
        config.write_text(yaml.safe_dump(data))
        db = tmp_path / "twin.db"
        dest = tmp_path / "backups" / "nightly"
        api = f"http://127.0.0.1:{port}"

        code, kept_token, err = await cli("token", "create", "before", "-g", "viewer", "-c", config)
        assert code == 0, err
        kept = {"Authorization": f"Bearer {kept_token.strip()}"}

        gateway = await start_gateway(config)
        try:
            health = await wait_for(api, kept, lambda h: h["storage"]["committed_rev"] > 20)
            rev_at_start = health["storage"]["committed_rev"]
            t_backup = time.time()
            code, out, err = await cli("backup", "--config", config, dest)
            assert code == 0, err
            t_backup_done = time.time()
            assert "passes PRAGMA integrity_check" in out
            backup_rev = read_manifest(dest).file("twin.db").details["rev"]
            assert backup_rev >= rev_at_start
            for name in ("twin.db", "control.db"):
                copy = sqlite3.connect(f"{(dest / name).as_uri()}?mode=ro", uri=True)
                assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
                copy.close()

            code, lost_token, err = await cli(
                "token", "create", "after", "-g", "viewer", "-c", config
            )
            assert code == 0, err
            lost = {"Authorization": f"Bearer {lost_token.strip()}"}
            assert (await get(f"{api}/twin", lost))[0] == 200
            await wait_for(api, kept, lambda h: h["storage"]["committed_rev"] > backup_rev + 10)

            code, _, err = await cli("restore", "--config", config, dest, "--yes")
            assert code == 1
            assert f"pid {gateway.pid}" in err and "systemctl stop opstwin-gateway" in err
            assert not await asyncio.to_thread(lambda: list(tmp_path.glob("*before-restore*")))
        finally:
            await stop_gateway(gateway)

        t_stopped = time.time()
        with sqlite3.connect(db) as conn:
            assert load_current(conn)[1] > backup_rev
            assert [r for r in stored_telemetry(conn) if t_backup_done < r[1] < t_stopped]

        code, out, err = await cli("restore", "--config", config, dest, "--yes")
        assert code == 0, err
        assert f"{db}.before-restore-" in out
        with sqlite3.connect(db) as conn:
            assert load_current(conn)[1] == backup_rev

        gateway = await start_gateway(config)
        try:
            await wait_for(api, kept, lambda h: h["status"] == "ok")
            assert (await get(f"{api}/twin", kept))[0] == 200
            assert (await get(f"{api}/twin", lost))[0] == 401
            query = f"{api}/telemetry/query?point={LEVEL}&limit=10000"
            _, before = await get(f"{query}&start=0&end={t_backup}", kept)
            assert before["rows"], "the history up to the backup is there"
            _, gone = await get(f"{query}&start={t_backup_done}&end={t_stopped}", kept)
            assert gone["rows"] == [], "what came after the backup went with the restore"
        finally:
            await stop_gateway(gateway)


async def cli(*args: Any) -> tuple[int, str, str]:
    """Run `opstwin ARGS` as a process (without blocking the plant's event loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        *map(str, args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def start_gateway(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "run",
        "--config",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "NOTIFY_SOCKET": ""},
    )


async def stop_gateway(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    assert proc.returncode == 0


async def get(url: str, headers: dict[str, str]) -> tuple[int, Any]:
    def fetch() -> tuple[int, Any]:
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, None

    return await asyncio.to_thread(fetch)


async def wait_for(api: str, headers: dict[str, str], ready: Any, within: float = 60) -> Any:
    """Poll /health until `ready(health)`; the gateway may still be starting."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        try:
            status, last = await get(f"{api}/health", headers)
            if status == 200 and ready(last):
                return last
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        await asyncio.sleep(0.25)
    pytest.fail(f"the gateway was not ready within {within} s: {last}")
