"""Scenario validation: bad parameters fail before any computation, naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gateway.sim import FopdtModel, Normal, Scenario, StateSpaceModel, TankModel, WeibullModel
from gateway.sim.models import MAX_STEPS


def _scenario(**kw: Any) -> Scenario:
    base: dict[str, Any] = {
        "model": {"kind": "fopdt", "gain": 1.0, "tau": 10.0},
        "y0": 0.0,
        "horizon_s": 100.0,
        "dt_s": 1.0,
        "paths": 100,
    }
    base.update(kw)
    return Scenario.model_validate(base)


def test_scenario_from_plain_dict_with_distributions() -> None:
    sc = _scenario(
        model={
            "kind": "fopdt",
            "gain": {"dist": "normal", "mean": 2, "sd": 0.1},
            "tau": {"dist": "lognormal", "mu": 2, "sigma": 0.1},
            "theta": {"dist": "triangular", "lo": 0, "mode": 1, "hi": 3},
            "sigma_v": {"dist": "uniform", "lo": 0, "hi": 0.1},
        },
        input={"kind": "step", "u0": 0, "u1": 1, "t_step": 5},
        constraints=[{"kind": "upper", "limit": 3}],
        kpis=["max", {"kind": "final"}],
    )
    assert isinstance(sc.model, FopdtModel) and isinstance(sc.model.gain, Normal)
    assert sc.n_steps == 100 and [k.kind for k in sc.kpis] == ["max", "final"]


def test_n_steps_is_ceil_of_horizon_over_dt() -> None:
    assert _scenario(horizon_s=10.5, dt_s=1.0).n_steps == 11
    assert _scenario(horizon_s=0.3, dt_s=0.1).n_steps == 3  # not 4 from float error


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"model": {"kind": "fopdt", "gain": float("nan"), "tau": 1}}, "gain"),
        ({"model": {"kind": "fopdt", "gain": 1, "tau": float("inf")}}, "tau"),
        ({"model": {"kind": "fopdt", "gain": 1, "tau": -5}}, "tau must be > 0"),
        ({"model": {"kind": "fopdt", "gain": 1, "tau": 0}}, "tau must be > 0"),
        ({"model": {"kind": "fopdt", "gain": 1, "tau": 1, "theta": -1}}, "theta must be >= 0"),
        (
            {"model": {"kind": "fopdt", "gain": 1, "tau": {"dist": "uniform", "lo": -3, "hi": -1}}},
            "tau",
        ),
        (
            {"model": {"kind": "fopdt", "gain": {"dist": "normal", "mean": 1, "sd": -1}, "tau": 1}},
            "sd",
        ),
        (
            {"model": {"kind": "fopdt", "gain": {"dist": "uniform", "lo": 2, "hi": 1}, "tau": 1}},
            "lo < hi",
        ),
        ({"model": {"kind": "fopdt", "gain": {"dist": "beta", "a": 1}, "tau": 1}}, "dist"),
        ({"model": {"kind": "fopdt", "gain": 1, "tau": 1, "bogus": 1}}, "bogus"),
        ({"y0": float("nan")}, "y0"),
        ({"y0": None}, "y0"),
        ({"paths": 0}, "paths"),
        ({"dt_s": 0}, "dt_s"),
        ({"dt_s": -1}, "dt_s"),
        ({"horizon_s": float("inf")}, "horizon_s"),
        ({"horizon_s": 1e9, "dt_s": 1.0, "paths": 1}, f"above the limit {MAX_STEPS}"),
        ({"horizon_s": 1e5, "dt_s": 0.1, "paths": 10_000}, "GiB bound"),
        ({"constraints": [{"kind": "upper", "limit": 1, "output": 1}]}, "output=1"),
        ({"constraints": [{"kind": "above", "limit": 1}]}, "kind"),
        ({"kpis": ["median"]}, "kpis"),
        ({"adaptive": {"rse_target": 0.01}}, "adaptive needs a constraint or a KPI"),
        ({"adaptive": {"max_paths": 10_000_000}, "kpis": ["max"], "horizon_s": 1e4}, "GiB bound"),
        ({"input": {"kind": "ramp", "u0": 0, "u1": 1, "t0": 5, "t1": 5}}, "t0 < t1"),
    ],
)
def test_bad_scenario_names_what_and_where(change: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError, match=where):
        _scenario(**change)


def test_tank_needs_h0_and_positive_area() -> None:
    tank = {"kind": "tank", "area": 1, "c_in": 0.1, "c_out": 0.05, "h_max": 2}
    with pytest.raises(ValidationError, match="h0"):
        _scenario(model=tank)
    with pytest.raises(ValidationError, match="area must be > 0"):
        TankModel(area=0, c_in=0.1, c_out=0.05, h_max=2)
    assert _scenario(model=tank, h0=1.0).h0 == 1.0


def test_weibull_domains() -> None:
    with pytest.raises(ValidationError, match="beta must be > 0"):
        WeibullModel(beta=0, eta=10)
    with pytest.raises(ValidationError, match="a0 must be >= 0"):
        WeibullModel(beta=1, eta=10, a0=-1)


_SS = {"A": [[0.9, 0.0], [0.0, 0.8]], "B": [[1.0], [0.5]], "C": [[1.0, 1.0]], "x0": [0.0, 0.0]}


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"A": [[0.9, 0.0], [0.0]]}, "A must be 2x2; row 1"),
        ({"A": [[0.5] * 9 for _ in range(9)]}, "A must have 1..8 rows"),
        ({"B": [[1.0]]}, "B must have n=2 rows"),
        ({"B": [[1.0] * 5, [1.0] * 5]}, "B must have 1..4 columns"),
        ({"C": [[1.0, 1.0, 1.0]]}, "C must be 1x2"),
        ({"C": [[1.0, 0.0]] * 5}, "C must have 1..4 rows"),
        ({"x0": [0.0]}, "x0 must have length n=2"),
        ({"q": [0.1]}, "q must have length 2"),
        ({"r": [-0.1]}, "r holds variances"),
        ({"A": [[float("nan"), 0.0], [0.0, 0.8]]}, "A"),
    ],
)
def test_state_space_shapes_checked(change: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError, match=where):
        StateSpaceModel.model_validate({**_SS, **change})


def test_state_space_input_count_and_output_index() -> None:
    two_in = {**_SS, "kind": "state_space", "B": [[1.0, 0.0], [0.0, 1.0]]}
    hold = {"kind": "hold", "u0": 1}
    assert len(_scenario(model=two_in, input=hold).input_plans) == 2  # one plan for all
    assert len(_scenario(model=two_in, input=[hold, hold]).input_plans) == 2
    with pytest.raises(ValidationError, match="takes 2 input"):
        _scenario(model=two_in, input=[hold, hold, hold])
    with pytest.raises(ValidationError, match=r"kpis\[0\]\.output=1"):
        _scenario(model={**_SS, "kind": "state_space"}, kpis=[{"kind": "max", "output": 1}])


def test_scenario_json_round_trip() -> None:
    sc = _scenario(
        model={"kind": "weibull", "beta": {"dist": "uniform", "lo": 1, "hi": 2}, "eta": 1e5},
        constraints=[{"kind": "upper", "limit": 0.5}],
        adaptive={"rse_target": 0.05},
    )
    assert Scenario.model_validate_json(sc.model_dump_json()) == sc
    assert "rse_target" in str(Scenario.model_json_schema())
