"""asyncua_glue: the deadband fix, the shared DataValue, and the analog property builders."""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys

import pytest
from asyncua import ua
from asyncua.server.monitored_item_service import MonitoredItemService, MonitoredItemValues
from asyncua.ua.ua_binary import struct_to_binary

from asyncua_glue import fixes
from asyncua_glue.datavalue import SharedDataValue
from asyncua_glue.properties import (
    engineering_units_item,
    eu_information,
    eu_range_item,
    property_item,
)
from asyncua_glue.units import UNECE_NAMESPACE, unece_unit_id

GOOD = ua.DataValue(ua.Variant(1.0, ua.VariantType.Double))
BAD = ua.DataValue(
    ua.Variant(None, ua.VariantType.Null), ua.StatusCode(ua.StatusCodes.BadSensorFailure)
)


def values(old: ua.DataValue, new: ua.DataValue) -> MonitoredItemValues:
    mvalues = MonitoredItemValues()
    mvalues.set_current_datavalue(old)
    mvalues.set_current_datavalue(new)
    return mvalues


def absolute(deadband: float) -> ua.DataChangeFilter:
    return ua.DataChangeFilter(
        Trigger=ua.DataChangeTrigger.StatusValue,
        DeadbandType=ua.DeadbandType.Absolute,
        DeadbandValue=deadband,
    )


def double(value: float) -> ua.DataValue:
    return ua.DataValue(ua.Variant(value, ua.VariantType.Double))


# -- the deadband fix ----------------------------------------------------------------------------


@pytest.fixture
def deadband_check():
    fixes.apply()
    return MonitoredItemService._is_deadband_exceeded


@pytest.mark.parametrize(("old", "new"), [(GOOD, BAD), (BAD, GOOD)], ids=["to_bad", "to_good"])
def test_a_change_to_or_from_a_null_value_passes_the_deadband(deadband_check, old, new):
    assert deadband_check(None, values(old, new), absolute(0.5)) is True


def test_asyncua_still_needs_the_fix(deadband_check):
    # When this fails, asyncua fixed the bug itself: drop asyncua_glue.fixes (docs/upstream/).
    stock = inspect.unwrap(deadband_check)
    assert stock is not deadband_check
    with pytest.raises(TypeError):
        stock(None, values(GOOD, BAD), absolute(0.5))


@pytest.mark.parametrize(("new", "passes"), [(1.2, False), (1.0, False), (1.6, True), (0.4, True)])
def test_numbers_are_still_filtered(deadband_check, new, passes):
    assert deadband_check(None, values(GOOD, double(new)), absolute(0.5)) is passes


def test_a_creeping_value_is_measured_from_the_last_value_reported(deadband_check):
    # Part 4, 7.22.2: against the last value sent, not the previous sample. Heater wear creeps
    # 0.4 of its deadband a sample: stock asyncua never reported it.
    mvalues = MonitoredItemValues()
    passed = []
    for n in range(8):
        mvalues.set_current_datavalue(double(1.0 + 0.2 * n))
        passed.append(deadband_check(None, mvalues, absolute(0.5)))
    # The first sample (nothing before it) passes; then 1.6 (0.6 past 1.0), then 2.2.
    assert passed == [True, False, False, True, False, False, True, False]
    stock = inspect.unwrap(deadband_check)
    creeping = values(double(1.0), double(1.2))
    assert stock(None, creeping, absolute(0.5)) is False


def test_a_change_of_status_alone_passes_the_deadband(deadband_check):
    # A STALE point: same value, now UncertainLastUsableValue. Must reach a deadband subscriber.
    stale = ua.DataValue(
        ua.Variant(1.0, ua.VariantType.Double),
        ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue),
    )
    assert deadband_check(None, values(GOOD, stale), absolute(0.5)) is True
    assert deadband_check(None, values(stale, GOOD), absolute(0.5)) is True
    stock = inspect.unwrap(deadband_check)
    assert stock(None, values(GOOD, stale), absolute(0.5)) is False  # why the fix exists


