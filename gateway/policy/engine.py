"""The policy engine: triggers → proposals → the gate → verified writes, approvals, rollback.

Every setpoint change the gateway makes passes here, whoever asks (DESIGN.md §8):

- a **policy** fires when its trigger holds (a condition held for `for_s`, checked on every twin
  change of a point it reads and once a second; or an anomaly of its kind) and proposes the
  value its action computes, once per episode. While the rate limit of the point it acts on
  is spent, a condition's episode waits, armed, and proposes once the limit allows a write
  (a proposal before then could only be rejected, and the episode would be lost with it);
- a **person or an agent** proposes through `propose` (the CLI and HTTP routes, with a user or
  token principal), and an **OPC UA client's write** through `on_client_write`.

Each proposal then walks one path: `ProposalCreated` → the gate's cheap checks (permission, hard
limits, interlocks, idempotency; a rejection stops here, before any simulation) → the simulation
(in a worker thread; gateway.policy.predict) → the gate's decision (`ProposalDecided`) →

- `auto_execute`: written at once through the owning driver, which reads the value back;
- `require_approval` / `require_analysis`: it waits for `approve` or `reject` by a principal
  allowed to (RBAC `approve` on the point, holding one of the policy's approval roles, and not
  its own proposer), or expires into rejection after the policy's `approval.expiry_s`.

A write re-checks the hard limits, rate limit, key and interlocks right before it happens (an
approval can come long after the decision), one write per point at a time. If the device
refuses it or reads back another value, the previous value is restored and `ActionFailed`
records the device's own words. `rollback` restores the value a succeeded write replaced.

Which simulation judges a proposal: a policy's own; for a person's, agent's or OPC UA client's,
that of the (first enabled) policy acting on the same point, so "would this keep the oven
inside 170..190 °C" is asked of every change to the heater setpoint. A point no policy models
has no simulation: its proposals wait for a person (require_analysis). The policy's bounds, max
step and rate limit bind the policy; other proposers are held to the point's configured range.

Suspect inputs: an anomaly of a sensor-fault kind (`SENSOR_FAULT_KINDS`: a stuck, jumping or
silent transmitter) marks its point suspect until a newer sample arrives, whatever the value's
quality; a proposal that reads the point meanwhile says why, and the gate executes none alone.

Records: every step is an event in the twin's log (ProposalCreated, ProposalDecided,
ApprovalGranted, ApprovalRejected, ActionSucceeded, ActionFailed, ActionRolledBack), a log line,
and an entry in the hash-chained audit log of control.db (with every permission check, granted
or denied). On start the gate's memory (recent writes, spent keys, policies' records) is rebuilt
from the audit log, and proposals that were waiting when the gateway stopped are rejected, with
that reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from functools import partial
from typing import Any, Literal

from drivers.contract import Quality
from drivers.limits import limit_violation
from gateway.audit.chain import AuditEntry
from gateway.auth.rbac import AccessDecision, Principal, check
from gateway.control.audit import append_rows
from gateway.control.db import ControlDB
from gateway.errors import GatewayError, UnknownPointError
from gateway.lifecycle import Lifecycle
from gateway.policy.expr import ExprError
from gateway.policy.gate import (
    Decision,
    GateConfig,
    GateState,
    HardLimits,
    InputSeen,
    Proposal,
    Proposer,
    ProposerKind,
    SimSummary,
    decide,
    execution_blockers,
    note_proposal,
    rate_limit_free_at,
    record_outcome,
    record_write,
)
from gateway.policy.model import AnomalyTrigger, ConditionTrigger, Policy, Thresholds
from gateway.policy.predict import (
    Prediction,
    build_scenario,
    fit_history,
    output_ids,
    run_prediction,
    trajectory,
)
from gateway.policy.triggers import HoldTracker, anomaly_fires
from gateway.sim.models import SimulationError
from gateway.twin.model import PointDef, PointValue

log = logging.getLogger(__name__)

__all__ = [
    "EVENT_TYPES",
    "SENSOR_FAULT_KINDS",
    "AccessDeniedError",
    "NoModelError",
    "PolicyEngine",
    "ProposalNotFoundError",
    "ProposalRecord",
    "ProposalStateError",
    "Status",
    "WhatIf",
]

Status = Literal[
    "rejected",
    "pending_approval",
    "pending_analysis",
    "executing",
    "succeeded",
    "failed",
    "rolled_back",
    "expired",
]
PENDING: frozenset[str] = frozenset({"pending_approval", "pending_analysis"})
EVENT_TYPES = (
    "ProposalCreated",
    "ProposalDecided",
    "ApprovalGranted",
    "ApprovalRejected",
    "ActionSucceeded",
    "ActionFailed",
    "ActionRolledBack",
)
FINISHED_KEPT = 1000  # finished proposals kept in memory for reads; the audit log keeps all
DEFAULT_EXPIRY_S = 900.0  # a proposal no policy models waits this long for a person
TICK_S = 1.0
AUDIT_REASON_MAX = 4096  # gateway.audit.chain.AuditEntry.reason's max_length
# Anomalies that say the transmitter, not the process, may be wrong: stuck (flatline), faster
# than physics allows (rate_of_change, "a probe fault" in the site config), silent (stale). On a
# change-filtered feed its last value stays GOOD, so quality alone would let a policy act on it.
SENSOR_FAULT_KINDS = ("flatline", "rate_of_change", "stale")
WriteFn = Callable[[str, float], Awaitable[Any]]
HistoryFn = Callable[[str, float, float], Sequence[tuple[float, float]]]
SimulateFn = Callable[..., Any]
# An audit entry, or the call that makes it on control.db's writer thread.
AuditItem = AuditEntry | Callable[[], AuditEntry]


class AccessDeniedError(GatewayError, PermissionError):
    """A principal may not do this (the check is in the audit log)."""


class ProposalNotFoundError(GatewayError, KeyError):
    """No proposal with this id (or it is too old to be held in memory)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown proposal"


class ProposalStateError(GatewayError):
    """The proposal is not in a state that allows this (approve a finished one, say)."""


class NoModelError(GatewayError):
    """No enabled policy models the point: there is nothing to simulate a change of it with."""


@dataclass(frozen=True, slots=True)
class WhatIf:
    """What `PolicyEngine.what_if` found: the gate's figures and the simulation's result."""

    point: str
    value: float
    current_value: float | None
    policy: Policy  # with the horizon and paths the simulation ran
    prediction: Prediction
    result: Any  # gateway.sim.results.SimResult, or None when no simulation ran
    elapsed_ms: float

    @property
    def p_success(self) -> float:
        """The share of paths that were safe and improved the objective (0 with none)."""
        summary = self.prediction.summary
        return summary.paths_ok / summary.paths if summary.paths else 0.0


