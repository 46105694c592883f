"""An asyncua OPC UA server for one device: a node map, client writes into the physics, faults.

asyncua's `Server` owns the address space and the protocol. We keep it for the whole life of the
device and cycle only its TCP side (`BinaryServer`) for stop, start and restart: loading the
standard address space takes ~1 s, rebinding the port a few milliseconds. Three hooks, each on an
instance we own, never on asyncua's classes (a test process may run other asyncua servers):

- the protocol factory of our `BinaryServer` subclass: refuse connections, delay requests (`slow`);
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
import dataclasses
import hmac
import logging
import math
import socket
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.address_space import AttributeService, AttributeValue
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.user_managers import UserManager
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..faults import OpcUaFaults, Value, is_bad
from . import asyncua_fixes
from .nodes import (
    BENCH_OBJECT,
    NAMESPACE_INDEX,
    NAMESPACE_URI,
    UNITS_NAMESPACE,
    NodeMap,
    NodeSpec,
    bench_identifier,
)

log = logging.getLogger(__name__)
asyncua_fixes.apply()

# `security=True` offers these; a list of names picks others (ua.SecurityPolicyType members).
SECURE_POLICIES = ("None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt")
CERT_FILE = "server_cert.der"
KEY_FILE = "server_key.pem"

_VARIANT = {
    "Double": ua.VariantType.Double,
    "Boolean": ua.VariantType.Boolean,
    "UInt32": ua.VariantType.UInt32,
    "String": ua.VariantType.String,
}
_GOOD = ua.StatusCode(ua.StatusCodes.Good)
_NULL = ua.Variant(None, ua.VariantType.Null)
_UINT32_MAX = 2**32 - 1
# Notify this many variables, then let the loop breathe: 5 000 bench signals must not stall reads.
_NOTIFY_SLICE = 500

WriteHandler = Callable[[str, Value], None]


class PlcServer:
    """Serve one `NodeMap` (plus optional bench signals) over OPC UA, faults applied."""

    def __init__(
        self,
        node_map: NodeMap,
        faults: OpcUaFaults,
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
        self.policies = _policies(security, name)
        self.users = dict(users or {})
        self.extra_signals = extra_signals
        self.host = ""
        self.port = 0
        self._on_write = on_write
        self._pki_dir = Path(pki_dir) if pki_dir is not None else None
        self._tmp_pki: tempfile.TemporaryDirectory[str] | None = None
        self._server: Server | None = None
        self._tcp: _TcpServer | None = None
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
        tcp = _TcpServer(server.iserver, host, port, server.limits, self.faults)
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
        for client in list(tcp.clients):
            if client.transport is not None:
                client.transport.abort()
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
            dv = _data_value(spec.datatype, values[spec.signal], statuses.get(spec.signal, 0), now)
            self._store(self._attvals[spec.signal], dv)

    def publish_bench(self, values: Sequence[float]) -> None:
        """Serve the bench signals' new values, all with one timestamp."""
        if not self._bench_attvals:
            return
        now = datetime.now(UTC)
        for attval, value in zip(self._bench_attvals, values, strict=True):
            self._store(attval, _SharedDataValue(_double(value), _GOOD, now, now))

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
        server = Server(user_manager=_UserTable(self.users) if self.users else None)
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
        pki.mkdir(parents=True, exist_ok=True)
        # Reuses a valid key and certificate from an earlier run, else makes new ones.
        await setup_self_signed_certificate(
            pki / KEY_FILE,
            pki / CERT_FILE,
            server.get_application_uri(),
            socket.gethostname(),
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            {"organizationName": "OpsTwin plantsim"},
        )
        await server.load_certificate(pki / CERT_FILE)
        await server.load_private_key(pki / KEY_FILE)

    def _pki_path(self) -> Path | None:
        if self._pki_dir is not None:
            return self._pki_dir
        return Path(self._tmp_pki.name) if self._tmp_pki is not None else None

    async def _add_nodes(self, server: Server, idx: int) -> None:
        objects = ua.NodeId(ua.ObjectIds.ObjectsFolder)
        items = [_object(self.node_map.object_name, idx, objects)]
        parent = items[0].RequestedNewNodeId
        for spec in self.node_map.nodes:
            items += _variable(self.node_map.identifier(spec), spec, idx, parent)
        if self.extra_signals:
            items.append(_object(BENCH_OBJECT, idx, objects))
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
            bench = _add_bench(server, items[-1], idx, self.extra_signals)
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


