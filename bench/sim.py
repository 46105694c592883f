"""What-if simulation throughput: NumPy reference, C kernel (1 and 2 threads), bare C RNG floor.

    .venv/bin/python bench/sim.py [--paths 10000] [--repeats 5] [--numpy-repeats 3] [--seed 1]

Scenario: the reference oven — FOPDT with gain normal(1.2, 0.1), tau uniform(80, 140) s,
theta triangular(5, 10, 20) s, sigma_w 0.05, sigma_v 0.3, y0 180, input step 180 -> 200 at
t = 10 s, dt 1 s, horizon 600 s (600 steps), 10,000 paths, one upper constraint at 203 degC,
KPIs final and max; percentiles of y every step. Each run is one blocking `simulate()` call,
timed end to end (Python setup + kernel + summaries).

Every rate is path-steps per second (paths x steps / seconds). The floor is
`native.rng_floor(seed, n, threads=1)`: a bare C loop drawing n ziggurat normals from the
kernel's generator, with n = the normals the kernel draws for the same scenario — per path-step 2
(process noise w + measurement noise v), per path 1 more (gain is normal; tau and theta are drawn
from uniforms, not counted). It is reported as normals/s and as the equivalent path-steps/s =
normals/s / normals per path-step; the C-vs-floor ratio uses the path-step equivalent.
The last line of output is one JSON object with the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from types import ModuleType

# OpenBLAS worker threads (started with NumPy) busy-wait after a call; perf showed them taking
# ~5 % of the samples of C-only runs on a 2-CPU machine, CPU the kernel's second thread needs.
# Nothing here needs parallel BLAS, so pin it to one thread unless the caller chose otherwise
# (the header prints the value).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from gateway.sim import (
    Constraint,
    FopdtModel,
    Kpi,
    Normal,
    Scenario,
    StepInput,
    Triangular,
    Uniform,
    native,
    simulate,
)

STEPS = 600
TARGET_C1_VS_NUMPY = 4.0
TARGET_C2_VS_C1 = 1.8
TARGET_C1_VS_FLOOR = 0.30


def oven(
    paths: int, seed: int, *, constraint: bool = True, uncertain: bool = True, noise: bool = True
) -> Scenario:
    """The reference oven scenario (optionally without its constraint, uncertainty or noise)."""
    model = FopdtModel(
        gain=Normal(mean=1.2, sd=0.1) if uncertain else 1.2,
        tau=Uniform(lo=80, hi=140) if uncertain else 110.0,
        theta=Triangular(lo=5, mode=10, hi=20) if uncertain else 10.0,
        sigma_w=0.05 if noise else 0.0,
        sigma_v=0.3 if noise else 0.0,
    )
    return Scenario(
        model=model,
        y0=180.0,
        input=StepInput(u0=180.0, u1=200.0, t_step=10.0),
        horizon_s=float(STEPS),
        dt_s=1.0,
        paths=paths,
        seed=seed,
        constraints=[Constraint(kind="upper", limit=203.0)] if constraint else [],
        kpis=[Kpi(kind="final"), Kpi(kind="max")],
    )


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """Median wall time of fn() over repeats (plus every time)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main(argv: list[str] | None = None) -> int:
    """Time every variant several times, print a table of medians, then one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each C measurement")
    parser.add_argument("--numpy-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    scenario = oven(args.paths, args.seed)
    path_steps = args.paths * STEPS
    normals_per_path = 2 * STEPS + 1  # w and v every step, plus the normal gain draw
    normals = args.paths * normals_per_path
    normals_per_path_step = normals_per_path / STEPS
    kernel = native.load_kernel()
    print(
        f"what-if simulation benchmark: reference oven, {args.paths:,} paths x {STEPS} steps "
        f"= {path_steps:,} path-steps; C {args.repeats} repeats, NumPy {args.numpy_repeats} "
        f"repeats (medians), {os.cpu_count()} CPUs, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}"
    )

    # Warm up: kernel import, ziggurat tables, NumPy first-touch.
    native.simulate(oven(256, args.seed), threads=1, kernel=kernel)
    simulate(oven(256, args.seed), backend="numpy")
    native.rng_floor(args.seed, 100_000, threads=1, kernel=kernel)

    t_np, all_np = timed(lambda: simulate(scenario, backend="numpy"), args.numpy_repeats)
    print(f"  NumPy     runs (s): {' '.join(f'{t:.3f}' for t in all_np)}", flush=True)
    # C runs are interleaved (1 thread, 2 threads, floor, 1 thread, ...) so that a transient
    # load on the machine hits every measurement alike rather than one whole column.
    c_runs: dict[str, list[float]] = {"c1": [], "c2": [], "floor": []}
    c2_cpu: list[float] = []
    for _ in range(args.repeats):
        c_runs["c1"].append(
            timed(lambda: native.simulate(scenario, threads=1, kernel=kernel), 1)[0]
        )
        cpu0 = time.process_time()
        c_runs["c2"].append(
            timed(lambda: native.simulate(scenario, threads=2, kernel=kernel), 1)[0]
        )
        c2_cpu.append((time.process_time() - cpu0) / c_runs["c2"][-1])
        c_runs["floor"].append(
            timed(lambda: native.rng_floor(args.seed, normals, threads=1, kernel=kernel), 1)[0]
        )
    for key, label in (("c1", "C 1 thr"), ("c2", "C 2 thr"), ("floor", "RNG floor")):
        print(f"  {label:<9} runs (s): {' '.join(f'{t:.3f}' for t in c_runs[key])}")
    print(f"  C 2 thr CPU/wall: {' '.join(f'{u:.2f}' for u in c2_cpu)}  (2.00 = both threads busy)")
    t_c1, t_c2, t_fl = (statistics.median(c_runs[k]) for k in ("c1", "c2", "floor"))

    r_np, r_c1, r_c2 = path_steps / t_np, path_steps / t_c1, path_steps / t_c2
    floor_normals = normals / t_fl
    floor_ps = floor_normals / normals_per_path_step
    c1_vs_np, c2_vs_c1, c1_vs_floor = r_c1 / r_np, r_c2 / r_c1, r_c1 / floor_ps

    print()
    print(f"{'measure':<46} {'path-steps/s':>14} {'time/run':>10}")
    print(f"{'-' * 46} {'-' * 14} {'-' * 10}")
    for label, rate, t in (
        ("NumPy reference", r_np, t_np),
        ("C kernel, 1 thread", r_c1, t_c1),
        ("C kernel, 2 threads", r_c2, t_c2),
        ("bare RNG floor, 1 thread (path-step equiv.)", floor_ps, t_fl),
    ):
        print(f"{label:<46} {rate:>14,.0f} {t * 1000:>8.1f}ms")
    print(
        f"bare RNG floor: {floor_normals:,.0f} normals/s ({normals:,} normals per run, "
        f"{normals_per_path_step:.4f} normals per path-step)"
    )
    print()
    ratios = (
        ("C 1 thread / NumPy", c1_vs_np, TARGET_C1_VS_NUMPY, ".2f", "x"),
        ("C 2 threads / C 1 thread", c2_vs_c1, TARGET_C2_VS_C1, ".2f", "x"),
        ("C 1 thread / RNG floor (path-step equiv.)", c1_vs_floor, TARGET_C1_VS_FLOOR, ".0%", ""),
    )
    print(f"{'ratio':<46} {'value':>8} {'target':>8}  result")
    print(f"{'-' * 46} {'-' * 8} {'-' * 8}  ------")
    missed = []
    for label, value, target, fmt, unit in ratios:
        ok = value >= target
        if not ok:
            missed.append(label)
        v, tg = f"{value:{fmt}}{unit}", f">={target:{fmt}}{unit}"
        print(f"{label:<46} {v:>8} {tg:>8}  {'met' if ok else 'MISSED'}")
    print()
    print("Rates are paths x steps / median wall time of one simulate() call (setup, kernel,")
    print("percentiles p5..p99 every step, constraint, KPIs). The floor draws the kernel's")
    print(f"normals ({normals_per_path} per path: 2 per step + 1 for the gain) in a bare C loop;")
    print("its path-step equivalent (normals/s / normals per path-step) is what the ratio uses.")

    if missed:
        profile(args, kernel, {"numpy": r_np, "c1": r_c1, "c2": r_c2, "floor": floor_ps}, t_fl)
    print(
        json.dumps(
            {
                "numpy_path_steps_per_s": round(r_np),
                "c1_path_steps_per_s": round(r_c1),
                "c2_path_steps_per_s": round(r_c2),
                "rng_floor_per_s": round(floor_ps),
                "c1_vs_numpy": round(c1_vs_np, 3),
                "c2_vs_c1": round(c2_vs_c1, 3),
                "c1_vs_floor": round(c1_vs_floor, 3),
            }
        )
    )
    return 0


def profile(
    args: argparse.Namespace, kernel: ModuleType, rates: dict[str, float], t_floor: float
) -> None:
    """Briefly break one C 1-thread run down by varying the scenario; print a one-line verdict."""
    print()
    print(f"profile (C, 1 thread, {args.paths:,} x {STEPS}, medians of {args.repeats}):")
    variants = (
        ("full reference oven", oven(args.paths, args.seed)),
        ("without the constraint", oven(args.paths, args.seed, constraint=False)),
        ("without parameter uncertainty", oven(args.paths, args.seed, uncertain=False)),
        ("without noise (no per-step normals)", oven(args.paths, args.seed, noise=False)),
    )
    times = {}
    for label, sc in variants:
        t, _ = timed(partial(native.simulate, sc, threads=1, kernel=kernel), args.repeats)
        times[label] = t
        print(f"  {label:<44} {t * 1000:8.1f} ms")
    t_full = times["full reference oven"]
    t_quiet = times["without noise (no per-step normals)"]
    rng_ms = (t_full - t_quiet) * 1000
    print(f"  bare RNG loop, same normals                  {t_floor * 1000:8.1f} ms")
    print(
        f"  -> per-step normals cost ~{rng_ms:.0f} ms of {t_full * 1000:.0f} ms; the other "
        f"~{t_quiet * 1000:.0f} ms are the per-step percentile stage (600 selections over "
        f"{args.paths:,} paths), the recurrence, constraint/KPIs and Python setup"
    )
    need = TARGET_C1_VS_NUMPY * rates["numpy"]
    if rates["c1"] < need:
        print(
            f"explanation: {TARGET_C1_VS_NUMPY:.0f}x NumPy would need {need:,.0f} path-steps/s, "
            f"{need / rates['floor']:.0%} of the bare-RNG floor ({rates['floor']:,.0f}), i.e. "
            "almost nothing but the draws, while the C run spends "
            f"~{t_quiet * 1000:.0f} ms beyond them (per-step percentiles, recurrence, setup); "
            "the vectorised NumPy reference is too fast for 4x, so the target is missed."
        )
    if rates["c2"] < TARGET_C2_VS_C1 * rates["c1"]:
        print(
            "explanation: 2 threads scaled only "
            f"{rates['c2'] / rates['c1']:.2f}x: another busy thread (e.g. spinning BLAS "
            "workers, see OPENBLAS_NUM_THREADS) or a busy machine is competing for the CPUs."
        )


if __name__ == "__main__":
    sys.exit(main())
