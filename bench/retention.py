"""Retention over simulated months: what downsampling, the size bound and the shrinking file cost.

    .venv/bin/python bench/retention.py [--quick] [--days 56] [--history-days 7] [--bound-mb 24]
                                        [--row-days 7] [--repeats 20] [--no-raw-peer] [--profile]

A `TwinStore` on a simulated clock (its `clock=` argument) takes 20 points of a small line
polled every 5 s of simulated time through `TwinStore.ingest`, as fast as it takes them, for
`--days` (56: eight whole weeks) simulated days: raw history kept `--history-days` (7),
one-minute buckets kept 365 days, the database bounded at `--bound-mb` (24 MB: unbounded it
would pass 24 MB on day ~40, so the bound engages in the second half and from then on takes the
oldest raw history, which the writer folds into buckets first). The signals (`Plant`): six
float32 temperatures (daily swing, slow drift, noise, setpoint steps through a first-order
lag, 0.1 °C resolution, as a Modbus PLC hands them over), four float64 pressures and three
flows with source timestamps (as OPC UA hands them over; the flows follow a pump), a level and
a power, a parts counter and a mode (ints), the pump, an alarm and a door (bools), and about
every five days a minute or two of BAD quality from the OPC UA device. The store drops
unchanged values as it does for any driver: about 61 % of the offered samples are stored.

As the gateway runs: every 5 simulated minutes `TwinStore.compact()` (what the writer does on
its own every COMPACT_S of wall time), so that each point's history lies in blocks of at most
60 samples as a month of running leaves it (the codec's cost is mostly per block: fewer,
larger blocks would flatter every figure below); every simulated hour `TwinStore.prune()` on a
thread of its own, as app.py runs it through `asyncio.to_thread`, while the generator keeps
ingesting (a prune still running at the next hour would make the generator wait, counted:
simulated time runs ~20,000 times faster than real time here, and the gateway has an hour).
The size bound needs nothing: the writer checks it on its own (every BOUND_CHECK_S, and as
frames are written).

Measured:
- per row of `--row-days` simulated days (a week): samples offered and stored; wall and CPU
  time of the whole process while it feeds those days (the ingest loop, the writer thread, the
  prune thread; building the samples is left out); samples/s, CPU µs per offered sample, the
  writer thread's share (/proc), and within that the CPU of its compaction steps and of its
  retention and bound steps (`time.thread_time` around each step, on the writer thread); the
  prunes' median and longest wall time. At the row's end: database bytes in use (pages minus
  free pages), the file's bytes and the WAL's, raw samples kept and since when, raw samples
  folded into buckets in the row, bucket rows, bound episodes so far. Cost over time: the last
  row's CPU per sample against the first's (no retention yet) and against the second's (from
  then on retention folds every hour), and retention's CPU per raw sample folded, first row
  that folded against the last (while the bound shrinks the raw window it folds more than
  comes in, so per offered sample retention costs more then, per folded sample it should
  not): ~1 says retention and the bound do not get dearer as the buckets pile up.
- stalls: how long stored rows waited for their commit. Each ingest that stored something
  keeps (perf_counter, rev); the writer's `on_commit` callback, on its thread, keeps
  (perf_counter, committed rev); a batch waited from its ingest until the first commit at or
  above its rev. Reported over the run (p50, p99, max), and the longest wait that overlapped a
  retention step, a bound step or a compaction step, beside each kind's longest step (the
  writer's `_prune_step`, `_bound_step` and `_compact_step` are wrapped in this process to
  time them: instrumentation only). The generator ingests without pause except while it waits
  for its compaction (so compaction steps meet few waiting rows: bench/sync.py measures those
  stalls under a stream), so during retention and bound steps rows are always waiting; on 2
  shared cores the GIL and the other processes stretch every step, so these are upper bounds
  of what a gateway taking 4 samples/s would see.
- queries at the end, medians of `--repeats` (20; fewer, at least 5, for a query that would
  take more than QUERY_BUDGET_S) after a warm-up, wall and CPU: aggregate of one temperature
  over the last 24 h at 60 s (raw only), 7 d at 600 s, 30 d at 3600 s (buckets and raw across
  the boundary), the whole run at 1 d, and `history()` over one downsampled day (one row per
  stored one-minute bucket). Windows end on the hour after the last poll.
- the same queries on an all-raw peer: a twin database (made by `TwinStore`, read by
  `TwinStore`) holding the main store's raw blocks byte for byte, copied from it every
  simulated hour just before the prune (so before retention or the bound fold them; the copy's
  time is taken off the figures). Feeding a second store through ingest would double the run
  for one figure, and the blocks are what its reads decode either way; the peer's blocks lie
  together in its file, the main store's among frames and buckets (the 24 h query, raw in
  both, shows what that is worth). Beside the timings, the 30-day hour buckets of both are
  compared: counts, minima and maxima must agree (a bucket folds exactly), printed as a check,
  never asserted; so is a peer that missed samples (a raw window shorter than an hour).

`--quick` (~1 minute): 10 simulated days, raw kept 2, bound 6 MB (engages on day ~9), a row
per 2 days. Benchmarks never assert; the last line of output is one JSON object with the
figures and ratios. `--profile` adds cProfile of the writer thread's steps and commits.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import io
import json
import math
import os
import pstats
import queue
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchutil import log_to_file
from drivers.contract import Quality, Sample
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore
from gateway.twin.writer import MB, Writer

DAY_S = 86400.0
PERIOD_S = 5.0  # every point is polled every 5 s of simulated time
COMPACT_EVERY_S = 300.0  # as the writer's COMPACT_S
PRUNE_EVERY_S = 3600.0  # as app.py's hourly prune
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: days and hours fall on the epoch grid
QUERY_POINT = "plant/line1/oven1/temperature"
LONG_QUERY_S = 30 * DAY_S
# (days, raw history days, bound MB, days a row) of the default run and of --quick. Unbounded,
# the default run's database uses ~14 MB at day 7 (a week of raw) and grows ~0.3 MB a day of
# buckets: 24 MB is passed on day ~40. --quick's: ~5.6 MB at day 7, 6 MB on day ~9.
FULL = (56, 7.0, 24.0, 7)
QUICK = (10, 2.0, 6.0, 2)
STEPS = ("prune", "bound", "compact")
# A query is repeated --repeats times, or as often as fits in this many seconds (at least 5).
QUERY_BUDGET_S = 4.0
MIN_REPEATS = 5


# -- the plant -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Analog:
    """A measured signal: base + daily swing + drift + setpoint steps through a lag + noise."""

    name: str
    datatype: str  # float32: a Modbus PLC's real; float64: an OPC UA Double
    base: float
    swing: float  # daily sine amplitude
    drift: float  # random-walk standard deviation over a day
    noise: float
    resolution: float
    steps_per_day: float = 0.0
    step: float = 0.0  # setpoint step standard deviation
    lag_s: float = 600.0
    pumped: bool = False  # follows the pump: ~0 while it is off


ANALOG = (
    Analog("plant/line1/oven1/temperature", "float32", 180, 3, 1.5, 0.15, 0.1, 6, 8, 900),
    Analog("plant/line1/oven1/zone2_temperature", "float32", 175, 3, 1.5, 0.15, 0.1, 6, 8, 900),
    Analog("plant/line1/oven2/temperature", "float32", 210, 2, 1.0, 0.1, 0.1, 4, 10, 1200),
    Analog("plant/line1/hall/temperature", "float32", 21, 2.5, 0.5, 0.05, 0.1),
    Analog("plant/line1/cooling/supply_temperature", "float32", 14, 1, 0.3, 0.08, 0.1),
    Analog("plant/line1/cooling/return_temperature", "float32", 19, 1.5, 0.3, 0.08, 0.1),
    Analog("plant/line1/press1/hydraulic_pressure", "float64", 180, 0, 2.0, 0.4, 0.01, 12, 15, 30),
    Analog("plant/line1/air/pressure", "float64", 6.2, 0.1, 0.05, 0.02, 0.01),
    Analog("plant/line1/cooling/pressure", "float64", 3.1, 0.05, 0.05, 0.01, 0.01),
    Analog("plant/line1/steam/pressure", "float64", 8.0, 0.2, 0.1, 0.03, 0.01, 3, 0.5, 120),
    Analog("plant/line1/cooling/flow", "float64", 42, 2, 1.0, 0.3, 0.1, pumped=True),
    Analog("plant/line1/air/flow", "float64", 120, 15, 5.0, 1.5, 0.1, pumped=True),
    Analog("plant/line1/steam/flow", "float64", 3.2, 0.4, 0.1, 0.05, 0.01, pumped=True),
    Analog("plant/line1/tank1/level", "float64", 55, 12, 3.0, 0.2, 0.1),
    Analog("plant/line1/meter/power", "float64", 85, 20, 4.0, 2.5, 0.01, pumped=True),
)
INTS = ("plant/line1/press1/parts", "plant/line1/press1/mode")
BOOLS = ("plant/line1/cooling/pump_running", "plant/line1/press1/alarm", "plant/line1/oven1/door")


class Plant:
    """20 signals of a small line, one value each every PERIOD_S of simulated time."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        # The float32 reals, the ints and the pump on the Modbus PLC; the rest over OPC UA.
        self.points = [
            *(PointDef(a.name, _device(a.datatype), a.datatype) for a in ANALOG),
            *(PointDef(name, "plc", "int32") for name in INTS),
            PointDef(BOOLS[0], "plc", "bool"),
            *(PointDef(name, "opc", "bool") for name in BOOLS[1:]),
        ]
        self.ticks = int(DAY_S / PERIOD_S)
        # State carried from day to day, so that no signal jumps at midnight.
        self._walk = np.zeros(len(ANALOG))
        self._setpoint = np.zeros(len(ANALOG))
        self._behind = np.zeros(len(ANALOG))  # setpoint minus the lagged value at midnight
        self._pump = True
        self._parts = 0
        self._mode = 1

    def day(self, k: int) -> tuple[list[float], list[list[Sample]]]:
        """The poll times of day `k` (from T0) and one batch of samples per poll."""
        rng, n = self.rng, self.ticks
        t = np.arange(n) * PERIOD_S
        # A poll's timestamp is never on the whole second: a few ms of jitter, in whole µs.
        stamps = np.round(T0 + k * DAY_S + t + rng.integers(0, 5000, n) / 1e6, 6).tolist()
        pump = self._switches(n, 3.0, self._pump)
        self._pump = bool(pump[-1])
        phase = np.sin(2 * np.pi * (t - 9 * 3600) / DAY_S)  # warmest mid-afternoon
        columns: list[list[Any]] = []
        for i, a in enumerate(ANALOG):
            walk = self._walk[i] + np.cumsum(rng.normal(0, a.drift / math.sqrt(n), n))
            self._walk[i] = walk[-1]
            value = a.base + a.swing * phase + walk + rng.normal(0, a.noise, n)
            if a.steps_per_day:
                value += self._lagged_steps(i, a, t)
            if a.pumped:
                value = np.where(pump, value, np.abs(rng.normal(0, a.noise / 5, n)))
            value = np.round(value / a.resolution) * a.resolution
            if a.datatype == "float32":
                # What a Modbus float32 register pair holds, widened by the driver.
                columns.append(value.astype(np.float32).astype(np.float64).tolist())
            else:
                columns.append(np.round(value, 6).tolist())
        parts = self._parts + np.cumsum(rng.poisson(0.8, n) * pump)
        self._parts = int(parts[-1])
        modes = self._levels(n, 6.0, self._mode, 4)
        self._mode = int(modes[-1])
        columns += [parts.tolist(), modes.tolist(), pump.tolist()]
        columns += [self._pulses(n, 0.5, 120, 600).tolist(), self._pulses(n, 4, 60, 300).tolist()]
        return stamps, self._batches(stamps, columns, self._pulses(n, 0.2, 60, 120).tolist())

    def _batches(
        self, stamps: list[float], columns: list[list[Any]], outage: list[bool]
    ) -> list[list[Sample]]:
        keys = [p.id for p in self.points]
        opc = [p.device == "opc" for p in self.points]
        good, bad = Quality.GOOD, Quality.BAD
        batches: list[list[Sample]] = []
        for now, row, down in zip(stamps, zip(*columns, strict=True), outage, strict=True):
            source = round(now - 0.004, 6)  # the OPC UA server's own timestamp, 4 ms earlier
            if down:  # the OPC UA server unreachable: its points BAD with no value
                batches.append(
                    [
                        Sample(key, None, bad) if is_opc else Sample(key, v, good)
                        for key, v, is_opc in zip(keys, row, opc, strict=True)
                    ]
                )
            else:
                batches.append(
                    [
                        Sample(key, v, good, source) if is_opc else Sample(key, v, good)
                        for key, v, is_opc in zip(keys, row, opc, strict=True)
                    ]
                )
        return batches

    def _lagged_steps(self, i: int, a: Analog, t: np.ndarray) -> np.ndarray:
        """Setpoint steps (a Poisson number a day) followed through a first-order lag."""
        rng = self.rng
        count = int(rng.poisson(a.steps_per_day))
        at = np.sort(rng.uniform(0, DAY_S, count))
        deltas = rng.normal(0, a.step, count)
        setpoint = np.full(len(t), self._setpoint[i])
        behind = self._behind[i] * np.exp(-t / a.lag_s)
        for when, delta in zip(at, deltas, strict=True):
            after = t >= when
            setpoint[after] += delta
            behind[after] += delta * np.exp(-(t[after] - when) / a.lag_s)
        self._setpoint[i] = setpoint[-1]
        self._behind[i] = behind[-1]
        return np.asarray(setpoint - behind)

    def _switches(self, n: int, per_day: float, start: bool) -> np.ndarray:
        flips = np.zeros(n, dtype=bool)
        flips[self.rng.integers(0, n, self.rng.poisson(per_day))] = True
        return np.asarray((np.cumsum(flips) % 2 == 1) != start)

    def _levels(self, n: int, per_day: float, start: int, levels: int) -> np.ndarray:
        out = np.full(n, start)
        for at in np.sort(self.rng.integers(0, n, self.rng.poisson(per_day))):
            out[at:] = self.rng.integers(0, levels)
        return out

    def _pulses(self, n: int, per_day: float, shortest_s: float, longest_s: float) -> np.ndarray:
        out = np.zeros(n, dtype=bool)
        for at in self.rng.integers(0, n, self.rng.poisson(per_day)):
            out[at : at + int(self.rng.uniform(shortest_s, longest_s) / PERIOD_S)] = True
        return out


