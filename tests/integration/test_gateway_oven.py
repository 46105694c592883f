"""OPC UA both ways over real sockets: oven PLC → driver → twin → the gateway's server → SCADA."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import yaml
from asyncua import Client, ua
from tests_support import eventually

from drivers.contract import Quality
from drivers.opcua.security import ensure_client_certificate, thumbprint
from gateway.app import Gateway
from gateway.config import SiteConfig, parse_config
from gateway.demo import demo_config_data
from gateway.opcua_server.address_space import NAMESPACE_URI
from gateway.opcua_server.users import hash_password
from plantsim import OvenDevice

pytestmark = pytest.mark.slow  # two asyncua servers start per test, ~2 s each

TEMPERATURE = "line1/oven1/temperature"
SETPOINT = "line1/oven1/heater_setpoint"
AMBIENT = "line1/oven1/ambient"
MODE = "line1/oven1/mode"
PASSWORD = "scada-secret"


def oven_config(tmp_path: Path, plc_port: int, *, anonymous: bool = False) -> SiteConfig:
    """The demo config with only the oven, its server secured and a `scada` user."""
    data = demo_config_data(device_ports={"oven-plc": plc_port}, http_port=0, opcua_port=0)
    data["storage"]["path"] = str(tmp_path / "twin.db")
    data["devices"][0]["options"].update(reconnect_cap_s=1.0)
    data["opcua_server"].update(
        security_policies=["Basic256Sha256_SignAndEncrypt"],
        allow_anonymous=anonymous,
        users=[{"username": "scada", "password_hash": hash_password(PASSWORD), "role": "viewer"}],
    )
    return parse_config(yaml.safe_dump(data, allow_unicode=True), source="test")


@pytest.fixture
async def oven() -> AsyncIterator[OvenDevice]:
    # tick_hz=0: the plant moves only when the test advances it, so values compare exactly.
    async with OvenDevice(seed=4, tick_hz=0) as device:
        yield device


@pytest.fixture
def pki(tmp_path: Path, install_pki: Callable[[str, Path], Path]) -> None:
    """Certificates where the gateway (its default `pki/`) and the SCADA client look.

    The SCADA client's certificate is in the server's trust list, as an admin would put it.
    """
    install_pki("gateway", tmp_path / "pki")
    install_pki("client", tmp_path / "scada-pki")
    trusted = tmp_path / "pki" / "opcua-server" / "trusted"
    trusted.mkdir(parents=True)
    shutil.copy(tmp_path / "scada-pki" / "own" / "cert.der", trusted / "scada.der")


@pytest.fixture
async def gateway(tmp_path: Path, oven: OvenDevice, pki: None) -> AsyncIterator[Gateway]:
    gw = Gateway(oven_config(tmp_path, oven.port))
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


def value(gw: Gateway, point: str):
    return gw.store.get(point)


def all_good(gw: Gateway) -> bool:
    return all(v.quality is Quality.GOOD for v in gw.store.snapshot()[1].values())


async def scada_client(
    gw: Gateway, tmp_path: Path, *, user: str | None, password: str = PASSWORD, secure: bool = True
) -> Client:
    assert gw.opcua_server is not None
    client = Client(gw.opcua_server.endpoint, timeout=5)
    if user is not None:
        client.set_user(user)
        client.set_password(password)
    if secure:
        cert = await asyncio.to_thread(
            ensure_client_certificate, tmp_path / "scada-pki", "urn:test:scada"
        )
        await client.set_security_string(f"Basic256Sha256,SignAndEncrypt,{cert.cert},{cert.key}")
    return client


async def test_the_twin_follows_the_plc(gateway, oven):
    await eventually(lambda: all_good(gateway), what="every oven point GOOD")
    assert value(gateway, TEMPERATURE).value == pytest.approx(oven.served["temperature"])
    assert value(gateway, MODE).value == oven.served["mode"]
    assert value(gateway, TEMPERATURE).source_ts is not None

    oven.advance(60.0)
    moved = oven.served["temperature"]
    await eventually(
        lambda: value(gateway, TEMPERATURE).value == pytest.approx(moved),
        what="the twin to follow the PLC",
    )


async def test_setpoint_written_through_the_driver_is_read_back_on_the_plc(gateway, oven):
    await eventually(lambda: all_good(gateway), what="every oven point GOOD")
    assert await gateway.write_point(SETPOINT, 205.0) == pytest.approx(205.0)
    assert oven.model.signals()["heater_setpoint"] == pytest.approx(205.0)
    with pytest.raises(Exception, match="outside limits"):
        await gateway.write_point(SETPOINT, 450.0)
    assert oven.model.signals()["heater_setpoint"] == pytest.approx(205.0)


async def test_plc_restart_points_stale_then_values_flow_again(gateway, oven):
    await eventually(lambda: all_good(gateway), what="every oven point GOOD")
    restart = asyncio.create_task(oven.restart(downtime=2.0))
    await eventually(
        lambda: value(gateway, TEMPERATURE).quality is Quality.STALE,
        what="temperature STALE while the PLC is down",
    )
    await restart
    oven.advance(30.0)
    after = oven.served["temperature"]
    await eventually(
        lambda: (
            value(gateway, TEMPERATURE).quality is Quality.GOOD
            and value(gateway, TEMPERATURE).value == pytest.approx(after)
        ),
        within=10,
        what="fresh values within a few seconds of the restart, without a gateway restart",
    )


async def test_bad_status_on_the_plc_is_bad_in_the_twin_and_on_the_gateway_server(
    gateway, oven, tmp_path
):
    await eventually(lambda: all_good(gateway), what="every oven point GOOD")
    oven.faults.bad_status("temperature", "BadSensorFailure")
    await eventually(
        lambda: value(gateway, TEMPERATURE).quality is Quality.BAD, what="temperature BAD"
    )
    assert "BadSensorFailure" in (value(gateway, TEMPERATURE).reason or "")
    client = await scada_client(gateway, tmp_path, user="scada")
    async with client:
        ns = await client.get_namespace_index(NAMESPACE_URI)
        dv = await client.get_node(f"ns={ns};s={TEMPERATURE}").read_data_value(
            raise_on_bad_status=False
        )
        assert dv.StatusCode.name == "BadSensorFailure"


async def test_scada_reads_what_the_twin_holds_over_a_secure_channel(gateway, oven, tmp_path):
    # The server kept the certificate it found in its pki_dir: clients that trusted it still do.
    assert gateway.opcua_server is not None
    installed = (tmp_path / "pki" / "opcua-server" / "cert.der").read_bytes()
    assert gateway.opcua_server.certificate_thumbprint == thumbprint(installed).lower()
    await eventually(lambda: all_good(gateway), what="every oven point GOOD")
    client = await scada_client(gateway, tmp_path, user="scada")
    async with client:
        ns = await client.get_namespace_index(NAMESPACE_URI)
        for point_id in (TEMPERATURE, SETPOINT, AMBIENT):
            point = gateway.points[point_id]
            node = client.get_node(f"ns={ns};s={point_id}")
            dv = await node.read_data_value()
            assert dv.StatusCode.is_good()
            assert dv.Value.Value == pytest.approx(gateway.store.get(point_id).value)
            units = await (await node.get_child("0:EngineeringUnits")).read_value()
            assert units.DisplayName.Text == point.unit
            eu = await (await node.get_child("0:EURange")).read_value()
            assert (eu.Low, eu.High) == (point.lo, point.hi)

        # a client write never reaches the PLC
        before = oven.model.signals()["heater_setpoint"]
        node = client.get_node(f"ns={ns};s={SETPOINT}")
        with pytest.raises(ua.UaStatusCodeError) as refused:
            await node.write_value(ua.DataValue(ua.Variant(222.0, ua.VariantType.Double)))
        assert refused.value.code == ua.StatusCodes.BadUserAccessDenied
        with pytest.raises(ua.UaStatusCodeError) as read_only:
            await client.get_node(f"ns={ns};s={TEMPERATURE}").write_value(
                ua.DataValue(ua.Variant(1.0, ua.VariantType.Double))
            )
        assert read_only.value.code in (
            ua.StatusCodes.BadNotWritable,
            ua.StatusCodes.BadUserAccessDenied,
        )
    await asyncio.sleep(0.3)
    assert oven.model.signals()["heater_setpoint"] == before
    await gateway.store.aflush()
    refused_events = [e for e in gateway.store.events_since(0, 100_000) if e.type == "WriteRefused"]
    assert refused_events and refused_events[-1].point_id == SETPOINT
    assert refused_events[-1].data["user"] == "scada"
    assert refused_events[-1].data["role"] == "viewer"
    assert refused_events[-1].data["count"] == 1 and refused_events[-1].data["value"] == 222.0


@pytest.mark.parametrize(
    ("user", "password", "secure"),
    [
        (None, PASSWORD, True),  # anonymous, not allowed
        ("scada", "wrong", True),  # wrong password
        ("scada", PASSWORD, False),  # no security: not offered by this server
    ],
)
async def test_the_gateway_server_refuses_who_it_should(gateway, tmp_path, user, password, secure):
    client = await scada_client(gateway, tmp_path, user=user, password=password, secure=secure)
    with pytest.raises(Exception):  # noqa: B017 - asyncua raises several kinds here
        async with client:
            ns = await client.get_namespace_index(NAMESPACE_URI)
            await client.get_node(f"ns={ns};s={TEMPERATURE}").read_value()


async def test_scada_with_a_deadband_sees_a_point_go_bad(gateway, oven, tmp_path):
    """A Bad value carries no number; asyncua 2.1's deadband check used to drop it."""
    await eventually(lambda: all_good(gateway), what="every oven point GOOD")
    client = await scada_client(gateway, tmp_path, user="scada")
    received: list[ua.DataValue] = []

    class Handler:
        def datachange_notification(self, node, val, data):
            received.append(data.monitored_item.Value)

    async with client:
        ns = await client.get_namespace_index(NAMESPACE_URI)
        node = client.get_node(f"ns={ns};s={TEMPERATURE}")
        sub = await client.create_subscription(50, Handler())
        await sub.deadband_monitor(node, 0.5, deadbandtype=ua.DeadbandType.Absolute)
        await eventually(lambda: received, what="the initial value")
        oven.faults.bad_status("temperature", "BadSensorFailure")
        await eventually(
            lambda: any(not dv.StatusCode.is_good() for dv in received),
            what="the SCADA client to be told the point went bad",
        )
        assert received[-1].StatusCode.name == "BadSensorFailure"
