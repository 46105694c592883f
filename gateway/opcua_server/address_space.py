"""The OPC UA view of the twin, planned by pure functions: folders, variables, units, status codes.

Layout: one folder per path segment, the way the point ids read (ISA-95 style), under Objects:

    Objects/utilities/cooling/tank1/level      point `utilities/cooling/tank1/level`

NodeIds are strings in the server's own namespace (index 2, NAMESPACE_URI), equal to the path:
`ns=2;s=utilities/cooling/tank1` for the asset folder, `ns=2;s=utilities/cooling/tank1/level` for
the point, and `ns=2;s=utilities/cooling/tank1/level#EURange` / `…#EngineeringUnits` for its
properties. They depend on nothing but the point ids, so SCADA tags survive restarts.

Numeric points with an engineering range are AnalogItemType (EURange, and EngineeringUnits when
the point has a unit); other numeric points are BaseAnalogType; bools and strings are
BaseDataVariableType. Units map to UNECE Recommendation 20 codes where the unit is a common one
(`°C` → CEL); any other unit is published with its display name only (UnitId -1).

Quality maps to OPC UA status codes, and a twin value to the DataValue a client reads, once per
twin change, so both stay small.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from asyncua import ua

from asyncua_glue.datavalue import SharedDataValue
from asyncua_glue.properties import engineering_units_item, eu_range_item
from asyncua_glue.properties import eu_information as unit_information
from drivers.opcua.convert import INTEGER_RANGES, POINT_DATATYPES
from gateway.errors import ConfigError
from gateway.twin.model import PointDef, PointValue, Quality

__all__ = [
    "NAMESPACE_URI",
    "AddressSpacePlan",
    "FolderPlan",
    "VariablePlan",
    "add_nodes_items",
    "datavalue",
    "eu_information",
    "plan_address_space",
    "status_of",
    "variant_type_of",
]

NAMESPACE_URI = "urn:opstwin:twin"

# Integer ranges are the OPC UA driver's: one table for both directions.
_INT_LIMITS = INTEGER_RANGES
_FLOATS = (ua.VariantType.Float, ua.VariantType.Double)

# Unit as written in point configs → (UNECE common code, UNECE name). Spelling variants that
# engineers type (m3/h for m³/h, degC for °C) map to the same code; the DisplayName stays as
# written in the config, which is what the plant's people recognise.
_UNECE: dict[str, tuple[str, str]] = {
    "°C": ("CEL", "degree Celsius"),
    "degC": ("CEL", "degree Celsius"),
    "°F": ("FAH", "degree Fahrenheit"),
    "degF": ("FAH", "degree Fahrenheit"),
    "K": ("KEL", "kelvin"),
    "%": ("P1", "percent"),
    "ppm": ("59", "part per million"),
    "m": ("MTR", "metre"),
    "cm": ("CMT", "centimetre"),
    "mm": ("MMT", "millimetre"),
    "km": ("KMT", "kilometre"),
    "m/s": ("MTS", "metre per second"),
    "mm/s": ("C16", "millimetre per second"),
    "m/s²": ("MSK", "metre per second squared"),
    "m/s2": ("MSK", "metre per second squared"),
    "l": ("LTR", "litre"),
    "L": ("LTR", "litre"),
    "m³": ("MTQ", "cubic metre"),
    "m3": ("MTQ", "cubic metre"),
    "m³/h": ("MQH", "cubic metre per hour"),
    "m3/h": ("MQH", "cubic metre per hour"),
    "m³/s": ("MQS", "cubic metre per second"),
    "m3/s": ("MQS", "cubic metre per second"),
    "l/min": ("L2", "litre per minute"),
    "L/min": ("L2", "litre per minute"),
    "g": ("GRM", "gram"),
    "kg": ("KGM", "kilogram"),
    "t": ("TNE", "tonne"),
    "kg/h": ("E93", "kilogram per hour"),
    "kg/s": ("KGS", "kilogram per second"),
    "Pa": ("PAL", "pascal"),
    "kPa": ("KPA", "kilopascal"),
    "MPa": ("MPA", "megapascal"),
    "mbar": ("MBR", "millibar"),
    "bar": ("BAR", "bar"),
    "psi": ("PS", "pound-force per square inch"),
    "W": ("WTT", "watt"),
    "kW": ("KWT", "kilowatt"),
    "MW": ("MAW", "megawatt"),
    "Wh": ("WHR", "watt hour"),
    "kWh": ("KWH", "kilowatt hour"),
    "MWh": ("MWH", "megawatt hour"),
    "VA": ("D46", "volt - ampere"),
    "kVA": ("KVA", "kilovolt - ampere"),
    "kvar": ("KVR", "kilovar"),
    "V": ("VLT", "volt"),
    "mV": ("2Z", "millivolt"),
    "kV": ("KVT", "kilovolt"),
    "A": ("AMP", "ampere"),
    "mA": ("4K", "milliampere"),
    "Hz": ("HTZ", "hertz"),
    "rpm": ("RPM", "revolutions per minute"),
    "r/min": ("RPM", "revolutions per minute"),
    "ms": ("C26", "millisecond"),
    "s": ("SEC", "second"),
    "min": ("MIN", "minute"),
    "h": ("HUR", "hour"),
    "J": ("JOU", "joule"),
    "kJ": ("KJO", "kilojoule"),
    "N": ("NEU", "newton"),
    "N·m": ("NU", "newton metre"),
    "Nm": ("NU", "newton metre"),
    "°": ("DD", "degree [unit of angle]"),
}


# -- planning ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FolderPlan:
    """A folder for one path prefix (`area`, `area/line`, `area/line/asset`)."""

    path: str
    name: str
    parent: str | None  # None: directly under Objects


@dataclass(frozen=True, slots=True)
class VariablePlan:
    """A variable for one point, with its type and engineering properties."""

    point_id: str
    name: str
    parent: str
    description: str
    variant_type: ua.VariantType
    type_definition: int  # ua.ObjectIds.*
    writable: bool
    engineering_units: ua.EUInformation | None
    eu_range: ua.Range | None


@dataclass(frozen=True, slots=True)
class AddressSpacePlan:
    """Everything the server adds to its namespace: folders first (parents before children)."""

    folders: list[FolderPlan]
    variables: list[VariablePlan]


def plan_address_space(points: Iterable[PointDef]) -> AddressSpacePlan:
    """Plan folders and variables for `points`; ConfigError if two ids cannot both be nodes."""
    folders: dict[str, FolderPlan] = {}
    variables: list[VariablePlan] = []
    point_ids: set[str] = set()
    for point in points:
        if point.id in point_ids:
            raise ConfigError(f"point {point.id!r} is declared twice")
        point_ids.add(point.id)
        segments = point.id.split("/")
        if len(segments) < 2 or not all(segments):
            raise ConfigError(f"point id {point.id!r} is not a path `asset/…/signal`")
        parent: str | None = None
        for depth in range(1, len(segments)):
            path = "/".join(segments[:depth])
            if path not in folders:
                folders[path] = FolderPlan(path, segments[depth - 1], parent)
            parent = path
        assert parent is not None
        variables.append(_variable(point, segments[-1], parent))
    # A point id that is also another point's folder would be one NodeId for two nodes.
    clashes = sorted(point_ids & folders.keys())
    if clashes:
        inside = next(p for p in sorted(point_ids) if p.startswith(clashes[0] + "/"))
        raise ConfigError(
            f"point {clashes[0]!r} is also the folder of point {inside!r}: an OPC UA node "
            "cannot be both; rename one of them"
        )
    return AddressSpacePlan(list(folders.values()), variables)


def variant_type_of(datatype: str) -> ua.VariantType:
    """The OPC UA built-in type of a point datatype (`float32` → Float, `bool` → Boolean)."""
    try:
        return POINT_DATATYPES[datatype]
    except KeyError:
        known = ", ".join(POINT_DATATYPES)
        raise ConfigError(f"datatype {datatype!r} has no OPC UA type (known: {known})") from None


def eu_information(unit: str) -> ua.EUInformation | None:
    """EngineeringUnits for `unit`: its UNECE code when known, else the display name alone."""
    unit = unit.strip()
    if not unit:
        return None
    code, name = _UNECE.get(unit, (None, unit))
    return unit_information(code, unit, name)


def _variable(point: PointDef, name: str, parent: str) -> VariablePlan:
    vtype = variant_type_of(point.datatype)
    numeric = vtype in _INT_LIMITS or vtype in _FLOATS
    eu_range = None
    if numeric and point.lo is not None and point.hi is not None:
        eu_range = ua.Range(Low=float(point.lo), High=float(point.hi))
    if eu_range is not None:
        type_definition = ua.ObjectIds.AnalogItemType
    elif numeric:
        type_definition = ua.ObjectIds.BaseAnalogType
    else:
        type_definition = ua.ObjectIds.BaseDataVariableType
    return VariablePlan(
        point_id=point.id,
        name=name,
        parent=parent,
        description=point.description,
        variant_type=vtype,
        type_definition=type_definition,
        writable=point.writable,
        engineering_units=eu_information(point.unit) if numeric else None,
        eu_range=eu_range,
    )


# -- nodes ---------------------------------------------------------------------------------------


def add_nodes_items(plan: AddressSpacePlan, ns: int) -> list[ua.AddNodesItem]:
    """The AddNodes requests that create `plan` in namespace `ns`, parents first."""
    items: list[ua.AddNodesItem] = []
    for folder in plan.folders:
        parent = (
            ua.NodeId(ua.ObjectIds.ObjectsFolder)
            if folder.parent is None
            else ua.NodeId(folder.parent, ns)
        )
        attrs = ua.ObjectAttributes()
        attrs.DisplayName = ua.LocalizedText(folder.name)
        attrs.Description = ua.LocalizedText(folder.path)
        attrs.EventNotifier = 0
        items.append(
            ua.AddNodesItem(
                ParentNodeId=parent,
                ReferenceTypeId=ua.NodeId(ua.ObjectIds.Organizes),
                RequestedNewNodeId=ua.NodeId(folder.path, ns),
                BrowseName=ua.QualifiedName(folder.name, ns),
                NodeClass=ua.NodeClass.Object,
                NodeAttributes=attrs,
                TypeDefinition=ua.NodeId(ua.ObjectIds.FolderType),
            )
        )
    for var in plan.variables:
        nodeid = ua.NodeId(var.point_id, ns)
        access = ua.AccessLevel.CurrentRead.mask
        if var.writable:
            # Clients see they may try; the server still refuses (see server.py).
            access |= ua.AccessLevel.CurrentWrite.mask
        attrs = ua.VariableAttributes()
        attrs.DisplayName = ua.LocalizedText(var.name)
        attrs.Description = ua.LocalizedText(var.description or var.point_id)
        attrs.DataType = ua.NodeId(var.variant_type.value)
        attrs.ValueRank = ua.ValueRank.Scalar
        attrs.ArrayDimensions = None
        attrs.AccessLevel = access
        # Read-only for any session until its role says otherwise: the server answers a read of
        # UserAccessLevel per session (server.py), so a viewer is never told it may write.
        attrs.UserAccessLevel = ua.AccessLevel.CurrentRead.mask
        attrs.WriteMask = 0
        attrs.UserWriteMask = 0
        attrs.Historizing = False
        attrs.Value = ua.Variant(None, ua.VariantType.Null)
        items.append(
            ua.AddNodesItem(
                ParentNodeId=ua.NodeId(var.parent, ns),
                ReferenceTypeId=ua.NodeId(ua.ObjectIds.Organizes),
                RequestedNewNodeId=nodeid,
                BrowseName=ua.QualifiedName(var.name, ns),
                NodeClass=ua.NodeClass.Variable,
                NodeAttributes=attrs,
                TypeDefinition=ua.NodeId(var.type_definition),
            )
        )
        if var.eu_range is not None:
            prop = ua.NodeId(f"{var.point_id}#EURange", ns)
            items.append(eu_range_item(prop, nodeid, var.eu_range))
        if var.engineering_units is not None:
            prop = ua.NodeId(f"{var.point_id}#EngineeringUnits", ns)
            items.append(engineering_units_item(prop, nodeid, var.engineering_units))
    return items


# -- values --------------------------------------------------------------------------------------

_S = ua.StatusCodes
# Status codes a driver may name at the start of its reason (`"BadSensorFailure: …"`), e.g. the
# OPC UA driver passing on what the PLC said. Anything else falls back to the table below.
_NAMED = {name: code for name, code in vars(_S).items() if isinstance(code, int) and code}


def status_of(
    quality: Quality,
    value: Any,
    reason: str | None = None,
    lo: float | None = None,
    hi: float | None = None,
) -> int:
    """The OPC UA status code of a twin value.

    GOOD      → Good
    UNCERTAIN → UncertainEngineeringUnitsExceeded when the number is outside [lo, hi], else
                Uncertain
    BAD       → BadWaitingForInitialData (never heard from), BadNoCommunication (device never
                reached), else Bad
    STALE     → UncertainLastUsableValue: the device is unreachable and the value is the last
                one read; BadNoCommunication if there is no value at all
    A reason that starts with a status code name of the same severity (`BadSensorFailure: …`)
    passes that code through. Any status but Bad needs a value: without one it becomes Bad.
    """
    if quality is Quality.GOOD:
        return _S.Good if value is not None else _S.Bad
    named = _named_code(reason)
    if quality is Quality.UNCERTAIN:
        if value is None:
            return _S.Bad
        if named is not None and named & 0xC0000000 == _S.Uncertain:
            return named
        if _outside(value, lo, hi):
            return _S.UncertainEngineeringUnitsExceeded
        return _S.Uncertain
    if quality is Quality.STALE:
        return _S.UncertainLastUsableValue if value is not None else _S.BadNoCommunication
    if named is not None and named & 0xC0000000 == _S.Bad:
        return named
    if reason:
        if reason.startswith("waiting for initial data"):
            return _S.BadWaitingForInitialData
        if reason.startswith("device disconnected"):
            return _S.BadNoCommunication
    return _S.Bad


def datavalue(
    change: PointValue,
    variant_type: ua.VariantType,
    *,
    lo: float | None = None,
    hi: float | None = None,
    last_source: datetime | None = None,
    now: float | None = None,
) -> SharedDataValue:
    """The DataValue a client reads for a twin value.

    SourceTimestamp is the device's time; a STALE value without one keeps `last_source` (the time
    of the last usable value), and a status the gateway itself decided (a lost connection) without
    one takes the gateway's time. ServerTimestamp is when the twin accepted the change.
    """
    status = status_of(change.quality, change.value, change.reason, lo, hi)
    variant = None
    if status & 0x80000000 == 0:
        variant = _variant(change.value, variant_type)
        if variant is None:
            status = _S.BadTypeMismatch
    server_ts = change.gateway_ts or now
    source: datetime | None
    if change.source_ts is not None:
        source = _utc(change.source_ts)
    elif change.quality is Quality.STALE and last_source is not None:
        source = last_source
    else:
        source = _utc(server_ts) if server_ts else None
    return SharedDataValue(
        Value=variant if variant is not None else ua.Variant(None, ua.VariantType.Null),
        StatusCode=ua.StatusCode(status),
        SourceTimestamp=source,
        ServerTimestamp=_utc(server_ts) if server_ts else None,
    )


def _variant(value: Any, vtype: ua.VariantType) -> ua.Variant | None:
    """A Variant of exactly `vtype`, or None when the value cannot be one."""
    try:
        if vtype in _FLOATS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                return None
            value = float(value)
        elif vtype is ua.VariantType.Boolean:
            if not isinstance(value, bool | int):
                return None
            value = bool(value)
        elif vtype is ua.VariantType.String:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            elif not isinstance(value, str):
                value = str(value)
        else:
            if isinstance(value, float):
                # A scaled point declared with its raw integer type holds floats in the twin.
                if not value.is_integer():
                    return None
                value = int(value)
            elif isinstance(value, bool) or not isinstance(value, int):
                return None
            low, high = _INT_LIMITS[vtype]
            if not low <= value <= high:
                return None
    except (TypeError, ValueError, OverflowError):
        return None
    return ua.Variant(value, vtype)


def _named_code(reason: str | None) -> int | None:
    if not reason or not reason.startswith(("Bad", "Uncertain")):
        return None
    word = reason.split(None, 1)[0].rstrip(":,;.")
    return _NAMED.get(word)


def _outside(value: Any, lo: float | None, hi: float | None) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return (lo is not None and value < lo) or (hi is not None and value > hi)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
