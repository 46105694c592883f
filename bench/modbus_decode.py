"""Modbus ingest cost per point: the driver's poll with the network taken out.

    .venv/bin/python bench/modbus_decode.py [--against REV] [--polls 20] [--repeats 5]

One `ModbusDriver` with 160 blocks of 62 float32 points (9,920 points, limits [0, 100]: one
block is one full 124-register read), whose `_read_raw` is replaced by a coroutine that hands
back prepared registers (a fresh list per read, as pymodbus does). Timed: `_poll()` as the
supervisor runs it (every block's decode, quality and samples, `_log_transitions`, `_emit`),
per point, wall time (perf_counter) and CPU time (process_time) beside it; the batch queue is
drained outside the clock. Three cases, each after one untimed poll:

- all changed: every point's value differs from the poll before (two register sets in turn);
- 1 % changed: 99 points chosen at random change in each poll;
- none changed: the same registers every poll.

`--against REV` measures the driver of git revision REV as well (its `drivers/` exported with
`git archive` into a temporary directory), alternating old and new worker processes, and prints
both side by side with the ratio. Every figure is the median over `--repeats` worker runs; each
run times `--polls` polls per case. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = 160
PER_BLOCK = 62  # float32 points: 124 registers, one request (max_registers 125)
CASES = ("all changed", "1 % changed", "none changed")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the workers, print a table of medians and one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", metavar="REV", help="also measure the driver of git REV")
    parser.add_argument("--polls", type=int, default=20, help="timed polls per case and run")
    parser.add_argument("--repeats", type=int, default=5, help="worker runs per tree")
    parser.add_argument(
        "--case", choices=CASES, action="append", help="only this case (repeatable)"
    )
    parser.add_argument("--worker", metavar="TREE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        use_tree(args.worker)
        print(json.dumps(asyncio.run(measure(args.polls, args.case or CASES))))
        return 0
    chosen = [case for case in CASES if case in (args.case or CASES)]

    points = BLOCKS * PER_BLOCK
    print(
        f"Modbus ingest benchmark: {points:,} float32 points in {BLOCKS} blocks of {PER_BLOCK}, "
        f"{args.polls} polls per case, {args.repeats} runs per tree (medians), "
        f"Python {sys.version.split()[0]}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"now": str(ROOT)}
        if args.against:
            trees = {args.against: export(args.against, Path(tmp)), **trees}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        for repeat in range(args.repeats):
            # Alternate the order: a neighbour's load on a shared machine hits both alike.
            order = list(trees) if repeat % 2 == 0 else list(reversed(trees))
            for name in order:
                runs[name].append(run_worker(trees[name], args.polls, chosen))
            print(f"  run {repeat + 1}/{args.repeats} done", flush=True)

    medians = {
        name: {
            case: {
                key: statistics.median(r[case][key] for r in results)
                for key in ("wall_us", "cpu_us", "samples")
            }
            for case in chosen
        }
        for name, results in runs.items()
    }
    print()
    print_table(medians, chosen)
    print()
    print("us/point: one poll's time over the points it read (the network taken out); samples:")
    print("samples the poll handed to the twin. CPU is the process's, wall includes its waits.")
    summary: dict[str, Any] = {
        "points": points,
        "us_per_point": {
            name: {case: round(m[case]["cpu_us"], 4) for case in chosen}
            for name, m in medians.items()
        },
    }
    if args.against:
        old, new = medians[args.against], medians["now"]
        summary["cpu_ratio_old_over_new"] = {
            case: round(old[case]["cpu_us"] / new[case]["cpu_us"], 2) for case in chosen
        }
    print(json.dumps(summary))
    return 0


def print_table(medians: dict[str, dict[str, dict[str, float]]], cases: Sequence[str]) -> None:
    """One row per case; per tree wall and CPU us/point and samples; the CPU ratio if two."""
    names = list(medians)
    head = f"{'case':<14}"
    for name in names:
        label = name[:12]
        head += f" {label + ' wall':>18} {label + ' CPU':>17} {'samples':>8}"
    if len(names) == 2:
        head += f" {'CPU old/new':>12}"
    print(head)
    print("-" * len(head))
    for case in cases:
        row = f"{case:<14}"
        for name in names:
            m = medians[name][case]
            row += f" {m['wall_us']:>15.3f} us {m['cpu_us']:>14.3f} us {m['samples']:>8,.0f}"
        if len(names) == 2:
            old, new = (medians[n][case]["cpu_us"] for n in names)
            row += f" {old / new:>11.1f}x"
        print(row)


def export(rev: str, into: Path) -> str:
    """Write `drivers/` of git revision `rev` under `into`; return the directory."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "drivers"],
        check=True,
        capture_output=True,
    ).stdout
    tree = into / "tree"
    tree.mkdir()
    tar_path = into / "drivers.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(tree, filter="data")
    return str(tree)


