"""Anomaly detectors' cost per sample beside the twin's own ingest, measured in one process.

    .venv/bin/python bench/anomaly.py [--points 10000] [--samples 200000] [--repeats 5]
                                      [--kinds zscore,ewma,...]

Every detector kind on every point (one rule `**`: zscore, ewma, rate_of_change, flatline,
out_of_range, stale; `--kinds` picks fewer), float32 points. Batches like the Modbus driver's:
one per 1 s poll, in plan order, holding only the points whose value changed; values are
stationary noise around a level per point, so the detectors stay nearly quiet, as on a healthy
plant. Cases:

- `ingest.py`: bench/ingest.py's own shape (1,000 points, batches of 500, every sample a change);
- `all changed`, `10 % changed`, `1 % changed`: --points points, that share changing each poll
  (all changed: at least 60 polls, so that the z-score windows wrap within a run).

The detector sets are warmed up untimed first (70 polls of every point: past the z-score window
and the EWMA warm-up) and keep their state and clock from round to round: what is timed is the
steady state. Each round times, interleaved, on the same batches (`--samples` samples per case):

- twin: `TwinStore.ingest()` of every batch, then `flush()`, i.e. until everything is committed
  (bench/ingest.py's measurement, with its CPU time);
- twin + detectors: the same, with `DetectorSet.on_samples(batch, now)` after each ingest and
  `check(now)` once per poll, as the gateway's pump and a 1 s timer would call them;
- banks: the same detector calls alone (the column banks `DetectorSet` uses) and, on a tenth of
  the polls, objects: the detector classes (`vectorized=False`, the reference implementation).

Figures are medians over rounds, per sample: CPU time (`time.process_time`, the writer thread
included) beside wall time. "added" is (twin + detectors - twin) / twin, in CPU and in wall
time: the cost in place, caches shared, but the difference of two runs whose CPU per sample
varies by +-20 % between identical runs on this shared machine. "share" is banks / twin in CPU:
the detectors' own cost, steadier. Ratios are medians of per-round ratios. Target: detectors
add <= 10 % to ingest, judged on "added" (it has run higher than "share"). The last line of
output is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from drivers.contract import Quality, Sample
from gateway.policy.anomaly import AnomalyConfig, DetectorSet
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore

T0 = 1.7e9
FLUSH_ROWS = 5000  # as bench/ingest.py
TARGET = 0.10
WARMUP_POLLS = 70  # past the z-score window (60) and the EWMA warm-up (50) of DETECTORS
MIN_FULL_POLLS = 60  # polls of the all-changed case: at least one z-score window pass
DETECTORS: list[dict[str, Any]] = [
    {"kind": "zscore", "window": 60, "threshold": 5.0},
    {"kind": "ewma", "alpha": 0.2, "limit_sigmas": 4.0, "warmup": 50},
    {"kind": "rate_of_change", "max_rate": 20.0},
    {"kind": "flatline", "duration_s": 3600.0, "tolerance": 0.001},
    {"kind": "out_of_range", "lo": -1000.0, "hi": 1000.0},
    {"kind": "stale", "max_age_s": 3600.0},
]


class Plant:
    """Points with a level each; a poll reads them as that level plus N(0, 1) noise."""

    def __init__(self, count: int, seed: int) -> None:
        self.points = [
            PointDef(f"plant/line{i % 10}/asset{i // 10}/signal{i}", "bench", "float32")
            for i in range(count)
        ]
        self.rng = random.Random(seed)
        self.levels = [self.rng.uniform(0, 100) for _ in self.points]

    def poll(self, chosen: Iterable[int]) -> list[Sample]:
        """One batch: the chosen points (in plan order), each with a fresh noisy value."""
        gauss, points, levels = self.rng.gauss, self.points, self.levels
        return [Sample(points[k].id, levels[k] + gauss(0, 1), Quality.GOOD, T0) for k in chosen]


class Case:
    """One shape of batches: the batches of `polls` polls (cycled if fewer are stored)."""

    def __init__(self, name: str, plant: Plant, batches: list[list[Sample]], polls: int) -> None:
        self.name = name
        self.plant = plant
        self.points = plant.points
        self.batches = batches
        self.polls = polls
        self.samples = sum(len(batches[k % len(batches)]) for k in range(polls))

    def polled(self) -> Iterator[list[Sample]]:
        """The batches of one run, in order."""
        for k in range(self.polls):
            yield self.batches[k % len(self.batches)]


class Fed:
    """A detector set in steady state (warmed up untimed), keeping its clock across rounds."""

    def __init__(self, config: AnomalyConfig, case: Case, *, vectorized: bool = True) -> None:
        self.detectors = DetectorSet.from_config(
            config, case.points, start=T0, vectorized=vectorized
        )
        self.now = T0
        # Every point past the longest warm-up (window 60, ewma warmup 50): no startup in it.
        everything = range(len(case.points))
        for _ in range(WARMUP_POLLS):
            self.poll(case.plant.poll(everything))

    def poll(self, batch: list[Sample]) -> int:
        """One poll, 1 s after the last: the batch, then the periodic check; return anomalies."""
        self.now += 1.0
        return len(self.detectors.on_samples(batch, self.now)) + len(self.detectors.check(self.now))


def main(argv: list[str] | None = None) -> int:
    """Time every case in interleaved rounds; print a table of medians and one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=200_000, help="samples per case")
    parser.add_argument("--repeats", type=int, default=5, help="rounds")
    parser.add_argument("--dir", default=None, help="where the databases go (default: a temp dir)")
    parser.add_argument(
        "--kinds",
        default=",".join(d["kind"] for d in DETECTORS),
        help="comma-separated detector kinds on every point (default: all six)",
    )
    args = parser.parse_args(argv)

    kinds = args.kinds.split(",")
    chosen = [d for d in DETECTORS if d["kind"] in kinds]
    if len(chosen) != len(kinds):
        parser.error(f"--kinds: choose from {', '.join(d['kind'] for d in DETECTORS)}")
    config = AnomalyConfig.model_validate({"rules": [{"points": ["**"], "detectors": chosen}]})
    cases = [
        ingest_shape(args.samples),
        modbus_shape("all changed", args.points, 1.0, args.samples),
        modbus_shape("10 % changed", args.points, 0.1, args.samples),
        modbus_shape("1 % changed", args.points, 0.01, args.samples),
    ]
    print(
        f"anomaly detector benchmark: {len(chosen)} detectors on every point ({args.kinds}), "
        f"{args.samples:,} samples per case, {args.repeats} rounds (medians), "
        f"Python {sys.version.split()[0]}"
    )
    sets = {
        case.name: {
            "both": Fed(config, case),
            "banks": Fed(config, case),
            "objects": Fed(config, case, vectorized=False),
        }
        for case in cases
    }
    runs: dict[str, list[dict[str, float]]] = {case.name: [] for case in cases}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for round_ in range(args.repeats):
            for case in cases:
                folder = Path(tmp) / f"r{round_}"
                runs[case.name].append(measure(case, sets[case.name], folder))
            print(f"  round {round_ + 1}/{args.repeats} done", flush=True)
    check_ms = statistics.median(time_check(config, cases[1].points) for _ in range(5))

    medians = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for name, results in runs.items()
    }
    print()
    print_table(cases, medians)
    print()
    print("us/sample: CPU (process_time, the twin's writer thread included) / wall. twin: ingest")
    print("until committed; + detectors: with on_samples per batch and check once per poll;")
    print("banks: DetectorSet alone (what the gateway runs); objects: the reference classes.")
    print("added CPU: (twin + detectors - twin) / twin in CPU, median of the rounds' ratios;")
    print("wall: the same in wall time (what bench/ingest.py's updates/s would lose); share:")
    print("banks / twin in CPU; banks/poll: the detectors' CPU per batch (a fixed part, ~100 us,")
    print("and a part per sample); anomalies: found in one round of twin + detectors.")
    print(f"check(now) over {len(cases[1].points):,} points: {check_ms:.3f} ms per call.")
    met = [name for name, m in medians.items() if m["added"] <= TARGET]
    print(
        f"target (detectors add <= {TARGET:.0%} to ingest, CPU in place): "
        f"met in {len(met)} of {len(medians)} cases{': ' if met else ''}{', '.join(met)}"
    )
    summary = {
        "points": args.points,
        "detectors_per_point": len(chosen),
        "cases": {
            name: {
                "batch": round(m["batch"]),
                "twin_cpu_us": round(m["twin_cpu"], 3),
                "with_detectors_cpu_us": round(m["both_cpu"], 3),
                "detectors_cpu_us": round(m["banks_cpu"], 3),
                "objects_cpu_us": round(m["objects_cpu"], 3),
                "banks_per_poll_us": round(m["banks_per_poll_us"], 1),
                "added": round(m["added"], 3),
                "added_wall": round(m["added_wall"], 3),
                "share": round(m["share"], 3),
            }
            for name, m in medians.items()
        },
        "check_ms": round(check_ms, 3),
        "target_met": len(met) == len(medians),
    }
    print(json.dumps(summary))
    return 0


