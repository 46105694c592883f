"""Decision quality in closed loop: the shipped policies against a threshold rule and against
doing nothing, on the simulated plant, scenario by scenario.

    .venv/bin/python bench/closed_loop.py [--quick] [--seeds N] [--only NAME ...] [--speed X]

Each scenario is a disturbance plant engineers meet (the hall warming up, a heater wearing, a
door opened to load a batch, an inflow surge, a level transmitter stuck reading high, a noisy
one, a heater nearing the end of its life), run three times on the same seed:

- **none**: nobody acts;
- **rule**: the rule people write today, in the PLC: every scan (each plant step), if the
  reading is past a limit and the last step was `cooldown_s` ago, step the setpoint by a fixed
  amount, within the same bounds the policy has. It reads what the transmitter reports;
- **policy**: the real `Gateway` with the shipped policies for that device, unchanged: the
  simulated PLC served over its real protocol (OPC UA for the oven, Modbus TCP for the tank),
  the real driver, the twin, the anomaly detectors, the policy engine, its Monte Carlo
  simulation and gate, and a verified write back through the driver.

Time. The plant is stepped by this script, `--dt` plant seconds at a time (2 s), and the
process's `time.time()` is the plant's clock (`PlantClock`, installed before the gateway is
imported): every timestamp, trigger hold, rate limit, approval expiry and anomaly window in the
gateway runs in plant seconds, so the shipped policies run as written, only faster (the
gateway's log is stamped in plant time too). Between steps the script waits `--dt`/`--speed`
wall seconds (10 ms) for the drivers to read the plant, and while the policy engine is deciding
or writing it does not step the plant at all: a decision takes no plant time, as ~0.1 s against
a 2-minute oven is nearly none. asyncio's own clock (poll intervals, timeouts) stays the wall's,
except that the engine's trigger timer and the anomaly watch's checks are made to run once a
plant second, as they would on a real-time plant (`plant_timers`). The drivers read every few
plant seconds; which
step a reading lands on depends on the machine's scheduling, so figures of the policy runs
move a little between runs of the same seed, while `none` and `rule` are bit-identical.

What is measured, per run, on the plant's true state (not on what a faulty sensor reports):
in-spec share of time (the scenario's spec band), hard-limit violations (entries outside the
hard band, and the time spent there), writes the device received, approval requests (a
proposal the gate sent to a person: counted as never approved, the worst case for the
gateway), writes made while the scenario's sensor fault is on (false actions on a bad sensor),
and the time from the disturbance to the first write. Targets (issue 20), for the policy
controller on every scenario: 0 violations, 0 writes on a bad sensor, in spec >= 99 %,
out-of-spec time >= 50 % below the rule's, <= 1 approval request per simulated hour.

The table prints each scenario's three runs; the last line is one JSON object of the figures.
"""

from __future__ import annotations

# The plant's clock must be the process's before anything reads time.time for a default
# argument (PolicyEngine's clock=time.time, the anomaly watch's): install it first.
import time

_WALL_TIME = time.time


class PlantClock:
    """`time.time()` for this process: the wall time at start plus the plant seconds stepped."""

    def __init__(self) -> None:
        self.base = _WALL_TIME()
        self.plant_s = 0.0

    def __call__(self) -> float:
        return self.base + self.plant_s


CLOCK = PlantClock()
time.time = CLOCK

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Literal, cast  # noqa: E402

import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import log_to_file  # noqa: E402
from drivers.contract import Quality  # noqa: E402
from gateway.app import Gateway  # noqa: E402
from gateway.config import load_config  # noqa: E402
from gateway.demo import SHIPPED_POLICIES, demo_config_data  # noqa: E402
from gateway.policy import engine as engine_module  # noqa: E402
from gateway.policy import watch as watch_module  # noqa: E402
from plantsim import OvenDevice, OvenParams, TankDevice, TankParams  # noqa: E402
from plantsim.device_base import Device  # noqa: E402

log = logging.getLogger("bench.closed_loop")

