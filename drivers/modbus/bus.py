"""The physical Modbus link: one pymodbus client, one lock and the pacing between frames.

A serial line (and an RTU-over-TCP converter, which is a serial line behind a socket) is one bus:
its devices take turns, one transaction at a time, with a silent gap between frames. Every
driver on such a bus shares one `Bus` (and one connection); a Modbus TCP device (`socket`
framer) gets a bus of its own. The bus opens the connection for its first user, closes it when
the last one leaves, and tells every user at once when the link drops.

A Modbus TCP bus may carry several transactions at once (`max_in_flight`): MBAP transaction ids
tell the answers apart. pymodbus 3.x cannot do that by itself (its TransactionManager holds one
lock from send to answer), so such a client gets `_Pipeline`, which matches answers by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.client.base import ModbusBaseClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from drivers.errors import ConfigurationError, ConnectionLostError

__all__ = ["Bus", "BusSettings", "Endpoint", "MalformedResponse", "get_bus", "parse_endpoint"]

log = logging.getLogger(__name__)

T = TypeVar("T")
LostListener = Callable[[BaseException], None]

# pymodbus closes a TCP link by itself after a few silent requests; the driver decides that
# (failures_before_reconnect), so push pymodbus's own limit out of reach.
_NEVER = 2**31


class MalformedResponse(Exception):
    """The device answered, but with bytes that are no Modbus response."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a device is: `tcp://host:port` or `serial:///dev/ttyUSB0`."""

    kind: Literal["tcp", "serial"]
    host: str = ""
    port: int = 502
    device: str = ""

    def __str__(self) -> str:
        if self.kind == "serial":
            return f"serial://{self.device}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """Parse `tcp://HOST[:PORT]` (port 502 by default) or `serial:///dev/NAME`."""
    expected = "expected tcp://HOST:PORT or serial:///dev/NAME"
    parts = urlsplit(text.strip()) if isinstance(text, str) else None
    if parts is None or parts.scheme not in ("tcp", "serial"):
        raise ConfigurationError(f"{expected}, got {text!r}")
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError:
            port = -1
        if not parts.hostname or port == -1 or (port is not None and not 0 < port < 65536):
            raise ConfigurationError(f"{expected} with a port 1..65535, got {text!r}")
        return Endpoint("tcp", host=parts.hostname, port=port or 502)
    device = parts.netloc + parts.path  # serial:///dev/ttyUSB0 or serial://COM3
    if not device:
        raise ConfigurationError(f"{expected}, got {text!r} (no device)")
    return Endpoint("serial", device=device)


@dataclass(frozen=True, slots=True)
class BusSettings:
    """What every device on one bus must agree on."""

    framer: Literal["socket", "rtu"]
    timeout_s: float
    inter_frame_delay_s: float
    baudrate: int = 19200
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8
    max_in_flight: int = 1  # more than 1 only with the socket framer (see ModbusDriver)


class Bus:
    """One link to one or more devices; use `exclusive()` around every transaction."""

    def __init__(self, endpoint: Endpoint, settings: BusSettings) -> None:
        self.endpoint = endpoint
        self.settings = settings
        self._client: ModbusBaseClient | None = None
        self._generation = 0
        self._listeners: dict[int, LostListener] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._slots: asyncio.Semaphore | None = None
        self._quiet_until = 0.0
        self.last_answer = 0.0  # loop time of the last response from any device on the bus

    @property
    def shared(self) -> bool:
        """True when several devices may share this bus (RTU framing)."""
        return self.settings.framer == "rtu"

    @property
    def pipelined(self) -> bool:
        """True when several requests may be outstanding at once (Modbus TCP, max_in_flight>1)."""
        return self.settings.framer == "socket" and self.settings.max_in_flight > 1

    @property
    def users(self) -> int:
        """Drivers attached right now."""
        return len(self._listeners)

    async def attach(self, user: object, on_lost: LostListener) -> None:
        """Join the bus, opening the connection if nobody has; raise ConnectionError if it fails."""
        self._bind_loop()
        assert self._connect_lock is not None
        async with self._connect_lock:
            if self._client is None or not self._client.connected:
                self._drop_client()
                self._client = await self._open()
            self._listeners[id(user)] = on_lost

    async def detach(self, user: object) -> None:
        """Leave the bus; the last user out closes the connection. Never raises."""
        self._listeners.pop(id(user), None)
        if not self._listeners:
            self._drop_client()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the bus for one or more transactions (a read-modify-write stays atomic)."""
        self._bind_loop()
        assert self._lock is not None
        async with self._lock:
            yield

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold what one poll request needs: the whole bus, unless it is pipelined.

        On a pipelined bus a read waits only for one of the `max_in_flight` slots (taken in
        `request`); a write still holds `exclusive()` against other writes, while reads go on.
        """
        if self.pipelined:
            yield
            return
        async with self.exclusive():
            yield

    async def request(self, make: Callable[[ModbusBaseClient], Awaitable[T]]) -> T:
        """Run one transaction on the held bus, after the inter-frame silence."""
        self._bind_loop()
        if self._slots is None:
            return await self._request(make)
        async with self._slots:
            return await self._request(make)

    async def _request(self, make: Callable[[ModbusBaseClient], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        wait = self._quiet_until - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        client = self._client
        if client is None or not client.connected:
            raise ConnectionLostError(f"{self.endpoint}: not connected")
        try:
            response = await make(client)
        except MalformedResponse:
            self.last_answer = loop.time()
            raise
        except ModbusIOException as exc:
            # Bytes that arrived but never made a frame (a garbled RTU answer, a wrong MBAP
            # header): the device answers, badly. Late answers to an earlier request are
            # consumed (skipped) by pymodbus and never stay in the buffer.
            junk = client.ctx.recv_buffer
            if junk and "no response" in str(exc).lower():
                self.last_answer = loop.time()
                raise MalformedResponse(f"{len(junk)} bytes that form no Modbus frame") from None
            raise
        finally:
            self._quiet_until = loop.time() + self.settings.inter_frame_delay_s
        self.last_answer = loop.time()  # any frame back, even an exception, proves the link
        return response

    def drop_if_silent(self, since: float) -> None:
        """On a shared bus, reopen the link for every user unless a device answered since `since`.

        One silent device must not disturb the others; but when none answers, the link itself
        is dead (a half-open socket, an unplugged converter) and each driver leaving and
        rejoining in turn would never close it.
        """
        if not self.shared or self.last_answer >= since or self._client is None:
            return
        log.warning("%s: no device on the bus answers; reopening the link", self.endpoint)
        self._drop_client()
        self._notify(ConnectionLostError(f"{self.endpoint}: no device on the bus answers"))

    # -- helpers --------------------------------------------------------------------------------

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # A bus outlives nothing but its drivers; a new loop (tests, a restarted app) starts
            # from scratch rather than touching primitives bound to a dead loop.
            self._loop = loop
            self._lock = asyncio.Lock()
            self._connect_lock = asyncio.Lock()
            self._slots = asyncio.Semaphore(self.settings.max_in_flight) if self.pipelined else None
            self._client = None
            self._listeners.clear()
            self._quiet_until = 0.0

    async def _open(self) -> ModbusBaseClient:
        self._generation += 1
        generation = self._generation
        s = self.settings

        def trace_connect(up: bool) -> None:
            if not up:
                self._on_link_down(generation)

        common: dict[str, Any] = {
            "timeout": s.timeout_s,
            "retries": 0,
            "reconnect_delay": 0,  # the driver's supervisor owns reconnection
            "trace_connect": trace_connect,
            "name": str(self.endpoint),
        }
        client: ModbusBaseClient
        if self.endpoint.kind == "serial":
            client = AsyncModbusSerialClient(
                self.endpoint.device,
                framer=FramerType.RTU,
                baudrate=s.baudrate,
                parity=s.parity,
                stopbits=s.stopbits,
                bytesize=s.bytesize,
                **common,
            )
        else:
            client = AsyncModbusTcpClient(
                self.endpoint.host, port=self.endpoint.port, framer=FramerType(s.framer), **common
            )
        client.set_max_no_responses(_NEVER)
        cause = _keep_connect_error(client)
        if self.pipelined:
            _Pipeline(client, s.max_in_flight)
        else:
            _fail_requests_on_garbage(client)
        try:
            ok = await client.connect()
        except Exception as exc:  # pyserial raises its own errors for a missing device
            client.close()
            raise ConnectionError(f"cannot open {self.endpoint}: {exc}") from exc
        if not ok:
            client.close()
            if cause:
                # pymodbus logs the cause and returns False; the reason a user sees (and the
                # log line when it changes) needs it: refused, unreachable, timed out.
                raise cause[-1]
            raise ConnectionError(
                f"cannot connect to {self.endpoint} within {s.timeout_s:g} s "
                "(refused, unreachable or not answering)"
            )
        return client

    def _on_link_down(self, generation: int) -> None:
        if generation != self._generation or self._client is None:
            return  # an old connection, or one we closed ourselves
        self._drop_client()
        self._notify(ConnectionLostError(f"{self.endpoint}: connection closed by the device"))

    def _notify(self, cause: BaseException) -> None:
        for listener in list(self._listeners.values()):
            try:
                listener(cause)
            except Exception:
                log.exception("%s: connection-lost listener failed", self.endpoint)

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            self._generation += 1  # its late callbacks are no longer news
            with contextlib.suppress(Exception):
                client.close()


def _keep_connect_error(client: ModbusBaseClient) -> list[BaseException]:
    """Record why pymodbus's connect failed; it only returns False."""
    ctx = client.ctx
    create = ctx.call_create
    failures: list[BaseException] = []

    async def call_create() -> Any:
        try:
            return await create()
        except (TimeoutError, OSError) as exc:
            failures.append(exc)
            raise

    ctx.call_create = call_create
    return failures


