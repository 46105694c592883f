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
- a subscription that went silent (the server stopped publishing or forgot it): no data and
  no keep-alive for `watchdog_factor` keep-alive periods (`drivers.opcua.watchdog`);
- a subscription the server ended (StatusChangeNotification, e.g. BadTimeout): at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState
from asyncua.common.node import Node
from asyncua.common.ua_utils import data_type_to_variant_type
from asyncua.crypto import security_policies
from pydantic import ValidationError

from drivers.backoff import Backoff
from drivers.base import Driver, Quality, Sample
from drivers.errors import (
    ConfigurationError,
    ConnectionLostError,
    DeviceError,
    NotConnectedError,
    WriteRejectedError,
    WriteVerifyError,
)
from drivers.opcua.convert import (
    ABSTRACT_DATATYPES,
    ConversionError,
    sample_of,
    status_name,
    to_variant,
    values_match,
    variant_type_of,
)
from drivers.opcua.options import OpcuaOptions
from drivers.opcua.point import NodeRef, OpcuaPoint
from drivers.opcua.security import (
    ensure_client_certificate,
    first_certificate,
    load_certificate_file,
    pin_path,
    read_pin,
    thumbprint,
    write_pin,
)
from drivers.opcua.watchdog import SubscriptionWatchdog, silence_limit_s
from drivers.quality import format_range

__all__ = ["DEFAULT_ITEMS_PER_CALL", "DEFAULT_NODES_PER_READ", "OpcuaDriver"]

log = logging.getLogger(__name__)


