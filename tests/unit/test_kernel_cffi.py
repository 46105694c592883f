"""The C Monte Carlo kernel (native/) called directly through cffi, with no Python layer between.

The kernel is real compiled code, built with -Werror once per session (conftest.py). Checks the
SPEC.md equations against exact NumPy recursions, the statistics against NumPy, determinism
across thread counts, and every validation error. The `gateway.sim.native` wrapper over it is
tested in test_sim_native_backend.py.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from native_kernel import NATIVE, PCTS, Kernel, load_build_script
from tests_support import import_file


@pytest.fixture
def k(simkernel: ModuleType) -> Kernel:
    return Kernel(simkernel)


def fopdt_exact(
    K: float, tau: float, theta: float, y0: float, u: np.ndarray, u0: float, dt: float
) -> np.ndarray:
    a = math.exp(-dt / tau)
    d = int(np.round(theta / dt))
    x, out = y0, []
    for j in range(len(u)):
        uu = u[j - d] if j - d >= 0 else u0
        x = a * x + (1 - a) * (y0 + K * (uu - u0))
        out.append(x)
    return np.array(out)


def test_build_is_warning_free(k: Kernel) -> None:
    # the fixture compiled with -Werror; this documents it and checks the module is usable
    assert k.strerror(0) == "success"


@pytest.mark.parametrize(
    "inp",
    [("hold", 2.0, 0.0, 0.0, 0.0), ("step", 1.0, 3.0, 7.5, 0.0), ("ramp", 1.0, 4.0, 5.0, 25.0)],
)
def test_fopdt_zero_noise_equals_exact_response(k: Kernel, inp: tuple) -> None:
    dt, n = 0.5, 120
    t = np.arange(n) * dt
    kind, u0, u1, t0, t1 = inp
    if kind == "hold":
        u = np.full(n, u0)
    elif kind == "step":
        u = np.where(t < t0, u0, u1)
    else:
        u = np.where(t < t0, u0, np.where(t >= t1, u1, u0 + (u1 - u0) * (t - t0) / (t1 - t0)))
    m = k.model("fopdt", params=[2.5, 7.0, 3.2], y0=40.0, inputs=[inp])
    rc, r = k.run(m, dt=dt, n_steps=n, n_paths=3, raw=True)
    assert rc == 0
    exact = fopdt_exact(2.5, 7.0, 3.2, 40.0, u, u0, dt)
    np.testing.assert_allclose(r["raw"], np.tile(exact, (3, 1)), rtol=0, atol=1e-9)
    np.testing.assert_allclose(r["percentiles"], np.tile(exact[:, None], (1, 6)), atol=1e-9)


def test_tank_reaches_steady_state(k: Kernel) -> None:
    # steady state: c_in*u/100 = c_out*sqrt(h)  ->  h = (c_in*u/100/c_out)^2
    A, c_in, c_out, u = 2.0, 0.05, 0.02, 60.0
    h_ss = (c_in * u / 100 / c_out) ** 2
    m = k.model("tank", params=[A, c_in, c_out, 10.0], y0=0.5, inputs=[("hold", u, 0, 0, 0)])
    rc, r = k.run(m, dt=1.0, n_steps=20000, n_paths=2)
    assert rc == 0
    assert r["percentiles"][-1, 2] == pytest.approx(h_ss, rel=1e-6)
    # clipped at h_max when inflow exceeds what the outlet can pass below it
    m = k.model("tank", params=[A, c_in, c_out, 1.0], y0=0.5, inputs=[("hold", 100.0, 0, 0, 0)])
    rc, r = k.run(m, dt=1.0, n_steps=2000, n_paths=2, constraints=[(0, "upper", 1.0)])
    assert rc == 0 and r["percentiles"][-1, 5] == 1.0 and r["violation_prob"][0] == 0.0


def test_state_space_matches_hand_recursion(k: Kernel) -> None:
    rng = np.random.default_rng(3)
    n, mi, p, steps, dt = 3, 2, 2, 50, 0.1
    A = 0.5 * rng.standard_normal((n, n)) / np.sqrt(n)
    B = rng.standard_normal((n, mi))
    C = rng.standard_normal((p, n))
    x0 = rng.standard_normal(n)
    inputs = [("step", 0.0, 1.0, 1.0, 0.0), ("ramp", -1.0, 2.0, 0.5, 3.0)]
    t = np.arange(steps) * dt
    U = np.stack([np.where(t < 1.0, 0.0, 1.0), np.interp(t, [0.5, 3.0], [-1.0, 2.0])])
    x, rows = x0.copy(), []
    for j in range(steps):
        x = A @ x + B @ U[:, j]
        rows.append(C @ x)
    ys = np.array(rows)
    m = k.model("statespace", n=n, m=mi, p=p, A=A, B=B, C=C, x0=x0, inputs=inputs)
    rc, r = k.run(m, dt=dt, n_steps=steps, n_paths=2, raw=True)  # every output in one call
    assert rc == 0
    for oi in range(p):
        np.testing.assert_allclose(r["raw"][1][:, oi], ys[:, oi], atol=1e-9)
        np.testing.assert_allclose(r["percentiles"][oi][:, 2], ys[:, oi], atol=1e-9)
        assert r["kpi"][oi][1][0] == pytest.approx(ys[:, oi].max(), abs=1e-9)


def test_normals_are_standard_normal(k: Kernel) -> None:
    # y = v with A = B = C·0... : C = 0 so y is pure measurement noise N(0, 1)
    m = k.model(
        "statespace",
        n=1,
        m=1,
        p=1,
        A=[0.0],
        B=[0.0],
        C=[0.0],
        r=[1.0],
        inputs=[("hold", 0, 0, 0, 0)],
    )
    rc, r = k.run(m, n_steps=100, n_paths=4000, raw=True, seed=9, threads=2)
    assert rc == 0
    z = r["raw"].ravel()
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    for c in (1.0, 2.0, 3.0, 3.5):  # two-sided tail mass, including beyond the ziggurat base R
        p = math.erfc(c / math.sqrt(2))
        assert abs(np.mean(np.abs(z) > c) - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-6


def test_weibull_failure_probability_matches_conditional_cdf(k: Kernel) -> None:
    beta, eta, a0, dt, steps, n = 2.0, 1000.0, 400.0, 10.0, 60, 20000
    m = k.model("weibull", params=[beta, eta, a0])
    rc, r = k.run(m, dt=dt, n_steps=steps, n_paths=n, constraints=[(0, "upper", 0.5)], raw=True)
    assert rc == 0
    t = (np.arange(steps) + 1) * dt
    cdf = 1 - np.exp((a0 / eta) ** beta - ((a0 + t) / eta) ** beta)
    got = r["raw"].mean(axis=0)
    tol = 5 * np.sqrt(cdf * (1 - cdf) / n) + 1e-12
    assert np.all(np.abs(got - cdf) <= tol)
    assert abs(r["violation_prob"][0] - cdf[-1]) <= tol[-1]
    # heavy ties (0/1 outputs) through the quickselect percentiles
    want = np.percentile(r["raw"], PCTS, axis=0).T
    np.testing.assert_array_equal(r["percentiles"], want)


def uncertain_fopdt(k: Kernel) -> Any:
    return k.model(
        "fopdt",
        params=[("normal", 2.0, 0.3), ("lognormal", math.log(10), 0.3), ("triangular", 0, 2, 5)],
        y0=50.0,
        sigma_w=0.05,
        sigma_v=0.2,
        inputs=[("step", 1.0, 3.0, 5.0, 0.0)],
    )


def test_statistics_equal_numpy_on_raw_paths(k: Kernel) -> None:
    m = uncertain_fopdt(k)
    dt, steps = 0.5, 80
    cons = [(0, "upper", 53.0), (0, "lower", 49.8), (0, "upper", 1e9)]
    rc, r = k.run(m, dt=dt, n_steps=steps, n_paths=1001, raw=True, constraints=cons, threads=3)
    assert rc == 0 and r["n_paths_run"] == 1001
    Y = r["raw"]
    np.testing.assert_allclose(
        r["percentiles"], np.percentile(Y, PCTS, axis=0).T, rtol=0, atol=1e-12
    )
    kpis = [Y[:, -1], Y.max(axis=1), Y.min(axis=1), Y.mean(axis=1)]
    for i, v in enumerate(kpis):
        want = [v.mean(), v.std(), *np.percentile(v, [5, 50, 95])]
        np.testing.assert_allclose(r["kpi"][i], want, rtol=1e-12, atol=1e-12)
        assert r["kpi_rse"][i] == pytest.approx(v.std() / math.sqrt(len(v)) / abs(v.mean()))
    for c, (_, kind, lim) in enumerate(cons):
        viol = lim < Y if kind == "upper" else lim > Y
        hit = viol.any(axis=1)
        p = hit.mean()
        assert r["violation_prob"][c] == pytest.approx(p)
        if p == 0:
            assert r["violation_rse"][c] == math.inf and np.isnan(r["first_violation"][c]).all()
            continue
        assert r["violation_rse"][c] == pytest.approx(math.sqrt(p * (1 - p) / len(Y)) / p)
        tfirst = (viol[hit].argmax(axis=1) + 1) * dt
        want = [*np.percentile(tfirst, [5, 50, 95]), tfirst.mean()]
        np.testing.assert_allclose(r["first_violation"][c], want, rtol=1e-12)


def test_parameter_distributions(k: Kernel) -> None:
    # zero-noise FOPDT with theta = 0, K uncertain, u steps at t = 0: final y ≈ y0 + K·Δu
    def final_k(param: tuple) -> np.ndarray:
        m = k.model(
            "fopdt", params=[param, 0.01, 0.0], y0=0.0, inputs=[("step", 0.0, 1.0, 0.0, 0.0)]
        )
        rc, r = k.run(m, n_steps=2, n_paths=20000, raw=True, seed=5)
        assert rc == 0
        return r["raw"][:, -1]

    n = 20000
    v = final_k(("normal", 3.0, 0.5))
    assert abs(v.mean() - 3.0) < 5 * 0.5 / math.sqrt(n) and abs(v.std() - 0.5) < 0.02
    v = final_k(("uniform", -1.0, 2.0))
    assert v.min() >= -1.0 and v.max() < 2.0 and abs(v.mean() - 0.5) < 0.03
    v = final_k(("triangular", 0.0, 1.0, 4.0))
    assert v.min() >= 0 and v.max() <= 4 and abs(v.mean() - 5 / 3) < 0.03
    v = final_k(("lognormal", 0.0, 0.25))
    assert v.min() > 0 and abs(np.log(v).mean()) < 0.01 and abs(np.log(v).std() - 0.25) < 0.01


def test_redraw_on_invalid_keeps_domain(k: Kernel) -> None:
    # tau ~ normal(1, 1): about 16 % of draws are <= 0 and must be redrawn, never clipped
    m = k.model(
        "fopdt", params=[1.0, ("normal", 1.0, 1.0), 0.0], y0=0.0, inputs=[("step", 0, 1, 0, 0)]
    )
    rc, r = k.run(m, n_steps=5, n_paths=2000)
    assert rc == 0
    # tau ~ uniform(-2, -1): never valid -> the error names parameter 1 (tau)
    m = k.model(
        "fopdt", params=[1.0, ("uniform", -2.0, -1.0), 0.0], y0=0.0, inputs=[("hold", 0, 0, 0, 0)]
    )
    rc, r = k.run(m, n_steps=5, n_paths=200, threads=2)
    assert rc == k.lib.OPSTWIN_E_DOMAIN and r["error_param"] == 1
    assert "domain" in k.strerror(rc)


@pytest.mark.parametrize("threads", [2, 3, 0])
def test_same_seed_bit_identical_across_threads(k: Kernel, threads: int) -> None:
    m = uncertain_fopdt(k)
    kw: dict[str, Any] = dict(
        dt=0.5, n_steps=60, n_paths=777, constraints=[(0, "upper", 53.0)], raw=True, seed=42
    )
    rc1, a = k.run(m, threads=1, **kw)
    rc2, b = k.run(m, threads=threads, **kw)
    assert rc1 == rc2 == 0
    for key in ("raw", "percentiles", "violation_prob", "first_violation", "kpi", "kpi_rse"):
        assert a[key].tobytes() == b[key].tobytes(), key


def test_different_seeds_differ(k: Kernel) -> None:
    m = uncertain_fopdt(k)
    _, a = k.run(m, n_steps=20, n_paths=256, raw=True, seed=1)
    _, b = k.run(m, n_steps=20, n_paths=256, raw=True, seed=2)
    assert not np.array_equal(a["raw"], b["raw"])


def test_rng_floor_is_deterministic(k: Kernel) -> None:
    s1 = k.lib.opstwin_rng_floor(7, 300_000, 1)
    assert s1 == k.lib.opstwin_rng_floor(7, 300_000, 2) == k.lib.opstwin_rng_floor(7, 300_000, 3)
    assert abs(s1) < 5 * math.sqrt(300_000)
    assert s1 != k.lib.opstwin_rng_floor(8, 300_000, 1)
    assert math.isnan(k.lib.opstwin_rng_floor(7, -1, 1))


def test_adaptive_stops_at_rse_target_and_is_prefix_of_fixed_run(k: Kernel) -> None:
    m = uncertain_fopdt(k)
    cons = [(0, "upper", 53.0)]
    rc, r = k.run(
        m,
        dt=0.5,
        n_steps=40,
        constraints=cons,
        adaptive=True,
        batch=500,
        max_paths=50_000,
        rse_target=0.02,
        raw=True,
        threads=2,
    )
    assert rc == 0
    n = r["n_paths_run"]
    assert n % 512 == 0 and n < 50_000  # batches rounded up to whole 64-path blocks
    assert r["violation_rse"][0] <= 0.02
    # results cover all paths run, and equal a fixed run of the same size
    rc, f = k.run(m, dt=0.5, n_steps=40, constraints=cons, n_paths=n, raw=True)
    assert rc == 0 and f["raw"].tobytes() == r["raw"].tobytes()
    assert f["violation_prob"][0] == r["violation_prob"][0]
    # an unreachable target runs max_paths exactly
    rc, r = k.run(m, n_steps=5, adaptive=True, batch=100, max_paths=1000, rse_target=1e-9)
    assert rc == 0 and r["n_paths_run"] == 1000


def test_bad_inputs_return_error_codes(k: Kernel) -> None:
    lib, ffi = k.lib, k.ffi
    good = lambda: k.model("fopdt", params=[1.0, 5.0, 0.0], y0=0.0, inputs=[("hold", 0, 0, 0, 0)])  # noqa: E731

    def rc_of(model: Any = None, **kw: Any) -> int:
        return k.run(model if model is not None else good(), **kw)[0]

    # NULL pointers
    s = ffi.new("opstwin_scenario *")
    o = ffi.new("opstwin_output *")
    assert lib.opstwin_sim_run(ffi.NULL, s, o) == lib.OPSTWIN_E_NULL
    assert lib.opstwin_sim_run(good(), ffi.NULL, o) == lib.OPSTWIN_E_NULL
    assert lib.opstwin_sim_run(good(), s, ffi.NULL) == lib.OPSTWIN_E_NULL
    s.dt, s.n_steps, s.n_paths = 1.0, 5, 10
    assert lib.opstwin_sim_run(good(), s, o) == lib.OPSTWIN_E_OUTPUT  # NULL output arrays
    s.n_constraints = 1  # constraints pointer NULL
    assert lib.opstwin_sim_run(good(), s, o) == lib.OPSTWIN_E_NULL
    assert "NULL" in k.strerror(lib.OPSTWIN_E_NULL)

    nan = float("nan")
    cases = {
        "zero paths": (rc_of(n_paths=0), lib.OPSTWIN_E_PATHS),
        "negative paths": (rc_of(n_paths=-5), lib.OPSTWIN_E_PATHS),
        "zero steps": (rc_of(n_steps=0), lib.OPSTWIN_E_STEPS),
        "too many steps": (rc_of(n_steps=2_000_000), lib.OPSTWIN_E_STEPS),
        "too large": (rc_of(n_steps=1_000_000, n_paths=1_000_000), lib.OPSTWIN_E_TOO_LARGE),
        "dt nan": (rc_of(dt=nan), lib.OPSTWIN_E_DT),
        "dt zero": (rc_of(dt=0.0), lib.OPSTWIN_E_DT),
        "threads": (rc_of(threads=-1), lib.OPSTWIN_E_THREADS),
        "tau zero": (
            rc_of(k.model("fopdt", params=[1.0, 0.0, 0.0], inputs=[("hold", 0, 0, 0, 0)])),
            lib.OPSTWIN_E_DOMAIN,
        ),
        "tau negative": (
            rc_of(k.model("fopdt", params=[1.0, -3.0, 0.0], inputs=[("hold", 0, 0, 0, 0)])),
            lib.OPSTWIN_E_DOMAIN,
        ),
        "theta negative": (
            rc_of(k.model("fopdt", params=[1.0, 3.0, -1.0], inputs=[("hold", 0, 0, 0, 0)])),
            lib.OPSTWIN_E_DOMAIN,
        ),
        "K nan": (
            rc_of(k.model("fopdt", params=[nan, 3.0, 0.0], inputs=[("hold", 0, 0, 0, 0)])),
            lib.OPSTWIN_E_DIST,
        ),
        "sd negative": (
            rc_of(
                k.model(
                    "fopdt", params=[("normal", 1.0, -1.0), 3.0, 0.0], inputs=[("hold", 0, 0, 0, 0)]
                )
            ),
            lib.OPSTWIN_E_DIST,
        ),
        "uniform lo>hi": (
            rc_of(
                k.model(
                    "fopdt", params=[("uniform", 2.0, 1.0), 3.0, 0.0], inputs=[("hold", 0, 0, 0, 0)]
                )
            ),
            lib.OPSTWIN_E_DIST,
        ),
        "unknown dist": (
            rc_of(_with(k, good(), lambda m: setattr(m.params[0], "kind", 99))),
            lib.OPSTWIN_E_DIST,
        ),
        "y0 nan": (
            rc_of(k.model("fopdt", params=[1.0, 3.0, 0.0], y0=nan, inputs=[("hold", 0, 0, 0, 0)])),
            lib.OPSTWIN_E_NONFINITE,
        ),
        "noise negative": (  # a noise level is a parameter like any other (index 4)
            rc_of(
                k.model(
                    "fopdt", params=[1.0, 3.0, 0.0], sigma_v=-1.0, inputs=[("hold", 0, 0, 0, 0)]
                )
            ),
            lib.OPSTWIN_E_DOMAIN,
        ),
        "input nan": (
            rc_of(k.model("fopdt", params=[1.0, 3.0, 0.0], inputs=[("hold", nan, 0, 0, 0)])),
            lib.OPSTWIN_E_INPUT,
        ),
        "ramp backwards": (
            rc_of(k.model("fopdt", params=[1.0, 3.0, 0.0], inputs=[("ramp", 0, 1, 5, 1)])),
            lib.OPSTWIN_E_INPUT,
        ),
        "no input": (rc_of(k.model("fopdt", params=[1.0, 3.0, 0.0])), lib.OPSTWIN_E_INPUT),
        "model kind": (
            rc_of(_with(k, good(), lambda m: setattr(m, "kind", 0))),
            lib.OPSTWIN_E_MODEL_KIND,
        ),
        "n > 8": (
            rc_of(k.model("statespace", n=9, m=1, p=1, inputs=[("hold", 0, 0, 0, 0)])),
            lib.OPSTWIN_E_DIMS,
        ),
        "m > 4": (
            rc_of(k.model("statespace", n=2, m=5, p=1, inputs=[("hold", 0, 0, 0, 0)])),
            lib.OPSTWIN_E_DIMS,
        ),
        "p = 0": (
            rc_of(k.model("statespace", n=2, m=1, p=0, inputs=[("hold", 0, 0, 0, 0)])),
            lib.OPSTWIN_E_DIMS,
        ),
        "A nan": (
            rc_of(k.model("statespace", n=1, m=1, p=1, A=[nan], inputs=[("hold", 0, 0, 0, 0)])),
            lib.OPSTWIN_E_NONFINITE,
        ),
        "q negative": (
            rc_of(k.model("statespace", n=1, m=1, p=1, q=[-1.0], inputs=[("hold", 0, 0, 0, 0)])),
            lib.OPSTWIN_E_NOISE,
        ),
        "weibull beta 0": (
            rc_of(k.model("weibull", params=[0.0, 10.0, 0.0])),
            lib.OPSTWIN_E_DOMAIN,
        ),
        "tank area 0": (
            rc_of(k.model("tank", params=[0.0, 1.0, 1.0, 1.0], inputs=[("hold", 0, 0, 0, 0)])),
            lib.OPSTWIN_E_DOMAIN,
        ),
        "constraint output": (rc_of(constraints=[(1, "upper", 1.0)]), lib.OPSTWIN_E_CONSTRAINT),
        "constraint nan": (rc_of(constraints=[(0, "upper", nan)]), lib.OPSTWIN_E_NONFINITE),
        "adaptive kpi output": (rc_of(adaptive=True, driving_output=1), lib.OPSTWIN_E_ADAPTIVE),
        "adaptive kpi kind": (rc_of(adaptive=True, driving_kpi=4), lib.OPSTWIN_E_ADAPTIVE),
        "adaptive batch": (rc_of(adaptive=True, batch=0), lib.OPSTWIN_E_ADAPTIVE),
        "adaptive target": (rc_of(adaptive=True, rse_target=nan), lib.OPSTWIN_E_ADAPTIVE),
        "diverged": (
            rc_of(
                k.model("fopdt", params=[1e308, 1.0, 0.0], inputs=[("step", 0, 1e308, 0, 0)]),
                n_steps=3,
            ),
            lib.OPSTWIN_E_DIVERGED,
        ),
    }
    wrong = {name: got for name, (got, want) in cases.items() if got != want}
    assert not wrong
    for _, want in cases.values():
        msg = k.strerror(want)
        assert msg and msg != "unknown error"
    assert k.strerror(-999) == "unknown error"


def _with(k: Kernel, m: Any, f: Any) -> Any:
    f(m)
    return m


def test_short_output_buffer_is_rejected(k: Kernel) -> None:
    lib, ffi = k.lib, k.ffi
    m = k.model("fopdt", params=[1.0, 5.0, 0.0], y0=0.0, inputs=[("hold", 0, 0, 0, 0)])
    s = ffi.new("opstwin_scenario *")
    s.dt, s.n_steps, s.n_paths, s.threads = 1.0, 10, 10, 1
    o = ffi.new("opstwin_output *")
    bufs = {n: ffi.new("double[]", 100) for n in ("percentiles", "kpi", "kpi_rse")}
    for n, b in bufs.items():
        setattr(o, n, b)
        setattr(o, n + "_len", 100)
    assert lib.opstwin_sim_run(m, s, o) == 0
    o.percentiles_len = 59  # needs 10 * 6
    assert lib.opstwin_sim_run(m, s, o) == lib.OPSTWIN_E_OUTPUT
    o.percentiles_len = 60
    o.raw_paths, o.raw_paths_len = bufs["percentiles"], 99  # needs 100
    assert lib.opstwin_sim_run(m, s, o) == lib.OPSTWIN_E_OUTPUT


def test_call_releases_the_gil(k: Kernel) -> None:
    # While one thread is inside the kernel, another keeps running Python code. Were the GIL
    # held for the call, the sleeping main thread could not wake until the call returned: it
    # would see the worker inside at most once or twice, at the edges of the call.
    calls = _FlagCalls(k.lib)
    k.lib = calls
    m = uncertain_fopdt(k)
    results: list[int] = []
    worker = threading.Thread(
        target=lambda: results.append(k.run(m, n_steps=600, n_paths=6000, threads=1)[0])
    )
    seen_inside = 0
    worker.start()
    while worker.is_alive():
        time.sleep(0.001)
        seen_inside += calls.inside
    worker.join()
    assert results == [0]
    assert seen_inside >= 10, seen_inside


class _FlagCalls:
    """The kernel's functions, with a flag that is up while `opstwin_sim_run` runs."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self.inside = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def opstwin_sim_run(self, *args: Any) -> int:
        self.inside = True
        try:
            return int(self._lib.opstwin_sim_run(*args))
        finally:
            self.inside = False


