"""The policy engine (gateway.policy.engine): triggers, the gate, approvals, execution, rollback,
idempotency, rate limits, restart, each through a real twin store, a real control database (its
hash-chained audit log) and the real C kernel; the boundary is an in-memory PLC that records
every write, refuses what it will not take, or ignores it, as a device does. Time is a fake
clock the test moves."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests_support import FakeClock, eventually, settle

from drivers.contract import Quality, Sample
from drivers.errors import DeviceResponseError, NotConnectedError, WriteVerifyError
from gateway.audit.chain import AuditEntry
from gateway.auth.rbac import Grant, Principal
from gateway.config.load import load_config
from gateway.config.model import SiteConfig
from gateway.control.audit import AuditLog
from gateway.control.db import ControlDB
from gateway.devices import point_defs
from gateway.errors import UnknownPointError
from gateway.lifecycle import Lifecycle
from gateway.policy import engine as engine_module
from gateway.policy.anomaly import Anomaly
from gateway.policy.engine import (
    EVENT_TYPES,
    AccessDeniedError,
    PolicyEngine,
    ProposalNotFoundError,
    ProposalRecord,
    ProposalStateError,
    opcua_status,
)
from gateway.policy.expr import parse
from gateway.policy.load import load_policies
from gateway.policy.model import AnomalyTrigger, Approval, Policy, SafetyConstraint
from gateway.sim.models import FopdtModel
from gateway.twin.model import EventRecord, PointDef
from gateway.twin.store import TwinStore

ROOT = Path(__file__).parents[2]
SP = "line1/oven1/heater_setpoint"
TEMP = "line1/oven1/temperature"
RUNNING = "line1/oven1/running"
MODE = "line1/oven1/mode"
AMBIENT = "line1/oven1/ambient"
DRIFT = "oven-overtemp-drift"
PATHS = 256  # the shipped 10,000 paths judge the plant; a few hundred judge a test as well


def user(name: str, role: str, *assets: str) -> Principal:
    grant = Grant(role=role, assets=assets or ("*",))  # type: ignore[arg-type]
    return Principal(name=name, kind="user", grants=(grant,))


VIEWER = user("vera", "viewer")
AGENT = Principal(name="oven-agent", kind="token", grants=(Grant(role="agent"),))
SUPERVISOR = user("sam", "supervisor")
EXECUTOR = user("eve", "executor")
ADMIN = user("ada", "admin")


# -- the rig --------------------------------------------------------------------------------------


class Device:
    """The PLC behind the writable points: the engine's write boundary.

    It records every write; refuses values outside its own limits with the status an OPC UA PLC
    answers (BadOutOfRange); can ignore values above a level and read the old one back, as a
    Modbus device that silently keeps its value does; can be unreachable; and ingests what it
    holds into the twin, as a driver does after a verified write.
    """

    def __init__(self, store: TwinStore) -> None:
        self.store = store
        self.held: dict[str, Any] = {}
        self.writes: list[tuple[str, float]] = []
        self.accepts: tuple[float, float] | None = None
        self.ignore_above: float | None = None
        self.down = False

    def set(self, point: str, value: Any) -> None:
        """The plant changes (or the PLC reports) a value."""
        self.held[point] = value
        self.store.ingest([Sample(point, value, Quality.GOOD)])

    async def write(self, point: str, value: float) -> Any:
        self.writes.append((point, value))
        await asyncio.sleep(0)  # a real write yields to the loop while it waits
        if self.down:
            raise NotConnectedError("oven-plc: not connected (connection refused)")
        if self.accepts is not None and not self.accepts[0] <= value <= self.accepts[1]:
            raise DeviceResponseError(
                f"oven-plc ns=2;s=HeaterSetpoint ({point}, limits 0..300): the server refused "
                f"to write {value!r} (Double): BadOutOfRange"
            )
        if self.ignore_above is not None and value > self.ignore_above:
            raise WriteVerifyError(
                f"oven-plc holding 40001 ({point}): wrote {value:g} but read back "
                f"{self.held[point]:g}"
            )
        self.set(point, value)
        return value


@dataclass
class Rig:
    """A twin store, a control database and a device on a fake clock; engines started on them."""

    tmp_path: Path
    clock: FakeClock
    points: dict[str, PointDef]
    store: TwinStore
    control: ControlDB
    device: Device
    lives: list[Lifecycle] = field(default_factory=list)

    async def start(self, policies: Iterable[Policy], **options: Any) -> PolicyEngine:
        engine = PolicyEngine(
            policies,
            self.points,
            self.store,
            self.device.write,
            control=self.control,
            clock=self.clock,
            **options,
        )
        life = Lifecycle()
        self.lives.append(life)
        await engine.start(life)
        await settle(engine)
        return engine

    async def stop(self) -> None:
        while self.lives:
            await self.lives.pop().aclose()

    async def restart(self) -> None:
        """Stop every engine and reopen both databases, as a gateway restart does."""
        await self.stop()
        self.store.close()
        self.control.close()
        self.store = open_store(self.tmp_path, self.points, self.clock)
        self.control = ControlDB(self.tmp_path / "control.db")
        self.device.store = self.store

    def oven(
        self,
        temperature: float | None = 185.0,
        setpoint: float = 180.0,
        running: bool = True,
        mode: str = "AUTO",
    ) -> None:
        """The oven running in AUTO at `setpoint`, the cure at `temperature`."""
        self.device.set(SP, setpoint)
        self.device.set(RUNNING, running)
        self.device.set(MODE, mode)
        if temperature is not None:
            self.device.set(TEMP, temperature)

    async def events(self, proposal: str | None = None) -> list[EventRecord]:
        """The engine's committed events, of one proposal or all."""
        await self.store.aflush()
        return [
            e
            for e in self.store.events_since(0, limit=10_000)
            if e.type in EVENT_TYPES and (proposal is None or e.data.get("proposal") == proposal)
        ]

    async def audit(self, correlation: str | None = None) -> list[dict[str, Any]]:
        """The audit log's entries once every queued append is in, of one proposal or all."""
        await self.control.write_async(lambda conn: None)  # queued after the engine's appends
        rows = AuditLog(self.control).rows(0, limit=10_000)
        entries = [json.loads(row.entry) for row in rows]
        return [e for e in entries if correlation is None or e.get("correlation_id") == correlation]


