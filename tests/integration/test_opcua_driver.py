"""The OPC UA driver over real TCP against a plain asyncua Server started in-process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager
from cryptography.x509.oid import ExtendedKeyUsageOID
from tests_support import free_port

from drivers.backoff import Backoff
from drivers.contract import ConnectionState, Quality, Sample
from drivers.errors import DeviceResponseError, WriteRejectedError, WriteVerifyError
from drivers.opcua import OpcuaDriver, OpcuaPoint
from plantsim import OvenDevice

pytestmark = pytest.mark.timeout(60)

NS = "urn:opstwin:test:plc"
# Short intervals: a keep-alive every 0.3 s, a silent subscription noticed after 1 s.
FAST = {
    "publishing_interval_ms": 50,
    "keepalive_count": 6,
    "lifetime_count": 60,
    "timeout_s": 1.0,
    "poll_interval_s": 0.05,
    "write_verify_s": 0.3,
}

# name: (initial value, variant type, writable on the server)
NODES: dict[str, tuple[Any, ua.VariantType, bool]] = {
    "Oven1.Temperature": (20.0, ua.VariantType.Double, False),
    "Oven1.Setpoint": (180, ua.VariantType.Int16, True),
    "Oven1.Ratio": (0.5, ua.VariantType.Float, True),
    "Oven1.Enabled": (False, ua.VariantType.Boolean, True),
    "Oven1.Recipe": ("bake-1", ua.VariantType.String, True),
    "Oven1.Counter": (7, ua.VariantType.UInt32, True),
    "Oven1.Locked": (1.0, ua.VariantType.Double, False),
    "Oven1.Guarded": (5.0, ua.VariantType.Double, True),
    "Oven1.Sticky": (3.0, ua.VariantType.Double, True),  # answers Good, keeps its value
    "Oven1.Slow": (4.0, ua.VariantType.Double, True),  # applies a write 150 ms later
}


class Users(UserManager):
    """One user, operator / s3cret."""

    def get_user(
        self, iserver: Any, username: Any = None, password: Any = None, certificate: Any = None
    ) -> User | None:
        if username == "operator" and password == "s3cret":
            return User(role=UserRole.User)
        return None


class Plc:
    """An asyncua Server on a fixed port that a test can stop and start again (same certificate)."""

    def __init__(
        self,
        *,
        signals: int = 0,
        max_items_per_call: int | None = None,
        max_nodes_per_read: int | None = None,
        secure_dir: Path | None = None,
        users: bool = False,
    ) -> None:
        self.port = free_port()
        self.signals = signals
        self.max_items_per_call = max_items_per_call
        self.max_nodes_per_read = max_nodes_per_read
        self.secure_dir = secure_dir
        self.users = users
        self.server: Server | None = None
        self.nodes: dict[str, ua.NodeId] = {}
        self.item_calls: list[int] = []  # size of each CreateMonitoredItems request
        self.read_calls: list[int] = []  # size of each Read request
        self.refuse_writes: dict[str, int] = {}  # node name -> status to answer writes with
        self.starts = 0

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}/plc"

    async def start(self) -> None:
        server = Server(user_manager=Users() if self.users else None)
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("Test PLC")
        server.disable_clock()  # its 1 s loop would hold up every stop()
        if self.secure_dir is not None:
            cert, key = await self._server_certificate()
            await server.load_certificate(str(cert))
            await server.load_private_key(str(key))
            await server.set_application_uri("urn:opstwin:test:plc-server")
            server.set_security_policy(
                [
                    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                    *([ua.SecurityPolicyType.Basic256Sha256_Sign] if self.users else []),
                ]
            )
        if self.users:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        idx = await server.register_namespace(NS)
        assert idx == 2
        oven = await server.nodes.objects.add_object(idx, "Oven1")
        for name, (value, vtype, writable) in NODES.items():
            var = await oven.add_variable(ua.NodeId(name, idx), name, ua.Variant(value, vtype))
            if writable:
                await var.set_writable()
            self.nodes[name] = var.nodeid
        server.set_attribute_value_setter(self.nodes["Oven1.Sticky"], lambda *_: None)
        server.set_attribute_value_setter(self.nodes["Oven1.Slow"], _apply_later)
        bench = await server.nodes.objects.add_object(idx, "Bench")
        for i in range(self.signals):
            name = f"Bench.Signal{i:05d}"
            var = await bench.add_variable(ua.NodeId(name, idx), name, float(i))
            self.nodes[name] = var.nodeid
        await self._limits(server)
        self._count_calls(server)
        await server.start()
        self.server = server
        self.starts += 1

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def set(
        self, name: str, value: Any, status: int = ua.StatusCodes.Good, ts: datetime | None = None
    ) -> None:
        """Change a value on the PLC side, as its program would."""
        assert self.server is not None
        vtype = NODES[name][1] if name in NODES else ua.VariantType.Double
        variant = ua.Variant() if status & 0x80000000 else ua.Variant(value, vtype)
        await self.server.write_attribute_value(
            self.nodes[name],
            ua.DataValue(variant, ua.StatusCode(status), SourceTimestamp=ts or datetime.now(UTC)),
        )

    def get(self, name: str) -> Any:
        assert self.server is not None
        return self.server.read_attribute_value(self.nodes[name]).Value.Value

    def silence(self, how: str) -> None:
        """Make every subscription go quiet without closing the connection."""
        assert self.server is not None
        service = self.server.iserver.subscription_service
        for sub_id, sub in list(service.subscriptions.items()):
            if how == "pause":  # the publishing loop stops: no data, no keep-alive
                assert sub._task is not None
                sub._task.cancel()
            else:  # the server forgets the subscription
                service.subscriptions.pop(sub_id)

    async def close_sessions(self) -> None:
        """Close every client session from the server side (an admin action, a session purge)."""
        assert self.server is not None
        for session in list(self.server.iserver._external_sessions.values()):
            await session.close_session(True)

    async def _limits(self, server: Server) -> None:
        caps = ua.ObjectIds
        for nodeid, limit in (
            (
                caps.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
                self.max_items_per_call,
            ),
            (
                caps.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
                self.max_nodes_per_read,
            ),
        ):
            if limit is not None:
                await server.write_attribute_value(
                    ua.NodeId(nodeid), ua.DataValue(ua.Variant(limit, ua.VariantType.UInt32))
                )

    def _count_calls(self, server: Server) -> None:
        """Record request sizes, and refuse requests above the limits, as a strict PLC would."""
        service = server.iserver.subscription_service
        create = service.create_monitored_items

        async def counted_create(params: ua.CreateMonitoredItemsParameters) -> Any:
            self.item_calls.append(len(params.ItemsToCreate))
            if self.max_items_per_call and len(params.ItemsToCreate) > self.max_items_per_call:
                raise ServiceError(ua.StatusCodes.BadTooManyOperations)
            # A deadband filter on a bool or a string: refused, as the specification says.
            by_id = {v: k for k, v in self.nodes.items()}
            textual = {ua.VariantType.Boolean, ua.VariantType.String}
            refused = {
                i
                for i, item in enumerate(params.ItemsToCreate)
                if type(item.RequestedParameters.Filter).__name__ == "DataChangeFilter"
                and NODES.get(by_id.get(item.ItemToMonitor.NodeId, ""), (0, None))[1] in textual
            }
            if not refused:
                return await create(params)
            kept = [m for i, m in enumerate(params.ItemsToCreate) if i not in refused]
            done = iter(
                await create(dataclasses.replace(params, ItemsToCreate=kept)) if kept else []
            )
            return [
                ua.MonitoredItemCreateResult(
                    StatusCode=ua.StatusCode(ua.StatusCodes.BadFilterNotAllowed)
                )
                if i in refused
                else next(done)
                for i in range(len(params.ItemsToCreate))
            ]

        service.create_monitored_items = counted_create
        attributes = server.iserver.attribute_service
        read, write = attributes.read, attributes.write

        def counted_read(params: ua.ReadParameters) -> Any:
            if len(params.NodesToRead) > 1 or params.NodesToRead[0].NodeId.NamespaceIndex:
                self.read_calls.append(len(params.NodesToRead))
            if self.max_nodes_per_read and len(params.NodesToRead) > self.max_nodes_per_read:
                raise ServiceError(ua.StatusCodes.BadTooManyOperations)
            return read(params)

        async def refusing_write(params: ua.WriteParameters, user: Any = None) -> Any:
            by_id = {v: k for k, v in self.nodes.items()}
            refused = [self.refuse_writes.get(by_id.get(w.NodeId, "")) for w in params.NodesToWrite]
            if any(refused):
                return [ua.StatusCode(code or 0) for code in refused]
            return await (write(params) if user is None else write(params, user))

        attributes.read = counted_read
        attributes.write = refusing_write

    async def _server_certificate(self) -> tuple[Path, Path]:
        assert self.secure_dir is not None
        cert, key = self.secure_dir / "server.der", self.secure_dir / "server.pem"
        if not cert.exists():
            await cert_gen.setup_self_signed_certificate(
                key,
                cert,
                "urn:opstwin:test:plc-server",
                socket.gethostname(),
                [ExtendedKeyUsageOID.SERVER_AUTH],
                {},
            )
        return cert, key


def _apply_later(node: Any, attr: ua.AttributeIds, value: ua.DataValue) -> None:
    def apply() -> None:
        node.attributes[attr].value = value

    asyncio.get_running_loop().call_later(0.15, apply)


class Proxy:
    """A TCP relay between driver and PLC that can go silent, as a pulled cable does.

    Frozen, it keeps every socket open but passes no byte either way (no FIN, no RST): the
    driver has to notice the silence by itself.
    """

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.frozen = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    def endpoint(self, path: str = "/plc") -> str:
        return f"opc.tcp://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if self.frozen.is_set():
                    continue  # swallowed: the far side never hears of it
                writer.write(data)
                await writer.drain()
        writer.close()


class Recorder:
    """Consumes a driver's sample stream and keeps the latest sample per key."""

    def __init__(self, driver: OpcuaDriver) -> None:
        self.driver = driver
        self.latest: dict[str, Sample] = {}
        self.samples: list[Sample] = []
        self.states: list[tuple[ConnectionState, str | None]] = []
        driver.add_state_listener(lambda name, state, reason: self.states.append((state, reason)))
        self._task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        async for batch in self.driver.samples():
            self.samples.extend(batch)
            for s in batch:
                self.latest[s.key] = s

    async def until(self, check: Callable[[dict[str, Sample]], bool], within: float = 5.0) -> float:
        """Wait until `check(latest)` holds; return how long that took."""
        start = time.monotonic()
        while not check(self.latest):
            if time.monotonic() - start > within:
                got = {k: (s.quality.value, s.value, s.reason) for k, s in self.latest.items()}
                raise AssertionError(f"condition not met within {within} s; latest: {got}")
            await asyncio.sleep(0.01)
        return time.monotonic() - start

    async def all(
        self, quality: Quality, keys: list[str] | None = None, within: float = 5.0
    ) -> float:
        wanted = keys or list(self.driver.keys)
        return await self.until(
            lambda latest: all(k in latest and latest[k].quality is quality for k in wanted),
            within,
        )

    async def value(self, key: str, value: Any, within: float = 5.0) -> Sample:
        await self.until(
            lambda latest: (
                key in latest and latest[key].quality is Quality.GOOD and latest[key].value == value
            ),
            within,
        )
        return self.latest[key]

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def points(*names: str, **overrides: Any) -> list[OpcuaPoint]:
    defaults: dict[str, dict[str, Any]] = {
        "Oven1.Temperature": {"lo": 0, "hi": 300},
        "Oven1.Setpoint": {"lo": 0, "hi": 250, "writable": True},
        "Oven1.Ratio": {"lo": 0, "hi": 1, "writable": True},
        "Oven1.Enabled": {"writable": True},
        "Oven1.Recipe": {"writable": True},
        "Oven1.Counter": {"writable": True},
        "Oven1.Locked": {"writable": True},  # writable in the config, not on the PLC
        "Oven1.Guarded": {"lo": 0, "hi": 100, "writable": True},
        "Oven1.Sticky": {"writable": True},
        "Oven1.Slow": {"writable": True},
    }
    return [
        OpcuaPoint(name.lower(), f"ns=2;s={name}", **(defaults.get(name, {}) | overrides))
        for name in names or NODES
    ]


