"""The policy gate: each decision path, the confidence formula, hostile inputs, and the property
the issue asks for — driven as an executor drives it, nothing executed is ever outside a point's
hard limits, beyond max step, faster than the rate limit, or twice for one idempotency key."""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from tests_support import EPOCH

from drivers.contract import Quality
from gateway.auth.rbac import AccessDecision
from gateway.config.model import Range
from gateway.policy import gate
from gateway.policy.gate import (
    PROPOSALS_KEPT,
    WRITES_KEPT,
    Decision,
    GateConfig,
    GateState,
    HardLimits,
    InputSeen,
    Proposal,
    Proposer,
    SimSummary,
    confidence,
    decide,
    execution_blockers,
    note_proposal,
    record_outcome,
    record_write,
)
from gateway.policy.load import load_policies
from gateway.policy.model import RateLimit, Thresholds

POINT = "line1/oven1/heater_setpoint"
POLICY = "oven-overtemp-drift"
AGENT = Proposer(POLICY, "policy")
THRESHOLDS = Thresholds()  # 0.90 / 0.70
SIM_OK = SimSummary(paths=1000, paths_ok=1000)
T0 = EPOCH
LIMITS = HardLimits(
    POINT,
    writable=True,
    point_lo=0.0,
    point_hi=300.0,
    policy=POLICY,
    bounds_lo=160.0,
    bounds_hi=200.0,
    max_step=10.0,
    rate=RateLimit(max_writes=2, per_s=600.0),
)


def access(operation: str = "propose", allowed: bool = True, asset: str = POINT) -> AccessDecision:
    """An RBAC answer as gateway.auth.rbac.check gives it."""
    reason = f"{'allowed' if allowed else 'denied'}: test grant for {operation}"
    return AccessDecision(allowed, reason, AGENT.name, "token", operation, asset)


def proposal(**changes: Any) -> Proposal:
    """A GOOD, fresh proposal to lower the setpoint from 180 to 175."""
    fields: dict[str, Any] = {
        "id": "p1",
        "point": POINT,
        "value": 175.0,
        "proposer": AGENT,
        "policy": POLICY,
        "reason": "oven above 183 °C for 60 s",
        "idempotency_key": f"{POLICY}:1",
        "created_ts": T0,
        "current_value": 180.0,
        "current_quality": Quality.GOOD,
        "current_age_s": 1.0,
    }
    fields.update(changes)
    return Proposal(**fields)


def run(
    p: Proposal | None = None,
    *,
    limits: HardLimits = LIMITS,
    state: GateState | None = None,
    rbac: AccessDecision | None = None,
    sim: SimSummary | None = SIM_OK,
    now: float = T0,
    execute: AccessDecision | None = None,
    can_execute: bool = True,
) -> Decision:
    """Decide with everything in order unless the test says otherwise."""
    p = p or proposal()
    if execute is None and can_execute:
        execute = access("execute")
    return decide(
        p,
        limits,
        state or GateState(),
        rbac or access(),
        sim,
        THRESHOLDS,
        now,
        execute_decision=execute,
    )


# -- the decision paths ------------------------------------------------------------------------


def test_a_safe_confident_permitted_change_executes() -> None:
    decision = run()
    assert decision.kind == "auto_execute"
    assert decision.reasons == ("confidence 1.000 >= auto_execute_min 0.9",)
    assert decision.confidence is not None and decision.confidence.value == 1.0
    assert decision.checked == (
        "configured range [0, 300]",
        "policy oven-overtemp-drift bounds [160, 200]",
        "max step 10 (step 5 from 180)",
        "rate limit 2 per 600 s (0 in window)",
    )


def test_no_permission_rejects_before_anything_else() -> None:
    # Even a value far outside every limit: the permission answer comes first.
    decision = run(proposal(value=1e9), rbac=access(allowed=False))
    assert decision.kind == "reject"
    assert decision.reasons == ("no permission: denied: test grant for propose",)
    assert decision.confidence is None


def test_a_point_that_is_not_writable_is_forbidden() -> None:
    limits = dataclasses.replace(LIMITS, writable=False)
    decision = run(limits=limits)
    assert decision.kind == "reject"
    assert "not writable" in decision.reasons[0] and "writable: true" in decision.reasons[0]


