"""Hostile clients against a real `opstwin run` with a small descriptor limit (issue 13, finding 1).

The gateway runs as its own process with RLIMIT_NOFILE 512/512 (it cannot raise it), so the
numbers are small enough to exhaust for real in a test. While hundreds of connections that never
finish a request sit on the HTTP and OPC UA ports, the Modbus device restarts: the gateway must
see it go and reconnect within its normal backoff, keep its log small, and serve HTTP again once
the attack stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests_support import free_port

from gateway.demo import demo_config_data
from plantsim import TankDevice

pytestmark = pytest.mark.slow

NOFILE = 512
ATTACKERS = 600  # per port: together far more than the descriptors the gateway has
HEADER_TIMEOUT_S = 2.0
# How much longer than the header timeout a socket may stay in the gateway's descriptor table:
# aiohttp checks the keep-alive deadline on a timer, the sampler polls, CI machines are loaded.
HELD_SLACK_S = 4.0


@pytest.fixture(autouse=True)
def _room_for_the_attacker() -> Iterator[None]:
    # The test process opens the attack's sockets (2 x ATTACKERS); the gateway gets only NOFILE.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 4096) if hard != resource.RLIM_INFINITY else 4096
    if want < 2 * ATTACKERS + 200:
        pytest.skip(f"hard descriptor limit {hard} is too low to attack with {ATTACKERS} x 2")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class RunningGateway:
    """`opstwin run` in its own process, under a descriptor limit it cannot raise."""

    def __init__(self, state: Path, tank_port: int) -> None:
        self.http_port = free_port()
        self.opcua_port = free_port()
        data = demo_config_data(
            device_ports={"tank1": tank_port},
            http_port=self.http_port,
            opcua_port=self.opcua_port,
        )
        data["devices"][0]["options"].update(poll_interval_s=0.2, timeout_s=0.5)
        data["storage"]["path"] = str(state / "twin.db")
        data["http"]["header_timeout_s"] = HEADER_TIMEOUT_S
        data["opcua_server"]["enabled"] = True
        self.db = state / "twin.db"
        self.config = state / "site.yaml"
        self.config.write_text(yaml.safe_dump(data))
        self.stderr_path = state / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))

        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                preexec_fn=limit,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def http_cap(self) -> int:
        """The HTTP connection cap the gateway chose within its descriptor limit (its log)."""
        found = re.search(r"at most (\d+) HTTP and \d+ OPC UA connections", self.log)
        assert found, self.log[-3000:]
        return int(found[1])

    @property
    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def device_states(self) -> list[tuple[int, str]]:
        """(rev, state) of every committed DeviceStateChanged event of tank1."""
        if not self.db.exists():
            return []
        try:
            with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as c:
                rows = c.execute(
                    "SELECT rev, data FROM events WHERE type = 'DeviceStateChanged' ORDER BY rev"
                ).fetchall()
        except sqlite3.OperationalError:
            return []  # not created yet
        out = []
        for rev, data in rows:
            event = json.loads(data)
            if event.get("device") == "tank1":
                out.append((rev, event["state"]))
        return out


class HeldSockets:
    """Which TCP sockets on `port` a process holds, and for how long, read from /proc."""

    def __init__(self, pid: int, port: int) -> None:
        self.pid = pid
        self.port = port
        self.first_seen: dict[int, float] = {}
        self.last_seen: dict[int, float] = {}

    def snapshot(self) -> set[int]:
        """Inodes of the connected (not listening) sockets on `port` in the process's fd table."""
        mine: set[int] = set()
        for fd in Path(f"/proc/{self.pid}/fd").iterdir():
            with contextlib.suppress(OSError):  # closed while we looked
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    mine.add(int(target[8:-1]))
        on_port: set[int] = set()
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(FileNotFoundError):
                for line in Path(f"/proc/{self.pid}/net/{table}").read_text().splitlines()[1:]:
                    fields = line.split()
                    local_port = int(fields[1].rsplit(":", 1)[1], 16)
                    listening = fields[3] == "0A"
                    inode = int(fields[9])
                    if local_port == self.port and inode in mine and not listening:
                        on_port.add(inode)
        return on_port

    async def sample_until_cancelled(self, every: float = 0.1) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                now = time.monotonic()
                for inode in self.snapshot():
                    self.first_seen.setdefault(inode, now)
                    self.last_seen[inode] = now
                await asyncio.sleep(every)

    def lifetimes(self) -> list[float]:
        return [self.last_seen[i] - t for i, t in self.first_seen.items()]


async def _http_get(port: int, path: str = "/health") -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, (json.loads(body) if body.startswith(b"{") else {})