@pytest.fixture
async def plc() -> AsyncIterator[Plc]:
    p = Plc()
    await p.start()
    yield p
    await p.stop()


@contextlib.asynccontextmanager
async def running(
    plc: Plc,
    pts: list[OpcuaPoint] | None = None,
    pki_dir: Path | None = None,
    endpoint: str | None = None,
    **options: Any,
) -> AsyncIterator[tuple[OpcuaDriver, Recorder]]:
    driver = OpcuaDriver(
        "oven",
        endpoint or plc.endpoint,
        {**FAST, **options},
        points() if pts is None else pts,
        pki_dir=pki_dir,
        backoff=Backoff(initial=0.1, cap=0.5),
    )
    recorder = Recorder(driver)
    await driver.start()
    try:
        yield driver, recorder
    finally:
        await driver.close()
        await recorder.stop()


# -- reading ------------------------------------------------------------------------------------


async def test_subscription_delivers_values_with_source_timestamps(plc: Plc) -> None:
    async with running(plc) as (driver, rec):
        await rec.all(Quality.GOOD)
        assert {k: s.value for k, s in rec.latest.items()} == {
            "oven1.temperature": 20.0,
            "oven1.setpoint": 180,
            "oven1.ratio": 0.5,
            "oven1.enabled": False,
            "oven1.recipe": "bake-1",
            "oven1.counter": 7,
            "oven1.locked": 1.0,
            "oven1.guarded": 5.0,
            "oven1.sticky": 3.0,
            "oven1.slow": 4.0,
        }
        stamp = datetime(2024, 3, 1, 8, 30, 15, 500000, tzinfo=UTC)
        await plc.set("Oven1.Temperature", 181.25, ts=stamp)
        sample = await rec.value("oven1.temperature", 181.25)
        assert sample.source_ts == stamp.timestamp()
        assert sample.reason is None
        assert driver.subscriptions_created == 1