def _device(datatype: str) -> str:
    return "plc" if datatype == "float32" else "opc"


# -- watching the writer -----------------------------------------------------------------------


class Clock:
    """The simulated time the store takes its timestamps from."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Probe:
    """Commit times (writer thread), ingest times (generator), and the writer's upkeep steps."""

    commit_t: array = field(default_factory=lambda: array("d"))
    commit_rev: array = field(default_factory=lambda: array("q"))
    ingest_t: array = field(default_factory=lambda: array("d"))
    ingest_rev: array = field(default_factory=lambda: array("q"))
    spans: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)  # writer-thread CPU in each kind

    def attach(self, writer: Writer, profiler: cProfile.Profile | None) -> None:
        """Record every commit and time every upkeep step (instrumentation of this process)."""
        previous = writer.on_commit
        keep_t, keep_rev, clock = self.commit_t.append, self.commit_rev.append, time.perf_counter

        def committed(rev: int) -> None:
            keep_t(clock())
            keep_rev(rev)
            if previous is not None:
                previous(rev)

        writer.on_commit = committed
        for kind in STEPS:
            name = f"_{kind}_step"
            setattr(writer, name, self._timed(kind, getattr(writer, name), profiler))
        if profiler is not None:
            commit = writer._commit
            writer._commit = lambda: profiler.runcall(commit)  # type: ignore[method-assign]

    def _timed(
        self, kind: str, step: Callable[[], None], profiler: cProfile.Profile | None
    ) -> Callable[[], None]:
        spans = self.spans.setdefault(kind, [])
        self.cpu_s[kind] = 0.0
        perf, cpu = time.perf_counter, time.thread_time

        def timed() -> None:
            started, cpu0 = perf(), cpu()
            try:
                if profiler is not None:
                    profiler.runcall(step)
                else:
                    step()
            finally:
                spans.append((started, perf()))
                self.cpu_s[kind] += cpu() - cpu0

        return timed

    def waits(self) -> tuple[np.ndarray, np.ndarray]:
        """Each recorded ingest's wait for its commit (s), and when it was ingested."""
        commit_t = np.frombuffer(self.commit_t, dtype=np.float64)
        commit_rev = np.frombuffer(self.commit_rev, dtype=np.int64)
        ingest_t = np.frombuffer(self.ingest_t, dtype=np.float64)
        ingest_rev = np.frombuffer(self.ingest_rev, dtype=np.int64)
        # Committed revs only grow: the first commit at or above a rev is the one that took it.
        at = np.searchsorted(commit_rev, ingest_rev, side="left")
        answered = at < len(commit_rev)
        return commit_t[at[answered]] - ingest_t[answered], ingest_t[answered]

    def worst_during(self, kind: str, waits: np.ndarray, starts: np.ndarray) -> float:
        """The longest wait (s) whose span [ingest, commit] overlapped a step of `kind`."""
        spans = self.spans.get(kind) or []
        if not spans or not len(waits):
            return 0.0
        begin = np.array([s for s, _ in spans])
        end = np.array([e for _, e in spans])
        # Steps run one after another on one thread: of those begun before the commit, the
        # last one is the only one that can still have been running after the ingest.
        last = np.searchsorted(begin, starts + waits, side="right") - 1
        hit = (last >= 0) & (end[np.maximum(last, 0)] > starts)
        return float(waits[hit].max()) if hit.any() else 0.0

    def longest(self, kind: str) -> float:
        return max((e - s for s, e in self.spans.get(kind) or []), default=0.0)