Controller = Literal["none", "rule", "policy"]
CONTROLLERS: tuple[Controller, ...] = ("none", "rule", "policy")
DT_S = 2.0
SPEED = 200.0  # plant seconds per wall second while nothing is being decided
DEVICE_NAMES = {"oven": "oven-plc", "tank": "tank1"}
MEASURED_POINT = {"oven": "line1/oven1/temperature", "tank": "utilities/cooling/tank1/level"}
OVEN_WRITABLE = "heater_setpoint"
TRANSMITTER_NOISE_M = 0.001
NOISY_SIGMA_M = 0.25
EOL_MARGIN = 0.005  # heater wear below 0.8 at the start of the end-of-life scenario
TANK_WRITABLE = "valve_pct"

# -- what a scenario is ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Band:
    """An inclusive range of the measured variable."""

    lo: float
    hi: float

    def holds(self, x: float) -> bool:
        return self.lo <= x <= self.hi

    def text(self, unit: str) -> str:
        return f"{self.lo:g}..{self.hi:g} {unit}"


@dataclass(frozen=True)
class Rule:
    """A fixed threshold rule: past `high`, step the setpoint down by `step`; below `low`, up."""

    signal: str  # what the rule reads (as the device reports it)
    write: str  # the model's writable signal it steps
    setpoint: str  # the served signal holding the setpoint now
    high: float | None
    low: float | None
    step: float
    lo: float  # it never writes outside these (the policy's bounds)
    hi: float
    cooldown_s: float


# What a scenario does to its device (an OvenDevice or a TankDevice), at plant time t.
Disturb = Callable[[float, Any], None]


@dataclass(frozen=True)
class Scenario:
    """A disturbance, the spec it is judged by, and the controllers' configuration."""

    name: str
    device: Literal["oven", "tank"]
    what: str
    duration_s: float
    disturbance_s: float  # when the disturbance begins (for the time to the first action)
    measure: str  # the model attribute judged (the true value, never the reported one)
    unit: str
    spec: Band
    hard: Band
    policies: tuple[str, ...]
    rule: Rule
    disturb: Disturb
    setup: Callable[[Any], None] = lambda device: None
    params: OvenParams | TankParams | None = None
    # When the sensor is faulty (a write then is a false action), as plant seconds.
    sensor_fault: tuple[float, float] | None = None
    # A spec that is not a band of `measure` (maintenance): True while in spec.
    in_spec: Callable[[Any], bool] | None = None
    spec_text: str = ""


def oven_band() -> tuple[Band, Band]:
    # The cure: the plant counts a batch within ±5 °C of 180 (OvenParams.batch_band_c); the
    # shipped policies' simulations keep it inside 170..190 °C, the hard band.
    return Band(175.0, 185.0), Band(170.0, 190.0)


def tank_band() -> tuple[Band, Band]:
    # The tank's own alarms (TankParams.high_alarm_m, low_alarm_m) are the spec; its float
    # switches (4.8 m: overflow, 0.2 m: the pump runs dry) are the hard limits.
    return Band(0.5, 4.5), Band(0.2, 4.8)


OVEN_RULE = Rule(
    signal="temperature",
    write=OVEN_WRITABLE,
    setpoint="heater_setpoint",
    high=183.0,
    low=177.0,
    step=3.0,
    lo=160.0,
    hi=200.0,
    cooldown_s=120.0,
)
TANK_RULE = Rule(
    signal="level",
    write=TANK_WRITABLE,
    setpoint="valve_pct",
    high=4.2,
    low=0.8,
    step=15.0,
    lo=10.0,
    hi=90.0,
    cooldown_s=60.0,
)
WEAR_RULE = Rule(
    signal="heater_wear",
    write=OVEN_WRITABLE,
    setpoint="heater_setpoint",
    high=0.8,
    low=None,
    step=5.0,
    lo=170.0,
    hi=200.0,
    cooldown_s=300.0,
)
OVEN_POLICIES = ("oven-heater-wear", "oven-overtemp-drift", "oven-undertemp-drift")
TANK_POLICIES = ("tank-level-high",)


def ramp(t: float, start: float, end: float) -> float:
    """0 before `start`, 1 after `end`, linear between."""
    if t <= start:
        return 0.0
    return min(1.0, (t - start) / (end - start))