async def test_status_codes_and_range_become_quality(plc: Plc) -> None:
    async with running(plc) as (_, rec):
        await rec.all(Quality.GOOD)
        await plc.set("Oven1.Temperature", None, ua.StatusCodes.BadSensorFailure)
        await rec.until(lambda latest: latest["oven1.temperature"].quality is Quality.BAD)
        bad = rec.latest["oven1.temperature"]
        assert (bad.value, bad.reason) == (None, "BadSensorFailure")

        await plc.set("Oven1.Temperature", 99.0, ua.StatusCodes.UncertainLastUsableValue)
        await rec.until(lambda latest: latest["oven1.temperature"].quality is Quality.UNCERTAIN)
        doubt = rec.latest["oven1.temperature"]
        assert (doubt.value, doubt.reason) == (99.0, "UncertainLastUsableValue")

        await plc.set("Oven1.Temperature", 350.0)  # Good, but above hi=300
        await rec.until(lambda latest: latest["oven1.temperature"].value == 350.0)
        high = rec.latest["oven1.temperature"]
        assert high.quality is Quality.UNCERTAIN
        assert "outside engineering range [0, 300]" in (high.reason or "")

        await plc.set("Oven1.Temperature", 120.0)
        await rec.value("oven1.temperature", 120.0)