def print_table(cases: list[Case], medians: dict[str, dict[str, float]]) -> None:
    """One row per case: batch size, then CPU / wall us per sample, then the added share."""
    head = (
        f"{'case':<14} {'batch':>6} {'twin':>15} {'twin + detectors':>17} {'banks':>15} "
        f"{'objects':>15} {'added CPU':>9} {'wall':>7} {'share':>6} {'banks/poll':>11} "
        f"{'anomalies':>9}"
    )
    print(head)
    print("-" * len(head))
    for case in cases:
        m = medians[case.name]
        print(
            f"{case.name:<14} {m['batch']:>6,.0f} {pair(m, 'twin'):>15} {pair(m, 'both'):>17} "
            f"{pair(m, 'banks'):>15} {pair(m, 'objects'):>15} {m['added']:>+9.1%} "
            f"{m['added_wall']:>+7.1%} {m['share']:>6.0%} {m['banks_per_poll_us']:>8,.0f} us "
            f"{m['anomalies']:>9,.0f}"
        )


def pair(m: dict[str, float], key: str) -> str:
    """`cpu / wall` in us per sample."""
    return f"{m[key + '_cpu']:.3f} / {m[key + '_wall']:.3f}"


def measure(case: Case, sets: dict[str, Fed], folder: Path) -> dict[str, float]:
    """One round of one case: twin, twin + detectors, banks, objects; us per sample."""
    folder.mkdir(parents=True, exist_ok=True)
    n = case.samples
    out: dict[str, float] = {"batch": n / case.polls}
    twin_cpu, twin_wall, _ = run_twin(folder / f"{case.name}-a.db", case, None)
    both_cpu, both_wall, found = run_twin(folder / f"{case.name}-b.db", case, sets["both"])
    banks_cpu, banks_wall = timed(lambda: feed(sets["banks"], case.polled()))
    # The objects cost ~15x more: a tenth of the polls is enough to price them.
    tenth = list(case.polled())[: max(1, case.polls // 10)]
    objects_cpu, objects_wall = timed(lambda: feed(sets["objects"], tenth))
    tenth_n = sum(len(b) for b in tenth)
    out.update(
        twin_cpu=twin_cpu / n * 1e6,
        twin_wall=twin_wall / n * 1e6,
        both_cpu=both_cpu / n * 1e6,
        both_wall=both_wall / n * 1e6,
        banks_cpu=banks_cpu / n * 1e6,
        banks_wall=banks_wall / n * 1e6,
        objects_cpu=objects_cpu / tenth_n * 1e6,
        objects_wall=objects_wall / tenth_n * 1e6,
        added=(both_cpu - twin_cpu) / twin_cpu,
        added_wall=(both_wall - twin_wall) / twin_wall,
        share=banks_cpu / twin_cpu,
        banks_per_poll_us=banks_cpu / case.polls * 1e6,
        anomalies=found,
    )
    return out


def run_twin(path: Path, case: Case, fed: Fed | None) -> tuple[float, float, int]:
    """Ingest every batch (and feed the detectors), then wait until all is committed; return
    CPU seconds, wall seconds and the anomalies found."""
    store = TwinStore(path, case.points, flush_rows=FLUSH_ROWS)
    store.open()
    found = 0
    try:
        gc.collect()
        c0, w0 = time.process_time(), time.perf_counter()
        if fed is None:
            for batch in case.polled():
                store.ingest(batch)
        else:
            for batch in case.polled():
                store.ingest(batch)
                found += fed.poll(batch)
        store.flush(timeout=300)
        c1, w1 = time.process_time(), time.perf_counter()
        if store.stats.accepted != case.samples:
            raise SystemExit(f"bench: {case.name}: only {store.stats.accepted} samples accepted")
    finally:
        store.close()
    return c1 - c0, w1 - w0, found


def feed(fed: Fed, batches: Iterable[list[Sample]]) -> None:
    """Feed every batch and check once per poll, without the twin."""
    for batch in batches:
        fed.poll(batch)


def timed(work: Callable[[], None]) -> tuple[float, float]:
    """CPU and wall seconds of one call."""
    gc.collect()
    c0, w0 = time.process_time(), time.perf_counter()
    work()
    return time.process_time() - c0, time.perf_counter() - w0


def time_check(config: AnomalyConfig, points: list[PointDef]) -> float:
    """Milliseconds of one `check(now)` over every point (nothing fires)."""
    detectors = DetectorSet.from_config(config, points, start=T0)
    c0 = time.process_time()
    for k in range(100):
        detectors.check(T0 + k)
    return (time.process_time() - c0) / 100 * 1e3


def ingest_shape(samples: int) -> Case:
    """bench/ingest.py's batches: 1,000 points, 500 per batch, every sample a change (here a
    stationary one, so that the detectors see a healthy plant)."""
    plant = Plant(1000, seed=7)
    halves = (range(0, 500), range(500, 1000))
    polls = max(2, samples // 500)
    return Case("ingest.py", plant, [plant.poll(halves[k % 2]) for k in range(polls)], polls)


def modbus_shape(name: str, count: int, share: float, samples: int) -> Case:
    """One batch per poll of the points whose value changed, in plan (point) order."""
    plant = Plant(count, seed=16)
    changing = max(1, round(count * share))
    polls = max(1, samples // changing)
    if changing == count:  # long enough for the z-score windows to wrap
        polls = max(polls, MIN_FULL_POLLS)
    batches = [plant.poll(sorted(plant.rng.sample(range(count), changing))) for _ in range(polls)]
    return Case(name, plant, batches, polls)


if __name__ == "__main__":
    sys.exit(main())
