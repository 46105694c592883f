"""The engine's safety properties over random policies, limits, plants and proposal sequences.

Whatever arrives — a policy firing (with values in and out of range, NaN, repeated episodes), a
person's or an agent's proposal (numbers, NaN, infinities, text; repeated idempotency keys), an
approval, a rejection, a rollback, an expiry, the clock moving, the PLC refusing, ignoring or
dropping writes, an operator moving the setpoint at the HMI — the device's own write log shows:

- nothing written outside the point's configured range, nor, for a policy's write, outside the
  policy's bounds;
- no policy write further than `max_step` from the value the device held;
- no more than `max_writes` policy writes in any `per_s` window;
- no idempotency key executed twice.

The simulation is a stub with a random success share: the property is about limits, not the
model. The engine's coroutines are driven directly on one event loop; the twin store is a real
one, shared by the examples (each sets the values it starts from) on a clock that only moves on.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tests_support import FakeClock

from drivers.contract import Quality, Sample
from drivers.errors import DeviceResponseError, NotConnectedError, WriteVerifyError
from gateway.auth.rbac import Grant, Principal
from gateway.config.load import load_config
from gateway.devices import point_defs
from gateway.errors import GatewayError
from gateway.policy.engine import PolicyEngine, ProposalRecord
from gateway.policy.expr import parse
from gateway.policy.load import load_policies
from gateway.policy.model import Approval, Bounds, Policy, RateLimit
from gateway.sim.results import SimResult
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore

ROOT = Path(__file__).parents[2]
SP = "line1/oven1/heater_setpoint"
TEMP = "line1/oven1/temperature"
WANT = "line1/oven1/ambient"  # the point the random policy's value is read from
DRIFT = "oven-overtemp-drift"
STUB_PATHS = 20

SUPERVISOR = Principal(name="sam", kind="user", grants=(Grant(role="supervisor"),))
EXECUTOR = Principal(name="eve", kind="user", grants=(Grant(role="executor"),))
AGENT = Principal(name="bot", kind="token", grants=(Grant(role="agent"),))

# What a device write is, for the checks: set by the driver of each step, inherited by the
# tasks the engine spawns (a policy's proposal runs in one).
STEP: contextvars.ContextVar[str] = contextvars.ContextVar("step", default="?")


@dataclass(frozen=True)
class Write:
    ts: float
    value: Any
    held_before: Any
    step: str  # policy, person, rollback; restore: the engine undoing a write that failed
    failed: bool


class Device:
    """The PLC: holds the setpoint, logs every write with what it held, and fails on demand."""

    def __init__(self, store: TwinStore, clock: FakeClock) -> None:
        self.store, self.clock = store, clock
        self.held: Any = None
        self.log: list[Write] = []
        self.down = False
        self.plc_range: tuple[float, float] | None = None
        self.ignore_above: float | None = None
        self.steps = 0  # which step of the plan is running
        self.last_step = -1

    def set(self, value: Any) -> None:
        self.held = value
        self.store.ingest([Sample(SP, value, Quality.GOOD)])

    async def write(self, point: str, value: float) -> Any:
        assert point == SP
        before = self.held
        failure: Exception | None = None
        if self.down:
            failure = NotConnectedError("oven-plc: not connected (connection refused)")
        elif self.plc_range and not self.plc_range[0] <= value <= self.plc_range[1]:
            failure = DeviceResponseError(f"oven-plc: refused to write {value!r}: BadOutOfRange")
        elif self.ignore_above is not None and value > self.ignore_above:
            failure = WriteVerifyError(f"oven-plc: wrote {value:g} but read back {before!r}")
        # The engine's one write after a failed one, in the same step, is its restore.
        last = self.log[-1] if self.log else None
        restore = (
            last is not None
            and last.failed
            and last.step == STEP.get()
            and self.steps == self.last_step
        )
        self.last_step = self.steps
        kind = "restore" if restore else STEP.get()
        self.log.append(Write(self.clock(), value, before, kind, failure is not None))
        await asyncio.sleep(0)
        if failure is not None:
            raise failure
        self.set(value)
        return value


class StubSimulation:
    """A SimResult whose share of successful paths is the next of `shares`."""

    def __init__(self, shares: list[float]) -> None:
        self.shares = shares or [1.0]
        self.calls = 0

    def __call__(self, scenario: Any, **_: Any) -> SimResult:
        share = self.shares[self.calls % len(self.shares)]
        self.calls += 1
        ok = round(share * STUB_PATHS)
        # Safe paths end on 180 (better than the 185 now); the others break a constraint.
        first = np.array([[-1] * ok + [3] * (STUB_PATHS - ok)], dtype=np.int32)
        kpis = np.full((1, 4, STUB_PATHS), 180.0)
        return SimResult(
            times=np.ones(1),
            output_percentiles=np.zeros((1, 6, 1)),
            constraints=[],
            kpis=[],
            paths_run=STUB_PATHS,
            seed=0,
            backend="stub",
            path_kpis=kpis,
            path_first_violation=first,
        )


@dataclass
class World:
    """What the module's examples share: one loop, one twin store, one clock, the site."""

    runner: asyncio.Runner
    store: TwinStore
    clock: FakeClock
    points: dict[str, PointDef]
    drift: Policy


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    site = load_config(ROOT / "gateway" / "demo" / "site.yaml")
    points = {p.id: p for p in point_defs(site)}
    drift = load_policies(ROOT / "policies", site).get(DRIFT)
    assert drift is not None
    clock = FakeClock()
    store = TwinStore(
        tmp_path_factory.mktemp("props") / "twin.db", list(points.values()), clock=clock
    )
    store.open()
    store.ingest(
        [
            Sample(TEMP, 185.0, Quality.GOOD),
            Sample("line1/oven1/running", True, Quality.GOOD),
            Sample("line1/oven1/mode", "AUTO", Quality.GOOD),
        ]
    )
    with asyncio.Runner() as runner:
        yield World(runner, store, clock, points, drift)
    store.close()