async def test_server_side_deadband_filters_small_changes(plc: Plc) -> None:
    pts = points("Oven1.Temperature", "Oven1.Recipe", "Oven1.Enabled", deadband=1.0)
    async with running(plc, pts) as (_, rec):
        await rec.all(Quality.GOOD)
        await plc.set("Oven1.Temperature", 20.5)  # within the deadband: not reported
        await plc.set("Oven1.Temperature", 22.0)
        await rec.value("oven1.temperature", 22.0)
        values = [s.value for s in rec.samples if s.key == "oven1.temperature"]
        assert 20.5 not in values
        # The PLC refused the deadband on the string and the bool: subscribed without it.
        assert plc.item_calls == [3, 2]
        await plc.set("Oven1.Recipe", "bake-9")
        await rec.value("oven1.recipe", "bake-9")


async def test_unknown_nodes_and_namespaces_are_bad_and_the_rest_works(plc: Plc) -> None:
    pts = [
        *points("Oven1.Temperature"),
        OpcuaPoint("missing", "ns=2;s=Oven1.DoesNotExist"),
        OpcuaPoint("by_uri", f"nsu={NS};s=Oven1.Setpoint"),
        OpcuaPoint("other_ns", "nsu=urn:not:here;s=Oven1.Setpoint"),
    ]
    for mode in ("subscribe", "poll"):
        async with running(plc, pts, mode=mode) as (_, rec):
            await rec.all(Quality.GOOD, ["oven1.temperature", "by_uri"])
            await rec.all(Quality.BAD, ["missing", "other_ns"])
            assert rec.latest["missing"].reason == "BadNodeIdUnknown"
            assert "namespace urn:not:here is not on the server" in (
                rec.latest["other_ns"].reason or ""
            )
            assert rec.latest["by_uri"].value == 180
            await plc.set("Oven1.Temperature", 42.0 if mode == "poll" else 41.0)
            await rec.value("oven1.temperature", 42.0 if mode == "poll" else 41.0)