def thread_cpu_s(native_id: int | None) -> float:
    """CPU seconds of one thread of this process (Linux /proc), 0 where unknown."""
    if native_id is None:
        return 0.0
    try:
        with open(f"/proc/self/task/{native_id}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


class Pruner:
    """The gateway's hourly prune, on a thread of its own (app.py: `asyncio.to_thread`)."""

    def __init__(self, store: TwinStore) -> None:
        self.store = store
        self.seconds: list[float] = []
        self.overran = 0  # prunes still running at the next simulated hour
        self.error: BaseException | None = None
        self._jobs: queue.SimpleQueue[float | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="prune", daemon=True)
        self._thread.start()

    def prune(self, now: float) -> None:
        """Prune at simulated time `now` once the previous prune is done."""
        self.next_hour()
        self._idle.clear()
        self._jobs.put(now)

    def next_hour(self) -> None:
        """Wait for the previous prune, counting it when it runs into the next hour."""
        if not self._idle.is_set():
            self.overran += 1
        self.wait()

    def wait(self) -> None:
        self._idle.wait()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.wait()
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (now := self._jobs.get()) is not None:
            try:
                started = time.perf_counter()
                self.store.prune(now)
                self.seconds.append(time.perf_counter() - started)
            except BaseException as exc:  # raised on the generator's next wait
                self.error = exc
            self._idle.set()


class RawPeer:
    """An all-raw twin database: the main store's blocks, copied before retention folds them."""

    def __init__(self, path: Path, source: Path, points: list[PointDef]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The store makes the schema and declares the points (so that pids match by id).
        with TwinStore(path, points, history_days=3650):
            pass
        self.path = path
        self.points = points
        self.conn = sqlite3.connect(f"file:{path}", uri=True, isolation_level=None)
        self.conn.execute("ATTACH DATABASE ? AS src", (f"file:{source}?mode=ro",))
        self.last_id = 0
        self.samples = 0
        # Spent copying (this thread), taken off the figures: not the store's cost.
        self.wall_s = 0.0
        self.cpu_s = 0.0

    def copy(self) -> None:
        """Copy the blocks compacted since the last copy, ids and bodies as they are."""
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            self._copy()
        finally:
            self.wall_s += time.perf_counter() - w0
            self.cpu_s += time.thread_time() - c0

    def _copy(self) -> None:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            (compacted,) = conn.execute(
                "SELECT value FROM src.meta WHERE key = 'compacted_rev'"
            ).fetchone()
            copied = conn.execute(
                "INSERT INTO main.blocks(id, pid, t0, t1, rev0, rev1, n, body) "
                "SELECT b.id, p.pid, b.t0, b.t1, b.rev0, b.rev1, b.n, b.body FROM src.blocks b "
                "JOIN src.points s ON s.pid = b.pid JOIN main.points p ON p.id = s.id "
                "WHERE b.id > ? AND b.rev1 <= ? ORDER BY b.id RETURNING id, n",
                (self.last_id, compacted),
            ).fetchall()
            conn.execute(
                "INSERT OR REPLACE INTO main.meta(key, value) VALUES ('compacted_rev', ?)",
                (compacted,),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if copied:
            self.last_id = max(self.last_id, max(i for i, _ in copied))
            self.samples += sum(n for _, n in copied)

    def open(self) -> TwinStore:
        """The peer as a store, for its reads."""
        self.conn.close()
        store = TwinStore(self.path, self.points, history_days=3650)
        store.open()
        return store


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Period:
    """A row of the table: `row_days` simulated days (a week by default)."""

    first_day: int
    days: int = 0
    offered: int = 0
    stored: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    writer_cpu_s: float = 0.0
    step_cpu_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STEPS, 0.0))
    prune_s: list[float] = field(default_factory=list)
    end: dict[str, Any] = field(default_factory=dict)

    folded: int = 0  # raw samples moved into buckets (retention and bound)

    def us(self, seconds: float) -> float:
        """µs per offered sample."""
        return seconds / self.offered * 1e6

    def retain_us_per_folded(self) -> float:
        """The writer's CPU in retention and bound steps per raw sample they folded (µs)."""
        return (self.step_cpu_s["prune"] + self.step_cpu_s["bound"]) / self.folded * 1e6


def snapshot(store: TwinStore) -> dict[str, Any]:
    """Where the store stands: used and file bytes, raw samples and bucket rows."""
    info = store.storage_info()
    footprint = store.history_footprint()
    conn = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True)
    try:
        buckets, bucket_samples = conn.execute(
            "SELECT count(*), coalesce(sum(n), 0) FROM rollups"
        ).fetchone()
        (oldest_raw,) = conn.execute("SELECT min(t0) FROM blocks").fetchone()
    finally:
        conn.close()
    wal = Path(f"{store.path}-wal")
    return {
        "used_bytes": info["used_bytes"],
        "file_bytes": store.path.stat().st_size,
        "wal_bytes": wal.stat().st_size if wal.exists() else 0,
        "raw_samples": footprint["block_samples"] + footprint["frame_samples"],
        "bucket_rows": buckets,
        "bucket_samples": bucket_samples,
        "bound_episodes": info["bound_episodes"],
        "downsampled_samples": info["downsampled_samples"],
        "oldest_raw_ts": oldest_raw,
    }