def open_store(tmp_path: Path, points: dict[str, PointDef], clock: FakeClock) -> TwinStore:
    store = TwinStore(tmp_path / "twin.db", list(points.values()), clock=clock)
    store.open()
    return store


@pytest.fixture(scope="module")
def site() -> SiteConfig:
    return load_config(ROOT / "gateway" / "demo" / "site.yaml")


@pytest.fixture(scope="module")
def points(site: SiteConfig) -> dict[str, PointDef]:
    return {p.id: p for p in point_defs(site)}


@pytest.fixture(scope="module")
def shipped(site: SiteConfig) -> dict[str, Policy]:
    return {p.id: few_paths(p) for p in load_policies(ROOT / "policies", site)}


@pytest.fixture
async def rig(
    tmp_path: Path, fake_clock: FakeClock, points: dict[str, PointDef]
) -> AsyncIterator[Rig]:
    store = open_store(tmp_path, points, fake_clock)
    control = ControlDB(tmp_path / "control.db")
    rig = Rig(tmp_path, fake_clock, points, store, control, Device(store))
    try:
        yield rig
    finally:
        await rig.stop()
        rig.store.close()
        rig.control.close()


@pytest.fixture
def drift(shipped: dict[str, Policy]) -> Policy:
    return shipped[DRIFT]


def few_paths(policy: Policy, **simulation: Any) -> Policy:
    sim = policy.simulation.model_copy(update={"paths": PATHS, **simulation})
    return policy.model_copy(update={"simulation": sim})


def with_action(policy: Policy, **action: Any) -> Policy:
    return policy.model_copy(update={"action": policy.action.model_copy(update=action)})