def _fail_requests_on_garbage(client: ModbusBaseClient) -> None:
    """Make a garbled answer fail its request (MalformedResponse), not the connection.

    pymodbus raises from `data_received` when a frame does not decode; asyncio then logs the
    traceback and closes the socket, and every garbled answer costs a reconnect and a pair of
    DISCONNECTED/CONNECTED transitions. A device that answers garbage is alive: its points are
    BAD "malformed response", the link stays. Hooks on this client's own instances (pymodbus
    3.x: `ctx` is its TransactionManager); `tests/integration/test_modbus_driver.py` breaks if
    pymodbus moves them.
    """
    ctx = client.ctx
    framer = ctx.framer
    split, decode_pdu, receive = framer.decode, framer.decoder.decode, ctx.callback_data

    def fail(detail: str) -> None:
        future = ctx.response_future
        if not future.done():  # a stray frame with no request waiting is no one's answer
            future.set_exception(MalformedResponse(detail))

    def split_checked(data: bytes) -> tuple[int, int, int, bytes]:
        used, device, tid, frame = split(data)
        if used and not frame:  # consumed, yet no frame: an RTU CRC mismatch, an empty PDU
            fail(f"{used} bytes that are no valid frame (CRC or length wrong)")
        return used, device, tid, frame

    def decode_checked(frame: bytes) -> ModbusPDU | None:
        pdu = decode_pdu(frame)
        if pdu is None:
            fail(f"undecodable frame (function code {frame[0]})" if frame else "empty frame")
        return pdu

    def receive_checked(data: bytes, addr: tuple[Any, ...] | None = None) -> int:
        try:
            return receive(data, addr)
        except ModbusException:
            return len(data)  # the request is failed already; the next answer starts clean

    framer.decode = split_checked  # type: ignore[method-assign,assignment]
    framer.decoder.decode = decode_checked  # type: ignore[method-assign]
    ctx.callback_data = receive_checked  # type: ignore[method-assign]


