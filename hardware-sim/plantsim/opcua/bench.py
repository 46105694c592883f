"""Bench signals: N doubles that all change on every update, for throughput measurements.

Signal i is 50 + 40 sin(2 pi 0.1 Hz t + phase_i) plus Gaussian noise (sigma 0.5): every value
differs from the one before, so every update is a data change a subscription must deliver. The
signals themselves are pure and seeded; serving 5 000 of them at 10 Hz is what the rest of this
module is about: adding them in linear time and making their values cheaply.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from datetime import UTC, datetime

from asyncua import Server, ua

from asyncua_glue.datavalue import SharedDataValue

from .node_items import variable_items
from .nodes import NodeSpec, bench_identifier

_FREQ_HZ = 0.1
_OFFSET = 50.0
_AMPLITUDE = 40.0
_NOISE = 0.5
_GOOD = ua.StatusCode(ua.StatusCodes.Good)


class BenchSignals:
    """`n` sine-plus-noise signals with per-signal phases."""

    def __init__(self, n: int, seed: int = 0) -> None:
        """Create `n` signals; the same seed gives the same phases and noise."""
        if n < 0:
            raise ValueError(f"bench: negative signal count {n}")
        self.n = n
        self._rng = random.Random(f"bench/{seed}")
        self._phases = [self._rng.uniform(0.0, 2.0 * math.pi) for _ in range(n)]

    def values(self, t: float) -> list[float]:
        """Return every signal's value at time `t` (s); each call draws fresh noise."""
        angle = 2.0 * math.pi * _FREQ_HZ * t
        sin, gauss = math.sin, self._rng.gauss
        return [_OFFSET + _AMPLITUDE * sin(angle + p) + gauss(0.0, _NOISE) for p in self._phases]


def bench_data_values(values: Sequence[float]) -> list[ua.DataValue]:
    """Return the DataValue of each bench value, all Good and with one timestamp."""
    now = datetime.now(UTC)
    return [SharedDataValue(_double(value), _GOOD, now, now) for value in values]


def add_bench_nodes(server: Server, parent: ua.AddNodesItem, idx: int, n: int) -> list[ua.NodeId]:
    """Add `n` bench doubles under `parent` in linear time; return their node ids.

    asyncua's AddNodes scans every reference of the parent for each child (twice), which makes
    5 000 children of one object take ~13 s. So the children are added without a parent
    (`try_add_nodes(check=False)` allows that) and both references are appended here at once;
    they are new, so there is nothing to check for duplicates.
    """
    parent_id = parent.RequestedNewNodeId
    items = []
    for i in range(n):
        spec = NodeSpec(f"Signal{i:05d}", f"bench{i}", "Double", "bench signal")
        item = variable_items(bench_identifier(i), spec, idx, ua.NodeId())[0]
        items.append(item)
    nms = server.iserver.node_mgt_service
    failed = list(nms.try_add_nodes(items, check=False))
    if failed:
        raise RuntimeError(f"cannot add bench signal {failed[0].RequestedNewNodeId}")
    aspace = server.iserver.aspace
    component = ua.NodeId(ua.ObjectIds.HasComponent)
    parent_refs = aspace[parent_id].references
    for item in items:
        parent_refs.append(
            ua.ReferenceDescription(
                ReferenceTypeId=component,
                IsForward=True,
                NodeId=item.RequestedNewNodeId,
                BrowseName=item.BrowseName,
                DisplayName=item.NodeAttributes.DisplayName,
                NodeClass=ua.NodeClass.Variable,
                TypeDefinition=item.TypeDefinition,
            )
        )
        aspace[item.RequestedNewNodeId].references.append(
            ua.ReferenceDescription(
                ReferenceTypeId=component,
                IsForward=False,
                NodeId=parent_id,
                BrowseName=parent.BrowseName,
                DisplayName=parent.NodeAttributes.DisplayName,
                NodeClass=ua.NodeClass.Object,
                TypeDefinition=parent.TypeDefinition,
            )
        )
    return [item.RequestedNewNodeId for item in items]


def _double_slow(value: float) -> ua.Variant:
    return ua.Variant(value, ua.VariantType.Double)


def _double_fast(value: float) -> ua.Variant:
    # ua.Variant(value, Double) spends ~2 µs of a bench update's ~3.5 µs in __post_init__,
    # guessing and checking a type we already know. Same class, same fields, set directly.
    variant = _new_variant(ua.Variant)
    variant.Value = value
    variant.VariantType = ua.VariantType.Double
    variant.Dimensions = None
    variant.is_array = False
    return variant


_new_variant = object.__new__
_VARIANT_FIELDS = {"Value", "VariantType", "Dimensions", "is_array"}
# Only while Variant has exactly these fields; another asyncua gets the plain constructor.
_double = (
    _double_fast
    if {f.name for f in dataclasses.fields(ua.Variant)} == _VARIANT_FIELDS
    else _double_slow
)
