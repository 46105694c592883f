"""The `gateway.sim.native` backend (scenario in, results out) checked against the NumPy reference.

Tolerances come from the sample size (4 standard errors), never hand-picked. The kernel is
compiled once per session into a temporary folder (conftest.py), so this runs without a package
build. The kernel's own C interface is tested in test_kernel_cffi.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gateway.sim import native, reference
from gateway.sim.models import Scenario, SimulationError

PCTS = (0.05, 0.25, 0.50, 0.75, 0.95, 0.99)


def oven(**over) -> Scenario:
    spec = {
        "model": {
            "kind": "fopdt",
            "gain": {"dist": "normal", "mean": 1.2, "sd": 0.1},
            "tau": {"dist": "uniform", "lo": 80, "hi": 140},
            "theta": {"dist": "triangular", "lo": 5, "mode": 10, "hi": 20},
            "sigma_w": 0.05,
            "sigma_v": 0.3,
        },
        "y0": 180.0,
        "input": {"kind": "step", "u0": 180.0, "u1": 200.0, "t_step": 10.0},
        "horizon_s": 600.0,
        "dt_s": 5.0,
        "paths": 4000,
        "seed": 11,
        "constraints": [{"kind": "upper", "limit": 203.0}],
        "kpis": ["final", "max"],
    }
    spec.update(over)
    return Scenario.model_validate(spec)


def tank() -> Scenario:
    return Scenario.model_validate(
        {
            "model": {
                "kind": "tank",
                "area": {"dist": "lognormal", "mu": math.log(2.0), "sigma": 0.1},
                "c_in": 0.02,
                "c_out": 0.011,
                "h_max": 5.0,
                "sigma_w": 0.001,
                "sigma_v": 0.01,
            },
            "h0": 2.5,
            "input": {"kind": "ramp", "u0": 50, "u1": 80, "t0": 0, "t1": 300},
            "horizon_s": 900.0,
            "dt_s": 10.0,
            "paths": 4000,
            "seed": 3,
            "constraints": [{"kind": "upper", "limit": 3.0}, {"kind": "lower", "limit": 2.4}],
            "kpis": ["final", "mean"],
        }
    )


def weibull() -> Scenario:
    return Scenario.model_validate(
        {
            "model": {"kind": "weibull", "beta": 2.0, "eta": 10_000.0, "a0": 4_000.0},
            "horizon_s": 3_000.0,
            "dt_s": 100.0,
            "paths": 6000,
            "seed": 5,
            "constraints": [{"kind": "upper", "limit": 0.5}],
        }
    )


def oven_uncertain_noise() -> Scenario:
    """The oven with noise levels that are themselves uncertain (drawn once per path)."""
    return oven(
        model={
            "kind": "fopdt",
            "gain": {"dist": "normal", "mean": 1.2, "sd": 0.1},
            "tau": {"dist": "uniform", "lo": 80, "hi": 140},
            "theta": 10.0,
            "sigma_w": {"dist": "uniform", "lo": 0.0, "hi": 0.3},
            "sigma_v": {"dist": "lognormal", "mu": math.log(0.5), "sigma": 0.6},
        }
    )


@pytest.mark.parametrize(
    "make",
    [oven, tank, weibull, oven_uncertain_noise],
    ids=["fopdt", "tank", "weibull", "fopdt-uncertain-noise"],
)
def test_c_and_numpy_agree_statistically(simkernel, make):
    scenario = make()
    c = native.simulate(scenario, kernel=simkernel, threads=2)
    ref = reference.simulate(scenario, keep_paths=True)
    n = scenario.paths
    for rc, rr in zip(c.constraints, ref.constraints, strict=True):
        p = (rc.violation_probability + rr.violation_probability) / 2
        tol = 4 * math.sqrt(max(p * (1 - p), 1 / n) * 2 / n)
        assert abs(rc.violation_probability - rr.violation_probability) <= tol, rc.constraint
    for kc, kr in zip(c.kpis, ref.kpis, strict=True):
        tol = 4 * math.sqrt((kc.std**2 + kr.std**2) / n) + 1e-12
        assert abs(kc.mean - kr.mean) <= tol, kc.kpi
    if scenario.model.kind == "weibull":
        return  # a 0/1 output has no continuous quantiles; its constraint compared P(failure)
    # Percentiles: where C puts its p-quantile, the reference's paths should have about p below.
    assert ref.y is not None
    y = ref.y if ref.y.ndim == 2 else ref.y[..., 0]
    steps = range(0, scenario.n_steps, max(1, scenario.n_steps // 12))
    for k in steps:
        column = np.sort(y[:, k])
        if column[0] == column[-1]:
            continue  # a degenerate step (e.g. no failure yet): nothing to compare
        for j, p in enumerate(PCTS):
            below = np.searchsorted(column, c.percentiles[j, k], side="right") / n
            tol = 4 * math.sqrt(p * (1 - p) * 2 / n) + 1 / n
            assert abs(below - p) <= tol, (k, p, below)


def test_zero_noise_fopdt_equals_the_reference_exactly(simkernel):
    scenario = oven(model={"kind": "fopdt", "gain": 1.2, "tau": 100.0, "theta": 10.0}, paths=64)
    c = native.simulate(scenario, kernel=simkernel)
    ref = reference.simulate(scenario)
    np.testing.assert_allclose(c.percentiles, ref.percentiles, rtol=0, atol=1e-9)


def test_same_seed_same_result_whatever_the_thread_count(simkernel):
    scenario = oven(paths=1000)
    one = native.simulate(scenario, kernel=simkernel, threads=1)
    two = native.simulate(scenario, kernel=simkernel, threads=2)
    three = native.simulate(scenario, kernel=simkernel, threads=3)
    assert np.array_equal(one.percentiles, two.percentiles)
    assert np.array_equal(one.percentiles, three.percentiles)
    assert one.summary() == two.summary()
    other = native.simulate(oven(paths=1000, seed=12), kernel=simkernel)
    assert not np.array_equal(one.percentiles, other.percentiles)


def test_adaptive_mode_reaches_its_target(simkernel):
    scenario = oven(paths=1000, adaptive={"rse_target": 0.05, "batch": 500, "max_paths": 50_000})
    result = native.simulate(scenario, kernel=simkernel)
    assert result.constraints[0].rse <= 0.05
    assert result.paths_run < 50_000


def test_state_space_outputs_each_summarised(simkernel):
    scenario = Scenario.model_validate(
        {
            "model": {
                "kind": "state_space",
                "A": [[0.9, 0.05], [0.0, 0.8]],
                "B": [[0.1], [0.2]],
                "C": [[1.0, 0.0], [0.0, 1.0]],
                "x0": [1.0, 2.0],
                "q": [0.01, 0.01],
                "r": [0.0, 0.0],
            },
            "input": {"kind": "hold", "u0": 1.0},
            "horizon_s": 50.0,
            "dt_s": 1.0,
            "paths": 3000,
            "seed": 2,
            "constraints": [{"kind": "upper", "limit": 1.6, "output": 1}],
            "kpis": [{"kind": "final", "output": 0}, {"kind": "final", "output": 1}],
        }
    )
    c = native.simulate(scenario, kernel=simkernel)
    ref = reference.simulate(scenario)
    assert c.output_percentiles.shape == ref.output_percentiles.shape
    for kc, kr in zip(c.kpis, ref.kpis, strict=True):
        assert abs(kc.mean - kr.mean) <= 4 * math.sqrt((kc.std**2 + kr.std**2) / 3000)
    p = ref.constraints[0].violation_probability
    tol = 4 * math.sqrt(max(p * (1 - p), 1 / 3000) * 2 / 3000)
    assert abs(c.constraints[0].violation_probability - p) <= tol


def test_a_noise_distribution_outside_its_domain_names_the_noise(simkernel):
    scenario = oven(
        model={
            "kind": "fopdt",
            "gain": 1.0,
            "tau": 100.0,
            "sigma_w": {"dist": "normal", "mean": -5.0, "sd": 0.1},  # never >= 0
        }
    )
    with pytest.raises(SimulationError, match="parameter 'sigma_w'"):
        native.simulate(scenario, kernel=simkernel)
    with pytest.raises(SimulationError, match="sigma_w"):
        reference.simulate(scenario)


def test_portable_code_gives_the_same_result(simkernel):
    scenario = oven(paths=1500)
    fast = native.simulate(scenario, kernel=simkernel, threads=2)
    slow = native.simulate(scenario, kernel=simkernel, threads=1, portable=True)
    assert fast.output_percentiles.tobytes() == slow.output_percentiles.tobytes()
    assert fast.summary() == slow.summary()


async def test_async_wrapper_keeps_the_loop_serving(simkernel):
    import asyncio

    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    result = await native.simulate_async(oven(paths=20_000), kernel=simkernel, threads=1)
    task.cancel()
    assert result.paths_run == 20_000
    assert ticks > 0, "the event loop must keep running while C computes"


def test_the_package_build_installed_the_kernel():
    """`pip install` compiles native/ into gateway._simkernel (setup.py cffi_modules)."""
    from gateway.sim import BACKENDS, simulate

    assert callable(native.load_kernel().lib.opstwin_sim_run)

    scenario = oven(model={"kind": "fopdt", "gain": 1.2, "tau": 100.0, "theta": 10.0}, paths=64)
    assert "native" in BACKENDS
    native_result = simulate(scenario, backend="native")
    assert native_result.backend == "native"
    np.testing.assert_allclose(
        native_result.percentiles, simulate(scenario).percentiles, rtol=0, atol=1e-9
    )


# -- per-path results (issue 16): the joint share of paths that kept every constraint ------------


def two_output_plant() -> Scenario:
    """A 2-output state-space plant with constraints on both outputs and KPIs of both."""
    return Scenario.model_validate(
        {
            "model": {
                "kind": "state_space",
                "A": [[0.9, 0.05], [0.0, 0.8]],
                "B": [[0.1], [0.2]],
                "C": [[1.0, 0.0], [0.0, 1.0]],
                "x0": [1.0, 2.0],
                "q": [0.01, 0.01],
                "r": [0.01, 0.0],
            },
            "input": {"kind": "hold", "u0": 1.0},
            "horizon_s": 50.0,
            "dt_s": 1.0,
            "paths": 3000,
            "seed": 2,
            "constraints": [
                {"kind": "upper", "limit": 1.8, "output": 1},  # each broken on about half
                {"kind": "lower", "limit": 0.965, "output": 0},  # the paths
                {"kind": "upper", "limit": 1.92, "output": 0},
            ],
            "kpis": [{"kind": "final", "output": 0}, {"kind": "mean", "output": 1}],
        }
    )


def _expected_from_y(scenario: Scenario, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-path KPIs (p, 4, paths) and first-violation steps (c, paths) from kept paths."""
    y = y if y.ndim == 3 else y[:, :, None]
    kpis = np.stack(
        [y[:, -1], y.max(axis=1), y.min(axis=1), np.add.accumulate(y, axis=1)[:, -1] / y.shape[1]]
    ).transpose(2, 0, 1)
    first = np.full((len(scenario.constraints), y.shape[0]), -1)
    for i, c in enumerate(scenario.constraints):
        viol = y[:, :, c.output] > c.limit if c.kind == "upper" else y[:, :, c.output] < c.limit
        hit = viol.any(axis=1)
        first[i, hit] = viol[hit].argmax(axis=1)
    return kpis, first