def feed_day(
    store: TwinStore,
    clock: Clock,
    stamps: list[float],
    batches: list[list[Sample]],
    pruner: Pruner,
    probe: Probe,
    peer: RawPeer | None,
) -> int:
    """Ingest one day's polls as fast as the store takes them, with the gateway's upkeep."""
    per_compaction = round(COMPACT_EVERY_S / PERIOD_S)
    per_prune = round(PRUNE_EVERY_S / PERIOD_S)
    ingest = store.ingest
    keep_t, keep_rev, perf = probe.ingest_t.append, probe.ingest_rev.append, time.perf_counter
    stored = 0
    for j, (now, batch) in enumerate(zip(stamps, batches, strict=True), 1):
        clock.now = now
        accepted = ingest(batch)
        if accepted:
            stored += accepted
            keep_t(perf())
            keep_rev(store.rev)
        if j % per_compaction == 0:
            store.compact()
        if j % per_prune == 0:
            if peer is not None:
                # Before the prune, and hourly: the bound may take raw history hours old.
                pruner.next_hour()
                peer.copy()
            pruner.prune(now)
    return stored


def settle(store: TwinStore, pruner: Pruner) -> None:
    """Until the prune, the commits and any episode at the bound are done."""
    pruner.wait()
    store.flush(timeout=600)
    writer = store._writer
    while writer is not None and writer._bound is not None:
        time.sleep(0.01)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    plant = Plant(args.seed)
    clock = Clock(T0)
    store = TwinStore(
        work / "twin.db",
        plant.points,
        clock=clock,
        history_days=args.history_days,
        rollup_days=365,
        max_db_mb=args.bound_mb,
    )
    store.open()
    peer = RawPeer(work / "peer" / "twin.db", store.path, plant.points) if args.raw_peer else None
    writer = store._writer
    assert writer is not None
    profiler = cProfile.Profile() if args.profile else None
    probe = Probe()
    probe.attach(writer, profiler)
    writer_tid = writer._thread.native_id
    pruner = Pruner(store)
    periods: list[Period] = []
    first_bound_day: int | None = None
    folded_before = 0
    generate_s = 0.0
    batches: list[list[Sample]] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    for k in range(args.days):
        if k % args.row_days == 0:
            periods.append(Period(k + 1))
        row = periods[-1]
        g0 = time.perf_counter()
        gc.unfreeze()  # yesterday's samples, freed as they go out of reference
        del batches
        gc.disable()  # millions of new tuples: the collector would walk them again and again
        stamps, batches = plant.day(k)
        # Out of the collector's sight while the day is fed: the gateway holds no such heap,
        # and its ingest must not pay for walking ours.
        gc.freeze()
        gc.enable()
        generate_s += time.perf_counter() - g0
        w0, c0, x0 = time.perf_counter(), time.process_time(), thread_cpu_s(writer_tid)
        steps0, prunes0 = dict(probe.cpu_s), len(pruner.seconds)
        copy0 = (peer.wall_s, peer.cpu_s) if peer is not None else (0.0, 0.0)
        row.stored += feed_day(store, clock, stamps, batches, pruner, probe, peer)
        settle(store, pruner)
        if peer is not None:
            peer.copy()
        copied = (peer.wall_s - copy0[0], peer.cpu_s - copy0[1]) if peer is not None else (0, 0)
        row.wall_s += time.perf_counter() - w0 - copied[0]
        row.cpu_s += time.process_time() - c0 - copied[1]
        row.writer_cpu_s += thread_cpu_s(writer_tid) - x0
        for kind in STEPS:
            row.step_cpu_s[kind] += probe.cpu_s[kind] - steps0[kind]
        row.prune_s += pruner.seconds[prunes0:]
        row.offered += sum(len(b) for b in batches)
        row.days += 1
        if first_bound_day is None and store.storage_info()["bound_episodes"]:
            first_bound_day = k + 1
        if row.days == args.row_days or k == args.days - 1:
            row.end = snapshot(store)
            row.folded = row.end["downsampled_samples"] - folded_before
            folded_before = row.end["downsampled_samples"]
            _print_period(row)
    total_wall = time.perf_counter() - started
    total_cpu = time.process_time() - cpu_started
    pruner.stop()
    del batches
    gc.unfreeze()
    raw = peer.open() if peer is not None else None
    try:
        queries = measure_queries(store, raw, clock.now, args)
    finally:
        if raw is not None:
            raw.close()
    end = snapshot(store)
    stored_total = store.stats.accepted
    store.close()
    waits, starts = probe.waits()
    stalls: dict[str, Any] = {
        "batches": len(waits),
        "wait_ms_p50": float(np.median(waits) * 1e3),
        "wait_ms_p99": float(np.percentile(waits, 99) * 1e3),
        "wait_ms_max": float(waits.max() * 1e3),
    }
    for kind in STEPS:
        stalls[f"wait_ms_max_{kind}"] = probe.worst_during(kind, waits, starts) * 1e3
        stalls[f"step_ms_max_{kind}"] = probe.longest(kind) * 1e3
        stalls[f"steps_{kind}"] = len(probe.spans.get(kind) or [])
    profile_text = None
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
        profile_text = out.getvalue()
    return {
        "periods": periods,
        "first_bound_day": first_bound_day,
        "end": end,
        "stored": stored_total,
        "peer_samples": peer.samples if peer is not None else None,
        "queries": queries,
        "stalls": stalls,
        "prune_s": pruner.seconds,
        "overran": pruner.overran,
        "generate_s": generate_s,
        "copy_s": peer.wall_s if peer is not None else 0.0,
        "total_wall_s": total_wall,
        "total_cpu_s": total_cpu,
        "profile": profile_text,
    }


