"""`python -m plantsim` as the demo runs it: its own process, endpoints in the log, signals."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys

import pytest
from pymodbus.client import AsyncModbusTcpClient

ENDPOINT = re.compile(r"(tank|meter) listening on tcp://([\d.]+):(\d+)")


async def start(*args: str) -> tuple[asyncio.subprocess.Process, dict[str, int], list[str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "plantsim",
        "--tank-port",
        "0",
        "--meter-port",
        "0",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    ports: dict[str, int] = {}
    lines: list[str] = []
    async with asyncio.timeout(15):
        while len(ports) < 2:
            line = (await proc.stderr.readline()).decode()
            assert line, f"plantsim exited early:\n{''.join(lines)}"
            lines.append(line)
            if m := ENDPOINT.search(line):
                ports[m.group(1)] = int(m.group(3))
    return proc, ports, lines


async def stop(proc: asyncio.subprocess.Process, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    async with asyncio.timeout(10):
        _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def read(port: int, address: int, count: int):
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1.0, retries=0)
    try:
        assert await client.connect()
        return await client.read_input_registers(address, count=count, device_id=1)
    finally:
        client.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_cli_serves_both_devices_and_exits_cleanly_on_a_signal(sig):
    proc, ports, _ = await start("--seed", "7", "--speed", "10")
    try:
        tank = await read(ports["tank"], 0, 7)
        meter = await read(ports["meter"], 0, 10)
        assert not tank.isError() and not meter.isError()
        level = AsyncModbusTcpClient.convert_from_registers(
            tank.registers[:2], AsyncModbusTcpClient.DATATYPE.FLOAT32
        )
        assert isinstance(level, float)
        assert 0.0 <= level <= 5.0
    finally:
        code, err = await stop(proc, sig)
    assert code == 0, err
    assert "stopped" in err


async def test_cli_applies_faults_from_the_command_line_and_stdin():
    proc, ports, _ = await start("--stdin", "--fault", "meter:exception:4,input")
    try:
        r = await read(ports["meter"], 0, 2)
        assert r.isError() and r.exception_code == 4
        assert not (await read(ports["tank"], 0, 2)).isError()
        assert proc.stdin is not None
        proc.stdin.write(b"meter:clear\ntank:exception:6\n")
        await proc.stdin.drain()
        for _ in range(50):
            if not (await read(ports["meter"], 0, 2)).isError():
                break
            await asyncio.sleep(0.05)
        # The simulator applies the lines one after the other: the tank's may come a moment
        # after the meter's (a fresh clone once read the tank in between).
        for _ in range(50):
            r = await read(ports["tank"], 0, 2)
            if r.isError():
                break
            await asyncio.sleep(0.05)
        assert r.isError() and r.exception_code == 6
    finally:
        code, err = await stop(proc, signal.SIGTERM)
    assert code == 0, err


async def test_cli_rejects_a_malformed_fault_with_usage():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "plantsim", "--fault", "tank", stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(10):
        _, err = await proc.communicate()
    assert proc.returncode == 2
    assert "DEVICE:FAULT" in err.decode()


async def test_cli_reports_a_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "plantsim",
            "--tank-port",
            str(port),
            "--meter-port",
            "0",
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(10):
            _, err = await proc.communicate()
    assert proc.returncode == 1
    assert "cannot serve" in err.decode()
