"""Simulation results: fan-chart percentiles, constraint probabilities, KPI statistics, RSE."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.sim.models import Constraint, Kpi, Scenario

PERCENTILES = (5, 25, 50, 75, 95, 99)
FAN_KEYS = ("p5", "p25", "p50", "p75", "p95", "p99")
# The per-path KPIs, in the order of the kernel's kpi[] rows and of SimResult.path_kpis' axis 1.
KPI_ORDER = ("final", "max", "min", "mean")


@dataclass(frozen=True)
class ConstraintResult:
    """Probability of violating one constraint, its RSE, and the first-violation-time spread."""

    constraint: Constraint
    violation_probability: float
    rse: float
    first_violation: dict[str, float] | None  # p5, p50, p95, mean in seconds; None if none violate


@dataclass(frozen=True)
class KpiResult:
    """Across-path statistics of one per-path KPI."""

    kpi: Kpi
    mean: float
    std: float
    p5: float
    p50: float
    p95: float
    rse: float


@dataclass(frozen=True)
class SimResult:
    """What a simulation found; arrays are NumPy, `summary()` is plain JSON-ready data."""

    times: np.ndarray  # (n_steps,) time of each recorded output, t_{k+1} = (k+1)*dt
    output_percentiles: np.ndarray  # (p, 6, n_steps)
    constraints: list[ConstraintResult]
    kpis: list[KpiResult]
    paths_run: int
    seed: int
    backend: str
    y: np.ndarray | None = field(default=None, repr=False)  # (paths, n_steps[, p]) if kept
    # With path_stats: every path's KPIs (p, 4, paths) in KPI_ORDER, and the step index k of its
    # first violation of each constraint (n_constraints, paths), -1 where it never violated it.
    path_kpis: np.ndarray | None = field(default=None, repr=False)
    path_first_violation: np.ndarray | None = field(default=None, repr=False)

    @property
    def percentiles(self) -> np.ndarray:
        """Percentiles p5, p25, p50, p75, p95, p99 of output 0: shape (6, n_steps)."""
        return self.output_percentiles[0]

    @property
    def violation_probability(self) -> list[float]:
        """Violation probability per constraint, in scenario order."""
        return [c.violation_probability for c in self.constraints]

    @property
    def first_violation(self) -> list[dict[str, float] | None]:
        """First-violation-time statistics per constraint (None where no path violates)."""
        return [c.first_violation for c in self.constraints]

    @property
    def rse(self) -> list[float]:
        """Relative standard error per constraint probability, in scenario order."""
        return [c.rse for c in self.constraints]

    def paths_within_constraints(self) -> np.ndarray:
        """Return, per path run, whether it kept every constraint over the whole horizon."""
        return np.asarray((self._first_violations() < 0).all(axis=0))

    def path_kpi(self, kind: str, output: int = 0) -> np.ndarray:
        """Return one KPI (`final`, `max`, `min`, `mean`) of one output on every path run."""
        if self.path_kpis is None:
            raise ValueError(
                "this result has no per-path KPIs: run the simulation with path_stats=True"
            )
        if kind not in KPI_ORDER:
            raise ValueError(f"unknown KPI {kind!r}; choose one of {KPI_ORDER}")
        return self.path_kpis[output, KPI_ORDER.index(kind)]

    def _first_violations(self) -> np.ndarray:
        if self.path_first_violation is None:
            raise ValueError(
                "this result has no per-path constraint results: run the simulation with "
                "path_stats=True"
            )
        return self.path_first_violation

    def fan(self, output: int = 0) -> dict[str, np.ndarray]:
        """Return the fan chart of one output as {"p5": array, ..., "p99": array}."""
        return dict(zip(FAN_KEYS, self.output_percentiles[output], strict=True))

    def summary(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of the result (no raw paths)."""
        return {
            "backend": self.backend,
            "seed": self.seed,
            "paths_run": self.paths_run,
            "times": self.times.tolist(),
            "fan": [
                {k: _floats(v) for k, v in self.fan(i).items()}
                for i in range(self.output_percentiles.shape[0])
            ],
            "constraints": [
                {
                    **c.constraint.model_dump(),
                    "violation_probability": c.violation_probability,
                    "rse": _json_float(c.rse),
                    "first_violation": c.first_violation,
                }
                for c in self.constraints
            ],
            "kpis": [
                {
                    **k.kpi.model_dump(),
                    "mean": k.mean,
                    "std": k.std,
                    "p5": k.p5,
                    "p50": k.p50,
                    "p95": k.p95,
                    "rse": _json_float(k.rse),
                }
                for k in self.kpis
            ],
        }


