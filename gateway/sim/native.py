"""The C kernel as a `simulate` backend: scenario → C structs, one call, NumPy results.

The kernel is the cffi module `gateway._simkernel` (built from `native/`). Output arrays are
NumPy buffers handed to C with `ffi.from_buffer` (no copies); cffi's API mode releases the GIL
for the call, and `simulate_async` runs it in a thread so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import math
from types import ModuleType
from typing import Any

import numpy as np

from gateway.sim.models import (
    BLOCK_PATHS,
    FopdtModel,
    HoldInput,
    Lognormal,
    Normal,
    RampInput,
    Scenario,
    SimulationError,
    StateSpaceModel,
    StepInput,
    TankModel,
    Triangular,
    Uniform,
    WeibullModel,
)
from gateway.sim.results import KPI_ORDER, ConstraintResult, KpiResult, SimResult

PERCENTILE_COUNT = 6
# The kernel's params[] of each scalar model, in order (opstwin_sim.h); a distribution is
# allowed for every one of them, noise levels included, as in the NumPy reference.
_PARAM_NAMES: dict[str, tuple[str, ...]] = {
    "fopdt": ("gain", "tau", "theta", "sigma_w", "sigma_v"),
    "tank": ("area", "c_in", "c_out", "h_max", "sigma_w", "sigma_v"),
    "weibull": ("beta", "eta", "a0"),
}
_FIRST = ("p5", "p50", "p95", "mean")


def load_kernel() -> ModuleType:
    """Import the compiled kernel; a clear error if the package was installed without it."""
    try:
        from gateway import _simkernel  # type: ignore[attr-defined]
    except ImportError as exc:
        raise SimulationError(
            "the C simulation kernel is not built (gateway._simkernel is missing): reinstall "
            "the package with a C compiler present (`pip install -e .`)"
        ) from exc
    return _simkernel


def simulate(
    scenario: Scenario,
    *,
    threads: int = 0,
    keep_paths: bool = False,
    path_stats: bool = False,
    portable: bool = False,
    kernel: ModuleType | None = None,
) -> SimResult:
    """Run a scenario on the C kernel (blocking; the GIL is released while C runs).

    Every output of the model is summarised in the one call. `path_stats` adds every path's
    KPIs and first violations (SimResult.path_kpis, .path_first_violation), the per-path
    numbers the summaries were made from, for joint questions across constraints and KPIs.
    `portable` turns the AVX2 code off (the numbers are the same; tests compare the two).
    """
    kernel = kernel or load_kernel()
    ffi, lib = kernel.ffi, kernel.lib
    model = _model(ffi, scenario)
    n_steps = scenario.n_steps
    n_outputs = scenario.model.n_outputs
    result = _call(ffi, lib, model, scenario, threads, keep_paths, path_stats, portable)
    paths_run = result["paths_run"]
    percentiles = result["percentiles"].reshape(n_outputs, n_steps, PERCENTILE_COUNT)
    kpis = result["kpi"].reshape(n_outputs, 4, 5)
    kpi_rse = result["kpi_rse"].reshape(n_outputs, 4)
    constraints = []
    for i, c in enumerate(scenario.constraints):
        first = result["first_violation"][i * 4 : i * 4 + 4]
        constraints.append(
            ConstraintResult(
                constraint=c,
                violation_probability=float(result["violation_prob"][i]),
                rse=float(result["violation_rse"][i]),
                first_violation=None
                if math.isnan(first[0])
                else dict(zip(_FIRST, map(float, first), strict=True)),
            )
        )
    kpi_results = []
    for k in scenario.kpis:
        row = KPI_ORDER.index(k.kind)
        mean, std, p5, p50, p95 = map(float, kpis[k.output, row])
        rse = float(kpi_rse[k.output, row])
        kpi_results.append(KpiResult(kpi=k, mean=mean, std=std, p5=p5, p50=p50, p95=p95, rse=rse))
    raw: np.ndarray | None = None
    if result["raw"] is not None:
        raw = result["raw"][: paths_run * n_steps * n_outputs].reshape(
            paths_run, n_steps, n_outputs
        )
        raw = raw[:, :, 0] if n_outputs == 1 else raw
    path_kpis = path_first = None
    if path_stats:  # the kernel's stride is the paths run; adaptive buffers were sized for more
        path_kpis = _prefix(result["path_kpi"], (n_outputs, 4, paths_run))
        path_first = _prefix(result["path_violation"], (len(scenario.constraints), paths_run))
    return SimResult(
        times=scenario.dt_s * np.arange(1, n_steps + 1),
        output_percentiles=np.ascontiguousarray(percentiles.transpose(0, 2, 1)),
        constraints=constraints,
        kpis=kpi_results,
        paths_run=paths_run,
        seed=scenario.seed,
        backend="native",
        y=raw,
        path_kpis=path_kpis,
        path_first_violation=path_first,
    )


def _prefix(buffer: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The first prod(shape) values of a kernel buffer in that shape; a copy when the buffer is
    larger (adaptive), so the unused rest of it is freed."""
    size = math.prod(shape)
    view = buffer[:size].reshape(shape)
    return view if size == buffer.size else view.copy()


