"""OPC UA node id syntax, point validation and driver options. No I/O."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from asyncua import ua
from pydantic import ValidationError

from drivers.errors import ConfigurationError, PointError
from drivers.modbus import PointError as ModbusPointError
from drivers.opcua import OpcuaDriver, OpcuaOptions, OpcuaPoint, parse_node_id

# -- node ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "nodeid", "uri"),
    [
        ("ns=2;s=Oven1.Temperature", ua.NodeId("Oven1.Temperature", 2), None),
        ("i=2258", ua.NodeId(2258, 0), None),
        ("ns=0;i=2258", ua.NodeId(2258, 0), None),
        ("ns=3;i=4294967295", ua.NodeId(4294967295, 3), None),
        ("ns=2;s=A;B=C", ua.NodeId("A;B=C", 2), None),  # the string runs to the end
        ("ns=2;s= spaced ", ua.NodeId(" spaced", 2), None),  # outer whitespace stripped only
        (
            "ns=4;g=72962B91-FA75-4AE6-8D28-B404DC7DAF63",
            ua.NodeId(uuid.UUID("72962b91-fa75-4ae6-8d28-b404dc7daf63"), 4),
            None,
        ),
        (
            "ns=1;b=M/RbKBsRVkePCePcx24oRA==",
            ua.NodeId(b"3\xf4[(\x1b\x11VG\x8f\t\xe3\xdc\xc7n(D", 1),
            None,
        ),
        (
            "nsu=urn:vendor:plc;s=Oven1.Temperature",
            ua.NodeId("Oven1.Temperature", 0),
            "urn:vendor:plc",
        ),
        ("nsu=http://acme.com/UA/;i=17", ua.NodeId(17, 0), "http://acme.com/UA/"),
        ("  ns=2;s=X  ", ua.NodeId("X", 2), None),
    ],
)
def test_node_id_syntax(text: str, nodeid: ua.NodeId, uri: str | None) -> None:
    ref = parse_node_id(text)
    assert ref.to_nodeid() == nodeid
    assert ref.namespace_uri == uri


def test_namespace_uri_is_resolved_to_the_index_given() -> None:
    ref = parse_node_id("nsu=urn:vendor:plc;s=Oven1.Temperature")
    assert ref.to_nodeid(5) == ua.NodeId("Oven1.Temperature", 5)
    assert str(ref) == "nsu=urn:vendor:plc;s=Oven1.Temperature"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty node id"),
        ("Oven1.Temperature", "no '='"),
        ("ns=2", "must be followed by ';'"),
        ("ns=2;", "no '='"),
        ("ns=x;i=1", "namespace index must be a number"),
        ("ns=-1;i=1", "namespace index must be a number"),
        ("ns=65536;i=1", "namespace index must be a number"),
        ("ns=2;x=1", "unknown key 'x'"),
        ("ns=2;S=Name", "unknown key 'S'"),
        ("i=abc", "i= needs a number"),
        ("i=-5", "i= needs a number"),
        ("i=4294967296", "i= needs a number"),
        ("i=\uff11\uff12", "i= needs a number"),  # full-width digits are not digits here
        ("s=", "non-empty string"),
        ("ns=2;g=not-a-guid", "g= needs a GUID"),
        ("ns=2;b=***", "b= needs non-empty base64"),
        ("ns=2;b=", "b= needs non-empty base64"),
        ("ns=1;nsu=urn:x;i=1", "give the namespace once"),
        ("ns=1;ns=2;i=1", "give the namespace once"),
        ("nsu=;i=1", "nsu= needs a namespace URI"),
    ],
)
def test_bad_node_id_syntax_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_node_id(text)


def test_bad_node_id_is_a_config_time_point_error() -> None:
    with pytest.raises(PointError) as info:
        OpcuaPoint("line1/oven1/temperature", "ns=2;Oven1.Temperature")
    assert info.value.field == "node_id"
    assert isinstance(info.value, ConfigurationError)


def test_point_error_is_shared_with_modbus() -> None:
    assert PointError is ModbusPointError


# -- points -------------------------------------------------------------------------------------


def test_point_parses_its_node_id_and_keeps_overrides() -> None:
    p = OpcuaPoint(
        "k",
        "ns=2;s=X",
        lo=0,
        hi=10,
        writable=True,
        deadband=0.5,
        sampling_interval_ms=50,
        queue_size=4,
    )
    assert p.node_id.to_nodeid() == ua.NodeId("X", 2)
    assert (p.deadband, p.sampling_interval_ms, p.queue_size) == (0.5, 50, 4)
    assert p.datatype is None  # no datatype: the node's DataType is not checked
    assert OpcuaPoint("k", "ns=2;s=X", datatype="uint32").datatype == "uint32"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"key": ""}, "key"),
        ({"lo": "zero"}, "lo"),
        ({"hi": float("nan")}, "hi"),
        ({"lo": 10, "hi": 5}, "hi"),
        ({"writable": "yes"}, "writable"),
        ({"deadband": -1}, "deadband"),
        ({"deadband": float("inf")}, "deadband"),
        ({"sampling_interval_ms": -5}, "sampling_interval_ms"),
        ({"queue_size": 0}, "queue_size"),
        ({"queue_size": 2.5}, "queue_size"),
        ({"queue_size": True}, "queue_size"),
        ({"datatype": "double"}, "datatype"),
        ({"datatype": 16}, "datatype"),
    ],
)
def test_point_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {"key": "k", "node_id": "ns=2;s=X"} | kwargs
    with pytest.raises(PointError) as info:
        OpcuaPoint(**args)
    assert info.value.field == field


# -- options ------------------------------------------------------------------------------------


def test_option_defaults() -> None:
    o = OpcuaOptions()
    assert o.mode == "subscribe"
    assert (o.publishing_interval_ms, o.sampling_interval_ms, o.queue_size) == (500.0, None, 1)
    assert (o.keepalive_count, o.lifetime_count, o.watchdog_factor) == (6, 60, 2.0)
    assert (o.timeout_s, o.session_timeout_s, o.poll_interval_s) == (4.0, 60.0, 1.0)
    assert 10 <= o.reconnect_cap_s <= 20
    assert (o.security_mode, o.security_policy) == ("None", "Basic256Sha256")
    assert o.username is None and o.password is None and o.server_certificate is None
    assert o.deadband == 0.0


def test_every_option_is_documented() -> None:
    for name, field in OpcuaOptions.model_fields.items():
        assert field.description and len(field.description) > 20, name


@pytest.mark.parametrize(
    "bad",
    [
        {"mode": "push"},
        {"publishing_interval_ms": 0},
        {"sampling_interval_ms": -1},
        {"queue_size": 0},
        {"keepalive_count": 0},
        {"lifetime_count": 2},
        {"keepalive_count": 10, "lifetime_count": 29},  # < 3 x keep-alive
        {"watchdog_factor": 1.0},
        {"timeout_s": 0},
        {"reconnect_cap_s": 300},  # minutes are what users complain about
        {"reconnect_cap_s": 0.5},
        {"security_mode": "Encrypt"},
        {"security_policy": "Basic128Rsa15"},
        {"password": "secret"},  # without a username
        {"username": ""},
        {"poll_interval_s": 0},
        {"unknown": 1},
    ],
)
def test_options_out_of_bounds_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        OpcuaOptions.model_validate(bad)


def test_options_are_frozen_and_hide_the_password() -> None:
    o = OpcuaOptions.model_validate({"username": "operator", "password": "s3cret"})
    assert "s3cret" not in repr(o)
    assert o.password is not None and o.password.get_secret_value() == "s3cret"
    with pytest.raises(ValidationError):
        o.mode = "poll"  # type: ignore[misc]


# -- driver construction (no I/O) ---------------------------------------------------------------


def test_driver_construction_checks_endpoint_and_keys_without_io() -> None:
    points = [OpcuaPoint("a", "ns=2;s=A"), OpcuaPoint("b", "i=2258")]
    d = OpcuaDriver("plc", "opc.tcp://10.0.0.1:4840/x", {"mode": "poll"}, points)
    assert d.keys == ("a", "b")
    assert d.options.mode == "poll"
    with pytest.raises(ConfigurationError, match=r"opc\.tcp://HOST:PORT"):
        OpcuaDriver("plc", "tcp://10.0.0.1:4840", None, points)
    with pytest.raises(ConfigurationError, match="appears twice"):
        OpcuaDriver("plc", "opc.tcp://h:4840", None, [points[0], points[0]])
    with pytest.raises(ConfigurationError, match="invalid options"):
        OpcuaDriver("plc", "opc.tcp://h:4840", {"queue_size": 0}, points)


def test_secure_driver_can_be_built_without_pki_dir_for_config_checks() -> None:
    # The config checker builds drivers with pki_dir=None; the missing folder is reported
    # when connecting, not as a config error.
    OpcuaDriver("plc", "opc.tcp://h:4840", {"security_mode": "SignAndEncrypt"}, [])
