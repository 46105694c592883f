"""OPC UA values to twin samples and back. Pure: no I/O, no asyncio.

- `status_quality(code)`: an OPC UA StatusCode as twin quality and a reason (its name);
- `sample_of(key, datavalue, lo, hi)`: one DataValue as a `Sample` (quality from the status
  and the engineering range, value as a plain Python value, source timestamp in epoch seconds);
- `to_variant(value, variant_type)`: a value to write, checked and converted to the node's type;
- `variant_type_of(datatype)`: the builtin encoding of a DataType node id, when it is known
  without asking the server;
- `datatype_mismatch(node_type, point_datatype)`: why a node's values would not survive in a
  point of the configured datatype (cut, rounded, another kind), or None.
"""

from __future__ import annotations

import math
import struct
import uuid
from datetime import datetime
from enum import IntEnum
from typing import Any

from asyncua import ua
from asyncua.ua.status_codes import code_to_name_doc

from drivers.contract import Quality, Sample
from drivers.quality import assess

__all__ = [
    "INTEGER_RANGES",
    "POINT_DATATYPES",
    "ConversionError",
    "datatype_mismatch",
    "sample_of",
    "source_time",
    "status_name",
    "status_quality",
    "to_variant",
    "twin_value",
    "values_match",
    "variant_type_of",
]

_SEVERITY = 0xC0000000
_UNCERTAIN = 0x40000000
# The low 16 bits of a StatusCode are info bits (overflow, limits, …): not part of its name.
_CODE = 0xFFFF0000

INTEGER_RANGES: dict[ua.VariantType, tuple[int, int]] = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1),
    ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1),
    ua.VariantType.UInt64: (0, 2**64 - 1),
}
_FLOAT32_MAX = 3.4028234663852886e38

#: A point's configured datatype (the twin's) and the OPC UA builtin type that holds it exactly.
POINT_DATATYPES: dict[str, ua.VariantType] = {
    "bool": ua.VariantType.Boolean,
    "int16": ua.VariantType.Int16,
    "uint16": ua.VariantType.UInt16,
    "int32": ua.VariantType.Int32,
    "uint32": ua.VariantType.UInt32,
    "int64": ua.VariantType.Int64,
    "uint64": ua.VariantType.UInt64,
    "float32": ua.VariantType.Float,
    "float64": ua.VariantType.Double,
    "string": ua.VariantType.String,
}
# Largest integer magnitude a float holds exactly: 24- and 53-bit significands.
_EXACT_INTEGERS = {ua.VariantType.Float: 2**24, ua.VariantType.Double: 2**53}
# Node types whose values the twin holds as text (`twin_value`).
_TEXTUAL = frozenset(
    {
        ua.VariantType.String,
        ua.VariantType.LocalizedText,
        ua.VariantType.QualifiedName,
        ua.VariantType.NodeId,
        ua.VariantType.ExpandedNodeId,
        ua.VariantType.Guid,
        ua.VariantType.XmlElement,
        ua.VariantType.StatusCode,
    }
)

# Standard DataTypes that are not builtin types themselves but always encode as one.
_WELL_KNOWN: dict[int, ua.VariantType] = {
    ua.ObjectIds.Duration: ua.VariantType.Double,
    ua.ObjectIds.UtcTime: ua.VariantType.DateTime,
    ua.ObjectIds.IntegerId: ua.VariantType.UInt32,
    ua.ObjectIds.Counter: ua.VariantType.UInt32,
    ua.ObjectIds.Index: ua.VariantType.UInt32,
    ua.ObjectIds.VersionTime: ua.VariantType.UInt32,
    ua.ObjectIds.LocaleId: ua.VariantType.String,
    ua.ObjectIds.NumericRange: ua.VariantType.String,
    ua.ObjectIds.NormalizedString: ua.VariantType.String,
    ua.ObjectIds.DecimalString: ua.VariantType.String,
    ua.ObjectIds.DurationString: ua.VariantType.String,
    ua.ObjectIds.TimeString: ua.VariantType.String,
    ua.ObjectIds.DateString: ua.VariantType.String,
    ua.ObjectIds.Enumeration: ua.VariantType.Int32,
}
# Abstract DataTypes: the value's own encoding decides (read it from the node's current value).
ABSTRACT_DATATYPES = frozenset(
    {ua.ObjectIds.BaseDataType, ua.ObjectIds.Number, ua.ObjectIds.Integer, ua.ObjectIds.UInteger}
)


class ConversionError(ValueError):
    """A value that cannot be written to a node of the given type; the message says why."""


# -- status codes -------------------------------------------------------------------------------


