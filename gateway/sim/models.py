"""Typed what-if models and scenarios, validated before any computation (native/SPEC.md)."""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.errors import GatewayError

# Hard bounds checked at validation time, so a bad scenario fails before any array is allocated.
MAX_STEPS = 1_000_000
MAX_PATHS = 10_000_000
# Outputs a run may produce, paths x steps x outputs (2 GiB as doubles): the NumPy reference
# holds them all, the C kernel checks the same bound (OPSTWIN_MAX_VALUES, a test keeps the two
# equal), so a scenario fails the same way whichever backend runs it.
MAX_VALUES = 2**28
MAX_BYTES = MAX_VALUES * 8
BLOCK_PATHS = 64  # the C kernel runs paths in blocks of 64: adaptive batches round up to it
MAX_STATES, MAX_INPUTS, MAX_OUTPUTS = 8, 4, 4


class SimulationError(GatewayError):
    """A simulation that cannot run as asked (e.g. draws that never land in a domain)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


# --- parameter distributions --------------------------------------------------------------------


class Normal(_Strict):
    """Normal distribution of a parameter, drawn once per path."""

    dist: Literal["normal"] = "normal"
    mean: float = Field(description="Mean.")
    sd: float = Field(ge=0, description="Standard deviation (>= 0).")


class Uniform(_Strict):
    """Uniform distribution on [lo, hi], drawn once per path."""

    dist: Literal["uniform"] = "uniform"
    lo: float = Field(description="Lower bound.")
    hi: float = Field(description="Upper bound (> lo).")

    @model_validator(mode="after")
    def _order(self) -> Uniform:
        if not self.hi > self.lo:
            raise ValueError(f"uniform needs lo < hi, got lo={self.lo}, hi={self.hi}")
        return self


class Triangular(_Strict):
    """Triangular distribution on [lo, hi] with peak at mode, drawn once per path."""

    dist: Literal["triangular"] = "triangular"
    lo: float = Field(description="Lower bound.")
    mode: float = Field(description="Most likely value (lo <= mode <= hi).")
    hi: float = Field(description="Upper bound (> lo).")

    @model_validator(mode="after")
    def _order(self) -> Triangular:
        if not (self.lo <= self.mode <= self.hi and self.lo < self.hi):
            raise ValueError(
                f"triangular needs lo <= mode <= hi and lo < hi, "
                f"got lo={self.lo}, mode={self.mode}, hi={self.hi}"
            )
        return self


class Lognormal(_Strict):
    """Lognormal distribution: exp(N(mu, sigma^2)), drawn once per path."""

    dist: Literal["lognormal"] = "lognormal"
    mu: float = Field(description="Mean of the underlying normal.")
    sigma: float = Field(ge=0, description="Standard deviation of the underlying normal (>= 0).")


Distribution = Annotated[Normal | Uniform | Triangular | Lognormal, Field(discriminator="dist")]
Param = float | Distribution

# Domain of each uncertain parameter: (name, lower bound, lower bound inclusive?).
_Domain = tuple[float, bool]
POSITIVE: _Domain = (0.0, False)
NON_NEGATIVE: _Domain = (0.0, True)
ANY: _Domain = (-math.inf, True)


def in_domain(value: float, domain: _Domain) -> bool:
    """Tell whether a scalar lies in a parameter domain."""
    lo, inclusive = domain
    return value >= lo if inclusive else value > lo


def _check_param(name: str, value: Param, domain: _Domain) -> None:
    """Reject a fixed value outside its domain, or a bounded distribution that never reaches it."""
    lo, inclusive = domain
    if isinstance(value, float | int):
        if not in_domain(float(value), domain):
            op = ">=" if inclusive else ">"
            raise ValueError(f"{name} must be {op} {lo:g}, got {value}")
    elif isinstance(value, Uniform | Triangular) and not in_domain(value.hi, domain):
        raise ValueError(f"{name}: every draw of {value.dist}(hi={value.hi}) is outside > {lo:g}")


# --- models -------------------------------------------------------------------------------------


class _ScalarModel(_Strict):
    """A one-output model whose scalar parameters each have a valid domain (DOMAINS)."""

    DOMAINS: ClassVar[dict[str, _Domain]] = {}

    @model_validator(mode="after")
    def _domains(self) -> _ScalarModel:
        for name, dom in self.DOMAINS.items():
            _check_param(name, getattr(self, name), dom)
        return self

    @property
    def n_outputs(self) -> int:
        """Number of outputs."""
        return 1


class FopdtModel(_ScalarModel):
    """First order plus dead time: y follows K*(u-u0) with time constant tau after theta."""

    kind: Literal["fopdt"] = "fopdt"
    gain: Param = Field(description="Process gain K (output units per input unit).")
    tau: Param = Field(description="Time constant in seconds (> 0).")
    theta: Param = Field(default=0.0, description="Dead time in seconds (>= 0), rounded to steps.")
    sigma_w: Param = Field(default=0.0, description="Process noise std dev per step (>= 0).")
    sigma_v: Param = Field(default=0.0, description="Measurement noise std dev (>= 0).")

    DOMAINS: ClassVar[dict[str, _Domain]] = {
        "gain": ANY,
        "tau": POSITIVE,
        "theta": NON_NEGATIVE,
        "sigma_w": NON_NEGATIVE,
        "sigma_v": NON_NEGATIVE,
    }


class TankModel(_ScalarModel):
    """Nonlinear tank: dh/dt = (c_in*u/100 - c_out*sqrt(h))/area, level clipped to [0, h_max]."""

    kind: Literal["tank"] = "tank"
    area: Param = Field(description="Cross-section area in m^2 (> 0).")
    c_in: Param = Field(description="Inflow in m^3/s at 100 % valve (>= 0).")
    c_out: Param = Field(description="Outflow coefficient in m^3/s per sqrt(m) (>= 0).")
    h_max: Param = Field(description="Maximum level in m (> 0); the level is clipped to it.")
    sigma_w: Param = Field(default=0.0, description="Process noise std dev per step, m (>= 0).")
    sigma_v: Param = Field(default=0.0, description="Measurement noise std dev, m (>= 0).")

    DOMAINS: ClassVar[dict[str, _Domain]] = {
        "area": POSITIVE,
        "c_in": NON_NEGATIVE,
        "c_out": NON_NEGATIVE,
        "h_max": POSITIVE,
        "sigma_w": NON_NEGATIVE,
        "sigma_v": NON_NEGATIVE,
    }


class WeibullModel(_ScalarModel):
    """Weibull wear: remaining life given survival to age a0; output 1 once failed, else 0."""

    kind: Literal["weibull"] = "weibull"
    beta: Param = Field(description="Shape parameter (> 0).")
    eta: Param = Field(description="Scale parameter in seconds (> 0).")
    a0: Param = Field(default=0.0, description="Current age in seconds (>= 0).")

    DOMAINS: ClassVar[dict[str, _Domain]] = {"beta": POSITIVE, "eta": POSITIVE, "a0": NON_NEGATIVE}


class StateSpaceModel(_Strict):
    """Discrete linear state space x+ = A x + B u + w, y = C x+ + v (fixed matrices)."""

    kind: Literal["state_space"] = "state_space"
    A: list[list[float]] = Field(description="State matrix, n x n (n <= 8).")
    B: list[list[float]] = Field(description="Input matrix, n x m (m <= 4).")
    C: list[list[float]] = Field(description="Output matrix, p x n (p <= 4).")
    x0: list[float] = Field(description="Initial state, length n.")
    q: list[float] | None = Field(default=None, description="Process noise variances (n).")
    r: list[float] | None = Field(default=None, description="Measurement noise variances (p).")

    @model_validator(mode="after")
    def _shapes(self) -> StateSpaceModel:
        n = len(self.A)
        if not 1 <= n <= MAX_STATES:
            raise ValueError(f"A must have 1..{MAX_STATES} rows, got {n}")
        _rect("A", self.A, n, n)
        if len(self.B) != n:
            raise ValueError(f"B must have n={n} rows (one per state), got {len(self.B)}")
        m = len(self.B[0]) if self.B else 0
        if not 1 <= m <= MAX_INPUTS:
            raise ValueError(f"B must have 1..{MAX_INPUTS} columns (inputs), got {m}")
        _rect("B", self.B, n, m)
        p = len(self.C)
        if not 1 <= p <= MAX_OUTPUTS:
            raise ValueError(f"C must have 1..{MAX_OUTPUTS} rows (outputs), got {p}")
        _rect("C", self.C, p, n)
        if len(self.x0) != n:
            raise ValueError(f"x0 must have length n={n}, got {len(self.x0)}")
        for name, vec, size in (("q", self.q, n), ("r", self.r, p)):
            if vec is None:
                continue
            if len(vec) != size:
                raise ValueError(f"{name} must have length {size}, got {len(vec)}")
            if any(v < 0 for v in vec):
                raise ValueError(f"{name} holds variances and must be >= 0, got {vec}")
        return self

    @property
    def n_states(self) -> int:
        """Number of states n."""
        return len(self.A)

    @property
    def n_inputs(self) -> int:
        """Number of inputs m."""
        return len(self.B[0])

    @property
    def n_outputs(self) -> int:
        """Number of outputs p."""
        return len(self.C)


def _rect(name: str, rows: list[list[float]], n_rows: int, n_cols: int) -> None:
    for i, row in enumerate(rows):
        if len(row) != n_cols:
            raise ValueError(f"{name} must be {n_rows}x{n_cols}; row {i} has {len(row)} entries")


Model = Annotated[
    FopdtModel | StateSpaceModel | TankModel | WeibullModel, Field(discriminator="kind")
]

# --- inputs -------------------------------------------------------------------------------------


class HoldInput(_Strict):
    """Constant input u0."""

    kind: Literal["hold"] = "hold"
    u0: float = Field(description="Input value held over the horizon.")


class StepInput(_Strict):
    """u0 before t_step, u1 from t_step on."""

    kind: Literal["step"] = "step"
    u0: float = Field(description="Input before the step.")
    u1: float = Field(description="Input from t_step on.")
    t_step: float = Field(ge=0, description="Step time in seconds from now (>= 0).")


class RampInput(_Strict):
    """u0 until t0, linear to u1 at t1, u1 after."""

    kind: Literal["ramp"] = "ramp"
    u0: float = Field(description="Input until t0.")
    u1: float = Field(description="Input from t1 on.")
    t0: float = Field(ge=0, description="Ramp start in seconds (>= 0).")
    t1: float = Field(description="Ramp end in seconds (> t0).")

    @model_validator(mode="after")
    def _order(self) -> RampInput:
        if not self.t1 > self.t0:
            raise ValueError(f"ramp needs t0 < t1, got t0={self.t0}, t1={self.t1}")
        return self


InputSpec = Annotated[HoldInput | StepInput | RampInput, Field(discriminator="kind")]

# --- scenario -----------------------------------------------------------------------------------


class Constraint(_Strict):
    """A limit on one output; violated when y > limit (upper) or y < limit (lower)."""

    kind: Literal["upper", "lower"] = Field(description="upper: y > limit violates; lower: y <.")
    limit: float = Field(description="Limit value in output units.")
    output: int = Field(default=0, ge=0, description="Output index (state-space only; else 0).")


class Kpi(_Strict):
    """A per-path statistic of one output, summarised across paths."""

    kind: Literal["final", "max", "min", "mean"] = Field(description="Per-path statistic.")
    output: int = Field(default=0, ge=0, description="Output index (state-space only; else 0).")


class Adaptive(_Strict):
    """Run batches until the relative standard error target or the path cap is reached."""

    rse_target: float = Field(default=0.01, gt=0, description="Stop when RSE <= this.")
    batch: int = Field(default=1000, gt=0, description="Paths per batch.")
    max_paths: int = Field(default=100_000, gt=0, le=MAX_PATHS, description="Cap on paths run.")


class Scenario(_Strict):
    """A what-if question: a model, an initial state, an input plan, and what to report."""

    model: Model = Field(description="The process model.")
    y0: float | None = Field(default=None, description="FOPDT: current output (steady at u0).")
    h0: float | None = Field(default=None, ge=0, description="Tank: current level in m.")
    input: InputSpec | list[InputSpec] = Field(
        default_factory=lambda: HoldInput(u0=0.0),
        description="Input plan; state-space takes one per input (or one for all).",
    )
    horizon_s: float = Field(gt=0, description="Horizon in seconds (> 0).")
    dt_s: float = Field(gt=0, description="Step in seconds (> 0).")
    paths: int = Field(default=1000, gt=0, le=MAX_PATHS, description="Monte Carlo paths (> 0).")
    seed: int = Field(default=0, ge=0, lt=2**64, description="64-bit seed; same seed, same result.")
    constraints: list[Constraint] = Field(default_factory=list, description="Limits to check.")
    kpis: list[Kpi] = Field(default_factory=list, description="Per-path KPIs to summarise.")
    adaptive: Adaptive | None = Field(default=None, description="Adaptive path count, or None.")

    @field_validator("kpis", mode="before")
    @classmethod
    def _kpi_strings(cls, v: object) -> object:
        # A bare "max" is the common case; accept it as {kind: max, output: 0}.
        if isinstance(v, list):
            return [{"kind": k} if isinstance(k, str) else k for k in v]
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        m = self.model
        if isinstance(m, FopdtModel) and self.y0 is None:
            raise ValueError("y0 (the twin's current output) is required for an fopdt model")
        if isinstance(m, TankModel) and self.h0 is None:
            raise ValueError("h0 (the twin's current level) is required for a tank model")
        inputs = self.input if isinstance(self.input, list) else [self.input]
        n_in = m.n_inputs if isinstance(m, StateSpaceModel) else 1
        if len(inputs) not in (1, n_in):
            raise ValueError(f"input: model takes {n_in} input(s), got {len(inputs)} plans")
        p = m.n_outputs
        outputs = [("constraints", i, c.output) for i, c in enumerate(self.constraints)]
        outputs += [("kpis", i, k.output) for i, k in enumerate(self.kpis)]
        for where, i, output in outputs:
            if output >= p:
                raise ValueError(f"{where}[{i}].output={output} but the model has {p} output(s)")
        if self.adaptive and not (self.constraints or self.kpis):
            raise ValueError("adaptive needs a constraint or a KPI whose RSE it can target")
        steps = self.n_steps
        if steps > MAX_STEPS:
            raise ValueError(
                f"horizon_s/dt_s gives {steps} steps, above the limit {MAX_STEPS}; "
                "raise dt_s or shorten horizon_s"
            )
        paths = self.paths
        if self.adaptive:  # the last batch may run up to the next whole block
            paths = -(-self.adaptive.max_paths // BLOCK_PATHS) * BLOCK_PATHS
        if paths * steps * p > MAX_VALUES:
            raise ValueError(
                f"{paths} paths x {steps} steps x {p} output(s) x 8 bytes "
                f"= {paths * steps * p * 8 / 2**30:.1f} GiB, "
                f"above the {MAX_BYTES / 2**30:.0f} GiB bound; use fewer paths or steps"
            )
        return self

    @property
    def n_steps(self) -> int:
        """Number of steps: ceil(horizon / dt)."""
        # Guard against 10.000000000000002 steps from float division of exact multiples.
        ratio = self.horizon_s / self.dt_s
        return max(1, math.ceil(ratio - 1e-9 * max(1.0, ratio)))

    @property
    def input_plans(self) -> list[HoldInput | StepInput | RampInput]:
        """One input plan per model input."""
        inputs = self.input if isinstance(self.input, list) else [self.input]
        n_in = self.model.n_inputs if isinstance(self.model, StateSpaceModel) else 1
        return inputs * n_in if len(inputs) == 1 else list(inputs)
