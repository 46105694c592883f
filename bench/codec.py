"""Telemetry codec: bytes and CPU per sample of frames and blocks, on the footprint device's rows.

    .venv/bin/python bench/codec.py [--points 10000] [--repeats 5] [--seed 1]

Data (the footprint benchmark's device, `bench/footprint.py`): N float32 points polled every
1 s over Modbus TCP in reads of 62 points (124 registers). Poll k starts at T0 + k s plus a
jitter of 1-5 ms; each read takes 0.6-1.0 ms; a point's value is float32(50 + 40 sin(2 pi 0.1 Hz
t + phase) + normal(0, 0.5)) at its read's time, so every value changes every poll; its
source_ts is that read's `time.time()` (a float, not whole microseconds, as the Modbus driver
gives it); the batch's ts is the time the last read ended plus 0.2-0.8 ms, in whole
microseconds. Quality GOOD, no reason.

- frame: one poll, N rows (pids 1..N, consecutive revs, one ts);
- block of 60 / 600 / 6,000: one point's rows over as many polls (revs N apart);
- the same with source_ts in whole microseconds, and with no source_ts;
- int: a setpoint-like int point that moves by 1-3 on 20 % of polls, stored on change only;
- bool: a bool point that flips on 5 % of polls, stored on change only;
- OPC UA: a PLC REAL (float32) sampled every 0.5 s whose source_ts is the server's 100 ns
  clock (tick / 1e7: not whole microseconds), ts its arrival 2-20 ms later;
- float64: the device's block of 600 with values that are not float32s (a computed double).

Timings per sample, medians over --repeats runs, CPU (`time.process_time`) beside wall:
encode (rows -> blob), decode (blob -> `Columns`: arrays only, lists built on demand), and
decode + `rows()` (every row back as a tuple). Then the cost of reading one point's rows out of
a frame (decode, `take(pid == p)`, `rows()`), per frame, and of encoding a block of 600 from
columns (`encode_block_columns`, the writer's compaction path). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from gateway.twin.codec import (
    TelemetryRow,
    decode,
    encode_block,
    encode_block_columns,
    encode_frame,
)

T0 = 1_780_000_000.0
POLL_S = 1.0
READ_POINTS = 62
TARGET_BYTES = 8.0
MIN_TIMED_S = 0.05  # each timed repeat runs the call this long at least


def main(argv: list[str] | None = None) -> int:
    """Measure every scenario and print a table, then one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    device = Device(args.points, 6_000, rng)
    point = args.points // 2 + 1  # one in the middle of the poll
    scenarios: list[tuple[str, str, list[TelemetryRow]]] = [
        ("frame", f"frame, {args.points:,} points", device.frame(0)),
        ("block60", "block of 60", device.block(point, 60)),
        ("block600", "block of 600", device.block(point, 600)),
        ("block6000", "block of 6,000", device.block(point, 6_000)),
        ("frame_us_src", "frame, source_ts in whole us", rounded_source(device.frame(0))),
        (
            "block600_us_src",
            "block of 600, source_ts in whole us",
            rounded_source(device.block(point, 600)),
        ),
        ("block600_no_src", "block of 600, no source_ts", no_source(device.block(point, 600))),
        ("int600", "int point, block of 600", int_point(600, args.points, rng)),
        ("bool600", "bool point, block of 600", bool_point(600, args.points, rng)),
        ("opcua600", "OPC UA point (100 ns source_ts), 600", opcua_point(600, rng)),
        ("double600", "float64 values, block of 600", doubles(device.block(point, 600), rng)),
    ]
    print(
        f"telemetry codec benchmark: {args.points:,}-point device, {args.repeats} repeats "
        f"(medians), numpy {np.__version__}"
    )
    print()
    header = (
        f"{'rows':<40} {'bytes/sample':>12} {'encode us/sample':>19} {'decode':>15} "
        f"{'decode+rows()':>15}"
    )
    print(header)
    print(f"{'':<40} {'':>12} {'cpu / wall':>19} {'cpu / wall':>15} {'cpu / wall':>15}")
    print("-" * len(header))
    figures: dict[str, dict[str, float]] = {}
    for key, label, rows in scenarios:
        encode = encode_frame if key.startswith("frame") else encode_block
        blob = encode(rows)
        if decode(blob).rows() != rows_as_decoded(rows):
            raise SystemExit(f"bench: {label} does not round-trip")
        n = len(rows)
        enc = timed(partial(encode, rows), n, args.repeats)
        dec = timed(partial(decode, blob), n, args.repeats)
        full = timed(partial(decode_rows, blob), n, args.repeats)
        figures[key] = {
            "rows": n,
            "bytes_per_sample": round(len(blob) / n, 3),
            "encode_cpu_us": round(enc[0], 3),
            "encode_wall_us": round(enc[1], 3),
            "decode_cpu_us": round(dec[0], 3),
            "decode_wall_us": round(dec[1], 3),
            "decode_rows_cpu_us": round(full[0], 3),
            "decode_rows_wall_us": round(full[1], 3),
        }
        print(
            f"{label:<40} {len(blob) / n:>12.2f} {pair(enc):>19} {pair(dec):>15} {pair(full):>15}",
            flush=True,
        )

    frame_blob = encode_frame(device.frame(0))

    def one_point() -> list[TelemetryRow]:
        columns = decode(frame_blob)
        return columns.take(columns.pid == point).rows()

    pick = timed(one_point, 1, args.repeats)
    # The writer's compaction encodes blocks from decoded frames' columns, not from tuples.
    columns = decode(encode_block(device.block(point, 600)))
    compact = timed(partial(encode_block_columns, columns), len(columns), args.repeats)
    print()
    print(
        f"one point's rows out of a {args.points:,}-row frame (decode, take, rows()): "
        f"{pick[0]:,.0f} us CPU, {pick[1]:,.0f} us wall per frame"
    )
    print(
        f"block of 600 from columns (encode_block_columns, as compaction does): "
        f"{pair(compact)} us/sample CPU / wall"
    )
    ok = all(
        figures[k]["bytes_per_sample"] <= TARGET_BYTES for k in ("frame", "block600", "block6000")
    )
    print(
        f"target (<= {TARGET_BYTES} bytes/sample, frames and blocks of 600+): "
        f"{'met' if ok else 'NOT met'}"
    )
    print("us/sample: microseconds per row; cpu = time.process_time, wall = time.perf_counter.")
    print(
        json.dumps(
            {
                "frame_bytes_per_sample": figures["frame"]["bytes_per_sample"],
                "block600_bytes_per_sample": figures["block600"]["bytes_per_sample"],
                "one_point_from_frame_cpu_us": round(pick[0]),
                "one_point_from_frame_wall_us": round(pick[1]),
                "block600_from_columns_cpu_us": round(compact[0], 3),
                "scenarios": figures,
            }
        )
    )
    return 0


