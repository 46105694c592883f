"""An OPC UA point as the driver sees it, its node id syntax, and the pure checks on both."""

from __future__ import annotations

import base64
import binascii
import math
import re
import uuid
from dataclasses import dataclass
from typing import Literal

from asyncua import ua

from drivers.errors import PointError
from drivers.opcua.convert import POINT_DATATYPES

__all__ = ["NodeRef", "OpcuaPoint", "PointError", "parse_node_id", "validate_point"]

IdKind = Literal["i", "s", "g", "b"]

_UINT32_MAX = 2**32 - 1
_DIGITS = re.compile(r"[0-9]{1,10}")
_GUID = re.compile(r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")
_SYNTAX = (
    "expected [ns=<index>;|nsu=<namespace URI>;]<i|s|g|b>=<identifier>, "
    "e.g. ns=2;s=Oven1.Temperature, i=2258 or nsu=urn:vendor:plc;s=Oven1.Temperature"
)


@dataclass(frozen=True, slots=True)
class NodeRef:
    """A parsed node id: its namespace (by index, or by URI resolved at connect) and identifier."""

    kind: IdKind
    identifier: int | str | uuid.UUID | bytes
    namespace: int = 0
    namespace_uri: str | None = None

    def to_nodeid(self, namespace: int | None = None) -> ua.NodeId:
        """Return the asyncua NodeId, with `namespace` as the index a URI resolved to."""
        index = self.namespace if namespace is None else namespace
        kinds = {
            "i": ua.NodeIdType.Numeric,
            "s": ua.NodeIdType.String,
            "g": ua.NodeIdType.Guid,
            "b": ua.NodeIdType.ByteString,
        }
        return ua.NodeId(self.identifier, index, kinds[self.kind])

    def __str__(self) -> str:
        prefix = (
            f"nsu={self.namespace_uri};"
            if self.namespace_uri is not None
            else (f"ns={self.namespace};" if self.namespace else "")
        )
        if self.kind == "b":
            assert isinstance(self.identifier, bytes)
            text = base64.b64encode(self.identifier).decode("ascii")
        else:
            text = str(self.identifier)
        return f"{prefix}{self.kind}={text}"


def parse_node_id(text: str) -> NodeRef:
    """Parse the OPC UA string form of a node id; raise ValueError naming what is wrong.

    `ns=<0..65535>;` or `nsu=<uri>;` (optional, not both), then exactly one of `i=<0..2^32-1>`,
    `s=<text>` (the rest of the string, `;` and `=` included), `g=<GUID>`, `b=<base64>`.
    """
    if not isinstance(text, str):
        raise ValueError(f"a node id is text, got {text!r}")
    rest = text.strip()
    if not rest:
        raise ValueError(f"empty node id: {_SYNTAX}")
    namespace = 0
    namespace_uri: str | None = None
    seen_namespace = False
    # The namespace part comes first; everything after the identifier key belongs to it
    # (string identifiers may contain ';' and '=').
    while True:
        head, sep, tail = rest.partition("=")
        key = head.strip()
        if not sep:
            raise ValueError(f"{text!r}: no '=' in {rest!r}: {_SYNTAX}")
        if key in ("ns", "nsu"):
            value, semi, after = tail.partition(";")
            if not semi:
                raise ValueError(f"{text!r}: {key}= must be followed by ';' and an identifier")
            if seen_namespace:
                raise ValueError(f"{text!r}: give the namespace once, as ns= or nsu=")
            seen_namespace = True
            if key == "ns":
                if not _DIGITS.fullmatch(value.strip()) or int(value) > 65535:
                    raise ValueError(
                        f"{text!r}: namespace index must be a number 0..65535, got {value!r}"
                    )
                namespace = int(value)
            else:
                if not value.strip():
                    raise ValueError(f"{text!r}: nsu= needs a namespace URI")
                namespace_uri = value.strip()
            rest = after
            continue
        if key not in ("i", "s", "g", "b"):
            raise ValueError(f"{text!r}: unknown key {key!r}: {_SYNTAX}")
        kind: IdKind = key  # type: ignore[assignment]
        return NodeRef(kind, _identifier(text, kind, tail), namespace, namespace_uri)


def _identifier(text: str, kind: IdKind, value: str) -> int | str | uuid.UUID | bytes:
    if kind == "i":
        raw = value.strip()
        if not _DIGITS.fullmatch(raw) or int(raw) > _UINT32_MAX:
            raise ValueError(f"{text!r}: i= needs a number 0..{_UINT32_MAX}, got {value!r}")
        return int(raw)
    if kind == "s":
        if not value:
            raise ValueError(f"{text!r}: s= needs a non-empty string identifier")
        return value
    if kind == "g":
        raw = value.strip()
        if not _GUID.match(raw):
            raise ValueError(
                f"{text!r}: g= needs a GUID like 72962b91-fa75-4ae6-8d28-b404dc7daf63, "
                f"got {value!r}"
            )
        return uuid.UUID(raw)
    raw = value.strip()
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        data = b""
    if not data:
        raise ValueError(f"{text!r}: b= needs non-empty base64 (e.g. b=M/RbKBsRVkePCePcx24oRA==)")
    return data


@dataclass(frozen=True, slots=True, init=False)
class OpcuaPoint:
    """One point: an opaque key, the node it reads, its limits and subscription overrides.

    `node_id` may be given as text and is parsed (a bad one is a config error). `lo`/`hi` are
    engineering limits: values outside them are UNCERTAIN, writes outside them are refused.
    `deadband` (absolute), `sampling_interval_ms` and `queue_size` None take the device
    options' values. `datatype` (the twin's: int16, float64, …) is checked against the node's
    DataType at each connect; None checks nothing.
    """

    key: str
    node_id: NodeRef
    lo: float | None
    hi: float | None
    writable: bool
    deadband: float | None
    sampling_interval_ms: float | None
    queue_size: int | None
    datatype: str | None

    # Written out rather than generated: it takes the text form a config hands over, while
    # the attribute is always a parsed NodeRef, so readers need no checks.
    def __init__(
        self,
        key: str,
        node_id: NodeRef | str,
        lo: float | None = None,
        hi: float | None = None,
        writable: bool = False,
        deadband: float | None = None,
        sampling_interval_ms: float | None = None,
        queue_size: int | None = None,
        datatype: str | None = None,
    ) -> None:
        """Parse a textual node id, then check the point's settings."""
        if isinstance(node_id, str):
            try:
                node_id = parse_node_id(node_id)
            except ValueError as exc:
                raise PointError("node_id", str(exc)) from None
        fields = {
            "key": key,
            "node_id": node_id,
            "lo": lo,
            "hi": hi,
            "writable": writable,
            "deadband": deadband,
            "sampling_interval_ms": sampling_interval_ms,
            "queue_size": queue_size,
            "datatype": datatype,
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)  # frozen: set once, here
        validate_point(self)


def validate_point(point: OpcuaPoint) -> None:
    """Raise PointError (naming the field) if the point's settings cannot work."""
    if not isinstance(point.key, str) or not point.key:
        raise PointError("key", "a point needs a non-empty key")
    if not isinstance(point.node_id, NodeRef):
        raise PointError("node_id", f"expected a node id like ns=2;s=Name, got {point.node_id!r}")
    for name in ("lo", "hi"):
        value = getattr(point, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise PointError(name, f"{name} must be a number, got {value!r}")
    if point.lo is not None and point.hi is not None and point.lo > point.hi:
        raise PointError("hi", f"hi ({point.hi:g}) is below lo ({point.lo:g})")
    if not isinstance(point.writable, bool):
        raise PointError("writable", f"writable must be true or false, got {point.writable!r}")
    if point.deadband is not None and (
        isinstance(point.deadband, bool)
        or not isinstance(point.deadband, int | float)
        or not math.isfinite(point.deadband)
        or point.deadband < 0
    ):
        raise PointError("deadband", f"deadband must be a number >= 0, got {point.deadband!r}")
    interval = point.sampling_interval_ms
    if interval is not None and (
        isinstance(interval, bool)
        or not isinstance(interval, int | float)
        or not math.isfinite(interval)
        or not 0 <= interval <= 600_000
    ):
        raise PointError(
            "sampling_interval_ms", f"sampling_interval_ms must be 0..600000, got {interval!r}"
        )
    size = point.queue_size
    if size is not None and (
        isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 10_000
    ):
        raise PointError("queue_size", f"queue_size must be 1..10000, got {size!r}")
    if point.datatype is not None and point.datatype not in POINT_DATATYPES:
        raise PointError(
            "datatype",
            f"datatype must be one of {', '.join(POINT_DATATYPES)}, got {point.datatype!r}",
        )
