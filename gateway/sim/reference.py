"""NumPy reference backend: every model of native/SPEC.md, vectorised over paths."""

from __future__ import annotations

import math

import numpy as np

from gateway.sim.models import (
    Adaptive,
    FopdtModel,
    HoldInput,
    Lognormal,
    Normal,
    Param,
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
from gateway.sim.results import SimResult, kpi_values, mean_rse, proportion_rse, summarise

BACKEND = "numpy"
MAX_REDRAWS = 100


def simulate(
    scenario: Scenario, *, keep_paths: bool = False, path_stats: bool = False
) -> SimResult:
    """Run the scenario's Monte Carlo with numpy.random.default_rng(seed) and summarise it.

    `path_stats` adds every path's KPIs and first violations (SimResult.path_kpis,
    .path_first_violation), as the C kernel gives them.
    """
    rng = np.random.default_rng(scenario.seed)
    if scenario.adaptive is None:
        y = simulate_paths(scenario, scenario.paths, rng)
    else:
        y = _adaptive(scenario, scenario.adaptive, rng)
    return summarise(scenario, y, backend=BACKEND, keep_paths=keep_paths, path_stats=path_stats)


def simulate_paths(scenario: Scenario, n_paths: int, rng: np.random.Generator) -> np.ndarray:
    """Simulate n_paths paths; return outputs of shape (n_paths, n_steps, n_outputs)."""
    model = scenario.model
    u = input_array(scenario)
    if isinstance(model, FopdtModel):
        return _fopdt(model, scenario, u[:, 0], n_paths, rng)[:, :, None]
    if isinstance(model, TankModel):
        return _tank(model, scenario, u[:, 0], n_paths, rng)[:, :, None]
    if isinstance(model, WeibullModel):
        return _weibull(model, scenario, n_paths, rng)[:, :, None]
    return _state_space(model, u, n_paths, rng)


def input_array(scenario: Scenario) -> np.ndarray:
    """Return u[k] at t_k = k*dt for k = 0..n_steps-1, shape (n_steps, n_inputs)."""
    t = scenario.dt_s * np.arange(scenario.n_steps, dtype=float)
    return np.stack([_plan(p, t) for p in scenario.input_plans], axis=1)


def draw(
    name: str, param: Param, domain: tuple[float, bool], n: int, rng: np.random.Generator
) -> np.ndarray:
    """Draw a parameter once per path; redraw values outside its domain, never clip."""
    if isinstance(param, float | int):
        return np.full(n, float(param))
    values = _sample(param, n, rng)
    bad = ~_in_domain(values, domain)
    for _ in range(MAX_REDRAWS):
        if not bad.any():
            return values
        values[bad] = _sample(param, int(bad.sum()), rng)
        bad = ~_in_domain(values, domain)
    if bad.any():
        lo, inclusive = domain
        raise SimulationError(
            f"parameter {name!r}: {int(bad.sum())} path(s) still drew values "
            f"{'<' if inclusive else '<='} {lo:g} after {MAX_REDRAWS} redraws from {param!r}; "
            "narrow the distribution so it stays in the parameter's domain"
        )
    return values


# --- models -------------------------------------------------------------------------------------


def _fopdt(
    m: FopdtModel, sc: Scenario, u: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    p = _draw_all(m, n, rng)
    dt, y0 = sc.dt_s, float(sc.y0)  # type: ignore[arg-type]
    a = np.exp(-dt / p["tau"])
    d = np.floor(p["theta"] / dt + 0.5).astype(np.int64)  # C round(): half away from zero
    u0 = sc.input_plans[0].u0  # steady state before now, even for a step at t = 0
    d_max = int(d.max())
    u_ext = np.concatenate([np.full(d_max, u0), u])  # u[j] = u0 for j < 0
    steps = sc.n_steps
    x = np.full(n, y0)
    y = np.empty((n, steps))
    gain = p["gain"]
    for k in range(steps):
        target = y0 + gain * (u_ext[k - d + d_max] - u0)
        x = a * x + (1 - a) * target + _noise(p["sigma_w"], rng)
        y[:, k] = x + _noise(p["sigma_v"], rng)
    return y


def _tank(
    m: TankModel, sc: Scenario, u: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    p = _draw_all(m, n, rng)
    gain_in = sc.dt_s / p["area"] * p["c_in"] / 100.0
    gain_out = sc.dt_s / p["area"] * p["c_out"]
    h = np.full(n, float(sc.h0))  # type: ignore[arg-type]
    y = np.empty((n, sc.n_steps))
    for k in range(sc.n_steps):
        h = h + gain_in * u[k] - gain_out * np.sqrt(np.maximum(h, 0.0)) + _noise(p["sigma_w"], rng)
        h = np.clip(h, 0.0, p["h_max"])
        y[:, k] = h + _noise(p["sigma_v"], rng)
    return y


def _weibull(m: WeibullModel, sc: Scenario, n: int, rng: np.random.Generator) -> np.ndarray:
    p = _draw_all(m, n, rng)
    beta, eta, a0 = p["beta"], p["eta"], p["a0"]
    uni = 1.0 - rng.random(n)  # (0, 1]: ln U stays finite
    life = eta * ((a0 / eta) ** beta - np.log(uni)) ** (1.0 / beta) - a0
    times = sc.dt_s * np.arange(1, sc.n_steps + 1, dtype=float)
    return (life[:, None] <= times[None, :]).astype(float)


def _state_space(m: StateSpaceModel, u: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    a, b, c = np.asarray(m.A), np.asarray(m.B), np.asarray(m.C)
    q_sd = np.sqrt(np.asarray(m.q)) if m.q is not None and any(m.q) else None
    r_sd = np.sqrt(np.asarray(m.r)) if m.r is not None and any(m.r) else None
    x = np.tile(np.asarray(m.x0, dtype=float), (n, 1))
    bu = u @ b.T  # (n_steps, n_states): same input on every path
    y = np.empty((n, u.shape[0], m.n_outputs))
    for k in range(u.shape[0]):
        x = x @ a.T + bu[k]
        if q_sd is not None:
            x = x + rng.standard_normal(x.shape) * q_sd
        yk = x @ c.T
        if r_sd is not None:
            yk = yk + rng.standard_normal(yk.shape) * r_sd
        y[:, k, :] = yk
    return y


# --- adaptive -----------------------------------------------------------------------------------


def _adaptive(sc: Scenario, ad: Adaptive, rng: np.random.Generator) -> np.ndarray:
    # Preallocated to the cap (already within the memory bound); pages never written stay free.
    y = np.empty((ad.max_paths, sc.n_steps, sc.model.n_outputs))
    stat = np.empty(ad.max_paths)  # per path: violated the first constraint, or first KPI value
    run = 0
    while run < ad.max_paths:
        size = min(ad.batch, ad.max_paths - run)
        y[run : run + size] = simulate_paths(sc, size, rng)
        stat[run : run + size] = _stopping_stat(sc, y[run : run + size])
        run += size
        if _stopping_rse(sc, stat[:run]) <= ad.rse_target:
            break
    return y[:run]


def _stopping_stat(sc: Scenario, y: np.ndarray) -> np.ndarray:
    """Per path: 1.0 if it violates the first constraint, else the first KPI's value."""
    if sc.constraints:
        c = sc.constraints[0]
        yo = y[:, :, c.output]
        return ((yo > c.limit) if c.kind == "upper" else (yo < c.limit)).any(axis=1).astype(float)
    kpi = sc.kpis[0]  # the scenario guarantees a constraint or a KPI in adaptive mode
    return kpi_values(kpi, y[:, :, kpi.output])


def _stopping_rse(sc: Scenario, stat: np.ndarray) -> float:
    """RSE of the first constraint's probability, else of the first KPI's mean."""
    n = stat.size
    if sc.constraints:
        return proportion_rse(float(stat.mean()), n)
    return mean_rse(float(stat.mean()), float(stat.std()), n)


# --- helpers ------------------------------------------------------------------------------------


def _plan(plan: HoldInput | StepInput | RampInput, t: np.ndarray) -> np.ndarray:
    if isinstance(plan, HoldInput):
        return np.full(t.shape, plan.u0)
    if isinstance(plan, StepInput):
        return np.where(t < plan.t_step, plan.u0, plan.u1)
    frac = np.clip((t - plan.t0) / (plan.t1 - plan.t0), 0.0, 1.0)
    return plan.u0 + frac * (plan.u1 - plan.u0)


def _draw_all(
    model: FopdtModel | TankModel | WeibullModel, n: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    return {
        name: draw(name, getattr(model, name), dom, n, rng) for name, dom in model.DOMAINS.items()
    }


def _sample(
    param: Normal | Uniform | Triangular | Lognormal, n: int, rng: np.random.Generator
) -> np.ndarray:
    if isinstance(param, Normal):
        return rng.normal(param.mean, param.sd, n)
    if isinstance(param, Uniform):
        return rng.uniform(param.lo, param.hi, n)
    if isinstance(param, Triangular):
        return rng.triangular(param.lo, param.mode, param.hi, n)
    return rng.lognormal(param.mu, param.sigma, n)


def _in_domain(values: np.ndarray, domain: tuple[float, bool]) -> np.ndarray:
    lo, inclusive = domain
    if math.isinf(lo):
        return np.isfinite(values)
    return (values >= lo) if inclusive else (values > lo)


def _noise(sd: np.ndarray, rng: np.random.Generator) -> np.ndarray | float:
    # Skip the draw when the noise is exactly zero on every path (the deterministic cases).
    if not sd.any():
        return 0.0
    return sd * rng.standard_normal(sd.shape[0])


__all__ = ["draw", "input_array", "simulate", "simulate_paths"]
