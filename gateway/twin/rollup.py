"""Downsampled history: per-point time buckets (count, min, max, sum, last), pure functions.

Raw history is kept `storage.history_days`; what retention (or the disk bound) removes from the
raw blocks is first folded into buckets of `storage.rollup_s` seconds (one minute by default)
and kept `storage.rollup_days`. A bucket holds only measured numbers (quality GOOD or UNCERTAIN,
as the aggregates of raw history): text points keep no downsampled history, a BAD or STALE row
has no value to count.

One `rollups` row per point per hour (`PERIOD_S`): 60 one-minute buckets are ~1 KiB compressed,
so a year of one point is ~9,000 rows. Retention moves blocks a few hundred at a time, so the
hour that a step begins in may already have a row from the previous step: the writer merges the
two (`merge`), which only ever concerns the oldest hour of a step. The counts, sums, minima and
maxima of partial buckets combine exactly, and `last` is the newer part's (retention moves the
oldest history first, so the later part is the newer one).

A bucket is identified by its start, a multiple of its size in epoch seconds. The body stores
its size, so a changed `rollup_s` leaves older rows readable at the size they were made with.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from gateway.twin import codec

__all__ = ["PERIOD_S", "Partial", "decode", "encode", "fold", "merge", "periods", "regroup"]

PERIOD_S = 3600.0  # one rollups row per point per hour
_HEADER = struct.Struct("<BdI")  # format version, bucket size in seconds, buckets
_VERSION = 1
_MEASURED = 1  # highest quality code counted (GOOD = 0, UNCERTAIN = 1), as raw aggregates


@dataclass(slots=True, frozen=True)
class Partial:
    """Buckets of one point, starts ascending and distinct."""

    size: float
    start: np.ndarray  # float64, multiples of size
    n: np.ndarray  # int64, measured samples in the bucket
    lo: np.ndarray  # float64
    hi: np.ndarray
    total: np.ndarray  # sum of the values (mean = total / n)
    last: np.ndarray  # the newest measured value

    def __len__(self) -> int:
        return len(self.start)

    def take(self, index: np.ndarray) -> Partial:
        """The buckets a mask or index array selects."""
        return Partial(
            self.size,
            self.start[index],
            self.n[index],
            self.lo[index],
            self.hi[index],
            self.total[index],
            self.last[index],
        )

    @staticmethod
    def empty(size: float) -> Partial:
        """No buckets."""
        f = np.zeros(0, dtype=np.float64)
        return Partial(size, f, np.zeros(0, dtype=np.int64), f, f, f, f)


def fold(cols: codec.Columns, size: float) -> Partial:
    """The buckets of `size` seconds of one point's rows (in rev order), measured numbers only."""
    numeric, values = cols.numeric()
    keep = numeric & (cols.quality <= _MEASURED)
    if not keep.any():
        return Partial.empty(size)
    ts, values, revs = cols.ts[keep], values[keep], cols.rev[keep]
    keys = np.floor(ts / size)
    # Bucket by key, and within a bucket by rev, so the newest rev's value is the last.
    order = np.lexsort((revs, keys))
    keys, values = keys[order], values[order]
    firsts = np.concatenate(([0], np.flatnonzero(np.diff(keys)) + 1))
    lasts = np.concatenate((firsts[1:] - 1, [len(keys) - 1]))
    return Partial(
        size,
        keys[firsts] * size,
        np.diff(np.concatenate((firsts, [len(keys)]))).astype(np.int64),
        np.minimum.reduceat(values, firsts),
        np.maximum.reduceat(values, firsts),
        np.add.reduceat(values, firsts),
        values[lasts],
    )