@pytest.mark.parametrize("sanitize", [True, False], ids=["sanitized", "plain"])
def test_the_package_build_adds_sanitizers_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sanitize: bool
) -> None:
    # setup.py imports the build script, which reads the switch at import; the Extension it
    # hands setuptools (cffi's public `distutils_extension`) is what `pip install` compiles.
    if sanitize:
        monkeypatch.setenv("OPSTWIN_SIM_SANITIZE", "1")
    else:
        monkeypatch.delenv("OPSTWIN_SIM_SANITIZE", raising=False)
    ext = load_build_script().ffibuilder.distutils_extension(tmpdir=str(tmp_path), verbose=False)
    assert ext.name == "gateway._simkernel"
    assert NATIVE / "opstwin_sim.c" in [Path(src).resolve() for src in ext.sources]
    assert "-Wall" in ext.extra_compile_args
    assert ("-fsanitize=address,undefined" in ext.extra_compile_args) is sanitize
    assert ("-fsanitize=address,undefined" in ext.extra_link_args) is sanitize


# -- kernel v2 (issue 15): vector and portable paths, all outputs in one pass, noise as params ---


def _normals(k: Kernel, seed: int, block: int, n: int, portable: bool) -> np.ndarray:
    out = np.empty(n)
    rc = k.lib.opstwin_rng_normals(seed, block, n, k.ffi.from_buffer("double[]", out), portable)
    assert rc == 0
    return out


