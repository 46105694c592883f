"""The one gate every proposed setpoint change passes (DESIGN.md §8, issue 16). Pure.

No I/O and no clock: the time is always passed in (`now`, `ts`). Whoever proposes a change — a
policy, a person, an AI agent's token, an OPC UA client's write — hands the gate a `Proposal`;
`decide` answers with a `Decision` of one kind:

    reject            no permission, a hard limit or forbidden action, or a duplicate key
    auto_execute      confidence >= auto_execute_min, every input GOOD or UNCERTAIN and none
                      suspect, and the proposer holds `execute`
    require_approval  confidence >= approve_min (or auto_execute held back by the two rules above)
    require_analysis  no simulation, a failed one, or confidence below approve_min

The checks run in this order, and the first that decides ends the walk:

1. permission: the proposer's `propose` check (gateway.auth.rbac) on the point;
2. hard limits and forbidden actions (`HardLimits`): the point must be writable and the value a
   finite number inside the point's configured range (always; the drivers' own rule,
   `drivers.limits.limit_violation`) and the policy's bounds; the step from the point's value no
   larger than `max_step`; fewer than `max_writes` writes to the point in the last `per_s`
   seconds. Every violated limit is named; a value outside is rejected, never clamped;
3. idempotency: a key already executed is a duplicate, rejected;
4. simulation: none, failed, or with no paths → require_analysis;
5. confidence against the policy's thresholds;
6. a BAD, STALE or suspect input (the point itself, or any point the policy's expressions read)
   turns an auto_execute into require_approval. Suspect means the caller gave a reason to
   distrust the value whatever its quality (`InputSeen.suspect`, `Proposal.current_suspect`;
   the engine's: a sensor-fault anomaly with no sample since, gateway.policy.engine);
7. so does a proposer without `execute` on the point (the RBAC module's rule: an agent proposes,
   an executor writes, a supervisor approves).

Confidence (`confidence`), in [0, 1]:

    c = p · (1 - w_q·(1 - q)) · (1 - w_r·max(0, 1 - 2r)) · (1 - w_a·(1 - a))

- p: the share of simulated paths on which every safety constraint held and the objective
  improved. It is the only factor that can raise c: the others can only take a share of it away,
  so c ≤ p always — the gate is never surer than the simulation it trusts (the "dominant" term).
- q: input quality, the weakest input's: GOOD 1, UNCERTAIN `uncertain_quality` (0.5), BAD,
  STALE or suspect 0. A BAD input costs at most w_q (0.3) of c; rule 6 forbids auto_execute on
  its own.
- r: this policy's record of verified outcomes, Laplace-smoothed, (successes + 1) / (outcomes +
  2): a new policy (or a person's proposal) sits at the neutral 0.5 and loses nothing; only a
  record worse than even costs, up to w_r (0.3) at r = 0. A good record earns no bonus, so
  history can warn but never overrule the simulation.
- a: agreement of other proposers (distinct by kind and name) about the same point within
  `agreement_window_s`, each counted once by its latest proposal: (1 + agreeing) / (1 + agreeing
  + opposing), where agreeing moves the point the same way. Alone, a = 1: no conflict is known.
  A conflict costs up to w_a (0.2).

Each factor is a discount of the form (1 - w·shortfall) rather than a power, so a weight reads
as "the most this evidence can take away", and a zero input cannot zero the product: a BAD
input with a perfect simulation still reaches a person (require_approval) instead of vanishing
into require_analysis. The breakdown returned holds every input, factor and weight.

`GateState` is the memory between proposals, and the one mutable object here: `decide` and
`execution_blockers` only read it; `record_write`, `record_outcome` and `note_proposal` change it
(the caller serialises them per gate). It is bounded:

- writes: the last `WRITES_KEPT` (1000, the most `RateLimit.max_writes` allows) per point —
  deciding "fewer than n writes in the window" needs only the n most recent;
- executed idempotency keys: each for `idempotency_horizon_s` after its write (default 8 days,
  longer than the longest approval expiry of a week), so at most the writes executed in that
  horizon, which the rate limits bound;
- proposals for agreement: those inside `agreement_window_s`, at most `PROPOSALS_KEPT` per point;
- policy records: two counts per policy.

An approval can come long after the decision, with other writes in between: the executor calls
`execution_blockers` right before writing (and writes one point at a time), then `record_write`
with the time it checked.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from drivers.contract import Quality
from drivers.limits import limit_violation
from drivers.quality import format_range
from gateway.auth.rbac import AccessDecision
from gateway.policy.model import Policy, RateLimit, Thresholds

__all__ = [
    "PROPOSALS_KEPT",
    "WRITES_KEPT",
    "Confidence",
    "Decision",
    "DecisionKind",
    "GateConfig",
    "GateState",
    "HardLimits",
    "InputSeen",
    "Proposal",
    "Proposer",
    "ProposerKind",
    "SimSummary",
    "confidence",
    "decide",
    "execution_blockers",
    "note_proposal",
    "rate_limit_free_at",
    "record_outcome",
    "record_write",
]

ProposerKind = Literal["user", "token", "policy", "opcua"]
DecisionKind = Literal["reject", "auto_execute", "require_approval", "require_analysis"]

# The rate limit needs the `max_writes` most recent writes of a point, and RateLimit allows at
# most 1000 (gateway.policy.model).
WRITES_KEPT = 1000
# Far more proposers than ever argue over one point in a few minutes; the cap only stops a flood.
PROPOSALS_KEPT = 256
_DAY_S = 24 * 3600.0
_PROPOSER_KINDS = ("user", "token", "policy", "opcua")


class GateConfig(BaseModel):
    """How the gate weighs evidence and how long it remembers."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    idempotency_horizon_s: float = Field(
        8 * _DAY_S,
        gt=0,
        description="Seconds an executed idempotency key is remembered; longer than the longest "
        "approval expiry (a week), so no approved proposal outlives its key.",
    )
    agreement_window_s: float = Field(
        300.0, gt=0, description="Seconds within which proposals for one point count as agreeing."
    )
    # Off by default: a GOOD value can be old yet current (the twin drops repeats within the
    # deadband, a Modbus device reports changes only); drivers mark lost points STALE themselves.
    max_input_age_s: float | None = Field(
        None, gt=0, description="An input older than this counts as STALE; none: no age limit."
    )
    uncertain_quality: float = Field(
        0.5, ge=0, le=1, description="Quality factor q of an UNCERTAIN input (GOOD is 1)."
    )
    weight_quality: float = Field(
        0.3, ge=0, le=1, description="Most of the confidence poor input quality can take away."
    )
    weight_record: float = Field(
        0.3, ge=0, le=1, description="Most of the confidence a failing record can take away."
    )
    weight_agreement: float = Field(
        0.2, ge=0, le=1, description="Most of the confidence disagreeing proposers can take away."
    )