@pytest.mark.parametrize(
    "make", [oven, tank, weibull, two_output_plant], ids=["fopdt", "tank", "weibull", "ss-2out"]
)
def test_path_stats_agree_with_the_kept_paths(simkernel, make):
    scenario = make()
    on = native.simulate(scenario, kernel=simkernel, threads=2, keep_paths=True, path_stats=True)
    n, p, nc = on.paths_run, scenario.model.n_outputs, len(scenario.constraints)
    assert on.path_kpis is not None and on.path_first_violation is not None
    assert on.path_kpis.shape == (p, 4, n) and on.path_kpis.dtype == np.float64
    assert on.path_first_violation.shape == (nc, n) and on.path_first_violation.dtype == np.int32
    assert on.y is not None
    kpis, first = _expected_from_y(scenario, on.y)
    assert on.path_kpis.tobytes() == kpis.tobytes()  # the kernel sums the mean step by step
    assert np.array_equal(on.path_first_violation, first)
    within = on.paths_within_constraints()
    assert within.shape == (n,) and within.dtype == bool
    assert np.array_equal(within, (first < 0).all(axis=0))
    # the marginals are these numbers, and the joint share is no larger than any of them
    for i, c in enumerate(on.constraints):
        assert c.violation_probability == np.mean(first[i] >= 0)
        assert within.mean() <= 1 - c.violation_probability
    for kr in on.kpis:
        assert kr.mean == pytest.approx(on.path_kpi(kr.kpi.kind, kr.kpi.output).mean(), rel=1e-12)
    # asking for per-path results changes no summary
    off = native.simulate(scenario, kernel=simkernel, threads=2)
    assert off.path_kpis is None and off.path_first_violation is None
    assert on.summary() == off.summary()
    assert on.output_percentiles.tobytes() == off.output_percentiles.tobytes()