# -- queries -------------------------------------------------------------------------------------


@dataclass
class Timing:
    wall_ms: float
    cpu_ms: float
    rows: int
    repeats: int


def timed(call: Callable[[], list[Any]], repeats: int) -> Timing:
    """Medians of `repeats` calls after one untimed (the reader's connection, the page cache);
    fewer, but at least MIN_REPEATS, for a query slower than QUERY_BUDGET_S / repeats."""
    w0 = time.perf_counter()
    call()
    first = time.perf_counter() - w0
    repeats = max(min(repeats, int(QUERY_BUDGET_S / max(first, 1e-6))), MIN_REPEATS)
    walls, cpus, rows = [], [], 0
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        rows = len(call())
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return Timing(statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3, rows, repeats)


def measure_queries(
    store: TwinStore, raw: TwinStore | None, now: float, args: argparse.Namespace
) -> dict[str, Any]:
    """Each query's medians on the main store and on the all-raw peer; the 30-day check."""
    # Windows end on the hour after the last poll: the stored one-minute buckets fall whole
    # into the hour buckets, so the two stores' answers can be compared bucket by bucket.
    end = math.ceil(now / 3600) * 3600
    # A whole day older than the oldest raw block left (by the raw window or by the bound).
    oldest_raw = snapshot(store)["oldest_raw_ts"] or now
    day = max(T0, (math.floor((oldest_raw - T0) / DAY_S) - 1) * DAY_S + T0)
    plan = {
        "agg_24h": (end - DAY_S, end, 60.0),
        "agg_7d": (end - 7 * DAY_S, end, 600.0),
        "agg_30d": (max(T0, end - LONG_QUERY_S), end, 3600.0),
        "agg_full": (T0, end, DAY_S),
    }
    calls: dict[str, Callable[[TwinStore], list[Any]]] = {
        name: functools.partial(_aggregate, window=window) for name, window in plan.items()
    }
    calls["history_day"] = functools.partial(_history, day=day)
    results: dict[str, Any] = {"history_day": day}
    timings: dict[str, Timing] = {}
    for name, call in calls.items():
        timings[name] = timed(functools.partial(call, store), args.repeats)
        if raw is not None:
            timings[name + "_raw"] = timed(functools.partial(call, raw), args.repeats)
    results["timings"] = timings
    results["check"] = _compare(store, raw, plan["agg_30d"]) if raw is not None else {}
    return results


