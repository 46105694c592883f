"""Plain data types of the twin: what a point is and what its current value is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from drivers.contract import Quality

__all__ = ["EventRecord", "PointDef", "PointValue", "Quality", "asset_of"]


@dataclass(slots=True, frozen=True)
class PointDef:
    """A declared point: identity and engineering metadata, no protocol address."""

    id: str  # area/line/asset/signal
    device: str
    datatype: str
    unit: str = ""
    lo: float | None = None
    hi: float | None = None
    writable: bool = False
    deadband: float = 0.0
    description: str = ""

    @property
    def asset_id(self) -> str:
        """The asset path: the id without its last segment."""
        return asset_of(self.id)


@dataclass(slots=True)
class PointValue:
    """A point's current value as the twin holds it."""

    point_id: str
    value: Any
    quality: Quality
    source_ts: float | None
    gateway_ts: float
    rev: int
    reason: str | None = None


@dataclass(slots=True, frozen=True)
class EventRecord:
    """One entry of the event log."""

    rev: int
    ts: float
    type: str
    asset_id: str | None
    point_id: str | None
    data: dict[str, Any]


def asset_of(point_id: str) -> str:
    """Return the asset path of a point id (`line1/oven1/temperature` → `line1/oven1`)."""
    head, _, _ = point_id.rpartition("/")
    return head
