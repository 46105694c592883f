"""The read planner: merge points into as few block reads as the limits allow. Pure.

Points of one unit and one table are sorted by address and merged while the block stays within
the table's maximum count and the hole between neighbours is at most `max_gap` addresses. A
point is never split across blocks (a 32-bit value read in two requests could tear), and points
on the same register (bits of one word) always land in one block.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import TYPE_CHECKING

from drivers.errors import ConfigurationError
from drivers.modbus.codec import Table

if TYPE_CHECKING:
    from drivers.modbus.point import ModbusPoint

__all__ = ["MAX_BITS", "MAX_REGISTERS", "Block", "plan_reads", "split_block"]

# What one Modbus request can carry (FC1/2: 2000 bits, FC3/4: 125 registers).
MAX_REGISTERS = 125
MAX_BITS = 2000


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: `count` addresses from `start` of `table` on `unit`, and its points."""

    unit: int
    table: Table
    start: int
    count: int
    points: tuple[ModbusPoint, ...]

    @property
    def end(self) -> int:
        """One past the last address read."""
        return self.start + self.count

    def window(self, point: ModbusPoint) -> slice:
        """Where `point`'s registers (or bits) sit in this block's response."""
        begin = point.address.offset - self.start
        return slice(begin, begin + point.span)

    def __str__(self) -> str:
        last = self.end - 1
        where = (
            f"{self.table} {self.start}"
            if last == self.start
            else f"{self.table} {self.start}..{last}"
        )
        return where


def plan_reads(
    points: Iterable[ModbusPoint],
    *,
    unit: int = 1,
    max_registers: int = MAX_REGISTERS,
    max_bits: int = MAX_BITS,
    max_gap: int = 0,
) -> list[Block]:
    """Group points into block reads, per unit and table, in address order.

    `unit` is the default for points whose `unit_id` is None. Raises ConfigurationError if one
    point alone needs more addresses than a request of its table may carry.
    """
    if max_registers < 1 or max_bits < 1 or max_gap < 0:
        raise ValueError("max_registers and max_bits must be >= 1 and max_gap >= 0")

    def group_key(p: ModbusPoint) -> tuple[int, int]:
        return (p.unit_id if p.unit_id is not None else unit, _TABLE_ORDER[p.address.table])

    ordered = sorted(points, key=lambda p: (*group_key(p), p.address.offset, p.span, p.key))
    blocks: list[Block] = []
    for (unit_id, _), group in groupby(ordered, key=group_key):
        members = list(group)
        table = members[0].address.table
        limit = max_bits if table.is_bits else max_registers
        blocks.extend(_merge(unit_id, table, members, limit, max_gap))
    return blocks


def split_block(block: Block) -> list[Block]:
    """Split a block into the smallest reads that still keep each point whole.

    Points with the same address and span (bits of one register) stay together. Used when a
    merged read fails with "illegal data address", to find out which points are really bad.
    """
    spans: dict[tuple[int, int], list[ModbusPoint]] = {}
    for p in block.points:
        spans.setdefault((p.address.offset, p.span), []).append(p)
    return [
        Block(block.unit, block.table, start, count, tuple(members))
        for (start, count), members in sorted(spans.items())
    ]


# -- helpers ------------------------------------------------------------------------------------

_TABLE_ORDER = {Table.COIL: 0, Table.DISCRETE: 1, Table.HOLDING: 2, Table.INPUT: 3}


def _merge(
    unit: int, table: Table, points: Sequence[ModbusPoint], limit: int, max_gap: int
) -> list[Block]:
    blocks: list[Block] = []
    start = end = -1
    members: list[ModbusPoint] = []
    for p in points:
        p_start, p_end = p.address.offset, p.address.offset + p.span
        if p.span > limit:
            kind = "max_bits" if table.is_bits else "max_registers"
            raise ConfigurationError(
                f"point {p.key!r} at {p.address} needs {p.span} addresses in one request, "
                f"more than {kind} = {limit}"
            )
        if members and p_start - end <= max_gap and max(end, p_end) - start <= limit:
            end = max(end, p_end)
            members.append(p)
            continue
        if members:
            blocks.append(Block(unit, table, start, end - start, tuple(members)))
        start, end, members = p_start, p_end, [p]
    if members:
        blocks.append(Block(unit, table, start, end - start, tuple(members)))
    return blocks