class _Pipeline:
    """Several transactions outstanding on one Modbus TCP connection, matched by transaction id.

    pymodbus 3.x's `TransactionManager.execute` holds a lock from send to answer and keeps a
    single `response_future`; its transport's `send` also empties the receive buffer, which
    would lose an answer half received; and `callback_data` takes one frame per arrival, so two
    answers in one segment would wait for a third. This replaces `execute` and `callback_data`
    on one client's own instance (not the class). Garbled answers fail their own request
    (MalformedResponse), as `_fail_requests_on_garbage` does for the one-at-a-time client.
    """

    def __init__(self, client: ModbusBaseClient, depth: int) -> None:
        ctx = client.ctx
        self._ctx = ctx
        self._framer = ctx.framer
        self._pending: dict[int, asyncio.Future[ModbusPDU]] = {}
        self._tid = 0
        # Room for every answer in flight; pymodbus's own limit (one frame) would wipe them.
        ctx.max_buffer_size = (depth + 1) * ctx.framer.MAX_SIZE
        ctx.execute = self.execute  # type: ignore[method-assign,assignment]
        ctx.callback_data = self.receive  # type: ignore[method-assign]

    async def execute(self, no_response_expected: bool, request: ModbusPDU) -> ModbusPDU | None:
        ctx = self._ctx
        transport = ctx.transport
        if transport is None:
            raise ConnectionException("not connected")
        if not self._pending:
            # Nothing in flight: what is left is junk from an answer given up on (pymodbus's
            # send() drops it the same way).
            ctx.recv_buffer = b""
        tid = self._next_tid()
        request.transaction_id = tid
        future: asyncio.Future[ModbusPDU] = asyncio.get_running_loop().create_future()
        self._pending[tid] = future
        try:
            transport.write(self._framer.buildFrame(request))  # type: ignore[attr-defined]
            if no_response_expected:
                return None
            try:
                response = await asyncio.wait_for(future, ctx.comm_params.timeout_connect)
            except TimeoutError:
                raise ModbusIOException(
                    "No response received within the timeout",
                    function_code=request.function_code,
                    transaction_id=tid,
                    dev_id=request.dev_id,
                ) from None
        finally:
            self._pending.pop(tid, None)
        if request.dev_id and response.dev_id != request.dev_id:
            raise ModbusIOException(
                f"request for device id {request.dev_id} answered by {response.dev_id}",
                function_code=request.function_code,
                transaction_id=tid,
                dev_id=request.dev_id,
            )
        return response

    def receive(self, data: bytes, addr: tuple[Any, ...] | None = None) -> int:
        """Hand every complete frame in `data` to its request; return the bytes consumed."""
        used = 0
        while used < len(data):
            size, device, tid, frame = self._framer.decode(data[used:])
            if not size:
                if len(data) - used >= 4 and data[used + 2 : used + 4] != b"\0\0":
                    # Protocol id not 0: no MBAP header, and no way to find the next one.
                    # Every request in flight has lost its answer in this stream.
                    junk = MalformedResponse(f"{len(data) - used} bytes that form no Modbus frame")
                    for waiting in self._pending.values():
                        if not waiting.done():
                            waiting.set_exception(junk)
                    return len(data)
                break  # a frame not complete yet
            used += size
            future = self._pending.get(tid)
            if future is None or future.done():
                continue  # a late answer to a request given up on
            if not frame:
                future.set_exception(MalformedResponse(f"{size} bytes that are no valid frame"))
                continue
            try:
                pdu = self._framer.decoder.decode(frame)
            except ModbusException as exc:
                future.set_exception(MalformedResponse(f"undecodable frame: {exc}"))
                continue
            if pdu is None:
                future.set_exception(
                    MalformedResponse(f"undecodable frame (function code {frame[0]})")
                )
                continue
            pdu.dev_id = device
            pdu.transaction_id = tid
            future.set_result(pdu)
        return used

    def _next_tid(self) -> int:
        # 1..65000 as pymodbus counts, skipping ids still waiting for their answer.
        while True:
            self._tid = self._tid % 65000 + 1
            if self._tid not in self._pending:
                return self._tid


_SHARED: weakref.WeakValueDictionary[tuple[Any, ...], Bus] = weakref.WeakValueDictionary()


def get_bus(endpoint: Endpoint, settings: BusSettings) -> Bus:
    """Return the bus for a driver: shared per endpoint for RTU, a private one for Modbus TCP."""
    if settings.framer != "rtu":
        return Bus(endpoint, settings)
    key = (endpoint.kind, endpoint.host.lower(), endpoint.port, endpoint.device)
    bus = _SHARED.get(key)
    if bus is None:
        bus = Bus(endpoint, settings)
        _SHARED[key] = bus
    elif bus.settings != settings:
        raise ConfigurationError(
            f"{endpoint} is one bus: every device on it needs the same framer, timeout_s, "
            f"inter_frame_delay_s and serial settings (in use: {_describe(bus.settings)}; "
            f"this device: {_describe(settings)})"
        )
    return bus


def _describe(s: BusSettings) -> str:
    return (
        f"framer {s.framer}, timeout_s {s.timeout_s:g}, inter_frame_delay_s "
        f"{s.inter_frame_delay_s:g}, {s.baudrate} {s.bytesize}{s.parity}{s.stopbits}"
    )
