"""A proposal's simulation: the policy's model as a what-if scenario, and the share of paths on
which the change is safe and useful. Pure, except that `run_prediction` calls the C kernel.

The gate's dominant term p (gateway.policy.gate) is "the simulated probability that every safety
constraint holds and the objective improves". Both must hold on the same path, so p is counted
path by path from the kernel's per-path results (`simulate(..., path_stats=True)`), not
multiplied from marginal probabilities:

    p = #{paths: no safety constraint violated over the horizon, and objective(path) better
          than objective(now)} / paths

"Better than now" compares the objective, evaluated on the path's statistic of each simulated
output (`objective.at`: final, mean, max or min; every other point keeps its current value),
with the same expression evaluated on the current readings: doing nothing leaves the plant where
it is (a steady model holds its output). Comparing with a second "do nothing" simulation would
double the simulation's cost for a difference only a drifting model would show. A policy with
no objective is judged on safety alone.

The scenario: the action's point is the model's input, stepping at t = 0 from its current value
to the proposed one; the simulated output's current value starts the prediction (FOPDT `y0`,
tank `h0`); `bind` expressions set model parameters from current readings; `fitted:` replaces the
model with an FOPDT fitted to the twin's history (`fit_history`), its parameter uncertainty
sampled by the Monte Carlo.
"""

from __future__ import annotations

import math
import operator
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from gateway.policy.expr import (
    Binary,
    Bool,
    Call,
    Cond,
    Expr,
    ExprError,
    Name,
    Node,
    Num,
    Str,
    Unary,
)
from gateway.policy.gate import SimSummary
from gateway.policy.model import FAILURE_OUTPUT, Policy
from gateway.sim.fit import fit_histories
from gateway.sim.models import (
    Constraint,
    FopdtModel,
    HoldInput,
    Scenario,
    SimulationError,
    StepInput,
    TankModel,
    WeibullModel,
)
from gateway.sim.results import FAN_KEYS, SimResult

__all__ = [
    "KPI_INDEX",
    "Prediction",
    "build_scenario",
    "fit_history",
    "policy_env",
    "run_prediction",
    "success_mask",
    "vector_eval",
]

KPI_INDEX = {"final": 0, "max": 1, "min": 2, "mean": 3}  # the kernel's per-path KPI order
MIN_FIT_SAMPLES = 10


@dataclass(frozen=True, slots=True)
class Prediction:
    """What the simulation of one proposal found, for the gate and the audit."""

    summary: SimSummary
    details: dict[str, Any]  # JSON-ready: model, seed, per-constraint and objective figures


def policy_env(policy: Policy, values: Mapping[str, Any]) -> dict[str, Any]:
    """Point values keyed as the policy's expressions name them: aliases and point ids."""
    env: dict[str, Any] = dict(values)
    for alias, point_id in policy.points.items():
        env[alias] = values.get(point_id)
    return env


def output_ids(policy: Policy) -> list[str]:
    """The simulated outputs' point ids (`failure` for a weibull model), in the model's order."""
    return [
        ref if ref == FAILURE_OUTPUT else policy.point_id(ref) for ref in policy.simulation.outputs
    ]