class _SharedDataValue(ua.DataValue):
    """A DataValue that a subscription may keep without copying.

    asyncua deep-copies every value it queues for a monitored item (~30 µs, most of the cost of
    a notification). Ours are never mutated after `_store`, so the copy may be the value itself.
    """

    __slots__ = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedDataValue:
        return self


def _double_slow(value: float) -> ua.Variant:
    return ua.Variant(value, ua.VariantType.Double)


def _double_fast(value: float) -> ua.Variant:
    # ua.Variant(value, Double) spends ~2 µs of a bench update's ~3.5 µs in __post_init__,
    # guessing and checking a type we already know. Same class, same fields, set directly.
    variant = _new_variant(ua.Variant)
    variant.Value = value
    variant.VariantType = ua.VariantType.Double
    variant.Dimensions = None
    variant.is_array = False
    return variant


_new_variant = object.__new__
_VARIANT_FIELDS = {"Value", "VariantType", "Dimensions", "is_array"}
# Only while Variant has exactly these fields; another asyncua gets the plain constructor.
_double = (
    _double_fast
    if {f.name for f in dataclasses.fields(ua.Variant)} == _VARIANT_FIELDS
    else _double_slow
)


def _data_value(datatype: str, value: Value, status: int, now: datetime) -> ua.DataValue:
    if is_bad(status):
        # OPC UA Part 4, 7.7.1: with a Bad status the value is to be ignored; servers send null.
        return _SharedDataValue(_NULL, ua.StatusCode(status), now, now)
    code = _GOOD if status == 0 else ua.StatusCode(status)
    variant = ua.Variant(_coerce(datatype, value), _VARIANT[datatype])
    return _SharedDataValue(variant, code, now, now)


def _coerce(datatype: str, value: Value) -> Value:
    if datatype == "Double":
        return float(value)
    if datatype == "Boolean":
        return bool(value)
    if datatype == "UInt32":
        # A spike or noise makes a counter fractional or negative; the wire type cannot be.
        number = float(value)
        return 0 if math.isnan(number) else min(max(round(number), 0), _UINT32_MAX)
    return str(value)


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
        if dv.Value is None or dv.Value.VariantType != _VARIANT[spec.datatype]:
            return ua.StatusCode(ua.StatusCodes.BadTypeMismatch)
        try:
            self._on_write(spec.signal, dv.Value.Value)
        except ValueError as exc:
            log.info("write %s refused: %s", spec.name, exc)
            return ua.StatusCode(ua.StatusCodes.BadOutOfRange)
        except KeyError:
            return ua.StatusCode(ua.StatusCodes.BadNotWritable)
        return ua.StatusCode(ua.StatusCodes.Good)


class _TcpServer(BinaryServer):
    """asyncua's TCP listener, with our fault hooks on every connection."""

    def __init__(
        self, iserver: Any, host: str, port: int, limits: Any, faults: OpcUaFaults
    ) -> None:
        super().__init__(iserver, host, port, limits)
        self.faults = faults

    def _make_protocol(self) -> OPCUAProtocol:
        # Private in asyncua, and the one place it builds a connection's protocol.
        return _Connection(
            self.faults,
            iserver=self.iserver,
            policies=self._policies,
            clients=self.clients,
            closing_tasks=self.closing_tasks,
            limits=self.limits,
        )


