"""The simulated PLC's address space as AddNodes requests, built from a `NodeMap`.

A node map types every variable, so a value is coerced to its wire type once, here, instead of
being checked on every store (see `PlcServer._store`).
"""

from __future__ import annotations

import math

from asyncua import ua

from asyncua_glue.properties import engineering_units_item, eu_information, eu_range_item

from ..faults import Value
from .nodes import NodeSpec

VARIANT_TYPES = {
    "Double": ua.VariantType.Double,
    "Boolean": ua.VariantType.Boolean,
    "UInt32": ua.VariantType.UInt32,
    "String": ua.VariantType.String,
}
_ZERO: dict[str, Value] = {"Double": 0.0, "Boolean": False, "UInt32": 0, "String": ""}
_UINT32_MAX = 2**32 - 1


def object_item(identifier: str, idx: int, parent: ua.NodeId) -> ua.AddNodesItem:
    """Return the AddNodes request for an object `identifier` organised under `parent`."""
    item = ua.AddNodesItem()
    item.RequestedNewNodeId = ua.NodeId(identifier, idx)
    item.BrowseName = ua.QualifiedName(identifier, idx)
    item.NodeClass = ua.NodeClass.Object
    item.ParentNodeId = parent
    item.ReferenceTypeId = ua.NodeId(ua.ObjectIds.Organizes)
    item.TypeDefinition = ua.NodeId(ua.ObjectIds.BaseObjectType)
    attrs = ua.ObjectAttributes()
    attrs.DisplayName = ua.LocalizedText(identifier)
    attrs.Description = ua.LocalizedText(identifier)
    attrs.EventNotifier = 0
    item.NodeAttributes = attrs
    return item


def variable_items(
    identifier: str, spec: NodeSpec, idx: int, parent: ua.NodeId
) -> list[ua.AddNodesItem]:
    """Return the variable's request, and for an analog item its EngineeringUnits and EURange."""
    item = ua.AddNodesItem()
    nodeid = ua.NodeId(identifier, idx)
    item.RequestedNewNodeId = nodeid
    item.BrowseName = ua.QualifiedName(spec.name, idx)
    item.NodeClass = ua.NodeClass.Variable
    item.ParentNodeId = parent
    item.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HasComponent)
    item.TypeDefinition = ua.NodeId(
        ua.ObjectIds.AnalogItemType if spec.analog else ua.ObjectIds.BaseDataVariableType
    )
    attrs = ua.VariableAttributes()
    attrs.DisplayName = ua.LocalizedText(spec.name)
    attrs.Description = ua.LocalizedText(spec.description or spec.name)
    attrs.DataType = ua.NodeId(getattr(ua.ObjectIds, spec.datatype))
    attrs.Value = ua.Variant(
        coerce(spec.datatype, _ZERO[spec.datatype]), VARIANT_TYPES[spec.datatype]
    )
    attrs.ValueRank = ua.ValueRank.Scalar
    access = ua.AccessLevel.CurrentRead.mask
    if spec.writable:
        access |= ua.AccessLevel.CurrentWrite.mask
    attrs.AccessLevel = attrs.UserAccessLevel = access
    attrs.WriteMask = attrs.UserWriteMask = 0
    attrs.Historizing = False
    item.NodeAttributes = attrs
    items = [item]
    if spec.unit is not None and spec.eu_range is not None:
        unit = spec.unit
        units = eu_information(unit.code, unit.display, unit.description)
        low, high = spec.eu_range
        items.append(
            engineering_units_item(ua.NodeId(f"{identifier}.EngineeringUnits", idx), nodeid, units)
        )
        items.append(
            eu_range_item(
                ua.NodeId(f"{identifier}.EURange", idx), nodeid, ua.Range(Low=low, High=high)
            )
        )
    return items


def coerce(datatype: str, value: Value) -> Value:
    """Return `value` as the Python type of OPC UA `datatype`, clamped where the wire needs it."""
    if datatype == "Double":
        return float(value)
    if datatype == "Boolean":
        return bool(value)
    if datatype == "UInt32":
        # A spike or noise makes a counter fractional or negative; the wire type cannot be.
        number = float(value)
        return 0 if math.isnan(number) else min(max(round(number), 0), _UINT32_MAX)
    return str(value)