@dataclass(slots=True)
class ProposalRecord:
    """One proposal and everything that has happened to it."""

    proposal: Proposal
    limits: HardLimits
    model_policy: Policy | None  # whose simulation judges it (its own policy, or the point's)
    source: str  # policy, cli, http, opcua, agent, ...
    status: Status = "executing"
    decision: Decision | None = None
    prediction: Prediction | None = None
    expires_ts: float | None = None
    previous_value: Any = None
    read_back: Any = None
    error: str | None = None
    restored: str | None = None
    approver: str | None = None
    finished_ts: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    # The predicted fan and its limits (predict.trajectory), for the web UI's chart; in memory
    # only (~10 KB), not in events or the audit log, whose figures are the summary's.
    fan: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        """The proposal's id (also its correlation id in events and the audit log)."""
        return self.proposal.id

    def to_json(self) -> dict[str, Any]:
        """Everything about the proposal as plain JSON (HTTP, CLI)."""
        p = self.proposal
        d = self.decision
        return {
            "id": p.id,
            "point": p.point,
            "value": _json_value(p.value),
            "current_value": p.current_value,
            "proposer": {"name": p.proposer.name, "kind": p.proposer.kind},
            "policy": p.policy,
            "judged_by": self.model_policy.id if self.model_policy else None,
            "source": self.source,
            "reason": p.reason,
            "idempotency_key": p.idempotency_key,
            "status": self.status,
            "created_ts": p.created_ts,
            "decision": None if d is None else d.kind,
            "reasons": [] if d is None else list(d.reasons),
            "checked": [] if d is None else list(d.checked),
            "confidence": None if d is None or d.confidence is None else d.confidence.value,
            "confidence_breakdown": None
            if d is None or d.confidence is None
            else dict(d.confidence.breakdown),
            "simulation": None if self.prediction is None else self.prediction.details,
            "expires_ts": self.expires_ts,
            "previous_value": self.previous_value,
            "read_back": _json_value(self.read_back),
            "error": self.error,
            "restored": self.restored,
            "approver": self.approver,
            "finished_ts": self.finished_ts,
            "timings_ms": dict(self.timings_ms),
        }