def test_the_joint_share_is_not_the_product_of_marginals(simkernel):
    # Two constraints on one output, both broken by the same hot paths: the joint share of paths
    # that kept both is far above (1 - p1)(1 - p2), the answer marginals alone would suggest.
    scenario = oven(
        constraints=[{"kind": "upper", "limit": 203.0}, {"kind": "upper", "limit": 203.5}]
    )
    r = native.simulate(scenario, kernel=simkernel, path_stats=True)
    assert r.path_first_violation is not None
    broke = (r.path_first_violation >= 0).sum(axis=1)
    kept = int(r.paths_within_constraints().sum())
    assert kept == r.paths_run - broke.max()  # every path over 203.5 went over 203 too
    p1, p2 = r.violation_probability
    assert kept / r.paths_run > (1 - p1) * (1 - p2) + 0.05


def test_paths_within_constraints_needs_path_stats(simkernel):
    r = native.simulate(oven(paths=64), kernel=simkernel)
    with pytest.raises(ValueError, match="path_stats=True"):
        r.paths_within_constraints()
    with pytest.raises(ValueError, match="path_stats=True"):
        r.path_kpi("final")
    r = native.simulate(oven(paths=64), kernel=simkernel, path_stats=True)
    with pytest.raises(ValueError, match="unknown KPI 'median'"):
        r.path_kpi("median")


