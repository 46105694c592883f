"""The standard properties of an analog variable (EURange, EngineeringUnits) as AddNodes items.

Both servers add them in one AddNodes batch with the variable, so these build requests rather
than calling asyncua's `Node.add_property` one round trip at a time. Node ids are the caller's:
each server has its own scheme, and SCADA tags depend on it.
"""

from __future__ import annotations

from asyncua import ua

from .units import UNECE_NAMESPACE, unece_unit_id


def property_item(
    nodeid: ua.NodeId, parent: ua.NodeId, name: str, value: ua.Variant, datatype: int
) -> ua.AddNodesItem:
    """Return the AddNodes request for property `name` of the variable `parent`."""
    attrs = ua.VariableAttributes()
    attrs.DisplayName = ua.LocalizedText(name)
    attrs.Description = ua.LocalizedText(name)
    attrs.DataType = ua.NodeId(datatype)
    attrs.ValueRank = ua.ValueRank.Scalar
    attrs.ArrayDimensions = None
    attrs.Value = value
    # Read-only, and saying so: clients that honour AccessLevel do not read a 0 one.
    attrs.AccessLevel = attrs.UserAccessLevel = ua.AccessLevel.CurrentRead.mask
    return ua.AddNodesItem(
        ParentNodeId=parent,
        ReferenceTypeId=ua.NodeId(ua.ObjectIds.HasProperty),
        RequestedNewNodeId=nodeid,
        # Standard property names live in namespace 0 (OPC 10000-8 §5.3.2): `0:EURange`.
        BrowseName=ua.QualifiedName(name, 0),
        NodeClass=ua.NodeClass.Variable,
        NodeAttributes=attrs,
        TypeDefinition=ua.NodeId(ua.ObjectIds.PropertyType),
    )


def eu_range_item(nodeid: ua.NodeId, parent: ua.NodeId, eu_range: ua.Range) -> ua.AddNodesItem:
    """Return the AddNodes request for the EURange property of `parent`."""
    value = ua.Variant(eu_range, ua.VariantType.ExtensionObject)
    return property_item(nodeid, parent, "EURange", value, ua.ObjectIds.Range)


def engineering_units_item(
    nodeid: ua.NodeId, parent: ua.NodeId, units: ua.EUInformation
) -> ua.AddNodesItem:
    """Return the AddNodes request for the EngineeringUnits property of `parent`."""
    value = ua.Variant(units, ua.VariantType.ExtensionObject)
    return property_item(nodeid, parent, "EngineeringUnits", value, ua.ObjectIds.EUInformation)


def eu_information(code: str | None, display: str, description: str) -> ua.EUInformation:
    """Return EngineeringUnits for a UNECE common `code`, or for a display name alone (None)."""
    if code is None:
        # OPC 10000-8 §5.6.3: -1 when no UnitId is available.
        return ua.EUInformation(
            NamespaceUri=None,
            UnitId=-1,
            DisplayName=ua.LocalizedText(display),
            Description=ua.LocalizedText(description),
        )
    return ua.EUInformation(
        NamespaceUri=UNECE_NAMESPACE,
        UnitId=unece_unit_id(code),
        DisplayName=ua.LocalizedText(display),
        Description=ua.LocalizedText(description),
    )
