"""Serve one device over OPC UA: a node map, client writes into the physics, faults applied.

asyncua's `Server` owns the address space and the protocol. We keep it for the whole life of the
device and cycle only its TCP side (`BinaryServer`) for stop, start and restart: loading the
standard address space takes ~1 s, rebinding the port a few milliseconds. Three hooks, each on an
instance we own, never on asyncua's classes (a test process may run other asyncua servers):

- the TCP listener (`fault_hooks.py`): refuse connections, delay requests (`slow`);
- the server's attribute service: client writes to our variables go to the model, with the
  status codes a PLC answers (BadOutOfRange, BadTypeMismatch, BadNotWritable);
- publishing: values are stored into the address space synchronously (a read right after
  `advance()` sees them), and subscriptions are notified by one task, latest value wins.

Tested against asyncua 2.1; the private parts used are named where they are used.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.address_space import AttributeService, AttributeValue
from asyncua.ua.ua_binary import uatcp_to_binary

from asyncua_glue import fixes

from ..faults import OpcuaFaults, Value
from .bench import add_bench_nodes, bench_data_values
from .fault_hooks import FaultyTcpServer, served_value
from .node_items import VARIANT_TYPES, object_item, variable_items
from .nodes import BENCH_OBJECT, NAMESPACE_INDEX, NAMESPACE_URI, NodeMap, NodeSpec, bench_identifier
from .security import CERT_FILE, UserTable, load_certificate, policies

log = logging.getLogger(__name__)
fixes.apply()

# Notify this many variables, then let the loop breathe: 5 000 bench signals must not stall reads.
_NOTIFY_SLICE = 500

WriteHandler = Callable[[str, Value], None]


class PlcServer:
    """Serve one `NodeMap` (plus optional bench signals) over OPC UA, faults applied."""

    def __init__(
        self,
        node_map: NodeMap,
        faults: OpcuaFaults,
        *,
        on_write: WriteHandler,
        name: str = "plc",
        path: str = "/plantsim/oven",
        security: bool | Sequence[str] = False,
        pki_dir: str | Path | None = None,
        users: Mapping[str, str] | None = None,
        extra_signals: int = 0,
    ) -> None:
        """Configure; nothing is built or bound until `start`."""
        if not 0 <= extra_signals <= 100_000:
            raise ValueError(f"{name}: extra_signals {extra_signals} outside 0..100000")
        self.node_map = node_map
        self.faults = faults
        self.name = name
        self.path = path if path.startswith("/") else f"/{path}"
        self.policies = policies(security, name)
        self.users = dict(users or {})
        self.extra_signals = extra_signals
        self.host = ""
        self.port = 0
        self._on_write = on_write
        self._pki_dir = Path(pki_dir) if pki_dir is not None else None
        self._tmp_pki: tempfile.TemporaryDirectory[str] | None = None
        self._server: Server | None = None
        self._tcp: FaultyTcpServer | None = None
        self._started = False
        self._tasks: list[asyncio.Task[None]] = []
        self._attvals: dict[str, AttributeValue] = {}
        self._bench_attvals: list[AttributeValue] = []
        self._last: tuple[Mapping[str, Value], Mapping[str, int]] | None = None
        self._pending: dict[int, tuple[AttributeValue, ua.DataValue]] = {}
        self._wake = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def listening(self) -> bool:
        """Whether the port is bound."""
        return self._tcp is not None

    @property
    def connections(self) -> int:
        """Client connections open now."""
        return len(self._tcp.clients) if self._tcp is not None else 0

    @property
    def secure(self) -> bool:
        """Whether a policy other than None is offered."""
        return any(p != ua.SecurityPolicyType.NoSecurity for p in self.policies)

    @property
    def certificate_file(self) -> Path | None:
        """The server certificate (DER) once started with security, else None."""
        pki = self._pki_path()
        return pki / CERT_FILE if self.secure and pki is not None else None

    @property
    def asyncua(self) -> Server:
        """The underlying asyncua `Server` (after the first `start`)."""
        if self._server is None:
            raise RuntimeError(f"{self.name}: not started yet")
        return self._server

    def url(self, host: str | None = None, port: int | None = None) -> str:
        """The endpoint URL, e.g. `opc.tcp://127.0.0.1:4840/plantsim/oven`."""
        return f"opc.tcp://{host or self.host}:{self.port if port is None else port}{self.path}"

    async def start(self, host: str, port: int) -> int:
        """Listen on `host:port` (0 picks a free port); return the bound port.

        The first start builds the address space (~1 s); later ones only bind the port again.
        """
        if self._tcp is not None:
            raise RuntimeError(f"{self.name}: already listening on {self.url()}")
        if self._server is None:
            self._server = await self._build()
        server = self._server
        # The same list object the endpoints' policy factories are appended to, below.
        tcp = FaultyTcpServer(server.iserver, host, port, server.limits, self.faults)
        tcp.set_policies(server._policies)  # private: asyncua fills it in _setup_server_nodes
        # BinaryServer binds with asyncio's create_server, which sets SO_REUSEADDR on POSIX: a
        # restart rebinds the same port at once.
        await tcp.start()
        if tcp.port == 0:
            await tcp.stop()
            raise OSError(f"{self.name}: {host!r} bound several sockets; give an IP address")
        self._tcp, self.host, self.port = tcp, host, tcp.port
        if not self._started:
            # Endpoints carry the URL, so they are made once the real port is known.
            server.set_endpoint(self.url())
            await server._setup_server_nodes()  # private: what Server.start does before binding
            await server.iserver.start()
            self._started = True
            # Made here, in the loop that serves: an Event binds to the loop that first waits.
            self._wake = asyncio.Event()
            if self._pending:
                self._wake.set()
            self._tasks = [
                asyncio.create_task(self._notify_loop(), name=f"plantsim:{self.name}:notify"),
                asyncio.create_task(self._clock_loop(), name=f"plantsim:{self.name}:clock"),
            ]
        return self.port

    async def stop(self) -> None:
        """Stop listening as a powered-off PLC would: sessions, subscriptions, sockets all go."""
        tcp, self._tcp = self._tcp, None
        if tcp is None:
            return
        # Sockets first, as a power cut would: no client gets an answer from a dying server.
        # With a shutdown notice, each client is told why first, then the socket is closed in
        # order (an abort would discard the notice still in the send buffer).
        notice = self.faults.notice
        for client in list(tcp.clients):
            if client.transport is None:
                continue
            if notice is None:
                client.transport.abort()
                continue
            error = ua.ErrorMessage(ua.StatusCode(notice), f"{self.name} is shutting down")
            client.transport.write(uatcp_to_binary(ua.MessageType.Error, error))
            client.transport.close()
        await tcp.stop()
        # Let the aborted connections run connection_lost, which ends their tasks.
        await asyncio.sleep(0)
        await self._close_sessions()

    async def shutdown(self) -> None:
        """Stop listening and tear the address space down; a later `start` builds it again."""
        await self.stop()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        server, self._server = self._server, None
        if server is not None:
            await server.stop()
        self._started = False
        self._attvals, self._bench_attvals, self._pending = {}, [], {}
        if self._tmp_pki is not None:
            self._tmp_pki.cleanup()
            self._tmp_pki = None

    def drop_connections(self) -> int:
        """Abort every client connection now (sessions survive, as after a network blip)."""
        if self._tcp is None:
            return 0
        clients = list(self._tcp.clients)
        for client in clients:
            if client.transport is not None:
                client.transport.abort()
        return len(clients)

    # -- publishing --------------------------------------------------------------------------

    def publish(self, values: Mapping[str, Value], statuses: Mapping[str, int]) -> None:
        """Serve `values` (by signal), each with its status code from `statuses` (default Good)."""
        self._last = (values, statuses)
        if not self._attvals:
            return
        now = datetime.now(UTC)
        for spec in self.node_map.nodes:
            status = statuses.get(spec.signal, 0)
            dv = served_value(spec.datatype, values[spec.signal], status, now)
            self._store(self._attvals[spec.signal], dv)

    def publish_bench(self, values: Sequence[float]) -> None:
        """Serve the bench signals' new values, all with one timestamp."""
        if not self._bench_attvals:
            return
        for attval, dv in zip(self._bench_attvals, bench_data_values(values), strict=True):
            self._store(attval, dv)

    def _store(self, attval: AttributeValue, dv: ua.DataValue) -> None:
        # What AddressSpace.write_attribute_value does, minus its per-call lookups and type
        # check (our values are typed by construction), and with the subscription callbacks
        # deferred to _notify_loop: reads see the value at once, the caller never awaits.
        attval.value = dv
        if attval.datachange_callbacks:
            self._pending[id(attval)] = (attval, dv)
            self._wake.set()

    async def _notify_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, {}
            for n, (attval, dv) in enumerate(batch.values(), 1):
                for handle in list(attval.datachange_callbacks):
                    # Looked up again: an earlier await may have deleted the monitored item.
                    callback = attval.datachange_callbacks.get(handle)
                    if callback is None:
                        continue
                    try:
                        await callback(handle, dv)
                    except Exception:
                        log.exception("%s: a subscription's data change callback failed", self.name)
                if n % _NOTIFY_SLICE == 0:
                    await asyncio.sleep(0)

    async def _clock_loop(self) -> None:
        # asyncua's own clock task (disabled in _build) sleeps a whole second on shutdown; this
        # one is cancelled at once. Clients watch ServerStatus.CurrentTime as a heartbeat.
        server = self.asyncua
        status_node = server.get_node(ua.NodeId(ua.ObjectIds.Server_ServerStatus))
        time_node = server.get_node(ua.NodeId(ua.ObjectIds.Server_ServerStatus_CurrentTime))
        while True:
            status = copy.copy(await status_node.read_value())
            status.CurrentTime = datetime.now(UTC)
            await status_node.write_value(status)
            await time_node.write_value(status.CurrentTime)
            await asyncio.sleep(1.0)

    # -- building ----------------------------------------------------------------------------

    async def _build(self) -> Server:
        server = Server(user_manager=UserTable(self.users) if self.users else None)
        await server.init()
        server.disable_clock(True)
        server.set_server_name(f"OpsTwin plantsim {self.name}")
        await server.set_application_uri(f"{NAMESPACE_URI}:{self.name}")
        await server.set_build_info(
            NAMESPACE_URI, "OpsTwin", f"plantsim {self.name} PLC", "1.0", "1", datetime.now(UTC)
        )
        server.allow_remote_admin(False)
        server.set_security_policy(list(self.policies))
        tokens = [ua.UserNameIdentityToken] if self.users else [ua.AnonymousIdentityToken]
        server.set_identity_tokens(tokens)
        if self.secure:
            await self._load_certificate(server)
        # Registered first, so index 2 (0 is the standard namespace, 1 the application URI).
        idx = await server.register_namespace(NAMESPACE_URI)
        if idx != NAMESPACE_INDEX:
            raise RuntimeError(f"{self.name}: {NAMESPACE_URI} got index {idx}, not 2")
        await self._add_nodes(server, idx)
        iserver = server.iserver
        # Our writes only replace the service on this server's instance.
        iserver.attribute_service = _WriteGuard(iserver.aspace, self._targets(idx), self._on_write)
        if self._last is not None:
            self.publish(*self._last)
        return server

    async def _load_certificate(self, server: Server) -> None:
        pki = self._pki_path()
        if pki is None:
            self._tmp_pki = tempfile.TemporaryDirectory(prefix="plantsim-pki-")
            pki = Path(self._tmp_pki.name)
        await load_certificate(server, pki)

    def _pki_path(self) -> Path | None:
        if self._pki_dir is not None:
            return self._pki_dir
        return Path(self._tmp_pki.name) if self._tmp_pki is not None else None

    async def _add_nodes(self, server: Server, idx: int) -> None:
        objects = ua.NodeId(ua.ObjectIds.ObjectsFolder)
        items = [object_item(self.node_map.object_name, idx, objects)]
        parent = items[0].RequestedNewNodeId
        for spec in self.node_map.nodes:
            items += variable_items(self.node_map.identifier(spec), spec, idx, parent)
        if self.extra_signals:
            items.append(object_item(BENCH_OBJECT, idx, objects))
        results = await server.iserver.isession.add_nodes(items)
        for item, result in zip(items, results, strict=True):
            if not result.StatusCode.is_good():
                raise RuntimeError(f"{self.name}: cannot add {item.RequestedNewNodeId}: {result}")
        aspace = server.iserver.aspace
        value = ua.AttributeIds.Value
        for spec in self.node_map.nodes:
            nodeid = ua.NodeId(self.node_map.identifier(spec), idx)
            self._attvals[spec.signal] = aspace[nodeid].attributes[value]
        if self.extra_signals:
            bench = add_bench_nodes(server, items[-1], idx, self.extra_signals)
            self._bench_attvals = [aspace[n].attributes[value] for n in bench]

    def _targets(self, idx: int) -> dict[ua.NodeId, NodeSpec | None]:
        targets: dict[ua.NodeId, NodeSpec | None] = {
            ua.NodeId(self.node_map.identifier(s), idx): s for s in self.node_map.nodes
        }
        for i in range(self.extra_signals):
            targets[ua.NodeId(bench_identifier(i), idx)] = None
        return targets

    async def _close_sessions(self) -> None:
        # A reboot forgets every session; asyncua keeps those with subscriptions alive after a
        # lost connection (for reactivation) in a private registry, so close them from there.
        if self._server is None:
            return
        sessions = getattr(self._server.iserver, "_external_sessions", {})
        for session in list(sessions.values()):
            await session.close_session(True)


