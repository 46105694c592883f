"""Fit an FOPDT model to an input/output history by least squares, with parameter covariance."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from gateway.sim.models import FopdtModel, Normal, SimulationError

_COARSE_TAUS = 80
_GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass(frozen=True)
class FopdtFit:
    """Least-squares FOPDT estimate from data, with its covariance and residual noise."""

    gain: float
    tau: float
    theta: float  # best value on the dead-time grid (not in the covariance)
    bias: float  # fitted steady output at u0
    u0: float  # input at the first sample, taken as steady state
    dt: float
    cov: np.ndarray  # (3, 3) covariance of (bias, gain, tau): s^2 (J^T J)^-1
    sigma_v: float  # residual standard deviation
    rss: float
    n: int

    @property
    def gain_stderr(self) -> float:
        """Standard error of the gain."""
        return float(math.sqrt(self.cov[1, 1]))

    @property
    def tau_stderr(self) -> float:
        """Standard error of the time constant."""
        return float(math.sqrt(self.cov[2, 2]))

    @property
    def bias_stderr(self) -> float:
        """Standard error of the steady output at u0."""
        return float(math.sqrt(self.cov[0, 0]))

    def predict(self, u: np.ndarray) -> np.ndarray:
        """Return the fitted model's noise-free response to an input series on the fit's dt."""
        d = math.floor(self.theta / self.dt + 0.5)
        return self.bias + self.gain * _response(
            np.asarray(u, float) - self.u0, self.tau, self.dt, d
        )

    def as_uncertain_model(self) -> FopdtModel:
        """Return an FopdtModel whose gain and tau are normal(estimate, stderr)."""
        return FopdtModel(
            gain=Normal(mean=self.gain, sd=self.gain_stderr),
            tau=Normal(mean=self.tau, sd=self.tau_stderr),
            theta=self.theta,
            sigma_w=0.0,
            sigma_v=self.sigma_v,
        )


def resample(
    ts: np.ndarray, values: np.ndarray, dt: float, *, method: Literal["linear", "hold"] = "linear"
) -> tuple[np.ndarray, np.ndarray]:
    """Resample irregular samples onto a uniform grid from ts[0] in steps of dt."""
    ts, values = np.asarray(ts, float), np.asarray(values, float)
    if ts.ndim != 1 or ts.shape != values.shape or ts.size < 2:
        raise ValueError(
            f"ts and values must be 1-D of equal length >= 2, got {ts.shape}, {values.shape}"
        )
    if not (dt > 0 and math.isfinite(dt)):
        raise ValueError(f"dt must be a positive finite number, got {dt}")
    if not (np.all(np.isfinite(ts)) and np.all(np.isfinite(values))):
        raise ValueError("ts and values must be finite (no NaN or inf)")
    if np.any(np.diff(ts) <= 0):
        raise ValueError("ts must be strictly increasing")
    n = math.floor((ts[-1] - ts[0]) / dt * (1 + 1e-12)) + 1
    grid = ts[0] + dt * np.arange(n)
    if method == "linear":
        return grid, np.interp(grid, ts, values)
    if method == "hold":
        # A setpoint holds its value until the next change: last sample at or before each time.
        idx = np.searchsorted(ts, grid * (1 + 1e-15), side="right") - 1
        return grid, values[np.clip(idx, 0, ts.size - 1)]
    raise ValueError(f"method must be 'linear' or 'hold', got {method!r}")


def usable_rows(rows: Iterable[Any]) -> list[tuple[float, float]]:
    """(ts, value) of the GOOD and UNCERTAIN numeric rows of a twin history, for a fit."""
    return [
        (r.ts, float(r.value))
        for r in rows
        if str(r.quality) in ("GOOD", "UNCERTAIN")
        and isinstance(r.value, int | float)
        and not isinstance(r.value, bool)
    ]


def fit_histories(
    u_rows: Sequence[tuple[float, float]], y_rows: Sequence[tuple[float, float]], dt: float
) -> FopdtFit:
    """Fit an input's and an output's (ts, value) histories on one grid of step `dt`.

    The grid starts at the first output sample; the input holds its value between changes (a
    setpoint), the output is interpolated. Raises what fit_fopdt raises.
    """
    t0, t1 = y_rows[0][0], y_rows[-1][0]
    grid = np.arange(t0, t1 + 1e-9, dt)
    u_ts = np.array([r[0] for r in u_rows])
    u_vals = np.array([r[1] for r in u_rows], dtype=float)
    u = u_vals[np.clip(np.searchsorted(u_ts, grid, side="right") - 1, 0, len(u_ts) - 1)]
    y = np.interp(grid, [r[0] for r in y_rows], [r[1] for r in y_rows])
    return fit_fopdt(grid - t0, u, y)


def fit_fopdt(
    t: np.ndarray, u: np.ndarray, y: np.ndarray, *, theta_grid: np.ndarray | None = None
) -> FopdtFit:
    """Fit gain, tau and dead time to uniformly sampled u, y (first sample at steady state)."""
    t, u, y = (np.asarray(a, float) for a in (t, u, y))
    if not (t.ndim == u.ndim == y.ndim == 1 and t.size == u.size == y.size):
        raise ValueError(
            f"t, u, y must be 1-D of equal length, got {t.shape}, {u.shape}, {y.shape}"
        )
    n = t.size
    if n < 10:
        raise ValueError(f"need at least 10 samples to fit, got {n}")
    for name, a in (("t", t), ("u", u), ("y", y)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} holds NaN or inf; clean or resample the history first")
    steps = np.diff(t)
    dt = float(steps.mean())
    if dt <= 0 or np.max(np.abs(steps - dt)) > 1e-6 * dt:
        raise ValueError("t must be uniformly spaced and increasing; use resample() first")
    u0 = float(u[0])
    du = u - u0
    if not np.any(du):
        raise SimulationError("the input never moves from u[0]; the data cannot identify a gain")
    if theta_grid is None:
        delays = np.arange(0, max(1, min(n // 3, 200)) + 1)
    else:
        delays = np.unique(np.floor(np.asarray(theta_grid, float) / dt + 0.5).astype(int))
        if delays.size == 0 or delays.min() < 0 or delays.max() >= n - 3:
            raise ValueError(f"theta_grid must hold dead times in [0, {(n - 4) * dt}] s")

    taus = np.geomspace(0.1 * dt, 10.0 * dt * n, _COARSE_TAUS)
    s0 = _response_many(du, taus, dt)  # (n, n_taus) unit responses with no dead time
    best: list[tuple[float, int, int]] = []
    for delay in delays:
        rss_grid = _linear_rss(_shift(s0, int(delay)), y)
        i = int(np.argmin(rss_grid))
        best.append((float(rss_grid[i]), int(delay), i))
    best.sort()
    # Refine tau for the few most promising dead times; the coarse grid can misrank neighbours.
    refined: list[tuple[float, int, float]] = []
    for _, d, i in best[:3]:
        lo, hi = taus[max(i - 1, 0)], taus[min(i + 1, taus.size - 1)]
        tau = _golden(functools.partial(_rss_of_tau, du, y, dt, d), math.log(lo), math.log(hi))
        refined.append((_rss_at(du, y, tau, dt, d)[0], d, tau))
    rss_best, d, tau = min(refined)
    _, bias, gain = _rss_at(du, y, tau, dt, d)

    s = _response(du, tau, dt, d)
    h = 1e-6 * tau
    ds_dtau = (_response(du, tau + h, dt, d) - _response(du, tau - h, dt, d)) / (2 * h)
    jac = np.column_stack([np.ones(n), s, gain * ds_dtau])
    dof = n - 3
    s2 = rss_best / dof
    try:
        cov = s2 * np.linalg.inv(jac.T @ jac)
    except np.linalg.LinAlgError as exc:
        raise SimulationError("the data cannot identify the fit (singular J^T J)") from exc
    return FopdtFit(
        gain=gain,
        tau=tau,
        theta=d * dt,
        bias=bias,
        u0=u0,
        dt=dt,
        cov=cov,
        sigma_v=math.sqrt(s2),
        rss=rss_best,
        n=n,
    )


# --- helpers ------------------------------------------------------------------------------------


def _response(du: np.ndarray, tau: float, dt: float, d: int) -> np.ndarray:
    """Unit-gain discrete FOPDT response z[k+1] = a z[k] + (1-a) du[k-d], z[0] = 0."""
    a = math.exp(-dt / tau)
    z = np.zeros(du.size)
    acc = 0.0
    vals = du.tolist()
    for k in range(du.size - 1):
        j = k - d
        acc = a * acc + (1 - a) * (vals[j] if j >= 0 else 0.0)
        z[k + 1] = acc
    return z


def _response_many(du: np.ndarray, taus: np.ndarray, dt: float) -> np.ndarray:
    a = np.exp(-dt / taus)
    z = np.zeros((du.size, taus.size))
    for k in range(du.size - 1):
        z[k + 1] = a * z[k] + (1 - a) * du[k]
    return z


def _shift(s0: np.ndarray, d: int) -> np.ndarray:
    if d == 0:
        return s0
    out = np.zeros_like(s0)
    out[d:] = s0[:-d]
    return out


def _linear_rss(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """RSS of y ~ b + K*s for each column of s (closed-form simple regression)."""
    sc = s - s.mean(axis=0)
    yc = y - y.mean()
    sxx = np.einsum("ij,ij->j", sc, sc)
    sxy = sc.T @ yc
    syy = float(yc @ yc)
    with np.errstate(divide="ignore", invalid="ignore"):
        rss = np.where(sxx > 0, syy - sxy**2 / sxx, np.inf)
    return rss


def _rss_of_tau(du: np.ndarray, y: np.ndarray, dt: float, d: int, tau: float) -> float:
    return _rss_at(du, y, tau, dt, d)[0]


def _rss_at(
    du: np.ndarray, y: np.ndarray, tau: float, dt: float, d: int
) -> tuple[float, float, float]:
    s = _response(du, tau, dt, d)
    sc = s - s.mean()
    sxx = float(sc @ sc)
    if sxx <= 0:
        return math.inf, float(y.mean()), 0.0
    gain = float(sc @ (y - y.mean())) / sxx
    bias = float(y.mean() - gain * s.mean())
    r = y - bias - gain * s
    return float(r @ r), bias, gain


def _golden(f: Callable[[float], float], lo: float, hi: float, tol: float = 1e-10) -> float:
    """Minimise f(exp(x)) over x in [lo, hi] by golden-section search; return exp(x*)."""
    a, b = lo, hi
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(math.exp(d))
    return math.exp((a + b) / 2)