class _ExpectedLossFilter(logging.Filter):
    """Drop asyncua's traceback for a publish request failed by a lost connection.

    Every connection loss fails the pending Publish request, and asyncua logs that at ERROR
    with a traceback. The driver notices the loss and logs it once, with its cause.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (
            isinstance(exc, ConnectionError) and record.getMessage().startswith("Publish iteration")
        )


logging.getLogger("asyncua.client.ua_session.UaSession").addFilter(_ExpectedLossFilter())

T = TypeVar("T")

# Used when the server does not state its OperationLimits (absent, or 0 = "no limit"): large
# enough to need few requests, small enough for any server's message size.
DEFAULT_NODES_PER_READ = 1000
DEFAULT_ITEMS_PER_CALL = 1000

_LIMIT_NODES = (
    ua.ObjectIds.Server_NamespaceArray,
    ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
    ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
)
_TOO_MANY = ua.StatusCodes.BadTooManyOperations
_CURRENT_WRITE = 1 << ua.AccessLevel.CurrentWrite
_AUTH_CODES = frozenset(
    {
        ua.StatusCodes.BadUserAccessDenied,
        ua.StatusCodes.BadIdentityTokenRejected,
        ua.StatusCodes.BadIdentityTokenInvalid,
    }
)
_CERT_CODES = frozenset(
    {
        ua.StatusCodes.BadCertificateUntrusted,
        ua.StatusCodes.BadSecurityChecksFailed,
        ua.StatusCodes.BadCertificateInvalid,
        ua.StatusCodes.BadCertificateUriInvalid,
        ua.StatusCodes.BadCertificateTimeInvalid,
        ua.StatusCodes.BadCertificateRevoked,
    }
)
_FILTER_REFUSED = frozenset(
    {
        ua.StatusCodes.BadFilterNotAllowed,
        ua.StatusCodes.BadMonitoredItemFilterUnsupported,
        ua.StatusCodes.BadMonitoredItemFilterInvalid,
        ua.StatusCodes.BadDeadbandFilterInvalid,
    }
)
# Still Good, but the subscription is gone from this session (moved to another one).
_GOOD_TRANSFERRED = ua.StatusCodes.GoodSubscriptionTransferred


@dataclass(slots=True, frozen=True)
class _Item:
    """A point with its client handle (the index into the driver's list, plus 1)."""

    handle: int
    key: str
    lo: float | None
    hi: float | None
    point: OpcuaPoint


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
            _Item(i + 1, p.key, p.lo, p.hi, p) for i, p in enumerate(self._points.values())
        ]

        # Per connection:
        self._client: Client | None = None
        self._nodeids: dict[str, ua.NodeId] = {}
        self._unresolved: list[Sample] = []
        self._nodes_per_read = DEFAULT_NODES_PER_READ
        self._items_per_call = DEFAULT_ITEMS_PER_CALL
        self._learned_limits: dict[str, int] = {}  # service -> largest batch not refused
        self._node_info: dict[str, _NodeInfo] = {}
        self._sub_id: int | None = None
        self._watchdog: SubscriptionWatchdog | None = None
        self._heard_since_subscribe = False
        self._quality: dict[str, Quality] = {}
        self._write_lock = asyncio.Lock()
        self._client_thumbprint: str | None = None
        #: CreateMonitoredItems requests sent since start, and the largest batch (for tests
        #: and metrics).
        self.monitored_item_calls = 0
        self.largest_item_batch = 0
        #: Subscriptions created since start: 1 + every resubscription after a loss.
        self.subscriptions_created = 0

    # -- Driver API -----------------------------------------------------------------------------

    @property
    def keys(self) -> Sequence[str]:
        """Keys of every point this driver serves."""
        return tuple(self._points)

    @property
    def server_limits(self) -> tuple[int, int]:
        """(nodes per read, monitored items per call) in use on the current connection."""
        return self._nodes_per_read, self._items_per_call

    async def write(self, key: str, value: Any) -> Any:
        """Write a point, read it back, verify it, emit it as GOOD and return the value read.

        Refused before anything is sent (WriteRejectedError): an unknown or read-only point,
        a value outside the point's limits, a value the node's DataType cannot take (wrong
        type, fraction for an integer, out of the type's range). A server that refuses the
        write answers with a status (BadNotWritable, BadTypeMismatch, BadOutOfRange,
        BadUserAccessDenied, …): DeviceError naming it.
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
            if nodeid is None:
                reason = next((s.reason for s in self._unresolved if s.key == key), "unknown")
                raise DeviceError(f"{where}: the node is not on the server: {reason}")
            info = await self._info(key, nodeid, where)
            if not info.writable:
                raise DeviceError(
                    f"{where}: the server does not allow writing this node "
                    "(its AccessLevel has no CurrentWrite): BadNotWritable"
                )
            if not info.user_writable:
                raise DeviceError(
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
                raise DeviceError(
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
        self._quality.clear()
        self._sub_id = None
        self._watchdog = None
        pin = None
        if opts.security_mode != "None":
            pin = await self._prepare_security(client)
        client.connection_lost_callback = functools.partial(self._connection_lost, client)
        try:
            await client.connect()
        except ua.UaStatusCodeError as exc:
            raise self._explain_refusal(exc) from exc
        except ua.UaError as exc:
            if not str(exc).startswith("No matching endpoints"):
                raise
            raise DeviceError(
                f"{self.name}: {self.endpoint} offers no endpoint with security_mode "
                f"{opts.security_mode}"
            ) from exc
        except TimeoutError:
            raise ConnectionError(
                f"{self.endpoint}: no answer within {opts.timeout_s:g} s"
            ) from None
        if pin is not None:
            path, der = pin
            await asyncio.to_thread(write_pin, path, der)
            log.warning(
                "%s: trusting the server certificate of %s on first use (SHA-1 thumbprint %s); "
                "pinned at %s. A different certificate will be refused until that file is "
                "deleted.",
                self.name,
                self.endpoint,
                thumbprint(der),
                path,
            )
        await self._read_server_info(client)

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        self._sub_id = None
        self._watchdog = None
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
        if self.options.mode == "poll":
            await self._poll_loop(client)
        else:
            await self._subscribe_and_watch(client)

    # -- subscription ---------------------------------------------------------------------------

    async def _subscribe_and_watch(self, client: Client) -> None:
        opts = self.options
        lost = self._lost
        loop = asyncio.get_running_loop()
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=opts.publishing_interval_ms,
            RequestedLifetimeCount=opts.lifetime_count,
            RequestedMaxKeepAliveCount=opts.keepalive_count,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
            Priority=0,
        )
        self._heard_since_subscribe = False
        result = await self._call(client.uaclient.create_subscription(params, self._on_publish))
        self._sub_id = result.SubscriptionId
        self.subscriptions_created += 1
        limit = silence_limit_s(
            result.RevisedPublishingInterval or opts.publishing_interval_ms,
            result.RevisedMaxKeepAliveCount or opts.keepalive_count,
            opts.watchdog_factor,
        )
        failed = await self._create_items(client, result.SubscriptionId)
        if failed:
            self._emit(failed)
        watchdog = SubscriptionWatchdog(limit, loop.time())
        self._watchdog = watchdog
        log.info(
            "%s: subscribed to %d items (publishing %g ms, keep-alive %d, silent after %.1f s)",
            self.name,
            len(self._nodeids) - len(failed),
            result.RevisedPublishingInterval,
            result.RevisedMaxKeepAliveCount,
            limit,
        )
        while True:
            await _sleep_unless_lost(watchdog.remaining(loop.time()), lost)
            silence = watchdog.silent_for(loop.time())
            if silence is not None:
                raise ConnectionLostError(
                    f"{self.name}: subscription silent for {silence:.1f} s (no data, no "
                    f"keep-alive; limit {limit:.1f} s)"
                )

    async def _create_items(self, client: Client, sub_id: int) -> list[Sample]:
        """Create the monitored items in batches; return BAD samples for those refused."""
        opts = self.options
        default_interval = (
            -1.0 if opts.sampling_interval_ms is None else float(opts.sampling_interval_ms)
        )
        requests: list[tuple[_Item, ua.MonitoredItemCreateRequest]] = []
        for item in self._items:
            nodeid = self._nodeids.get(item.key)
            if nodeid is None:
                continue
            p = item.point
            interval = (
                default_interval if p.sampling_interval_ms is None else p.sampling_interval_ms
            )
            deadband = opts.deadband if p.deadband is None else p.deadband
            mparams = ua.MonitoringParameters(
                ClientHandle=item.handle,
                SamplingInterval=interval,
                QueueSize=opts.queue_size if p.queue_size is None else p.queue_size,
                DiscardOldest=True,
            )
            if deadband:
                mparams.Filter = ua.DataChangeFilter(
                    Trigger=ua.DataChangeTrigger.StatusValue,
                    DeadbandType=ua.DeadbandType.Absolute,
                    DeadbandValue=float(deadband),
                )
            requests.append(
                (
                    item,
                    ua.MonitoredItemCreateRequest(
                        ItemToMonitor=ua.ReadValueId(
                            NodeId=nodeid, AttributeId=ua.AttributeIds.Value
                        ),
                        MonitoringMode=ua.MonitoringMode.Reporting,
                        RequestedParameters=mparams,
                    ),
                )
            )

        async def create(batch: list[ua.MonitoredItemCreateRequest]) -> list[Any]:
            self.monitored_item_calls += 1
            self.largest_item_batch = max(self.largest_item_batch, len(batch))
            create_params = ua.CreateMonitoredItemsParameters(
                SubscriptionId=sub_id,
                TimestampsToReturn=ua.TimestampsToReturn.Both,
                ItemsToCreate=batch,
            )
            return await self._call(client.uaclient.create_monitored_items(create_params))

        results = await self._batched(
            [r for _, r in requests], self._items_per_call, create, "CreateMonitoredItems"
        )
        outcome = list(zip(requests, results, strict=True))
        # A deadband on a node that is not numeric (a bool, a string) or a server without
        # DataChangeFilter support: subscribe without the filter; the twin applies the
        # deadband again at ingest anyway.
        unfiltered = [
            (item, request)
            for (item, request), res in outcome
            if res.StatusCode.value in _FILTER_REFUSED
            and isinstance(request.RequestedParameters.Filter, ua.DataChangeFilter)
        ]
        if unfiltered:
            for _, request in unfiltered:
                request.RequestedParameters.Filter = ua.ExtensionObject()  # no filter
            log.info(
                "%s: deadband filter refused for %s; subscribed without it",
                self.name,
                _some([item.key for item, _ in unfiltered]),
            )
            retried = await self._batched(
                [r for _, r in unfiltered], self._items_per_call, create, "CreateMonitoredItems"
            )
            outcome = [
                (pair, res)
                for pair, res in outcome
                if not any(pair[0] is item for item, _ in unfiltered)
            ] + list(zip(unfiltered, retried, strict=True))
        failed: list[Sample] = []
        now = time.time()
        for (item, _), res in outcome:
            code = res.StatusCode.value
            if code & 0x80000000:
                failed.append(Sample(item.key, None, Quality.BAD, now, status_name(code)))
        if failed:
            log.warning(
                "%s: the server refused %d monitored items: %s",
                self.name,
                len(failed),
                _some([f"{s.key} ({s.reason})" for s in failed]),
            )
        return failed

    def _on_publish(self, result: ua.PublishResult) -> None:
        """Turn one publish response into samples; called by asyncua's publish loop."""
        if result.SubscriptionId != self._sub_id:
            return
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.heard(asyncio.get_running_loop().time())
        if not self._heard_since_subscribe:
            # The whole path works (session, subscription, publish): reconnect fast next time.
            self._heard_since_subscribe = True
            self._mark_healthy()
        data = result.NotificationMessage.NotificationData
        if not data:
            return  # a keep-alive
        items = self._items
        count = len(items)
        samples: list[Sample] = []
        append = samples.append
        for notification in data:
            if type(notification) is ua.DataChangeNotification:
                for mi in notification.MonitoredItems:
                    handle = mi.ClientHandle
                    if 0 < handle <= count:
                        item = items[handle - 1]
                        append(sample_of(item.key, mi.Value, item.lo, item.hi))
            elif isinstance(notification, ua.StatusChangeNotification):
                self._subscription_status(notification.Status)
        if samples:
            self._log_transitions(samples)
            self._emit(samples)

    def _subscription_status(self, status: ua.StatusCode) -> None:
        code = status.value
        if code & 0x80000000 or code == _GOOD_TRANSFERRED:
            self._fail_pending(
                ConnectionLostError(
                    f"{self.name}: the server ended the subscription: {status_name(code)}"
                )
            )

    # -- polling --------------------------------------------------------------------------------

    async def _poll_loop(self, client: Client) -> None:
        lost = self._lost
        loop = asyncio.get_running_loop()
        interval = self.options.poll_interval_s
        keys = [item for item in self._items if item.key in self._nodeids]
        nodes = [self._nodeids[item.key] for item in keys]
        tick = loop.time()
        while True:
            values = await self._read_values(client, nodes)
            samples = [
                sample_of(item.key, dv, item.lo, item.hi)
                for item, dv in zip(keys, values, strict=True)
            ]
            self._log_transitions(samples)
            self._emit(samples)
            self._mark_healthy()
            now = loop.time()
            tick = _next_tick(tick, now, interval)
            await _sleep_unless_lost(tick - now, lost)

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

        return await self._batched(nodes, self._nodes_per_read, read, "Read")

    async def _batched(
        self,
        requests: list[Any],
        size: int,
        send: Callable[[list[Any]], Awaitable[list[T]]],
        service: str,
    ) -> list[T]:
        """Send `requests` in batches of `size`; halve the batch while the server says too many."""
        results: list[T] = []
        start = 0
        while start < len(requests):
            batch = requests[start : start + size]
            try:
                answer = await send(batch)
            except ua.UaStatusCodeError as exc:
                if exc.code != _TOO_MANY or size == 1:
                    raise
                size = max(size // 2, 1)
                # Remembered for this connection and the next ones: asking again at the size
                # the server refused would cost a refused request every time.
                self._learned_limits[service] = size
                self._apply_learned_limits()
                log.info(
                    "%s: %s of %d items refused as too many; trying %d per request",
                    self.name,
                    service,
                    len(batch),
                    size,
                )
                continue
            if len(answer) != len(batch):
                raise ConnectionLostError(
                    f"{self.name}: {service} answered {len(answer)} results for {len(batch)} items"
                )
            results.extend(answer)
            start += len(batch)
        return results

    # -- connection -----------------------------------------------------------------------------

    async def _prepare_security(self, client: Client) -> tuple[Path, bytes] | None:
        """Set up message security; return (path, certificate) to pin after connecting, if any."""
        opts = self.options
        if self.pki_dir is None:
            raise ConfigurationError(
                f"{self.name}: security_mode {opts.security_mode} needs a folder for the "
                "client certificate (pki_dir), and the driver was given none"
            )
        own = await asyncio.to_thread(ensure_client_certificate, self.pki_dir, opts.application_uri)
        pinned_at: Path | None = None
        if opts.server_certificate is not None:
            expected: bytes | None = await asyncio.to_thread(
                load_certificate_file, opts.server_certificate
            )
            source = f"server_certificate {opts.server_certificate}"
        else:
            pinned_at = pin_path(self.pki_dir, self.endpoint)
            expected = await asyncio.to_thread(read_pin, pinned_at)
            source = f"the certificate pinned at {pinned_at}"
        mode = getattr(ua.MessageSecurityMode, opts.security_mode)
        policy = security_policies.SecurityPolicyBasic256Sha256
        try:
            endpoints = await client.connect_and_get_server_endpoints()
        except TimeoutError:
            raise ConnectionError(
                f"{self.endpoint}: no answer within {opts.timeout_s:g} s"
            ) from None
        try:
            endpoint = Client.find_endpoint(endpoints, mode, policy.URI)
        except ua.UaError:
            offered = sorted(
                {
                    f"{e.SecurityPolicyUri.rsplit('#', 1)[-1]} {e.SecurityMode.name}"
                    for e in endpoints
                }
            )
            raise DeviceError(
                f"{self.name}: {self.endpoint} offers no {opts.security_policy} "
                f"{opts.security_mode} endpoint (it offers: {', '.join(offered)})"
            ) from None
        server_der = first_certificate(endpoint.ServerCertificate or b"")
        if not server_der:
            raise DeviceError(f"{self.name}: {self.endpoint} presents no server certificate")
        if expected is not None and first_certificate(expected) != server_der:
            raise DeviceError(
                f"{self.name}: {self.endpoint} presents a certificate with SHA-1 thumbprint "
                f"{thumbprint(server_der)}, not {source} ({thumbprint(expected)}); refusing "
                "to connect. If the server's certificate was renewed on purpose, delete the "
                "pinned file (or point server_certificate at the new one)."
            )
        await client.set_security(
            policy,
            certificate=str(own.cert),
            private_key=str(own.key),
            server_certificate=server_der,
            mode=mode,
        )
        self._client_thumbprint = own.thumbprint
        if expected is None and pinned_at is not None:
            return pinned_at, server_der
        return None

    async def _read_server_info(self, client: Client) -> None:
        """Read namespaces and operation limits; resolve every point's node id."""
        opts = self.options
        values = await client.uaclient.read_attributes(
            [ua.NodeId(i) for i in _LIMIT_NODES], ua.AttributeIds.Value
        )
        namespaces = _value(values[0]) or []
        self._nodes_per_read = opts.max_nodes_per_read or _limit(values[1], DEFAULT_NODES_PER_READ)
        self._items_per_call = opts.max_monitored_items_per_call or _limit(
            values[2], DEFAULT_ITEMS_PER_CALL
        )
        self._apply_learned_limits()
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
                _some([s.key for s in self._unresolved]),
            )

    def _apply_learned_limits(self) -> None:
        learned = self._learned_limits
        self._nodes_per_read = min(self._nodes_per_read, learned.get("Read", self._nodes_per_read))
        self._items_per_call = min(
            self._items_per_call, learned.get("CreateMonitoredItems", self._items_per_call)
        )

    async def _connection_lost(self, client: Client, exc: Exception) -> None:
        """asyncua's watchdog saw the connection or session die: fail the run at once."""
        if client is not self._client:
            return
        text = str(exc) or type(exc).__name__
        self._fail_pending(
            ConnectionLostError(f"{self.name}: lost the connection or session ({text})")
        )

    def _explain_refusal(self, exc: ua.UaStatusCodeError) -> Exception:
        """Turn a status the server answered the connection with into an error that says why."""
        code = exc.code
        name = status_name(code)
        opts = self.options
        if code in _AUTH_CODES:
            if opts.username is None:
                return DeviceError(
                    f"{self.name}: the server refused anonymous access: {name} (it needs a "
                    "username and password)"
                )
            return DeviceError(
                f"{self.name}: the server refused user {opts.username!r}: {name} (check "
                "username and password)"
            )
        if code in _CERT_CODES:
            thumb = self._client_thumbprint
            return DeviceError(
                f"{self.name}: the server refused the gateway's client certificate: {name} "
                f"(trust {self.pki_dir / 'own' / 'cert.der' if self.pki_dir else 'it'}"
                f"{f', SHA-1 {thumb}' if thumb else ''} on the server)"
            )
        return DeviceError(f"{self.name}: the server refused the connection: {name}")

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
                raise DeviceError(
                    f"{where}: cannot read the node's attributes: {status_name(code)}"
                )
        datatype = _value(dtype)
        if not isinstance(datatype, ua.NodeId):
            raise DeviceError(f"{where}: the node has no DataType (is it a variable?)")
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
                raise DeviceError(
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

    # -- logging --------------------------------------------------------------------------------

    def _log_transitions(self, samples: list[Sample]) -> None:
        went_bad: dict[str, list[str]] = {}
        doubtful: dict[str, list[str]] = {}
        recovered: list[str] = []
        last = self._quality
        good = Quality.GOOD
        for s in samples:
            quality = s.quality
            before = last.get(s.key)
            if quality is before:
                continue
            last[s.key] = quality
            if quality is Quality.BAD:
                went_bad.setdefault(s.reason or "unknown", []).append(s.key)
            elif quality is Quality.UNCERTAIN:
                doubtful.setdefault(s.reason or "unknown", []).append(s.key)
            elif quality is good and before is not None:
                recovered.append(s.key)
        for reason, keys in went_bad.items():
            log.warning("%s: %s BAD: %s", self.name, _some(keys), reason)
        for reason, keys in doubtful.items():
            log.info("%s: %s UNCERTAIN: %s", self.name, _some(keys), reason)
        if recovered:
            log.info("%s: %s GOOD again", self.name, _some(recovered))


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
    if not math.isfinite(value):
        return "the value is not finite"
    if (point.lo is not None and value < point.lo) or (point.hi is not None and value > point.hi):
        return "outside the point's limits"
    return None


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


def _next_tick(tick: float, now: float, interval: float) -> float:
    """The next tick of a fixed-rate loop after `now`, skipping the ticks it overran."""
    tick += interval
    if tick <= now:
        tick += math.ceil((now - tick) / interval) * interval
        if tick <= now:
            tick += interval
    return tick


async def _sleep_unless_lost(delay: float, lost: asyncio.Future[None] | None) -> None:
    """Sleep `delay` seconds, but raise the cause at once if the connection drops meanwhile."""
    if lost is None:
        raise ConnectionLostError("connection lost")
    if not lost.done():
        await asyncio.wait({lost}, timeout=max(delay, 0.0))
    if lost.done():
        cause = lost.exception()
        raise cause if cause is not None else ConnectionLostError("connection lost")


def _some(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} and {len(keys) - limit} more"
