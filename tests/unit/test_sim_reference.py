"""NumPy reference simulation against analytic answers (native/SPEC.md)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gateway.sim import (
    Adaptive,
    Constraint,
    FopdtModel,
    HoldInput,
    Kpi,
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
from gateway.sim.reference import draw, input_array, simulate

Z = 4.0  # tolerance in standard errors for Monte Carlo checks (two-sided p ~ 6e-5)


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _binomial_tol(p: float, n: int) -> float:
    return Z * math.sqrt(p * (1 - p) / n)


def test_fopdt_deterministic_step_matches_analytic_response() -> None:
    # t_step and theta are multiples of dt, so the discrete form equals the continuous
    # response exactly at the sample times t_{k+1}: a^(k+1-s-d) = exp(-(t - t_step - theta)/tau).
    gain, tau, theta, dt, t_step, y0, u0, u1 = 2.0, 7.3, 3.0, 0.5, 2.5, 20.0, 10.0, 14.0
    sc = Scenario(
        model=FopdtModel(gain=gain, tau=tau, theta=theta),
        y0=y0,
        input=StepInput(u0=u0, u1=u1, t_step=t_step),
        horizon_s=60.0,
        dt_s=dt,
        paths=3,
    )
    r = simulate(sc, keep_paths=True)
    t = r.times
    assert t[0] == pytest.approx(dt) and t.size == 120
    lag = t - t_step - theta
    expected = np.where(
        lag >= 0, y0 + gain * (u1 - u0) * (1 - np.exp(-np.maximum(lag, 0) / tau)), y0
    )
    assert r.y is not None
    np.testing.assert_allclose(r.y, np.broadcast_to(expected, r.y.shape), rtol=0, atol=1e-9)
    # The output stays at y0 until one step after t_step + theta.
    assert np.all(r.y[:, t <= t_step + theta] == y0)


def test_input_plans_at_step_times() -> None:
    sc = Scenario(
        model=FopdtModel(gain=1, tau=1),
        y0=0,
        horizon_s=6,
        dt_s=1,
        input=RampInput(u0=1, u1=3, t0=2, t1=4),
    )
    np.testing.assert_allclose(input_array(sc)[:, 0], [1, 1, 1, 2, 3, 3])
    sc = sc.model_copy(update={"input": StepInput(u0=0, u1=5, t_step=2)})
    np.testing.assert_allclose(input_array(sc)[:, 0], [0, 0, 5, 5, 5, 5])


def test_tank_reaches_analytic_steady_level() -> None:
    c_in, c_out, u = 0.05, 0.02, 60.0
    sc = Scenario(
        model=TankModel(area=0.5, c_in=c_in, c_out=c_out, h_max=5.0),
        h0=0.5,
        input=HoldInput(u0=u),
        horizon_s=4000,
        dt_s=1.0,
        paths=2,
        kpis=[Kpi(kind="final")],
    )
    r = simulate(sc)
    assert r.kpis[0].mean == pytest.approx((c_in * u / 100 / c_out) ** 2, abs=1e-9)


def test_tank_recursion_and_clip_at_h_max() -> None:
    area, c_in, c_out, h_max, h0, dt = 1.0, 0.5, 0.1, 2.0, 1.5, 2.0
    sc = Scenario(
        model=TankModel(area=area, c_in=c_in, c_out=c_out, h_max=h_max),
        h0=h0,
        input=StepInput(u0=0, u1=100, t_step=4),
        horizon_s=20,
        dt_s=dt,
        paths=1,
    )
    r = simulate(sc, keep_paths=True)
    h, expected = h0, []
    for k in range(sc.n_steps):
        u = 0.0 if k * dt < 4 else 100.0
        h = min(max(h + dt / area * (c_in * u / 100 - c_out * math.sqrt(max(h, 0))), 0), h_max)
        expected.append(h)
    assert r.y is not None
    np.testing.assert_allclose(r.y[0], expected, rtol=0, atol=1e-12)
    assert r.y[0, -1] == h_max


def test_state_space_matches_hand_recursion() -> None:
    a = [[0.9, 0.1], [-0.2, 0.8]]
    b = [[0.5, 0.0], [0.1, 0.3]]
    c = [[1.0, 0.0], [0.5, 0.5]]
    x0 = [1.0, -1.0]
    plans: list[HoldInput | StepInput | RampInput] = [
        StepInput(u0=0, u1=1, t_step=3),
        RampInput(u0=2, u1=0, t0=1, t1=5),
    ]
    sc = Scenario(
        model=StateSpaceModel(A=a, B=b, C=c, x0=x0), input=plans, horizon_s=10, dt_s=1, paths=2
    )
    r = simulate(sc, keep_paths=True)
    x = list(x0)
    for k in range(10):
        t = float(k)
        u = [0.0 if t < 3 else 1.0, 2.0 if t <= 1 else (0.0 if t >= 5 else 2.0 - (t - 1) / 2)]
        x = [
            sum(a[i][j] * x[j] for j in range(2)) + sum(b[i][j] * u[j] for j in range(2))
            for i in range(2)
        ]
        y = [sum(c[i][j] * x[j] for j in range(2)) for i in range(2)]
        assert r.y is not None
        np.testing.assert_allclose(r.y[:, k, :], [y, y], rtol=0, atol=1e-12)
    assert r.output_percentiles.shape == (2, 6, 10)


def test_state_space_process_noise_gives_stationary_variance() -> None:
    # Scalar AR(1): x+ = a x + w, Var -> q/(1-a^2). Sample variance of n normals has
    # relative standard error sqrt(2/(n-1)).
    a, q, n = 0.8, 0.5, 20_000
    sc = Scenario(
        model=StateSpaceModel(A=[[a]], B=[[0.0]], C=[[1.0]], x0=[0.0], q=[q]),
        horizon_s=60,
        dt_s=1,
        paths=n,
        seed=3,
    )
    r = simulate(sc, keep_paths=True)
    assert r.y is not None
    var = q * (1 - a**120) / (1 - a**2)
    assert np.var(r.y[:, -1], ddof=1) == pytest.approx(var, rel=Z * math.sqrt(2 / (n - 1)))


def test_weibull_failure_probability_matches_conditional_cdf() -> None:
    beta, eta, a0, horizon, n = 2.0, 1000.0, 500.0, 300.0, 20_000
    sc = Scenario(
        model=WeibullModel(beta=beta, eta=eta, a0=a0),
        horizon_s=horizon,
        dt_s=10,
        paths=n,
        seed=11,
        constraints=[Constraint(kind="upper", limit=0.5)],
    )
    r = simulate(sc, keep_paths=True)

    def cdf(t: float) -> float:
        return 1 - math.exp((a0 / eta) ** beta - ((a0 + t) / eta) ** beta)

    p = cdf(horizon)
    assert abs(r.violation_probability[0] - p) <= _binomial_tol(p, n)
    assert r.y is not None
    mid = cdf(150.0)
    assert abs(r.y[:, 14].mean() - mid) <= _binomial_tol(mid, n)  # t_15 = 150 s


def test_violation_probability_with_measurement_noise_only() -> None:
    # Constant y with N(0, sd^2) noise on each of k steps: P(any above L) = 1 - Phi((L-y)/sd)^k.
    y0, sd, limit, k, n = 10.0, 0.5, 10.6, 10, 20_000
    sc = Scenario(
        model=FopdtModel(gain=1, tau=5, sigma_v=sd),
        y0=y0,
        horizon_s=k,
        dt_s=1,
        paths=n,
        seed=5,
        constraints=[
            Constraint(kind="upper", limit=limit),
            Constraint(kind="lower", limit=y0 - 2 * sd),
        ],
    )
    r = simulate(sc)
    p_up = 1 - _phi((limit - y0) / sd) ** k
    p_low = 1 - _phi(2.0) ** k
    assert abs(r.violation_probability[0] - p_up) <= _binomial_tol(p_up, n)
    assert abs(r.violation_probability[1] - p_low) <= _binomial_tol(p_low, n)
    assert r.rse[0] == pytest.approx(
        math.sqrt((1 - r.violation_probability[0]) / (n * r.violation_probability[0]))
    )


def _uncertain_scenario(**kw: object) -> Scenario:
    base: dict[str, object] = dict(
        model=FopdtModel(
            gain=Normal(mean=2, sd=0.3),
            tau=Lognormal(mu=2.3, sigma=0.2),
            theta=Triangular(lo=0, mode=2, hi=5),
            sigma_w=0.02,
            sigma_v=Uniform(lo=0.05, hi=0.1),
        ),
        y0=50.0,
        input=StepInput(u0=0, u1=3, t_step=5),
        horizon_s=80,
        dt_s=1,
        paths=2000,
        seed=42,
        constraints=[{"kind": "upper", "limit": 55.0}],
        kpis=["max", "final", "mean"],
    )
    base.update(kw)
    return Scenario.model_validate(base)


def test_statistics_equal_numpy_of_kept_paths() -> None:
    r = simulate(_uncertain_scenario(), keep_paths=True)
    y = r.y
    assert y is not None and y.shape == (2000, 80)
    np.testing.assert_array_equal(r.percentiles, np.percentile(y, [5, 25, 50, 75, 95, 99], axis=0))
    np.testing.assert_array_equal(r.fan()["p99"], np.percentile(y, 99, axis=0))
    viol = y > 55.0
    assert r.violation_probability[0] == viol.any(axis=1).mean()
    first = r.times[np.argmax(viol[viol.any(axis=1)], axis=1)]
    fv = r.first_violation[0]
    assert fv is not None
    assert fv["mean"] == pytest.approx(first.mean())
    assert fv["p50"] == pytest.approx(np.percentile(first, 50))
    mx = y.max(axis=1)
    k = r.kpis[0]
    assert (k.mean, k.p95) == pytest.approx((mx.mean(), np.percentile(mx, 95)))
    assert k.std == pytest.approx(mx.std())  # ddof 0, as the C kernel
    assert k.rse == pytest.approx(mx.std() / math.sqrt(2000) / abs(mx.mean()))
    assert r.kpis[1].mean == pytest.approx(y[:, -1].mean())


def test_same_seed_same_result_other_seed_differs() -> None:
    a = simulate(_uncertain_scenario(), keep_paths=True)
    b = simulate(_uncertain_scenario(), keep_paths=True)
    c = simulate(_uncertain_scenario(seed=43), keep_paths=True)
    assert a.y is not None and b.y is not None and c.y is not None
    np.testing.assert_array_equal(a.y, b.y)
    assert a.summary() == b.summary()
    assert not np.array_equal(a.y, c.y)


def test_summary_is_plain_json() -> None:
    r = simulate(_uncertain_scenario(constraints=[{"kind": "upper", "limit": 1e6}]))
    s = r.summary()
    text = json.dumps(s, allow_nan=False)
    assert json.loads(text)["constraints"][0]["rse"] is None  # p = 0: RSE undefined
    assert r.rse[0] == math.inf
    assert r.first_violation[0] is None
    assert len(s["fan"][0]["p50"]) == 80 and s["paths_run"] == 2000
    assert r.y is None


def test_adaptive_stops_at_rse_target() -> None:
    target, batch = 0.03, 500
    sc = _uncertain_scenario(
        adaptive=Adaptive(rse_target=target, batch=batch, max_paths=50_000),
        constraints=[{"kind": "upper", "limit": 56.3}],
    )
    r = simulate(sc, keep_paths=True)
    assert r.y is not None and r.paths_run == r.y.shape[0]
    assert r.paths_run % batch == 0 and r.paths_run < 50_000
    assert r.rse[0] <= target
    # It did not stop late: one batch fewer had not yet met the target.
    fewer = r.y[: r.paths_run - batch]
    p = (fewer > 56.3).any(axis=1).mean()
    assert math.sqrt(p * (1 - p) / fewer.shape[0]) / p > target


def test_adaptive_stops_at_path_cap() -> None:
    sc = _uncertain_scenario(adaptive=Adaptive(rse_target=1e-6, batch=700, max_paths=2000))
    r = simulate(sc)
    assert r.paths_run == 2000 and r.rse[0] > 1e-6


def test_adaptive_uses_first_kpi_without_constraints() -> None:
    sc = _uncertain_scenario(
        constraints=[],
        kpis=["final"],
        adaptive=Adaptive(rse_target=3e-4, batch=200, max_paths=10_000),
    )
    r = simulate(sc)
    assert r.kpis[0].rse <= 3e-4 and r.paths_run < 10_000


def test_draw_redraws_out_of_domain_values_never_clips() -> None:
    rng = np.random.default_rng(0)
    v = draw("tau", Normal(mean=1.0, sd=2.0), (0.0, False), 10_000, rng)
    assert np.all(v > 0)
    # Redrawing truncates, it does not clip: no mass piles up at the bound.
    assert v.min() > 0 and np.mean(v < 0.01) < 0.01


def test_draw_that_never_lands_in_domain_names_the_parameter() -> None:
    sc = _uncertain_scenario(model=FopdtModel(gain=1, tau=Normal(mean=-100, sd=1)))
    with pytest.raises(SimulationError, match="'tau'"):
        simulate(sc)


@pytest.mark.parametrize(
    ("dist", "mean", "var"),
    [
        (Normal(mean=2.0, sd=0.5), 2.0, 0.25),
        (Uniform(lo=1.0, hi=3.0), 2.0, 4 / 12),
        (Triangular(lo=1.0, mode=1.5, hi=4.0), 6.5 / 3, (1 + 1.5**2 + 16 - 1.5 - 4 - 6) / 18),
        (
            Lognormal(mu=0.5, sigma=0.3),
            math.exp(0.5 + 0.045),
            (math.exp(0.09) - 1) * math.exp(1 + 0.09),
        ),
    ],
)
def test_gain_drawn_once_per_path_from_its_distribution(
    dist: Normal | Uniform | Triangular | Lognormal, mean: float, var: float
) -> None:
    # tau << dt makes a = exp(-dt/tau) = 0, so y = y0 + K*(u1 - u0) on every step of a path.
    n = 20_000
    sc = Scenario(
        model=FopdtModel(gain=dist, tau=1e-4),
        y0=1.0,
        input=StepInput(u0=0, u1=2, t_step=0),
        horizon_s=5,
        dt_s=1,
        paths=n,
        seed=9,
    )
    r = simulate(sc, keep_paths=True)
    assert r.y is not None
    np.testing.assert_array_equal(r.y[:, 0], r.y[:, -1])  # one draw per path, not per step
    gain = (r.y[:, 0] - 1.0) / 2
    assert abs(gain.mean() - mean) <= Z * math.sqrt(var / n)
    # Standard error of a sample variance: sqrt((m4 - var^2)/n), m4 the fourth central moment.
    m4 = float(np.mean((gain - gain.mean()) ** 4))
    assert abs(gain.var(ddof=1) - var) <= Z * math.sqrt((m4 - var**2) / n)


def test_min_and_mean_kpis_and_lower_first_violation() -> None:
    sc = Scenario(
        model=FopdtModel(gain=-1, tau=4),
        y0=10,
        input=StepInput(u0=0, u1=5, t_step=2),
        horizon_s=30,
        dt_s=1,
        paths=4,
        kpis=[Kpi(kind="min"), Kpi(kind="mean")],
        constraints=[Constraint(kind="lower", limit=7.0)],
    )
    r = simulate(sc, keep_paths=True)
    assert r.y is not None
    assert r.kpis[0].mean == pytest.approx(r.y[0].min())
    assert r.kpis[1].mean == pytest.approx(r.y[0].mean())
    # Deterministic: y(t) = 10 - 5(1 - exp(-(t-2)/4)) < 7 first when t - 2 > 4 ln(5/2) = 3.67.
    fv = r.first_violation[0]
    assert r.violation_probability[0] == 1.0 and fv is not None
    assert fv["p5"] == fv["p95"] == fv["mean"] == 6.0


def test_package_simulate_dispatches_to_backend() -> None:
    from gateway import sim

    sc = _uncertain_scenario(paths=50)
    assert sim.simulate(sc).summary() == simulate(sc).summary()
    with pytest.raises(ValueError, match="unknown simulation backend 'gpu'"):
        sim.simulate(sc, backend="gpu")


def test_path_stats_are_the_kept_paths_kpis_and_first_violations() -> None:
    sc = _uncertain_scenario(
        constraints=[
            {"kind": "upper", "limit": 55.0},
            {"kind": "lower", "limit": 49.9},
            {"kind": "upper", "limit": 1e6},
        ]
    )
    r = simulate(sc, keep_paths=True, path_stats=True)
    y = r.y
    assert y is not None and r.path_kpis is not None and r.path_first_violation is not None
    assert r.path_kpis.shape == (1, 4, 2000) and r.path_first_violation.shape == (3, 2000)
    for row, v in enumerate([y[:, -1], y.max(axis=1), y.min(axis=1), y.mean(axis=1)]):
        np.testing.assert_array_equal(r.path_kpis[0, row], v)
    for i, limit in enumerate((55.0, 49.9, 1e6)):
        viol = y > limit if i != 1 else y < limit
        hit = viol.any(axis=1)
        want = np.where(hit, viol.argmax(axis=1), -1)
        np.testing.assert_array_equal(r.path_first_violation[i], want)
        assert r.violation_probability[i] == np.mean(want >= 0)
        first = r.first_violation[i]
        if first is not None:  # first-violation times are t_{k+1} of these step indices
            assert first["mean"] == pytest.approx(r.times[want[hit]].mean())
    within = r.paths_within_constraints()
    assert 0 < within.mean() < 1
    np.testing.assert_array_equal(within, ~((y > 55.0) | (y < 49.9)).any(axis=1))
    # the summaries' own KPI values, and nothing else changes
    assert r.kpis[0].mean == r.path_kpi("max").mean()
    assert r.kpis[2].mean == r.path_kpi("mean").mean()
    plain = simulate(sc)
    assert plain.path_kpis is None and plain.path_first_violation is None
    assert plain.summary() == r.summary()


def test_path_stats_of_every_output_and_of_adaptive_runs() -> None:
    sc = Scenario(
        model=StateSpaceModel(
            A=[[0.9, 0.0], [0.1, 0.7]],
            B=[[1.0], [0.0]],
            C=[[1.0, 0.0], [0.0, 1.0]],
            x0=[0.0, 0.0],
            q=[0.01, 0.01],
        ),
        input=HoldInput(u0=0.1),
        horizon_s=30,
        dt_s=1,
        paths=500,
        constraints=[
            Constraint(kind="upper", limit=1.05, output=0),
            Constraint(kind="upper", limit=0.42, output=1),
        ],
        adaptive=Adaptive(rse_target=0.02, batch=300, max_paths=30_000),
    )
    r = simulate(sc, keep_paths=True, path_stats=True)
    assert r.y is not None and r.path_kpis is not None and r.path_first_violation is not None
    n = r.paths_run
    assert 300 < n < 30_000  # several batches, stopped at the target
    assert r.path_kpis.shape == (2, 4, n) and r.path_first_violation.shape == (2, n)
    for o in range(2):
        np.testing.assert_array_equal(r.path_kpis[o, 1], r.y[:, :, o].max(axis=1))
        assert r.violation_probability[o] == np.mean(r.path_first_violation[o] >= 0)
    joint = r.paths_within_constraints().mean()
    assert 0 < joint < min(1 - p for p in r.violation_probability)