def status_name(code: int) -> str:
    """Return the symbolic name of a StatusCode, e.g. `BadSensorFailure`."""
    entry = code_to_name_doc.get(code & _CODE)
    if entry is not None:
        return entry[0]
    severity = code & _SEVERITY
    kind = "Good" if severity == 0 else ("Uncertain" if severity == _UNCERTAIN else "Bad")
    return f"{kind} (0x{code:08X})"


def status_quality(code: int) -> tuple[Quality, str | None]:
    """Map a StatusCode to (quality, reason): Good→GOOD, Uncertain*→UNCERTAIN, Bad*→BAD.

    The reason is the status name; plain `Good` has none. Severity 11 (reserved) counts as
    Bad, as the specification asks.
    """
    severity = code & _SEVERITY
    if severity == 0:
        return Quality.GOOD, (None if code & _CODE == 0 else status_name(code))
    if severity == _UNCERTAIN:
        return Quality.UNCERTAIN, status_name(code)
    return Quality.BAD, status_name(code)


# -- reading ------------------------------------------------------------------------------------

_PLAIN = frozenset({float, int, str, bool})


def twin_value(value: Any) -> Any:
    """Return a value the twin can store (number, bool, text, bytes); raise ValueError if none."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, IntEnum):
        return int(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, ua.LocalizedText):
        return value.Text
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, ua.NodeId | ua.QualifiedName):
        return value.to_string()
    if isinstance(value, ua.StatusCode):
        return status_name(value.value)
    if isinstance(value, ua.XmlElement):
        return value.Value
    if isinstance(value, list | tuple):
        raise ValueError(f"arrays are not supported (got {len(value)} elements)")
    raise ValueError(f"values of type {kind.__name__} are not supported")


def source_time(dv: ua.DataValue) -> float | None:
    """Return the SourceTimestamp in epoch seconds, else the ServerTimestamp, else None.

    A timestamp at or before 1970 is "not set" (servers send the OPC UA minimum, 1601-01-01).
    """
    ts = dv.SourceTimestamp
    if ts is not None:
        seconds = ts.timestamp()
        if seconds > 0:
            return seconds
    ts = dv.ServerTimestamp
    if ts is not None:
        seconds = ts.timestamp()
        if seconds > 0:
            return seconds
    return None


def sample_of(key: str, dv: ua.DataValue, lo: float | None, hi: float | None) -> Sample:
    """Turn one DataValue of a point into a Sample (quality, value, source timestamp).

    Good status: the value's own quality (`drivers.quality.assess`: outside [lo, hi] is
    UNCERTAIN, not finite is BAD; a Good status with info bits keeps its name as reason).
    Uncertain status: UNCERTAIN with the status name, value kept. Bad status: BAD with the
    status name and no value (the twin keeps the last one).
    """
    status = dv.StatusCode
    code = 0 if status is None else status.value
    ts = source_time(dv)
    if code == 0:
        # The common case, kept short: this runs for every notification (tens of thousands
        # a second on a big PLC). Same rules as below and as `assess`.
        variant = dv.Value
        raw = None if variant is None else variant.Value
        if (
            type(raw) is float
            and raw - raw == 0.0  # finite: inf - inf and nan - nan are nan
            and (lo is None or raw >= lo)
            and (hi is None or raw <= hi)
        ):
            return Sample(key, raw, Quality.GOOD, ts, None)
    if code & 0x80000000:
        return Sample(key, None, Quality.BAD, ts, status_name(code))
    variant = dv.Value
    raw = None if variant is None else variant.Value
    try:
        value = raw if type(raw) in _PLAIN else twin_value(raw)
    except ValueError as exc:
        return Sample(key, None, Quality.BAD, ts, str(exc))
    if code & _UNCERTAIN:
        if value is not None and assess(value)[0] is Quality.BAD:
            return Sample(key, None, Quality.BAD, ts, assess(value)[1])
        return Sample(key, value, Quality.UNCERTAIN, ts, status_name(code))
    if value is None:
        return Sample(key, None, Quality.BAD, ts, "no value (null) with a Good status")
    quality, reason = assess(value, lo, hi)
    if quality is Quality.BAD:
        return Sample(key, None, quality, ts, reason)
    if code and reason is None:
        reason = status_name(code)
    return Sample(key, value, quality, ts, reason)


# -- writing ------------------------------------------------------------------------------------


def variant_type_of(datatype: ua.NodeId) -> ua.VariantType | None:
    """Return the builtin encoding of a DataType node id, or None if only the server knows.

    Builtin types (ns=0, i=1..25) are their own encoding; a few standard subtypes (Duration,
    UtcTime, Counter, Enumeration, …) are listed. Abstract types (BaseDataType, Number, …) and
    vendor types return None: the caller asks the server (supertypes or the current value).
    """
    if datatype.NamespaceIndex != 0 or not isinstance(datatype.Identifier, int):
        return None
    ident = datatype.Identifier
    if 1 <= ident <= 25 and ident not in ABSTRACT_DATATYPES:
        return ua.VariantType(ident)
    return _WELL_KNOWN.get(ident)


def datatype_mismatch(node: ua.VariantType, point: str) -> str | None:
    """Why values of a node of builtin type `node` do not fit a point of datatype `point`.

    None when every value of the node's type is held exactly (the same type, or a wider one:
    Int16 into int32 or float64). Otherwise a reason naming both types and what would happen,
    e.g. "node is UInt32, point is int16: values would be cut". `point` is a key of
    POINT_DATATYPES.
    """
    loss = _loss(node, POINT_DATATYPES[point])
    return None if loss is None else f"node is {node.name}, point is {point}: {loss}"


def _loss(node: ua.VariantType, target: ua.VariantType) -> str | None:
    if node is target:
        return None
    if target is ua.VariantType.Boolean:
        return "values are not true/false"
    if target is ua.VariantType.String:
        return None if node in _TEXTUAL else "values are not text"
    if node is ua.VariantType.DateTime:
        node = ua.VariantType.Double  # the twin holds a time as epoch seconds (`twin_value`)
    if node in INTEGER_RANGES:
        low, high = INTEGER_RANGES[node]
        if target in INTEGER_RANGES:
            t_low, t_high = INTEGER_RANGES[target]
            return None if t_low <= low and high <= t_high else "values would be cut"
        return (
            None if max(-low, high) <= _EXACT_INTEGERS[target] else "large values would be rounded"
        )
    if node in _EXACT_INTEGERS:  # Float or Double
        if target in INTEGER_RANGES:
            return "fractions would be cut"
        return (
            "precision would be lost" if _EXACT_INTEGERS[node] > _EXACT_INTEGERS[target] else None
        )
    if node is ua.VariantType.String:
        return "text is not a number"
    if node is ua.VariantType.Boolean:
        return "true/false is not a number"
    return "values are not numbers"


def to_variant(value: Any, vtype: ua.VariantType) -> ua.Variant:
    """Convert a value to a Variant of `vtype`; raise ConversionError saying why not.

    Integer types take ints, and floats only when integral (5.0, not 5.5), within the type's
    range. Float and Double take finite numbers (Float within its range). Boolean takes
    true/false (or 0/1). String takes text. Nothing else is converted: a wrong type is refused
    rather than guessed.
    """
    name = vtype.name
    if vtype is ua.VariantType.Boolean:
        if isinstance(value, bool):
            return ua.Variant(value, vtype)
        if type(value) is int and value in (0, 1):
            return ua.Variant(bool(value), vtype)
        raise ConversionError(f"a Boolean node takes true/false (or 0/1), not {value!r}")
    if vtype is ua.VariantType.String:
        if isinstance(value, str):
            return ua.Variant(value, vtype)
        raise ConversionError(f"a String node takes text, not {type(value).__name__}")
    if vtype in INTEGER_RANGES:
        number = _number(value, name)
        if isinstance(number, float):
            if not math.isfinite(number):
                raise ConversionError(f"{value!r} is not a finite number")
            if not number.is_integer():
                raise ConversionError(f"a node of type {name} takes whole numbers, not {value!r}")
            number = int(number)
        low, high = INTEGER_RANGES[vtype]
        if not low <= number <= high:
            raise ConversionError(f"{value!r} is outside the {name} range [{low}, {high}]")
        return ua.Variant(number, vtype)
    if vtype in (ua.VariantType.Float, ua.VariantType.Double):
        number = float(_number(value, name))
        if not math.isfinite(number):
            raise ConversionError(f"{value!r} is not a finite number")
        if vtype is ua.VariantType.Float and abs(number) > _FLOAT32_MAX:
            raise ConversionError(f"{value!r} is outside the Float range")
        return ua.Variant(number, vtype)
    raise ConversionError(f"writing {name} nodes is not supported")


def values_match(vtype: ua.VariantType, written: Any, read_back: Any) -> bool:
    """True if the value read back is the value written, as the node stores it.

    A Float node stores 32 bits: both sides are compared after rounding to float32.
    """
    if vtype is ua.VariantType.Float:
        if isinstance(read_back, bool) or not isinstance(read_back, int | float):
            return False
        return _float32(float(written)) == _float32(float(read_back))
    if vtype is ua.VariantType.Boolean:
        return isinstance(read_back, bool) and read_back == bool(written)
    if isinstance(written, bool) != isinstance(read_back, bool):
        return False
    return bool(type(read_back) in _PLAIN and read_back == written)


def _number(value: Any, name: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConversionError(f"a node of type {name} takes a number, not {type(value).__name__}")
    return value


def _float32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]