# -- the random world -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    lo: float
    hi: float
    bounds: tuple[float, float]
    max_step: float
    max_writes: int
    per_s: float
    expiry_s: float
    key: str

    def at(self, where: tuple[str, float]) -> float:
        """A value the device may hold, from its draw: mostly inside the policy's bounds,
        sometimes up to a step outside them (never outside the point's range)."""
        kind, u = where
        a, b = self.bounds
        if kind == "around":
            a, b = max(self.lo, a - self.max_step), min(self.hi, b + self.max_step)
        return a + u * (b - a)

    def value(self, drawn: tuple[str, float], held: float) -> Any:
        """A value to propose, from its draw."""
        kind, x = drawn
        if kind == "step":  # from what the device holds, in max steps: limits bite around ±1
            return held + x * self.max_step
        if kind == "anywhere":  # half the range either side of it
            return self.lo + x * (self.hi - self.lo)
        return [self.lo, self.hi, *self.bounds, math.nan, math.inf, -math.inf, "175", None][int(x)]


# Every number is drawn normalised and placed by Limits when the step runs: the strategies are
# built once, not per example (building them per example took half of the module's time).
UNIT = st.floats(0, 1)
FRACTION = st.one_of(
    st.sampled_from([0.95, -0.95, 1.05, -1.05, 1.9, -1.9, 0.5, -0.5, 0.0]),
    st.sampled_from([0.95, -0.95, 1.05, -1.05]),
    st.floats(-2, 2),
)
STEP_VALUE = st.tuples(st.just("step"), FRACTION)
VALUE = st.one_of(
    STEP_VALUE,
    STEP_VALUE,
    STEP_VALUE,
    st.tuples(st.just("anywhere"), st.floats(-0.5, 1.5)),
    st.tuples(st.just("special"), st.integers(0, 6).map(float)),  # lo, hi, bounds, NaN, ±inf
)
PERSON_VALUE = st.one_of(VALUE, st.tuples(st.just("special"), st.sampled_from([7.0, 8.0])))
WHERE = st.one_of(*[st.tuples(st.just("inside"), UNIT)] * 3, st.tuples(st.just("around"), UNIT))
INDEX = st.integers(0, 7)
FIRE = st.tuples(st.just("fire"), VALUE, st.integers(0, 3))  # value, episode