def summarise(
    scenario: Scenario,
    y: np.ndarray,
    *,
    backend: str,
    keep_paths: bool = False,
    path_stats: bool = False,
) -> SimResult:
    """Build a SimResult from all output paths y of shape (paths, n_steps, p)."""
    n_paths, n_steps, _ = y.shape
    times = scenario.dt_s * np.arange(1, n_steps + 1, dtype=float)
    pct = np.percentile(y, PERCENTILES, axis=0, method="linear")  # (6, n_steps, p)
    out_pct = np.ascontiguousarray(np.moveaxis(pct, 2, 0))
    path_kpis, path_first = path_statistics(scenario.constraints, y) if path_stats else (None, None)
    return SimResult(
        times=times,
        output_percentiles=out_pct,
        constraints=[constraint_stats(c, y[:, :, c.output], times) for c in scenario.constraints],
        kpis=[kpi_stats(k, y[:, :, k.output]) for k in scenario.kpis],
        paths_run=n_paths,
        seed=scenario.seed,
        backend=backend,
        y=(y[:, :, 0] if y.shape[2] == 1 else y) if keep_paths else None,
        path_kpis=path_kpis,
        path_first_violation=path_first,
    )


def path_statistics(constraints: list[Constraint], y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return every path's KPIs (p, 4, paths) in KPI_ORDER and first-violation step indices
    (n_constraints, paths; -1 where a path never violates), from paths y (paths, n_steps, p)."""
    # per output through kpi_of, so each value is the very number kpi_stats summarises
    kpis = np.array([[kpi_of(kind, y[:, :, o]) for kind in KPI_ORDER] for o in range(y.shape[2])])
    first = np.full((len(constraints), y.shape[0]), -1, dtype=np.int32)
    for i, c in enumerate(constraints):
        yo = y[:, :, c.output]
        viol = yo > c.limit if c.kind == "upper" else yo < c.limit
        hit = viol.any(axis=1)
        first[i, hit] = np.argmax(viol[hit], axis=1)
    return kpis, first


def constraint_stats(c: Constraint, y: np.ndarray, times: np.ndarray) -> ConstraintResult:
    """Return violation probability, RSE and first-violation times for paths y (paths, steps)."""
    viol = y > c.limit if c.kind == "upper" else y < c.limit
    hit = viol.any(axis=1)
    n = y.shape[0]
    p = float(hit.mean())
    first = None
    if hit.any():
        t_first = times[np.argmax(viol[hit], axis=1)]
        p5, p50, p95 = np.percentile(t_first, (5, 50, 95))
        first = {
            "p5": float(p5),
            "p50": float(p50),
            "p95": float(p95),
            "mean": float(t_first.mean()),
        }
    return ConstraintResult(c, p, proportion_rse(p, n), first)


def kpi_stats(k: Kpi, y: np.ndarray) -> KpiResult:
    """Return across-path statistics of one KPI for paths y (paths, steps)."""
    per_path = kpi_values(k, y)
    n = per_path.size
    mean = float(per_path.mean())
    std = float(per_path.std())  # ddof 0, as the C kernel
    p5, p50, p95 = (float(v) for v in np.percentile(per_path, (5, 50, 95)))
    return KpiResult(k, mean, std, p5, p50, p95, mean_rse(mean, std, n))


def kpi_values(k: Kpi, y: np.ndarray) -> np.ndarray:
    """Return the per-path value of a KPI for paths y (paths, steps)."""
    return kpi_of(k.kind, y)


def kpi_of(kind: str, y: np.ndarray) -> np.ndarray:
    """Return the per-path value of KPI `kind` (one of KPI_ORDER) for paths y (paths, steps)."""
    if kind == "final":
        return y[:, -1]
    if kind == "max":
        return y.max(axis=1)
    if kind == "min":
        return y.min(axis=1)
    return y.mean(axis=1)


def proportion_rse(p: float, n: int) -> float:
    """Relative standard error sqrt(p(1-p)/n)/p of a proportion; +inf when p = 0."""
    return math.inf if p <= 0 else math.sqrt(p * (1 - p) / n) / p


def mean_rse(mean: float, std: float, n: int) -> float:
    """Relative standard error std/sqrt(n)/|mean| of a mean; +inf when mean = 0 and std > 0."""
    if mean == 0:
        return 0.0 if std == 0 else math.inf
    return std / math.sqrt(n) / abs(mean)


def _floats(a: np.ndarray) -> list[float]:
    return [float(v) for v in a]


def _json_float(v: float) -> float | None:
    # JSON has no infinity; an undefined RSE (p = 0) is reported as null.
    return None if math.isinf(v) else v