@pytest.mark.parametrize(
    ("value", "names"),
    [
        (310.0, ["above the maximum 300 (configured range [0, 300])", "bounds [160, 200]"]),
        (-5.0, ["below the minimum 0 (configured range [0, 300])", "bounds [160, 200]"]),
        (159.0, ["outside policy oven-overtemp-drift's bounds [160, 200]"]),
        (200.5, ["outside policy oven-overtemp-drift's bounds [160, 200]"]),
    ],
)
def test_a_value_outside_a_hard_limit_is_rejected_naming_it(value: float, names: list[str]) -> None:
    p = proposal(value=value, current_value=value)  # no step: only the range speaks
    decision = run(p)
    assert decision.kind == "reject"
    text = " | ".join(decision.reasons)
    for name in names:
        assert name in text
    assert decision.reasons[-1] == "rejected, never clamped"


def test_the_points_range_wins_over_wider_policy_bounds() -> None:
    # gateway.policy.load refuses such a policy; the gate must not depend on that.
    limits = dataclasses.replace(LIMITS, bounds_lo=-100.0, bounds_hi=400.0, max_step=None)
    assert run(proposal(value=350.0), limits=limits).kind == "reject"
    assert run(proposal(value=300.0), limits=limits).kind == "auto_execute"


def test_the_limits_themselves_are_allowed() -> None:
    for value in (160.0, 170.0):
        assert run(proposal(value=value, current_value=value)).kind == "auto_execute"
    assert run(proposal(value=200.0, current_value=190.0)).kind == "auto_execute"


def test_a_step_beyond_max_step_is_rejected() -> None:
    decision = run(proposal(value=169.0))
    assert decision.kind == "reject"
    assert "step 11 from 180 to 169 exceeds max step 10" in decision.reasons


def test_an_unknown_current_value_cannot_pass_max_step() -> None:
    decision = run(proposal(current_value=None, current_quality=Quality.BAD))
    assert decision.kind == "reject"
    assert "current value is unknown" in decision.reasons[0]


def test_the_step_is_measured_from_a_write_newer_than_what_the_proposer_saw() -> None:
    state = GateState()
    record_write(state, POINT, 170.0, T0 - 0.5, "other")  # after the reading (T0 - 1)
    # 180 -> 175 looks like 5, but the point holds 170 now: 5 as well, allowed;
    assert run(proposal(value=175.0), state=state).kind == "auto_execute"
    # 180 -> 185 looks like 5 but is 15 from 170.
    decision = run(proposal(value=185.0), state=state)
    assert decision.kind == "reject"
    assert "step 15 from 170 to 185 exceeds max step 10" in decision.reasons
    # A write older than the reading is already in it: the reading is the reference.
    older = GateState()
    record_write(older, POINT, 150.0, T0 - 30, "old")
    assert run(proposal(value=185.0), state=older).kind == "auto_execute"


def test_the_rate_limit_counts_writes_in_the_window() -> None:
    state = GateState()
    record_write(state, POINT, 178.0, T0 - 500, "a")
    record_write(state, POINT, 180.0, T0 - 100, "b")
    decision = run(state=state)
    assert decision.kind == "reject"
    assert decision.reasons[0] == (
        f"rate limit: 2 writes to {POINT} in the last 600 s, at most 2; the next may be "
        f"written after t={T0 + 100:.3f}"
    )
    # Exactly one window after the older write it has left the window.
    later = proposal(created_ts=T0 + 100)
    assert run(later, state=state, now=T0 + 100).kind == "auto_execute"
    assert run(later, state=state, now=T0 + 99.9).kind == "reject"


def test_every_broken_limit_is_named_at_once() -> None:
    state = GateState()
    for i in range(2):
        record_write(state, POINT, 180.0, T0 - i, f"k{i}")
    decision = run(proposal(value=400.0), state=state)
    assert decision.kind == "reject"
    assert len(decision.reasons) == 5  # range, bounds, step, rate, and "never clamped"


def test_an_executed_key_is_a_duplicate() -> None:
    state = GateState()
    record_write(state, POINT, 175.0, T0 - 700, f"{POLICY}:1")
    decision = run(proposal(current_value=175.0, value=176.0), state=state)
    assert decision.kind == "reject"
    assert decision.reasons == (
        f"duplicate: idempotency key '{POLICY}:1' was executed at t={T0 - 700:.3f}",
    )
    assert run(proposal(idempotency_key="other", value=176.0), state=state).kind == "auto_execute"


def test_keys_are_forgotten_after_the_horizon_and_not_before() -> None:
    state = GateState(GateConfig(idempotency_horizon_s=1000))
    record_write(state, POINT, 175.0, T0, "old")
    record_write(state, POINT, 176.0, T0 + 1000, "new")  # exactly the horizon: still kept
    assert state.executed_at("old") == T0
    record_write(state, POINT, 177.0, T0 + 1000.5, "newer")
    assert state.executed_at("old") is None
    assert state.executed_at("new") == T0 + 1000