async def test_polling_reads_in_chunks_of_max_nodes_per_read() -> None:
    plc = Plc(signals=25, max_nodes_per_read=10)
    await plc.start()
    try:
        pts = [OpcuaPoint(f"s{i}", f"ns=2;s=Bench.Signal{i:05d}") for i in range(25)]
        async with running(plc, pts, mode="poll") as (driver, rec):
            await rec.all(Quality.GOOD)
            assert driver.server_limits[0] == 10
            plc.read_calls.clear()
            await plc.set("Bench.Signal00024", -1.0)
            await rec.value("s24", -1.0)
            assert plc.read_calls and max(plc.read_calls) == 10  # 10 + 10 + 5 per poll
            assert sorted(set(plc.read_calls)) == [5, 10]
            assert plc.item_calls == []  # no subscription in poll mode
    finally:
        await plc.stop()


async def test_monitored_items_are_created_in_batches_of_the_server_limit() -> None:
    plc = Plc(signals=23, max_items_per_call=5)
    await plc.start()
    try:
        pts = [OpcuaPoint(f"s{i}", f"ns=2;s=Bench.Signal{i:05d}") for i in range(23)]
        async with running(plc, pts) as (driver, rec):
            await rec.all(Quality.GOOD)
            assert plc.item_calls == [5, 5, 5, 5, 3]
            assert driver.monitored_item_calls == 5
            assert driver.largest_item_batch == 5
            assert {rec.latest[f"s{i}"].value for i in range(23)} == {float(i) for i in range(23)}
    finally:
        await plc.stop()


@pytest.mark.slow
async def test_a_server_understating_its_limit_gets_smaller_batches() -> None:
    # The PLC claims 10 per call but refuses more than 4: the driver halves until accepted.
    plc = Plc(signals=12, max_items_per_call=4)
    await plc.start()
    try:
        pts = [OpcuaPoint(f"s{i}", f"ns=2;s=Bench.Signal{i:05d}") for i in range(12)]
        async with running(plc, pts, max_monitored_items_per_call=10) as (_, rec):
            await rec.all(Quality.GOOD)
            # 10 and 5 refused with BadTooManyOperations, then batches of 2 for the 12 items.
            assert plc.item_calls == [10, 5, 2, 2, 2, 2, 2, 2]
            # Learned: after a restart the driver does not ask for too many again.
            plc.item_calls.clear()
            await plc.stop()
            await rec.all(Quality.STALE)
            await plc.start()
            await rec.all(Quality.GOOD, within=6)
            assert plc.item_calls == [2, 2, 2, 2, 2, 2]
    finally:
        await plc.stop()


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_points_whose_node_datatype_would_lose_values_are_bad_once(
    plc: Plc, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="drivers")
    pts = [
        OpcuaPoint("counter", "ns=2;s=Oven1.Counter", datatype="int16"),  # UInt32 node
        OpcuaPoint("recipe", "ns=2;s=Oven1.Recipe", datatype="float64", writable=True),  # String
        OpcuaPoint("temperature", "ns=2;s=Oven1.Temperature", datatype="int32"),  # Double
        OpcuaPoint("setpoint", "ns=2;s=Oven1.Setpoint", datatype="int32"),  # Int16: wider
        OpcuaPoint("setpoint_f", "ns=2;s=Oven1.Setpoint", datatype="float64"),  # Int16: wider
        OpcuaPoint("ratio", "ns=2;s=Oven1.Ratio", datatype="float64"),  # Float: wider
        OpcuaPoint("enabled", "ns=2;s=Oven1.Enabled", datatype="bool"),
        OpcuaPoint("counter_untyped", "ns=2;s=Oven1.Counter"),  # no datatype: not checked
    ]
    expected = {
        "counter": "node is UInt32, point is int16: values would be cut",
        "recipe": "node is String, point is float64: text is not a number",
        "temperature": "node is Double, point is int32: fractions would be cut",
    }
    async with running(plc, pts, mode=mode) as (driver, rec):
        await rec.all(Quality.BAD, list(expected))
        await rec.all(Quality.GOOD, [p.key for p in pts if p.key not in expected])
        assert {k: rec.latest[k].reason for k in expected} == expected
        assert (rec.latest["setpoint"].value, rec.latest["setpoint_f"].value) == (180, 180)
        # A value the point cannot hold arrives: the node is not read for the point at all.
        await plc.set("Oven1.Counter", 70_000)
        await rec.value("counter_untyped", 70_000)
        assert rec.latest["counter"].quality is Quality.BAD
        assert all(s.quality is not Quality.GOOD for s in rec.samples if s.key in expected)
        with pytest.raises(WriteRejectedError, match="node is String, point is float64"):
            await driver.write("recipe", 1.0)

        # Reconnected and checked again: still BAD, and still only one line in the log.
        await plc.close_sessions()
        await rec.all(Quality.STALE, list(expected), within=4)
        await rec.all(Quality.BAD, list(expected), within=5)
        await rec.all(Quality.GOOD, ["setpoint", "counter_untyped"])
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("drivers")
        and r.levelno == logging.WARNING
        and "DataType" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    assert all(f"{key} ({reason})" in warnings[0] for key, reason in expected.items())


