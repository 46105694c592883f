"""A small asyncio Modbus TCP server (MBAP or RTU-over-TCP framing) with fault hooks.

Our own rather than pymodbus's server so that every fault is a plain line of code here: refusing
and dropping connections, restarting on the same port, exception responses chosen per address,
writes acknowledged and ignored, slow and malformed responses. It also means the gateway's
pymodbus driver is checked against an independent implementation of the protocol. One request
is handled at a time per connection, in order, as a device's Modbus task does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket

from ..faults import ModbusFaults
from .pdu import (
    FRAMERS,
    GATEWAY_TARGET_NO_RESPONSE,
    Frame,
    FramingError,
    ModbusError,
    Store,
    exception_pdu,
    execute,
    parse_request,
)

log = logging.getLogger(__name__)

# Bytes buffered without a complete frame before the connection is considered junk.
_MAX_BUFFER = 1024


class ModbusServer:
    """Serve a `Store` over TCP for one unit id, consulting `faults` on every connection."""

    def __init__(
        self,
        store: Store,
        faults: ModbusFaults,
        *,
        unit_id: int = 1,
        framer: str = "socket",
        name: str = "modbus",
        seed: int = 0,
    ) -> None:
        """Configure; nothing listens until `start`."""
        if framer not in FRAMERS:
            raise ValueError(f"{name}: framer {framer!r}; use one of {', '.join(FRAMERS)}")
        self.store = store
        self.faults = faults
        self.unit_id = unit_id
        self.framer = framer
        self.name = name
        self.host = ""
        self.port = 0
        self._rng = random.Random(f"garbage/{seed}")
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        # Requests received and not yet answered (or dropped), over all connections, and the
        # most ever seen: how many a pipelining client keeps in flight.
        self.in_flight = 0
        self.most_in_flight = 0

    @property
    def listening(self) -> bool:
        """Whether the listening socket is open."""
        return self._server is not None

    @property
    def connections(self) -> int:
        """Client connections open now."""
        return len(self._connections)

    async def start(self, host: str, port: int) -> int:
        """Listen on `host:port` (0 picks a free port); return the bound port."""
        if self._server is not None:
            raise RuntimeError(f"{self.name}: already listening on {self.host}:{self.port}")
        loop = asyncio.get_running_loop()
        # SO_REUSEADDR (asyncio's default on POSIX, made explicit): a restart rebinds at once
        # even while the old connections sit in TIME_WAIT.
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True, family=socket.AF_INET
        )
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        return self.port

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self.drop_connections()
        if server is not None:
            await server.wait_closed()
        # Let the aborted connections run connection_lost, which ends their workers.
        await asyncio.sleep(0)

    def drop_connections(self) -> int:
        """Abort every client connection now; return how many there were."""
        dropped = list(self._connections)
        for conn in dropped:
            conn.abort()
        return len(dropped)

    def respond(self, frame: Frame) -> bytes | None:
        """Return the response PDU for a request frame, or None to stay silent."""
        if frame.unit != self.unit_id:
            # A TCP device acting as its own gateway says "no such unit"; an RTU slave is silent.
            if self.framer == "rtu":
                return None
            function = frame.pdu[0] if frame.pdu else 0
            return exception_pdu(function, GATEWAY_TARGET_NO_RESPONSE)
        try:
            request = parse_request(frame.pdu)
            code = self.faults.exception_for(request.table, request.address, request.count)
            if code is not None:
                raise ModbusError(code, "injected")
            if request.values and self.faults.ignores(
                request.table, request.address, request.values
            ):
                log.debug(
                    "%s: ignoring a write to %s:%d", self.name, request.table, request.address
                )
                return execute(request, _KeepsOldValues(self.store))
            return execute(request, self.store)
        except ModbusError as exc:
            log.debug("%s: exception %d: %s", self.name, exc.code, exc)
            return exception_pdu(frame.pdu[0] if frame.pdu else 0, exc.code)

    def garble(self, frame: bytes) -> bytes:
        """Corrupt a response frame the way a failing device or a bad line would."""
        # Keep the envelope a client matches on (MBAP header / unit id) so that the client
        # takes the frame for its answer, then wreck what follows: flip bits in the PDU and,
        # for RTU, the CRC no longer matches.
        head = 7 if self.framer == "socket" else 1
        body = bytearray(frame[head:])
        body[0] ^= 0x7F  # every standard function code becomes an undefined one
        for i in range(1, len(body)):
            body[i] ^= self._rng.randrange(1, 256)
        return bytes(frame[:head]) + bytes(body)


class _KeepsOldValues:
    """A store that reads through and ignores writes: the `ignore_writes` fault."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def read(self, table: str, address: int, count: int) -> list[int] | list[bool]:
        return self.store.read(table, address, count)

    def write(self, table: str, address: int, values: list[int] | list[bool]) -> None:
        # An address the device does not have is still exception 2; the rest is acknowledged
        # by `execute` with the usual echo, and nothing changes.
        self.store.read(table, address, len(values))


class _Connection(asyncio.Protocol):
    """One client: reassembles frames, answers them one at a time."""

    def __init__(self, server: ModbusServer) -> None:
        self.server = server
        self.framer = FRAMERS[server.framer]()
        self.buffer = bytearray()
        self.queue: asyncio.Queue[Frame] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None
        self.worker: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.server.faults.refusing:
            transport.close()
            return
        self.server._connections.add(self)
        self.worker = asyncio.get_running_loop().create_task(
            self._work(), name=f"{self.server.name}:conn"
        )

    def data_received(self, data: bytes) -> None:
        if self.worker is None:
            return
        self.buffer += data
        try:
            frames = self.framer.split(self.buffer)
        except FramingError as exc:
            log.info("%s: dropping a client that sent junk: %s", self.server.name, exc)
            self.abort()
            return
        if len(self.buffer) > _MAX_BUFFER:
            self.buffer.clear()
        for frame in frames:
            self.queue.put_nowait(frame)
        server = self.server
        server.in_flight += len(frames)
        server.most_in_flight = max(server.most_in_flight, server.in_flight)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        # Queued requests die with the connection; the one being answered is taken off by the
        # worker itself as it is cancelled.
        self.server.in_flight -= self.queue.qsize()
        if self.worker is not None:
            self.worker.cancel()

    def abort(self) -> None:
        self.server._connections.discard(self)
        if self.transport is not None:
            self.transport.abort()

    async def _work(self) -> None:
        server = self.server
        while True:
            frame = await self.queue.get()
            try:
                if not await self._answer(frame):
                    return
            finally:
                server.in_flight -= 1

    async def _answer(self, frame: Frame) -> bool:
        """Answer one request (or stay silent); False once the connection is gone."""
        server = self.server
        pdu = server.respond(frame)
        if pdu is None:
            return True
        if server.faults.delay_s:
            await asyncio.sleep(server.faults.delay_s)
        out = self.framer.build(frame, pdu)
        if server.faults.garbled:
            out = server.garble(out)
        if self.transport is None or self.transport.is_closing():
            return False
        with contextlib.suppress(ConnectionError):
            self.transport.write(out)
        return True
