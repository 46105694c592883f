"""The curing oven's OPC UA PLC over real TCP, read, written and watched with asyncua's Client.

One PLC is shared by the module (loading asyncua's address space takes ~1 s): tests that change
it put back what they changed (the `plc` fixture clears every fault after each test).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import pytest_asyncio
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.uaerrors import BadUserAccessDenied, UaStatusCodeError

from plantsim import OvenDevice, TankDevice

pytestmark = pytest.mark.asyncio(loop_scope="module")

NODES = {
    "Temperature": ("temperature", ua.VariantType.Double, "°C", (0.0, 400.0), False),
    "HeaterSetpoint": ("heater_setpoint", ua.VariantType.Double, "°C", (0.0, 300.0), True),
    "HeaterPower": ("heater_power", ua.VariantType.Double, "%", (0.0, 100.0), False),
    "Ambient": ("ambient", ua.VariantType.Double, "°C", (-10.0, 50.0), False),
    "HeaterWear": ("heater_wear", ua.VariantType.Double, "1", (0.0, 1.0), False),
    "Running": ("running", ua.VariantType.Boolean, None, None, True),
    "BatchCount": ("batch_count", ua.VariantType.UInt32, None, None, False),
    "Mode": ("mode", ua.VariantType.String, None, None, False),
}
BENCH = 12


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared_plc():
    """An oven that moves only when a test calls `advance`, with bench signals at 20 Hz."""
    async with OvenDevice(seed=3, port=0, tick_hz=0, extra_signals=BENCH, extra_rate_hz=20) as oven:
        yield oven


@pytest_asyncio.fixture(loop_scope="module")
async def plc(shared_plc):
    yield shared_plc
    shared_plc.faults.clear()
    if shared_plc.halted:
        await shared_plc.resume()


@pytest_asyncio.fixture(loop_scope="module")
async def connect():
    """Open asyncua clients; disconnect them at the end (quietly: some saw their PLC go)."""
    clients: list[Client] = []

    async def make(url: str, wait_s: float = 2.0) -> Client:
        client = Client(url, timeout=wait_s)
        client.session_timeout = 60_000
        await client.connect()
        clients.append(client)
        return client

    yield make
    for client in clients:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), 2.0)


async def value_of(client: Client, plc: OvenDevice, signal_name: str):
    return await client.get_node(plc.node_id(signal_name)).read_value()


async def lost(client: Client) -> asyncio.Event:
    event = asyncio.Event()

    async def on_lost(exc: Exception) -> None:
        event.set()

    client.connection_lost_callback = on_lost
    return event


# -- the address space ------------------------------------------------------------------------


async def test_namespace_2_and_the_oven_object(plc, connect):
    client = await connect(plc.endpoint)
    assert (await client.get_namespace_array())[2] == "urn:opstwin:plantsim"
    assert plc.endpoint == f"opc.tcp://127.0.0.1:{plc.port}/plantsim/oven"
    oven = await client.nodes.objects.get_child("2:Oven1")
    assert oven.nodeid == ua.NodeId("Oven1", 2)
    names = {(await n.read_browse_name()).Name for n in await oven.get_children()}
    assert names == set(NODES)


async def test_every_node_serves_the_model(plc, connect):
    client = await connect(plc.endpoint)
    plc.advance(30.0)
    model = plc.model.signals()
    for name, (sig, vtype, unit, eu_range, writable) in NODES.items():
        node = client.get_node(f"ns=2;s=Oven1.{name}")
        dv = await node.read_data_value()
        assert dv.Value.VariantType == vtype, name
        assert dv.Value.Value == model[sig], name
        assert dv.StatusCode.is_good() and dv.SourceTimestamp is not None, name
        assert await node.read_data_type() == ua.NodeId(getattr(ua.ObjectIds, vtype.name))
        access = await node.get_access_level()
        assert (ua.AccessLevel.CurrentWrite in access) is writable, name
        typedef = await node.read_type_definition()
        if unit is None:
            assert typedef == ua.NodeId(ua.ObjectIds.BaseDataVariableType), name
            continue
        assert typedef == ua.NodeId(ua.ObjectIds.AnalogItemType), name
        units = await (await node.get_child("0:EngineeringUnits")).read_value()
        assert units.DisplayName.Text == unit and units.NamespaceUri.endswith("/un/cefact")
        rng = await (await node.get_child("0:EURange")).read_value()
        assert (rng.Low, rng.High) == eu_range, name


async def test_values_follow_the_plant_clock(plc, connect):
    client = await connect(plc.endpoint)
    before = await client.get_node(plc.node_id("temperature")).read_data_value()
    plc.advance(5.0)
    after = await client.get_node(plc.node_id("temperature")).read_data_value()
    assert after.Value.Value == plc.model.signals()["temperature"] != before.Value.Value
    assert after.SourceTimestamp > before.SourceTimestamp


# -- writes -----------------------------------------------------------------------------------


async def test_setpoint_write_goes_into_the_physics(plc, connect):
    client = await connect(plc.endpoint)
    setpoint = client.get_node(plc.node_id("heater_setpoint"))
    try:
        await setpoint.write_value(ua.Variant(210.0, ua.VariantType.Double))
        assert plc.model.heater_setpoint_c == 210.0
        assert await setpoint.read_value() == 210.0
        power = await value_of(client, plc, "heater_power")
        assert power == pytest.approx(100 * (210 - 22) / 350)
        start = plc.model.temperature_c
        plc.advance(plc.model.params.dead_time_s + plc.model.params.tau_s)
        assert await value_of(client, plc, "temperature") > start + 15
    finally:
        plc.model.write("heater_setpoint", 180.0)
        plc.advance(1200.0)


async def test_running_write_stops_the_heater(plc, connect):
    client = await connect(plc.endpoint)
    try:
        await client.get_node(plc.node_id("running")).write_value(False)
        assert plc.model.running is False
        assert await value_of(client, plc, "mode") == "OFF"
        assert await value_of(client, plc, "heater_power") == 0.0
    finally:
        plc.model.write("running", True)
        plc.refresh()


@pytest.mark.parametrize(
    ("signal_name", "value", "status"),
    [
        ("heater_setpoint", ua.Variant(300.5, ua.VariantType.Double), "BadOutOfRange"),
        ("heater_setpoint", ua.Variant(-1.0, ua.VariantType.Double), "BadOutOfRange"),
        ("heater_setpoint", ua.Variant(float("nan"), ua.VariantType.Double), "BadOutOfRange"),
        ("heater_setpoint", ua.Variant(200.0, ua.VariantType.Float), "BadTypeMismatch"),
        ("heater_setpoint", ua.Variant(200, ua.VariantType.Int32), "BadTypeMismatch"),
        ("running", ua.Variant(1, ua.VariantType.Int32), "BadTypeMismatch"),
        ("temperature", ua.Variant(20.0, ua.VariantType.Double), "BadNotWritable"),
        ("mode", ua.Variant("OFF", ua.VariantType.String), "BadNotWritable"),
        ("batch_count", ua.Variant(0, ua.VariantType.UInt32), "BadNotWritable"),
    ],
)
async def test_refused_writes_change_nothing(plc, connect, signal_name, value, status):
    client = await connect(plc.endpoint)
    before = plc.model.signals()
    with pytest.raises(UaStatusCodeError) as refused:
        await client.get_node(plc.node_id(signal_name)).write_value(value)
    assert refused.value.code == getattr(ua.StatusCodes, status)
    assert plc.model.signals() == before


async def test_one_write_request_gets_a_status_per_node(plc, connect):
    client = await connect(plc.endpoint)
    nodes = [client.get_node(plc.node_id(s)) for s in ("heater_setpoint", "ambient")]
    params = ua.WriteParameters()
    for node, value in zip(nodes, (180.0, 1.0), strict=True):
        item = ua.WriteValue()
        item.NodeId, item.AttributeId = node.nodeid, ua.AttributeIds.Value
        item.Value = ua.DataValue(ua.Variant(value, ua.VariantType.Double))
        params.NodesToWrite.append(item)
    results = await client.uaclient.write(params)
    assert [r.name for r in results] == ["Good", "BadNotWritable"]


# -- subscriptions ------------------------------------------------------------------------------


class Changes:
    def __init__(self) -> None:
        self.values: asyncio.Queue[ua.DataValue] = asyncio.Queue()

    def datachange_notification(self, node, val, data) -> None:
        self.values.put_nowait(data.monitored_item.Value)

    async def next(self, within: float = 2.0) -> ua.DataValue:
        return await asyncio.wait_for(self.values.get(), within)

    async def latest(self, within: float = 2.0) -> ua.DataValue:
        """The newest value once at least one arrived: older ones queued behind it are skipped."""
        value = await self.next(within)
        while not self.values.empty():
            value = self.values.get_nowait()
        return value


async def test_subscription_sees_changes_and_bad_status(plc, connect):
    client = await connect(plc.endpoint)
    changes = Changes()
    sub = await client.create_subscription(20, changes)
    await sub.subscribe_data_change(client.get_node(plc.node_id("temperature")))
    initial = await changes.next()
    plc.advance(1.0)
    moved = await changes.next()
    assert moved.Value.Value == plc.served["temperature"] != initial.Value.Value
    plc.faults.bad_status("temperature", "BadSensorFailure")
    bad = await changes.next()
    assert bad.StatusCode.value == ua.StatusCodes.BadSensorFailure and bad.Value.Value is None
    await sub.delete()


async def test_a_deadband_subscription_is_told_of_bad_status_and_recovery(plc, connect):
    # Stock asyncua 2.1 loses both notifications (a null value under a deadband, see
    # docs/upstream/); asyncua_glue.fixes makes them arrive.
    client = await connect(plc.endpoint)
    changes = Changes()
    sub = await client.create_subscription(20, changes)
    await sub.deadband_monitor(client.get_node(plc.node_id("ambient")), 0.5)
    initial = await changes.next()
    plc.faults.bad_status("ambient", "BadSensorFailure")
    bad = await changes.next()
    assert bad.StatusCode.value == ua.StatusCodes.BadSensorFailure and bad.Value.Value is None
    plc.faults.bad_status("ambient", "BadSensorFailure", on=False)
    back = await changes.next()
    assert back.StatusCode.is_good() and back.Value.Value == initial.Value.Value
    await sub.delete()


# -- faults -----------------------------------------------------------------------------------


async def test_bad_status_is_in_the_data_value(plc, connect):
    client = await connect(plc.endpoint)
    node = client.get_node(plc.node_id("temperature"))
    plc.faults.bad_status("temperature", "BadSensorFailure")
    dv = await node.read_data_value(raise_on_bad_status=False)
    assert dv.StatusCode.value == ua.StatusCodes.BadSensorFailure
    assert dv.Value.Value is None and dv.SourceTimestamp is not None
    with pytest.raises(UaStatusCodeError):
        await node.read_value()
    plc.faults.bad_status("ambient", "UncertainLastUsableValue")
    dv = await client.get_node(plc.node_id("ambient")).read_data_value(raise_on_bad_status=False)
    assert dv.StatusCode.value == ua.StatusCodes.UncertainLastUsableValue
    assert dv.Value.Value == plc.model.signals()["ambient"]
    plc.faults.bad_status("temperature", "BadSensorFailure", on=False)
    assert (await node.read_data_value()).StatusCode.is_good()


async def test_freeze_spike_and_noise_change_what_is_served(plc, connect):
    client = await connect(plc.endpoint)
    held = await value_of(client, plc, "temperature")
    plc.faults.freeze("temperature")
    plc.advance(5.0)
    assert await value_of(client, plc, "temperature") == held != plc.model.signals()["temperature"]
    plc.faults.freeze("temperature", False)
    plc.faults.spike("ambient", 25.0, 30.0)
    assert await value_of(client, plc, "ambient") == plc.model.ambient_c + 25.0
    plc.faults.noise("heater_power", 5.0)
    noisy = set()
    for _ in range(3):
        plc.refresh()  # each publish draws new noise
        noisy.add(await value_of(client, plc, "heater_power"))
    assert len(noisy) == 3 and plc.model.heater_power_pct not in noisy
    plc.faults.clear()
    assert await value_of(client, plc, "temperature") == plc.model.signals()["temperature"]


async def test_slow_delays_every_request(plc, connect):
    client = await connect(plc.endpoint)
    node = client.get_node(plc.node_id("temperature"))
    plc.faults.slow(0.3)
    start = time.monotonic()
    await node.read_value()
    assert time.monotonic() - start >= 0.25
    plc.faults.slow(0)


async def test_drop_connections_loses_the_connection_and_a_new_one_works(plc, connect):
    client = await connect(plc.endpoint)
    gone = await lost(client)
    assert plc.server.connections >= 1
    assert plc.drop_connections() >= 1
    await asyncio.wait_for(gone.wait(), 5.0)
    with pytest.raises((ConnectionError, asyncio.TimeoutError, UaStatusCodeError)):
        await value_of(client, plc, "temperature")
    again = await connect(plc.endpoint)
    assert await value_of(again, plc, "mode") == "AUTO"


async def test_restart_comes_back_on_the_same_port(plc, connect):
    client = await connect(plc.endpoint)
    gone = await lost(client)
    port = plc.port
    restart = asyncio.create_task(plc.restart(downtime=0.5))
    await asyncio.wait_for(gone.wait(), 5.0)
    await asyncio.sleep(0.1)
    assert plc.halted and "stopped" in plc.faults.active()
    with pytest.raises(OSError):
        await connect(plc.endpoint)
    await restart
    assert plc.port == port and not plc.halted
    again = await connect(plc.endpoint)
    assert await value_of(again, plc, "heater_setpoint") == plc.model.heater_setpoint_c


@pytest.mark.slow
async def test_a_reconnecting_client_gets_its_data_back_after_a_restart(plc):
    client = Client(plc.endpoint, timeout=2.0, watchdog_intervall=0.2)
    await client.connect(auto_reconnect=True, reconnect_max_delay=0.5)
    try:
        changes = Changes()
        sub = await client.create_subscription(20, changes)
        await sub.subscribe_data_change(client.get_node(plc.node_id("temperature")))
        await changes.next()
        await plc.restart(downtime=0.2)
        async with asyncio.timeout(15):
            while True:  # the plant moves on; the client must see it again by itself
                plc.advance(1.0)
                with contextlib.suppress(asyncio.TimeoutError):
                    # After the reconnect, notifications from before can still be queued: one
                    # taken per advance would never catch up with the plant.
                    dv = await changes.latest(within=0.2)
                    if dv.Value.Value == plc.served["temperature"]:
                        break
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), 2.0)


async def test_stop_and_start(plc, connect):
    client = await connect(plc.endpoint)
    gone = await lost(client)
    await plc.faults.stop()
    await asyncio.wait_for(gone.wait(), 5.0)
    with pytest.raises(OSError):
        await connect(plc.endpoint)
    plc.advance(10.0)  # the plant runs on while its PLC is down
    await plc.faults.start()
    again = await connect(plc.endpoint)
    assert await value_of(again, plc, "temperature") == plc.model.signals()["temperature"]


async def test_stop_and_start_work_on_the_modbus_devices_too():
    async with TankDevice(seed=1, port=0, tick_hz=0) as tank:
        await tank.faults.stop()
        assert tank.faults.active() == {"stopped": True}
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", tank.port)
        await tank.faults.start()
        _, writer = await asyncio.open_connection("127.0.0.1", tank.port)
        writer.close()
        assert tank.faults.active() == {}


async def test_refuse_closes_new_connections_only(plc, connect):
    client = await connect(plc.endpoint)
    plc.faults.refuse(True)
    with pytest.raises((OSError, asyncio.TimeoutError, UaStatusCodeError)):
        await connect(plc.endpoint, wait_s=1.0)
    assert await value_of(client, plc, "mode") == "AUTO"


# -- bench signals ------------------------------------------------------------------------------


async def test_bench_signals_exist_and_change(plc, connect):
    client = await connect(plc.endpoint)
    bench = await client.nodes.objects.get_child("2:Bench")
    assert len(await bench.get_children()) == BENCH
    nodes = [client.get_node(plc.bench_node_id(i)) for i in range(BENCH)]
    assert nodes[-1].nodeid == ua.NodeId(f"Bench.Signal{BENCH - 1:05d}", 2)
    first = await client.read_values(nodes)
    assert all(isinstance(v, float) for v in first)
    async with asyncio.timeout(3):  # updates at 20 Hz; each one moves every signal
        while True:
            await asyncio.sleep(0.1)
            second = await client.read_values(nodes)
            if second[0] != first[0]:
                break
    assert all(a != b for a, b in zip(first, second, strict=True))
    with pytest.raises(UaStatusCodeError):
        await client.get_node(f"ns=2;s=Bench.Signal{BENCH:05d}").read_value()
    with pytest.raises(UaStatusCodeError):
        await nodes[0].write_value(1.0)


# -- security -----------------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client_cert(tmp_path_factory):
    """A client certificate and key, made once."""
    pki = tmp_path_factory.mktemp("client-pki")
    client = Client("opc.tcp://127.0.0.1:1")
    return await client.setup_self_signed_certificate(pki / "key.pem", pki / "cert.der")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def secure_plc(tmp_path_factory):
    pki = tmp_path_factory.mktemp("plc-pki")
    async with OvenDevice(seed=4, port=0, tick_hz=0, security=True, pki_dir=pki) as oven:
        yield oven


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def guarded_plc():
    async with OvenDevice(
        seed=5, port=0, tick_hz=0, security=True, users={"operator": "s3cret"}
    ) as oven:
        yield oven


async def secure_client(
    plc: OvenDevice,
    cert: tuple[Path, Path],
    mode: ua.MessageSecurityMode = ua.MessageSecurityMode.SignAndEncrypt,
    user: tuple[str, str] | None = None,
) -> Client:
    client = Client(plc.endpoint, timeout=3.0)
    if user:
        client.set_user(user[0])
        client.set_password(user[1])
    certificate, key = cert
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        certificate,
        key,
        server_certificate=str(plc.server.certificate_file),
        mode=mode,
    )
    return client


async def test_security_offers_basic256sha256_and_makes_its_certificate(secure_plc):
    assert secure_plc.server.certificate_file.is_file()
    assert secure_plc.server.certificate_file.parent.joinpath("server_key.pem").is_file()
    async with Client(secure_plc.endpoint, timeout=3.0) as client:
        endpoints = await client.get_endpoints()
    offered = {(e.SecurityPolicyUri.rsplit("#", 1)[-1], e.SecurityMode.name) for e in endpoints}
    assert offered == {
        ("None", "None_"),
        ("Basic256Sha256", "Sign"),
        ("Basic256Sha256", "SignAndEncrypt"),
    }


@pytest.mark.parametrize(
    "mode", [ua.MessageSecurityMode.SignAndEncrypt, ua.MessageSecurityMode.Sign]
)
async def test_secure_client_connects(secure_plc, client_cert, mode):
    client = await secure_client(secure_plc, client_cert, mode)
    async with client:
        assert await value_of(client, secure_plc, "mode") == "AUTO"
        await client.get_node(secure_plc.node_id("heater_setpoint")).write_value(181.0)
    assert secure_plc.model.heater_setpoint_c == 181.0


async def test_users_need_the_right_password(guarded_plc, client_cert):
    client = await secure_client(guarded_plc, client_cert, user=("operator", "s3cret"))
    async with client:
        assert await value_of(client, guarded_plc, "running") is True
    wrong = await secure_client(guarded_plc, client_cert, user=("operator", "guess"))
    with pytest.raises(BadUserAccessDenied):
        await wrong.connect()
    anonymous = await secure_client(guarded_plc, client_cert)
    with pytest.raises((UaStatusCodeError, ua.UaError)):
        await anonymous.connect()


# -- the command line ---------------------------------------------------------------------------


async def test_cli_serves_the_oven_and_takes_its_faults():
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "plantsim",
        "--tank-port",
        "0",
        "--meter-port",
        "0",
        "--plc-port",
        "0",
        "--plc-extra-signals",
        "5",
        "--stdin",
        "--fault",
        "oven:bad_status:ambient,BadSensorFailure",
        stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None and proc.stdin is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(20):
            while not any("oven listening" in line for line in lines):
                line = (await proc.stderr.readline()).decode()
                assert line, f"plantsim exited early:\n{''.join(lines)}"
                lines.append(line)
        found = re.search(r"oven listening on (opc\.tcp://\S+)", "".join(lines))
        assert found is not None
        url = found.group(1)
        assert "ns=2 urn:opstwin:plantsim" in "".join(lines)
        async with Client(url, timeout=3.0) as client:
            ambient = client.get_node("ns=2;s=Oven1.Ambient")
            dv = await ambient.read_data_value(raise_on_bad_status=False)
            assert dv.StatusCode.value == ua.StatusCodes.BadSensorFailure
            assert isinstance(await client.get_node("ns=2;s=Bench.Signal00004").read_value(), float)
            proc.stdin.write(b"oven:clear\n")
            await proc.stdin.drain()
            for _ in range(50):
                dv = await ambient.read_data_value(raise_on_bad_status=False)
                if dv.StatusCode.is_good():
                    break
                await asyncio.sleep(0.05)
            assert 10.0 < dv.Value.Value < 35.0
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


async def test_cli_wants_a_plc_port_for_plc_options():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "plantsim", "--plc-security", stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(10):
        _, err = await proc.communicate()
    assert proc.returncode == 2 and "--plc-port" in err.decode()