def scenarios(quick: bool) -> list[Scenario]:
    """Every scenario; `quick` shortens them (and their disturbances) for the test."""
    oven_spec, oven_hard = oven_band()
    tank_spec, tank_hard = tank_band()
    h = 3600.0
    scale = 0.25 if quick else 1.0

    # The hall warms by 12 °C over two hours (a summer afternoon), then stays warm.
    drift_start, drift_end = 900.0 * scale, (900.0 + 2 * h) * scale

    def drift(t: float, d: OvenDevice) -> None:
        d.model.ambient_offset_c = 12.0 * ramp(t, drift_start, drift_end)

    # A door opened for a minute to load a batch, every half hour.
    door_every, door_open_s, door_first = 1800.0, 60.0, 600.0

    def door(t: float, d: OvenDevice) -> None:
        d.model.door_open = t >= door_first and (t - door_first) % door_every < door_open_s

    # An upstream pump starting: 60 % more inflow at the same valve position, for an hour.
    surge_start, surge_end = 1200.0 * scale, (1200.0 + h) * scale
    surge_params = TankParams()
    base_inflow = surge_params.inflow_max_m3h

    def surge(t: float, d: TankDevice) -> None:
        factor = 1.6 if surge_start <= t < surge_end else 1.0
        if d.model.params.inflow_max_m3h != base_inflow * factor:
            d.model.params = replace(d.model.params, inflow_max_m3h=base_inflow * factor)

    stuck_at = 1200.0 * scale

    def stuck(t: float, d: TankDevice) -> None:
        if t >= stuck_at and "freeze" not in d.faults.active():
            d.faults.freeze("level", value=4.4)  # fouled transmitter: reads high, stays there

    noisy_from = 600.0 * scale

    def noisy(t: float, d: TankDevice) -> None:
        sigmas = cast(dict[str, float], d.faults.active().get("noise", {}))
        if t >= noisy_from and sigmas.get("level") != NOISY_SIGMA_M:
            d.faults.noise("level", NOISY_SIGMA_M)  # a failing transmitter's cable picking up noise

    def tank_at(valve: float, level: float) -> Callable[[TankDevice], None]:
        def setup(d: TankDevice) -> None:
            d.model.valve_pct = valve
            d.model.level_m = level
            # A real level transmitter jitters by a millimetre or so; the simulated tank has no
            # noise, and a settled tank's quiet feed would look like a stuck one (and a stuck
            # one's jump like a slow rise: see site_data's rate_of_change).
            d.faults.noise("level", TRANSMITTER_NOISE_M)

        return setup

    def worn(wear: float) -> Callable[[OvenDevice], None]:
        def setup(d: OvenDevice) -> None:
            d.model.heater_wear = wear

        return setup

    # The heater's life at full power, and when its wear crosses 0.8 from 0.8 - EOL_MARGIN at a
    # 180 °C cure's power (OvenModel: wear grows by power/100 per wear_full_power_h hours).
    eol_life_h = 22.5 * scale
    cure_power = (180.0 - OvenParams.ambient_c) / OvenParams.heater_gain_c
    eol_crossing_s = EOL_MARGIN * eol_life_h * 3600.0 / cure_power

    def derated(d: OvenDevice) -> bool:
        # The maintenance policy's own spec: past 80 % wear the cure runs derated (<= 170 °C).
        return not (d.model.heater_wear > 0.8 and d.model.heater_setpoint_c > 170.0)

    return [
        Scenario(
            name="oven/ambient-drift",
            device="oven",
            what="hall warms 12 °C over 2 h, then stays warm",
            duration_s=4 * h * scale,
            disturbance_s=drift_start,
            measure="temperature_c",
            unit="°C",
            spec=oven_spec,
            hard=oven_hard,
            policies=OVEN_POLICIES,
            rule=OVEN_RULE,
            disturb=drift,
        ),
        Scenario(
            name="oven/heater-wear",
            device="oven",
            what="heater efficiency falls ~4 °C of cure an hour (wear sped up 55x)",
            duration_s=4 * h * scale,
            disturbance_s=0.0,
            measure="temperature_c",
            unit="°C",
            spec=oven_spec,
            hard=oven_hard,
            policies=OVEN_POLICIES,
            rule=OVEN_RULE,
            disturb=lambda t, d: None,
            params=OvenParams(wear_full_power_h=4.5 / (4.0 if quick else 1.0)),
        ),
        Scenario(
            name="oven/door-open",
            device="oven",
            what="door open 60 s every 30 min (loading a batch)",
            duration_s=(1.25 if quick else 3) * h,
            disturbance_s=door_first,
            measure="temperature_c",
            unit="°C",
            spec=oven_spec,
            hard=oven_hard,
            policies=OVEN_POLICIES,
            rule=OVEN_RULE,
            disturb=door,
        ),
        Scenario(
            name="oven/heater-end-of-life",
            device="oven",
            what="heater wear crosses 80 % (Weibull maintenance policy)",
            duration_s=2 * h * scale,
            disturbance_s=eol_crossing_s,
            measure="temperature_c",
            unit="°C",
            spec=Band(160.0, 200.0),
            hard=Band(160.0, 200.0),
            policies=OVEN_POLICIES,
            rule=WEAR_RULE,
            disturb=lambda t, d: None,
            # An element that keeps its output until it breaks (no efficiency loss), worn
            # 0.02 an hour at 180 °C: it crosses 0.8 fifteen minutes in.
            params=OvenParams(wear_loss=0.0, wear_full_power_h=eol_life_h),
            setup=worn(0.8 - EOL_MARGIN),
            in_spec=derated,
            spec_text="setpoint <= 170 °C once wear > 0.8",
        ),
        Scenario(
            name="tank/inflow-surge",
            device="tank",
            what="inflow +60 % for an hour at the same valve position",
            duration_s=3 * h * scale,
            disturbance_s=surge_start,
            measure="level_m",
            unit="m",
            spec=tank_spec,
            hard=tank_hard,
            policies=TANK_POLICIES,
            rule=TANK_RULE,
            disturb=surge,
            setup=tank_at(50.0, 2.5),
        ),
        Scenario(
            name="tank/stuck-sensor",
            device="tank",
            what="level transmitter sticks reading 4.4 m (true level 2.5 m)",
            duration_s=2 * h * scale,
            disturbance_s=stuck_at,
            measure="level_m",
            unit="m",
            spec=tank_spec,
            hard=tank_hard,
            policies=TANK_POLICIES,
            rule=TANK_RULE,
            disturb=stuck,
            setup=tank_at(50.0, 2.5),
            sensor_fault=(stuck_at, math.inf),
        ),
        Scenario(
            name="tank/noisy-sensor",
            device="tank",
            what="level reads with ±0.25 m noise (sigma) around a true 3.6 m",
            duration_s=2 * h * scale,
            disturbance_s=noisy_from,
            measure="level_m",
            unit="m",
            spec=tank_spec,
            hard=tank_hard,
            policies=TANK_POLICIES,
            rule=TANK_RULE,
            disturb=noisy,
            setup=tank_at(60.0, 3.6),
            sensor_fault=(noisy_from, math.inf),
        ),
    ]


