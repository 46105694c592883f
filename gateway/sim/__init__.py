"""What-if simulation: typed models, the NumPy reference backend, results, and model fitting."""

from __future__ import annotations

from gateway.sim.models import (
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
from gateway.sim.results import SimResult

BACKENDS = ("numpy", "native")


def simulate(
    scenario: Scenario,
    *,
    keep_paths: bool = False,
    path_stats: bool = False,
    backend: str = "numpy",
) -> SimResult:
    """Run a what-if scenario on the named backend and return its result."""
    if backend == "numpy":
        from gateway.sim import reference

        return reference.simulate(scenario, keep_paths=keep_paths, path_stats=path_stats)
    if backend == "native":
        from gateway.sim import native

        return native.simulate(scenario, keep_paths=keep_paths, path_stats=path_stats)
    raise ValueError(f"unknown simulation backend {backend!r}; choose one of {BACKENDS}")


__all__ = [
    "BACKENDS",
    "Adaptive",
    "Constraint",
    "FopdtModel",
    "HoldInput",
    "Kpi",
    "Lognormal",
    "Normal",
    "RampInput",
    "Scenario",
    "SimResult",
    "SimulationError",
    "StateSpaceModel",
    "StepInput",
    "TankModel",
    "Triangular",
    "Uniform",
    "WeibullModel",
    "simulate",
]
