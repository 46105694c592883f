"""The OPC UA client driver: one subscription (or a polling loop) per server, checked writes.

One `OpcuaDriver` is one OPC UA server (a PLC) at one endpoint. The supervisor in
`drivers.base` owns the connection: it connects, runs `_run` and, whenever `_run` raises,
marks every point STALE, drops the session and connects and subscribes again with capped,
jittered backoff. asyncua's own reconnection is left off (`auto_reconnect=False`); its
connection watchdog only reports a loss (`connection_lost_callback`), it never repairs it.

Losses the driver notices, and how fast:

- socket closed or reset (server stopped or restarted): at once, from the transport;
- a connection that died silently, or a session the server closed: the server-state probe
  asyncua sends every `timeout_s` fails;
- a subscription that went silent or that the server ended: see `drivers.opcua.subscription`.

Secured sessions and trusting the server's certificate on first use are
`drivers.opcua.trust`; request batches sized to the server's limits, `drivers.opcua.batching`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState
from asyncua.common.node import Node
from asyncua.common.ua_utils import data_type_to_variant_type
from pydantic import ValidationError

from drivers.backoff import Backoff
from drivers.base import Driver, summarize_keys
from drivers.contract import Quality, Sample
from drivers.errors import (
    ConfigurationError,
    ConnectionLostError,
    DeviceResponseError,
    NotConnectedError,
    WriteRejectedError,
    WriteVerifyError,
)
from drivers.limits import limit_violation
from drivers.opcua import asyncua_logs
from drivers.opcua.batching import (
    CREATE_ITEMS,
    DEFAULT_ITEMS_PER_CALL,
    DEFAULT_NODES_PER_READ,
    READ,
    OperationLimits,
)
from drivers.opcua.convert import (
    ABSTRACT_DATATYPES,
    ConversionError,
    datatype_mismatch,
    sample_of,
    status_name,
    to_variant,
    values_match,
    variant_type_of,
)
from drivers.opcua.options import OpcuaOptions
from drivers.opcua.point import NodeRef, OpcuaPoint
from drivers.opcua.subscription import Item, Subscription
from drivers.opcua.trust import explain_refusal, pin_on_first_use, prepare_security
from drivers.quality import format_range

__all__ = ["OpcuaDriver"]

log = logging.getLogger(__name__)


# asyncua's ERROR lines (and tracebacks) for an ordinary connection loss go to DEBUG: the
# supervisor logs the loss once, with its cause.
asyncua_logs.install()

_LIMIT_NODES = (
    ua.ObjectIds.Server_NamespaceArray,
    ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
    ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
)
_CURRENT_WRITE = 1 << ua.AccessLevel.CurrentWrite


@dataclass(slots=True, frozen=True)
class _NodeInfo:
    """What a write needs to know about a node, read once per connection."""

    vtype: ua.VariantType
    array: bool
    writable: bool
    user_writable: bool


class OpcuaDriver(Driver):
    """Subscribes to (or polls) one OPC UA server and writes its writable points."""

    def __init__(
        self,
        name: str,
        endpoint: str,
        options: OpcuaOptions | Mapping[str, Any] | None = None,
        points: Iterable[OpcuaPoint] = (),
        *,
        pki_dir: Path | None = None,
        backoff: Backoff | None = None,
        queue_size: int = 256,
    ) -> None:
        try:
            opts = (
                options
                if isinstance(options, OpcuaOptions)
                else OpcuaOptions.model_validate(options or {})
            )
        except ValidationError as exc:
            raise ConfigurationError(f"{name}: invalid options: {exc}") from exc
        super().__init__(
            name, backoff=backoff or Backoff(cap=opts.reconnect_cap_s), queue_size=queue_size
        )
        self.options = opts
        self.endpoint = _check_endpoint(name, endpoint)
        self.pki_dir = Path(pki_dir) if pki_dir is not None else None

        self._points: dict[str, OpcuaPoint] = {}
        for p in points:
            if not isinstance(p, OpcuaPoint):
                raise ConfigurationError(f"{name}: expected OpcuaPoint objects, got {p!r}")
            if p.key in self._points:
                raise ConfigurationError(f"{name}: point key {p.key!r} appears twice")
            self._points[p.key] = p
        # Client handle = index + 1 into this list (0 is left unused: some servers treat it
        # as "no handle").
        self._items = [
            Item(i + 1, p.key, p.lo, p.hi, p) for i, p in enumerate(self._points.values())
        ]
        self._limits = OperationLimits(name)

        # Per connection:
        self._client: Client | None = None
        self._nodeids: dict[str, ua.NodeId] = {}
        self._unresolved: list[Sample] = []
        self._node_info: dict[str, _NodeInfo] = {}
        # Points whose node's DataType cannot hold them (key -> reason): neither read nor written.
        self._mismatched: dict[str, str] = {}
        self._subscription: Subscription | None = None
        self._write_lock = asyncio.Lock()
        self._client_thumbprint: str | None = None
        #: Subscriptions created since start: 1 + every resubscription after a loss.
        self.subscriptions_created = 0
        # Mismatches already logged: a reconnect finds them again, the log heard them once.
        self._mismatch_logged: set[tuple[str, str]] = set()

    # -- Driver API -----------------------------------------------------------------------------

    @property
    def keys(self) -> Sequence[str]:
        """Keys of every point this driver serves."""
        return tuple(self._points)

    @property
    def target(self) -> str:
        """The endpoint URL, e.g. `opc.tcp://10.0.0.7:4840/plc`."""
        return self.endpoint

    @property
    def server_limits(self) -> tuple[int, int]:
        """(nodes per read, monitored items per call) in use on the current connection."""
        return self._limits.size(READ), self._limits.size(CREATE_ITEMS)

    @property
    def monitored_item_calls(self) -> int:
        """CreateMonitoredItems requests sent since start, refused ones included."""
        return self._limits.calls.get(CREATE_ITEMS, 0)

    @property
    def largest_item_batch(self) -> int:
        """The most monitored items sent in one CreateMonitoredItems request since start."""
        return self._limits.largest.get(CREATE_ITEMS, 0)

    async def write(self, key: str, value: Any) -> Any:
        """Write a point, read it back, verify it, emit it as GOOD and return the value read.

        Refused before anything is sent (WriteRejectedError): an unknown or read-only point,
        a value outside the point's limits, a value the node's DataType cannot take (wrong
        type, fraction for an integer, out of the type's range). A server that refuses the
        write answers with a status (BadNotWritable, BadTypeMismatch, BadOutOfRange,
        BadUserAccessDenied, …): DeviceResponseError naming it.
        """
        point = self._points.get(key)
        if point is None:
            raise WriteRejectedError(f"{self.name}: no point {key!r} on this server")
        where = f"{self.name} {point.node_id} ({key}, limits {format_range(point.lo, point.hi)})"
        refused = f"{where}: refused to write {value!r}"
        if not point.writable:
            raise WriteRejectedError(f"{refused}: the point is not writable")
        problem = _check_value(point, value)
        if problem:
            raise WriteRejectedError(f"{refused}: {problem}")
        async with self._write_lock:
            client = self._client
            nodeid = self._nodeids.get(key)
            if client is None or not self.connected:
                why = self.last_error or "starting"
                raise NotConnectedError(f"{self.name}: not connected ({why})")
            mismatch = self._mismatched.get(key)
            if mismatch is not None:
                raise WriteRejectedError(f"{refused}: {mismatch}")
            if nodeid is None:
                reason = next((s.reason for s in self._unresolved if s.key == key), "unknown")
                raise DeviceResponseError(f"{where}: the node is not on the server: {reason}")
            info = await self._info(key, nodeid, where)
            if not info.writable:
                raise DeviceResponseError(
                    f"{where}: the server does not allow writing this node "
                    "(its AccessLevel has no CurrentWrite): BadNotWritable"
                )
            if not info.user_writable:
                raise DeviceResponseError(
                    f"{where}: the server does not allow this user to write the node "
                    "(UserAccessLevel has no CurrentWrite): BadUserAccessDenied"
                )
            if info.array:
                raise WriteRejectedError(f"{refused}: the node holds an array; not supported")
            try:
                variant = to_variant(value, info.vtype)
            except ConversionError as exc:
                raise WriteRejectedError(f"{refused}: {exc}") from None
            results = await self._call(
                client.uaclient.write_attributes(
                    [nodeid], [ua.DataValue(variant)], ua.AttributeIds.Value
                )
            )
            code = results[0].value if results else ua.StatusCodes.BadUnexpectedError
            if code & 0x80000000:
                raise DeviceResponseError(
                    f"{where}: the server refused to write {variant.Value!r} "
                    f"({info.vtype.name}): {status_name(code)}"
                )
            dv = await self._read_back(client, nodeid, info.vtype, variant.Value, where)
        sample = sample_of(key, dv, point.lo, point.hi)
        log.info("%s: wrote %r to %s (%s)", self.name, sample.value, point.node_id, key)
        self._emit([sample])
        return sample.value

    # -- supervisor hooks -----------------------------------------------------------------------

    async def _connect(self) -> None:
        opts = self.options
        # asyncua's own reconnection stays off: the supervisor in drivers.base is the one
        # owner of reconnecting. asyncua's watchdog (a server-state read every timeout_s)
        # only reports a loss, through connection_lost_callback.
        client = Client(
            self.endpoint,
            timeout=opts.timeout_s,
            watchdog_intervall=opts.timeout_s,
            auto_reconnect=False,
        )
        client.name = client.description = f"OpsTwin Gateway ({self.name})"
        client.application_uri = opts.application_uri
        client.product_uri = "urn:opstwin:gateway"
        client.session_timeout = int(opts.session_timeout_s * 1000)
        if opts.username is not None:
            client.set_user(opts.username)
            client.set_password(opts.password.get_secret_value() if opts.password else "")
        self._client = client
        self._node_info.clear()
        self._close_subscription()
        trust = None
        if opts.security_mode != "None":
            trust = await prepare_security(client, self.name, self.endpoint, opts, self.pki_dir)
            self._client_thumbprint = trust.client_thumbprint
        client.connection_lost_callback = functools.partial(self._connection_lost, client)
        try:
            await client.connect()
        except ua.UaStatusCodeError as exc:
            raise explain_refusal(
                exc, self.name, opts, self.pki_dir, self._client_thumbprint
            ) from exc
        except ua.UaError as exc:
            if not str(exc).startswith("No matching endpoints"):
                raise
            raise DeviceResponseError(
                f"{self.name}: {self.endpoint} offers no endpoint with security_mode "
                f"{opts.security_mode}"
            ) from exc
        except TimeoutError:
            raise ConnectionError(
                f"{self.endpoint}: no answer within {opts.timeout_s:g} s"
            ) from None
        if trust is not None:
            await pin_on_first_use(trust, self.name, self.endpoint)
        await self._read_server_info(client)

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        self._close_subscription()
        if client is None:
            return
        client.connection_lost_callback = None
        protocol = client.uaclient.protocol
        try:
            if protocol is not None and not protocol.is_closed:
                # Politely: CloseSession deletes the subscription on the server. A half-open
                # connection must not hold up the reconnection for long.
                await asyncio.wait_for(client.disconnect(), timeout=min(self.options.timeout_s, 2))
        except Exception:  # must not raise; the connection is going away anyway
            log.debug("%s: disconnect failed", self.name, exc_info=True)
        finally:
            _abandon(client)

    async def _run(self) -> None:
        client = self._client
        if client is None or client.uaclient.state is not UaClientState.CONNECTED:
            raise ConnectionLostError(f"{self.name}: connection lost while connecting")
        if self._unresolved:
            self._emit(list(self._unresolved))
        await self._check_datatypes(client)
        if self.options.mode == "poll":
            await self._poll_loop(client)
        else:
            await self._subscribe_and_watch(client)

    # -- subscription ---------------------------------------------------------------------------

    async def _subscribe_and_watch(self, client: Client) -> None:
        # Taken before the first await: _fail_pending clears self._lost, the cause stays on it.
        lost = self._lost
        subscription = Subscription(
            self.name,
            self.options,
            client,
            self._items,
            self._nodeids,
            limits=self._limits,
            call=self._call,
            deliver=self._deliver,
            alive=self._mark_healthy,
            ended=self._fail_pending,
        )
        self._subscription = subscription
        await subscription.create()
        self.subscriptions_created += 1
        self._emit(await subscription.add_items())
        await subscription.watch(functools.partial(self._sleep_unless_lost, lost=lost))

    def _close_subscription(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            subscription.close()

    # -- polling --------------------------------------------------------------------------------

    async def _poll_loop(self, client: Client) -> None:
        items = [item for item in self._items if item.key in self._nodeids]
        nodes = [self._nodeids[item.key] for item in items]

        async def poll() -> None:
            values = await self._read_values(client, nodes)
            self._deliver(
                [
                    sample_of(item.key, dv, item.lo, item.hi)
                    for item, dv in zip(items, values, strict=True)
                ]
            )
            self._mark_healthy()

        await self._poll_every(self.options.poll_interval_s, poll)

    def _deliver(self, samples: list[Sample]) -> None:
        """Log the quality transitions in `samples` and hand them on."""
        self._log_transitions(samples)
        self._emit(samples)

    async def _read_values(
        self,
        client: Client,
        nodes: list[ua.NodeId],
        attribute: ua.AttributeIds = ua.AttributeIds.Value,
    ) -> list[ua.DataValue]:
        """Read one attribute of many nodes in requests of at most MaxNodesPerRead."""

        async def read(batch: list[ua.NodeId]) -> list[ua.DataValue]:
            params = ua.ReadParameters(
                MaxAge=0,
                TimestampsToReturn=ua.TimestampsToReturn.Both,
                NodesToRead=[ua.ReadValueId(NodeId=n, AttributeId=attribute) for n in batch],
            )
            return await self._call(client.uaclient.read(params))

        return await self._limits.send(READ, nodes, read)

    # -- connection -----------------------------------------------------------------------------

    async def _read_server_info(self, client: Client) -> None:
        """Read namespaces and operation limits; resolve every point's node id."""
        opts = self.options
        values = await client.uaclient.read_attributes(
            [ua.NodeId(i) for i in _LIMIT_NODES], ua.AttributeIds.Value
        )
        namespaces = _value(values[0]) or []
        self._limits.set_stated(
            READ, opts.max_nodes_per_read or _limit(values[1], DEFAULT_NODES_PER_READ)
        )
        self._limits.set_stated(
            CREATE_ITEMS,
            opts.max_monitored_items_per_call or _limit(values[2], DEFAULT_ITEMS_PER_CALL),
        )
        self._nodeids.clear()
        self._unresolved = []
        now = time.time()
        for item in self._items:
            ref: NodeRef = item.point.node_id
            if ref.namespace_uri is None:
                self._nodeids[item.key] = ref.to_nodeid()
            elif ref.namespace_uri in namespaces:
                self._nodeids[item.key] = ref.to_nodeid(namespaces.index(ref.namespace_uri))
            else:
                self._unresolved.append(
                    Sample(
                        item.key,
                        None,
                        Quality.BAD,
                        now,
                        f"BadNodeIdUnknown: namespace {ref.namespace_uri} is not on the server",
                    )
                )
        if self._unresolved:
            log.warning(
                "%s: %d points name a namespace the server does not have: %s",
                self.name,
                len(self._unresolved),
                summarize_keys([s.key for s in self._unresolved]),
            )

    async def _check_datatypes(self, client: Client) -> None:
        """Take the points their node's DataType would cut or misread out of service, as BAD.

        Read once per connection, before subscribing: a PLC program may change between
        connections. A point without a configured datatype, or a node whose DataType is
        abstract (BaseDataType, Number: each value brings its own type), is not checked.
        """
        self._mismatched = {}
        typed = [i for i in self._items if i.point.datatype is not None and i.key in self._nodeids]
        if not typed:
            return
        dtypes = await self._read_values(
            client, [self._nodeids[i.key] for i in typed], ua.AttributeIds.DataType
        )
        builtin: dict[ua.NodeId, ua.VariantType | None] = {}
        bad: list[Sample] = []
        now = time.time()
        for item, dv in zip(typed, dtypes, strict=True):
            datatype = _value(dv)
            if not isinstance(datatype, ua.NodeId):
                continue  # no such node: subscribing or reading it says so, with the status
            if datatype not in builtin:
                builtin[datatype] = await self._builtin_type(client, datatype)
            vtype = builtin[datatype]
            reason = None if vtype is None else datatype_mismatch(vtype, str(item.point.datatype))
            if reason is None:
                continue
            # Not subscribed, not polled: a GOOD value of the wrong type would follow otherwise.
            del self._nodeids[item.key]
            self._mismatched[item.key] = reason
            self._quality[item.key] = Quality.BAD  # said below, once: no transition line too
            bad.append(Sample(item.key, None, Quality.BAD, now, reason))
        if not bad:
            return
        self._emit(bad)
        news = [s for s in bad if (s.key, s.reason) not in self._mismatch_logged]
        self._mismatch_logged.update((s.key, str(s.reason)) for s in news)
        if news:
            log.warning(
                "%s: %d points do not fit their node's DataType and stay BAD until the point's "
                "datatype or the PLC program is changed: %s",
                self.name,
                len(news),
                summarize_keys([f"{s.key} ({s.reason})" for s in news]),
            )

    async def _builtin_type(self, client: Client, datatype: ua.NodeId) -> ua.VariantType | None:
        """The builtin encoding of a DataType; None when abstract or the server cannot say."""
        vtype = variant_type_of(datatype)
        if vtype is not None or _is_abstract(datatype):
            return vtype
        try:
            found = await self._call(
                data_type_to_variant_type(Node(client.uaclient.session, datatype))
            )
        except ua.UaError:
            return None  # a vendor type the server cannot explain: nothing to check against
        return None if found is ua.VariantType.Variant else found

    async def _connection_lost(self, client: Client, exc: Exception) -> None:
        """asyncua's watchdog saw the connection or session die: fail the run at once."""
        if client is not self._client:
            return
        text = str(exc) or type(exc).__name__
        self._fail_pending(
            ConnectionLostError(f"{self.name}: lost the connection or session ({text})")
        )

    # -- writing --------------------------------------------------------------------------------

    async def _info(self, key: str, nodeid: ua.NodeId, where: str) -> _NodeInfo:
        """DataType, rank and access of a node: read once per connection, then cached."""
        info = self._node_info.get(key)
        if info is not None:
            return info
        client = self._client
        if client is None:
            raise NotConnectedError(f"{self.name}: not connected")
        attributes = (
            ua.AttributeIds.DataType,
            ua.AttributeIds.ValueRank,
            ua.AttributeIds.AccessLevel,
            ua.AttributeIds.UserAccessLevel,
            ua.AttributeIds.Value,
        )
        params = ua.ReadParameters(
            NodesToRead=[ua.ReadValueId(NodeId=nodeid, AttributeId=a) for a in attributes]
        )
        dtype, rank, access, user_access, current = await self._call(client.uaclient.read(params))
        for dv in (dtype, access):
            code = dv.StatusCode.value if dv.StatusCode is not None else 0
            if code & 0x80000000:
                raise DeviceResponseError(
                    f"{where}: cannot read the node's attributes: {status_name(code)}"
                )
        datatype = _value(dtype)
        if not isinstance(datatype, ua.NodeId):
            raise DeviceResponseError(f"{where}: the node has no DataType (is it a variable?)")
        vtype = variant_type_of(datatype)
        if vtype is None and not _is_abstract(datatype):
            found = await self._call(
                data_type_to_variant_type(Node(client.uaclient.session, datatype))
            )
            vtype = None if found is ua.VariantType.Variant else found
        if vtype is None:
            # An abstract DataType (Number, BaseDataType): the value's own encoding decides.
            variant = current.Value
            if variant is None or variant.VariantType is ua.VariantType.Null:
                raise WriteRejectedError(
                    f"{where}: the node's DataType {datatype.to_string()} is abstract and it "
                    "holds no value to tell the encoding from"
                )
            vtype = variant.VariantType
        rank_value = _value(rank)
        access_bits = _value(access) or 0
        user_bits = _value(user_access)
        info = _NodeInfo(
            vtype=vtype,
            array=isinstance(rank_value, int) and rank_value >= 1,
            writable=bool(access_bits & _CURRENT_WRITE),
            user_writable=user_bits is None or bool(user_bits & _CURRENT_WRITE),
        )
        self._node_info[key] = info
        return info

    async def _read_back(
        self, client: Client, nodeid: ua.NodeId, vtype: ua.VariantType, written: Any, where: str
    ) -> ua.DataValue:
        """Read the node until it shows `written` or `write_verify_s` is over."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.write_verify_s
        while True:
            (dv,) = await self._read_values(client, [nodeid])
            code = dv.StatusCode.value if dv.StatusCode is not None else 0
            if code & 0x80000000:
                raise DeviceResponseError(
                    f"{where}: written, but reading it back failed: {status_name(code)}"
                )
            actual = _value(dv)
            if values_match(vtype, written, actual):
                return dv
            if loop.time() >= deadline:
                raise WriteVerifyError(
                    f"{where}: wrote {written!r} ({vtype.name}) but read back {actual!r}"
                )
            await asyncio.sleep(0.05)


# -- helpers ------------------------------------------------------------------------------------


def _check_endpoint(name: str, endpoint: str) -> str:
    parts = urlsplit(endpoint)
    try:
        port_ok = parts.port != 0
    except ValueError:
        port_ok = False
    if parts.scheme != "opc.tcp" or not parts.hostname or not port_ok:
        raise ConfigurationError(
            f"{name}: expected an endpoint like opc.tcp://HOST:PORT/PATH, got {endpoint!r}"
        )
    return endpoint


def _check_value(point: OpcuaPoint, value: Any) -> str | None:
    """Why `value` may not be written to `point` before knowing the node's type, or None."""
    if isinstance(value, bool | str):
        return None
    if not isinstance(value, int | float):
        return f"values of type {type(value).__name__} cannot be written"
    return limit_violation(value, point.lo, point.hi)


def _value(dv: ua.DataValue) -> Any:
    code = dv.StatusCode.value if dv.StatusCode is not None else 0
    if code & 0x80000000 or dv.Value is None:
        return None
    return dv.Value.Value


def _limit(dv: ua.DataValue, default: int) -> int:
    value = _value(dv)
    return (
        value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default
    )


def _is_abstract(datatype: ua.NodeId) -> bool:
    return datatype.NamespaceIndex == 0 and datatype.Identifier in ABSTRACT_DATATYPES


def _abandon(client: Client) -> None:
    """Make sure nothing of a client outlives its connection (tasks, socket)."""
    client.uaclient.request_disconnect()
    with contextlib.suppress(Exception):
        publish = client.uaclient.session._publish_task
        if publish is not None and not publish.done():
            publish.cancel()
    for name in ("_supervisor_task", "_stale_watchdog_task", "_renew_channel_task"):
        task = getattr(client, name, None)
        if task is not None and not task.done():
            task.cancel()
    with contextlib.suppress(Exception):
        client.disconnect_socket()
