"""A proposal's simulation (gateway.policy.predict): the what-if scenario built from a policy and
the twin's values, the per-path success share checked against the kernel's raw trajectories, and
the objective evaluated over every path at once against the scalar evaluator."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.config.load import load_config
from gateway.config.model import SiteConfig
from gateway.policy.expr import ExprError, parse
from gateway.policy.load import load_policies
from gateway.policy.model import Objective, Policy
from gateway.policy.predict import (
    build_scenario,
    fit_history,
    run_prediction,
    success_mask,
    vector_eval,
)
from gateway.sim.models import (
    FopdtModel,
    HoldInput,
    SimulationError,
    StepInput,
    TankModel,
    WeibullModel,
)
from gateway.sim.native import simulate
from gateway.sim.results import SimResult

ROOT = Path(__file__).parents[2]
SP = "line1/oven1/heater_setpoint"
TEMP = "line1/oven1/temperature"
WEAR = "line1/oven1/heater_wear"
LEVEL = "utilities/cooling/tank1/level"
VALVE = "utilities/cooling/tank1/inlet_valve"
PATHS = 256  # a few paths: these tests check the counting, not the statistics


@pytest.fixture(scope="module")
def site() -> SiteConfig:
    return load_config(ROOT / "gateway" / "demo" / "site.yaml")


@pytest.fixture(scope="module")
def shipped(site: SiteConfig) -> dict[str, Policy]:
    return {p.id: few_paths(p) for p in load_policies(ROOT / "policies", site)}


def few_paths(policy: Policy, **simulation: Any) -> Policy:
    sim = policy.simulation.model_copy(update={"paths": PATHS, **simulation})
    return policy.model_copy(update={"simulation": sim})


def oven_values(temperature: float = 185.1, setpoint: float = 180.0) -> dict[str, Any]:
    return {
        TEMP: temperature,
        SP: setpoint,
        "line1/oven1/running": True,
        "line1/oven1/mode": "AUTO",
    }


# -- build_scenario -------------------------------------------------------------------------------


def test_fopdt_starts_at_the_output_and_steps_the_input_now(shipped: dict[str, Policy]) -> None:
    oven = shipped["oven-overtemp-drift"]
    scenario = build_scenario(oven, oven_values(), current=180.0, proposed=174.9, seed=7)
    assert isinstance(scenario.model, FopdtModel)
    assert scenario.y0 == 185.1 and scenario.h0 is None
    assert scenario.input == StepInput(u0=180.0, u1=174.9, t_step=0.0)
    assert (scenario.seed, scenario.paths, scenario.horizon_s) == (7, PATHS, 600)
    limits = {(c.kind, c.limit, c.output) for c in scenario.constraints}
    assert limits == {("upper", 190.0, 0), ("lower", 170.0, 0)}


def test_each_scenario_gets_its_own_seed_unless_given(shipped: dict[str, Policy]) -> None:
    oven = shipped["oven-overtemp-drift"]
    seeds = {
        build_scenario(oven, oven_values(), current=180.0, proposed=175.0).seed for _ in range(8)
    }
    assert len(seeds) == 8


def test_the_tank_starts_at_its_level_never_below_empty(shipped: dict[str, Policy]) -> None:
    tank = shipped["tank-level-high"]
    values = {LEVEL: 4.4, VALVE: 60.0, "utilities/cooling/tank1/water_temperature": 20.0}
    scenario = build_scenario(tank, values, current=60.0, proposed=45.0, seed=1)
    assert isinstance(scenario.model, TankModel)
    assert (scenario.h0, scenario.y0) == (4.4, None)
    assert scenario.input == StepInput(u0=60.0, u1=45.0, t_step=0.0)
    # A level sensor reads a little below zero when the tank is empty: the model starts at 0.
    values[LEVEL] = -0.01
    assert build_scenario(tank, values, current=60.0, proposed=45.0).h0 == 0.0


def test_weibull_binds_its_age_from_the_wear_and_holds_the_input(
    shipped: dict[str, Policy],
) -> None:
    wear = shipped["oven-heater-wear"]
    scenario = build_scenario(wear, {WEAR: 0.85, SP: 180.0}, current=180.0, proposed=170.0)
    assert isinstance(scenario.model, WeibullModel)
    assert scenario.model.a0 == pytest.approx(0.85 * 2_000_000)
    assert scenario.model.beta == 3.0, "the other parameters are the policy's"
    assert scenario.input == HoldInput(u0=170.0)
    assert [(c.kind, c.limit) for c in scenario.constraints] == [("upper", 0.5)]


@pytest.mark.parametrize(
    ("wear", "message"),
    [(-0.1, "a0"), (None, "simulation.bind.a0"), ("worn", "simulation.bind.a0")],
    ids=["out-of-domain", "no-value", "a-string"],
)
def test_a_bind_that_fails_is_a_simulation_error_naming_it(
    shipped: dict[str, Policy], wear: Any, message: str
) -> None:
    wear_policy = shipped["oven-heater-wear"]
    with pytest.raises(SimulationError, match=message) as caught:
        build_scenario(wear_policy, {WEAR: wear, SP: 180.0}, current=180.0, proposed=170.0)
    assert "Traceback" not in str(caught.value)


@pytest.mark.parametrize("start", [None, math.nan, "185", True], ids=repr)
def test_an_output_without_a_numeric_value_cannot_start_a_prediction(
    shipped: dict[str, Policy], start: Any
) -> None:
    oven = shipped["oven-overtemp-drift"]
    values = oven_values()
    values[TEMP] = start
    with pytest.raises(SimulationError, match=f"{TEMP} has no current numeric value"):
        build_scenario(oven, values, current=180.0, proposed=175.0)


def test_a_fitted_policy_without_a_fitted_model_is_refused(shipped: dict[str, Policy]) -> None:
    oven = shipped["oven-overtemp-drift"]
    fitted = oven.simulation.model_copy(update={"model": None, "fitted": {"history_minutes": 5}})
    policy = oven.model_copy(update={"simulation": fitted})
    with pytest.raises(SimulationError, match="needs a fitted model"):
        build_scenario(policy, oven_values(), current=180.0, proposed=175.0)
    model = FopdtModel(gain=1.0, tau=100.0)
    scenario = build_scenario(policy, oven_values(), current=180.0, proposed=175.0, model=model)
    assert scenario.model == model


# -- success_mask against the raw trajectories ----------------------------------------------------


def uncertain_oven(shipped: dict[str, Policy], at: str = "final") -> Policy:
    """The oven policy with a gain anywhere in 0.2..3: some paths overshoot, some fall below."""
    oven = shipped["oven-overtemp-drift"]
    model = oven.simulation.model
    assert isinstance(model, FopdtModel)
    gain = {"dist": "uniform", "lo": 0.2, "hi": 3.0}
    policy = few_paths(oven, model=FopdtModel.model_validate({**model.model_dump(), "gain": gain}))
    objective = Objective.model_validate({"minimize": "abs(temperature - 180)", "at": at})
    return policy.model_copy(update={"objective": objective})


@pytest.mark.parametrize(("at", "statistic"), [("final", lambda y: y[:, -1]), ("max", np.max)])
def test_success_is_counted_path_by_path_from_the_kernels_paths(
    shipped: dict[str, Policy], at: str, statistic: Callable[..., np.ndarray]
) -> None:
    policy = uncertain_oven(shipped, at)
    values = oven_values(temperature=188.0)
    scenario = build_scenario(policy, values, current=180.0, proposed=172.0, seed=2024)
    result = simulate(scenario, keep_paths=True, path_stats=True)
    y = result.y
    assert y is not None and y.shape == (PATHS, scenario.n_steps)

    # By hand: no sample above 190 or below 170, and |stat - 180| below |188 - 180| = 8.
    safe = ((y <= 190.0) & (y >= 170.0)).all(axis=1)
    stat = statistic(y) if at == "final" else statistic(y, axis=1)
    better = np.abs(stat - 180.0) < 8.0
    mask, details = success_mask(policy, result, values)

    np.testing.assert_array_equal(mask, safe & better)
    assert 0 < mask.sum() < PATHS, "both kinds of path, or the test proves little"
    assert details["paths"] == PATHS
    assert details["paths_safe"] == safe.sum()
    assert details["paths_improved"] == better.sum()
    assert details["objective_now"] == 8.0
    prediction = run_prediction(policy, scenario, values, simulate)
    assert (prediction.summary.paths, prediction.summary.paths_ok) == (PATHS, int(mask.sum()))
    assert prediction.details["seed"] == 2024 and prediction.details["model"] == "fopdt"


def test_a_maximised_objective_counts_the_paths_that_raise_it(shipped: dict[str, Policy]) -> None:
    policy = uncertain_oven(shipped)
    policy = policy.model_copy(
        update={"objective": Objective.model_validate({"maximize": "temperature"})}
    )
    values = oven_values(temperature=180.0, setpoint=180.0)
    scenario = build_scenario(policy, values, current=180.0, proposed=184.0, seed=5)
    result = simulate(scenario, keep_paths=True, path_stats=True)
    assert result.y is not None
    safe = ((result.y <= 190.0) & (result.y >= 170.0)).all(axis=1)
    mask, _ = success_mask(policy, result, values)
    np.testing.assert_array_equal(mask, safe & (result.y[:, -1] > 180.0))
    assert 0 < mask.sum() < PATHS


def test_without_an_objective_safety_alone_decides(shipped: dict[str, Policy]) -> None:
    wear = shipped["oven-heater-wear"]
    values = {WEAR: 0.97, SP: 180.0}
    scenario = build_scenario(wear, values, current=180.0, proposed=170.0, seed=11)
    result = simulate(scenario, keep_paths=True, path_stats=True)
    assert result.y is not None
    failed = (result.y > 0.5).any(axis=1)
    mask, details = success_mask(wear, result, values)
    np.testing.assert_array_equal(mask, ~failed)
    assert 0 < failed.sum() < PATHS, "at 97 % wear some heaters fail within the day"
    assert "paths_improved" not in details


def test_paths_that_blow_up_count_as_not_better_and_keep_the_figures_json(
    shipped: dict[str, Policy],
) -> None:
    # An unstable model's paths end on inf or NaN; the audit log takes only JSON numbers.
    oven = shipped["oven-overtemp-drift"]
    finals = np.array([180.0, math.nan, math.inf, 181.0, -math.inf])
    result = SimResult(
        times=np.ones(1),
        output_percentiles=np.zeros((1, 6, 1)),
        constraints=[],
        kpis=[],
        paths_run=finals.size,
        seed=0,
        backend="test",
        path_kpis=np.tile(finals, (1, 4, 1)),
        path_first_violation=np.full((1, finals.size), -1, dtype=np.int32),
    )
    mask, details = success_mask(oven, result, oven_values())
    assert mask.tolist() == [True, False, False, True, False]
    assert details["objective_median"] == 0.5  # of |180 - 180| and |181 - 180|
    json.dumps(details, allow_nan=False)


def test_a_failing_simulation_is_a_prediction_with_its_error(shipped: dict[str, Policy]) -> None:
    oven = shipped["oven-overtemp-drift"]
    values = oven_values()
    scenario = build_scenario(oven, values, current=180.0, proposed=175.0, seed=3)

    def broken(*_: Any, **__: Any) -> SimResult:
        raise SimulationError("the C simulation kernel is not built")

    prediction = run_prediction(oven, scenario, values, broken)
    assert prediction.summary.paths == 0
    assert prediction.summary.error == "the C simulation kernel is not built"
    assert prediction.details["error"] == "the C simulation kernel is not built"


def test_an_objective_that_cannot_be_evaluated_now_fails_the_prediction(
    shipped: dict[str, Policy],
) -> None:
    oven = uncertain_oven(shipped)
    # The objective reads the ambient temperature, which the twin has not heard from yet.
    objective = Objective.model_validate({"minimize": "abs(temperature - 180) + ambient"})
    policy = oven.model_copy(
        update={"objective": objective, "points": {**oven.points, "ambient": "line1/oven1/ambient"}}
    )
    values = {**oven_values(), "line1/oven1/ambient": None}
    scenario = build_scenario(policy, values, current=180.0, proposed=175.0, seed=3)
    prediction = run_prediction(policy, scenario, values, simulate)
    assert prediction.summary.paths == 0
    assert prediction.summary.error is not None and "ambient" in prediction.summary.error


# -- fit_history ----------------------------------------------------------------------------------


def test_too_little_history_to_fit_says_how_much_is_needed() -> None:
    with pytest.raises(SimulationError, match="not enough history to fit: 1 input and 3 output"):
        fit_history([(0.0, 180.0)], [(0.0, 180.0), (1.0, 180.0), (2.0, 180.0)], 1.0)


def test_a_step_response_in_the_history_fits_its_gain() -> None:
    # u steps 180 -> 170 at t=10; y follows with gain 1 and tau 20 (no dead time, no noise).
    u = [(0.0, 180.0), (10.0, 170.0)]
    ts = np.arange(0.0, 200.0, 1.0)
    y = [(t, 180.0 - 10.0 * (1 - math.exp(-(t - 10.0) / 20.0)) * (t >= 10.0)) for t in ts]
    model = fit_history(u, y, 1.0)
    gain = model.gain
    mean = gain if isinstance(gain, float) else getattr(gain, "mean", None)
    assert mean == pytest.approx(1.0, rel=0.05)


# -- vector_eval == Expr.evaluate -----------------------------------------------------------------

NAMES = ("x", "y", "z")
N = 6  # paths per example


def _numbers() -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(0, 9).map(str),
        st.floats(0, 1000, allow_nan=False, allow_infinity=False).map(repr),
        # Halves and decimal ties, where round() implementations part ways.
        st.sampled_from(["0.5", "2.5", "2.675", "123456.785", "1e3", ".25", "180"]),
    )


def _join(op: str) -> Callable[[tuple[str, str]], str]:
    return lambda t: f"({t[0]} {op} {t[1]})"


def _call(name: str) -> Callable[[tuple[str, ...]], str]:
    return lambda t: f"{name}({', '.join(t)})"


# A tiny grammar of the expression language: numbers, the three path names, every operator and
# function, `if`, comparisons (number and string), `and`/`or`/`not`.
NUMERIC: st.SearchStrategy[str] = st.deferred(
    lambda: st.one_of(
        _numbers(),
        st.sampled_from(NAMES),
        st.sampled_from(NAMES),
        st.tuples(NUMERIC, st.sampled_from("+-*/%"), NUMERIC).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"
        ),
        NUMERIC.map(lambda a: f"-({a})"),
        st.tuples(NUMERIC).map(_call("abs")),
        st.tuples(NUMERIC, NUMERIC).map(_call("min")),
        st.tuples(NUMERIC, NUMERIC, NUMERIC).map(_call("max")),
        st.tuples(NUMERIC, NUMERIC, NUMERIC).map(_call("clamp")),
        st.tuples(NUMERIC).map(_call("round")),
        st.tuples(NUMERIC, st.integers(-3, 3).map(str)).map(_call("round")),
        st.tuples(NUMERIC, BOOLEAN, NUMERIC).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
    )
)
BOOLEAN: st.SearchStrategy[str] = st.deferred(
    lambda: st.one_of(
        st.sampled_from(['mode == "AUTO"', "mode != 'MANUAL'", "true", "false", "flag"]),
        st.tuples(NUMERIC, st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), NUMERIC).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"
        ),
        st.tuples(BOOLEAN, BOOLEAN).map(_join("and")),
        st.tuples(BOOLEAN, BOOLEAN).map(_join("or")),
        BOOLEAN.map(lambda a: f"(not {a})"),
    )
)
EXPRESSIONS = st.one_of(NUMERIC, NUMERIC, BOOLEAN)
PATH_VALUES = st.one_of(
    st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.5, 2.675, 123456.785, 180.0, 1e300]),
)


def _same(vector: Any, scalar: float | bool) -> bool:
    if isinstance(scalar, bool):
        return bool(vector) is scalar
    return float(vector) == scalar


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=EXPRESSIONS.filter(lambda t: len(t) <= 1000),
    columns=st.fixed_dictionaries(
        {n: st.lists(PATH_VALUES, min_size=N, max_size=N) for n in NAMES}
    ),
    flag=st.booleans(),
    mode=st.sampled_from(["AUTO", "MANUAL"]),
)
@example(
    text="round(x, 2) + round(y, -1)",
    columns={
        "x": [2.675, 0.125, 1.005, 5.015, -2.675, 0.0],
        "y": [125.0, 135.0] * 3,
        "z": [0.0] * N,
    },
    flag=True,
    mode="AUTO",
)
def test_the_objective_over_every_path_is_the_scalar_evaluation_on_each(
    text: str, columns: Mapping[str, list[float]], flag: bool, mode: str
) -> None:
    try:
        expr = parse(text)
    except ExprError:
        return  # a text the generator got wrong (a type error parse sees): nothing to compare
    # Strings and booleans stay scalars, as success_mask keeps every non-simulated point.
    arrays: dict[str, Any] = {n: np.array(v, dtype=float) for n, v in columns.items()}
    arrays.update(flag=flag, mode=mode)
    with np.errstate(all="ignore"):
        vector = np.broadcast_to(np.asarray(vector_eval(expr, arrays)), (N,))
    compared = 0
    for i in range(N):
        env: dict[str, float | bool | str] = {n: float(v[i]) for n, v in columns.items()}
        env.update(flag=flag, mode=mode)
        try:
            scalar = expr.evaluate(env)
        except ExprError:
            continue  # division by zero, overflow, clamp lo > hi: the path counts as not better
        compared += 1
        assert _same(vector[i], scalar), f"{text} on path {i} ({env}): {vector[i]!r} != {scalar!r}"


@pytest.mark.parametrize(
    ("x", "ndigits"), [(2.675, 2), (123456.785, 2), (0.125, 2), (2.5, 0), (1234.5, -1), (1e300, 3)]
)
def test_vector_round_is_the_evaluators_round(x: float, ndigits: int) -> None:
    # Python's round() is correctly rounded (2.675 is 2.67499999…, so 2.67); NumPy's scales by
    # 10**ndigits first and rounds the product (2.68). The objective must count a path as the
    # scalar evaluator would.
    expr = parse(f"round(x, {ndigits})")
    scalar = expr.evaluate({"x": x})
    assert vector_eval(expr, {"x": np.array([x, x])}).tolist() == [scalar, scalar]


def test_vector_eval_turns_a_division_by_zero_into_a_non_finite_path() -> None:
    expr = parse("abs(x - 180) / y")
    with np.errstate(all="ignore"):
        out = vector_eval(expr, {"x": np.array([170.0, 190.0]), "y": np.array([0.0, 2.0])})
    assert not np.isfinite(out[0]) and out[1] == 5.0


def test_vector_eval_refuses_a_name_without_a_value() -> None:
    with pytest.raises(ExprError, match="no value for 'ambient'"):
        vector_eval(parse("temperature - ambient"), {"temperature": np.zeros(3), "ambient": None})