def build_scenario(
    policy: Policy,
    values: Mapping[str, Any],
    *,
    current: float,
    proposed: float,
    seed: int | None = None,
    model: Any = None,
) -> Scenario:
    """The what-if scenario of `proposed` replacing `current` on the policy's action point.

    `values` maps point ids to current values; `model` overrides the policy's (a fitted one).
    Raises SimulationError naming what is missing or out of its domain.
    """
    sim = policy.simulation
    env = policy_env(policy, values)
    chosen = model if model is not None else sim.model
    if chosen is None:
        raise SimulationError(f"policy {policy.id}: `fitted:` needs a fitted model first")
    if sim.bind:
        bound = {}
        for name, expr in sim.bind.items():
            try:
                bound[name] = float(expr.evaluate(env))
            except ExprError as exc:
                raise SimulationError(f"simulation.bind.{name}: {exc.message}") from None
        try:
            chosen = type(chosen).model_validate({**chosen.model_dump(), **bound})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise SimulationError(
                f"simulation.bind: {first['msg'].removeprefix('Value error, ')}"
            ) from None
    outputs = output_ids(policy)
    y0: float | None = None
    h0: float | None = None
    if isinstance(chosen, FopdtModel | TankModel):
        start: Any = values.get(outputs[0])
        if not _finite(start):
            raise SimulationError(
                f"{outputs[0]} has no current numeric value ({start!r}) to start the prediction"
            )
        if isinstance(chosen, FopdtModel):
            y0 = float(start)
        else:
            h0 = max(0.0, float(start))
    plan: HoldInput | StepInput
    if isinstance(chosen, WeibullModel):
        plan = HoldInput(u0=proposed)  # wear ignores the input; the age is bound
    else:
        plan = StepInput(u0=current, u1=proposed, t_step=0.0)
    constraints = []
    for c in policy.safety:
        ref = c.output if c.output == FAILURE_OUTPUT else policy.point_id(c.output)
        index = outputs.index(ref)
        if c.upper is not None:
            constraints.append(Constraint(kind="upper", limit=c.upper, output=index))
        if c.lower is not None:
            constraints.append(Constraint(kind="lower", limit=c.lower, output=index))
    try:
        return Scenario(
            model=chosen,
            input=plan,
            horizon_s=sim.horizon_s,
            dt_s=sim.dt_s,
            paths=sim.paths,
            seed=secrets.randbits(63) if seed is None else seed,
            constraints=constraints,
            y0=y0,
            h0=h0,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise SimulationError(
            f"policy {policy.id}: {first['msg'].removeprefix('Value error, ')}"
        ) from None


def success_mask(
    policy: Policy, result: SimResult, values: Mapping[str, Any]
) -> tuple[np.ndarray, dict[str, Any]]:
    """Per path: every safety constraint held and the objective improved; with the figures."""
    safe = result.paths_within_constraints()
    details: dict[str, Any] = {
        "paths": int(result.paths_run),
        "paths_safe": int(safe.sum()),
        "violation_probability": [round(p, 6) for p in result.violation_probability],
    }
    objective = policy.objective
    if objective is None:
        return safe, details
    assert result.path_kpis is not None  # paths_within_constraints() checked path stats
    env = policy_env(policy, values)
    now = objective.expression.evaluate(env)
    stat = KPI_INDEX[objective.at]
    arrays: dict[str, Any] = dict(env)
    for index, point_id in enumerate(output_ids(policy)):
        column = result.path_kpis[index, stat]
        arrays[point_id] = column
        for alias, target in policy.points.items():
            if target == point_id:
                arrays[alias] = column
    with np.errstate(all="ignore"):
        scores = np.broadcast_to(
            np.asarray(vector_eval(objective.expression, arrays), dtype=float), safe.shape
        )
    better = scores < now if objective.minimize is not None else scores > now
    finite = np.isfinite(scores)
    better &= finite
    # Of the finite paths only: one NaN (an unstable model's path, a 0/0) makes np.median NaN,
    # and the audit log refuses a decision whose figures are not JSON numbers.
    scored = scores[finite]
    details.update(
        objective_now=float(now),
        objective_median=float(np.median(scored)) if scored.size else None,
        paths_improved=int(better.sum()),
    )
    return safe & better, details


def run_prediction(
    policy: Policy,
    scenario: Scenario,
    values: Mapping[str, Any],
    simulate: Callable[..., SimResult],
) -> Prediction:
    """Run `scenario` (blocking: call it in a worker thread) and count the successful paths."""
    model = scenario.model
    details: dict[str, Any] = {
        "model": model.kind,
        "paths_requested": scenario.paths,
        "steps": scenario.n_steps,
        "horizon_s": scenario.horizon_s,
        "seed": scenario.seed,
    }
    try:
        result = simulate(scenario, path_stats=True)
        ok, figures = success_mask(policy, result, values)
    except (SimulationError, ExprError, ValueError, TypeError) as exc:
        details["error"] = str(exc)
        return Prediction(SimSummary(0, 0, error=str(exc)), details)
    details.update(figures)
    return Prediction(SimSummary(int(result.paths_run), int(ok.sum())), details)


def fit_history(
    u_rows: Sequence[tuple[float, float]], y_rows: Sequence[tuple[float, float]], dt: float
) -> FopdtModel:
    """An uncertain FOPDT model fitted to (ts, value) histories of the input and the output.

    Inputs hold their value between changes; the output is interpolated onto the same grid.
    Raises SimulationError when the history cannot identify a model.
    """
    if len(u_rows) < 1 or len(y_rows) < MIN_FIT_SAMPLES:
        raise SimulationError(
            f"not enough history to fit: {len(u_rows)} input and {len(y_rows)} output samples "
            f"(need 1 and {MIN_FIT_SAMPLES})"
        )
    try:
        return fit_histories(u_rows, y_rows, dt).as_uncertain_model()
    except ValueError as exc:
        raise SimulationError(f"cannot fit a model: {exc}") from None


# -- the objective over every path at once -------------------------------------------------------

_ARITH: dict[str, Callable[[Any, Any], Any]] = {
    "+": np.add,
    "-": np.subtract,
    "*": np.multiply,
    "/": np.divide,
    "%": np.mod,  # the divisor's sign, as the scalar evaluator (Python's %)
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
    "==": operator.eq,
    "!=": operator.ne,
    "and": np.logical_and,
    "or": np.logical_or,
}


def vector_eval(expr: Expr, env: Mapping[str, Any]) -> Any:
    """Evaluate an objective with some names bound to per-path arrays (NumPy, elementwise).

    The same operators and functions as gateway.policy.expr, over arrays: a division by zero
    gives inf or NaN on that path (the caller counts it as not improved) instead of an error.
    Both sides of `if` and of `and`/`or` are computed, then selected.
    """
    return _node(expr.tree, env)


def _node(node: Node, env: Mapping[str, Any]) -> Any:
    if isinstance(node, Num | Bool | Str):
        return node.value
    if isinstance(node, Name):
        value = env.get(node.name)
        if value is None:
            raise ExprError(f"no value for {node.name!r}")
        return value
    if isinstance(node, Unary):
        x = _node(node.operand, env)
        return np.negative(x) if node.op == "-" else np.logical_not(x)
    if isinstance(node, Binary):
        return _ARITH[node.op](_node(node.left, env), _node(node.right, env))
    if isinstance(node, Cond):
        return np.where(_node(node.cond, env), _node(node.then, env), _node(node.orelse, env))
    args = [_node(a, env) for a in node.args]
    assert isinstance(node, Call)
    if node.func == "abs":
        return np.abs(args[0])
    if node.func == "min":
        return np.minimum.reduce(np.broadcast_arrays(*args))
    if node.func == "max":
        return np.maximum.reduce(np.broadcast_arrays(*args))
    if node.func == "clamp":
        return np.clip(args[0], args[1], args[2])
    if node.func == "round":
        ndigits = int(args[1]) if len(args) > 1 else 0
        if ndigits == 0:
            return np.round(args[0])  # exact, halves to even: Python's round(x, 0)
        # NumPy scales by 10**ndigits and rounds the product (2.675 -> 2.68); Python's round is
        # correctly rounded (2.675 is 2.67499…, so 2.67), and the objective must agree with it.
        return np.asarray(_PY_ROUND(args[0], ndigits), dtype=float)
    raise ExprError(f"unknown function {node.func!r}")


# Python's round over an array, element by element (a ufunc of Python objects).
_PY_ROUND = np.frompyfunc(round, 2, 1)


def _finite(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x)


TRAJECTORY_POINTS = 200  # a fan is thinned to at most this many times (a chart, a JSON answer)


def trajectory(result: SimResult, outputs: Sequence[str]) -> dict[str, Any]:
    """The fan (p5..p99 per output over time) thinned to TRAJECTORY_POINTS times, with the
    constraint limits it was judged against: what a fan chart draws, as plain JSON."""
    times = result.times
    fan = result.output_percentiles
    steps = len(times)
    stride = max(1, math.ceil(steps / TRAJECTORY_POINTS))
    # Every stride-th step, ending on the horizon itself.
    picks = np.arange(steps - 1, -1, -stride)[::-1]
    return {
        "times": [float(t) for t in times[picks]],
        "outputs": {
            output: {
                key: [float(v) for v in fan[index, row, picks]] for row, key in enumerate(FAN_KEYS)
            }
            for index, output in enumerate(outputs)
        },
        "limits": [
            {
                "output": outputs[c.constraint.output],
                "kind": c.constraint.kind,
                "limit": c.constraint.limit,
            }
            for c in result.constraints
        ],
    }