async def _wait_for(check: Any, within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
        except (TimeoutError, OSError, ValueError, IndexError):
            result = None
        if result:
            return result
        await asyncio.sleep(0.2)
    pytest.fail(f"timed out after {within}s waiting for {what}")


@pytest.fixture
async def tank() -> AsyncIterator[TankDevice]:
    async with TankDevice(seed=5) as device:
        yield device


async def _slow_header(port: int, opened: list[asyncio.StreamWriter]) -> None:
    """Open a connection that starts a request and never finishes it, and keep it as long as
    the gateway lets it stay open (a 503 refusal at the cap arrives as data, then EOF)."""
    with contextlib.suppress(OSError):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        opened.append(writer)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        while await reader.read(1024):
            pass


async def _silent(port: int, opened: list[asyncio.StreamWriter]) -> None:
    """Open a connection to the OPC UA port and send nothing, not even Hello, for as long as the
    gateway lets it stay open."""
    with contextlib.suppress(OSError):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        opened.append(writer)
        await reader.read(1024)


async def test_floods_do_not_starve_devices_and_http_comes_back(tmp_path, tank):
    gw = RunningGateway(tmp_path, tank.port)
    gw.start()
    try:
        await _wait_for(
            lambda: "CONNECTED" in [s for _, s in gw.device_states()],
            30,
            "the gateway to connect to the tank",
        )
        status, health = await _wait_for(lambda: _http_get(gw.http_port), 10, "HTTP /health")
        assert status == 200, health

        opened: list[asyncio.StreamWriter] = []
        attack: list[asyncio.Task[Any]] = [
            asyncio.create_task(_slow_header(gw.http_port, opened)) for _ in range(ATTACKERS)
        ]
        attack += [asyncio.create_task(_silent(gw.opcua_port, opened)) for _ in range(ATTACKERS)]
        held = HeldSockets(gw.pid, gw.http_port)
        sampler = asyncio.create_task(held.sample_until_cancelled())
        await asyncio.sleep(1.0)  # the burst is in (or queued in the kernel) by now

        # Under attack, the device goes away and comes back.
        before = len(gw.device_states())
        await tank.restart(downtime=2.0)
        restarted_at = time.monotonic()

        def reconnected() -> bool:
            states = [s for _, s in gw.device_states()[before:]]
            return "DISCONNECTED" in states and states[-1] == "CONNECTED"

        # The normal backoff after a 2 s outage is under 8 s (0.5 s doubling, half-jitter).
        await _wait_for(reconnected, 20, "tank1 to reconnect during the attack")
        reconnect_s = time.monotonic() - restarted_at

        # Slow-header connections are closed by the gateway, not held: every HTTP socket in the
        # gateway's descriptor table is gone within the header timeout (plus room for a loaded
        # machine). Counted on the gateway's side: the client's view also holds connections the
        # kernel has not handed to the gateway yet (the burst overflows the small accept backlog;
        # SYN and SYN-ACK retries bring them in over a minute), which CI once mistook for held.
        await asyncio.sleep(HEADER_TIMEOUT_S + HELD_SLACK_S)
        sampler.cancel()
        longest = max(held.lifetimes(), default=0.0)
        cap = gw.http_cap()
        assert len(held.first_seen) >= cap, (
            f"the gateway held only {len(held.first_seen)} HTTP connections at once or in turn "
            f"during the attack, under its cap of {cap}: the flood did not reach it"
        )
        assert longest <= HEADER_TIMEOUT_S + HELD_SLACK_S, (
            f"the gateway held a slow-header connection {longest:.1f} s "
            f"(header timeout {HEADER_TIMEOUT_S} s)"
        )

        for task in attack:
            task.cancel()
        await asyncio.gather(*attack, return_exceptions=True)
        for writer in opened:
            writer.close()

        status, health = await _wait_for(
            lambda: _http_get(gw.http_port), 15, "HTTP after the attack"
        )
        assert status == 200
        assert health["devices"]["tank1"]["state"] == "CONNECTED"
        assert gw.proc is not None and gw.proc.poll() is None, "the gateway survived"
    finally:
        code = gw.stop()
    log = gw.log
    assert code == 0, log[-3000:]
    assert "Too many open files" not in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert len(log) < 64_000, f"{len(log)} bytes of log during a 20 s attack"
    print(
        f"tank1 reconnected {reconnect_s:.1f} s after its restart, during the attack; the gateway "
        f"accepted {len(held.first_seen)} slow-header connections, held one {longest:.1f} s at most"
    )


def test_the_soft_descriptor_limit_is_raised_when_the_hard_limit_allows(tmp_path):
    script = (
        "import resource\n"
        "from gateway.fdlimit import raise_nofile_limit\n"
        "print(raise_nofile_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048))

    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    ).stdout
    assert out.strip() == "(2048, 2048) (2048, 2048)"