def _aggregate(twin: TwinStore, window: tuple[float, float, float]) -> list[Any]:
    return twin.aggregate(QUERY_POINT, *window)


def _history(twin: TwinStore, day: float) -> list[Any]:
    return twin.history(QUERY_POINT, day, day + DAY_S, 100_000)


def _compare(store: TwinStore, raw: TwinStore, query: tuple[float, float, float]) -> dict:
    """Hour buckets from buckets + raw against the same from raw alone."""
    ours = store.aggregate(QUERY_POINT, *query)
    theirs = {b.start: b for b in raw.aggregate(QUERY_POINT, *query)}
    equal, worst_mean = 0, 0.0
    for b in ours:
        peer = theirs.get(b.start)
        if peer is None:
            continue
        equal += (b.count, b.min, b.max) == (peer.count, peer.min, peer.max)
        if b.mean is not None and peer.mean is not None:
            worst_mean = max(worst_mean, abs(b.mean - peer.mean))
    return {"buckets": len(ours), "peer_buckets": len(theirs), "equal": equal, "mean": worst_mean}


# -- the report ----------------------------------------------------------------------------------

COST_HEADER = (
    f"{'days':<7}{'offered':>10}{'stored':>10}{'wall s':>8}{'cpu s':>7}{'samples/s':>11}"
    f"{'cpu us':>8}{'writer':>8}{'compact':>8}{'retain':>8}{'prune ms p50/max':>18}"
)


def _print_header(args: argparse.Namespace, points: int) -> None:
    load = os.getloadavg()
    print(
        f"retention over {args.days} simulated days: {points} points every {PERIOD_S:g} s, raw "
        f"kept {args.history_days:g} d, one-minute buckets kept 365 d, bound {args.bound_mb:g} MB;"
        f" compaction every 5 and prune every 60 simulated minutes; load {load[0]:.2f} "
        f"{load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs",
        flush=True,
    )
    print(COST_HEADER, flush=True)


def _span(row: Period) -> str:
    return f"{row.first_day}-{row.first_day + row.days - 1}"


def _print_period(row: Period) -> None:
    prunes = row.prune_s or [0.0]
    print(
        f"{_span(row):<7}{row.offered:>10,}{row.stored:>10,}{row.wall_s:>8.1f}{row.cpu_s:>7.1f}"
        f"{row.offered / row.wall_s:>11,.0f}{row.us(row.cpu_s):>8.2f}"
        f"{row.us(row.writer_cpu_s):>8.2f}{row.us(row.step_cpu_s['compact']):>8.2f}"
        f"{row.us(row.step_cpu_s['prune'] + row.step_cpu_s['bound']):>8.2f}"
        f"{statistics.median(prunes) * 1e3:>11.0f}/{max(prunes) * 1e3:<6.0f}",
        flush=True,
    )


