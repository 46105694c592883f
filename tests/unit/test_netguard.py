"""The HTTP listener's guards, on a real aiohttp server over real sockets; the log rate limit."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from tests_support import FakeClock

from gateway import netguard
from gateway.fdlimit import (
    BASE_RESERVE,
    HTTP_BACKLOG,
    OPCUA_BACKLOG,
    PER_DEVICE_RESERVE,
    plan_budget,
)
from gateway.netguard import GuardedSite, body_timeout, quiet_bad_requests
from gateway.ratelog import RateLimitedLog
from gateway.serve import bind_advice


async def _echo(request: web.Request) -> web.Response:
    return web.Response(text=f"{len(await request.read())} bytes")


@pytest.fixture
async def site() -> AsyncIterator[GuardedSite]:
    app = web.Application(middlewares=[body_timeout(0.5)])
    app.router.add_get("/", _echo)
    app.router.add_post("/", _echo)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=1.0)
    await runner.setup()
    guarded = GuardedSite(runner, "127.0.0.1", 0, max_connections=3)
    await guarded.start()
    try:
        yield guarded
    finally:
        await runner.cleanup()


async def _request(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


GET = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def test_connections_over_the_cap_get_503_and_are_closed(site):
    held = [await asyncio.open_connection("127.0.0.1", site.port) for _ in range(3)]
    await asyncio.sleep(0.05)
    answer = await _request(site.port, GET)
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"Retry-After: 5" in answer
    assert site.refused == 1
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.05)
    assert (await _request(site.port, GET)).startswith(b"HTTP/1.1 200")


async def test_a_request_never_finished_is_closed_after_the_header_timeout(site):
    reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    await writer.drain()
    # The server closes it (keepalive_timeout=1 s); without the timeout this read would hang
    # until wait_for gives up and the test fails.
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_a_body_that_does_not_arrive_gets_408(site):
    reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part")
    await writer.drain()
    answer = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer


async def test_a_body_that_arrives_reaches_the_handler(site):
    answer = await _request(
        site.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    )
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"3 bytes")


async def test_malformed_requests_are_one_info_line_not_a_traceback(site, caplog, monkeypatch):
    quiet_bad_requests()
    # The filter is process-wide and says one line a minute per peer: an earlier test's bad
    # request from 127.0.0.1 must not have spent this test's line.
    monkeypatch.setattr(netguard._bad_request_filter, "_lines", RateLimitedLog(netguard.log, 60.0))
    caplog.set_level(logging.DEBUG)
    for _ in range(5):
        answer = await _request(site.port, b"GARBAGE\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 400")
    records = [r for r in caplog.records if r.name in ("aiohttp.server", "gateway.netguard")]
    assert [r.levelname for r in records] == ["INFO"], [r.getMessage() for r in records]
    assert records[0].exc_info is None
    assert "HTTP 400 from 127.0.0.1" in records[0].getMessage()


def test_rate_limited_log_counts_what_it_does_not_write(caplog):
    clock = FakeClock()
    lines = RateLimitedLog(logging.getLogger("t"), 60.0, clock=clock)
    caplog.set_level(logging.INFO)
    assert lines.log(logging.WARNING, "a", "refused %s", "x")
    assert not lines.log(logging.WARNING, "a", "refused %s", "x")
    assert not lines.log(logging.WARNING, "a", "refused %s", "x")
    assert lines.log(logging.WARNING, "b", "other")  # another key is not held back
    clock.advance(61)
    assert lines.log(logging.WARNING, "a", "refused %s", "x")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "refused x",
        "other",
        "refused x (2 more like this since the last such line, not logged)",
    ]


def test_rate_limited_log_keeps_a_bounded_table():
    lines = RateLimitedLog(logging.getLogger("t"), 60.0, clock=FakeClock(), max_keys=10)
    for i in range(1000):
        lines.log(logging.DEBUG, f"peer{i}", "x")
    assert len(lines._state) == 10


def test_listener_caps_fit_under_the_descriptor_limit():
    fits = plan_budget(4096, devices=3, http_max=64, opcua_max=64)
    assert (fits.http_connections, fits.opcua_connections) == (64, 64)
    tight = plan_budget(512, devices=3, http_max=300, opcua_max=300)
    reserve = BASE_RESERVE + 3 * PER_DEVICE_RESERVE + HTTP_BACKLOG + OPCUA_BACKLOG
    assert tight.reserve == reserve
    assert tight.http_connections + tight.opcua_connections <= 512 - reserve
    assert tight.http_connections >= 1 and tight.opcua_connections >= 1
    no_opcua = plan_budget(160, devices=1, http_max=500, opcua_max=0)
    assert no_opcua.opcua_connections == 0
    assert no_opcua.http_connections == 160 - BASE_RESERVE - PER_DEVICE_RESERVE - HTTP_BACKLOG


def _bind_error(host: str, port: int) -> OSError:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    raise AssertionError(f"binding {host}:{port} worked")


def test_a_listener_that_cannot_bind_is_told_what_to_change():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        in_use = _bind_error("127.0.0.1", taken.getsockname()[1])
    assert "another gateway" in bind_advice(in_use, "http.host", "http.port")
    not_here = _bind_error("192.0.2.1", 0)  # TEST-NET-1: on no interface of this machine
    assert bind_advice(not_here, "http.host", "http.port").endswith("change http.host")
    unresolvable = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert "does not resolve" in bind_advice(unresolvable, "http.host", "http.port")