def test_the_default_horizon_outlives_the_longest_approval() -> None:
    assert GateConfig().idempotency_horizon_s > 7 * 24 * 3600


@pytest.mark.parametrize(
    ("sim", "reason"),
    [
        (None, "no simulation of this change"),
        (SimSummary(1000, 0, error="model diverged"), "simulation failed: model diverged"),
        (SimSummary(0, 0), "simulation ran no paths"),
    ],
)
def test_without_a_usable_simulation_a_person_analyses(sim: SimSummary | None, reason: str) -> None:
    decision = run(sim=sim)
    assert decision.kind == "require_analysis"
    assert decision.reasons == (reason,)


@pytest.mark.parametrize(
    ("paths_ok", "kind"),
    [
        (1000, "auto_execute"),
        (900, "auto_execute"),  # exactly the threshold
        (899, "require_approval"),
        (700, "require_approval"),
        (699, "require_analysis"),
        (0, "require_analysis"),
    ],
)
def test_the_thresholds_decide_by_confidence(paths_ok: int, kind: str) -> None:
    decision = run(sim=SimSummary(1000, paths_ok))
    assert decision.kind == kind
    assert decision.confidence is not None
    assert decision.confidence.value == pytest.approx(paths_ok / 1000)


@pytest.mark.parametrize("quality", [Quality.BAD, Quality.STALE])
def test_a_bad_or_stale_input_forbids_auto_execution(quality: Quality) -> None:
    reading = InputSeen("line1/oven1/temperature", quality, 2.0)
    forbidden = f"auto-execution forbidden: line1/oven1/temperature is {quality.value}"
    # With the default weights a BAD input alone brings confidence down to approve_min ...
    decision = run(proposal(inputs=(reading,)))
    assert decision.kind == "require_approval"
    assert decision.reasons == ("confidence 0.700 >= approve_min 0.7", forbidden)
    # ... and when quality weighs nothing in the confidence, the rule alone holds it back.
    blind = GateState(GateConfig(weight_quality=0.0))
    decision = run(proposal(inputs=(reading,)), state=blind)
    assert decision.kind == "require_approval"
    assert decision.reasons == ("confidence 1.000 >= auto_execute_min 0.9", forbidden)
    # The point's own quality counts the same.
    own = run(proposal(current_quality=quality), state=blind)
    assert own.kind == "require_approval"
    assert own.reasons[-1] == f"auto-execution forbidden: {POINT} is {quality.value}"


SUSPECT = "rate_of_change anomaly (score 0.93) at t=1.000, no sample since"


@pytest.mark.parametrize("where", ["input", "point"])
def test_a_suspect_input_forbids_auto_execution_and_says_why(where: str) -> None:
    # A GOOD value from a transmitter the anomaly detectors distrust counts as a STALE one.
    temperature = "line1/oven1/temperature"
    if where == "input":
        suspect = proposal(inputs=(InputSeen(temperature, Quality.GOOD, 2.0, SUSPECT),))
        forbidden = f"auto-execution forbidden: {temperature} is suspect: {SUSPECT}"
    else:
        suspect = proposal(current_suspect=SUSPECT)
        forbidden = f"auto-execution forbidden: {POINT} is suspect: {SUSPECT}"
    decision = run(suspect)
    assert decision.kind == "require_approval"
    assert decision.reasons == ("confidence 0.700 >= approve_min 0.7", forbidden)
    assert decision.confidence is not None and decision.confidence.breakdown["quality"] == 0.0
    # When quality weighs nothing in the confidence, the rule alone holds it back.
    blind = run(suspect, state=GateState(GateConfig(weight_quality=0.0)))
    assert blind.kind == "require_approval"
    assert blind.reasons == ("confidence 1.000 >= auto_execute_min 0.9", forbidden)
    assert run().kind == "auto_execute", "the same proposal, trusted, executes"


def test_a_suspect_uncertain_input_weighs_as_nothing_not_half() -> None:
    reading = InputSeen("line1/oven1/temperature", Quality.UNCERTAIN, 2.0, SUSPECT)
    decision = run(proposal(inputs=(reading,)))
    assert decision.confidence is not None and decision.confidence.breakdown["quality"] == 0.0
    assert decision.reasons[-1].endswith(f"is suspect: {SUSPECT}")


def test_an_input_older_than_the_age_limit_counts_as_stale() -> None:
    state = GateState(GateConfig(max_input_age_s=30))
    reading = InputSeen("line1/oven1/temperature", Quality.GOOD, 20.0)
    # 20 s old when proposed, 11 s more by the time of deciding.
    decision = run(proposal(inputs=(reading,)), state=state, now=T0 + 11)
    assert decision.kind == "require_approval"
    assert any("line1/oven1/temperature is 31 s old (over 30 s)" in r for r in decision.reasons)
    assert run(proposal(inputs=(reading,)), state=state, now=T0 + 9).kind == "auto_execute"


