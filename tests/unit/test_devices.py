"""From config to twin points and drivers."""

from __future__ import annotations

import pytest

from gateway.config.model import ModbusPointConfig, OpcuaPointConfig
from gateway.devices import twin_datatype


@pytest.mark.parametrize(
    ("datatype", "scale", "offset", "twin"),
    [
        ("int16", 1.0, 0.0, "int16"),
        ("int16", 0.01, 0.0, "float64"),
        ("uint32", 1.0, -40.0, "float64"),
        ("float32", 0.1, 0.0, "float32"),
        ("bool", 1.0, 0.0, "bool"),
    ],
)
def test_a_scaled_integer_register_is_a_float_in_the_twin(datatype, scale, offset, twin):
    point = ModbusPointConfig(
        id="a/b", address="holding:0", datatype=datatype, scale=scale, offset=offset
    )
    assert twin_datatype(point) == twin


def test_opcua_points_keep_their_datatype():
    point = OpcuaPointConfig(id="a/b", address="ns=2;s=X", datatype="uint32")
    assert twin_datatype(point) == "uint32"


def test_an_opcua_point_without_its_own_deadband_takes_the_device_default():
    from drivers.opcua.options import OpcuaOptions
    from gateway.devices import opcua_point

    options = OpcuaOptions(deadband=0.5)
    unset = OpcuaPointConfig(id="a/b", address="ns=2;s=X", datatype="float64")
    own = OpcuaPointConfig(id="a/c", address="ns=2;s=Y", datatype="float64", deadband=0.0)
    assert opcua_point(unset, options).deadband is None  # the driver falls back to 0.5
    assert opcua_point(own, options).deadband == 0.0
