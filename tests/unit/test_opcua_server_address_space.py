"""Planning the OPC UA address space and the values in it: pure functions, no server."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from asyncua import ua

from asyncua_glue.datavalue import SharedDataValue
from asyncua_glue.units import UNECE_NAMESPACE, unece_unit_id
from gateway.errors import ConfigError
from gateway.opcua_server.address_space import (
    add_nodes_items,
    datavalue,
    eu_information,
    plan_address_space,
    status_of,
    variant_type_of,
)
from gateway.twin.model import PointDef, PointValue, Quality

S = ua.StatusCodes


def point(pid: str, datatype: str = "float64", **kw) -> PointDef:
    return PointDef(id=pid, device="dev", datatype=datatype, **kw)


def change(
    value,
    quality=Quality.GOOD,
    *,
    source_ts=1_700_000_000.5,
    gateway_ts=1_700_000_001.0,
    reason=None,
) -> PointValue:
    return PointValue("a/b/c", value, quality, source_ts, gateway_ts, 7, reason)


# -- folders and variables ------------------------------------------------------------------------


def test_point_ids_become_nested_folders_parents_first():
    plan = plan_address_space(
        [
            point("utilities/cooling/tank1/level"),
            point("utilities/cooling/tank1/valve"),
            point("utilities/cooling/pump1/vibration"),
            point("line1/oven1/temperature"),
        ]
    )
    assert [(f.path, f.name, f.parent) for f in plan.folders] == [
        ("utilities", "utilities", None),
        ("utilities/cooling", "cooling", "utilities"),
        ("utilities/cooling/tank1", "tank1", "utilities/cooling"),
        ("utilities/cooling/pump1", "pump1", "utilities/cooling"),
        ("line1", "line1", None),
        ("line1/oven1", "oven1", "line1"),
    ]
    assert [(v.point_id, v.name, v.parent) for v in plan.variables] == [
        ("utilities/cooling/tank1/level", "level", "utilities/cooling/tank1"),
        ("utilities/cooling/tank1/valve", "valve", "utilities/cooling/tank1"),
        ("utilities/cooling/pump1/vibration", "vibration", "utilities/cooling/pump1"),
        ("line1/oven1/temperature", "temperature", "line1/oven1"),
    ]


def test_a_point_that_is_also_a_folder_is_refused_naming_both():
    with pytest.raises(ConfigError, match=r"'a/b' is also the folder of point 'a/b/c'"):
        plan_address_space([point("a/b/c"), point("a/b")])


def test_a_point_declared_twice_is_refused():
    with pytest.raises(ConfigError, match="declared twice"):
        plan_address_space([point("a/b"), point("a/b")])


@pytest.mark.parametrize(
    ("datatype", "expected"),
    [
        ("bool", ua.VariantType.Boolean),
        ("int16", ua.VariantType.Int16),
        ("uint16", ua.VariantType.UInt16),
        ("int32", ua.VariantType.Int32),
        ("uint32", ua.VariantType.UInt32),
        ("int64", ua.VariantType.Int64),
        ("uint64", ua.VariantType.UInt64),
        ("float32", ua.VariantType.Float),
        ("float64", ua.VariantType.Double),
        ("string", ua.VariantType.String),
    ],
)
def test_datatypes_map_to_opcua_builtin_types(datatype, expected):
    assert variant_type_of(datatype) is expected


def test_an_unknown_datatype_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"'decimal' has no OPC UA type .*float64"):
        variant_type_of("decimal")


@pytest.mark.parametrize(
    ("kw", "type_definition", "has_range", "has_units"),
    [
        ({"unit": "m", "lo": 0.0, "hi": 5.0}, ua.ObjectIds.AnalogItemType, True, True),
        ({"lo": 0.0, "hi": 5.0}, ua.ObjectIds.AnalogItemType, True, False),
        ({"unit": "kW"}, ua.ObjectIds.BaseAnalogType, False, True),
        ({}, ua.ObjectIds.BaseAnalogType, False, False),
    ],
)
def test_numeric_points_are_analog_items(kw, type_definition, has_range, has_units):
    (var,) = plan_address_space([point("a/b/c", **kw)]).variables
    assert var.type_definition == type_definition
    eu_range = var.eu_range
    assert (eu_range is not None) == has_range
    assert (var.engineering_units is not None) == has_units
    if eu_range is not None:
        assert (eu_range.Low, eu_range.High) == (0.0, 5.0)


def test_bools_and_strings_are_plain_variables_without_units():
    plan = plan_address_space([point("a/run", "bool", unit="-"), point("a/tag", "string")])
    for var in plan.variables:
        assert var.type_definition == ua.ObjectIds.BaseDataVariableType
        assert var.engineering_units is None and var.eu_range is None


# -- units ----------------------------------------------------------------------------------------


def test_unit_id_is_the_common_code_bytes():
    assert unece_unit_id("CEL") == 0x43454C == 4408652
    assert unece_unit_id("P1") == 0x5031
    with pytest.raises(ValueError):
        unece_unit_id("TOOLONG")


@pytest.mark.parametrize(
    ("unit", "code", "name"),
    [
        ("°C", "CEL", "degree Celsius"),
        ("degC", "CEL", "degree Celsius"),
        ("m", "MTR", "metre"),
        ("kW", "KWT", "kilowatt"),
        ("kWh", "KWH", "kilowatt hour"),
        ("%", "P1", "percent"),
        ("m³/h", "MQH", "cubic metre per hour"),
        ("m3/h", "MQH", "cubic metre per hour"),
        ("mm/s", "C16", "millimetre per second"),
        ("bar", "BAR", "bar"),
    ],
)
def test_common_units_carry_their_unece_code(unit, code, name):
    eu = eu_information(unit)
    assert eu is not None
    assert eu.NamespaceUri == UNECE_NAMESPACE
    assert eu.UnitId == unece_unit_id(code)
    assert eu.DisplayName.Text == unit  # as the plant's people wrote it
    assert eu.Description.Text == name


def test_an_unknown_unit_keeps_its_display_name_only():
    eu = eu_information("widgets/shift")
    assert eu is not None
    assert eu.UnitId == -1
    assert eu.DisplayName.Text == "widgets/shift"
    assert eu_information("") is None
    assert eu_information("  ") is None


# -- nodes ----------------------------------------------------------------------------------------


def test_nodeids_are_the_point_ids_in_our_namespace():
    plan = plan_address_space(
        [
            point("area/tank1/level", unit="m", lo=0.0, hi=5.0, writable=True),
            point("area/x", "bool"),
        ]
    )
    items = {i.RequestedNewNodeId.to_string(): i for i in add_nodes_items(plan, 2)}
    assert list(items) == [
        "ns=2;s=area",
        "ns=2;s=area/tank1",
        "ns=2;s=area/tank1/level",
        "ns=2;s=area/tank1/level#EURange",
        "ns=2;s=area/tank1/level#EngineeringUnits",
        "ns=2;s=area/x",
    ]
    assert items["ns=2;s=area"].ParentNodeId == ua.NodeId(ua.ObjectIds.ObjectsFolder)
    level = items["ns=2;s=area/tank1/level"]
    assert level.ParentNodeId == ua.NodeId("area/tank1", 2)
    assert level.BrowseName == ua.QualifiedName("level", 2)
    assert level.NodeAttributes.DataType == ua.NodeId(ua.ObjectIds.Double)
    eu_range = items["ns=2;s=area/tank1/level#EURange"]
    assert eu_range.BrowseName == ua.QualifiedName("EURange", 0)
    assert eu_range.ReferenceTypeId == ua.NodeId(ua.ObjectIds.HasProperty)


def test_only_writable_points_advertise_current_write():
    plan = plan_address_space([point("a/sp", writable=True, lo=0.0, hi=1.0), point("a/pv")])
    items = {i.RequestedNewNodeId.Identifier: i for i in add_nodes_items(plan, 2)}
    read = ua.AccessLevel.CurrentRead.mask
    write = ua.AccessLevel.CurrentWrite.mask
    assert items["a/sp"].NodeAttributes.AccessLevel == read | write
    # What a session that bypassed the per-role answer would see (server.py answers per role).
    assert items["a/sp"].NodeAttributes.UserAccessLevel == read
    assert items["a/pv"].NodeAttributes.AccessLevel == read
    assert items["a/pv"].NodeAttributes.UserAccessLevel == read


# -- status codes and values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quality", "value", "reason", "expected"),
    [
        (Quality.GOOD, 1.0, None, S.Good),
        (
            Quality.UNCERTAIN,
            7.0,
            "7 outside engineering range [0, 5]",
            S.UncertainEngineeringUnitsExceeded,
        ),
        (Quality.UNCERTAIN, -1.0, None, S.UncertainEngineeringUnitsExceeded),
        (Quality.UNCERTAIN, 2.0, "sensor drifting", S.Uncertain),
        (Quality.UNCERTAIN, 2.0, "UncertainSensorNotAccurate: drift", S.UncertainSensorNotAccurate),
        (Quality.BAD, None, "waiting for initial data", S.BadWaitingForInitialData),
        (Quality.BAD, None, "device disconnected: refused", S.BadNoCommunication),
        (Quality.BAD, None, "value not finite (nan)", S.Bad),
        (Quality.BAD, None, "BadSensorFailure from the PLC", S.BadSensorFailure),
        (Quality.BAD, None, "BadNoSuchCode", S.Bad),
        # A named code of the wrong severity is not passed through.
        (Quality.BAD, None, "UncertainInitialValue", S.Bad),
        (Quality.STALE, 2.0, "device disconnected: timeout", S.UncertainLastUsableValue),
        (Quality.STALE, None, "device disconnected: timeout", S.BadNoCommunication),
        (Quality.GOOD, None, None, S.Bad),
    ],
)
def test_quality_maps_to_status_code(quality, value, reason, expected):
    assert status_of(quality, value, reason, lo=0.0, hi=5.0) == expected


def test_a_good_value_carries_source_and_server_timestamps():
    dv = datavalue(change(2.5), ua.VariantType.Double)
    assert dv.Value == ua.Variant(2.5, ua.VariantType.Double)
    assert dv.StatusCode.value == S.Good
    assert dv.SourceTimestamp == datetime.fromtimestamp(1_700_000_000.5, UTC)
    assert dv.ServerTimestamp == datetime.fromtimestamp(1_700_000_001.0, UTC)


def test_a_stale_value_keeps_the_time_of_the_last_usable_value():
    last = datetime(2024, 1, 1, tzinfo=UTC)
    dv = datavalue(
        change(2.5, Quality.STALE, source_ts=None), ua.VariantType.Double, last_source=last
    )
    assert dv.StatusCode.value == S.UncertainLastUsableValue
    assert dv.Value.Value == 2.5
    assert dv.SourceTimestamp == last


def test_a_bad_value_is_null_with_the_gateway_time_when_the_device_gave_none():
    dv = datavalue(
        change(None, Quality.BAD, source_ts=None, reason="device disconnected: refused"),
        ua.VariantType.Double,
    )
    assert dv.StatusCode.value == S.BadNoCommunication
    assert dv.Value.VariantType is ua.VariantType.Null
    assert dv.SourceTimestamp == dv.ServerTimestamp


def test_never_heard_from_gets_the_time_it_was_published():
    dv = datavalue(
        PointValue("a/b", None, Quality.BAD, None, 0.0, 0, "waiting for initial data"),
        ua.VariantType.Double,
        now=1_700_000_000.0,
    )
    assert dv.StatusCode.value == S.BadWaitingForInitialData
    assert dv.ServerTimestamp == datetime.fromtimestamp(1_700_000_000.0, UTC)


@pytest.mark.parametrize(
    ("vtype", "value", "expected"),
    [
        (ua.VariantType.Float, 3, 3.0),
        (ua.VariantType.Int16, 12.0, 12),  # an integral float from the twin
        (ua.VariantType.Boolean, 1, True),
        (ua.VariantType.String, b"TANK-01", "TANK-01"),
        (ua.VariantType.UInt64, 2**64 - 1, 2**64 - 1),
    ],
)
def test_values_are_coerced_to_the_variable_type(vtype, value, expected):
    dv = datavalue(change(value), vtype)
    assert dv.Value.VariantType is vtype
    assert dv.Value.Value == expected
    assert dv.StatusCode.value == S.Good


@pytest.mark.parametrize(
    ("vtype", "value"),
    [
        (ua.VariantType.Int16, 1.5),  # a scaled point declared with its raw integer type
        (ua.VariantType.Int16, 40000),
        (ua.VariantType.UInt16, -1),
        (ua.VariantType.Double, "high"),
        (ua.VariantType.Double, True),
    ],
)
def test_a_value_the_type_cannot_carry_is_bad_type_mismatch(vtype, value):
    dv = datavalue(change(value), vtype)
    assert dv.StatusCode.value == S.BadTypeMismatch
    assert dv.Value.VariantType is ua.VariantType.Null


def test_datavalues_are_shared_not_deep_copied():
    import copy

    dv = datavalue(change(2.5), ua.VariantType.Double)
    assert copy.deepcopy(dv) is dv
    assert isinstance(dv, SharedDataValue)
    assert isinstance(dv, ua.DataValue)