def test_auto_execution_needs_the_execute_right() -> None:
    denied = run(execute=access("execute", allowed=False))
    assert denied.kind == "require_approval"
    assert denied.reasons[-1] == (
        f"policy `{POLICY}` may not execute (denied: test grant for execute): a person approves"
    )
    unchecked = run(can_execute=False)
    assert unchecked.kind == "require_approval"
    assert "not checked" in unchecked.reasons[-1]


def test_a_proposal_waiting_for_approval_is_checked_again_before_it_is_written() -> None:
    state = GateState()
    first = proposal(id="p1", idempotency_key="k1")
    assert run(first, state=state, can_execute=False).kind == "require_approval"
    assert execution_blockers(first, LIMITS, state, T0 + 60) == ()
    # Meanwhile another change went through (180 -> 168): the waiting 175 is still within a
    # step of 168, but a proposal to 179, fine from the 180 its proposer saw, no longer is.
    record_write(state, POINT, 168.0, T0 + 30, "k2")
    assert execution_blockers(first, LIMITS, state, T0 + 60) == ()
    far = proposal(id="p3", value=179.0, idempotency_key="k3")
    assert run(far, state=GateState()).kind == "auto_execute"
    assert "step 11 from 168 to 179 exceeds max step 10" in execution_blockers(
        far, LIMITS, state, T0 + 60
    )
    record_write(state, POINT, 175.0, T0 + 60, "k1")
    assert execution_blockers(first, LIMITS, state, T0 + 90) == (
        f"rate limit: 2 writes to {POINT} in the last 600 s, at most 2; the next may be "
        f"written after t={T0 + 630:.3f}",
        f"duplicate: idempotency key 'k1' was executed at t={T0 + 60:.3f}",
    )


def test_a_persons_proposal_has_only_the_points_range() -> None:
    limits = HardLimits(POINT, writable=True, point_lo=0.0, point_hi=300.0)
    person = proposal(proposer=Proposer("alice", "user"), policy=None, value=250.0)
    assert run(person, limits=limits).kind == "auto_execute"
    assert run(dataclasses.replace(person, value=301.0), limits=limits).kind == "reject"


# -- limits from the config and the policy ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Point:
    id: str
    writable: bool
    range: Range | None


def test_limits_come_from_the_point_and_the_shipped_policy() -> None:
    oven = load_policies(Path(__file__).parents[2] / "policies").get(POLICY)
    assert oven is not None
    point = _Point(POINT, True, Range(lo=0, hi=300))
    limits = HardLimits.of(point, oven)
    assert limits == HardLimits(
        POINT, True, 0.0, 300.0, POLICY, 160.0, 200.0, 10.0, RateLimit(max_writes=1, per_s=600)
    )
    assert HardLimits.of(point) == HardLimits(POINT, True, 0.0, 300.0)
    with pytest.raises(ValueError, match="acts on line1/oven1/heater_setpoint, not on x/y"):
        HardLimits.of(_Point("x/y", True, None), oven)


# -- confidence ---------------------------------------------------------------------------------


def test_the_confidence_breakdown_holds_every_input_factor_and_weight() -> None:
    c = confidence(0.96, 0.5, 0.25, 0.5, GateConfig())
    assert c.breakdown == pytest.approx(
        {
            "p_sim": 0.96,
            "quality": 0.5,
            "record": 0.25,
            "agreement": 0.5,
            "quality_factor": 0.85,  # 1 - 0.3 * (1 - 0.5)
            "record_factor": 0.85,  # 1 - 0.3 * max(0, 1 - 2 * 0.25)
            "agreement_factor": 0.9,  # 1 - 0.2 * (1 - 0.5)
            "weight_quality": 0.3,
            "weight_record": 0.3,
            "weight_agreement": 0.2,
        }
    )
    assert c.value == pytest.approx(0.96 * 0.85 * 0.85 * 0.9)


def test_a_decision_keeps_the_breakdown_with_its_counts() -> None:
    state = GateState()
    record_outcome(state, POLICY, True)
    record_outcome(state, POLICY, False)
    record_outcome(state, POLICY, False)
    decision = run(state=state, sim=SimSummary(1000, 950))
    assert decision.confidence is not None
    b = decision.confidence.breakdown
    assert b["record"] == pytest.approx(2 / 5)  # (1 + 1) / (3 + 2)
    assert (b["paths"], b["paths_ok"], b["agreeing"], b["opposing"]) == (1000, 950, 0, 0)
    assert decision.confidence.value == pytest.approx(0.95 * (1 - 0.3 * 0.2))