@dataclass(frozen=True, slots=True)
class Proposer:
    """Who proposes: a principal's name and what kind of principal it is."""

    name: str
    kind: ProposerKind

    def __post_init__(self) -> None:
        _require_text("proposer name", self.name)
        if self.kind not in _PROPOSER_KINDS:
            raise ValueError(f"proposer kind {self.kind!r}: one of {', '.join(_PROPOSER_KINDS)}")

    @property
    def label(self) -> str:
        """`policy oven-drift`, `user alice`: as reasons name it."""
        return f"{self.kind} `{self.name}`"


@dataclass(frozen=True, slots=True)
class InputSeen:
    """A point a policy's expressions read, with its quality and age when the proposal was made."""

    point: str
    quality: Quality
    age_s: float
    suspect: str | None = None  # why the value is not to be trusted whatever its quality

    def __post_init__(self) -> None:
        _require_text("input point", self.point)
        _require_quality(f"input {self.point}", self.quality)
        _require_age(f"input {self.point}", self.age_s)
        if self.suspect is not None:
            _require_text(f"input {self.point}: suspect", self.suspect)


@dataclass(frozen=True, slots=True)
class Proposal:
    """A proposed setpoint change, with what its proposer saw of the point.

    `value` is deliberately not checked here: whatever a client sent reaches `decide`, which
    rejects a non-number with a reason, so the refusal is recorded like any other.
    """

    id: str
    point: str
    value: float
    proposer: Proposer
    policy: str | None
    reason: str
    idempotency_key: str
    created_ts: float
    current_value: float | None
    current_quality: Quality
    current_age_s: float
    inputs: tuple[InputSeen, ...] = ()
    current_suspect: str | None = None  # why the point's own value is not to be trusted

    def __post_init__(self) -> None:
        _require_text("proposal id", self.id)
        _require_text("point", self.point)
        _require_text("idempotency key", self.idempotency_key)
        if self.policy is not None:
            _require_text("policy id", self.policy)
        if not isinstance(self.proposer, Proposer):
            raise ValueError(f"proposer must be a Proposer, got {type(self.proposer).__name__}")
        if not _finite(self.created_ts):
            raise ValueError(f"created_ts must be a finite time, got {self.created_ts!r}")
        _require_quality(f"point {self.point}", self.current_quality)
        _require_age(f"point {self.point}", self.current_age_s)
        if self.current_suspect is not None:
            _require_text(f"point {self.point}: suspect", self.current_suspect)
        if not isinstance(self.inputs, tuple) or not all(
            isinstance(i, InputSeen) for i in self.inputs
        ):
            raise ValueError("inputs must be a tuple of InputSeen")

    @property
    def seen_ts(self) -> float:
        """When the current value the proposer saw was measured."""
        return self.created_ts - self.current_age_s


