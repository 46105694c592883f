"""When a policy fires (gateway.policy.triggers): a condition held for `for_s`, once per episode;
an anomaly of the policy's kind, score and point. Pure: a time is passed in, never read."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests_support import EPOCH

from gateway.policy.load import load_policies
from gateway.policy.model import AnomalyTrigger, ConditionTrigger, Policy
from gateway.policy.triggers import HoldTracker, anomaly_fires

SHIPPED = Path(__file__).parents[2] / "policies"
T0 = EPOCH


def tracker(when: str = "temperature > 183", for_s: float = 60.0) -> HoldTracker:
    """A fresh tracker of one condition trigger."""
    return HoldTracker(ConditionTrigger.model_validate({"when": when, "for_s": for_s}))


def hot(t: float = 185.0) -> dict[str, float]:
    return {"temperature": t}


# -- HoldTracker ----------------------------------------------------------------------------------


def test_a_condition_fires_only_once_it_has_held_for_for_s() -> None:
    track = tracker(for_s=60)
    assert track.update(hot(), T0) is None
    assert track.update(hot(), T0 + 59.999) is None
    assert track.update(hot(), T0 + 60) == T0, "fires at for_s, naming the episode's start"


def test_an_episode_fires_once_however_long_it_holds() -> None:
    track = tracker(for_s=60)
    track.update(hot(), T0)
    assert track.update(hot(), T0 + 60) == T0
    for dt in (61, 120, 3600, 86400):
        assert track.update(hot(186), T0 + dt) is None
    assert track.fired


def test_a_break_starts_a_new_episode_that_must_hold_again() -> None:
    track = tracker(for_s=60)
    track.update(hot(), T0)
    assert track.update(hot(), T0 + 60) == T0
    assert track.update(hot(182), T0 + 70) is None  # the condition breaks
    assert (track.since, track.fired) == (None, False)
    assert track.update(hot(), T0 + 80) is None  # a new episode begins at +80
    assert track.update(hot(), T0 + 139) is None
    assert track.update(hot(), T0 + 140) == T0 + 80


def test_a_break_before_for_s_restarts_the_count() -> None:
    track = tracker(for_s=60)
    track.update(hot(), T0)
    track.update(hot(183), T0 + 50)  # 183 is not above 183
    assert track.update(hot(), T0 + 61) is None
    assert track.update(hot(), T0 + 110) is None
    assert track.update(hot(), T0 + 121) == T0 + 61


def test_for_s_zero_fires_on_the_first_holding_evaluation() -> None:
    track = tracker(for_s=0)
    assert track.update(hot(), T0) == T0
    assert track.update(hot(), T0) is None


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ({"temperature": None}, "no value"),
        ({}, "temperature"),
        ({"temperature": "hot"}, "string"),
        ({"temperature": float("nan")}, "not a finite number"),
    ],
    ids=["no-value-yet", "missing", "a-string", "nan"],
)
def test_an_unevaluable_condition_does_not_hold_and_says_why(
    env: dict[str, object], why: str
) -> None:
    track = tracker(for_s=0)
    assert track.update(env, T0) is None  # type: ignore[arg-type]
    assert track.last_error is not None and why in track.last_error
    assert track.since is None


def test_an_unevaluable_reading_breaks_a_holding_episode() -> None:
    track = tracker(for_s=60)
    track.update(hot(), T0)
    track.update({"temperature": None}, T0 + 30)
    assert track.update(hot(), T0 + 60) is None, "the episode restarted at +60"
    assert track.last_error is None, "a good evaluation clears the last error"
    assert track.update(hot(), T0 + 120) == T0 + 60


def test_a_condition_that_gives_no_boolean_never_holds() -> None:
    # `x` alone parses (its type depends on the point); a number is not "true".
    track = tracker(when="flag", for_s=0)
    assert track.update({"flag": 1.0}, T0) is None
    assert track.update({"flag": True}, T0) == T0


def test_due_at_is_when_a_holding_unfired_episode_fires() -> None:
    track = tracker(for_s=60)
    assert track.due_at() is None
    track.update(hot(), T0 + 5)
    assert track.due_at() == T0 + 65
    track.update(hot(), T0 + 65)
    assert track.due_at() is None, "fired: nothing more is due"
    track.update(hot(180), T0 + 70)
    assert track.due_at() is None


# -- anomaly_fires --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oven_policy() -> Policy:
    policy = load_policies(SHIPPED).get("oven-overtemp-drift")
    assert policy is not None
    return policy


def anomaly_policy(base: Policy, **trigger: object) -> Policy:
    return base.model_copy(update={"trigger": AnomalyTrigger.model_validate(trigger)})


def test_an_anomaly_of_the_kind_on_the_named_point_fires(oven_policy: Policy) -> None:
    policy = anomaly_policy(oven_policy, anomaly="zscore", point="temperature", min_score=0.6)
    temperature = "line1/oven1/temperature"
    assert anomaly_fires(policy, temperature, "zscore", 0.6)
    assert anomaly_fires(policy, temperature, "zscore", 1.0)
    assert not anomaly_fires(policy, temperature, "zscore", 0.5999), "below min_score"
    assert not anomaly_fires(policy, temperature, "ewma", 0.9), "another kind"
    assert not anomaly_fires(policy, "line1/oven1/ambient", "zscore", 0.9), "another point"


def test_a_point_id_in_the_trigger_works_as_an_alias_does(oven_policy: Policy) -> None:
    policy = anomaly_policy(oven_policy, anomaly="flatline", point="line1/oven1/ambient")
    assert anomaly_fires(policy, "line1/oven1/ambient", "flatline", 0.5)
    assert not anomaly_fires(policy, "line1/oven1/temperature", "flatline", 0.5)


def test_without_a_point_any_point_in_the_scope_fires(oven_policy: Policy) -> None:
    policy = anomaly_policy(oven_policy, anomaly="stale")  # scope line1/oven1/*
    assert anomaly_fires(policy, "line1/oven1/ambient", "stale", 0.5)
    assert anomaly_fires(policy, "line1/oven1/temperature", "stale", 0.5)
    assert not anomaly_fires(policy, "utilities/cooling/tank1/level", "stale", 1.0)
    assert not anomaly_fires(policy, "line1/oven10/ambient", "stale", 1.0)


def test_a_condition_policy_never_fires_on_an_anomaly(oven_policy: Policy) -> None:
    assert isinstance(oven_policy.trigger, ConditionTrigger)
    assert not anomaly_fires(oven_policy, "line1/oven1/temperature", "zscore", 1.0)