def test_uncertain_inputs_lower_confidence() -> None:
    reading = InputSeen("line1/oven1/temperature", Quality.UNCERTAIN, 1.0)
    decision = run(proposal(inputs=(reading,)))
    assert decision.confidence is not None
    assert decision.confidence.value == pytest.approx(0.85)
    assert decision.kind == "require_approval"


def test_a_new_policy_and_a_good_record_cost_nothing_a_bad_record_costs() -> None:
    config = GateConfig()
    assert confidence(1.0, 1.0, 0.5, 1.0, config).value == 1.0
    assert confidence(1.0, 1.0, 0.9, 1.0, config).value == 1.0
    assert confidence(1.0, 1.0, 0.0, 1.0, config).value == pytest.approx(0.7)
    state = GateState()
    for _ in range(8):
        record_outcome(state, POLICY, False)
    decision = run(state=state)
    assert decision.kind == "require_approval"  # 1 - 0.3 * (1 - 2/10) = 0.76


def test_other_proposers_agree_or_oppose() -> None:
    state = GateState()
    ours = proposal(created_ts=T0)  # 180 -> 175: down
    for name, value in (("alice", 170.0), ("bot", 185.0), ("carol", 185.0)):
        note_proposal(
            state,
            proposal(proposer=Proposer(name, "user"), value=value, created_ts=T0 - 10),
        )
    note_proposal(state, ours)  # its own earlier proposal never counts as agreement
    c = run(ours, state=state).confidence
    assert c is not None
    assert (c.breakdown["agreeing"], c.breakdown["opposing"]) == (1, 2)
    assert c.breakdown["agreement"] == pytest.approx(0.5)  # (1 + 1) / (1 + 1 + 2)
    # bot changes its mind: its latest proposal counts.
    note_proposal(state, proposal(proposer=Proposer("bot", "user"), value=170.0, created_ts=T0))
    c = run(ours, state=state).confidence
    assert c is not None and (c.breakdown["agreeing"], c.breakdown["opposing"]) == (2, 1)
    # Out of the window (300 s), nobody counts.
    c = run(ours, state=state, now=T0 + 301).confidence
    assert c is not None and c.breakdown["agreement"] == 1.0


def test_proposals_kept_for_agreement_are_bounded() -> None:
    state = GateState()
    for i in range(PROPOSALS_KEPT + 50):
        note_proposal(state, proposal(proposer=Proposer(f"u{i}", "user"), created_ts=T0))
    assert len(state._proposed[POINT]) == PROPOSALS_KEPT
    note_proposal(state, proposal(created_ts=T0 + 1000))
    assert len(state._proposed[POINT]) == 1


def test_writes_kept_are_bounded() -> None:
    state = GateState()
    for i in range(WRITES_KEPT + 10):
        record_write(state, POINT, 180.0, T0 + i, f"k{i}")
    assert len(state.writes_after(POINT, -math.inf)) == WRITES_KEPT
    assert state.last_write(POINT) == (T0 + WRITES_KEPT + 9, 180.0)


@settings(max_examples=300, deadline=None)
@given(
    p=st.floats(0, 1),
    q=st.floats(0, 1),
    r=st.floats(0, 1),
    a=st.floats(0, 1),
    w=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
)
def test_confidence_stays_in_0_1_and_never_above_the_simulation(
    p: float, q: float, r: float, a: float, w: tuple[float, float, float]
) -> None:
    config = GateConfig(weight_quality=w[0], weight_record=w[1], weight_agreement=w[2])
    c = confidence(p, q, r, a, config).value
    assert 0.0 <= c <= p


