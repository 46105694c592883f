"""FOPDT fit from an input/output history: recovers known parameters within its own errors."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.sim import FopdtModel, Normal, Scenario, StepInput
from gateway.sim.fit import fit_fopdt, resample
from gateway.sim.reference import input_array, simulate


def _history(
    seed: int, *, gain: float = 2.0, tau: float = 25.0, theta: float = 4.0, sigma_v: float = 0.05
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simulated twin history: u and y sampled at t = 0..300 s, step at 20 s."""
    sc = Scenario(
        model=FopdtModel(gain=gain, tau=tau, theta=theta, sigma_v=sigma_v),
        y0=60.0,
        input=StepInput(u0=10, u1=13, t_step=20),
        horizon_s=300,
        dt_s=1,
        paths=1,
        seed=seed,
    )
    y = simulate(sc, keep_paths=True).y
    assert y is not None
    t = np.arange(301.0)
    u = np.append(input_array(sc)[:, 0], 13.0)
    return t, u, np.concatenate([[60.0], y[0]])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fit_recovers_parameters_within_three_stderr(seed: int) -> None:
    t, u, y = _history(seed)
    fit = fit_fopdt(t, u, y)
    assert fit.theta == 4.0
    assert abs(fit.gain - 2.0) <= 3 * fit.gain_stderr
    assert abs(fit.tau - 25.0) <= 3 * fit.tau_stderr
    assert abs(fit.bias - 60.0) <= 3 * fit.bias_stderr
    assert fit.sigma_v == pytest.approx(0.05, rel=0.2)
    # The errors are informative, not huge: well under 5 % of the values here.
    assert fit.gain_stderr < 0.05 * 2.0 and fit.tau_stderr < 0.05 * 25.0


def test_fit_is_exact_on_noise_free_data() -> None:
    t, u, y = _history(0, gain=-1.5, tau=12.0, theta=7.0, sigma_v=0.0)
    fit = fit_fopdt(t, u, y)
    assert (fit.gain, fit.tau, fit.theta) == pytest.approx((-1.5, 12.0, 7.0), rel=1e-6)
    np.testing.assert_allclose(fit.predict(u), y, atol=1e-6)


def test_uncertain_model_samples_the_fit_uncertainty() -> None:
    t, u, y = _history(4)
    fit = fit_fopdt(t, u, y, theta_grid=np.arange(0, 10.0))
    m = fit.as_uncertain_model()
    assert isinstance(m.gain, Normal) and isinstance(m.tau, Normal)
    assert (m.gain.mean, m.gain.sd) == (fit.gain, fit.gain_stderr)
    assert (m.tau.mean, m.tau.sd) == (fit.tau, fit.tau_stderr)
    assert m.theta == fit.theta and m.sigma_v == fit.sigma_v
    assert fit.cov.shape == (3, 3) and np.allclose(fit.cov, fit.cov.T)


def test_fit_rejects_bad_data() -> None:
    t, u, y = _history(5)
    with pytest.raises(ValueError, match="uniformly spaced"):
        fit_fopdt(t**1.01, u, y)
    with pytest.raises(ValueError, match="y holds NaN"):
        fit_fopdt(t, u, np.where(t == 50, np.nan, y))
    with pytest.raises(Exception, match="never moves"):
        fit_fopdt(t, np.full_like(u, 10.0), y)


def test_resample_linear_and_hold() -> None:
    ts = np.array([0.0, 1.5, 4.0])
    vs = np.array([0.0, 3.0, 8.0])
    grid, lin = resample(ts, vs, 1.0)
    np.testing.assert_allclose(grid, [0, 1, 2, 3, 4])
    np.testing.assert_allclose(lin, [0, 2, 4, 6, 8])  # slope 2 after t = 1.5
    _, held = resample(ts, vs, 1.0, method="hold")
    np.testing.assert_allclose(held, [0, 0, 3, 3, 8])
    with pytest.raises(ValueError, match="strictly increasing"):
        resample(ts[::-1], vs, 1.0)