async def simulate_async(scenario: Scenario, **kwargs: Any) -> SimResult:
    """`simulate` in a worker thread, so the event loop keeps serving while C computes."""
    return await asyncio.to_thread(simulate, scenario, **kwargs)


def rng_floor(seed: int, n: int, threads: int = 1, kernel: ModuleType | None = None) -> float:
    """The bare RNG loop: n normals drawn as the kernel draws them (benchmark floor)."""
    kernel = kernel or load_kernel()
    return float(kernel.lib.opstwin_rng_floor(seed, n, threads))


def rng_normals(
    seed: int, block: int, n: int, *, portable: bool = False, kernel: ModuleType | None = None
) -> np.ndarray:
    """The first n normals (n a multiple of 8) of one block's noise stream, as the kernel
    consumes them; `portable` forces the non-AVX2 code (for tests of the two paths)."""
    kernel = kernel or load_kernel()
    out = np.empty(n)
    code = kernel.lib.opstwin_rng_normals(
        seed, block, n, kernel.ffi.cast("double *", kernel.ffi.from_buffer(out)), int(portable)
    )
    if code != 0:
        message = kernel.ffi.string(kernel.lib.opstwin_sim_strerror(code)).decode()
        raise SimulationError(f"rng_normals({seed}, {block}, {n}): {message}")
    return out


def simd_level(kernel: ModuleType | None = None) -> int:
    """1 if the kernel runs its AVX2 code on this CPU, else 0."""
    kernel = kernel or load_kernel()
    return int(kernel.lib.opstwin_simd_level())


# -- scenario → C ------------------------------------------------------------------------------


