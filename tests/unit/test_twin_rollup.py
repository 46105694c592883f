"""Downsampled history buckets (gateway/twin/rollup.py): pure functions, no I/O."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import pytest

from gateway.twin import codec, rollup

PID = 3


def columns(rows: Sequence[tuple[int, float, object, int]]) -> codec.Columns:
    """(rev, ts, value, quality) rows of one point, through the codec as the writer stores them."""
    return codec.decode(
        codec.encode_frame([(rev, ts, PID, value, q, None, None) for rev, ts, value, q in rows])
    )


def reference(rows: Sequence[tuple[int, float, object, int]], size: float) -> dict[float, tuple]:
    """count, min, max, sum and last value per bucket start, computed one row at a time."""
    out: dict[float, list] = {}
    for _rev, ts, value, quality in sorted(rows, key=lambda r: r[0]):
        if quality > 1 or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        key = math.floor(ts / size) * size
        got = out.setdefault(key, [0, math.inf, -math.inf, 0.0, None])
        got[0] += 1
        got[1], got[2] = min(got[1], value), max(got[2], value)
        got[3] += value
        got[4] = value
    return {k: tuple(v) for k, v in out.items()}


def as_dict(part: rollup.Partial) -> dict[float, tuple]:
    return {
        s: (n, lo, hi, total, last)
        for s, n, lo, hi, total, last in zip(
            part.start.tolist(),
            part.n.tolist(),
            part.lo.tolist(),
            part.hi.tolist(),
            part.total.tolist(),
            part.last.tolist(),
            strict=True,
        )
    }


def random_rows(seed: int, n: int) -> list[tuple[int, float, object, int]]:
    rng = random.Random(seed)
    rows, ts = [], 1_700_000_000.0 + rng.random() * 60
    for rev in range(1, n + 1):
        ts += rng.expovariate(1 / 7.0)
        quality = rng.choice([0, 0, 0, 1, 2, 3])
        value: object = rng.choice([rng.uniform(-50, 50), rng.randint(-9, 9), None])
        rows.append((rev, ts, value, quality))
    return rows


@pytest.mark.parametrize("size", [1.0, 60.0, 300.0])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fold_matches_a_row_by_row_computation(size: float, seed: int) -> None:
    rows = random_rows(seed, 2000)
    got = as_dict(rollup.fold(columns(rows), size))
    want = reference(rows, size)
    assert got.keys() == want.keys()
    for key, (n, lo, hi, total, last) in want.items():
        assert got[key][:3] == (n, lo, hi)
        assert got[key][3] == pytest.approx(total)
        assert got[key][4] == last


def test_bad_stale_and_text_rows_are_not_counted() -> None:
    rows = [(1, 10.0, 5.0, 2), (2, 11.0, 7.0, 3), (3, 12.0, "open", 0), (4, 13.0, None, 0)]
    assert len(rollup.fold(columns(rows), 60)) == 0
    part = rollup.fold(columns([*rows, (5, 14.0, 3.0, 1)]), 60)
    assert as_dict(part) == {0.0: (1, 3.0, 3.0, 3.0, 3.0)}


def test_the_last_value_is_the_newest_revs_even_out_of_time_order() -> None:
    # A device clock step: rev 2 carries an earlier ts than rev 1, same bucket.
    part = rollup.fold(columns([(1, 30.0, 1.0, 0), (2, 20.0, 2.0, 0)]), 60)
    assert part.last.tolist() == [2.0]


@pytest.mark.parametrize("cut", [1, 500, 999, 1999])
def test_merging_two_parts_equals_folding_the_whole(cut: int) -> None:
    rows = random_rows(7, 2000)
    whole = as_dict(rollup.fold(columns(rows), 60))
    merged = as_dict(
        rollup.merge(rollup.fold(columns(rows[:cut]), 60), rollup.fold(columns(rows[cut:]), 60))
    )
    assert merged.keys() == whole.keys()
    for key, value in whole.items():
        assert merged[key][:3] == value[:3] and merged[key][4] == value[4]
        assert merged[key][3] == pytest.approx(value[3])


def test_merge_refuses_buckets_of_other_sizes() -> None:
    a = rollup.fold(columns([(1, 1.0, 1.0, 0)]), 60)
    b = rollup.fold(columns([(2, 2.0, 1.0, 0)]), 300)
    with pytest.raises(ValueError, match="60"):
        rollup.merge(a, b)
    assert rollup.merge(rollup.Partial.empty(60), a) is a


def test_periods_split_by_the_hour() -> None:
    rows = [(i + 1, 3000.0 + i * 100, float(i), 0) for i in range(80)]  # 3000 s .. 10,900 s
    parts = rollup.periods(rollup.fold(columns(rows), 60))
    assert [hour for hour, _ in parts] == [0.0, 3600.0, 7200.0, 10800.0]
    for hour, part in parts:
        assert ((part.start >= hour) & (part.start < hour + 3600)).all()
    assert sum(int(p.n.sum()) for _, p in parts) == 80


def test_regroup_gathers_buckets_into_a_coarser_grid() -> None:
    rows = [(i + 1, 60.0 * i + 5, float(i), 0) for i in range(30)]  # one a minute, 30 minutes
    part = rollup.regroup(rollup.fold(columns(rows), 60), 0.0, 600.0)
    assert part.start.tolist() == [0.0, 600.0, 1200.0]
    assert part.n.tolist() == [10, 10, 10]
    assert part.lo.tolist() == [0.0, 10.0, 20.0] and part.hi.tolist() == [9.0, 19.0, 29.0]
    assert part.last.tolist() == [9.0, 19.0, 29.0]
    # A bucket that begins before the grid's start falls into its first bucket.
    shifted = rollup.regroup(rollup.fold(columns(rows), 60), 30.0, 600.0)
    assert shifted.start[0] == 30.0 and int(shifted.n.sum()) == 30


def test_encode_decode_round_trip() -> None:
    part = rollup.fold(columns(random_rows(5, 500)), 60)
    back = rollup.decode(rollup.encode(part))
    assert back.size == 60
    for name in ("start", "n", "lo", "hi", "total", "last"):
        assert np.array_equal(getattr(back, name), getattr(part, name))
    assert len(rollup.decode(rollup.encode(rollup.Partial.empty(60)))) == 0


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x01",
        b"\x02" + b"\x00" * 12,  # another format version
        rollup.encode(rollup.fold(columns([(1, 1.0, 1.0, 0)]), 60))[:-3],  # truncated
        rollup.encode(rollup.fold(columns([(1, 1.0, 1.0, 0)]), 60))[:13] + b"garbage",
    ],
)
def test_a_damaged_body_is_a_value_error(blob: bytes) -> None:
    with pytest.raises(ValueError):
        rollup.decode(blob)
