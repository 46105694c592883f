"""OPC UA status codes, values and timestamps to samples, and values to Variants. No I/O."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime
from enum import IntEnum

import pytest
from asyncua import ua

from drivers.contract import Quality
from drivers.opcua.convert import (
    POINT_DATATYPES,
    ConversionError,
    datatype_mismatch,
    sample_of,
    source_time,
    status_name,
    status_quality,
    to_variant,
    twin_value,
    values_match,
    variant_type_of,
)

VT = ua.VariantType
SC = ua.StatusCodes

# -- status codes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "quality", "reason"),
    [
        (SC.Good, Quality.GOOD, None),
        (SC.GoodLocalOverride, Quality.GOOD, "GoodLocalOverride"),
        (SC.Good | 0x0400, Quality.GOOD, None),  # info bits (overflow) on plain Good
        (SC.Uncertain, Quality.UNCERTAIN, "Uncertain"),
        (SC.UncertainLastUsableValue, Quality.UNCERTAIN, "UncertainLastUsableValue"),
        (SC.UncertainSensorNotAccurate, Quality.UNCERTAIN, "UncertainSensorNotAccurate"),
        (
            SC.UncertainEngineeringUnitsExceeded | 0x0100,
            Quality.UNCERTAIN,
            "UncertainEngineeringUnitsExceeded",
        ),
        (SC.Bad, Quality.BAD, "Bad"),
        (SC.BadSensorFailure, Quality.BAD, "BadSensorFailure"),
        (SC.BadDeviceFailure, Quality.BAD, "BadDeviceFailure"),
        (SC.BadCommunicationError, Quality.BAD, "BadCommunicationError"),
        (SC.BadNodeIdUnknown, Quality.BAD, "BadNodeIdUnknown"),
        (SC.BadOutOfService, Quality.BAD, "BadOutOfService"),
        (SC.BadWaitingForInitialData, Quality.BAD, "BadWaitingForInitialData"),
        (0xC0000000, Quality.BAD, "Bad (0xC0000000)"),  # reserved severity 11 counts as Bad
        (0x40AB0000, Quality.UNCERTAIN, "Uncertain (0x40AB0000)"),  # unknown code
    ],
)
def test_status_code_maps_to_quality_and_named_reason(
    code: int, quality: Quality, reason: str | None
) -> None:
    assert status_quality(code) == (quality, reason)


def test_status_name_ignores_info_bits() -> None:
    assert status_name(SC.BadOutOfRange) == "BadOutOfRange"
    assert status_name(SC.BadOutOfRange | 0x00FF) == "BadOutOfRange"


# -- DataValue → Sample -------------------------------------------------------------------------

T0 = datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC)
T1 = datetime(2024, 5, 1, 12, 0, 1, tzinfo=UTC)


def dv(
    value: object,
    vtype: ua.VariantType | None = None,
    code: int = SC.Good,
    src: datetime | None = T0,
    srv: datetime | None = T1,
) -> ua.DataValue:
    return ua.DataValue(
        ua.Variant(value, vtype), ua.StatusCode(code), SourceTimestamp=src, ServerTimestamp=srv
    )


def test_good_value_in_range_is_good_with_source_timestamp() -> None:
    s = sample_of("k", dv(21.5, VT.Double), 0, 100)
    assert (s.key, s.value, s.quality, s.reason) == ("k", 21.5, Quality.GOOD, None)
    assert s.source_ts == T0.timestamp() == 1714564800.25


def test_server_timestamp_when_no_source_timestamp() -> None:
    assert sample_of("k", dv(1, VT.Int32, src=None), None, None).source_ts == T1.timestamp()
    assert source_time(dv(1, VT.Int32, src=None, srv=None)) is None


def test_opc_ua_minimum_datetime_counts_as_no_timestamp() -> None:
    minimum = datetime(1601, 1, 1, tzinfo=UTC)
    assert source_time(dv(1, VT.Int32, src=minimum)) == T1.timestamp()


@pytest.mark.parametrize(
    ("value", "lo", "hi", "quality"),
    [
        (150.0, 0, 100, Quality.UNCERTAIN),
        (-1, 0, 100, Quality.UNCERTAIN),
        (100, 0, 100, Quality.GOOD),
        (5, None, 4, Quality.UNCERTAIN),
        (5, 6, None, Quality.UNCERTAIN),
    ],
)
def test_value_outside_engineering_range_is_uncertain(
    value: float, lo: float | None, hi: float | None, quality: Quality
) -> None:
    s = sample_of("k", dv(value), lo, hi)
    assert s.quality is quality
    assert s.value == value
    if quality is Quality.UNCERTAIN:
        assert "outside engineering range" in (s.reason or "")


def test_not_finite_is_bad_without_value() -> None:
    s = sample_of("k", dv(math.nan, VT.Double), None, None)
    assert (s.value, s.quality) == (None, Quality.BAD)
    assert "not finite" in (s.reason or "")


def test_bad_status_is_bad_with_its_name_and_no_value() -> None:
    s = sample_of("k", dv(42.0, VT.Double, SC.BadSensorFailure), 0, 100)
    assert (s.value, s.quality, s.reason) == (None, Quality.BAD, "BadSensorFailure")
    assert s.source_ts == T0.timestamp()


def test_uncertain_status_keeps_value_and_names_status() -> None:
    s = sample_of("k", dv(42.0, VT.Double, SC.UncertainLastUsableValue), 0, 100)
    assert (s.value, s.quality, s.reason) == (42.0, Quality.UNCERTAIN, "UncertainLastUsableValue")


def test_uncertain_status_with_a_value_no_one_can_use_is_bad() -> None:
    s = sample_of("k", dv(math.inf, VT.Double, SC.UncertainLastUsableValue), None, None)
    assert (s.value, s.quality) == (None, Quality.BAD)


def test_good_with_null_value_is_bad() -> None:
    s = sample_of("k", ua.DataValue(ua.Variant(None), SourceTimestamp=T0), None, None)
    assert s.quality is Quality.BAD and s.value is None


def test_good_subcode_is_good_with_its_name_as_reason() -> None:
    s = sample_of("k", dv(1.0, VT.Double, SC.GoodLocalOverride), None, None)
    assert (s.quality, s.reason, s.value) == (Quality.GOOD, "GoodLocalOverride", 1.0)


def test_array_value_is_bad_with_reason() -> None:
    s = sample_of("k", dv([1, 2, 3], VT.Int32), None, None)
    assert s.quality is Quality.BAD
    assert "arrays are not supported" in (s.reason or "")


class Mode(IntEnum):
    AUTO = 2


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.5, 1.5),
        (7, 7),
        (True, True),
        ("text", "text"),
        (T0, T0.timestamp()),
        (b"\x01\x02", b"\x01\x02"),
        (ua.LocalizedText("Running", "en"), "Running"),
        (Mode.AUTO, 2),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
        (ua.NodeId("X", 2), "ns=2;s=X"),
        (ua.QualifiedName("Name", 3), "3:Name"),
        (ua.StatusCode(SC.BadTimeout), "BadTimeout"),
    ],
)
def test_twin_value_table(value: object, expected: object) -> None:
    assert twin_value(value) == expected


def test_twin_value_refuses_structures() -> None:
    with pytest.raises(ValueError, match="not supported"):
        twin_value({"a": 1})


# -- values → Variants ---------------------------------------------------------------------------

INTEGER_LIMITS = [
    (VT.SByte, -128, 127),
    (VT.Byte, 0, 255),
    (VT.Int16, -32768, 32767),
    (VT.UInt16, 0, 65535),
    (VT.Int32, -(2**31), 2**31 - 1),
    (VT.UInt32, 0, 2**32 - 1),
    (VT.Int64, -(2**63), 2**63 - 1),
    (VT.UInt64, 0, 2**64 - 1),
]


@pytest.mark.parametrize(("vtype", "low", "high"), INTEGER_LIMITS)
def test_integer_types_take_their_full_range_and_refuse_beyond(
    vtype: ua.VariantType, low: int, high: int
) -> None:
    for value in (low, high, 0 if low == 0 else -1, 1):
        variant = to_variant(value, vtype)
        assert (variant.Value, variant.VariantType) == (value, vtype)
        assert type(variant.Value) is int
    for value in (low - 1, high + 1):
        with pytest.raises(ConversionError, match=f"outside the {vtype.name} range"):
            to_variant(value, vtype)


@pytest.mark.parametrize(("vtype", "low", "high"), INTEGER_LIMITS)
def test_integer_types_take_integral_floats_only(
    vtype: ua.VariantType, low: int, high: int
) -> None:
    variant = to_variant(12.0, vtype)
    assert (variant.Value, type(variant.Value)) == (12, int)
    with pytest.raises(ConversionError, match="whole numbers"):
        to_variant(12.5, vtype)
    with pytest.raises(ConversionError, match="finite"):
        to_variant(math.inf, vtype)


@pytest.mark.parametrize("vtype", [v for v, _, _ in INTEGER_LIMITS] + [VT.Float, VT.Double])
@pytest.mark.parametrize("value", ["12", True, None, [1]])
def test_numeric_types_refuse_other_types(vtype: ua.VariantType, value: object) -> None:
    with pytest.raises(ConversionError, match="takes a number"):
        to_variant(value, vtype)


def test_double_takes_ints_and_floats_but_not_nan() -> None:
    assert to_variant(3, VT.Double).Value == 3.0
    assert type(to_variant(3, VT.Double).Value) is float
    assert to_variant(1e300, VT.Double).Value == 1e300
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ConversionError, match="finite"):
            to_variant(bad, VT.Double)


def test_float_range_is_float32() -> None:
    assert to_variant(3.4e38, VT.Float).VariantType is VT.Float
    with pytest.raises(ConversionError, match="Float range"):
        to_variant(3.5e38, VT.Float)


@pytest.mark.parametrize(
    ("value", "expected"), [(True, True), (False, False), (1, True), (0, False)]
)
def test_boolean_takes_bools_and_zero_or_one(value: object, expected: bool) -> None:
    assert to_variant(value, VT.Boolean).Value is expected


@pytest.mark.parametrize("value", [2, 1.0, "true", None])
def test_boolean_refuses_everything_else(value: object) -> None:
    with pytest.raises(ConversionError, match="Boolean"):
        to_variant(value, VT.Boolean)


def test_string_takes_text_only() -> None:
    assert to_variant("recipe-7", VT.String).Value == "recipe-7"
    with pytest.raises(ConversionError, match="takes text"):
        to_variant(7, VT.String)


@pytest.mark.parametrize("vtype", [VT.DateTime, VT.ByteString, VT.ExtensionObject, VT.NodeId])
def test_other_types_are_not_written(vtype: ua.VariantType) -> None:
    with pytest.raises(ConversionError, match="not supported"):
        to_variant(1, vtype)


@pytest.mark.parametrize(
    ("datatype", "expected"),
    [
        (ua.NodeId(ua.ObjectIds.Boolean), VT.Boolean),
        (ua.NodeId(ua.ObjectIds.Int16), VT.Int16),
        (ua.NodeId(ua.ObjectIds.UInt64), VT.UInt64),
        (ua.NodeId(ua.ObjectIds.Float), VT.Float),
        (ua.NodeId(ua.ObjectIds.Double), VT.Double),
        (ua.NodeId(ua.ObjectIds.String), VT.String),
        (ua.NodeId(ua.ObjectIds.Duration), VT.Double),
        (ua.NodeId(ua.ObjectIds.UtcTime), VT.DateTime),
        (ua.NodeId(ua.ObjectIds.Counter), VT.UInt32),
        (ua.NodeId(ua.ObjectIds.Enumeration), VT.Int32),
        (ua.NodeId(ua.ObjectIds.BaseDataType), None),
        (ua.NodeId(ua.ObjectIds.Number), None),
        (ua.NodeId(ua.ObjectIds.ServerStatusDataType), None),
        (ua.NodeId(3001, 2), None),
    ],
)
def test_variant_type_of_datatype(datatype: ua.NodeId, expected: ua.VariantType | None) -> None:
    assert variant_type_of(datatype) is expected


@pytest.mark.parametrize(
    ("vtype", "written", "read", "ok"),
    [
        (VT.Float, 0.1, 0.10000000149011612, True),  # float32 rounding is not a mismatch
        (VT.Float, 0.1, 0.2, False),
        (VT.Double, 0.1, 0.1, True),
        (VT.Double, 0.1, 0.10000000149011612, False),
        (VT.Int16, 5, 5, True),
        (VT.Int16, 5, 6, False),
        (VT.Int16, 1, True, False),
        (VT.Boolean, True, True, True),
        (VT.Boolean, True, 1, False),
        (VT.String, "a", "a", True),
        (VT.String, "a", None, False),
    ],
)
def test_values_match(vtype: ua.VariantType, written: object, read: object, ok: bool) -> None:
    assert values_match(vtype, written, read) is ok


# -- a node's DataType against the point's datatype ---------------------------------------------


@pytest.mark.parametrize(
    ("node", "point", "reason"),
    [
        # The same type, or a wider one: every value fits, nothing to say.
        (VT.Int16, "int16", None),
        (VT.Int16, "int32", None),
        (VT.Int16, "float32", None),
        (VT.Int16, "float64", None),
        (VT.Byte, "uint16", None),
        (VT.Byte, "int16", None),
        (VT.UInt16, "int32", None),
        (VT.UInt32, "uint64", None),
        (VT.UInt32, "int64", None),
        (VT.UInt32, "float64", None),
        (VT.Int32, "float64", None),
        (VT.Float, "float64", None),
        (VT.Double, "float64", None),
        (VT.DateTime, "float64", None),  # the twin holds times as epoch seconds
        (VT.Boolean, "bool", None),
        (VT.String, "string", None),
        (VT.LocalizedText, "string", None),
        (VT.NodeId, "string", None),
        # Narrower, or another kind: values would be lost or misread.
        (VT.UInt32, "int16", "node is UInt32, point is int16: values would be cut"),
        (VT.Int32, "int16", "node is Int32, point is int16: values would be cut"),
        (VT.Int16, "uint16", "node is Int16, point is uint16: values would be cut"),
        (VT.Int64, "uint64", "node is Int64, point is uint64: values would be cut"),
        (VT.UInt64, "int64", "node is UInt64, point is int64: values would be cut"),
        (VT.Double, "int32", "node is Double, point is int32: fractions would be cut"),
        (VT.Float, "int64", "node is Float, point is int64: fractions would be cut"),
        (VT.Double, "float32", "node is Double, point is float32: precision would be lost"),
        (VT.Int32, "float32", "node is Int32, point is float32: large values would be rounded"),
        (VT.Int64, "float64", "node is Int64, point is float64: large values would be rounded"),
        (VT.String, "float64", "node is String, point is float64: text is not a number"),
        (VT.String, "bool", "node is String, point is bool: values are not true/false"),
        (VT.Boolean, "int16", "node is Boolean, point is int16: true/false is not a number"),
        (VT.Int16, "bool", "node is Int16, point is bool: values are not true/false"),
        (VT.Double, "string", "node is Double, point is string: values are not text"),
        (VT.ByteString, "string", "node is ByteString, point is string: values are not text"),
        (VT.ByteString, "float64", "node is ByteString, point is float64: values are not numbers"),
    ],
)
def test_datatype_mismatch_names_both_types_when_values_would_be_lost(
    node: ua.VariantType, point: str, reason: str | None
) -> None:
    assert datatype_mismatch(node, point) == reason


def test_every_point_datatype_fits_its_own_opc_ua_type() -> None:
    assert set(POINT_DATATYPES) == {
        "bool",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float32",
        "float64",
        "string",
    }
    for name, vtype in POINT_DATATYPES.items():
        assert datatype_mismatch(vtype, name) is None