def run_worker(tree: str, polls: int, cases: Sequence[str]) -> dict[str, Any]:
    """Measure one tree in a fresh interpreter; return its figures per case."""
    chosen = [arg for case in cases for arg in ("--case", case)]
    done = subprocess.run(
        [sys.executable, __file__, "--worker", tree, "--polls", str(polls), *chosen],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def use_tree(tree: str) -> None:
    """Import `drivers` from `tree` (put first on sys.path), not from the installed project."""
    sys.path.insert(0, tree)
    import drivers

    if not Path(drivers.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"bench: imported {drivers.__file__}, not the tree {tree}")


async def measure(polls: int, which: Sequence[str]) -> dict[str, dict[str, float]]:
    """Time the driver `use_tree` chose over each case in `which`."""
    from drivers.modbus import ModbusDriver, ModbusPoint

    count = BLOCKS * PER_BLOCK
    points = [
        ModbusPoint(f"p{i}", f"holding:{2 * i}", "float32", lo=0, hi=100) for i in range(count)
    ]
    driver = ModbusDriver("bench", "tcp://127.0.0.1:502", {}, points)
    plan = driver.read_plan
    if len(plan) != BLOCKS or any(len(b.points) != PER_BLOCK for b in plan):
        raise SystemExit(f"bench: planned {len(plan)} blocks, expected {BLOCKS} of {PER_BLOCK}")

    rng = random.Random(14)
    values = [rng.uniform(0, 100) for _ in range(count)]
    current: dict[int, list[int]] = {}

    async def fake_read_raw(block: Any, *, held: bool = False) -> tuple[list[Any], float]:
        return list(current[block.start]), time.time()

    driver._read_raw = fake_read_raw  # type: ignore[method-assign]

    def registers(vals: list[float]) -> dict[int, list[int]]:
        words = list(struct.unpack(f">{2 * count}H", struct.pack(f">{count}f", *vals)))
        return {b.start: words[b.start : b.end] for b in plan}

    shifted = [v + 0.5 if v < 50 else v - 0.5 for v in values]
    first, second = registers(values), registers(shifted)
    moving, few = list(values), [first]
    for _ in range(polls):
        for i in rng.sample(range(count), count // 100):
            moving[i] = rng.uniform(0, 100)
        few.append(registers(moving))
    # Per case, the registers of the untimed poll, then those of each timed poll.
    cases = {
        "all changed": [first if n % 2 == 0 else second for n in range(polls + 1)],
        "1 % changed": few,
        "none changed": [first] * (polls + 1),
    }

    results: dict[str, dict[str, float]] = {}
    for case in which:
        sets = cases[case]
        current.update(sets[0])
        await driver._poll()  # untimed: the point's first sample, whatever the case
        drain(driver)
        gc.collect()
        wall = cpu = 0.0
        samples = 0
        for n in range(polls):
            current.update(sets[n + 1])
            w0, c0 = time.perf_counter(), time.process_time()
            await driver._poll()
            c1, w1 = time.process_time(), time.perf_counter()
            wall += w1 - w0
            cpu += c1 - c0
            samples += drain(driver)
        results[case] = {
            "wall_us": wall / polls / count * 1e6,
            "cpu_us": cpu / polls / count * 1e6,
            "samples": samples / polls,
        }
    return results


def drain(driver: Any) -> int:
    """Empty the driver's batch queue; return how many samples it held."""
    samples = 0
    while not driver._queue.empty():
        batch = driver._queue.get_nowait()
        samples += len(batch or ())
    return samples


if __name__ == "__main__":
    sys.exit(main())