class Device:
    """The footprint device's polls: read times, batch times and every point's values."""

    def __init__(self, points: int, polls: int, rng: np.random.Generator) -> None:
        self.points = points
        self.rng = rng
        self.phase = rng.uniform(0, 2 * np.pi, points)
        reads = -(-points // READ_POINTS)
        start = T0 + POLL_S * np.arange(polls) + rng.uniform(0.001, 0.005, polls)
        # read_end[k, b]: time.time() when read b of poll k returned.
        self.read_end = start[:, None] + np.cumsum(rng.uniform(6e-4, 1e-3, (polls, reads)), 1)
        batch = self.read_end[:, -1] + rng.uniform(2e-4, 8e-4, polls)
        self.ts = np.round(batch * 1e6) / 1e6

    def value(self, pids: np.ndarray, t: np.ndarray) -> np.ndarray:
        """float32 readings of points `pids` at times `t`, as the driver hands them on."""
        wave = 50 + 40 * np.sin(2 * np.pi * 0.1 * (t - T0) + self.phase[pids - 1])
        return (wave + self.rng.normal(0, 0.5, len(t))).astype(np.float32).astype(np.float64)

    def frame(self, k: int) -> list[TelemetryRow]:
        """Poll k of every point: one ingested batch."""
        pids = np.arange(1, self.points + 1)
        source = self.read_end[k, (pids - 1) // READ_POINTS]
        rev = k * self.points + pids
        ts = np.full(self.points, self.ts[k])
        return assemble(rev, ts, pids, self.value(pids, source), source)

    def block(self, pid: int, polls: int) -> list[TelemetryRow]:
        """Point `pid`'s rows of the first `polls` polls."""
        k = np.arange(polls)
        source = self.read_end[k, (pid - 1) // READ_POINTS]
        pids = np.full(polls, pid)
        return assemble(k * self.points + pid, self.ts[k], pids, self.value(pids, source), source)


def int_point(polls: int, points: int, rng: np.random.Generator) -> list[TelemetryRow]:
    """A setpoint-like int point stored on change: `polls` changes over ~5x as many polls."""
    k = np.cumsum(rng.geometric(0.2, polls))
    step = rng.integers(1, 4, polls) * rng.choice([-1, 1], polls)
    ts = np.round((T0 + k + rng.uniform(0.001, 0.006, polls)) * 1e6) / 1e6
    rows = assemble(k * points + 7, ts, np.full(polls, 7), 100 + np.cumsum(step), ts - 0.002)
    return [(r[0], r[1], r[2], int(r[3]), r[4], r[5], r[6]) for r in rows]


def bool_point(polls: int, points: int, rng: np.random.Generator) -> list[TelemetryRow]:
    """A bool point stored on change: it flips on 5 % of polls."""
    k = np.cumsum(rng.geometric(0.05, polls))
    ts = np.round((T0 + k + rng.uniform(0.001, 0.006, polls)) * 1e6) / 1e6
    rows = assemble(k * points + 9, ts, np.full(polls, 9), np.zeros(polls), ts - 0.002)
    return [(r[0], r[1], r[2], i % 2 == 0, r[4], r[5], r[6]) for i, r in enumerate(rows)]


def opcua_point(samples: int, rng: np.random.Generator) -> list[TelemetryRow]:
    """A PLC REAL (float32) sampled every 0.5 s; source_ts on the server's 100 ns clock."""
    ticks = np.round((T0 + 0.5 * np.arange(samples) + rng.uniform(0, 0.01, samples)) * 1e7)
    source = ticks / 1e7
    ts = np.round((source + rng.uniform(0.002, 0.02, samples)) * 1e6) / 1e6
    walk = 180 + np.cumsum(rng.normal(0, 0.05, samples))
    value = walk.astype(np.float32).astype(np.float64)
    rev = 1_000 + np.arange(samples) * 300
    return assemble(rev, ts, np.full(samples, 3), value, source)


def assemble(
    rev: np.ndarray, ts: np.ndarray, pid: np.ndarray, value: np.ndarray, source: np.ndarray
) -> list[TelemetryRow]:
    """Rows as the twin builds them: Python ints and floats, quality GOOD (0), no reason."""
    n = len(rev)
    return list(
        zip(
            rev.tolist(),
            ts.tolist(),
            pid.tolist(),
            value.tolist(),
            [0] * n,
            source.tolist(),
            [None] * n,
            strict=True,
        )
    )


def doubles(rows: list[TelemetryRow], rng: np.random.Generator) -> list[TelemetryRow]:
    """The same rows with values that are not float32s: a computed double, say."""
    noise = rng.normal(0, 1e-3, len(rows)).tolist()
    return [(*r[:3], r[3] + e, *r[4:]) for r, e in zip(rows, noise, strict=True)]


def rounded_source(rows: list[TelemetryRow]) -> list[TelemetryRow]:
    """The same rows with source_ts in whole microseconds."""
    return [(*r[:5], round(r[5] * 1e6) / 1e6 if r[5] is not None else None, r[6]) for r in rows]


def no_source(rows: list[TelemetryRow]) -> list[TelemetryRow]:
    """The same rows without source_ts."""
    return [(*r[:5], None, r[6]) for r in rows]


def decode_rows(blob: bytes) -> list[TelemetryRow]:
    """Decode a blob and build every row's tuple."""
    return decode(blob).rows()


def rows_as_decoded(rows: list[TelemetryRow]) -> list[TelemetryRow]:
    """What decoding gives back: bools as ints."""
    return [(*r[:3], int(r[3]) if type(r[3]) is bool else r[3], *r[4:]) for r in rows]


def timed(call: Callable[[], Any], samples: int, repeats: int) -> tuple[float, float]:
    """Return median (CPU, wall) microseconds per sample of `call` handling `samples` rows."""
    loops = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(loops):
            call()
        if time.perf_counter() - t0 >= MIN_TIMED_S:
            break
        loops *= 2
    cpu, wall = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(loops):
            call()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
    scale = 1e6 / loops / samples
    return statistics.median(cpu) * scale, statistics.median(wall) * scale


def pair(figures: tuple[float, float]) -> str:
    return f"{figures[0]:.3f} / {figures[1]:.3f}"


if __name__ == "__main__":
    sys.exit(main())