class _PointLike(Protocol):
    # What HardLimits.of needs of a point's config (gateway.config.model's point classes).
    @property
    def id(self) -> str: ...
    @property
    def writable(self) -> bool: ...
    @property
    def range(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class HardLimits:
    """Everything a write to one point must keep, for one proposer's policy (or none).

    The point's configured range always applies; a policy's bounds can only narrow it (a value
    must lie inside both). `max_step` and `rate` come from the policy; None means no such limit.
    """

    point: str
    writable: bool
    point_lo: float | None
    point_hi: float | None
    policy: str | None = None
    bounds_lo: float | None = None
    bounds_hi: float | None = None
    max_step: float | None = None
    rate: RateLimit | None = None

    def __post_init__(self) -> None:
        _require_text("point", self.point)
        for name in ("point_lo", "point_hi", "bounds_lo", "bounds_hi", "max_step"):
            value = getattr(self, name)
            if value is not None and not _finite(value):
                raise ValueError(f"{self.point}: {name} must be a finite number, got {value!r}")
        if self.max_step is not None and not self.max_step > 0:
            raise ValueError(f"{self.point}: max_step must be above 0, got {self.max_step!r}")
        if self.rate is not None and self.rate.max_writes > WRITES_KEPT:
            raise ValueError(f"{self.point}: rate limit above {WRITES_KEPT} writes per window")

    @classmethod
    def of(cls, point: _PointLike, policy: Policy | None = None) -> HardLimits:
        """Build the limits of `point` (its site config) for `policy`'s action, or for no policy."""
        rng = point.range
        lo, hi = (None, None) if rng is None else (rng.lo, rng.hi)
        if policy is None:
            return cls(point.id, point.writable, lo, hi)
        action = policy.action
        target = policy.point_id(action.point)
        if target != point.id:
            raise ValueError(f"policy {policy.id} acts on {target}, not on {point.id}")
        return cls(
            point.id,
            point.writable,
            lo,
            hi,
            policy=policy.id,
            bounds_lo=action.bounds.lo,
            bounds_hi=action.bounds.hi,
            max_step=action.max_step,
            rate=action.rate_limit,
        )


@dataclass(frozen=True, slots=True)
class SimSummary:
    """What the simulation found: paths run, paths on which safety held and the objective
    improved, or why it failed."""

    paths: int
    paths_ok: int
    error: str | None = None

    def __post_init__(self) -> None:
        for name in ("paths", "paths_ok"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        if self.paths_ok > self.paths:
            raise ValueError(f"paths_ok ({self.paths_ok}) exceeds paths ({self.paths})")

    @property
    def p_success(self) -> float:
        """The share of paths that kept every constraint and improved the objective."""
        return self.paths_ok / self.paths if self.paths else 0.0


@dataclass(frozen=True, slots=True)
class Confidence:
    """A confidence in [0, 1] and every input, factor and weight that made it."""

    value: float
    breakdown: dict[str, float]


@dataclass(frozen=True, slots=True)
class Decision:
    """The gate's answer to one proposal."""

    proposal_id: str
    kind: DecisionKind
    reasons: tuple[str, ...]
    confidence: Confidence | None
    limits: HardLimits
    checked: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Proposed:
    ts: float
    proposer: tuple[str, str]
    direction: int


@dataclass(slots=True)
class GateState:
    """What the gate remembers between proposals (bounds in the module docstring).

    Read freely; change only through `record_write`, `record_outcome` and `note_proposal`.
    """

    config: GateConfig = field(default_factory=GateConfig)
    # point -> (ts, value) sorted by ts; key -> ts of its write, about oldest first;
    # policy -> (successes, failures); point -> recent proposals.
    _writes: dict[str, list[tuple[float, float]]] = field(default_factory=dict, init=False)
    _executed: dict[str, float] = field(default_factory=dict, init=False)
    _records: dict[str, tuple[int, int]] = field(default_factory=dict, init=False)
    _proposed: dict[str, list[_Proposed]] = field(default_factory=dict, init=False)

    def last_write(self, point: str) -> tuple[float, float] | None:
        """The latest recorded write to `point` as (ts, value), or None."""
        writes = self._writes.get(point)
        return writes[-1] if writes else None

    def writes_after(self, point: str, since: float) -> list[tuple[float, float]]:
        """The recorded writes to `point` later than `since`, oldest first."""
        writes = self._writes.get(point, [])
        return writes[bisect.bisect_right(writes, since, key=lambda w: w[0]) :]

    def executed_at(self, key: str) -> float | None:
        """When a write with idempotency key `key` was recorded, or None if it was not."""
        return self._executed.get(key)

    def record(self, policy: str) -> tuple[int, int]:
        """A policy's verified outcomes as (successes, outcomes)."""
        successes, failures = self._records.get(policy, (0, 0))
        return successes, successes + failures


def record_write(state: GateState, point: str, value: float, ts: float, key: str) -> None:
    """Remember a verified write: for the rate limit, the next step, and its idempotency key.

    Mutates `state`. Drops keys older than the horizon and writes beyond `WRITES_KEPT`.
    """
    _require_text("point", point)
    _require_text("idempotency key", key)
    if not _finite(value) or not _finite(ts):
        raise ValueError(f"{point}: a write needs a finite value and time, got {value!r} at {ts!r}")
    writes = state._writes.setdefault(point, [])
    bisect.insort_right(writes, (ts, float(value)), key=lambda w: w[0])
    del writes[:-WRITES_KEPT]
    # Re-inserted at the end, so the dict stays (about) oldest first and pruning stops early.
    state._executed.pop(key, None)
    state._executed[key] = ts
    horizon = ts - state.config.idempotency_horizon_s
    while state._executed:
        oldest, at = next(iter(state._executed.items()))
        if at >= horizon:
            break
        del state._executed[oldest]


def record_outcome(state: GateState, policy: str, success: bool) -> None:
    """Count one verified outcome (the write held and did what the policy wanted) of `policy`.

    Mutates `state`.
    """
    _require_text("policy id", policy)
    successes, failures = state._records.get(policy, (0, 0))
    state._records[policy] = (successes + 1, failures) if success else (successes, failures + 1)


def note_proposal(state: GateState, proposal: Proposal) -> None:
    """Remember a proposal's direction, for the agreement of later ones. Mutates `state`."""
    window = state.config.agreement_window_s
    kept = [
        p for p in state._proposed.get(proposal.point, []) if p.ts > proposal.created_ts - window
    ]
    kept.append(
        _Proposed(
            proposal.created_ts,
            (proposal.proposer.kind, proposal.proposer.name),
            _direction(proposal),
        )
    )
    state._proposed[proposal.point] = kept[-PROPOSALS_KEPT:]


def decide(
    proposal: Proposal,
    limits: HardLimits,
    state: GateState,
    rbac_decision: AccessDecision,
    sim_summary: SimSummary | None,
    thresholds: Thresholds,
    now: float,
    *,
    execute_decision: AccessDecision | None = None,
) -> Decision:
    """Decide what happens to `proposal` at time `now`; read-only on `state`.

    `rbac_decision` is the proposer's `propose` check on the point; `execute_decision` its
    `execute` check (None: not checked, so no auto_execute).
    """
    _require_wiring(proposal, limits, rbac_decision, "propose")
    if execute_decision is not None:
        _require_wiring(proposal, limits, execute_decision, "execute")
    if not _finite(now):
        raise ValueError(f"now must be a finite time, got {now!r}")

    def verdict(
        kind: DecisionKind,
        reasons: Iterable[str],
        conf: Confidence | None = None,
        checked: tuple[str, ...] = (),
    ) -> Decision:
        return Decision(proposal.id, kind, tuple(reasons), conf, limits, checked)

    if not rbac_decision.allowed:
        return verdict("reject", [f"no permission: {rbac_decision.reason}"])
    violations, checked = _hard_limits(proposal, limits, state, now)
    if violations:
        return verdict("reject", [*violations, "rejected, never clamped"], checked=checked)
    duplicate = _duplicate(proposal, state)
    if duplicate:
        return verdict("reject", [duplicate], checked=checked)
    if sim_summary is None:
        return verdict("require_analysis", ["no simulation of this change"], checked=checked)
    if sim_summary.error is not None:
        return verdict(
            "require_analysis", [f"simulation failed: {sim_summary.error}"], checked=checked
        )
    if sim_summary.paths == 0:
        return verdict("require_analysis", ["simulation ran no paths"], checked=checked)

    config = state.config
    quality, poor = _input_quality(proposal, now, config)
    record = _record_rate(state, proposal.policy)
    agreement, agreeing, opposing = _agreement(state, proposal, now)
    conf = confidence(sim_summary.p_success, quality, record, agreement, config)
    conf.breakdown.update(
        paths=float(sim_summary.paths),
        paths_ok=float(sim_summary.paths_ok),
        agreeing=float(agreeing),
        opposing=float(opposing),
    )
    c = conf.value
    kind: DecisionKind
    if c >= thresholds.auto_execute_min:
        kind = "auto_execute"
        reasons = [f"confidence {c:.3f} >= auto_execute_min {thresholds.auto_execute_min:g}"]
    elif c >= thresholds.approve_min:
        kind = "require_approval"
        reasons = [f"confidence {c:.3f} >= approve_min {thresholds.approve_min:g}"]
    else:
        kind = "require_analysis"
        reasons = [f"confidence {c:.3f} < approve_min {thresholds.approve_min:g}"]
    if poor:
        # Said even when confidence alone already holds it back: the approver should know.
        reasons.append(f"auto-execution forbidden: {'; '.join(poor)}")
        if kind == "auto_execute":
            kind = "require_approval"
    if kind == "auto_execute" and (execute_decision is None or not execute_decision.allowed):
        kind = "require_approval"
        why = "not checked" if execute_decision is None else execute_decision.reason
        reasons.append(f"{proposal.proposer.label} may not execute ({why}): a person approves")
    return verdict(kind, reasons, conf, checked)


def execution_blockers(
    proposal: Proposal, limits: HardLimits, state: GateState, now: float
) -> tuple[str, ...]:
    """Why `proposal` may not be written at `now` (empty: it may); call right before writing.

    Other writes may have happened since the decision: the step, the rate limit and the key are
    checked again against what `state` holds now.
    """
    _require_limits(proposal, limits)
    violations, _ = _hard_limits(proposal, limits, state, now)
    duplicate = _duplicate(proposal, state)
    return (*violations, duplicate) if duplicate else tuple(violations)


def confidence(
    p_sim: float, quality: float, record: float, agreement: float, config: GateConfig
) -> Confidence:
    """Combine the evidence into a confidence (formula in the module docstring)."""
    for name, x in (
        ("p_sim", p_sim),
        ("quality", quality),
        ("record", record),
        ("agreement", agreement),
    ):
        if not (_finite(x) and 0.0 <= x <= 1.0):
            raise ValueError(f"{name} must be in [0, 1], got {x!r}")
    quality_factor = 1.0 - config.weight_quality * (1.0 - quality)
    record_factor = 1.0 - config.weight_record * max(0.0, 1.0 - 2.0 * record)
    agreement_factor = 1.0 - config.weight_agreement * (1.0 - agreement)
    value = p_sim * quality_factor * record_factor * agreement_factor
    return Confidence(
        value,
        {
            "p_sim": p_sim,
            "quality": quality,
            "record": record,
            "agreement": agreement,
            "quality_factor": quality_factor,
            "record_factor": record_factor,
            "agreement_factor": agreement_factor,
            "weight_quality": config.weight_quality,
            "weight_record": config.weight_record,
            "weight_agreement": config.weight_agreement,
        },
    )


# -- checks --------------------------------------------------------------------------------------


def _hard_limits(
    proposal: Proposal, limits: HardLimits, state: GateState, now: float
) -> tuple[list[str], tuple[str, ...]]:
    """Every hard limit `proposal` breaks at `now`, and what was checked."""
    value = proposal.value
    point = proposal.point
    if not limits.writable:
        return [f"{point} is not writable: the site config must mark it `writable: true`"], ()
    if not _finite(value):
        return [f"value {value!r} for {point} is not a finite number: the gate writes numbers"], ()
    violations: list[str] = []
    checked: list[str] = []
    violations += _range_violations(value, limits, checked)
    violations += _step_violation(proposal, limits, state, checked)
    violations += _rate_violation(limits, state, now, checked)
    return violations, tuple(checked)


def _range_violations(value: float, limits: HardLimits, checked: list[str]) -> list[str]:
    found = []
    rng = format_range(limits.point_lo, limits.point_hi)
    checked.append(f"configured range {rng}")
    why = limit_violation(value, limits.point_lo, limits.point_hi)
    if why is not None:
        found.append(f"{value:g} for {limits.point} is {why} (configured range {rng})")
    if limits.bounds_lo is not None or limits.bounds_hi is not None:
        bounds = format_range(limits.bounds_lo, limits.bounds_hi)
        checked.append(f"policy {limits.policy} bounds {bounds}")
        if limit_violation(value, limits.bounds_lo, limits.bounds_hi) is not None:
            found.append(f"{value:g} is outside policy {limits.policy}'s bounds {bounds}")
    return found


def _step_violation(
    proposal: Proposal, limits: HardLimits, state: GateState, checked: list[str]
) -> list[str]:
    if limits.max_step is None:
        return []
    reference = _value_before(proposal, state)
    if reference is None:
        checked.append(f"max step {limits.max_step:g} (current value unknown)")
        return [
            f"max step {limits.max_step:g} cannot be checked: {proposal.point}'s current value "
            "is unknown; propose again once it reads"
        ]
    step = abs(proposal.value - reference)
    checked.append(f"max step {limits.max_step:g} (step {step:g} from {reference:g})")
    if step > limits.max_step:
        return [
            f"step {step:g} from {reference:g} to {proposal.value:g} exceeds max step "
            f"{limits.max_step:g}"
        ]
    return []


def rate_limit_free_at(
    point: str, rate: RateLimit | None, state: GateState, now: float
) -> float | None:
    """When `rate` next lets a write to `point` through: None if it does now (or is None)."""
    if rate is None:
        return None
    # A write stamped after `now` (a clock stepped back) still counts: it is no less recent.
    recent = state.writes_after(point, now - rate.per_s)
    if len(recent) < rate.max_writes:
        return None
    return recent[len(recent) - rate.max_writes][0] + rate.per_s


def _rate_violation(
    limits: HardLimits, state: GateState, now: float, checked: list[str]
) -> list[str]:
    rate = limits.rate
    if rate is None:
        return []
    recent = state.writes_after(limits.point, now - rate.per_s)
    checked.append(f"rate limit {rate.max_writes} per {rate.per_s:g} s ({len(recent)} in window)")
    next_at = rate_limit_free_at(limits.point, rate, state, now)
    if next_at is None:
        return []
    return [
        f"rate limit: {len(recent)} writes to {limits.point} in the last {rate.per_s:g} s, at "
        f"most {rate.max_writes}; the next may be written after t={next_at:.3f}"
    ]


def _duplicate(proposal: Proposal, state: GateState) -> str | None:
    at = state.executed_at(proposal.idempotency_key)
    if at is None:
        return None
    return f"duplicate: idempotency key {proposal.idempotency_key!r} was executed at t={at:.3f}"


def _value_before(proposal: Proposal, state: GateState) -> float | None:
    """The point's value a write would replace: the proposer's reading, or a later write."""
    last = state.last_write(proposal.point)
    if last is not None and last[0] >= proposal.seen_ts:
        return last[1]
    current = proposal.current_value
    if current is None or not _finite(current):
        return None
    return float(current)


def _input_quality(proposal: Proposal, now: float, config: GateConfig) -> tuple[float, list[str]]:
    """The weakest input's quality factor, and each input that forbids auto-execution."""
    since = max(0.0, now - proposal.created_ts)
    seen = [
        (proposal.point, proposal.current_quality, proposal.current_age_s, proposal.current_suspect)
    ]
    seen += [(i.point, i.quality, i.age_s, i.suspect) for i in proposal.inputs]
    q = 1.0
    poor = []
    for point, quality, age, suspect in seen:
        if config.max_input_age_s is not None and age + since > config.max_input_age_s:
            poor.append(f"{point} is {age + since:g} s old (over {config.max_input_age_s:g} s)")
            q = 0.0
        elif quality in (Quality.BAD, Quality.STALE):
            poor.append(f"{point} is {quality.value}")
            q = 0.0
        elif suspect is not None:
            # A GOOD value from a stuck or jumping transmitter: trusted no more than a STALE one.
            poor.append(f"{point} is suspect: {suspect}")
            q = 0.0
        elif quality is Quality.UNCERTAIN:
            q = min(q, config.uncertain_quality)
    return q, poor


def _record_rate(state: GateState, policy: str | None) -> float:
    if policy is None:
        return 0.5  # a person's or an agent's own proposal: no record, the neutral prior
    successes, outcomes = state.record(policy)
    return (successes + 1) / (outcomes + 2)


def _agreement(state: GateState, proposal: Proposal, now: float) -> tuple[float, int, int]:
    direction = _direction(proposal)
    if direction == 0:
        return 1.0, 0, 0
    me = (proposal.proposer.kind, proposal.proposer.name)
    since = now - state.config.agreement_window_s
    latest: dict[tuple[str, str], _Proposed] = {}
    for p in state._proposed.get(proposal.point, []):  # in the order they were noted
        if p.proposer != me and p.ts > since:
            latest[p.proposer] = p
    agreeing = sum(1 for p in latest.values() if p.direction == direction)
    opposing = sum(1 for p in latest.values() if p.direction == -direction)
    return (1 + agreeing) / (1 + agreeing + opposing), agreeing, opposing


def _direction(proposal: Proposal) -> int:
    value, current = proposal.value, proposal.current_value
    if current is None or not (_finite(value) and _finite(current)):
        return 0
    return (value > current) - (value < current)


# -- input checks --------------------------------------------------------------------------------


def _require_wiring(
    proposal: Proposal, limits: HardLimits, access: AccessDecision, operation: str
) -> None:
    # A check for another operation or point is a caller's bug: deciding on it could let a
    # change through that nobody permitted. Fail loudly.
    _require_limits(proposal, limits)
    if access.operation != operation or access.asset != proposal.point:
        raise ValueError(
            f"the {operation} check must be on {proposal.point}, got {access.operation} on "
            f"{access.asset}"
        )


def _require_limits(proposal: Proposal, limits: HardLimits) -> None:
    # Limits of another point or policy are a caller's bug: they would check the wrong bounds.
    if proposal.point != limits.point:
        raise ValueError(f"limits of {limits.point} given for a proposal to {proposal.point}")
    if proposal.policy != limits.policy:
        raise ValueError(
            f"limits of policy {limits.policy} given for a proposal of policy {proposal.policy}"
        )


def _finite(x: object) -> bool:
    """Whether `x` is a finite int or float (never a bool)."""
    return not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x)


def _require_text(what: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be non-empty text, got {value!r}")


def _require_quality(what: str, quality: object) -> None:
    if not isinstance(quality, Quality):
        raise ValueError(f"{what}: quality must be a Quality (GOOD, ...), got {quality!r}")


def _require_age(what: str, age: float) -> None:
    if not _finite(age) or age < 0:
        raise ValueError(f"{what}: age must be a finite number of seconds >= 0, got {age!r}")
