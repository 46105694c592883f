"""`opstwin run` as systemd drives it: READY over the notify socket, SIGTERM, clean exit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from tests_support import free_port

from gateway.demo import write_demo_config
from gateway.twin.store import load_current
from plantsim import Plant

# Each test starts `opstwin run` as a process (imports, plant, gateway): several seconds.
pytestmark = pytest.mark.slow


async def test_run_reports_ready_serves_and_flushes_on_sigterm(tmp_path: Path, unused_tcp_port):
    async with Plant(seed=5) as plant:
        http_port = unused_tcp_port
        config = write_demo_config(
            tmp_path,
            device_ports={"tank1": plant.tank.port, "meter1": plant.meter.port},
            http_port=http_port,
            opcua_port=0,
        )
        notify_path = tmp_path / "notify.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.setblocking(False)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "run",
            "--config",
            str(config),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            messages = await _receive(notify, until="READY=1", within=20)
            assert any(m.startswith("READY=1") for m in messages)

            twin = await _get_json(f"http://127.0.0.1:{http_port}/twin", until_good=True)
            assert twin["points"]["utilities/cooling/tank1/level"]["quality"] == "GOOD"
            rev_served = twin["rev"]

            proc.send_signal(signal.SIGTERM)
            output, _ = await asyncio.wait_for(proc.communicate(), 20)
            assert proc.returncode == 0, output.decode()
            assert "STOPPING=1" in await _receive(notify, until="STOPPING=1", within=2)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            notify.close()

    db_path = yaml.safe_load(config.read_text())["storage"]["path"]
    db = sqlite3.connect(tmp_path / db_path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    _, max_rev = load_current(db)
    assert max_rev >= rev_served, "SIGTERM must flush everything the twin had accepted"


async def _receive(sock: socket.socket, until: str, within: float) -> list[str]:
    loop = asyncio.get_running_loop()
    got: list[str] = []
    deadline = time.monotonic() + within
    while not any(m.startswith(until) for m in got):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {until} within {within}s; got {got}"
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), remaining)
        except TimeoutError:
            continue
        got.extend(data.decode().splitlines())
    return got


async def _get_json(url: str, until_good: bool) -> dict:
    deadline = time.monotonic() + 15
    while True:
        body = await asyncio.to_thread(lambda: json.load(urllib.request.urlopen(url, timeout=5)))
        good = all(p["quality"] == "GOOD" for p in body["points"].values())
        if good or not until_good:
            return body
        assert time.monotonic() < deadline, f"points not GOOD: {body}"
        await asyncio.sleep(0.2)


async def test_run_on_a_busy_http_port_fails_fast_with_a_clear_error(tmp_path: Path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    try:
        # Devices that do not answer either: shutting down while drivers are still trying to
        # connect must not hang (asyncio.wait_for in 3.11 can swallow the cancellation).
        config = write_demo_config(
            tmp_path,
            device_ports={"tank1": free_port(), "meter1": free_port()},
            http_port=busy,
            opcua_port=0,
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "run",
            "--config",
            str(config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        holder.close()
    assert proc.returncode == 1, output.decode()
    assert f"cannot listen on http 127.0.0.1:{busy}" in output.decode()