# -- writing ------------------------------------------------------------------------------------


async def test_write_converts_to_the_node_type_and_reads_back(plc: Plc) -> None:
    async with running(plc) as (driver, rec):
        await rec.all(Quality.GOOD)
        assert await driver.write("oven1.setpoint", 200.0) == 200  # float → Int16
        assert plc.get("Oven1.Setpoint") == 200
        assert plc.server is not None
        stored = plc.server.read_attribute_value(plc.nodes["Oven1.Setpoint"]).Value
        assert stored is not None and stored.VariantType is ua.VariantType.Int16
        assert await driver.write("oven1.ratio", 0.1) == pytest.approx(0.1)  # Float, 32 bits
        assert await driver.write("oven1.enabled", 1) is True
        assert await driver.write("oven1.recipe", "bake-2") == "bake-2"
        assert await driver.write("oven1.counter", 4_000_000_000) == 4_000_000_000  # UInt32
        sample = await rec.value("oven1.setpoint", 200)
        assert sample.quality is Quality.GOOD
        assert plc.get("Oven1.Recipe") == "bake-2"


REFUSED = [
    ("oven1.temperature", 25.0, "not writable"),
    ("oven1.setpoint", 251, "outside the point's limits"),
    ("oven1.setpoint", -1, "outside the point's limits"),
    ("oven1.setpoint", 12.5, "whole numbers"),
    ("oven1.setpoint", "hot", "takes a number"),
    ("oven1.setpoint", float("nan"), "not finite"),
    ("oven1.setpoint", [1], "cannot be written"),
    ("oven1.enabled", 2, "Boolean"),
    ("oven1.recipe", 7, "takes text"),
    ("oven1.counter", -1, "outside the UInt32 range"),
    ("oven1.counter", 2**32, "outside the UInt32 range"),
    ("oven1.ratio", 1.5, "outside the point's limits"),
    ("nothing", 1, "no point 'nothing'"),
]


async def test_refused_writes_leave_the_server_value_unchanged(plc: Plc) -> None:
    async with running(plc) as (driver, rec):
        await rec.all(Quality.GOOD)
        before = {name: plc.get(name) for name in NODES}
        for key, value, message in REFUSED:
            with pytest.raises(WriteRejectedError, match=message):
                await driver.write(key, value)
        assert {name: plc.get(name) for name in NODES} == before


async def test_writes_the_server_refuses_name_node_and_status(plc: Plc) -> None:
    async with running(plc) as (driver, rec):
        await rec.all(Quality.GOOD)
        with pytest.raises(DeviceResponseError, match=r"ns=2;s=Oven1\.Locked.*BadNotWritable"):
            await driver.write("oven1.locked", 2.0)
        plc.refuse_writes["Oven1.Guarded"] = ua.StatusCodes.BadOutOfRange
        with pytest.raises(DeviceResponseError, match=r"ns=2;s=Oven1\.Guarded.*BadOutOfRange"):
            await driver.write("oven1.guarded", 50.0)
        plc.refuse_writes["Oven1.Guarded"] = ua.StatusCodes.BadTypeMismatch
        with pytest.raises(DeviceResponseError, match="BadTypeMismatch"):
            await driver.write("oven1.guarded", 50.0)
        assert (plc.get("Oven1.Locked"), plc.get("Oven1.Guarded")) == (1.0, 5.0)