def test_vector_and_portable_normal_streams_are_identical(k: Kernel) -> None:
    if not k.lib.opstwin_simd_level():
        pytest.skip("this CPU has no AVX2: only the portable code runs here")
    for seed, block in ((0, 0), (1, 7), (2**64 - 1, 123_456)):
        fast = _normals(k, seed, block, 200_000, portable=False)
        slow = _normals(k, seed, block, 200_000, portable=True)
        assert fast.tobytes() == slow.tobytes()
    # the prefix of a longer draw is the shorter draw: buffers never change the stream
    assert _normals(k, 5, 3, 64, False).tobytes() == _normals(k, 5, 3, 4096, False)[:64].tobytes()


def test_noise_stream_is_standard_normal_and_blocks_differ(k: Kernel) -> None:
    z = _normals(k, 11, 0, 1_000_000, portable=False)
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    for c in (0.5, 1.0, 2.0, 3.0, 3.6, 4.0):  # 3.65 is where the ziggurat's tail begins
        p = math.erfc(c / math.sqrt(2))
        assert abs(np.mean(np.abs(z) > c) - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-6
    lanes = z[: 8 * 10_000].reshape(-1, 8)  # the eight lanes are independent streams
    corr = np.corrcoef(lanes.T)
    assert np.abs(corr - np.eye(8)).max() < 5 / math.sqrt(10_000)
    other = _normals(k, 11, 1, 4096, portable=False)
    assert not np.array_equal(other, z[:4096])
    rc = k.lib.opstwin_rng_normals(1, 0, 12, k.ffi.from_buffer("double[]", np.empty(12)), 0)
    assert rc == k.lib.OPSTWIN_E_PATHS  # not a multiple of the eight lanes


@pytest.mark.parametrize("model", ["fopdt", "tank", "statespace", "weibull"])
def test_vector_and_portable_runs_are_bit_identical(k: Kernel, model: str) -> None:
    if not k.lib.opstwin_simd_level():
        pytest.skip("this CPU has no AVX2: only the portable code runs here")
    models = {
        "fopdt": uncertain_fopdt(k),
        "tank": k.model(
            "tank",
            params=[("uniform", 1.5, 2.5), 0.05, 0.02, 4.0],
            y0=0.5,
            sigma_w=("uniform", 0.0, 0.01),
            sigma_v=0.02,
            inputs=[("step", 40, 80, 10, 0)],
        ),
        "statespace": k.model(
            "statespace",
            n=2,
            m=1,
            p=2,
            A=[0.9, 0.05, -0.1, 0.8],
            B=[0.1, 0.2],
            C=[1.0, 0.0, 0.5, 1.0],
            x0=[1.0, 0.0],
            q=[0.01, 0.0],
            r=[0.04, 0.01],
            inputs=[("ramp", 0, 1, 2, 9)],
        ),
        "weibull": k.model("weibull", params=[("uniform", 1.5, 2.5), 100.0, 20.0]),
    }
    kw: dict[str, Any] = dict(
        dt=0.5, n_steps=70, n_paths=1000, constraints=[(0, "upper", 1.0)], raw=True, threads=2
    )
    rc1, a = k.run(models[model], portable=False, **kw)
    rc2, b = k.run(models[model], portable=True, **kw)
    assert rc1 == rc2 == 0
    for key in ("raw", "percentiles", "violation_prob", "first_violation", "kpi", "kpi_rse"):
        assert a[key].tobytes() == b[key].tobytes(), key


def test_every_output_is_summarised_in_one_pass(k: Kernel) -> None:
    m = k.model(
        "statespace",
        n=3,
        m=2,
        p=3,
        A=[0.9, 0.1, 0.0, 0.0, 0.8, 0.1, 0.05, 0.0, 0.7],
        B=[0.1, 0.0, 0.0, 0.2, 0.3, 0.1],
        C=[1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.3, 0.3, 0.3],
        x0=[1.0, -1.0, 0.5],
        q=[0.01, 0.02, 0.0],
        r=[0.05, 0.0, 0.1],
        inputs=[("step", 0, 1, 3, 0), ("hold", 2, 0, 0, 0)],
    )
    cons = [(2, "upper", 0.9), (1, "lower", -0.5)]
    rc, r = k.run(m, dt=0.5, n_steps=40, n_paths=3001, raw=True, constraints=cons, threads=3)
    assert rc == 0
    Y = r["raw"]  # (paths, steps, outputs)
    for o in range(3):
        yo = Y[:, :, o]
        np.testing.assert_allclose(r["percentiles"][o], np.percentile(yo, PCTS, axis=0).T, atol=0)
        for i, v in enumerate([yo[:, -1], yo.max(axis=1), yo.min(axis=1), yo.mean(axis=1)]):
            want = [v.mean(), v.std(), *np.percentile(v, [5, 50, 95])]
            np.testing.assert_allclose(r["kpi"][o][i], want, rtol=1e-12, atol=1e-12)
    for c, (o, kind, lim) in enumerate(cons):
        viol = Y[:, :, o] > lim if kind == "upper" else Y[:, :, o] < lim
        assert r["violation_prob"][c] == pytest.approx(viol.any(axis=1).mean())


def test_noise_levels_may_be_distributions(k: Kernel) -> None:
    # K = 0: y = y0 + sigma_v * v with sigma_v ~ uniform(0.5, 1.5) per path, so
    # var(y) = E[sigma_v^2] = (0.5^2 + 0.5 * 1.5 + 1.5^2) / 3, and per path the spread of y
    # over steps is that path's own sigma_v
    m = k.model(
        "fopdt",
        params=[0.0, 5.0, 0.0],
        y0=10.0,
        sigma_v=("uniform", 0.5, 1.5),
        inputs=[("hold", 0, 0, 0, 0)],
    )
    rc, r = k.run(m, n_steps=400, n_paths=2000, raw=True, seed=3)
    assert rc == 0
    y = r["raw"]
    assert y.var() == pytest.approx((0.25 + 0.75 + 2.25) / 3, rel=0.03)
    per_path = y.std(axis=1)
    assert per_path.min() > 0.45 and per_path.max() < 1.6
    assert np.std(per_path) == pytest.approx(1 / math.sqrt(12), rel=0.1)  # uniform(0.5, 1.5)
    # a distribution that never reaches the domain names the noise parameter
    bad = k.model(
        "fopdt",
        params=[0.0, 5.0, 0.0],
        sigma_w=("uniform", -2.0, -1.0),
        inputs=[("hold", 0, 0, 0, 0)],
    )
    rc, r = k.run(bad, n_steps=5, n_paths=100)
    assert rc == k.lib.OPSTWIN_E_DOMAIN and r["error_param"] == 3


def test_adaptive_can_target_a_kpi_of_any_output(k: Kernel) -> None:
    m = k.model(
        "statespace",
        n=1,
        m=1,
        p=2,
        A=[0.5],
        B=[1.0],
        C=[1.0, 2.0],
        x0=[0.0],
        r=[0.01, 25.0],  # output 1 is noisy: its max needs many more paths for the same RSE
        inputs=[("hold", 1, 0, 0, 0)],
    )
    kw: dict[str, Any] = dict(
        n_steps=20, adaptive=True, batch=64, max_paths=200_000, rse_target=0.002, driving_kpi=1
    )
    rc, quiet = k.run(m, driving_output=0, **kw)
    rc2, noisy = k.run(m, driving_output=1, **kw)
    assert rc == rc2 == 0
    assert quiet["kpi_rse"][0][1] <= 0.002 and noisy["kpi_rse"][1][1] <= 0.002
    assert noisy["n_paths_run"] > 4 * quiet["n_paths_run"]


def test_ziggurat_tables_are_the_generated_constants() -> None:
    generator = import_file(NATIVE / "gen_ziggurat.py")
    assert (NATIVE / "ziggurat_tables.h").read_text() == generator.render()
    zx, zf = generator.tables()
    assert zx[1] == pytest.approx(3.6541528853610088) and zx[-1] == 0.0 and zf[-1] == 1.0
    assert all(a > b for a, b in itertools.pairwise(zx[1:]))  # layers shrink upwards


def test_memory_bound_is_the_one_python_validates(k: Kernel) -> None:
    from gateway.sim.models import BLOCK_PATHS, MAX_VALUES, Scenario

    assert k.lib.OPSTWIN_MAX_VALUES == MAX_VALUES and k.lib.OPSTWIN_BLOCK_PATHS == BLOCK_PATHS
    steps = 1_000_000
    most = MAX_VALUES // steps  # paths at the bound with one output
    spec = {
        "model": {"kind": "fopdt", "gain": 1.0, "tau": 5.0},
        "y0": 0.0,
        "horizon_s": float(steps),
        "dt_s": 1.0,
    }
    Scenario.model_validate({**spec, "paths": most})
    with pytest.raises(ValueError, match="GiB bound"):
        Scenario.model_validate({**spec, "paths": most + 1})
    m = k.model("fopdt", params=[1.0, 5.0, 0.0], inputs=[("hold", 0, 0, 0, 0)])
    assert k.run(m, n_steps=steps, n_paths=most + 1)[0] == k.lib.OPSTWIN_E_TOO_LARGE
    # adaptive: both count max_paths rounded up to whole blocks of 64
    ad = {"rse_target": 0.01, "batch": 64, "max_paths": most}  # 268 runs as 320
    with pytest.raises(ValueError, match="GiB bound"):
        Scenario.model_validate({**spec, "paths": 1, "adaptive": ad, "kpis": ["max"]})
    rc, _ = k.run(m, n_steps=steps, adaptive=True, batch=64, max_paths=most)
    assert rc == k.lib.OPSTWIN_E_TOO_LARGE


# -- per-path results (issue 16): what the policy gate's joint success share is computed from ---

SUMMARY_KEYS = (
    "percentiles",
    "violation_prob",
    "violation_rse",
    "first_violation",
    "kpi",
    "kpi_rse",
)


def _raw_path_stats(
    Y: np.ndarray, cons: Sequence[tuple[int, str, float]]
) -> tuple[np.ndarray, np.ndarray]:
    """Every path's KPIs (p, 4, paths) and first violations (c, paths) from raw paths (paths,
    steps, p); the mean summed step after step, the kernel's order, so all compare exactly."""
    steps = Y.shape[1]
    kpis = np.stack(
        [Y[:, -1], Y.max(axis=1), Y.min(axis=1), np.add.accumulate(Y, axis=1)[:, -1] / steps]
    ).transpose(2, 0, 1)
    first = np.full((len(cons), Y.shape[0]), -1, dtype=np.int32)
    for c, (o, kind, lim) in enumerate(cons):
        viol = Y[:, :, o] > lim if kind == "upper" else Y[:, :, o] < lim
        hit = viol.any(axis=1)
        first[c, hit] = viol[hit].argmax(axis=1)
    return kpis, first


def _check_path_stats(r: dict[str, Any], cons: Sequence[tuple[int, str, float]]) -> None:
    Y = r["raw"] if r["raw"].ndim == 3 else r["raw"][:, :, None]
    kpis, first = _raw_path_stats(Y, cons)
    got = r["path_kpi"] if r["path_kpi"].ndim == 3 else r["path_kpi"][None]
    assert got.shape == kpis.shape and r["path_violation"].shape == first.shape
    assert got.tobytes() == kpis.tobytes()  # final, max, min exactly; the mean summed alike
    np.testing.assert_allclose(got[:, 3], Y.mean(axis=1).T, rtol=1e-12)  # numpy's pairwise sum
    assert np.array_equal(r["path_violation"], first)
    # the summaries are these very numbers
    for c in range(len(cons)):
        assert r["violation_prob"][c] == np.mean(first[c] >= 0)
    kpi = r["kpi"] if r["kpi"].ndim == 3 else r["kpi"][None]
    np.testing.assert_allclose(kpi[:, :, 0], got.mean(axis=2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 3])
def test_path_stats_are_the_raw_paths_kpis_and_first_violations(k: Kernel, threads: int) -> None:
    m = uncertain_fopdt(k)
    cons = [(0, "upper", 53.0), (0, "lower", 49.8), (0, "upper", 1e9)]
    kw: dict[str, Any] = dict(dt=0.5, n_steps=80, n_paths=1001, constraints=cons, threads=threads)
    rc, r = k.run(m, raw=True, path_stats=True, **kw)
    assert rc == 0 and r["path_kpi"].shape == (4, 1001)
    _check_path_stats(r, cons)
    assert r["path_violation"].dtype == np.int32
    assert 0 < (r["path_violation"] >= 0).any(axis=0).mean() < 1  # both kinds of path occur
    assert (r["path_violation"][2] == -1).all()
    # the summaries do not change when per-path results are asked for
    rc, off = k.run(m, **kw)
    assert rc == 0
    for key in SUMMARY_KEYS:
        assert r[key].tobytes() == off[key].tobytes(), key


def test_path_stats_of_every_output_and_constraint_of_a_state_space_model(k: Kernel) -> None:
    m = k.model(
        "statespace",
        n=3,
        m=1,
        p=2,
        A=[0.9, 0.1, 0.0, 0.0, 0.8, 0.1, 0.05, 0.0, 0.7],
        B=[0.1, 0.2, 0.3],
        C=[1.0, 0.0, 0.0, 0.0, 1.0, 1.0],
        x0=[1.0, -1.0, 0.5],
        q=[0.01, 0.02, 0.0],
        r=[0.05, 0.1],
        inputs=[("step", 0, 1, 3, 0)],
    )
    cons = [(1, "upper", 3.65), (0, "lower", 0.05), (1, "lower", -0.6), (0, "upper", 2.85)]
    kw: dict[str, Any] = dict(dt=0.5, n_steps=40, n_paths=700, constraints=cons, threads=2)
    rc, r = k.run(m, raw=True, path_stats=True, **kw)
    assert rc == 0 and r["path_kpi"].shape == (2, 4, 700)
    assert r["path_violation"].shape == (4, 700)
    _check_path_stats(r, cons)
    for c in range(4):  # every constraint both holds and fails somewhere: a real test
        assert 0 < (r["path_violation"][c] >= 0).mean() < 1, c
    rc, off = k.run(m, **kw)
    for key in SUMMARY_KEYS:
        assert r[key].tobytes() == off[key].tobytes(), key


def test_path_stats_of_the_weibull_model(k: Kernel) -> None:
    m = k.model("weibull", params=[("uniform", 1.5, 2.5), 100.0, 20.0])
    cons = [(0, "upper", 0.5)]
    rc, r = k.run(m, n_steps=60, n_paths=500, constraints=cons, raw=True, path_stats=True)
    assert rc == 0
    _check_path_stats(r, cons)
    # a 0/1 output: a path fails at its first 1, which is also where its mean starts to grow
    failed = r["path_violation"][0] >= 0
    assert np.array_equal(failed, r["path_kpi"][0] == 1.0)
    fails_at = r["path_violation"][0][failed]
    assert np.array_equal(r["path_kpi"][3][failed], (60 - fails_at) / 60)


def test_path_stats_do_not_depend_on_threads_or_the_vector_unit(k: Kernel) -> None:
    m = uncertain_fopdt(k)
    kw: dict[str, Any] = dict(
        dt=0.5, n_steps=60, n_paths=777, constraints=[(0, "upper", 53.0)], path_stats=True
    )
    _, one = k.run(m, threads=1, **kw)
    for other in (k.run(m, threads=2, **kw)[1], k.run(m, threads=3, portable=True, **kw)[1]):
        assert one["path_kpi"].tobytes() == other["path_kpi"].tobytes()
        assert one["path_violation"].tobytes() == other["path_violation"].tobytes()


def test_adaptive_path_stats_cover_the_paths_run(k: Kernel) -> None:
    m = uncertain_fopdt(k)
    cons = [(0, "upper", 53.0)]
    kw: dict[str, Any] = dict(dt=0.5, n_steps=40, constraints=cons, threads=2)
    ad: dict[str, Any] = dict(adaptive=True, batch=500, max_paths=50_000, rse_target=0.02)
    rc, r = k.run(m, raw=True, path_stats=True, **ad, **kw)
    assert rc == 0
    n = r["n_paths_run"]
    assert n < 50_000 and r["path_kpi"].shape == (4, n) and r["path_violation"].shape == (1, n)
    _check_path_stats(r, cons)
    # the same paths as a fixed run of that size, laid out at the same stride
    rc, f = k.run(m, n_paths=n, path_stats=True, **kw)
    assert f["path_kpi"].tobytes() == r["path_kpi"].tobytes()
    assert f["path_violation"].tobytes() == r["path_violation"].tobytes()


def test_short_or_missing_path_buffers(k: Kernel) -> None:
    lib, ffi = k.lib, k.ffi
    m = k.model("fopdt", params=[1.0, 5.0, 0.0], y0=0.0, inputs=[("hold", 0, 0, 0, 0)])
    cons = ffi.new("opstwin_constraint[]", 2)
    cons[0].kind = cons[1].kind = lib.OPSTWIN_UPPER
    s = ffi.new("opstwin_scenario *")
    s.dt, s.n_steps, s.n_paths, s.threads = 1.0, 10, 10, 1
    s.n_constraints, s.constraints = 2, cons
    o = ffi.new("opstwin_output *")
    keep = {n: ffi.new("double[]", 100) for n in SUMMARY_KEYS}
    for n, b in keep.items():
        setattr(o, n, b)
        setattr(o, n + "_len", 100)
    pk, pv = ffi.new("double[]", 40), ffi.new("int32_t[]", 20)
    assert lib.opstwin_sim_run(m, s, o) == 0  # both NULL: not wanted
    o.path_kpi, o.path_kpi_len = pk, 39  # one output x 4 KPIs x 10 paths
    assert lib.opstwin_sim_run(m, s, o) == lib.OPSTWIN_E_OUTPUT
    o.path_kpi_len = 40
    assert lib.opstwin_sim_run(m, s, o) == 0  # KPIs alone
    o.path_violation, o.path_violation_len = pv, 19  # 2 constraints x 10 paths
    assert lib.opstwin_sim_run(m, s, o) == lib.OPSTWIN_E_OUTPUT
    o.path_violation_len = -1
    assert lib.opstwin_sim_run(m, s, o) == lib.OPSTWIN_E_OUTPUT
    o.path_violation_len = 20
    assert lib.opstwin_sim_run(m, s, o) == 0
    o.path_kpi = ffi.NULL  # violations alone
    assert lib.opstwin_sim_run(m, s, o) == 0
    assert list(pv) == [-1] * 20  # limit 0 on an output that stays at 0: never violated
    # adaptive: counted as raw_paths is, max_paths rounded up to whole blocks of 64
    s.adaptive, s.batch, s.max_paths, s.rse_target = 1, 64, 70, 1e-9
    big = ffi.new("int32_t[]", 2 * 128)
    o.path_violation, o.path_violation_len = big, 2 * 128 - 1
    assert lib.opstwin_sim_run(m, s, o) == lib.OPSTWIN_E_OUTPUT
    o.path_violation_len = 2 * 128
    assert lib.opstwin_sim_run(m, s, o) == 0 and o.n_paths_run == 70