def test_applying_twice_wraps_once(deadband_check):
    fixes.apply()
    assert MonitoredItemService._is_deadband_exceeded is deadband_check


# -- the shared DataValue -------------------------------------------------------------------------


def test_a_shared_datavalue_is_its_own_copy():
    dv = SharedDataValue(ua.Variant(2.5, ua.VariantType.Double), ua.StatusCode(0))
    assert copy.deepcopy(dv) is dv
    assert copy.copy(dv) is dv
    assert isinstance(dv, ua.DataValue)
    assert not hasattr(dv, "__dict__")


def test_a_shared_datavalue_encodes_as_a_plain_one():
    fields = (ua.Variant(2.5, ua.VariantType.Double), ua.StatusCode(0x408F0000))
    assert struct_to_binary(SharedDataValue(*fields)) == struct_to_binary(ua.DataValue(*fields))


# -- properties -----------------------------------------------------------------------------------


def test_a_property_is_a_read_only_namespace_0_property_of_its_variable():
    variable = ua.NodeId("tank/level", 2)
    item = property_item(
        ua.NodeId("tank/level#X", 2), variable, "X", ua.Variant(1.5), ua.ObjectIds.Double
    )
    assert item.RequestedNewNodeId == ua.NodeId("tank/level#X", 2)
    assert item.ParentNodeId == variable
    assert item.BrowseName == ua.QualifiedName("X", 0)
    assert item.NodeClass == ua.NodeClass.Variable
    assert item.ReferenceTypeId == ua.NodeId(ua.ObjectIds.HasProperty)
    assert item.TypeDefinition == ua.NodeId(ua.ObjectIds.PropertyType)
    attrs = item.NodeAttributes
    assert attrs.DisplayName == ua.LocalizedText("X")
    assert attrs.DataType == ua.NodeId(ua.ObjectIds.Double)
    assert attrs.Value == ua.Variant(1.5)
    assert attrs.AccessLevel == attrs.UserAccessLevel == ua.AccessLevel.CurrentRead.mask


def test_eu_range_and_engineering_units_carry_their_structures():
    variable = ua.NodeId("v", 2)
    eu_range = eu_range_item(ua.NodeId("v.EURange", 2), variable, ua.Range(Low=0.0, High=5.0))
    assert eu_range.BrowseName == ua.QualifiedName("EURange", 0)
    assert eu_range.NodeAttributes.DataType == ua.NodeId(ua.ObjectIds.Range)
    assert eu_range.NodeAttributes.Value.VariantType == ua.VariantType.ExtensionObject
    assert eu_range.NodeAttributes.Value.Value == ua.Range(Low=0.0, High=5.0)
    units = eu_information("MTR", "m", "metre")
    item = engineering_units_item(ua.NodeId("v.EngineeringUnits", 2), variable, units)
    assert item.BrowseName == ua.QualifiedName("EngineeringUnits", 0)
    assert item.NodeAttributes.DataType == ua.NodeId(ua.ObjectIds.EUInformation)
    assert item.NodeAttributes.Value.Value == units


def test_eu_information_with_and_without_a_unece_code():
    known = eu_information("CEL", "°C", "degree Celsius")
    assert known.NamespaceUri == UNECE_NAMESPACE
    assert known.UnitId == unece_unit_id("CEL") == 0x43454C
    assert (known.DisplayName.Text, known.Description.Text) == ("°C", "degree Celsius")
    unknown = eu_information(None, "widgets/shift", "widgets/shift")
    assert unknown.NamespaceUri is None
    assert unknown.UnitId == -1
    assert unknown.DisplayName.Text == "widgets/shift"


@pytest.mark.parametrize("code", ["", "ABCD", "°C"])
def test_a_unece_code_has_1_to_3_ascii_characters(code):
    with pytest.raises(ValueError, match="1-3 ASCII"):
        unece_unit_id(code)


def test_units_load_without_asyncua():
    # Node maps that only describe units (plantsim.opcua.nodes) stay free of the OPC UA stack.
    code = "import sys, asyncua_glue.units; sys.exit('asyncua' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