# -- one run --------------------------------------------------------------------------------------


@dataclass
class Run:
    """The figures of one controller on one scenario and seed."""

    scenario: str
    controller: Controller
    seed: int
    duration_s: float
    in_spec_s: float = 0.0
    outside_hard_s: float = 0.0
    violations: int = 0
    writes: int = 0
    approvals: int = 0
    bad_sensor_writes: int = 0
    first_action_s: float | None = None
    decisions: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    readings: int = 0  # twin changes of the measured point (policy runs)

    @property
    def in_spec(self) -> float:
        return self.in_spec_s / self.duration_s

    @property
    def out_of_spec_s(self) -> float:
        return self.duration_s - self.in_spec_s

    @property
    def approvals_per_hour(self) -> float:
        return self.approvals / (self.duration_s / 3600.0)

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "in_spec": round(self.in_spec, 5),
            "in_spec_s": round(self.in_spec_s, 1),
            "out_of_spec_s": round(self.out_of_spec_s, 1),
            "outside_hard_s": round(self.outside_hard_s, 1),
            "approvals_per_hour": round(self.approvals_per_hour, 3),
            "wall_s": round(self.wall_s, 2),
            "cpu_s": round(self.cpu_s, 2),
        }


def make_device(scenario: Scenario, seed: int) -> Device:
    """The scenario's plant, standing still until the loop steps it (tick_hz 0)."""
    device: Device
    if scenario.device == "oven":
        params = scenario.params if isinstance(scenario.params, OvenParams) else None
        device = OvenDevice(seed=seed, params=params, speed=0.0, tick_hz=0.0)
    else:
        tparams = scenario.params if isinstance(scenario.params, TankParams) else None
        device = TankDevice(seed=seed, params=tparams, speed=0.0, tick_hz=0.0)
    scenario.setup(device)
    device.refresh()
    return device