def merge(older: Partial, newer: Partial) -> Partial:
    """One point's buckets from two parts; where both have a bucket, `newer` has its last."""
    if not len(older):
        return newer
    if not len(newer):
        return older
    if older.size != newer.size:
        raise ValueError(f"cannot merge buckets of {older.size} s and {newer.size} s")
    start = np.concatenate((older.start, newer.start))
    # Stable: for equal starts the older part's bucket comes first, the newer's last.
    order = np.argsort(start, kind="stable")
    start = start[order]
    n = np.concatenate((older.n, newer.n))[order]
    lo = np.concatenate((older.lo, newer.lo))[order]
    hi = np.concatenate((older.hi, newer.hi))[order]
    total = np.concatenate((older.total, newer.total))[order]
    last = np.concatenate((older.last, newer.last))[order]
    firsts = np.concatenate(([0], np.flatnonzero(np.diff(start)) + 1))
    lasts = np.concatenate((firsts[1:] - 1, [len(start) - 1]))
    return Partial(
        older.size,
        start[firsts],
        np.add.reduceat(n, firsts),
        np.minimum.reduceat(lo, firsts),
        np.maximum.reduceat(hi, firsts),
        np.add.reduceat(total, firsts),
        last[lasts],
    )


def periods(part: Partial) -> list[tuple[float, Partial]]:
    """The buckets split by the hour (`PERIOD_S`) they start in: [(hour start, buckets)]."""
    if not len(part):
        return []
    hours = np.floor(part.start / PERIOD_S)
    bounds = np.concatenate(([0], np.flatnonzero(np.diff(hours)) + 1, [len(hours)]))
    return [
        (float(hours[a] * PERIOD_S), part.take(np.arange(a, b)))
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
    ]


def regroup(part: Partial, start: float, size: float) -> Partial:
    """The buckets gathered into the grid `start + k * size` by where each begins.

    A stored bucket falls wholly into the grid bucket its start is in: asked for buckets finer
    than the stored ones, the answer has the stored resolution (buckets between stay empty).
    One that begins before `start` falls into the first. The result's `start` is the grid
    bucket's start.
    """
    if not len(part):
        return Partial.empty(size)
    keys = np.maximum(np.floor((part.start - start) / size), 0.0)
    firsts = np.concatenate(([0], np.flatnonzero(np.diff(keys)) + 1))
    lasts = np.concatenate((firsts[1:] - 1, [len(keys) - 1]))
    return Partial(
        size,
        start + keys[firsts] * size,
        np.add.reduceat(part.n, firsts),
        np.minimum.reduceat(part.lo, firsts),
        np.maximum.reduceat(part.hi, firsts),
        np.add.reduceat(part.total, firsts),
        part.last[lasts],
    )


def encode(part: Partial) -> bytes:
    """One rollups row's body: a header, then the columns, compressed."""
    body = b"".join(
        (
            part.start.astype("<f8").tobytes(),
            part.n.astype("<u4").tobytes(),
            part.lo.astype("<f8").tobytes(),
            part.hi.astype("<f8").tobytes(),
            part.total.astype("<f8").tobytes(),
            part.last.astype("<f8").tobytes(),
        )
    )
    return _HEADER.pack(_VERSION, part.size, len(part)) + zlib.compress(body, 6)


def decode(blob: bytes) -> Partial:
    """A rollups row's buckets; ValueError for a body this code did not write."""
    if len(blob) < _HEADER.size:
        raise ValueError("rollup body shorter than its header")
    version, size, count = _HEADER.unpack_from(blob)
    if version != _VERSION:
        raise ValueError(f"rollup body version {version} is not {_VERSION}")
    try:
        body = zlib.decompress(blob[_HEADER.size :])
    except zlib.error as exc:
        raise ValueError(f"rollup body does not decompress: {exc}") from exc
    if len(body) != count * (5 * 8 + 4):
        raise ValueError(f"rollup body of {len(body)} bytes for {count} buckets")
    at = 0

    def column(dtype: str, width: int) -> np.ndarray:
        nonlocal at
        out = np.frombuffer(body, dtype=dtype, count=count, offset=at)
        at += width * count
        return out

    start = column("<f8", 8)
    n = column("<u4", 4).astype(np.int64)
    return Partial(
        size,
        start.astype(np.float64),
        n,
        column("<f8", 8).astype(np.float64),
        column("<f8", 8).astype(np.float64),
        column("<f8", 8).astype(np.float64),
        column("<f8", 8).astype(np.float64),
    )