class _Connection(OPCUAProtocol):
    """One client connection: refused while `faults.refusing`, delayed while `faults.delay_s`."""

    def __init__(self, faults: OpcUaFaults, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.faults = faults

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.faults.refusing:
            transport.close()
            return
        super().connection_made(transport)
        processor = self.processor
        if processor is not None:
            processor.process = _delayed(processor.process, self.faults)  # type: ignore[method-assign]


def _delayed(
    process: Callable[[Any, Any], Awaitable[bool]], faults: OpcUaFaults
) -> Callable[[Any, Any], Awaitable[bool]]:
    async def process_late(header: Any, body: Any) -> bool:
        # Service requests only (reads, writes, browse, publish, sessions): Hello and
        # OpenSecureChannel stay prompt, so a client's connect timeout measures the PLC, not us.
        if faults.delay_s and header.MessageType == ua.MessageType.SecureMessage:
            await asyncio.sleep(faults.delay_s)
        return await process(header, body)

    return process_late


class _UserTable(UserManager):
    """Username/password pairs; anything else is refused."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self.users = dict(users)

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        """Return the user if the password matches, else None (BadUserAccessDenied)."""
        expected = self.users.get(username or "")
        if expected is None or password is None:
            return None
        if not hmac.compare_digest(password.encode(), expected.encode()):
            return None
        return User(role=UserRole.User, name=username)


def _policies(security: bool | Sequence[str], name: str) -> tuple[ua.SecurityPolicyType, ...]:
    if security is True:
        names: Sequence[str] = SECURE_POLICIES
    elif security is False:
        names = ("None",)
    elif isinstance(security, str):
        names = (security,)
    else:
        names = security
    out = []
    for text in names:
        key = "NoSecurity" if text == "None" else text
        policy = ua.SecurityPolicyType.__members__.get(key)
        if policy is None:
            known = ", ".join(["None", *list(ua.SecurityPolicyType.__members__)[1:]])
            raise ValueError(f"{name}: unknown security policy {text!r}; use {known}")
        out.append(policy)
    if not out:
        raise ValueError(f"{name}: no security policy; use at least None")
    return tuple(out)


def _object(identifier: str, idx: int, parent: ua.NodeId) -> ua.AddNodesItem:
    item = ua.AddNodesItem()
    item.RequestedNewNodeId = ua.NodeId(identifier, idx)
    item.BrowseName = ua.QualifiedName(identifier, idx)
    item.NodeClass = ua.NodeClass.Object
    item.ParentNodeId = parent
    item.ReferenceTypeId = ua.NodeId(ua.ObjectIds.Organizes)
    item.TypeDefinition = ua.NodeId(ua.ObjectIds.BaseObjectType)
    attrs = ua.ObjectAttributes()
    attrs.DisplayName = ua.LocalizedText(identifier)
    attrs.Description = ua.LocalizedText(identifier)
    attrs.EventNotifier = 0
    item.NodeAttributes = attrs
    return item


def _variable(
    identifier: str, spec: NodeSpec, idx: int, parent: ua.NodeId
) -> list[ua.AddNodesItem]:
    """The variable, and for an analog item its EngineeringUnits and EURange properties."""
    item = ua.AddNodesItem()
    nodeid = ua.NodeId(identifier, idx)
    item.RequestedNewNodeId = nodeid
    item.BrowseName = ua.QualifiedName(spec.name, idx)
    item.NodeClass = ua.NodeClass.Variable
    item.ParentNodeId = parent
    item.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HasComponent)
    item.TypeDefinition = ua.NodeId(
        ua.ObjectIds.AnalogItemType if spec.analog else ua.ObjectIds.BaseDataVariableType
    )
    attrs = ua.VariableAttributes()
    attrs.DisplayName = ua.LocalizedText(spec.name)
    attrs.Description = ua.LocalizedText(spec.description or spec.name)
    attrs.DataType = ua.NodeId(getattr(ua.ObjectIds, spec.datatype))
    attrs.Value = ua.Variant(_coerce(spec.datatype, _ZERO[spec.datatype]), _VARIANT[spec.datatype])
    attrs.ValueRank = ua.ValueRank.Scalar
    access = ua.AccessLevel.CurrentRead.mask
    if spec.writable:
        access |= ua.AccessLevel.CurrentWrite.mask
    attrs.AccessLevel = attrs.UserAccessLevel = access
    attrs.WriteMask = attrs.UserWriteMask = 0
    attrs.Historizing = False
    item.NodeAttributes = attrs
    items = [item]
    if spec.unit is not None and spec.eu_range is not None:
        units = ua.EUInformation(
            NamespaceUri=UNITS_NAMESPACE,
            UnitId=spec.unit.unit_id,
            DisplayName=ua.LocalizedText(spec.unit.display),
            Description=ua.LocalizedText(spec.unit.description),
        )
        eu_range = ua.Range(Low=spec.eu_range[0], High=spec.eu_range[1])
        items.append(
            _property(
                f"{identifier}.EngineeringUnits",
                "EngineeringUnits",
                idx,
                nodeid,
                ua.Variant(units),
                ua.ObjectIds.EUInformation,
            )
        )
        items.append(
            _property(
                f"{identifier}.EURange",
                "EURange",
                idx,
                nodeid,
                ua.Variant(eu_range),
                ua.ObjectIds.Range,
            )
        )
    return items


def _add_bench(server: Server, parent: ua.AddNodesItem, idx: int, n: int) -> list[ua.NodeId]:
    """Add `n` bench doubles under `parent` in linear time; return their node ids.

    asyncua's AddNodes scans every reference of the parent for each child (twice), which makes
    5 000 children of one object take ~13 s. So the children are added without a parent
    (`try_add_nodes(check=False)` allows that) and both references are appended here at once;
    they are new, so there is nothing to check for duplicates.
    """
    parent_id = parent.RequestedNewNodeId
    items = []
    for i in range(n):
        spec = NodeSpec(f"Signal{i:05d}", f"bench{i}", "Double", "bench signal")
        item = _variable(bench_identifier(i), spec, idx, ua.NodeId())[0]
        items.append(item)
    nms = server.iserver.node_mgt_service
    failed = list(nms.try_add_nodes(items, check=False))
    if failed:
        raise RuntimeError(f"cannot add bench signal {failed[0].RequestedNewNodeId}")
    aspace = server.iserver.aspace
    component = ua.NodeId(ua.ObjectIds.HasComponent)
    parent_refs = aspace[parent_id].references
    for item in items:
        parent_refs.append(
            ua.ReferenceDescription(
                ReferenceTypeId=component,
                IsForward=True,
                NodeId=item.RequestedNewNodeId,
                BrowseName=item.BrowseName,
                DisplayName=item.NodeAttributes.DisplayName,
                NodeClass=ua.NodeClass.Variable,
                TypeDefinition=item.TypeDefinition,
            )
        )
        aspace[item.RequestedNewNodeId].references.append(
            ua.ReferenceDescription(
                ReferenceTypeId=component,
                IsForward=False,
                NodeId=parent_id,
                BrowseName=parent.BrowseName,
                DisplayName=parent.NodeAttributes.DisplayName,
                NodeClass=ua.NodeClass.Object,
                TypeDefinition=parent.TypeDefinition,
            )
        )
    return [item.RequestedNewNodeId for item in items]


_ZERO: dict[str, Value] = {"Double": 0.0, "Boolean": False, "UInt32": 0, "String": ""}


def _property(
    identifier: str, name: str, idx: int, parent: ua.NodeId, value: ua.Variant, datatype: int
) -> ua.AddNodesItem:
    item = ua.AddNodesItem()
    item.RequestedNewNodeId = ua.NodeId(identifier, idx)
    # Standard property names live in namespace 0: clients find them as `0:EURange`.
    item.BrowseName = ua.QualifiedName(name, 0)
    item.NodeClass = ua.NodeClass.Variable
    item.ParentNodeId = parent
    item.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HasProperty)
    item.TypeDefinition = ua.NodeId(ua.ObjectIds.PropertyType)
    attrs = ua.VariableAttributes()
    attrs.DisplayName = ua.LocalizedText(name)
    attrs.DataType = ua.NodeId(datatype)
    attrs.Value = value
    attrs.ValueRank = ua.ValueRank.Scalar
    attrs.AccessLevel = attrs.UserAccessLevel = ua.AccessLevel.CurrentRead.mask
    item.NodeAttributes = attrs
    return item