class Plant:
    """The loop's view of a device: steps it, judges its true state, counts the writes."""

    def __init__(self, scenario: Scenario, device: Device, run: Run) -> None:
        self.scenario = scenario
        self.device = device
        self.run = run
        self.t = 0.0
        self._outside = False
        model_write = device.model.write

        def counted(signal: str, value: Any) -> None:
            # Every write the plant receives, from the rule or through the gateway's driver
            # (a policy's write, or its restore of the previous value after a failed one).
            # The model serves its writable signals under the names it takes them by.
            before = device.model.signals().get(signal)
            model_write(signal, value)
            if device.model.signals().get(signal) != before:
                self.note_write()

        device.model.write = counted  # type: ignore[method-assign]

    def note_write(self) -> None:
        run, sc = self.run, self.scenario
        run.writes += 1
        if run.first_action_s is None and self.t >= sc.disturbance_s:
            run.first_action_s = round(self.t - sc.disturbance_s, 1)
        fault = sc.sensor_fault
        if fault is not None and fault[0] <= self.t < fault[1]:
            run.bad_sensor_writes += 1

    def step(self, dt: float) -> None:
        self.scenario.disturb(self.t, self.device)
        self.device.advance(dt)
        self.t += dt
        self._judge(dt)

    def _judge(self, dt: float) -> None:
        sc, run = self.scenario, self.run
        x = float(getattr(self.device.model, sc.measure))
        ok = sc.in_spec(self.device) if sc.in_spec is not None else sc.spec.holds(x)
        if ok:
            run.in_spec_s += dt
        outside = not sc.hard.holds(x)
        if outside:
            run.outside_hard_s += dt
            if not self._outside:
                run.violations += 1
        self._outside = outside


class RuleController:
    """The fixed threshold rule, scanned each plant step on what the device reports."""

    def __init__(self, rule: Rule, device: Device) -> None:
        self.rule = rule
        self.device = device
        self.last = -math.inf

    def scan(self, t: float) -> None:
        r = self.rule
        if t - self.last < r.cooldown_s:
            return
        reading = float(self.device.served[r.signal])
        current = float(self.device.served[r.setpoint])
        if r.high is not None and reading > r.high:
            target = max(r.lo, current - r.step)
        elif r.low is not None and reading < r.low:
            target = min(r.hi, current + r.step)
        else:
            return
        if target != current:
            self.device.model.write(r.write, target)
            self.device.refresh()
            self.last = t


def cpu_s() -> float:
    return time.process_time()


def run_offline(scenario: Scenario, controller: Controller, seed: int, dt: float) -> Run:
    """`none` and `rule`: the plant alone, stepped as fast as it goes."""
    run = Run(scenario.name, controller, seed, scenario.duration_s)
    device = make_device(scenario, seed)
    plant = Plant(scenario, device, run)
    rule = RuleController(scenario.rule, device) if controller == "rule" else None
    wall, cpu = time.perf_counter(), cpu_s()
    while plant.t < scenario.duration_s - 1e-9:
        plant.step(dt)
        if rule is not None:
            rule.scan(plant.t)
    run.wall_s, run.cpu_s = time.perf_counter() - wall, cpu_s() - cpu
    return run


# -- the policy controller: the real gateway ------------------------------------------------------