class _WriteGuard(AttributeService):
    """asyncua's attribute service, except that writes to our variables go to the physics."""

    def __init__(
        self,
        aspace: Any,
        targets: dict[ua.NodeId, NodeSpec | None],
        on_write: WriteHandler,
    ) -> None:
        super().__init__(aspace)
        self._targets = targets
        self._on_write = on_write

    async def write(
        self, params: ua.WriteParameters, user: User | None = None
    ) -> list[ua.StatusCode]:
        """Answer writes to our variables here; pass every other write to asyncua."""
        results: list[ua.StatusCode | None] = []
        others = ua.WriteParameters()
        for item in params.NodesToWrite:
            if item.NodeId in self._targets:
                results.append(self._write(item, self._targets[item.NodeId]))
            else:
                results.append(None)
                others.NodesToWrite.append(item)
        if others.NodesToWrite:
            done = await super().write(others, user or User(role=UserRole.Admin))
            rest = iter(done)
            return [r if r is not None else next(rest) for r in results]
        return [r for r in results if r is not None]

    def _write(self, item: ua.WriteValue, spec: NodeSpec | None) -> ua.StatusCode:
        if spec is None or not spec.writable or item.AttributeId != ua.AttributeIds.Value:
            return ua.StatusCode(ua.StatusCodes.BadNotWritable)
        dv = item.Value
        if item.IndexRange or (dv.StatusCode is not None and not dv.StatusCode.is_good()):
            # A PLC variable takes a whole value; it does not take a status from a client.
            return ua.StatusCode(ua.StatusCodes.BadWriteNotSupported)
        if dv.Value is None or dv.Value.VariantType != VARIANT_TYPES[spec.datatype]:
            return ua.StatusCode(ua.StatusCodes.BadTypeMismatch)
        try:
            self._on_write(spec.signal, dv.Value.Value)
        except ValueError as exc:
            log.info("write %s refused: %s", spec.name, exc)
            return ua.StatusCode(ua.StatusCodes.BadOutOfRange)
        except KeyError:
            return ua.StatusCode(ua.StatusCodes.BadNotWritable)
        return ua.StatusCode(ua.StatusCodes.Good)