async def test_write_is_verified_by_reading_back(plc: Plc) -> None:
    async with running(plc) as (driver, rec):
        await rec.all(Quality.GOOD)
        # The PLC applies the value at its next scan: the read-back waits for it.
        assert await driver.write("oven1.slow", 6.5) == 6.5
        # The PLC says Good but keeps its value: not verified (write_verify_s = 0.3).
        started = time.monotonic()
        with pytest.raises(
            WriteVerifyError, match=r"ns=2;s=Oven1\.Sticky.*wrote 9\.5.*read back 3\.0"
        ):
            await driver.write("oven1.sticky", 9.5)
        assert 0.3 <= time.monotonic() - started < 2


# -- losing the server and coming back -----------------------------------------------------------


async def test_server_restart_goes_stale_then_good_again_by_itself(plc: Plc) -> None:
    async with running(plc) as (driver, rec):
        await rec.all(Quality.GOOD)
        await plc.stop()
        await rec.all(Quality.STALE, within=3)
        stale = rec.latest["oven1.temperature"]
        assert stale.value is None and "device disconnected" in (stale.reason or "")
        await plc.start()  # same port, a fresh server: no session, no subscription
        took = await rec.all(Quality.GOOD, within=6)
        assert took < 6
        assert driver.subscriptions_created == 2
        await plc.set("Oven1.Temperature", 66.0)
        await rec.value("oven1.temperature", 66.0)


async def test_lost_session_is_noticed_and_resubscribed(plc: Plc) -> None:
    async with running(plc) as (driver, rec):
        await rec.all(Quality.GOOD)
        await plc.close_sessions()
        await rec.all(Quality.STALE, within=4)
        await rec.all(Quality.GOOD, within=5)
        assert driver.subscriptions_created == 2
        await plc.set("Oven1.Temperature", 77.0)
        await rec.value("oven1.temperature", 77.0)


async def test_orderly_plc_restart_costs_one_warning_of_ours_and_no_asyncua_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The simulated oven PLC restarted in order: it says BadServerHalted, then closes."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="asyncua.client.ua_session")
    async with OvenDevice(seed=4, tick_hz=0) as oven:
        oven.faults.shutdown_notice("BadServerHalted")
        driver = OpcuaDriver(
            "oven",
            oven.endpoint,
            FAST,
            [OpcuaPoint("temperature", oven.node_id("temperature"))],
            backoff=Backoff(initial=0.1, cap=0.5),
        )
        rec = Recorder(driver)
        await driver.start()
        try:
            await rec.all(Quality.GOOD)
            caplog.clear()
            await oven.restart(downtime=0.1)
            await rec.all(Quality.STALE, within=4)
            await rec.all(Quality.GOOD, within=6)
        finally:
            await driver.close()
            await rec.stop()
    loud = [
        (r.name, r.levelname, r.getMessage())
        for r in caplog.records
        if r.name.startswith("asyncua.client") and r.levelno >= logging.WARNING
    ]
    assert loud == [], "asyncua's own lines for an ordinary restart belong at DEBUG"
    # Still there for whoever turns DEBUG on, traceback included.
    crashed = [r for r in caplog.records if r.getMessage().startswith("Publish iteration crashed")]
    assert crashed and all(r.levelno == logging.DEBUG and r.exc_info for r in crashed)
    ours = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("drivers") and r.levelno >= logging.WARNING
    ]
    # The loss; and the PLC refusing while it restarts, if the driver tried then.
    assert ours[0].startswith("oven: connection lost"), ours
    assert [m for m in ours[1:] if "cannot connect" not in m] == [] and len(ours) <= 2, ours


@pytest.mark.slow
async def test_network_loss_without_close_is_noticed_and_ridden_out(plc: Plc) -> None:
    proxy = Proxy(plc.port)
    await proxy.start()
    try:
        async with running(plc, endpoint=proxy.endpoint()) as (driver, rec):
            await rec.all(Quality.GOOD)
            proxy.frozen.set()  # the cable is pulled: sockets stay open, nothing arrives
            await plc.set("Oven1.Temperature", 88.0)
            took = await rec.all(Quality.STALE, within=5)
            assert took < 3.5  # the server-state probe (timeout_s=1) or the watchdog (1 s)
            await asyncio.sleep(1.5)  # reconnection attempts time out against the silence
            assert driver.state is not ConnectionState.CONNECTED
            proxy.frozen.clear()  # the cable is back
            await rec.value("oven1.temperature", 88.0, within=6)
            assert driver.subscriptions_created == 2
    finally:
        await proxy.stop()