def site_data(scenario: Scenario, port: int, state: Path, policies: Path) -> dict[str, Any]:
    """The demo's site config for the scenario's one device, polled fast, with the bench's
    anomaly rules (in plant seconds: this process's clock is the plant's)."""
    name = DEVICE_NAMES[scenario.device]
    data = demo_config_data(device_ports={name: port}, http_port=0, opcua_port=0)
    data["devices"] = [d for d in data["devices"] if d["name"] == name]
    data["storage"]["path"] = str(state / "twin.db")
    data["opcua_server"]["enabled"] = False
    data["policies"] = {"dir": str(policies)}
    data.pop("sync", None)
    device = data["devices"][0]
    if device["driver"] == "modbus":
        device["options"].update(poll_interval_s=0.01, timeout_s=1.0)  # the least it takes
    else:
        device["options"].update(publishing_interval_ms=20, sampling_interval_ms=10)
    # Sensor faults the engine must not act on (gateway/policy/engine.py, SENSOR_FAULT_KINDS):
    # faster than the physics allows is a probe fault. The tank fills at 12.5 mm/s at most
    # (36 m³/h into 0.8 m²); the oven moves ~0.15 °C/s at most, its probe noise ~0.1 °C/s.
    if scenario.device == "tank":
        # Below the transmitter's ~1 mm jitter (TRANSMITTER_NOISE_M), so that a live level
        # sends a sample every few seconds: a rate of change is then measured over seconds,
        # and a silence means a dead transmitter. With the demo's 2 mm the twin kept one
        # sample a minute, and a stuck reading's jump, measured over that minute, looked slow.
        (level,) = [p for p in device["points"] if p["id"] == MEASURED_POINT["tank"]]
        level["deadband"] = TRANSMITTER_NOISE_M / 2
    rules = {
        "tank": {
            "points": [MEASURED_POINT["tank"]],
            "detectors": [
                {"kind": "rate_of_change", "max_rate": 0.05},
                {"kind": "stale", "max_age_s": 20},
            ],
        },
        "oven": {
            "points": ["line1/oven1/temperature"],
            "detectors": [
                {"kind": "rate_of_change", "max_rate": 2.0},
                {"kind": "stale", "max_age_s": 120},
            ],
        },
    }
    data["anomalies"] = {"rules": [rules[scenario.device]]}
    return data


def plant_timers(speed: float) -> None:
    """Run the gateway's own periodic checks once a plant second, as they run once a wall
    second on a plant that runs in real time: the engine's trigger timer (a condition on a
    value that stands still fires when its hold is up) and the anomaly watch's stale and
    flatline checks. Both sleep on asyncio's wall clock; at `speed` x they would otherwise run
    once every `speed` plant seconds and fire that late. Once per process, before any run."""
    engine_module.TICK_S = 1.0 / speed
    base = watch_module.check_interval

    def scaled(detectors: Any) -> float | None:
        seconds = base(detectors)
        return None if seconds is None else seconds / speed

    watch_module.check_interval = scaled


async def run_policy(scenario: Scenario, seed: int, dt: float, speed: float, state: Path) -> Run:
    """`policy`: the plant served on a free port, the gateway reading and writing it."""
    run = Run(scenario.name, "policy", seed, scenario.duration_s)
    device = make_device(scenario, seed)
    plant = Plant(scenario, device, run)
    folder = state / "policies"
    folder.mkdir(parents=True)
    for policy_id in scenario.policies:
        shutil.copy(SHIPPED_POLICIES / f"{policy_id}.yaml", folder)
    async with device:
        path = state / "site.yaml"
        data = site_data(scenario, device.port, state, folder)
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), "utf-8")
        gw = Gateway(load_config(path))
        await gw.start()
        try:
            engine = gw.engine
            assert engine is not None
            measured = MEASURED_POINT[scenario.device]
            readings = 0

            def count(changes: list[Any]) -> None:
                nonlocal readings
                readings += sum(1 for c in changes if c.point_id == measured)

            remove = gw.store.add_listener(count)
            await _until(lambda: _all_good(gw), 30.0, "every point GOOD")
            wall, cpu = time.perf_counter(), cpu_s()
            pause = dt / speed
            while plant.t < scenario.duration_s - 1e-9:
                plant.step(dt)
                CLOCK.plant_s += dt
                await asyncio.sleep(pause)
                # No plant time passes while the engine decides or writes.
                while engine.busy:  # noqa: ASYNC110 - the engine has no event for it
                    await asyncio.sleep(0.002)
            run.wall_s, run.cpu_s = time.perf_counter() - wall, cpu_s() - cpu
            remove()
            run.readings = readings
            for record in engine.recent():
                kind = record.decision.kind if record.decision else record.status
                run.decisions[kind] = run.decisions.get(kind, 0) + 1
                if kind in ("require_approval", "require_analysis"):
                    run.approvals += 1
        finally:
            await gw.stop()
    return run