def report(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    periods: list[Period] = result["periods"]
    print(
        "  cpu us: the process's CPU per offered sample; writer: the writer thread's share; "
        "compact, retain: its compaction and its retention + bound steps"
    )
    print()
    print(
        f"{'days':<7}{'used MB':>9}{'file MB':>9}{'WAL MB':>8}{'raw kept':>11}{'raw since':>11}"
        f"{'folded':>11}{'us each':>8}{'bucket rows':>13}{'bound episodes':>16}"
    )
    for row in periods:
        e = row.end
        each = f"{row.retain_us_per_folded():.2f}" if row.folded else "-"
        print(
            f"{_span(row):<7}{e['used_bytes'] / MB:>9.1f}{e['file_bytes'] / MB:>9.1f}"
            f"{e['wal_bytes'] / MB:>8.1f}{e['raw_samples']:>11,}{_day_of(e['oldest_raw_ts']):>11}"
            f"{row.folded:>11,}{each:>8}{e['bucket_rows']:>13,}{e['bound_episodes']:>16}"
        )
    print(
        "  at each row's end; used: pages in use; raw since: the oldest raw block, days from the "
        "start; folded: raw samples moved into buckets in the row's days (retention and bound), "
        "us each: the writer's CPU in retention and bound steps per sample folded; first bound "
        f"episode on day {result['first_bound_day']}"
    )
    s = result["stalls"]
    print()
    print(
        f"commit waits of {s['batches']:,} ingested batches: p50 {s['wait_ms_p50']:.1f} ms, "
        f"p99 {s['wait_ms_p99']:.1f} ms, max {s['wait_ms_max']:.1f} ms"
    )
    print(f"{'writer step':<14}{'steps':>8}{'longest ms':>12}{'longest wait across one ms':>29}")
    for kind in STEPS:
        print(
            f"{kind:<14}{s[f'steps_{kind}']:>8,}{s[f'step_ms_max_{kind}']:>12.1f}"
            f"{s[f'wait_ms_max_{kind}']:>29.1f}"
        )
    prunes = result["prune_s"]
    print(
        f"prune() every simulated hour: {len(prunes):,} calls, median "
        f"{statistics.median(prunes) * 1e3:.1f} ms, max {max(prunes) * 1e3:.1f} ms (wall, "
        f"while ingest goes on); still running at the next hour {result['overran']} times"
    )
    _print_queries(result["queries"], args)
    end = result["end"]
    print()
    print(
        f"at the end: {end['used_bytes'] / MB:.1f} MB used, {end['file_bytes'] / MB:.1f} MB "
        f"file + {end['wal_bytes'] / MB:.1f} MB WAL (bound {args.bound_mb:g} MB), "
        f"{end['raw_samples']:,} raw samples since {_day_of(end['oldest_raw_ts'])}, "
        f"{end['bucket_rows']:,} bucket rows holding {end['bucket_samples']:,} samples, "
        f"{end['bound_episodes']} bound episodes; {result['stored']:,} samples stored in all"
    )
    if result["peer_samples"] is not None:
        missed = result["stored"] - result["peer_samples"]
        print(
            f"all-raw peer: {result['peer_samples']:,} samples in blocks (copied hourly in "
            f"{result['copy_s']:.1f} s, taken off the figures)"
            + (
                f"; it misses {missed:,} the bound took from the raw window before a copy"
                if missed
                else ""
            )
        )
    first, last = periods[0], periods[-1]
    second = periods[1] if len(periods) > 2 else None
    line = (
        f"run: {result['total_wall_s']:.0f} s wall, {result['total_cpu_s']:.0f} s CPU (the "
        f"samples built in {result['generate_s']:.0f} s of it); CPU a sample: days "
        f"{_span(first)} {first.us(first.cpu_s):.2f} µs, days {_span(last)} "
        f"{last.us(last.cpu_s):.2f} µs, ratio {last.us(last.cpu_s) / first.us(first.cpu_s):.2f}"
    )
    if second is not None:
        line += (
            f"; against days {_span(second)} {last.us(last.cpu_s) / second.us(second.cpu_s):.2f}"
        )
    print(line)
    if result["profile"]:
        print()
        print("the writer thread's steps and commits (cProfile, cumulative):")
        print(result["profile"])
    return _figures(result, args)


def _print_queries(q: dict[str, Any], args: argparse.Namespace) -> None:
    timings: dict[str, Timing] = q["timings"]
    print()
    print(
        f"queries on {QUERY_POINT}, medians of {args.repeats} (of n where a query takes more "
        f"than {QUERY_BUDGET_S:g} s for {args.repeats})"
    )
    print(
        f"{'query':<30}{'rows':>7}{'n':>4}{'wall ms':>10}{'cpu ms':>9}{'all raw ms':>12}"
        f"{'cpu ms':>9}{'n':>4}{'ratio':>8}"
    )
    labels = {
        "agg_24h": "aggregate 24 h at 60 s",
        "agg_7d": "aggregate 7 d at 600 s",
        "agg_30d": f"aggregate {min(args.days, 30)} d at 3600 s",
        "agg_full": f"aggregate {args.days} d at 1 d",
        "history_day": f"history() of day {(q['history_day'] - T0) / DAY_S + 1:.0f}",
    }
    for name, label in labels.items():
        t, peer = timings[name], timings.get(name + "_raw")
        extra = (
            f"{peer.wall_ms:>12.2f}{peer.cpu_ms:>9.2f}{peer.repeats:>4}"
            f"{t.wall_ms / peer.wall_ms:>8.3f}"
            if peer is not None
            else ""
        )
        print(f"{label:<30}{t.rows:>7,}{t.repeats:>4}{t.wall_ms:>10.2f}{t.cpu_ms:>9.2f}{extra}")
    check = q["check"]
    if check:
        print(
            f"hour buckets of the {min(args.days, 30)}-day aggregate against the all-raw peer: "
            f"{check['equal']} of {check['buckets']} equal in count, min and max (the peer has "
            f"{check['peer_buckets']}); largest difference of means {check['mean']:.1e}"
        )


def _figures(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    periods: list[Period] = result["periods"]
    first, last = periods[0], periods[-1]
    second = periods[1] if len(periods) > 2 else None
    end, s = result["end"], result["stalls"]
    prunes = result["prune_s"]
    folding = [p for p in periods if p.folded]
    figures: dict[str, Any] = {
        "days": args.days,
        "row_days": args.row_days,
        "history_days": args.history_days,
        "bound_mb": args.bound_mb,
        "db_used_mb_end": round(end["used_bytes"] / MB, 2),
        "db_file_mb_end": round(end["file_bytes"] / MB, 2),
        "wal_mb_end": round(end["wal_bytes"] / MB, 2),
        "db_used_mb_max": round(max(p.end["used_bytes"] for p in periods) / MB, 2),
        "db_file_mb_max": round(max(p.end["file_bytes"] for p in periods) / MB, 2),
        "bound_first_day": result["first_bound_day"],
        "bound_episodes": end["bound_episodes"],
        "raw_samples_end": end["raw_samples"],
        "raw_days_end": round((T0 + args.days * DAY_S - end["oldest_raw_ts"]) / DAY_S, 2)
        if end["oldest_raw_ts"]
        else 0.0,
        "bucket_rows_end": end["bucket_rows"],
        "samples_per_s_first": round(first.offered / first.wall_s),
        "samples_per_s_last": round(last.offered / last.wall_s),
        "cpu_us_per_sample_first": round(first.us(first.cpu_s), 3),
        "cpu_us_per_sample_last": round(last.us(last.cpu_s), 3),
        "retain_cpu_us_per_sample_last": round(
            last.us(last.step_cpu_s["prune"] + last.step_cpu_s["bound"]), 3
        ),
        "compact_cpu_us_per_sample_last": round(last.us(last.step_cpu_s["compact"]), 3),
        # Retention's own cost over time: per sample folded, the first row that folded against
        # the last (the bound folds more than comes in while it shrinks the raw window).
        "retain_us_per_folded_first": round(folding[0].retain_us_per_folded(), 3)
        if folding
        else None,
        "retain_us_per_folded_last": round(folding[-1].retain_us_per_folded(), 3)
        if folding
        else None,
        "retain_ratio_last_first": round(
            folding[-1].retain_us_per_folded() / folding[0].retain_us_per_folded(), 3
        )
        if len(folding) > 1
        else None,
        "cost_ratio_last_first": round(last.us(last.cpu_s) / first.us(first.cpu_s), 3),
        "cost_ratio_last_second": round(last.us(last.cpu_s) / second.us(second.cpu_s), 3)
        if second is not None
        else None,
        "wall_ratio_last_first": round(
            (last.wall_s / last.offered) / (first.wall_s / first.offered), 3
        ),
        "commit_wait_ms_p50": round(s["wait_ms_p50"], 2),
        "commit_wait_ms_p99": round(s["wait_ms_p99"], 2),
        "max_commit_gap_ms": round(s["wait_ms_max"], 1),
        "max_commit_gap_ms_prune": round(s["wait_ms_max_prune"], 1),
        "max_commit_gap_ms_bound": round(s["wait_ms_max_bound"], 1),
        "prune_step_ms_max": round(s["step_ms_max_prune"], 1),
        "bound_step_ms_max": round(s["step_ms_max_bound"], 1),
        "compact_step_ms_max": round(s["step_ms_max_compact"], 1),
        "prune_ms_median": round(statistics.median(prunes) * 1e3, 1),
        "prune_ms_max": round(max(prunes) * 1e3, 1),
    }
    timings: dict[str, Timing] = result["queries"]["timings"]
    for name, t in timings.items():
        figures[f"{name}_ms"] = round(t.wall_ms, 2)
        figures[f"{name}_cpu_ms"] = round(t.cpu_ms, 2)
        figures[f"{name}_rows"] = t.rows
    for name in ("agg_30d", "agg_full", "history_day"):
        if name + "_raw" in timings:
            figures[f"{name}_ratio"] = round(
                timings[name].wall_ms / timings[name + "_raw"].wall_ms, 3
            )
    check = result["queries"]["check"]
    if check:
        figures["agg_30d_buckets_equal"] = f"{check['equal']}/{check['buckets']}"
    figures["run_wall_s"] = round(result["total_wall_s"], 1)
    return figures


def _day_of(ts: float | None) -> str:
    """A time as simulated days since the start."""
    return "-" if ts is None else f"{(ts - T0) / DAY_S:.1f} d"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="10 days, raw kept 2, bound 6 MB, a row per 2 days"
    )
    parser.add_argument("--days", type=int, default=None)
    parser.add_argument("--history-days", type=float, default=None)
    parser.add_argument("--bound-mb", type=float, default=None)
    parser.add_argument("--row-days", type=int, default=None, help="simulated days per row")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--no-raw-peer", dest="raw_peer", action="store_false")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    days, history_days, bound_mb, row_days = QUICK if args.quick else FULL
    args.row_days = args.row_days or row_days
    args.days = args.days or days
    args.history_days = args.history_days or history_days
    args.bound_mb = args.bound_mb or bound_mb
    if args.days < 2 or args.repeats < 1 or args.row_days < 1:
        sys.exit("retention.py: --days must be at least 2, --repeats and --row-days at least 1")
    with tempfile.TemporaryDirectory(prefix="opstwin-retention-") as tmp:
        work = Path(tmp)
        log_to_file(work / "bench.log")
        _print_header(args, len(Plant(args.seed).points))
        figures = report(run(args, work), args)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