async def ticks(engine: PolicyEngine, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wait until the engine's timer has run `n` more times (it expires proposals each time)."""
    count = [0]
    expire = engine._expire

    def counted(now: float) -> None:
        count[0] += 1
        expire(now)

    monkeypatch.setattr(engine, "_expire", counted)
    await eventually(lambda: count[0] >= n, what=f"{n} runs of the engine's timer")


async def hold_hot(
    rig: Rig,
    engine: PolicyEngine,
    seconds: float = 60.0,
    t: float = 185.0,
    anomalies: Iterable[tuple[str, str, float]] = (),
) -> None:
    """The oven runs hot for `seconds`; new readings keep arriving (each a twin change). The
    last reading comes with `anomalies` (point, kind, score), as the anomaly watch, a twin
    listener too, reports them within the same ingest."""
    rig.device.set(TEMP, t)
    await settle(engine)
    rig.clock.advance(seconds)
    rig.device.set(TEMP, t + 0.1)
    engine.on_anomalies([Anomaly(p, kind, score, rig.clock(), {}) for p, kind, score in anomalies])
    await settle(engine)


def one(records: list[ProposalRecord]) -> ProposalRecord:
    assert len(records) == 1, [r.to_json() for r in records]
    return records[0]


def reasons(record: ProposalRecord) -> str:
    assert record.decision is not None
    return "; ".join(record.decision.reasons)


# -- 1. condition triggers ------------------------------------------------------------------------


async def test_a_condition_fires_after_for_s_and_once_per_episode(rig: Rig, drift: Policy) -> None:
    rig.oven(temperature=180.0)
    engine = await rig.start([drift])
    rig.device.set(TEMP, 185.0)
    await settle(engine)
    rig.clock.advance(59)
    rig.device.set(TEMP, 185.2)
    await settle(engine)
    assert not engine.proposals, "59 s is not the 60 s the trigger needs"

    rig.clock.advance(1)
    rig.device.set(TEMP, 185.1)
    await settle(engine)
    record = one(engine.recent())
    assert record.status == "succeeded", record.to_json()
    assert record.proposal.value == 174.9  # round(180 - (185.1 - 180), 1)
    assert record.proposal.proposer.kind == "policy"
    assert "held for 60 s" in record.proposal.reason
    assert rig.device.writes == [(SP, 174.9)]

    for _ in range(3):  # still hot, for a long while: the same episode
        rig.clock.advance(100)
        rig.device.set(TEMP, rig.device.held[TEMP] + 0.1)
        await settle(engine)
    assert len(engine.proposals) == 1


async def test_a_new_episode_after_a_break_fires_again(rig: Rig, drift: Policy) -> None:
    rig.oven(temperature=180.0)
    engine = await rig.start([drift])
    await hold_hot(rig, engine)
    first = one(engine.recent())
    rig.device.set(TEMP, 182.0)  # the condition breaks
    await settle(engine)
    rig.clock.advance(600)  # past the policy's rate limit (1 per 600 s)
    await hold_hot(rig, engine)
    second = engine.recent()[0]
    assert second is not first
    assert (first.status, second.status) == ("succeeded", "succeeded"), second.to_json()
    assert first.proposal.idempotency_key != second.proposal.idempotency_key
    assert [v for _, v in rig.device.writes] == [174.9, 169.8]


async def test_a_condition_that_holds_without_new_readings_fires_on_the_timer(
    rig: Rig, drift: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A change-filtered feed sends nothing while the value stands still: the timer must fire it.
    monkeypatch.setattr(engine_module, "TICK_S", 0.01)
    rig.oven(temperature=185.0)
    engine = await rig.start([drift])
    assert not engine.proposals
    rig.clock.advance(60)
    await eventually(lambda: engine.proposals, what="the timer to fire the policy")
    await settle(engine)
    assert one(engine.recent()).status == "succeeded"
    assert rig.device.writes == [(SP, 175.0)]


async def test_a_condition_over_a_point_without_a_value_never_fires(
    rig: Rig, drift: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "TICK_S", 0.01)
    rig.oven(temperature=None)  # the probe has never answered
    engine = await rig.start([drift])
    rig.store.ingest([Sample(TEMP, None, Quality.BAD, reason="probe not answering")])
    await settle(engine)
    rig.clock.advance(3600)
    rig.device.set(SP, 181.0)
    await ticks(engine, 3, monkeypatch)
    await settle(engine)
    assert not engine.proposals
    tracker = engine._trackers[DRIFT]
    assert tracker.last_error is not None and "no value" in tracker.last_error


async def test_the_events_and_the_audit_log_follow_a_proposal(rig: Rig, drift: Policy) -> None:
    rig.oven(temperature=180.0)
    engine = await rig.start([drift])
    await hold_hot(rig, engine)
    record = one(engine.recent())

    events = await rig.events(record.id)
    assert [e.type for e in events] == ["ProposalCreated", "ProposalDecided", "ActionSucceeded"]
    assert {e.point_id for e in events} == {SP}
    created, decided, succeeded = (e.data for e in events)
    assert created["proposer"] == DRIFT and created["value"] == 174.9
    assert decided["decision"] == "auto_execute" and decided["breakdown"]["p_sim"] >= 0.9
    assert decided["simulation"]["paths"] == PATHS
    assert succeeded["read_back"] == 174.9 and succeeded["previous_value"] == 180.0

    entries = await rig.audit(record.id)
    assert [e["action"] for e in entries] == [
        "proposal.created",
        "proposal.decided",
        "action.succeeded",
    ]
    assert {(e["actor"], e["actor_kind"], e["target"]) for e in entries} == {(DRIFT, "policy", SP)}
    assert entries[1]["confidence"]["value"] >= 0.9
    assert entries[1]["simulation"]["model"] == "fopdt"
    verified = AuditLog(rig.control).verify()
    assert verified.ok, verified.describe()


async def test_an_anomaly_of_the_policys_kind_fires_it(rig: Rig, drift: Policy) -> None:
    policy = drift.model_copy(
        update={"trigger": AnomalyTrigger(anomaly="zscore", point="temperature", min_score=0.6)}
    )
    rig.oven(temperature=185.0)
    engine = await rig.start([policy])

    def anomaly(kind: str, score: float, point: str = TEMP) -> Anomaly:
        return Anomaly(point, kind, score, rig.clock(), {})

    engine.on_anomalies(
        [anomaly("zscore", 0.59), anomaly("ewma", 0.9), anomaly("zscore", 0.9, AMBIENT)]
    )
    await settle(engine)
    assert not engine.proposals
    engine.on_anomalies([anomaly("zscore", 0.8)])
    await settle(engine)
    record = one(engine.recent())
    assert "zscore anomaly on line1/oven1/temperature (score 0.80)" in record.proposal.reason
    assert record.status == "succeeded"


# -- 1b. suspect inputs: a sensor fault forbids auto-execution ------------------------------------


async def created_inputs(rig: Rig, record: ProposalRecord) -> dict[str, Any]:
    """The inputs the audit log's `proposal.created` entry holds for `record`."""
    created = [e for e in await rig.audit(record.id) if e["action"] == "proposal.created"]
    return one_entry(created)["inputs"]


def one_entry(entries: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(entries) == 1, entries
    return entries[0]


async def test_a_probe_fault_on_a_policys_input_holds_its_proposal_for_a_person(
    rig: Rig, drift: Policy
) -> None:
    rig.oven(temperature=180.0)
    engine = await rig.start([drift])
    await hold_hot(rig, engine, anomalies=[(TEMP, "rate_of_change", 0.93)])  # the probe jumps
    record = one(engine.recent())
    assert record.status == "pending_approval", record.to_json()
    why = f"rate_of_change anomaly (score 0.93) at t={rig.clock():.3f}, no sample since"
    assert f"auto-execution forbidden: {TEMP} is suspect: {why}" in reasons(record)
    assert record.decision is not None and record.decision.confidence is not None
    assert record.decision.confidence.breakdown["quality"] == 0.0
    assert rig.device.writes == []
    inputs = await created_inputs(rig, record)
    assert inputs[TEMP]["suspect"] == why
    assert "suspect" not in inputs[SP] and "suspect" not in inputs[RUNNING]


async def test_a_sample_after_the_fault_clears_the_suspicion(rig: Rig, drift: Policy) -> None:
    rig.oven()
    engine = await rig.start([drift])
    # A stuck setpoint readback, found by the periodic check: the proposed point itself.
    engine.on_anomalies([Anomaly(SP, "flatline", 0.75, rig.clock(), {})])
    held = await engine.propose(EXECUTOR, SP, 175.0, reason="the hall is warm")
    assert held.status == "pending_approval", held.to_json()
    assert f"{SP} is suspect: flatline anomaly (score 0.75)" in reasons(held)
    assert held.proposal.current_suspect is not None
    assert (await created_inputs(rig, held))[SP]["suspect"].startswith("flatline anomaly")

    rig.clock.advance(1)
    rig.device.set(SP, 180.0)  # a repeat: the twin drops it, so nothing newer has arrived
    assert (await engine.propose(EXECUTOR, SP, 175.0, reason="again")).status == "pending_approval"
    rig.device.set(SP, 180.5)  # the readback moves: a newer sample
    cleared = await engine.propose(EXECUTOR, SP, 175.0, reason="the hall is warm")
    assert cleared.status == "succeeded", cleared.to_json()
    assert "suspect" not in reasons(cleared)
    assert cleared.proposal.current_suspect is None
    assert rig.device.writes == [(SP, 175.0)]
    assert "suspect" not in (await created_inputs(rig, cleared))[SP]


@pytest.mark.parametrize("kind", ["zscore", "out_of_range", "ewma"])
async def test_an_anomaly_of_the_process_not_the_sensor_changes_nothing(
    rig: Rig, drift: Policy, kind: str
) -> None:
    rig.oven(temperature=180.0)
    engine = await rig.start([drift])
    await hold_hot(rig, engine, anomalies=[(TEMP, kind, 1.0), (SP, kind, 1.0)])
    record = one(engine.recent())
    assert record.status == "succeeded", record.to_json()
    assert "suspect" not in reasons(record)
    inputs = await created_inputs(rig, record)
    assert not [pid for pid, seen in inputs.items() if "suspect" in seen]


# -- 2. interlocks and the value expression -------------------------------------------------------


@pytest.mark.parametrize(
    ("running", "mode", "interlock"),
    [(False, "AUTO", "`running`"), (True, "MANUAL", '`mode == "AUTO"`')],
    ids=["oven-stopped", "manual-mode"],
)
async def test_an_interlock_that_does_not_hold_rejects_and_writes_nothing(
    rig: Rig, drift: Policy, running: bool, mode: str, interlock: str
) -> None:
    rig.oven(temperature=180.0, running=running, mode=mode)
    engine = await rig.start([drift])
    await hold_hot(rig, engine)
    record = one(engine.recent())
    assert record.status == "rejected"
    assert f"interlock {interlock} does not hold" in reasons(record)
    assert record.prediction is None, "a rejection costs no simulation"
    assert rig.device.writes == []
    decided = [e for e in await rig.events(record.id) if e.type == "ProposalDecided"]
    assert decided[0].data["decision"] == "reject"


async def test_a_value_expression_that_fails_rejects_and_says_why(rig: Rig, drift: Policy) -> None:
    ambient = f'point("{AMBIENT}")'
    policy = with_action(drift, value=parse(f"round(setpoint - (temperature - {ambient}), 1)"))
    rig.oven(temperature=180.0)  # the hall's thermometer has never answered
    engine = await rig.start([policy])
    await hold_hot(rig, engine)
    record = one(engine.recent())
    assert record.status == "rejected"
    assert math.isnan(record.proposal.value)
    assert "action.value" in reasons(record) and "no value" in reasons(record)
    assert rig.device.writes == []


# -- 3. principals --------------------------------------------------------------------------------


async def test_a_viewer_may_not_propose_and_the_denial_is_audited(rig: Rig, drift: Policy) -> None:
    rig.oven()
    engine = await rig.start([drift])
    record = await engine.propose(VIEWER, SP, 175.0, reason="cooler please")
    assert record.status == "rejected"
    assert reasons(record).startswith("no permission: denied: propose needs role")
    assert opcua_status(record) == "BadUserAccessDenied"
    assert rig.device.writes == []
    denied = [e for e in await rig.audit(record.id) if e["action"] == "access.propose"]
    assert denied and denied[0]["decision"] == "denied" and denied[0]["actor"] == "vera"


async def test_an_agent_proposes_but_a_person_approves(rig: Rig, drift: Policy) -> None:
    rig.oven()
    engine = await rig.start([drift])
    record = await engine.propose(AGENT, SP, 175.0, reason="the hall is warm")
    assert record.status == "pending_approval", record.to_json()
    assert "may not execute" in reasons(record)
    assert record.decision is not None and record.decision.confidence is not None
    assert record.decision.confidence.value >= 0.9, "confident, yet not the agent's to execute"
    assert opcua_status(record) == "BadRequestNotComplete"
    assert rig.device.writes == []


async def test_an_executor_with_a_confident_simulation_writes(rig: Rig, drift: Policy) -> None:
    rig.oven()
    engine = await rig.start([drift])
    record = await engine.propose(EXECUTOR, SP, 175.0, reason="the hall is warm")
    assert record.status == "succeeded", record.to_json()
    assert record.model_policy is not None and record.model_policy.id == DRIFT
    assert (record.previous_value, record.read_back) == (180.0, 175.0)
    assert rig.device.writes == [(SP, 175.0)]
    assert opcua_status(record) == "Good"
    actions = [e["action"] for e in await rig.audit(record.id)]
    assert actions[:2] == ["access.propose", "proposal.created"]
    assert "access.execute" in actions and actions[-1] == "action.succeeded"


async def test_an_executor_never_writes_alone_past_the_models_interlocks(
    rig: Rig, drift: Policy
) -> None:
    rig.oven(running=False)
    engine = await rig.start([drift])
    record = await engine.propose(EXECUTOR, SP, 175.0, reason="the hall is warm")
    assert record.status == "pending_approval", record.to_json()
    assert "interlock `running` does not hold: a person approves" in reasons(record)
    assert rig.device.writes == []


@pytest.mark.parametrize("value", [300.5, -0.1, 1e9, -math.inf, math.inf], ids=repr)
async def test_a_value_outside_the_points_range_is_rejected_never_clamped(
    rig: Rig, drift: Policy, value: float
) -> None:
    rig.oven()
    engine = await rig.start([drift])
    record = await engine.propose(EXECUTOR, SP, value, reason="hostile")
    assert record.status == "rejected"
    assert "rejected, never clamped" in reasons(record) or "not a finite number" in reasons(record)
    assert opcua_status(record) == "BadOutOfRange"
    assert record.proposal.value == value, "the proposal keeps what was asked, unclamped"
    assert rig.device.writes == []


@pytest.mark.parametrize(
    "value",
    [math.nan, "175", True, None, [175.0], {"value": 175}, 10**30, "x" * 10_000],
    ids=["nan", "text", "bool", "none", "list", "dict", "huge-int", "long-text"],
)
async def test_a_value_that_is_no_number_is_rejected_and_recorded(
    rig: Rig, drift: Policy, value: Any
) -> None:
    rig.oven()
    engine = await rig.start([drift])
    record = await engine.propose(EXECUTOR, SP, value, reason="hostile")
    assert record.status == "rejected", record.to_json()
    assert rig.device.writes == []
    json.dumps(record.to_json(), allow_nan=False)  # what HTTP and the CLI show
    assert [e.type for e in await rig.events(record.id)] == ["ProposalCreated", "ProposalDecided"]
    entries = await rig.audit(record.id)
    assert [e["action"] for e in entries] == [
        "access.propose",
        "proposal.created",
        "proposal.decided",
    ]
    assert len(entries[-1]["reason"]) <= engine_module.AUDIT_REASON_MAX
    assert AuditLog(rig.control).verify().ok


def test_the_reason_cap_is_the_audit_entrys() -> None:
    field = AuditEntry.model_fields["reason"]
    assert [m.max_length for m in field.metadata if hasattr(m, "max_length")] == [
        engine_module.AUDIT_REASON_MAX
    ]


async def test_a_long_comment_or_reason_is_kept_within_the_audit_entry(
    rig: Rig, drift: Policy
) -> None:
    rig.oven()
    engine = await rig.start([drift])
    a = await pending(rig, engine)
    b = await pending(rig, engine)
    await engine.approve(SUPERVISOR, a.id, comment="c" * 10_000)
    await engine.reject(SUPERVISOR, b.id, reason="r" * 10_000)
    assert (a.status, b.status) == ("succeeded", "rejected")
    entries = await rig.audit()
    assert max(len(e.get("reason") or "") for e in entries) == engine_module.AUDIT_REASON_MAX
    assert AuditLog(rig.control).verify().ok


async def test_an_unknown_point_is_an_unknown_point_error(rig: Rig, drift: Policy) -> None:
    rig.oven()
    engine = await rig.start([drift])
    with pytest.raises(UnknownPointError, match="line1/oven1/nope"):
        await engine.propose(EXECUTOR, "line1/oven1/nope", 1.0, reason="")
    assert not engine.proposals


async def test_a_read_only_point_is_not_writable(rig: Rig, drift: Policy) -> None:
    rig.oven()
    engine = await rig.start([drift])
    record = await engine.propose(EXECUTOR, TEMP, 180.0, reason="")
    assert record.status == "rejected" and "not writable" in reasons(record)
    assert opcua_status(record) == "BadNotWritable"
    assert rig.device.writes == []


async def test_a_grant_scoped_to_another_asset_permits_nothing_here(
    rig: Rig, drift: Policy
) -> None:
    rig.oven()
    engine = await rig.start([drift])
    tank_executor = user("tom", "executor", "utilities/cooling/*")
    record = await engine.propose(tank_executor, SP, 175.0, reason="")
    assert record.status == "rejected"
    assert "outside user `tom`'s scope" in reasons(record)
    assert rig.device.writes == []


async def test_an_opcua_client_write_becomes_a_proposal(rig: Rig, drift: Policy) -> None:
    rig.oven()
    engine = await rig.start([drift])
    status, line, pid = await engine.on_client_write(EXECUTOR, "eve", "scada-1", SP, 175.0)
    assert (status, rig.device.writes) == ("Good", [(SP, 175.0)])
    assert pid is not None and engine.get(pid).source == "opcua" and "succeeded" in line
    status, _, pid = await engine.on_client_write(AGENT, "oven-agent", "scada-1", SP, 174.0)
    assert status == "BadRequestNotComplete"
    status, _, _ = await engine.on_client_write(None, "anonymous", "scada-2", SP, 174.0)
    assert status == "BadUserAccessDenied"
    assert rig.device.writes == [(SP, 175.0)]


# -- 4. approvals ---------------------------------------------------------------------------------


async def pending(rig: Rig, engine: PolicyEngine, proposer: Principal = AGENT) -> ProposalRecord:
    record = await engine.propose(proposer, SP, 175.0, reason="the hall is warm")
    assert record.status == "pending_approval", record.to_json()
    return record


async def test_a_supervisor_approves_and_it_is_written(rig: Rig, drift: Policy) -> None:
    rig.oven()
    engine = await rig.start([drift])
    record = await pending(rig, engine)
    approved = await engine.approve(SUPERVISOR, record.id, comment="checked the hall")
    assert approved is record and record.status == "succeeded"
    assert record.approver == "sam"
    assert rig.device.writes == [(SP, 175.0)]
    types = [e.type for e in await rig.events(record.id)]
    assert types == ["ProposalCreated", "ProposalDecided", "ApprovalGranted", "ActionSucceeded"]
    granted = [e for e in await rig.audit(record.id) if e["action"] == "approval.granted"]
    assert granted[0]["actor"] == "sam" and granted[0]["reason"] == "checked the hall"


@pytest.mark.parametrize("approver", [AGENT, VIEWER, EXECUTOR], ids=lambda p: p.name)
async def test_who_may_not_approve_is_denied_and_audited(
    rig: Rig, drift: Policy, approver: Principal
) -> None:
    rig.oven()
    engine = await rig.start([drift])
    record = await pending(rig, engine)
    with pytest.raises(AccessDeniedError, match="denied"):
        await engine.approve(approver, record.id)
    assert record.status == "pending_approval"
    assert rig.device.writes == []
    checks = [e for e in await rig.audit(record.id) if e["action"] == "access.approve"]
    assert [(e["actor"], e["decision"]) for e in checks] == [(approver.name, "denied")]


async def test_the_proposer_may_not_approve_its_own_change(rig: Rig, drift: Policy) -> None:
    rig.oven()
    engine = await rig.start([drift])
    record = await pending(rig, engine, proposer=SUPERVISOR)  # a supervisor may not execute
    with pytest.raises(AccessDeniedError, match="proposed this change and may not approve it"):
        await engine.approve(SUPERVISOR, record.id)
    await engine.approve(user("sue", "supervisor"), record.id)
    assert record.status == "succeeded"


async def test_a_finished_proposal_cannot_be_approved_again(rig: Rig, drift: Policy) -> None:
    rig.oven()
    engine = await rig.start([drift])
    record = await pending(rig, engine)
    await engine.approve(SUPERVISOR, record.id)
    with pytest.raises(ProposalStateError, match="is succeeded, not waiting"):
        await engine.approve(user("sue", "supervisor"), record.id)
    with pytest.raises(ProposalStateError):
        await engine.reject(SUPERVISOR, record.id)
    assert rig.device.writes == [(SP, 175.0)]
    with pytest.raises(ProposalNotFoundError):
        await engine.approve(SUPERVISOR, "p-nope-1")


async def test_a_rejection_is_recorded_and_nothing_written(rig: Rig, drift: Policy) -> None:
    rig.oven()
    engine = await rig.start([drift])
    record = await pending(rig, engine)
    with pytest.raises(AccessDeniedError):
        await engine.reject(AGENT, record.id)
    await engine.reject(SUPERVISOR, record.id, reason="batch 42 is nearly done")
    assert (record.status, record.error) == ("rejected", "batch 42 is nearly done")
    events = await rig.events(record.id)
    assert events[-1].type == "ApprovalRejected"
    assert events[-1].data["by"] == "sam" and events[-1].data["status"] == "rejected"
    assert rig.device.writes == []


async def test_an_unapproved_proposal_expires_into_rejection(rig: Rig, drift: Policy) -> None:
    rig.oven()
    engine = await rig.start([drift])
    record = await pending(rig, engine)
    assert record.expires_ts == rig.clock() + drift.approval.expiry_s
    rig.clock.advance(drift.approval.expiry_s - 1)
    engine._expire(rig.clock())
    assert record.status == "pending_approval"
    rig.clock.advance(1)
    engine._expire(rig.clock())
    assert record.to_json()["status"] == "expired"
    events = await rig.events(record.id)
    assert events[-1].type == "ApprovalRejected" and events[-1].data["status"] == "expired"
    with pytest.raises(ProposalStateError):
        await engine.approve(SUPERVISOR, record.id)
    assert rig.device.writes == []
    rejected = [e for e in await rig.audit(record.id) if e["action"] == "approval.rejected"]
    assert rejected[0]["decision"] == "expired" and rejected[0]["actor"] == "gateway"


async def test_approval_roles_of_admin_only_deny_a_supervisor(rig: Rig, drift: Policy) -> None:
    policy = drift.model_copy(update={"approval": Approval(roles=["admin"], expiry_s=900)})
    rig.oven()
    engine = await rig.start([policy])
    record = await pending(rig, engine)
    with pytest.raises(AccessDeniedError, match="is approved by admin"):
        await engine.approve(SUPERVISOR, record.id)
    await engine.approve(ADMIN, record.id)
    assert record.status == "succeeded"


# -- 5. execution failures ------------------------------------------------------------------------


async def test_a_value_the_plc_refuses_is_rolled_back_in_its_own_words(
    rig: Rig, drift: Policy
) -> None:
    rig.oven()
    rig.device.accepts = (176.0, 300.0)  # the PLC's own limits are narrower than the config's
    engine = await rig.start([drift])
    status, _, pid = await engine.on_client_write(EXECUTOR, "eve", "scada-1", SP, 175.0)
    assert pid is not None
    record = engine.get(pid)
    assert record.status == "failed"
    assert status == "BadOutOfRange" == opcua_status(record)
    assert record.error is not None and "BadOutOfRange" in record.error
    assert record.restored == "restored 180"
    assert rig.device.writes == [(SP, 175.0), (SP, 180.0)], "the restore is a write too"
    assert rig.device.held[SP] == 180.0
    failed = (await rig.events(pid))[-1]
    assert failed.type == "ActionFailed" and "BadOutOfRange" in failed.data["error"]
    entries = await rig.audit(pid)
    assert entries[-1]["action"] == "action.failed" and "BadOutOfRange" in entries[-1]["reason"]


async def test_a_write_the_device_ignores_is_rolled_back_naming_both_values(
    rig: Rig, drift: Policy
) -> None:
    rig.oven(temperature=175.0)  # too cool: the change raises the setpoint
    rig.device.ignore_above = 182.0
    engine = await rig.start([drift])
    record = await engine.propose(EXECUTOR, SP, 185.0, reason="warmer")
    assert record.status == "failed", record.to_json()
    assert record.error is not None and "wrote 185 but read back 180" in record.error
    assert rig.device.writes == [(SP, 185.0), (SP, 180.0)]
    assert rig.device.held[SP] == 180.0
    events = await rig.events(record.id)
    assert events[-1].type == "ActionFailed"
    assert events[-1].data["restored"] == "restored 180"
    assert opcua_status(record) == "BadCommunicationError"


async def test_an_approval_measures_the_step_from_what_the_point_holds_now(
    rig: Rig, drift: Policy
) -> None:
    uncertain = with_gain(drift, {"dist": "uniform", "lo": 0.2, "hi": 3.0})
    rig.oven(temperature=180.0)
    engine = await rig.start([uncertain])
    await hold_hot(rig, engine)  # proposes 174.9 from 180: a step of 5.1, max 10
    record = one(engine.recent())
    assert record.status.startswith("pending"), record.to_json()
    rig.clock.advance(120)
    rig.device.set(SP, 186.0)  # meanwhile an operator raised the setpoint at the HMI
    await engine.approve(SUPERVISOR, record.id)
    assert record.status == "failed"
    assert record.error is not None
    assert "step 11.1 from 186 to 174.9 exceeds max step 10" in record.error
    assert rig.device.writes == []


async def test_after_an_unrestored_failure_a_step_must_fit_both_values(
    rig: Rig, drift: Policy
) -> None:
    # The PLC is unreachable: the policy's write and its restore both fail. The device kept
    # 180, or took 174.9: the next step must be within max_step of either.
    policy = drift.model_copy(
        update={"safety": [SafetyConstraint(output="temperature", upper=195, lower=165)]}
    )
    rig.oven(temperature=180.0)
    engine = await rig.start([policy])
    rig.device.down = True
    await hold_hot(rig, engine)
    failed = one(engine.recent())
    assert failed.status == "failed" and failed.restored is not None
    assert failed.restored.startswith("restore of 180 failed")
    rig.device.down = False
    rig.device.set(TEMP, 182.0)
    await settle(engine)
    rig.clock.advance(600)
    await hold_hot(rig, engine, t=191.0)  # proposes 168.9: 6 from 174.9, but 11.1 from 180
    second = engine.recent()[0]
    assert second.proposal.value == 168.9
    assert second.status == "failed", second.to_json()
    assert second.error is not None and "may still hold 180" in second.error
    assert rig.device.writes == [(SP, 174.9), (SP, 180.0)], "168.9 never reached the PLC"


# -- 6. rollback ----------------------------------------------------------------------------------


async def test_a_supervisor_rolls_back_a_write(rig: Rig, drift: Policy) -> None:
    rig.oven()
    engine = await rig.start([drift])
    record = await engine.propose(EXECUTOR, SP, 175.0, reason="")
    with pytest.raises(AccessDeniedError):
        await engine.rollback(VIEWER, record.id)
    await engine.rollback(SUPERVISOR, record.id, reason="scrap rate went up")
    assert record.status == "rolled_back"
    assert rig.device.writes == [(SP, 175.0), (SP, 180.0)]
    assert rig.device.held[SP] == 180.0
    rolled = (await rig.events(record.id))[-1]
    assert rolled.type == "ActionRolledBack" and rolled.data["restored"] == 180.0
    entries = await rig.audit(record.id)
    assert entries[-1]["action"] == "action.rolled_back" and entries[-1]["actor"] == "sam"
    with pytest.raises(ProposalStateError, match="only a succeeded write rolls back"):
        await engine.rollback(SUPERVISOR, record.id)


async def test_only_a_succeeded_write_rolls_back(rig: Rig, drift: Policy) -> None:
    rig.oven()
    engine = await rig.start([drift])
    record = await engine.propose(EXECUTOR, SP, 350.0, reason="")
    assert record.status == "rejected"
    with pytest.raises(ProposalStateError, match="is rejected; only a succeeded write rolls back"):
        await engine.rollback(SUPERVISOR, record.id)
    assert rig.device.writes == []


# -- 7. idempotency and the rate limit ------------------------------------------------------------


async def test_one_idempotency_key_executes_once(rig: Rig, drift: Policy) -> None:
    rig.oven()
    engine = await rig.start([drift])
    first = await engine.propose(EXECUTOR, SP, 175.0, reason="", idempotency_key="batch-42")
    again = await engine.propose(EXECUTOR, SP, 176.0, reason="", idempotency_key="batch-42")
    assert first.status == "succeeded"
    assert again.status == "rejected" and "duplicate" in reasons(again)
    assert rig.device.writes == [(SP, 175.0)]


async def test_a_policy_writes_no_faster_than_its_rate_limit_and_its_episode_waits_for_it(
    rig: Rig, drift: Policy, caplog: pytest.LogCaptureFixture
) -> None:
    rig.oven(temperature=180.0)
    engine = await rig.start([drift])
    await hold_hot(rig, engine)
    rig.device.set(TEMP, 182.0)
    await settle(engine)
    rig.clock.advance(10)
    caplog.set_level(logging.INFO, logger="gateway.policy.engine")
    await hold_hot(rig, engine)  # a second episode 70 s after the first write: within 600 s
    # No proposal the gate could only reject: the episode stays armed until the limit allows.
    first = one(engine.recent())
    assert first.status == "succeeded"
    assert "rate limit of line1/oven1/heater_setpoint is spent" in caplog.text
    rig.clock.advance(600 - 70 - 1)
    await hold_hot(rig, engine, seconds=0.5)
    assert len(engine.recent()) == 1, "still within 600 s of the first write"
    rig.clock.advance(1)
    await hold_hot(rig, engine, seconds=0.0, t=186.0)
    second, _ = engine.recent()
    assert second.proposal.policy == DRIFT and second.proposal.value == 168.9, "fresh values"
    assert second.status != "rejected", second.to_json()
    assert caplog.text.count("is spent") == 1, "logged once per deferral"


async def test_a_rate_limit_spent_by_someone_else_defers_the_policy_too(
    rig: Rig, drift: Policy
) -> None:
    # The limit is the point's: a person's write 100 s ago holds the policy back for 500 s.
    rig.oven(temperature=185.0)
    engine = await rig.start([drift])
    assert (await engine.propose(EXECUTOR, SP, 175.0, reason="")).status == "succeeded"
    rig.clock.advance(40)
    await hold_hot(rig, engine)
    assert len(engine.recent()) == 1
    rig.clock.advance(500)
    await hold_hot(rig, engine, seconds=1.0)
    policy_record, _ = engine.recent()
    assert policy_record.proposal.policy == drift.id, "proposed once the limit allowed"
    assert "rate limit" not in reasons(policy_record)


async def test_two_approvals_of_one_key_write_once(rig: Rig, drift: Policy) -> None:
    # Both wait; the key is checked again when the second is approved.
    rig.oven()
    engine = await rig.start([drift])
    a = await engine.propose(AGENT, SP, 175.0, reason="", idempotency_key="k")
    b = await engine.propose(AGENT, SP, 175.0, reason="", idempotency_key="k")
    await engine.approve(SUPERVISOR, a.id)
    await engine.approve(SUPERVISOR, b.id)
    assert (a.status, b.status) == ("succeeded", "failed")
    assert b.error is not None and "duplicate" in b.error
    assert rig.device.writes == [(SP, 175.0)]


# -- 8. restart -----------------------------------------------------------------------------------


async def test_a_restart_keeps_keys_and_rate_limits_and_rejects_what_waited(
    rig: Rig, drift: Policy
) -> None:
    rig.oven(temperature=180.0)
    engine = await rig.start([drift])
    await hold_hot(rig, engine)  # the policy writes 174.9
    assert one(engine.recent()).status == "succeeded"
    rig.device.set(TEMP, 186.0)
    keyed = await engine.propose(EXECUTOR, SP, 172.0, reason="", idempotency_key="batch-42")
    assert keyed.status == "succeeded", keyed.to_json()
    waiting = await engine.propose(AGENT, SP, 170.0, reason="")
    assert waiting.status == "pending_approval", waiting.to_json()

    await rig.restart()
    rig.clock.advance(30)
    engine = await rig.start([drift])
    again = await engine.propose(EXECUTOR, SP, 171.0, reason="", idempotency_key="batch-42")
    assert again.status == "rejected" and "duplicate" in reasons(again)

    await hold_hot(rig, engine)  # a new episode, within 600 s of the policy's write
    # The rate limit outlived the restart: the episode waits for it instead of proposing.
    assert [r for r in engine.recent() if r.proposal.policy == DRIFT] == []

    with pytest.raises(ProposalNotFoundError):
        engine.get(waiting.id)
    rejected = [e for e in await rig.audit(waiting.id) if e["action"] == "approval.rejected"]
    assert len(rejected) == 1 and rejected[0]["decision"] == "expired"
    assert "restarted" in rejected[0]["reason"]
    assert [v for _, v in rig.device.writes] == [174.9, 172.0]
    assert AuditLog(rig.control).verify().ok

    await rig.restart()  # the rejection was recorded: a second restart rejects nothing more
    engine = await rig.start([drift])
    again_rejected = [e for e in await rig.audit(waiting.id) if e["action"] == "approval.rejected"]
    assert len(again_rejected) == 1


def with_gain(policy: Policy, gain: dict[str, Any]) -> Policy:
    model = policy.simulation.model
    assert isinstance(model, FopdtModel)
    return few_paths(policy, model=FopdtModel.model_validate({**model.model_dump(), "gain": gain}))


# -- 9. an uncertain model ------------------------------------------------------------------------


async def test_an_uncertain_model_waits_for_a_person(rig: Rig, drift: Policy) -> None:
    # The heater's efficiency known only to a factor of 15: some paths overshoot below 180.
    uncertain = with_gain(drift, {"dist": "uniform", "lo": 0.2, "hi": 3.0})
    rig.oven(temperature=180.0)
    engine = await rig.start([uncertain])
    await hold_hot(rig, engine)
    record = one(engine.recent())
    assert record.status in ("pending_approval", "pending_analysis"), record.to_json()
    assert rig.device.writes == []
    shown = record.to_json()
    breakdown = shown["confidence_breakdown"]
    assert breakdown["p_sim"] < 0.9 and breakdown["paths"] == PATHS
    assert set(breakdown) >= {"quality", "record", "agreement", "paths_ok"}
    assert shown["confidence"] == pytest.approx(breakdown["p_sim"])  # every other factor is 1
    assert shown["simulation"]["paths_improved"] < PATHS