def _all_good(gw: Gateway) -> bool:
    _, values = gw.store.snapshot()
    return bool(values) and all(v.quality is Quality.GOOD for v in values.values())


async def _until(condition: Callable[[], bool], limit_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError(f"closed loop: {what} not within {limit_s:g} s")
        await asyncio.sleep(0.05)


# -- the table and the figures --------------------------------------------------------------------


def reduction(policy: Run, rule: Run) -> float | None:
    """How much less time out of spec the policy spent than the rule: 1 - policy/rule; None
    when the rule never left spec (nothing to reduce)."""
    if rule.out_of_spec_s <= 0:
        return None
    return 1.0 - policy.out_of_spec_s / rule.out_of_spec_s


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def print_table(cases: list[tuple[Scenario, int, dict[Controller, Run]]]) -> None:
    head = (
        f"{'scenario':<24} {'seed':>4} {'hours':>5} {'ctrl':<6} {'in spec':>8} {'out':>9} "
        f"{'viol':>4} {'writes':>6} {'approvals':>9} {'bad-sensor':>10} {'1st action':>10} "
        f"{'wall s':>7} {'cpu s':>6}"
    )
    print(head)
    print("-" * len(head))
    for scenario, seed, runs in cases:
        for name in CONTROLLERS:
            r = runs[name]
            print(
                f"{scenario.name if name == 'none' else '':<24} "
                f"{seed if name == 'none' else '':>4} "
                f"{scenario.duration_s / 3600 if name == 'none' else '':>5} "
                f"{name:<6} {100 * r.in_spec:>7.2f}% {_fmt_time(r.out_of_spec_s):>9} "
                f"{r.violations:>4} {r.writes:>6} {r.approvals:>9} {r.bad_sensor_writes:>10} "
                f"{_fmt_time(r.first_action_s):>10} {r.wall_s:>7.1f} {r.cpu_s:>6.1f}"
            )
        red = reduction(runs["policy"], runs["rule"])
        spec = scenario.spec_text or f"{scenario.spec.text(scenario.unit)}"
        print(
            f"{'':<24} spec {spec}; hard {scenario.hard.text(scenario.unit)}; "
            f"out-of-spec vs rule: {'-' if red is None else f'{100 * red:+.0f} %'}"
        )


def print_summary(cases: list[tuple[Scenario, int, dict[Controller, Run]]]) -> None:
    """One line per scenario across its seeds: the worst in-spec share of each controller, the
    policy's violations, writes on a faulty sensor and approvals, the least reduction."""
    head = (
        f"{'scenario':<24} {'seeds':>5} {'none min':>9} {'rule min':>9} {'policy min':>10} "
        f"{'viol':>4} {'bad-sensor':>10} {'approvals/h':>11} {'vs rule min':>11}"
    )
    print(head)
    print("-" * len(head))
    names = list(dict.fromkeys(s.name for s, _, _ in cases))
    for name in names:
        mine = [runs for s, _, runs in cases if s.name == name]
        reds = [reduction(r["policy"], r["rule"]) for r in mine]
        known = [r for r in reds if r is not None]
        policy = [r["policy"] for r in mine]
        least = f"{100 * min(known):+.0f} %" if known else "-"
        print(
            f"{name:<24} {len(mine):>5} "
            f"{100 * min(r['none'].in_spec for r in mine):>8.2f}% "
            f"{100 * min(r['rule'].in_spec for r in mine):>8.2f}% "
            f"{100 * min(r.in_spec for r in policy):>9.2f}% "
            f"{sum(r.violations for r in policy):>4} "
            f"{sum(r.bad_sensor_writes for r in policy):>10} "
            f"{max(r.approvals_per_hour for r in policy):>11.2f} {least:>11}"
        )


def figures(cases: list[tuple[Scenario, int, dict[Controller, Run]]]) -> dict[str, Any]:
    policy = [runs["policy"] for _, _, runs in cases]
    rule = [runs["rule"] for _, _, runs in cases]
    reductions = [reduction(runs["policy"], runs["rule"]) for _, _, runs in cases]
    known = [r for r in reductions if r is not None]
    return {
        "scenarios": len({s.name for s, _, _ in cases}),
        "policy_in_spec_min": round(min(r.in_spec for r in policy), 5),
        "rule_in_spec_min": round(min(r.in_spec for r in rule), 5),
        "out_of_spec_reduction_min": round(min(known), 4) if known else None,
        "violations": sum(r.violations for r in policy),
        "bad_sensor_writes": sum(r.bad_sensor_writes for r in policy),
        "approvals_per_hour_max": round(max(r.approvals_per_hour for r in policy), 3),
        "rule_violations": sum(r.violations for r in rule),
        "rule_bad_sensor_writes": sum(r.bad_sensor_writes for r in rule),
        "none_in_spec_min": round(min(runs["none"].in_spec for _, _, runs in cases), 5),
        "policy_wall_s_median": round(statistics.median(r.wall_s for r in policy), 2),
        "runs": [r.to_json() for _, _, runs in cases for r in runs.values()],
    }


TARGETS = (
    ("violations", "== 0", lambda f: f["violations"] == 0),
    ("bad_sensor_writes", "== 0", lambda f: f["bad_sensor_writes"] == 0),
    ("policy_in_spec_min", ">= 0.99", lambda f: f["policy_in_spec_min"] >= 0.99),
    (
        "out_of_spec_reduction_min",
        ">= 0.5",
        lambda f: f["out_of_spec_reduction_min"] is None or f["out_of_spec_reduction_min"] >= 0.5,
    ),
    ("approvals_per_hour_max", "<= 1", lambda f: f["approvals_per_hour_max"] <= 1.0),
)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    chosen = [s for s in scenarios(args.quick) if not args.only or s.name in args.only]
    unknown = set(args.only or ()) - {s.name for s in scenarios(args.quick)}
    if unknown:
        raise SystemExit(f"closed_loop: unknown scenario(s) {', '.join(sorted(unknown))}")
    cases: list[tuple[Scenario, int, dict[Controller, Run]]] = []
    plant_timers(args.speed)
    with tempfile.TemporaryDirectory(prefix="opstwin-closed-loop-") as tmp:
        log_to_file(Path(tmp) / "gateway.log" if args.log is None else args.log)
        for n, scenario in enumerate(chosen):
            for seed in range(1, args.seeds + 1):
                runs: dict[Controller, Run] = {
                    "none": run_offline(scenario, "none", seed, args.dt),
                    "rule": run_offline(scenario, "rule", seed, args.dt),
                }
                state = Path(tmp) / f"{n}-{seed}"
                runs["policy"] = await run_policy(scenario, seed, args.dt, args.speed, state)
                cases.append((scenario, seed, runs))
                print(
                    f"  {scenario.name} seed {seed}: policy in spec "
                    f"{100 * runs['policy'].in_spec:.2f} % in {runs['policy'].wall_s:.0f} s",
                    file=sys.stderr,
                )
    print(
        f"closed loop: {len(chosen)} scenarios x {args.seeds} seed(s), plant step {args.dt:g} s, "
        f"~{args.speed:g}x plant time while nothing is decided"
    )
    print()
    print_table(cases)
    if args.seeds > 1:
        print()
        print_summary(cases)
    out = figures(cases)
    print()
    for key, target, ok in TARGETS:
        print(f"target {key} {target}: {out[key]} {'met' if ok(out) else 'MISSED'}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short scenarios (the test runs these)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per scenario (1, 2, ...)")
    p.add_argument("--only", nargs="*", help="scenario names (default: all)")
    p.add_argument("--dt", type=float, default=DT_S, help="plant seconds per step")
    p.add_argument("--speed", type=float, default=SPEED, help="plant seconds per wall second")
    p.add_argument("--log", type=Path, help="the gateway's log file (default: a temporary one)")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.dt <= 0 or args.speed <= 0:
        p.error("--seeds, --dt and --speed must be positive")
    out = asyncio.run(main_async(args))
    print(json.dumps(out, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