POLICY_STEPS = st.one_of(  # a policy firing, approved or not, through outages and an operator
    FIRE,
    FIRE,
    st.tuples(st.just("approve"), INDEX),
    st.tuples(st.just("advance"), st.sampled_from([0.0, 1.0, 10.0, 30.0, 121.0])),
    st.tuples(st.just("hmi"), WHERE),
    st.tuples(st.just("down"), st.booleans()),
)
STEPS = st.one_of(  # everything that can happen to the point
    FIRE,
    FIRE,
    st.tuples(
        st.just("propose"),
        st.sampled_from(["executor", "agent"]),
        PERSON_VALUE,
        st.sampled_from([None, "k1", "k2"]),
    ),
    st.tuples(st.just("approve"), INDEX),
    st.tuples(st.just("approve"), INDEX),
    st.tuples(st.just("reject"), INDEX),
    st.tuples(st.just("rollback"), INDEX),
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.5, 1.0, 10.0, 29.9, 30.0, 121.0])),
    st.tuples(st.just("advance"), st.sampled_from([30.0, 121.0])),
    st.tuples(st.just("hmi"), WHERE),
    st.tuples(st.just("down"), st.booleans()),  # the PLC unreachable, or back
    # The PLC's own limits (refused: BadOutOfRange) and a level above which it ignores writes.
    st.tuples(st.just("plc"), st.none() | st.tuples(UNIT, UNIT), st.none() | st.none() | UNIT),
)


@st.composite
def limits(draw: st.DrawFn) -> Limits:
    lo = draw(st.sampled_from([0.0, -50.0, 100.0]))
    hi = lo + draw(st.sampled_from([10.0, 100.0, 300.0]))
    a, b = sorted(draw(st.lists(st.floats(lo, hi), min_size=2, max_size=2, unique=True)))
    step = draw(st.one_of(st.sampled_from([0.1, 0.3, 0.5, 1.0]), st.floats(0.01, 2)))
    return Limits(
        lo,
        hi,
        (a, b),
        max_step=(b - a) * step,
        max_writes=draw(st.integers(1, 3)),
        per_s=draw(st.sampled_from([1.0, 30.0, 120.0])),
        expiry_s=draw(st.sampled_from([5.0, 60.0, 900.0])),
        key=draw(st.sampled_from(["{policy}:{episode}", "{policy}:{episode}:{value}", "{policy}"])),
    )


Scenario = tuple[Limits, list[tuple[Any, ...]], list[float], float]


def scenarios(steps: st.SearchStrategy[tuple[Any, ...]]) -> st.SearchStrategy[Scenario]:
    """Limits, a plan of 8 to 30 steps, the simulation's success shares, where the PLC starts."""
    return st.tuples(
        limits(),
        st.lists(steps, min_size=8, max_size=30),
        st.lists(st.sampled_from([1.0, 0.9, 0.75, 0.5, 0.0]), min_size=1, max_size=5),
        WHERE,
    ).map(lambda t: (t[0], t[1], t[2], t[0].at(t[3])))


def random_policy(drift: Policy, lim: Limits) -> Policy:
    action = drift.action.model_copy(
        update={
            "value": parse("want"),
            "bounds": Bounds(lo=lim.bounds[0], hi=lim.bounds[1]),
            "max_step": lim.max_step,
            "rate_limit": RateLimit(max_writes=lim.max_writes, per_s=lim.per_s),
            "idempotency_key": lim.key,
            "interlocks": [],
        }
    )
    return drift.model_copy(
        update={
            "points": {**drift.points, "want": WANT},
            "action": action,
            "approval": Approval(roles=["supervisor"], expiry_s=lim.expiry_s),
        }
    )


# -- the property ---------------------------------------------------------------------------------


@dataclass
class Run:
    world: World
    lim: Limits
    engine: PolicyEngine
    policy: Policy
    device: Device

    async def settle(self) -> None:
        while self.engine._tasks:
            await asyncio.gather(*list(self.engine._tasks), return_exceptions=True)

    def records(self, *statuses: str) -> list[ProposalRecord]:
        return [r for r in self.engine.proposals.values() if r.status in statuses]

    async def step(self, step: tuple[Any, ...]) -> None:
        kind = step[0]
        self.device.steps += 1
        engine, clock = self.engine, self.world.clock
        if kind == "fire":
            _, drawn, episode = step
            value = self.lim.value(drawn, self.device.held)
            STEP.set("policy")
            self.world.store.ingest([Sample(WANT, value, Quality.GOOD)])
            engine._fire(self.policy, 1_700_000_000.0 + episode, "test", clock())
            await self.settle()
        elif kind == "propose":
            _, who, drawn, key = step
            STEP.set("person")
            principal = EXECUTOR if who == "executor" else AGENT
            value = self.lim.value(drawn, self.device.held)
            await engine.propose(principal, SP, value, reason="test", idempotency_key=key)
        elif kind in ("approve", "reject", "rollback"):
            wanted = (
                ("succeeded",) if kind == "rollback" else ("pending_approval", "pending_analysis")
            )
            found = self.records(*wanted)
            if not found:
                return
            record = found[step[1] % len(found)]
            STEP.set(
                "rollback"
                if kind == "rollback"
                else ("policy" if record.proposal.policy else "person")
            )
            try:
                if kind == "approve":
                    await engine.approve(SUPERVISOR, record.id)
                elif kind == "reject":
                    await engine.reject(SUPERVISOR, record.id)
                else:
                    await engine.rollback(SUPERVISOR, record.id)
            except GatewayError:
                pass  # a rollback the device refuses, or with nothing to restore: said, not done
        elif kind == "advance":
            clock.advance(step[1])
            engine._expire(clock())
        elif kind == "hmi":
            clock.advance(0.001)  # an operator's change arrives after what the engine saw
            self.device.set(self.lim.at(step[1]))
        elif kind == "down":
            self.device.down = step[1]
        elif kind == "plc":
            _, accepts, ignore = step
            lim = self.lim
            self.device.plc_range = None
            if accepts is not None:
                lo = lim.lo + accepts[0] * (lim.hi - lim.lo)
                self.device.plc_range = (lo, lo + accepts[1] * (lim.hi - lim.lo))
            self.device.ignore_above = (
                None if ignore is None else lim.lo + ignore * (lim.hi - lim.lo)
            )