# -- hostile input ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "175", True, None, [175.0]])
def test_a_value_that_is_no_finite_number_is_rejected_not_raised(value: Any) -> None:
    decision = run(proposal(value=value))
    assert decision.kind == "reject"
    assert "is not a finite number" in decision.reasons[0]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"id": ""}, "proposal id must be non-empty text"),
        ({"point": None}, "point must be non-empty text"),
        ({"idempotency_key": ""}, "idempotency key must be non-empty text"),
        ({"policy": ""}, "policy id must be non-empty text"),
        ({"proposer": "alice"}, "proposer must be a Proposer"),
        ({"created_ts": math.nan}, "created_ts must be a finite time"),
        ({"current_quality": "GOOD"}, "quality must be a Quality"),
        ({"current_age_s": -1.0}, "age must be a finite number of seconds >= 0"),
        ({"current_age_s": math.inf}, "age must be"),
        ({"inputs": [InputSeen("a/b", Quality.GOOD, 0.0)]}, "inputs must be a tuple"),
        ({"current_suspect": ""}, f"point {POINT}: suspect must be non-empty text"),
        ({"current_suspect": 0.93}, f"point {POINT}: suspect must be non-empty text"),
    ],
)
def test_a_malformed_proposal_is_refused_saying_why(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        proposal(**changes)


def test_malformed_parts_are_refused_saying_why() -> None:
    with pytest.raises(ValueError, match="proposer kind 'robot'"):
        Proposer("x", "robot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input a/b: age"):
        InputSeen("a/b", Quality.GOOD, math.nan)
    for why in ("", b"flatline", 1):
        with pytest.raises(ValueError, match="input a/b: suspect must be non-empty text"):
            InputSeen("a/b", Quality.GOOD, 0.0, why)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="point_hi must be a finite number"):
        HardLimits(POINT, True, 0.0, math.inf)
    with pytest.raises(ValueError, match="max_step must be above 0"):
        HardLimits(POINT, True, 0.0, 1.0, max_step=0.0)
    with pytest.raises(ValueError, match="paths_ok \\(5\\) exceeds paths \\(4\\)"):
        SimSummary(4, 5)
    with pytest.raises(ValueError, match="paths must be a whole number"):
        SimSummary(True, 0)
    with pytest.raises(ValidationError):
        GateConfig(weight_quality=1.5)
    with pytest.raises(ValidationError):
        GateConfig(agreement_window_s=math.nan)
    with pytest.raises(ValueError, match="p_sim must be in \\[0, 1\\]"):
        confidence(math.nan, 1, 1, 1, GateConfig())
    with pytest.raises(ValueError, match="needs a finite value and time"):
        record_write(GateState(), POINT, math.nan, T0, "k")
    with pytest.raises(ValueError, match="idempotency key must be non-empty"):
        record_write(GateState(), POINT, 1.0, T0, "")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rbac": access("read")}, "the propose check must be on"),
        ({"rbac": access(asset="other/point")}, "the propose check must be on"),
        ({"execute": access("propose")}, "the execute check must be on"),
        ({"limits": dataclasses.replace(LIMITS, point="a/b")}, "limits of a/b given"),
        ({"limits": dataclasses.replace(LIMITS, policy="tank")}, "limits of policy tank given"),
        ({"now": math.nan}, "now must be a finite time"),
    ],
)
def test_miswired_inputs_fail_loudly(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run(**kwargs)


# -- the property: driven as an executor drives it ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
    """One proposal in a random sequence."""

    dt: float  # seconds after the previous proposal
    mode: int  # how the value is chosen: see `proposed_value`
    x: float  # in [-1, 1]: where in its span the value falls
    key: int
    age: float  # how old the proposer's reading is
    quality: Quality
    allowed: bool
    can_execute: bool
    sim: int  # 0: none, 1: failed, else paths_ok out of 100 is sim - 2
    approve: bool  # a person approves if asked
    delay: float  # ... after this long


@dataclasses.dataclass(frozen=True)
class World:
    limits: HardLimits
    initial: float
    steps: tuple[Step, ...]


def random_steps(rnd: random.Random) -> tuple[Step, ...]:
    """Up to 30 proposals, biased towards what gets written, so that writes crowd the limits."""

    def maybe(p: float) -> bool:
        return rnd.random() < p

    return tuple(
        Step(
            dt=rnd.choice([0.0, 0.1, 1.0]) if maybe(0.5) else rnd.uniform(0, 20),
            mode=rnd.randrange(12),
            x=rnd.choice([-1.0, 0.0, 1.0]) if maybe(0.1) else rnd.uniform(-1, 1),
            key=rnd.randrange(16),
            age=rnd.choice([0.0, 0.5]) if maybe(0.5) else rnd.uniform(0, 30),
            quality=rnd.choice([Quality.GOOD] * 4 + list(Quality)),
            allowed=maybe(5 / 6),
            can_execute=maybe(3 / 4),
            sim=rnd.randrange(103) if maybe(1 / 3) else rnd.randrange(92, 103),
            approve=maybe(0.5),
            delay=rnd.uniform(0, 60),
        )
        for _ in range(rnd.randrange(31))
    )


@st.composite
def worlds(draw: st.DrawFn) -> World:
    """A point's limits, a policy's, the point's first value, and a sequence of proposals.

    The limits come from Hypothesis draws; the proposals from a Random it seeds. Drawing each
    proposal's dozen fields through Hypothesis cost ~9 ms an example (measured), a seeded
    Random well under 1 ms, which buys thousands of examples in seconds; a failure still
    prints the whole world, steps included.
    """
    lo = draw(st.floats(-1000, 1000))
    span = draw(st.floats(1, 2000))
    hi = lo + span
    # Bounds around the range: inside, overlapping, beyond, or none at all.
    b_lo, b_hi = sorted(draw(st.tuples(*[st.floats(lo - span / 4, hi + span / 4)] * 2)))
    bounded = draw(st.booleans()) and b_lo < b_hi
    max_step = draw(st.none() | st.floats(0.01, span))
    rate = draw(
        st.none() | st.builds(RateLimit, max_writes=st.integers(1, 4), per_s=st.floats(0.5, 100))
    )
    limits = HardLimits(
        "a/b/sp",
        writable=True,
        point_lo=lo,
        point_hi=hi,
        policy="pol",
        bounds_lo=b_lo if bounded else None,
        bounds_hi=b_hi if bounded else None,
        max_step=max_step,
        rate=rate,
    )
    # Mostly inside every limit, where writes can happen; sometimes anywhere around them.
    inside_lo, inside_hi = (max(lo, b_lo), min(hi, b_hi)) if bounded else (lo, hi)
    if inside_lo > inside_hi:
        inside_lo, inside_hi = lo, hi
    # + 0.0 turns -0.0 into 0.0: hypothesis refuses floats(0.0, -0.0) as an empty interval.
    inside_lo, inside_hi = inside_lo + 0.0, inside_hi + 0.0
    initial = draw(st.floats(inside_lo, inside_hi) | st.floats(lo - span / 2, hi + span / 2))
    steps = random_steps(draw(st.randoms(use_true_random=True)))
    return World(limits, initial, steps)


def proposed_value(step: Step, limits: HardLimits, seen: float) -> float:
    """The value a step proposes, given the value its proposer saw."""
    lo, hi = limits.point_lo or 0.0, limits.point_hi or 0.0
    span = hi - lo
    reach = limits.max_step or span
    if step.mode == 0:
        return math.nan
    if step.mode <= 2:  # anywhere in [lo - span/2, hi + span/2]
        return lo + span / 2 + step.x * span
    if step.mode == 3:  # exactly max step up or down
        return seen + math.copysign(reach, step.x)
    if step.mode == 4:  # exactly on an edge of the range or the bounds
        edges = [e for e in (lo, hi, limits.bounds_lo, limits.bounds_hi) if e is not None]
        return edges[int(abs(step.x) * (len(edges) - 1))]
    return seen + step.x * 1.5 * reach  # a step of up to 1.5 max steps


def drive(world: World) -> list[tuple[float, float, float, str]]:
    """Run an executor over the world's proposals; return each write as (ts, before, value, key).

    Auto-executions are written at once on the gate's word alone (so a gate that lets a bad one
    through is caught); approved ones are written later, after `execution_blockers` says yes,
    as the real executor must do.
    """
    limits = world.limits
    state = GateState()
    writes: list[tuple[float, float, float, str]] = []
    history: list[tuple[float, float]] = []  # (ts, value) of the point, for what proposers saw

    def value_at(ts: float) -> float:
        value = world.initial
        for at, v in history:
            if at <= ts:
                value = v
        return value

    def write(p: Proposal, ts: float) -> None:
        writes.append((ts, value_at(math.inf), p.value, p.idempotency_key))
        history.append((ts, p.value))
        record_write(state, p.point, p.value, ts, p.idempotency_key)

    events: list[tuple[float, int, Proposal | None, Step]] = []
    t = EPOCH
    for i, s in enumerate(world.steps):
        t += s.dt
        heapq.heappush(events, (t, 2 * i, None, s))
    seq = 2 * len(world.steps) + 1
    while events:
        now, _, approved, s = heapq.heappop(events)
        if approved is not None:
            if not execution_blockers(approved, limits, state, now):
                write(approved, now)
            continue
        seen = value_at(now - s.age)
        value = proposed_value(s, limits, seen)
        quality = s.quality
        p = Proposal(
            f"p{seq}",
            limits.point,
            value,
            Proposer("pol", "policy"),
            "pol",
            "test",
            f"k{s.key}",
            now,
            seen,
            quality,
            s.age,
        )
        sim = (
            None
            if s.sim == 0
            else SimSummary(100, 0, "x")
            if s.sim == 1
            else SimSummary(100, s.sim - 2)
        )
        execute = access("execute", s.can_execute, limits.point)
        d = decide(
            p,
            limits,
            state,
            access("propose", s.allowed, limits.point),
            sim,
            THRESHOLDS,
            now,
            execute_decision=execute,
        )
        note_proposal(state, p)
        if d.kind == "auto_execute":
            assert s.allowed and s.can_execute and sim is not None and sim.error is None
            assert quality in (Quality.GOOD, Quality.UNCERTAIN), "auto-executed a BAD input"
            write(p, now)
        elif d.kind != "reject" and s.approve:
            seq += 2
            heapq.heappush(events, (now + s.delay, seq, p, s))
    return writes


def violations(world: World, writes: list[tuple[float, float, float, str]]) -> list[str]:
    """What the executed writes broke, checked independently of the gate."""
    lim = world.limits
    found = []
    keys = set()
    for i, (ts, before, value, key) in enumerate(writes):
        if not (lim.point_lo is not None and lim.point_hi is not None):
            raise AssertionError("the worlds always have a range")
        if not lim.point_lo <= value <= lim.point_hi:
            found.append(f"write {i}: {value} outside the point's range")
        b_lo, b_hi = lim.bounds_lo, lim.bounds_hi
        if b_lo is not None and b_hi is not None and not b_lo <= value <= b_hi:
            found.append(f"write {i}: {value} outside the policy's bounds")
        if lim.max_step is not None and abs(value - before) > lim.max_step:
            found.append(f"write {i}: step {before} -> {value} beyond {lim.max_step}")
        if lim.rate is not None:
            in_window = [w for w in writes[: i + 1] if w[0] > ts - lim.rate.per_s]
            if len(in_window) > lim.rate.max_writes:
                found.append(f"write {i}: {len(in_window)} writes within {lim.rate.per_s} s")
        if key in keys:
            found.append(f"write {i}: key {key} executed twice")
        keys.add(key)
    return found


PROPERTY = settings(
    max_examples=2500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPERTY
@given(world=worlds())
def test_nothing_executed_ever_breaks_a_hard_limit_or_repeats_a_key(world: World) -> None:
    writes = drive(world)
    assert violations(world, writes) == []


def test_the_worlds_exercise_every_decision() -> None:
    # The property is only as good as the paths it drives: make sure writes happen and each
    # decision kind occurs, so a gate that rejected everything could not pass unnoticed.
    seen: set[str] = set()
    written = 0
    original = gate.decide

    def spy(*args: Any, **kwargs: Any) -> Decision:
        d = original(*args, **kwargs)
        seen.add(d.kind)
        return d

    @settings(max_examples=300, deadline=None, database=None)
    @given(world=worlds())
    def sample(world: World) -> None:
        nonlocal written
        written += len(drive(world))

    with _patched(globals(), "decide", spy):
        sample()
    assert seen == {"reject", "auto_execute", "require_approval", "require_analysis"}
    assert written > 300


# -- the property can fail: against deliberately broken gates ----------------------------------


def _no_point_range(value: float, limits: HardLimits, checked: list[str]) -> list[str]:
    # Trusts the policy's bounds (or, with none, nothing) and forgets the point's range.
    loose = dataclasses.replace(limits, point_lo=None, point_hi=None)
    return _RANGE_VIOLATIONS(value, loose, checked)


def _stale_reference(proposal: Proposal, state: GateState) -> float | None:
    # Measures the step from what the proposer saw, missing a write made since.
    return proposal.current_value


_RANGE_VIOLATIONS = gate._range_violations
# (gate function replaced, its broken stand-in, what the property must then report)
BROKEN_GATES = {
    "point range ignored": ("_range_violations", _no_point_range, "outside the point's range"),
    "no max step": ("_step_violation", lambda *args: [], "beyond"),
    "step from a stale reading": ("_value_before", _stale_reference, "beyond"),
    "no rate limit": ("_rate_violation", lambda *args: [], "writes within"),
    "no idempotency": ("_duplicate", lambda *args: None, "executed twice"),
}


@contextmanager
def _patched(namespace: dict[str, Any], name: str, replacement: Any) -> Iterator[None]:
    original = namespace[name]
    namespace[name] = replacement
    try:
        yield
    finally:
        namespace[name] = original


@pytest.mark.parametrize("broken", list(BROKEN_GATES))
def test_the_property_catches_a_gate_with_a_check_missing(broken: str) -> None:
    @settings(max_examples=2000, deadline=None, database=None, phases=[Phase.generate])
    @given(world=worlds())
    def prop(world: World) -> None:
        assert violations(world, drive(world)) == []

    name, replacement, report = BROKEN_GATES[broken]
    with _patched(vars(gate), name, replacement), pytest.raises(AssertionError, match=report):
        prop()
