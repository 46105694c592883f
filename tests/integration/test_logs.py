"""`opstwin run`'s stderr as journald and log shippers read it: one event per line, every line.

The gateway runs as a process against the simulated tank and a meter that is not there (its port
closed), so that it logs a real warning ("meter1: cannot connect…") beside its start-up lines.
Its stderr is a pipe of the test's own, so that JOURNAL_STREAM can name it as systemd would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from logs_support import LEVELS, parse_json, parse_text, split_priority
from tests_support import free_port

from gateway.demo import write_demo_config
from gateway.logfmt import priority
from plantsim import Plant

# Each run starts `opstwin run` as a process (imports, plant, gateway): several seconds.
pytestmark = pytest.mark.slow

LEVELNO = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


@pytest.mark.parametrize(
    ("fmt", "stream", "extra_args"),
    [
        # For a shipper; --log-level overrides the config's INFO (debug lines must show up).
        ("json", "console", ["--log-level", "debug"]),
        # A child that inherited JOURNAL_STREAM but writes elsewhere: a console, timestamps on.
        ("text", "inherited", []),
        # Under journald: `<N>` on every line, no timestamp of ours.
        ("text", "journald", []),
    ],
)
async def test_every_stderr_line_is_one_well_formed_event(
    tmp_path: Path, unused_tcp_port: int, fmt: str, stream: str, extra_args: list[str]
):
    async with Plant(seed=5) as plant:
        config = write_demo_config(
            tmp_path,
            device_ports={"tank1": plant.tank.port, "meter1": free_port()},
            http_port=unused_tcp_port,
            opcua_port=0,
        )
        lines = await _run_until(
            ["run", "--config", str(config), "--log-format", fmt, *extra_args],
            stream,
            tmp_path,
            done=lambda lines: (
                _has(lines, "warning", "meter1: cannot connect")
                and _has(lines, "info", "tank1: connected")
            ),
        )

    events = []
    for line in lines:
        prio, rest = split_priority(line)
        event = parse_json(rest) if fmt == "json" else parse_text(rest)
        assert event["level"] in LEVELS and event["component"] and "msg" in event, line
        if stream == "journald":
            assert prio == priority(LEVELNO[event["level"]]), line
            assert "ts" not in event, line  # journald stamps the entry itself
        else:
            assert prio is None and event["ts"].endswith("Z"), line
        events.append(event)

    warning = next(e for e in events if "meter1: cannot connect" in e["msg"])
    assert warning["level"] == "warning" and warning["component"] == "drivers.base"
    if stream == "journald":
        assert any(line.startswith("<4>") and "meter1: cannot connect" in line for line in lines)
    assert any(e["msg"] == "stopping" for e in events), "the lines after SIGTERM are there too"
    components = {e["component"] for e in events}
    assert "serve" in components or "app" in components, components  # gateway. prefix gone
    if extra_args:
        assert any(e["level"] == "debug" for e in events), "--log-level debug was not applied"
    else:
        assert not any(e["level"] == "debug" for e in events)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_tracebacks_warnings_and_crashes_stay_one_event_per_line(tmp_path: Path, fmt: str):
    # The gateway logs no traceback on a path a test can reach honestly (its own code turns
    # failures into one-line messages); this child logs one through the same setup_logging,
    # to a real stderr pipe, as an unexpected bug would.
    script = textwrap.dedent(
        """
        import logging, sys, threading, warnings
        from gateway.cli import setup_logging
        setup_logging("INFO", sys.argv[1])
        log = logging.getLogger("gateway.twin.writer")
        try:
            raise RuntimeError("commit failed:\\n  disk I/O error")
        except RuntimeError:
            log.warning("twin.db: commit failed; retrying", exc_info=True, extra={"batch": 12})
        warnings.warn("a deprecated option")
        log.info("done")
        worker = threading.Thread(target=lambda: 1 / 0, name="worker")
        worker.start()
        worker.join()
        raise LookupError("a bug:\\nnobody caught this")
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script, fmt],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"},
    )
    assert run.returncode == 1, run.stderr  # the uncaught exception's exit status
    lines = run.stderr.splitlines()
    events = [parse_json(x) if fmt == "json" else parse_text(x) for x in lines]
    assert [(e["level"], e["component"]) for e in events] == [
        ("warning", "twin.writer"),
        ("warning", "py.warnings"),
        ("info", "twin.writer"),
        ("critical", "gateway"),
        ("critical", "gateway"),
    ], run.stderr
    failed, warned, _, thread, crash = events
    assert failed["msg"] == "twin.db: commit failed; retrying" and str(failed["batch"]) == "12"
    assert failed["exc"].startswith("Traceback (most recent call last):\n")
    assert failed["exc"].endswith("RuntimeError: commit failed:\n  disk I/O error")
    assert "UserWarning: a deprecated option" in warned["msg"]
    assert thread["msg"] == "thread worker ended by an uncaught ZeroDivisionError"
    assert thread["exc"].endswith("ZeroDivisionError: division by zero")
    assert crash["msg"] == "uncaught LookupError; exiting"
    assert crash["exc"].endswith("LookupError: a bug:\nnobody caught this")


async def _run_until(
    args: list[str],
    stream: str,
    tmp_path: Path,
    done: Callable[[list[str]], bool],
    within: float = 90,
) -> list[str]:
    """Run `opstwin ARGS` until it is ready and `done(lines so far)`, then SIGTERM it; return
    every line it wrote to stderr."""
    read_fd, write_fd = os.pipe()
    other_read, other_write = os.pipe()
    # READY=1 says the SIGTERM handler is in place: a SIGTERM before it would kill the process.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    env.pop("JOURNAL_STREAM", None)
    named = write_fd if stream == "journald" else other_write
    if stream != "console":
        stat = os.fstat(named)
        env["JOURNAL_STREAM"] = f"{stat.st_dev}:{stat.st_ino}"
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            *args,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=write_fd,
        )
    finally:
        os.close(write_fd)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb")
    )
    lines: list[str] = []
    reading = loop.create_task(_collect(reader, lines))
    try:
        try:
            await asyncio.wait_for(_ready(notify), within)
        except TimeoutError:
            pytest.fail("no READY=1 from the gateway:\n" + "\n".join(lines))
        deadline = time.monotonic() + within
        while not done(lines):
            assert not reading.done(), "the gateway exited early:\n" + "\n".join(lines)
            assert time.monotonic() < deadline, "not logged:\n" + "\n".join(lines)
            await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(reading, 30)  # its stderr closes as it exits
        assert await asyncio.wait_for(proc.wait(), 30) == 0, "\n".join(lines)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        reading.cancel()
        transport.close()
        notify.close()
        os.close(other_read)
        os.close(other_write)
    return lines


async def _collect(reader: asyncio.StreamReader, lines: list[str]) -> None:
    """Append each line from `reader` to `lines` as it comes, until the end."""
    while raw := await reader.readline():
        lines.append(raw.decode().removesuffix("\n"))


async def _ready(notify: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    while not (await loop.sock_recv(notify, 4096)).startswith(b"READY=1"):
        pass


def _has(lines: list[str], level: str, text: str) -> bool:
    # Before parsing (that comes after, on every line): the level's word and the text.
    return any(level in line and text in line for line in lines)