def test_path_stats_without_constraints_are_all_within(simkernel):
    r = native.simulate(oven(paths=100, constraints=[]), kernel=simkernel, path_stats=True)
    assert r.path_first_violation is not None and r.path_first_violation.shape == (0, 100)
    assert r.paths_within_constraints().all() and r.paths_within_constraints().shape == (100,)


def test_adaptive_path_stats_have_one_column_per_path_run(simkernel):
    scenario = oven(paths=1000, adaptive={"rse_target": 0.05, "batch": 500, "max_paths": 50_000})
    r = native.simulate(scenario, kernel=simkernel, path_stats=True, keep_paths=True)
    n = r.paths_run
    assert n < 50_000
    assert r.path_kpis is not None and r.path_kpis.shape == (1, 4, n)
    assert r.path_kpis.base is None  # copied out of the max_paths buffer, which is freed
    assert r.y is not None
    kpis, first = _expected_from_y(scenario, r.y)
    assert r.path_kpis.tobytes() == kpis.tobytes()
    assert r.path_first_violation is not None
    assert np.array_equal(r.path_first_violation, first)


def test_reference_backend_gives_the_same_path_stats(simkernel):
    # Without noise or uncertainty every path is the one deterministic response: the two
    # backends must then give the same numbers path by path.
    scenario = oven(
        model={"kind": "fopdt", "gain": 1.2, "tau": 100.0, "theta": 10.0},
        paths=64,
        constraints=[{"kind": "upper", "limit": 195.0}, {"kind": "lower", "limit": 170.0}],
    )
    c = native.simulate(scenario, kernel=simkernel, path_stats=True)
    ref = reference.simulate(scenario, path_stats=True)
    assert ref.path_kpis is not None and c.path_kpis is not None
    np.testing.assert_allclose(c.path_kpis, ref.path_kpis, rtol=0, atol=1e-9)
    first = c.path_first_violation
    assert first is not None and ref.path_first_violation is not None
    assert np.array_equal(first, ref.path_first_violation)
    assert (first[0] > 0).all() and (first[1] == -1).all()
    # With uncertainty the streams differ: the joint share agrees within its sampling error.
    scenario = two_output_plant()
    c = native.simulate(scenario, kernel=simkernel, path_stats=True)
    ref = reference.simulate(scenario, path_stats=True)
    pc, pr = c.paths_within_constraints().mean(), ref.paths_within_constraints().mean()
    p, n = (pc + pr) / 2, scenario.paths
    assert 0.05 < p < 0.95  # a share the test can get wrong
    assert abs(pc - pr) <= 4 * math.sqrt(p * (1 - p) * 2 / n)