def _call(
    ffi: Any,
    lib: Any,
    model: Any,
    scenario: Scenario,
    threads: int,
    keep: bool,
    path_stats: bool,
    portable: bool,
) -> dict[str, Any]:
    n_steps = scenario.n_steps
    n_outputs = scenario.model.n_outputs
    constraints = scenario.constraints
    cons = ffi.new("opstwin_constraint[]", max(len(constraints), 1))
    for i, c in enumerate(constraints):
        cons[i].output = c.output
        cons[i].kind = lib.OPSTWIN_UPPER if c.kind == "upper" else lib.OPSTWIN_LOWER
        cons[i].limit = c.limit
    sc = ffi.new("opstwin_scenario *")
    sc.dt = scenario.dt_s
    sc.n_steps = n_steps
    sc.seed = scenario.seed
    sc.n_paths = scenario.paths
    sc.threads = threads
    sc.portable = int(portable)
    sc.n_constraints = len(constraints)
    sc.constraints = cons
    max_paths = scenario.paths
    if scenario.adaptive is not None:
        sc.adaptive = 1
        sc.batch = scenario.adaptive.batch
        sc.max_paths = scenario.adaptive.max_paths
        sc.rse_target = scenario.adaptive.rse_target
        if scenario.kpis:  # what the RSE targets when there is no constraint
            sc.driving_kpi = KPI_ORDER.index(scenario.kpis[0].kind)
            sc.driving_output = scenario.kpis[0].output
        max_paths = -(-scenario.adaptive.max_paths // BLOCK_PATHS) * BLOCK_PATHS
    arrays = {
        "percentiles": np.empty(n_outputs * n_steps * PERCENTILE_COUNT),
        "violation_prob": np.empty(max(len(constraints), 1)),
        "violation_rse": np.empty(max(len(constraints), 1)),
        "first_violation": np.empty(max(len(constraints), 1) * 4),
        "kpi": np.empty(n_outputs * 20),
        "kpi_rse": np.empty(n_outputs * 4),
    }
    raw = np.empty(max_paths * n_steps * n_outputs) if keep else None
    path_kpi = np.empty(n_outputs * 4 * max_paths) if path_stats else None
    path_violation = np.empty(len(constraints) * max_paths, dtype=np.int32) if path_stats else None
    out = ffi.new("opstwin_output *")
    keepalive = []
    for name, array in arrays.items():
        buf = ffi.cast("double *", ffi.from_buffer(array))
        keepalive.append(buf)
        setattr(out, name, buf)
        setattr(out, f"{name}_len", array.size)
    if raw is not None:
        out.raw_paths = ffi.cast("double *", ffi.from_buffer(raw))
        out.raw_paths_len = raw.size
    if path_kpi is not None and path_violation is not None:
        out.path_kpi = ffi.cast("double *", ffi.from_buffer(path_kpi))
        out.path_kpi_len = path_kpi.size
        if path_violation.size:  # no constraints: nothing to write, the pointer stays NULL
            out.path_violation = ffi.cast("int32_t *", ffi.from_buffer(path_violation))
            out.path_violation_len = path_violation.size
    code = lib.opstwin_sim_run(model, sc, out)
    if code != 0:
        message = ffi.string(lib.opstwin_sim_strerror(code)).decode()
        param = out.error_param
        names = _PARAM_NAMES.get(scenario.model.kind, ())
        where = ""
        if 0 <= param < len(names):
            where = f" (parameter {names[param]!r})"
        elif param >= 0:
            where = f" (parameter {param})"
        raise SimulationError(f"C kernel refused the scenario: {message}{where} [code {code}]")
    return {
        **arrays,
        "raw": raw,
        "path_kpi": path_kpi,
        "path_violation": path_violation,
        "paths_run": int(out.n_paths_run),
    }


def _model(ffi: Any, scenario: Scenario) -> Any:
    m = scenario.model
    cm = ffi.new("opstwin_model *")
    lib_kind = {"fopdt": 1, "state_space": 2, "tank": 3, "weibull": 4}[m.kind]
    cm.kind = lib_kind
    if isinstance(m, FopdtModel | TankModel | WeibullModel):
        _params(cm, [getattr(m, name) for name in _PARAM_NAMES[m.kind]])
        if isinstance(m, FopdtModel):
            cm.y0 = float(scenario.y0)  # type: ignore[arg-type]  # required by the scenario
        elif isinstance(m, TankModel):
            cm.y0 = float(scenario.h0)  # type: ignore[arg-type]
    elif isinstance(m, StateSpaceModel):
        n, k, p = m.n_states, m.n_inputs, m.n_outputs
        cm.n, cm.m, cm.p = n, k, p
        for i in range(n):
            for j in range(n):
                cm.A[i * n + j] = m.A[i][j]
            for j in range(k):
                cm.B[i * k + j] = m.B[i][j]
            cm.x0[i] = m.x0[i]
            cm.q[i] = m.q[i] if m.q else 0.0
        for i in range(p):
            for j in range(n):
                cm.C[i * n + j] = m.C[i][j]
            cm.r[i] = m.r[i] if m.r else 0.0
    plans = scenario.input_plans
    cm.n_inputs = 0 if isinstance(m, WeibullModel) else len(plans)
    for i, plan in enumerate(plans[: cm.n_inputs]):
        _input(cm.inputs[i], plan)
    return cm


def _params(cm: Any, values: list[Any]) -> None:
    for i, v in enumerate(values):
        p = cm.params[i]
        if isinstance(v, Normal):
            p.kind, p.a, p.b = 1, v.mean, v.sd
        elif isinstance(v, Uniform):
            p.kind, p.a, p.b = 2, v.lo, v.hi
        elif isinstance(v, Triangular):
            p.kind, p.a, p.b, p.c = 3, v.lo, v.mode, v.hi
        elif isinstance(v, Lognormal):
            p.kind, p.a, p.b = 4, v.mu, v.sigma
        else:
            p.kind, p.a = 0, float(v)


def _input(ci: Any, plan: Any) -> None:
    if isinstance(plan, HoldInput):
        ci.kind, ci.u0 = 0, plan.u0
    elif isinstance(plan, StepInput):
        ci.kind, ci.u0, ci.u1, ci.t0 = 1, plan.u0, plan.u1, plan.t_step
    elif isinstance(plan, RampInput):
        ci.kind, ci.u0, ci.u1, ci.t0, ci.t1 = 2, plan.u0, plan.u1, plan.t0, plan.t1
