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
from gateway.sim.results import ConstraintResult, KpiResult, SimResult

PERCENTILE_COUNT = 6
KPI_ORDER = ("final", "max", "min", "mean")
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
    kernel: ModuleType | None = None,
) -> SimResult:
    """Run a scenario on the C kernel (blocking; the GIL is released while C runs)."""
    kernel = kernel or load_kernel()
    ffi, lib = kernel.ffi, kernel.lib
    model = _model(ffi, scenario)
    n_steps = scenario.n_steps
    outputs = sorted(
        {0, *(c.output for c in scenario.constraints), *(k.output for k in scenario.kpis)}
    )
    n_outputs = model.p if scenario.model.kind == "state_space" else 1
    percentiles = np.full((n_outputs, PERCENTILE_COUNT, n_steps), np.nan)
    constraints: list[ConstraintResult] = []
    kpis: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    paths_run = 0
    raw: np.ndarray | None = None
    # One call per output summarised; the kernel summarises one output index per call, and the
    # same seed gives the same paths on every call.
    for out_index in range(n_outputs) if n_outputs > 1 else outputs:
        mine = [c for c in scenario.constraints if c.output == out_index]
        result = _call(
            ffi, lib, model, scenario, out_index, mine, threads, keep_paths and out_index == 0
        )
        percentiles[out_index] = result["percentiles"].reshape(n_steps, PERCENTILE_COUNT).T
        paths_run = result["paths_run"]
        kpis[out_index] = (result["kpi"].reshape(4, 5), result["kpi_rse"])
        for i, c in enumerate(mine):
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
        if result["raw"] is not None:
            raw = result["raw"][: paths_run * n_steps].reshape(paths_run, n_steps)
    order = {id(c): i for i, c in enumerate(scenario.constraints)}
    constraints.sort(key=lambda r: order[id(r.constraint)])
    kpi_results = []
    for k in scenario.kpis:
        stats, rse = kpis[k.output]
        row = KPI_ORDER.index(k.kind)
        mean, std, p5, p50, p95 = map(float, stats[row])
        kpi_results.append(
            KpiResult(kpi=k, mean=mean, std=std, p5=p5, p50=p50, p95=p95, rse=float(rse[row]))
        )
    return SimResult(
        times=scenario.dt_s * np.arange(1, n_steps + 1),
        output_percentiles=percentiles,
        constraints=constraints,
        kpis=kpi_results,
        paths_run=paths_run,
        seed=scenario.seed,
        backend="native",
        y=raw,
    )


async def simulate_async(scenario: Scenario, **kwargs: Any) -> SimResult:
    """`simulate` in a worker thread, so the event loop keeps serving while C computes."""
    return await asyncio.to_thread(simulate, scenario, **kwargs)


def rng_floor(seed: int, n: int, threads: int = 1, kernel: ModuleType | None = None) -> float:
    """The bare RNG loop: n normals drawn as the kernel draws them (benchmark floor)."""
    kernel = kernel or load_kernel()
    return float(kernel.lib.opstwin_rng_floor(seed, n, threads))


# -- scenario → C ------------------------------------------------------------------------------


def _call(
    ffi: Any,
    lib: Any,
    model: Any,
    scenario: Scenario,
    out_index: int,
    constraints: list,
    threads: int,
    keep: bool,
) -> dict[str, Any]:
    n_steps = scenario.n_steps
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
    sc.output_index = out_index
    sc.n_constraints = len(constraints)
    sc.constraints = cons
    max_paths = scenario.paths
    if scenario.adaptive is not None:
        sc.adaptive = 1
        sc.batch = scenario.adaptive.batch
        sc.max_paths = scenario.adaptive.max_paths
        sc.rse_target = scenario.adaptive.rse_target
        max_paths = scenario.adaptive.max_paths + 63  # batches are rounded up to 64 paths
    arrays = {
        "percentiles": np.empty(n_steps * PERCENTILE_COUNT),
        "violation_prob": np.empty(max(len(constraints), 1)),
        "violation_rse": np.empty(max(len(constraints), 1)),
        "first_violation": np.empty(max(len(constraints), 1) * 4),
        "kpi": np.empty(20),
        "kpi_rse": np.empty(4),
    }
    raw = np.empty(max_paths * n_steps) if keep else None
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
    code = lib.opstwin_sim_run(model, sc, out)
    if code != 0:
        message = ffi.string(lib.opstwin_sim_strerror(code)).decode()
        param = out.error_param
        where = f" (parameter {param})" if param >= 0 else ""
        raise SimulationError(f"C kernel refused the scenario: {message}{where} [code {code}]")
    return {**arrays, "raw": raw, "paths_run": int(out.n_paths_run)}


def _model(ffi: Any, scenario: Scenario) -> Any:
    m = scenario.model
    cm = ffi.new("opstwin_model *")
    lib_kind = {"fopdt": 1, "state_space": 2, "tank": 3, "weibull": 4}[m.kind]
    cm.kind = lib_kind
    if isinstance(m, FopdtModel):
        _params(cm, [m.gain, m.tau, m.theta])
        cm.y0 = _fixed("y0", scenario.y0)
        cm.sigma_w, cm.sigma_v = _fixed("sigma_w", m.sigma_w), _fixed("sigma_v", m.sigma_v)
    elif isinstance(m, TankModel):
        _params(cm, [m.area, m.c_in, m.c_out, m.h_max])
        cm.y0 = _fixed("h0", scenario.h0)
        cm.sigma_w, cm.sigma_v = _fixed("sigma_w", m.sigma_w), _fixed("sigma_v", m.sigma_v)
    elif isinstance(m, WeibullModel):
        _params(cm, [m.beta, m.eta, m.a0])
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


def _fixed(name: str, value: Any) -> float:
    if value is None:
        return 0.0
    if not isinstance(value, (int, float)):
        raise SimulationError(f"{name}: the C kernel takes a fixed value here, not a distribution")
    return float(value)