@pytest.mark.parametrize("how", ["pause", "forget"])
async def test_silent_subscription_is_detected_and_rebuilt(plc: Plc, how: str) -> None:
    async with running(plc) as (driver, rec):
        await rec.all(Quality.GOOD)
        plc.silence(how)
        await plc.set("Oven1.Temperature", 55.0)  # never delivered by the dead subscription
        took = await rec.all(Quality.STALE, within=4)
        assert took < 3  # limit 1 s: max(2 x 50 ms x 6, 1 s floor)
        assert "subscription silent" in (rec.latest["oven1.temperature"].reason or "")
        await rec.value("oven1.temperature", 55.0, within=5)
        assert driver.subscriptions_created == 2


# -- security -----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_sign_and_encrypt_with_certificate_made_on_first_use_and_pinned(
    tmp_path: Path,
) -> None:
    plc = Plc(secure_dir=tmp_path)
    await plc.start()
    pki = tmp_path / "gateway-pki"
    try:
        # A client without security finds no endpoint it may use.
        async with running(plc, points("Oven1.Temperature")) as (_, rec):
            await rec.all(Quality.BAD)
            reason = rec.latest["oven1.temperature"].reason or ""
            assert "offers no endpoint with security_mode None" in reason
        async with running(
            plc, points("Oven1.Temperature", "Oven1.Setpoint"), pki, security_mode="SignAndEncrypt"
        ) as (driver, rec):
            await rec.all(Quality.GOOD, within=10)
            assert await driver.write("oven1.setpoint", 190) == 190
        cert = (pki / "own" / "cert.der").read_bytes()
        pins = list((pki / "trusted").iterdir())
        assert len(pins) == 1
        assert pins[0].read_bytes() == (tmp_path / "server.der").read_bytes()

        # Second run: the same client certificate, the pinned server certificate accepted.
        async with running(
            plc, points("Oven1.Temperature"), pki, security_mode="SignAndEncrypt"
        ) as (_, rec):
            await rec.all(Quality.GOOD, within=10)
        assert (pki / "own" / "cert.der").read_bytes() == cert

        # A server presenting another certificate is refused, loudly, until unpinned.
        await plc.stop()
        (tmp_path / "server.der").unlink()
        await plc.start()
        async with running(
            plc, points("Oven1.Temperature"), pki, security_mode="SignAndEncrypt"
        ) as (_, rec):
            await rec.all(Quality.BAD, within=10)
            reason = rec.latest["oven1.temperature"].reason or ""
            assert "not the certificate pinned at" in reason and "delete the pinned file" in reason
        # Naming the expected certificate is the other way to trust the new one.
        async with running(
            plc,
            points("Oven1.Temperature"),
            pki,
            security_mode="SignAndEncrypt",
            server_certificate=str(tmp_path / "server.der"),
        ) as (_, rec):
            await rec.all(Quality.GOOD, within=10)
    finally:
        await plc.stop()


async def test_secure_mode_without_pki_dir_says_so(plc: Plc) -> None:
    async with running(plc, points("Oven1.Temperature"), None, security_mode="Sign") as (_, rec):
        await rec.all(Quality.BAD)
        assert "needs a folder for the client certificate" in (
            rec.latest["oven1.temperature"].reason or ""
        )


@pytest.mark.slow
async def test_username_and_password(tmp_path: Path) -> None:
    plc = Plc(secure_dir=tmp_path, users=True)
    await plc.start()
    pki = tmp_path / "gateway-pki"
    try:
        for mode in ("SignAndEncrypt", "Sign"):
            async with running(
                plc,
                points("Oven1.Temperature"),
                pki,
                security_mode=mode,
                username="operator",
                password="s3cret",
            ) as (_, rec):
                await rec.all(Quality.GOOD, within=10)
        async with running(
            plc,
            points("Oven1.Temperature"),
            pki,
            security_mode="SignAndEncrypt",
            username="operator",
            password="wrong",
        ) as (driver, rec):
            await rec.all(Quality.BAD, within=10)
            reason = rec.latest["oven1.temperature"].reason or ""
            assert "refused user 'operator': BadUserAccessDenied" in reason
            # It keeps trying, with backoff, and never reports GOOD.
            await rec.until(
                lambda _: sum(s is ConnectionState.CONNECTING for s, _r in rec.states) >= 3,
                within=10,
            )
            assert driver.state is not ConnectionState.CONNECTED
            assert all(s.quality is Quality.BAD for s in rec.samples)
    finally:
        await plc.stop()