class PolicyEngine:
    """Runs the policies of one gateway and every proposal through the gate (module docstring)."""

    def __init__(
        self,
        policies: Iterable[Policy],
        points: Mapping[str, PointDef],
        store: Any,
        write: WriteFn,
        *,
        control: ControlDB | None = None,
        gate_config: GateConfig | None = None,
        clock: Callable[[], float] = time.time,
        simulate: SimulateFn | None = None,
        history: HistoryFn | None = None,
    ) -> None:
        self.points = points
        self.store = store
        self._write = write
        self.control = control
        self.state = GateState(gate_config or GateConfig())
        self._clock = clock
        self._simulate = simulate
        self._history = history
        self.policies: tuple[Policy, ...] = ()
        self._by_id: dict[str, Policy] = {}
        self._model_policy: dict[str, Policy] = {}
        self._trackers: dict[str, HoldTracker] = {}
        self._watch: dict[str, list[Policy]] = {}
        self._reads: dict[str, tuple[str, ...]] = {}
        self._anomaly_policies: list[Policy] = []
        self._dirty: dict[str, Policy] = {}
        self._index(policies)
        self.proposals: OrderedDict[str, ProposalRecord] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._busy: set[str] = set()  # policies with a proposal being decided or executed
        # policy -> when its point's rate limit frees up, logged once per deferral (see _fire).
        self._deferred: dict[str, float] = {}
        # point -> (when, values it may hold) after a write that failed and was not restored:
        # the device may have taken the value or kept the old one (see _unsure_steps).
        self._unsure: dict[str, tuple[float, tuple[float, ...]]] = {}
        # point -> (ts, kind, score) of its latest sensor-fault anomaly; one entry per declared
        # point at most. Suspect while no sample newer than ts has arrived (_suspect).
        self._faults: dict[str, tuple[float, str, float]] = {}
        self._scheduled = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(3)
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._audit_failed = False
        # For /metrics: decisions by kind, simulations run and the seconds they took.
        self.decisions: collections.Counter[str] = collections.Counter()
        self.simulations_run = 0
        self.simulation_seconds = 0.0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, life: Lifecycle) -> None:
        """Rebuild the gate's memory, follow the twin, and run the timer; teardown on `life`."""
        self._loop = asyncio.get_running_loop()
        # One simulation at a time: the kernel already uses every core for one.
        executor = self._executor = ThreadPoolExecutor(1, thread_name_prefix="opstwin-sim")
        life.on_stop("simulation threads", lambda: executor.shutdown(wait=True))
        if self.control is not None:
            await self._recover()
        life.on_stop("policy tasks", self._cancel_tasks)
        life.on_stop("policy triggers", self.store.add_listener(self._on_changes))
        life.task(self._tick(), "policy:tick")
        for policy in self.policies:
            if policy.id in self._trackers:
                self._dirty[policy.id] = policy
        self._schedule()
        log.info(
            "policy engine: %d policies (%s)",
            len(self.policies),
            ", ".join(p.id for p in self.policies) or "none",
        )

    def replace_policies(self, policies: Iterable[Policy]) -> None:
        """Run `policies` from now on (a config reload; the caller has checked them).

        Proposals already made keep the policy they were judged by: a pending one is approved
        or expires under its policy's rules of the time, even if the new set changes or drops
        it. A policy whose definition is unchanged keeps its trigger's state (a condition held
        for 20 of its 30 s stays held); a new or changed one starts afresh.
        """
        before, trackers = self._by_id, self._trackers
        self._index(policies)
        for policy_id, tracker in trackers.items():
            if policy_id in self._trackers and before.get(policy_id) == self._by_id[policy_id]:
                self._trackers[policy_id] = tracker
        for policy in self.policies:
            if policy.id in self._trackers and before.get(policy.id) != policy:
                self._dirty[policy.id] = policy
        self._schedule()
        log.info(
            "policy engine: now %d policies (%s)",
            len(self.policies),
            ", ".join(p.id for p in self.policies) or "none",
        )

    def _index(self, policies: Iterable[Policy]) -> None:
        """Work out, once per policy set, what the triggers and proposals look up."""
        self.policies = tuple(p for p in policies if p.enabled)
        self._by_id = {p.id: p for p in self.policies}
        self._model_policy = {}
        # A model the action drives judges others' changes best; a wear model ignores its input.
        for policy in sorted(self.policies, key=lambda p: p.simulation.model_input_free):
            self._model_policy.setdefault(policy.point_id(policy.action.point), policy)
        self._trackers = {}
        self._watch = {}
        for policy in self.policies:
            trigger = policy.trigger
            if isinstance(trigger, ConditionTrigger):
                self._trackers[policy.id] = HoldTracker(trigger)
                for ref in trigger.when.names:
                    self._watch.setdefault(policy.point_id(ref), []).append(policy)
        # The points each policy reads, worked out once: triggers evaluate on every change.
        self._reads = {p.id: _points_read(p, self.points) for p in self.policies}
        self._anomaly_policies = [p for p in self.policies if isinstance(p.trigger, AnomalyTrigger)]
        # Triggers waiting to be looked at: only policies of this set, in their new form.
        self._dirty = {i: self._by_id[i] for i in self._dirty if i in self._trackers}

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("policy engine: %s failed", task.get_name(), exc_info=task.exception())

    # -- triggers ------------------------------------------------------------------------------

    def _on_changes(self, changes: list[PointValue]) -> None:
        # Runs inside TwinStore.ingest: only note which policies to look at, then return.
        watch = self._watch
        for change in changes:
            policies = watch.get(change.point_id)
            if policies:
                for policy in policies:
                    self._dirty[policy.id] = policy
        if self._dirty:
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._evaluate_dirty)

    def _evaluate_dirty(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, {}
        now = self._clock()
        for policy in dirty.values():
            self._evaluate(policy, now)

    def _evaluate(self, policy: Policy, now: float) -> None:
        tracker = self._trackers[policy.id]
        env = self._env(policy, self._values(policy))
        episode = tracker.update(env, now)
        if episode is not None:
            trigger = policy.trigger
            assert isinstance(trigger, ConditionTrigger)
            self._fire(
                policy,
                episode,
                f"`{trigger.when.text}` held for {now - episode:.0f} s (for_s {trigger.for_s:g})",
                now,
            )

    def on_anomalies(self, anomalies: Sequence[Any]) -> None:
        """Note sensor faults and fire the policies whose anomaly trigger matches (the anomaly
        watch calls this)."""
        for anomaly in anomalies:
            if anomaly.kind in SENSOR_FAULT_KINDS and anomaly.point_id in self.points:
                known = self._faults.get(anomaly.point_id)
                if known is None or anomaly.ts >= known[0]:
                    self._faults[anomaly.point_id] = (anomaly.ts, anomaly.kind, anomaly.score)
            for policy in self._anomaly_policies:
                if anomaly_fires(policy, anomaly.point_id, anomaly.kind, anomaly.score):
                    self._fire(
                        policy,
                        anomaly.ts,
                        f"{anomaly.kind} anomaly on {anomaly.point_id} (score {anomaly.score:.2f})",
                        self._clock(),
                    )

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = self._clock()
            try:
                # A change-filtered feed sends nothing while a value stands still: a condition
                # that holds still fires when its time is up.
                for policy_id, tracker in self._trackers.items():
                    due = tracker.due_at()
                    if due is not None and due <= now:
                        self._evaluate(self._by_id[policy_id], now)
                self._expire(now)
            except Exception:
                log.exception("policy engine: periodic check failed; continuing")

    @property
    def busy(self) -> bool:
        """Whether a policy's proposal is being decided or written right now."""
        return bool(self._busy)

    def _fire(self, policy: Policy, episode: float, why: str, now: float) -> None:
        if policy.id in self._busy:
            log.info(
                "policy %s: fired (%s) while its last proposal is in flight; tried again at "
                "the next check",
                policy.id,
                why,
            )
            tracker = self._trackers.get(policy.id)
            if tracker is not None:
                tracker.fired = False  # the episode has not proposed yet: it may still
            return
        tracker = self._trackers.get(policy.id)
        free_at = rate_limit_free_at(
            policy.point_id(policy.action.point), policy.action.rate_limit, self.state, now
        )
        if tracker is not None and free_at is not None:
            # The point's rate limit is spent: a proposal now could only be rejected, and would
            # spend the episode's one proposal on it (the hall went on warming while the oven
            # waited out its 600 s, and the policy never acted again). The episode stays armed
            # and fires at the first check after the limit allows a write, with fresh values.
            tracker.fired = False
            if self._deferred.get(policy.id) != free_at:
                self._deferred[policy.id] = free_at
                log.info(
                    "policy %s: fired (%s) while the rate limit of %s is spent; it proposes "
                    "after %.0f s if the condition still holds",
                    policy.id,
                    why,
                    policy.point_id(policy.action.point),
                    free_at - now,
                )
            return
        self._busy.add(policy.id)
        self._spawn(self._run_policy(policy, episode, why), f"policy:{policy.id}")

    async def _run_policy(self, policy: Policy, episode: float, why: str) -> None:
        try:
            values = self._values(policy)
            env = self._env(policy, values)
            action = policy.action
            target = policy.point_id(action.point)
            value: float
            problems: list[str] = []
            try:
                value = float(action.value.evaluate(env))
            except ExprError as exc:
                value = math.nan
                problems.append(f"action.value `{action.value.text}` failed: {exc.message}")
            key = action.idempotency_key.format(
                policy=policy.id, point=target, episode=int(episode), value=f"{value:g}"
            )
            access = _policy_access(policy, target, "propose")
            record = self._new_record(
                point=target,
                value=value,
                proposer=Proposer(policy.id, "policy"),
                policy=policy,
                model_policy=policy,
                reason=f"policy {policy.id}: {why}",
                key=key,
                source="policy",
                values=values,
            )
            await self._submit(
                record,
                access,
                _policy_access(policy, target, "execute"),
                problems or None,
            )
        finally:
            self._busy.discard(policy.id)

    # -- proposals from principals -------------------------------------------------------------

    async def propose(
        self,
        principal: Principal,
        point: str,
        value: Any,
        *,
        reason: str,
        source: str = "api",
        kind: ProposerKind | None = None,
        idempotency_key: str | None = None,
    ) -> ProposalRecord:
        """Propose `value` for `point` as `principal`; return the proposal once decided (and
        executed, when the gate allows it alone). UnknownPointError for an unknown point."""
        if point not in self.points:
            raise UnknownPointError(f"unknown point {point!r}")
        values = {point: self.store.get(point)}
        model_policy = self._model_policy.get(point)
        if model_policy is not None:
            values.update(self._values(model_policy))
        propose_check = check(principal, "propose", point)
        execute_check = check(principal, "execute", point)
        proposer_kind: ProposerKind = kind or principal.kind
        record = self._new_record(
            point=point,
            value=value,
            proposer=Proposer(principal.name, proposer_kind),
            policy=None,
            model_policy=model_policy,
            reason=(reason or "").strip() or f"proposed by {principal.label}",
            key=idempotency_key or f"{proposer_kind}:{principal.name}:{secrets.token_hex(8)}",
            source=source,
            values=values,
        )
        self._audit([_access_entry(propose_check, record.id, self._clock())])
        await self._submit(record, propose_check, execute_check, None, execute_audit=True)
        return record

    async def on_client_write(
        self, principal: Principal | None, user: str, client: str, point: str, value: Any
    ) -> tuple[str, str, str | None]:
        """An OPC UA client's write as a proposal: (status code name, one line why, id)."""
        who = principal or Principal(name="anonymous", kind="user")
        record = await self.propose(
            who,
            point,
            value,
            reason=f"OPC UA write by {user} from {client}",
            source="opcua",
            kind="opcua",
        )
        return opcua_status(record), _outcome_line(record), record.id

    # -- the path every proposal walks ---------------------------------------------------------

    def _new_record(
        self,
        *,
        point: str,
        value: Any,
        proposer: Proposer,
        policy: Policy | None,
        model_policy: Policy | None,
        reason: str,
        key: str,
        source: str,
        values: Mapping[str, PointValue],
    ) -> ProposalRecord:
        now = self._clock()
        current = values.get(point) or self.store.get(point)
        inputs = tuple(
            InputSeen(
                pid,
                pv.quality,
                max(0.0, now - pv.gateway_ts) if pv.gateway_ts else 0.0,
                self._suspect(pid, pv),
            )
            for pid, pv in sorted(values.items())
            if pid != point
        )
        proposal = Proposal(
            id=f"p-{self._prefix}-{next(self._ids)}",
            point=point,
            value=value,
            proposer=proposer,
            policy=policy.id if policy else None,
            reason=reason[:2000],
            idempotency_key=key[:200],
            created_ts=now,
            current_value=current.value if _finite(current.value) else None,
            current_quality=current.quality,
            current_age_s=max(0.0, now - current.gateway_ts) if current.gateway_ts else 0.0,
            inputs=inputs,
            current_suspect=self._suspect(point, current),
        )
        point_def = self.points[point]
        limits = (
            HardLimits(point, point_def.writable, point_def.lo, point_def.hi)
            if policy is None
            else HardLimits(
                point,
                point_def.writable,
                point_def.lo,
                point_def.hi,
                policy=policy.id,
                bounds_lo=policy.action.bounds.lo,
                bounds_hi=policy.action.bounds.hi,
                max_step=policy.action.max_step,
                rate=policy.action.rate_limit,
            )
        )
        record = ProposalRecord(proposal, limits, model_policy, source)
        record.timings_ms["t0"] = time.perf_counter() * 1000
        self.proposals[proposal.id] = record
        self._trim()
        return record

    async def _submit(
        self,
        record: ProposalRecord,
        access: AccessDecision,
        execute_access: AccessDecision,
        problems: list[str] | None,
        *,
        execute_audit: bool = False,
    ) -> None:
        p = record.proposal
        self._emit(
            "ProposalCreated",
            record,
            {
                "value": _json_value(p.value),
                "current_value": p.current_value,
                "proposer": p.proposer.name,
                "proposer_kind": p.proposer.kind,
                "policy": p.policy,
                "source": record.source,
                "reason": p.reason,
                "idempotency_key": p.idempotency_key,
            },
            f"proposal {p.id}: {p.proposer.label} proposes {p.point} = {_show(p.value)} "
            f"(now {_show(p.current_value)}): {p.reason}",
        )
        self._audit(
            [
                self._entry(
                    record,
                    "proposal.created",
                    inputs=_inputs(p),
                    reason=p.reason,
                    details={"value": _json_value(p.value), "source": record.source},
                )
            ]
        )
        thresholds = _thresholds(record.model_policy)
        now = self._clock()
        # The cheap checks first: a change the gate rejects costs no simulation.
        decision = decide(p, record.limits, self.state, access, None, thresholds, now)
        extra = list(problems or []) + self._interlock_failures(record)
        if extra:
            # Said even when the gate rejects anyway: a value expression that failed leaves NaN,
            # which the gate names only as "not a finite number", not why it is one.
            kept = decision.reasons if decision.kind == "reject" else ("rejected",)
            decision = replace(decision, kind="reject", reasons=(*extra, *kept))
        if decision.kind != "reject":
            prediction = await self._predict(record)
            record.prediction = prediction
            now = self._clock()
            decision = decide(
                p,
                record.limits,
                self.state,
                access,
                None if prediction is None else prediction.summary,
                thresholds,
                now,
                execute_decision=execute_access,
            )
            if execute_audit and decision.kind in ("auto_execute", "require_approval"):
                self._audit([_access_entry(execute_access, record.id, now)])
            if decision.kind == "auto_execute" and p.policy is None:
                # A person's or agent's change is not bound by a policy's interlocks, but it
                # never writes alone past them: the oven stopped, a person decides.
                held = self._interlock_failures(record, of_model=True)
                if held:
                    assert record.model_policy is not None
                    decision = replace(
                        decision,
                        kind="require_approval",
                        reasons=(
                            *decision.reasons,
                            f"policy {record.model_policy.id}'s {'; '.join(held)}: a person "
                            "approves",
                        ),
                    )
        note_proposal(self.state, p)
        record.decision = decision
        record.timings_ms["decided"] = time.perf_counter() * 1000 - record.timings_ms["t0"]
        self._record_decision(record, now)
        if decision.kind == "auto_execute":
            await self._execute(record)
        elif decision.kind == "reject":
            self._finish(record, "rejected")

    def _record_decision(self, record: ProposalRecord, now: float) -> None:
        d = record.decision
        assert d is not None
        self.decisions[d.kind] += 1
        p = record.proposal
        if d.kind in ("require_approval", "require_analysis"):
            record.status = (
                "pending_approval" if d.kind == "require_approval" else "pending_analysis"
            )
            policy = record.model_policy
            record.expires_ts = now + (policy.approval.expiry_s if policy else DEFAULT_EXPIRY_S)
        conf = d.confidence
        data = {
            "decision": d.kind,
            "reasons": list(d.reasons),
            "checked": list(d.checked),
            "confidence": None if conf is None else round(conf.value, 6),
            "breakdown": None if conf is None else _rounded(conf.breakdown),
            "simulation": None if record.prediction is None else record.prediction.details,
            "expires_ts": record.expires_ts,
        }
        line = (
            f"proposal {p.id}: {d.kind}"
            + ("" if conf is None else f" at confidence {conf.value:.3f}")
            + f" — {'; '.join(d.reasons)}"
        )
        self._emit("ProposalDecided", record, data, line, warn=d.kind == "reject")
        self._audit(
            [
                self._entry(
                    record,
                    "proposal.decided",
                    simulation=data["simulation"],
                    confidence=None if conf is None else {"value": conf.value, **conf.breakdown},
                    decision=d.kind,
                    reason="; ".join(d.reasons),
                    details={"checked": list(d.checked), "expires_ts": record.expires_ts},
                )
            ]
        )

    def _interlock_failures(self, record: ProposalRecord, *, of_model: bool = False) -> list[str]:
        """The interlocks of the proposal's own policy (or, `of_model`, of the policy whose
        model judges it) that do not hold now."""
        # A policy's own proposal carries its policy as model_policy: the one it was judged by,
        # even if a reload has changed or dropped it since.
        policy = record.model_policy if of_model or record.proposal.policy else None
        if policy is None:
            return []
        env = self._env(policy, self._values(policy))
        failures = []
        for interlock in policy.action.interlocks:
            try:
                holds = interlock.evaluate(env) is True
                why = "does not hold"
            except ExprError as exc:
                holds, why = False, f"cannot be evaluated: {exc.message}"
            if not holds:
                failures.append(f"interlock `{interlock.text}` {why}")
        return failures

    async def _predict(self, record: ProposalRecord) -> Prediction | None:
        policy = record.model_policy
        p = record.proposal
        if policy is None or not _finite(p.value) or p.current_value is None:
            return None
        started = time.perf_counter()
        prediction, result = await self._simulate_change(
            policy, p.point, p.current_value, float(p.value)
        )
        record.timings_ms["simulation"] = (time.perf_counter() - started) * 1000
        self.simulations_run += 1
        self.simulation_seconds += record.timings_ms["simulation"] / 1000
        if result is not None and prediction.summary.error is None:
            record.fan = trajectory(result, output_ids(policy))
        return prediction

    async def _simulate_change(
        self, policy: Policy, point: str, current: float, proposed: float
    ) -> tuple[Prediction, Any]:
        """The prediction of `proposed` replacing `current` on `point` by `policy`'s model, and
        the simulation's whole result (None when none ran); in the simulation thread."""
        values = {pid: pv.value for pid, pv in self._values(policy).items()}
        values[point] = current
        try:
            model = None
            if policy.simulation.fitted is not None:
                model = await self._fitted(policy)
            scenario = build_scenario(
                policy, values, current=current, proposed=proposed, model=model
            )
        except SimulationError as exc:
            return Prediction(SimSummary(0, 0, error=str(exc)), {"error": str(exc)}), None
        simulate = self._simulate or _native_simulate
        results: list[Any] = []

        def kept(scenario: Any, **kwargs: Any) -> Any:
            # run_prediction keeps only its counts; a what-if also shows the fan and KPIs.
            result = simulate(scenario, **kwargs)
            results.append(result)
            return result

        loop = asyncio.get_running_loop()
        prediction = await loop.run_in_executor(
            self._executor, run_prediction, policy, scenario, values, kept
        )
        return prediction, results[0] if results else None

    def model_policy(self, point: str) -> Policy | None:
        """The policy whose simulation judges others' proposals for `point`, if one does."""
        return self._model_policy.get(point)

    async def what_if(
        self,
        point: str,
        value: float,
        *,
        horizon_s: float | None = None,
        paths: int | None = None,
        by: str | None = None,
    ) -> WhatIf:
        """Simulate `value` replacing `point`'s current value as the gate would judge a person's
        proposal of it, optionally over another horizon or number of paths; write nothing.

        Records a `SimulationCompleted` event. UnknownPointError for an unknown point,
        NoModelError when no policy models it.
        """
        if point not in self.points:
            raise UnknownPointError(f"unknown point {point!r}")
        policy = self._model_policy.get(point)
        if policy is None:
            raise NoModelError(
                f"no enabled policy models {point}: a proposal for it is not simulated and "
                "waits for a person (require_analysis)"
            )
        sim = policy.simulation
        if horizon_s is not None or paths is not None:
            # Frozen models: a copy with the request's horizon or paths, nothing else changed.
            changed = sim.model_copy(
                update={
                    "horizon_s": sim.horizon_s if horizon_s is None else horizon_s,
                    "paths": sim.paths if paths is None else paths,
                }
            )
            policy = policy.model_copy(update={"simulation": changed})
        reading = self.store.get(point)
        current = reading.value if _finite(reading.value) else None
        started = time.perf_counter()
        if current is None:
            error = f"{point} has no current numeric value ({reading.quality}) to start from"
            prediction, result = Prediction(SimSummary(0, 0, error=error), {"error": error}), None
        else:
            prediction, result = await self._simulate_change(policy, point, current, value)
        outcome = WhatIf(
            point=point,
            value=value,
            current_value=current,
            policy=policy,
            prediction=prediction,
            result=result,
            elapsed_ms=(time.perf_counter() - started) * 1000,
        )
        summary = prediction.summary
        data = {
            "value": value,
            "current_value": current,
            "policy": policy.id,
            "by": by,
            "paths": summary.paths,
            "paths_ok": summary.paths_ok,
            "p_success": outcome.p_success,
            "elapsed_ms": round(outcome.elapsed_ms, 3),
            "simulation": prediction.details,
        }
        try:
            self.store.append_event("SimulationCompleted", data, point_id=point)
        except GatewayError as exc:
            log.error("policy engine: cannot record SimulationCompleted for %s: %s", point, exc)
        return outcome

    async def _fitted(self, policy: Policy) -> Any:
        fitted = policy.simulation.fitted
        assert fitted is not None
        if self._history is None:
            raise SimulationError("no twin history to fit from")
        history = self._history
        outputs = policy.simulation.outputs
        if not outputs:
            raise SimulationError("a fitted model needs `simulation.output`")
        u_id = policy.point_id(policy.action.point)
        y_id = policy.point_id(outputs[0])
        end = self._clock()
        start = end - fitted.history_minutes * 60

        def read() -> Any:
            return fit_history(history(u_id, start, end), history(y_id, start, end), fitted.dt_s)

        return await asyncio.get_running_loop().run_in_executor(self._executor, read)

    # -- execution -----------------------------------------------------------------------------

    async def _execute(self, record: ProposalRecord) -> None:
        p = record.proposal
        lock = self._locks.setdefault(p.point, asyncio.Lock())
        async with lock:
            now = self._clock()
            before = self.store.get(p.point)
            # The step is checked from what the point holds now, not from what the proposer saw:
            # an approval can come long after, and an operator may have moved the setpoint at
            # the HMI since (tests/unit/test_policy_engine_props.py found that case).
            # Suspicion does not block a write (whoever approved saw it; execution_blockers
            # ignore quality), but it is recomputed with the other current_* fields so the
            # fresh proposal describes one reading; the inputs stay as the proposer saw them.
            fresh = replace(
                p,
                created_ts=now,
                current_value=before.value if _finite(before.value) else None,
                current_quality=before.quality,
                current_age_s=max(0.0, now - before.gateway_ts) if before.gateway_ts else 0.0,
                current_suspect=self._suspect(p.point, before),
            )
            blockers = list(execution_blockers(fresh, record.limits, self.state, now))
            blockers += self._interlock_failures(record)
            blockers += self._unsure_steps(fresh, record.limits, before)
            if blockers:
                record.error = "not written: " + "; ".join(blockers)
                self._action_event(record, "ActionFailed", written=False)
                self._finish(record, "failed")
                return
            record.status = "executing"
            record.previous_value = before.value if _finite(before.value) else None
            started = time.perf_counter()
            try:
                record.read_back = await self._write(p.point, float(p.value))
            except Exception as exc:  # the device's words, whatever layer they come from
                record.timings_ms["write"] = (time.perf_counter() - started) * 1000
                record.error = str(exc)
                record.restored = await self._restore(p.point, record.previous_value)
                # The attempt spends its key and counts toward the rate limit: the device may
                # have been touched. The point is taken to hold what was restored; unrestored,
                # it may hold either value until the driver reports one (_unsure_steps).
                restored = record.restored.startswith("restored")
                held = record.previous_value if restored else p.value
                if restored:
                    self._unsure.pop(p.point, None)
                else:
                    maybe = (p.value, record.previous_value)
                    self._unsure[p.point] = (now, tuple(float(v) for v in maybe if _finite(v)))
                record_write(self.state, p.point, float(held), now, p.idempotency_key)
                if p.policy is not None:
                    record_outcome(self.state, p.policy, False)
                self._action_event(record, "ActionFailed", written=True)
                self._finish(record, "failed")
                return
            record.timings_ms["write"] = (time.perf_counter() - started) * 1000
            record_write(self.state, p.point, float(p.value), now, p.idempotency_key)
            self._unsure.pop(p.point, None)
            if p.policy is not None:
                record_outcome(self.state, p.policy, True)
            self._action_event(record, "ActionSucceeded", written=True)
            self._finish(record, "succeeded")

    def _unsure_steps(self, p: Proposal, limits: HardLimits, reading: PointValue) -> list[str]:
        """Max-step violations from each value the point may hold after an unrestored failure.

        The gate measures the step from one value, and after a write that failed and could not
        be restored the engine takes the attempted one; but a device that refused it or was
        unreachable kept the old one, and a change-filtered feed may never say so. Until a
        reading arrives, a step must be within max_step of both.
        """
        unsure = self._unsure.get(p.point)
        if unsure is None or limits.max_step is None or not _finite(p.value):
            return []
        since, candidates = unsure
        if reading.gateway_ts > since and reading.quality in (Quality.GOOD, Quality.UNCERTAIN):
            return []  # the driver has read what the device holds since (BAD keeps the old value)
        return [
            f"step {abs(p.value - held):g} from {held:g} exceeds max step {limits.max_step:g}: "
            f"{p.point} may still hold {held:g} since a write at t={since:.3f} failed unverified"
            for held in candidates
            if abs(p.value - held) > limits.max_step
        ]

    async def _restore(self, point: str, previous: float | None) -> str:
        if previous is None:
            return "nothing restored: the previous value is unknown"
        point_def = self.points[point]
        why = limit_violation(previous, point_def.lo, point_def.hi)
        if why is not None:
            return f"nothing restored: the previous value {previous:g} is {why}"
        try:
            back = await self._write(point, float(previous))
        except Exception as exc:
            return f"restore of {previous:g} failed: {exc}"
        return f"restored {_show(back)}"

    def _action_event(self, record: ProposalRecord, kind: str, *, written: bool) -> None:
        p = record.proposal
        data = {
            "value": _json_value(p.value),
            "previous_value": record.previous_value,
            "read_back": _json_value(record.read_back),
            "error": record.error,
            "restored": record.restored,
            "written": written,
            "approver": record.approver,
            "write_ms": round(record.timings_ms.get("write", 0.0), 3),
        }
        if kind == "ActionSucceeded":
            line = (
                f"proposal {p.id}: wrote {p.point} = {_show(p.value)}, read back "
                f"{_show(record.read_back)} (was {_show(record.previous_value)})"
            )
        else:
            line = f"proposal {p.id}: write of {p.point} = {_show(p.value)} failed: {record.error}"
            if record.restored:
                line += f"; {record.restored}"
        self._emit(kind, record, data, line, warn=kind != "ActionSucceeded")
        self._audit(
            [
                self._entry(
                    record,
                    "action.succeeded" if kind == "ActionSucceeded" else "action.failed",
                    decision="written" if kind == "ActionSucceeded" else "failed",
                    reason=record.error,
                    details={k: v for k, v in data.items() if v is not None},
                )
            ]
        )

    def _finish(self, record: ProposalRecord, status: Status) -> None:
        record.status = status
        record.finished_ts = self._clock()
        record.timings_ms["total"] = time.perf_counter() * 1000 - record.timings_ms["t0"]

    # -- people: approve, reject, rollback -----------------------------------------------------

    def get(self, proposal_id: str) -> ProposalRecord:
        """The proposal with this id; ProposalNotFoundError if none is held."""
        record = self.proposals.get(proposal_id)
        if record is None:
            raise ProposalNotFoundError(f"no proposal {proposal_id!r}")
        return record

    def recent(self, status: str | None = None, limit: int = 100) -> list[ProposalRecord]:
        """The newest proposals first, optionally of one status."""
        found = []
        for record in reversed(self.proposals.values()):
            if (
                status is None
                or record.status == status
                or (status == "pending" and record.status in PENDING)
            ):
                found.append(record)
                if len(found) >= limit:
                    break
        return found

    async def approve(
        self, principal: Principal, proposal_id: str, *, comment: str = ""
    ) -> ProposalRecord:
        """Approve a waiting proposal and execute it; AccessDeniedError / ProposalStateError."""
        record = self.get(proposal_id)
        p = record.proposal
        roles = record.model_policy.approval.roles if record.model_policy else None
        grants = (
            principal.grants
            if roles is None
            else tuple(g for g in principal.grants if g.role in roles)
        )
        decision = check(principal.model_copy(update={"grants": grants}), "approve", p.point)
        if (
            decision.allowed
            and p.proposer.name == principal.name
            and p.proposer.kind
            in (
                principal.kind,
                "opcua",
            )
        ):
            decision = replace(
                decision,
                allowed=False,
                reason=f"denied: {principal.label} proposed this change and may not approve it",
            )
        elif not decision.allowed and roles is not None:
            # Say what the principal holds, not "has no grants" (their grants were filtered to
            # the policy's approval roles above).
            unfiltered = check(principal, "approve", p.point)
            held = (
                f"denied: {principal.label} holds {', '.join(g.role for g in principal.grants)}"
                if unfiltered.allowed
                else unfiltered.reason
            )
            decision = replace(
                decision,
                reason=f"{held}; policy {record.model_policy.id} "  # type: ignore[union-attr]
                f"is approved by {', '.join(roles)}",
            )
        self._audit([_access_entry(decision, record.id, self._clock())])
        if not decision.allowed:
            raise AccessDeniedError(decision.reason)
        if record.status not in PENDING:
            raise ProposalStateError(f"proposal {proposal_id} is {record.status}, not waiting")
        record.approver = principal.name
        record.status = "executing"
        self._emit(
            "ApprovalGranted",
            record,
            {"approver": principal.name, "approver_kind": principal.kind, "comment": comment},
            f"proposal {p.id}: approved by {principal.label}" + (f": {comment}" if comment else ""),
        )
        self._audit(
            [
                self._entry(
                    record,
                    "approval.granted",
                    actor=principal.name,
                    actor_kind=principal.kind,
                    decision="approved",
                    reason=comment or None,
                )
            ]
        )
        await self._execute(record)
        return record

    async def reject(
        self, principal: Principal, proposal_id: str, *, reason: str = ""
    ) -> ProposalRecord:
        """Reject a waiting proposal."""
        record = self.get(proposal_id)
        decision = check(principal, "reject", record.proposal.point)
        self._audit([_access_entry(decision, record.id, self._clock())])
        if not decision.allowed:
            raise AccessDeniedError(decision.reason)
        if record.status not in PENDING:
            raise ProposalStateError(f"proposal {proposal_id} is {record.status}, not waiting")
        self._reject(record, principal.name, principal.kind, reason or "rejected", "rejected")
        return record

    def _reject(
        self, record: ProposalRecord, actor: str, kind: str, why: str, status: Status
    ) -> None:
        record.approver = actor
        record.error = why
        self._finish(record, status)
        self._emit(
            "ApprovalRejected",
            record,
            {"by": actor, "by_kind": kind, "reason": why, "status": status},
            f"proposal {record.id}: {status} by {actor}: {why}",
        )
        self._audit(
            [
                self._entry(
                    record,
                    "approval.rejected",
                    actor=actor,
                    actor_kind=kind,
                    decision=status,
                    reason=why,
                )
            ]
        )

    async def rollback(
        self, principal: Principal, proposal_id: str, *, reason: str = ""
    ) -> ProposalRecord:
        """Restore the value a succeeded write replaced."""
        record = self.get(proposal_id)
        p = record.proposal
        decision = check(principal, "rollback", p.point)
        self._audit([_access_entry(decision, record.id, self._clock())])
        if not decision.allowed:
            raise AccessDeniedError(decision.reason)
        if record.status != "succeeded":
            raise ProposalStateError(
                f"proposal {proposal_id} is {record.status}; only a succeeded write rolls back"
            )
        previous = record.previous_value
        if previous is None:
            raise ProposalStateError(f"proposal {proposal_id}: the value it replaced is unknown")
        point_def = self.points[p.point]
        why = limit_violation(previous, point_def.lo, point_def.hi)
        if why is not None:
            raise ProposalStateError(f"the value it replaced, {previous:g}, is {why}")
        async with self._locks.setdefault(p.point, asyncio.Lock()):
            try:
                back = await self._write(p.point, float(previous))
            except Exception as exc:
                raise GatewayError(f"rollback of {p.point} to {previous:g} failed: {exc}") from exc
            record_write(self.state, p.point, float(previous), self._clock(), f"rollback:{p.id}")
            self._unsure.pop(p.point, None)
        record.status = "rolled_back"
        data = {
            "by": principal.name,
            "restored": previous,
            "read_back": _json_value(back),
            "reason": reason,
        }
        self._emit(
            "ActionRolledBack",
            record,
            data,
            f"proposal {p.id}: rolled back by {principal.label}: {p.point} = {_show(back)}"
            + (f" ({reason})" if reason else ""),
        )
        self._audit(
            [
                self._entry(
                    record,
                    "action.rolled_back",
                    actor=principal.name,
                    actor_kind=principal.kind,
                    decision="rolled_back",
                    reason=reason or None,
                    details={"restored": previous, "read_back": _json_value(back)},
                )
            ]
        )
        return record

    def _expire(self, now: float) -> None:
        for record in list(self.proposals.values()):
            if (
                record.status in PENDING
                and record.expires_ts is not None
                and record.expires_ts <= now
            ):
                waited = now - record.proposal.created_ts
                self._reject(
                    record, "gateway", "gateway", f"no approval within {waited:.0f} s", "expired"
                )

    # -- reading the twin ----------------------------------------------------------------------

    def _suspect(self, point: str, reading: PointValue) -> str | None:
        """Why `reading` of `point` is suspect, or None: a sensor-fault anomaly, no sample since."""
        fault = self._faults.get(point)
        # The anomaly's ts is the gateway clock of the batch that carried the faulty sample (or
        # of the periodic check), as the twin stamps gateway_ts: a later sample clears it.
        if fault is None or fault[0] < reading.gateway_ts:
            return None
        ts, kind, score = fault
        return f"{kind} anomaly (score {score:.2f}) at t={ts:.3f}, no sample since"

    def _values(self, policy: Policy) -> dict[str, PointValue]:
        reads = self._reads.get(policy.id)
        if reads is None or self._by_id.get(policy.id) is not policy:
            reads = _points_read(policy, self.points)  # a pending proposal's reloaded-out policy
        return {pid: self.store.get(pid) for pid in reads}

    @staticmethod
    def _env(policy: Policy, values: Mapping[str, PointValue]) -> dict[str, Any]:
        env: dict[str, Any] = {pid: pv.value for pid, pv in values.items()}
        for alias, pid in policy.points.items():
            env[alias] = env.get(pid)
        return env

    # -- records -------------------------------------------------------------------------------

    def _emit(
        self,
        kind: str,
        record: ProposalRecord,
        data: dict[str, Any],
        line: str,
        *,
        warn: bool = False,
    ) -> None:
        data = {"proposal": record.id, **data}
        try:
            self.store.append_event(kind, data, point_id=record.proposal.point)
        except GatewayError as exc:
            log.error("policy engine: cannot record %s for %s: %s", kind, record.id, exc)
        (log.warning if warn else log.info)("%s", line)

    def _entry(self, record: ProposalRecord, action: str, **fields: Any) -> AuditItem:
        p = record.proposal
        fields.setdefault("actor", p.proposer.name)
        fields.setdefault("actor_kind", _audit_kind(p.proposer.kind))
        if fields.get("reason") is not None:
            fields["reason"] = _capped(fields["reason"])
        return partial(
            AuditEntry,
            ts=self._clock(),
            action=action,
            target=p.point,
            correlation_id=p.id,
            details={
                "policy": p.policy,
                "value": _json_value(p.value),
                "key": p.idempotency_key,
                **(fields.pop("details", None) or {}),
            },
            **fields,
        )

    def _audit(self, items: Sequence[AuditItem]) -> None:
        # Queued on control.db's writer thread, in order; a decision never waits for the fsync,
        # and the entries are validated and made canonical there too, off the event loop (~0.4
        # ms of a decision's CPU, bench/decide.py). Their fields are fixed by now.
        if self.control is None or not items:
            return

        def append(conn: Any) -> Any:
            entries = [i if isinstance(i, AuditEntry) else i() for i in items]
            return append_rows(conn, entries)

        try:
            future = self.control.submit(append)
        except GatewayError as exc:
            self._audit_error(exc)
            return
        future.add_done_callback(self._audit_done)

    def _audit_done(self, future: Any) -> None:
        exc = future.exception()
        if exc is not None:
            self._audit_error(exc)

    def _audit_error(self, exc: BaseException) -> None:
        if not self._audit_failed:
            self._audit_failed = True
            log.error("policy engine: the audit log cannot be written: %s", exc)

    def _trim(self) -> None:
        # A scan per proposal would cost ~0.3 ms at the cap: trim in bulk, once the held ones
        # exceed twice the cap (waiting ones are always kept).
        if len(self.proposals) <= 2 * FINISHED_KEPT:
            return
        finished = [k for k, r in self.proposals.items() if r.finished_ts is not None]
        for key in finished[: max(0, len(finished) - FINISHED_KEPT)]:
            del self.proposals[key]

    async def _recover(self) -> None:
        """Rebuild the gate's memory from the audit log; reject proposals left waiting."""
        assert self.control is not None
        since = self._clock() - self.state.config.idempotency_horizon_s
        rows = await asyncio.to_thread(self.control.read, lambda conn: _recent_actions(conn, since))
        waiting: dict[str, dict[str, Any]] = {}
        writes = 0
        for entry in rows:
            action = entry.get("action")
            details = entry.get("details") or {}
            cid = str(entry.get("correlation_id"))
            if action == "proposal.decided" and entry.get("decision") in (
                "require_approval",
                "require_analysis",
            ):
                waiting[cid] = entry
            elif action in ("action.succeeded", "action.failed", "approval.rejected"):
                waiting.pop(cid, None)
            if action in ("action.succeeded", "action.failed", "action.rolled_back"):
                value = (
                    details.get("restored")
                    if action == "action.rolled_back"
                    else details.get("value")
                )
                if action == "action.failed":
                    if not details.get("written"):
                        continue
                    if str(details.get("restored", "")).startswith("restored"):
                        value = details.get("previous_value")
                if _finite(value) and entry.get("target"):
                    key = details.get("key") or f"recovered:{cid}"
                    if action == "action.rolled_back":
                        key = f"rollback:{cid}"
                    record_write(self.state, entry["target"], float(value), entry["ts"], key)  # type: ignore[arg-type]
                    writes += 1
                policy = details.get("policy")
                if policy and action != "action.rolled_back":
                    record_outcome(self.state, policy, action == "action.succeeded")
        for cid, entry in waiting.items():
            self._audit(
                [
                    AuditEntry(
                        ts=self._clock(),
                        actor="gateway",
                        actor_kind="gateway",
                        action="approval.rejected",
                        target=entry.get("target"),
                        correlation_id=cid,
                        decision="expired",
                        reason="the gateway restarted while the proposal waited; propose again",
                    )
                ]
            )
            log.warning("proposal %s was waiting when the gateway stopped: rejected", cid)
        if writes or waiting:
            log.info(
                "policy engine: recovered %d recent writes from the audit log; %d waiting "
                "proposals rejected",
                writes,
                len(waiting),
            )


# -- helpers ----------------------------------------------------------------------------------


def _points_read(policy: Policy, points: Mapping[str, PointDef]) -> tuple[str, ...]:
    """Every declared point a policy's keys and expressions refer to."""
    ids = set(policy.points.values())
    ids.add(policy.point_id(policy.action.point))
    ids |= {policy.point_id(ref) for ref in policy.simulation.outputs if ref != "failure"}
    trigger = policy.trigger
    names: set[str] = set(trigger.when.names) if isinstance(trigger, ConditionTrigger) else set()
    names |= policy.action.value.names
    for interlock in policy.action.interlocks:
        names |= interlock.names
    for expr in policy.simulation.bind.values():
        names |= expr.names
    if policy.objective is not None:
        names |= policy.objective.expression.names
    ids |= {policy.point_id(n) for n in names}
    return tuple(sorted(pid for pid in ids if pid in points))


def _recent_actions(conn: Any, since: float) -> list[dict[str, Any]]:
    # Canonical JSON writes `"action":"..."` exactly so: SQLite skips the access checks (most
    # rows, with HTTP reads audited) without handing them to the JSON parser.
    rows = conn.execute(
        'SELECT entry FROM audit WHERE ts >= ? AND (instr(entry, \'"action":"proposal.\') > 0'
        ' OR instr(entry, \'"action":"action.\') > 0'
        ' OR instr(entry, \'"action":"approval.\') > 0) ORDER BY seq',
        (since,),
    )
    out = []
    for (text,) in rows:
        with contextlib.suppress(ValueError, TypeError):
            entry = json.loads(text)
            if isinstance(entry, dict) and str(entry.get("action", "")).startswith(
                ("proposal.", "action.", "approval.")
            ):
                out.append(entry)
    return out


def _native_simulate(scenario: Any, **kwargs: Any) -> Any:
    from gateway.sim.native import simulate

    return simulate(scenario, **kwargs)


def _policy_access(policy: Policy, point: str, operation: str) -> AccessDecision:
    """A policy's own permission: its scope, which the loader checked covers its action."""
    inside = fnmatchcase(point, policy.scope)
    return AccessDecision(
        inside,
        f"policy {policy.id}'s scope `{policy.scope}` "
        + ("covers" if inside else "does not cover")
        + f" {point}",
        policy.id,
        "policy",
        operation,
        point,
        matched_glob=policy.scope if inside else None,
    )


def _access_entry(decision: AccessDecision, correlation: str, ts: float) -> AuditItem:
    fields = decision.as_audit_fields()
    kind = fields.pop("actor_kind")
    fields["reason"] = _capped(fields["reason"])  # a grant's 64 long globs make a long denial
    return partial(
        AuditEntry, ts=ts, actor_kind=_audit_kind(kind), correlation_id=correlation, **fields
    )


def _audit_kind(kind: str) -> Literal["user", "token", "policy", "gateway"]:
    if kind in ("user", "token", "policy", "gateway"):
        return kind  # type: ignore[return-value]
    return "user"  # an OPC UA client's session is a user's


def _thresholds(policy: Policy | None) -> Thresholds:
    return policy.thresholds if policy is not None else Thresholds()


def opcua_status(record: ProposalRecord) -> str:
    """The OPC UA status code an OPC UA client's write gets for its proposal's outcome."""
    status = record.status
    if status == "succeeded":
        return "Good"
    if status in PENDING:
        return "BadRequestNotComplete"  # not done yet: it waits for a person
    reasons = " ".join(record.decision.reasons if record.decision else ())
    if status == "rejected":
        if reasons.startswith("no permission"):
            return "BadUserAccessDenied"
        if "not writable" in reasons:
            return "BadNotWritable"
        if "outside" in reasons or "range" in reasons or "not a finite number" in reasons:
            return "BadOutOfRange"
        return "BadRequestNotAllowed"
    error = record.error or ""
    for word in error.replace(",", " ").replace(":", " ").replace("(", " ").split():
        if word.startswith("Bad") and word[3:4].isupper():
            return word.rstrip(").")  # the device's own status, as it said it
    return "BadCommunicationError" if status == "failed" else "BadInternalError"


def _outcome_line(record: ProposalRecord) -> str:
    d = record.decision
    why = "; ".join(d.reasons) if d else ""
    if record.status == "failed":
        why = record.error or why
    return f"proposal {record.id} {record.status}: {why}"


def _inputs(p: Proposal) -> dict[str, Any]:
    seen: dict[str, Any] = {
        p.point: {
            "value": p.current_value,
            "quality": p.current_quality.value,
            "age_s": round(p.current_age_s, 3),
        }
    }
    if p.current_suspect is not None:
        seen[p.point]["suspect"] = p.current_suspect
    for i in p.inputs:
        seen[i.point] = {"quality": i.quality.value, "age_s": round(i.age_s, 3)}
        if i.suspect is not None:
            seen[i.point]["suspect"] = i.suspect
    return seen


def _rounded(breakdown: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in breakdown.items()}


def _json_value(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        value = repr(value)  # the audit chain refuses ints beyond 64 bits (JSON readers do)
    if value is None or isinstance(value, bool | int | str):
        return value if not isinstance(value, str) or len(value) <= 256 else value[:256] + "…"
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    text = repr(value)
    return text if len(text) <= 256 else text[:256] + "…"


def _capped(text: str) -> str:
    """Text that fits an audit entry's reason (4,096 characters): a hostile value's repr, a
    long comment or a device's message must not make the entry, and so the step, fail."""
    return text if len(text) <= AUDIT_REASON_MAX else text[: AUDIT_REASON_MAX - 1] + "…"


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "?" if value is None else repr(value)[:64]


def _finite(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x)