def check(run: Run, lim: Limits) -> None:
    """The four properties, from the device's own write log."""
    log = run.device.log
    for w in log:
        assert isinstance(w.value, float) and math.isfinite(w.value), w
        assert lim.lo <= w.value <= lim.hi, f"outside the point's range {lim}: {w}"
    policy_writes = [w for w in log if w.step == "policy"]
    for w in policy_writes:
        lo, hi = lim.bounds
        assert lo <= w.value <= hi, f"outside the policy's bounds {lim.bounds}: {w}"
        step = abs(w.value - w.held_before)
        assert step <= lim.max_step * (1 + 1e-9), f"step {step:g} > max_step {lim.max_step:g}: {w}"
    times = [w.ts for w in policy_writes]
    for j, t in enumerate(times):
        in_window = [u for u in times[: j + 1] if u > t - lim.per_s]
        assert len(in_window) <= lim.max_writes, f"{len(in_window)} in {lim.per_s:g} s: {times}"
    # Every write of a proposal, attempted or done, is one of these (the engine times it).
    executed = [r for r in run.engine.proposals.values() if "write" in r.timings_ms]
    assert len(executed) == len([w for w in log if w.step in ("policy", "person")])
    keys = [r.proposal.idempotency_key for r in executed]
    assert len(keys) == len(set(keys)), f"a key executed twice: {sorted(keys)}"


def examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@examples(1000)
@given(scenario=scenarios(STEPS))
def test_nothing_unsafe_is_ever_written(world: World, scenario: Scenario) -> None:
    play_and_check(world, scenario)


# A write that fails while the PLC is unreachable, then a step measured from the value it did
# not take, needs several steps in one order: more examples of fewer kinds of step find it.
@examples(1500)
@given(scenario=scenarios(POLICY_STEPS))
def test_policy_writes_keep_their_limits_through_outages_and_approvals(
    world: World, scenario: Scenario
) -> None:
    play_and_check(world, scenario)


def play_and_check(world: World, scenario: Scenario) -> None:
    lim, plan, shares, start = scenario
    points = dict(world.points)
    points[SP] = dataclasses.replace(points[SP], lo=lim.lo, hi=lim.hi)
    policy = random_policy(world.drift, lim)
    device = Device(world.store, world.clock)
    world.clock.advance(10_000)  # past every window of the previous example
    device.set(start)
    world.store.ingest([Sample(TEMP, 185.0, Quality.GOOD)])
    engine = PolicyEngine(
        [policy],
        points,
        world.store,
        device.write,
        clock=world.clock,
        simulate=StubSimulation(shares),
    )
    run = Run(world, lim, engine, policy, device)

    async def play() -> None:
        for step in plan:
            await run.step(step)
        await run.settle()

    world.runner.run(play())
    note_what_happened(run)
    check(run, lim)


def note_what_happened(run: Run) -> None:
    """What the example exercised, for `pytest --hypothesis-show-statistics`."""
    kinds = [w.step for w in run.device.log]
    for kind in ("policy", "person", "restore", "rollback"):
        event(f"{kind} writes: {min(2, kinds.count(kind))}")
    for status in sorted({r.status for r in run.engine.proposals.values()}):
        event(f"a proposal {status}")
