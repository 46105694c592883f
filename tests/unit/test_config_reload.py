"""What a config reload sees as changed (gateway.reload.diff_configs, a pure function), which keys
wait for a restart, and what the policy engine does with a new policy set (pending proposals keep
the policy they were judged by; an unchanged policy keeps its trigger's state).

Configs are the bundled demo's, edited as a person edits the file, and validated by the real
loader; the engine runs on a real twin store and the real C kernel, on a fake clock.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests_support import FakeClock, drop_meter, settle

from drivers.contract import Quality, Sample
from gateway.app import Gateway
from gateway.auth.rbac import Grant, Principal
from gateway.config import SiteConfig, parse_config
from gateway.demo import demo_config_data
from gateway.devices import point_defs
from gateway.lifecycle import Lifecycle
from gateway.policy.engine import PolicyEngine, ProposalRecord
from gateway.policy.load import load_policies
from gateway.policy.model import Policy
from gateway.reload import (
    RELOADABLE,
    ConfigDiff,
    ConfigStatus,
    Reloader,
    diff_configs,
    restart_needed,
    running_config,
)
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore

ROOT = Path(__file__).parents[2]
PORTS = {"oven-plc": 4841, "tank1": 5020, "meter1": 5021}
LEVEL = "utilities/cooling/tank1/level"
VALVE = "utilities/cooling/tank1/inlet_valve"
SP = "line1/oven1/heater_setpoint"
TEMP = "line1/oven1/temperature"


def demo_data() -> dict[str, Any]:
    return demo_config_data(device_ports=PORTS, http_port=8000, opcua_port=4840)


def site(edit: Callable[[dict[str, Any]], object] | None = None) -> SiteConfig:
    """The demo config, edited by `edit` (in place), through the real loader's checks."""
    data = copy.deepcopy(demo_data())
    if edit is not None:
        edit(data)
    return parse_config(yaml.safe_dump(data, allow_unicode=True), source="site.yaml")


def device(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in data["devices"] if d["name"] == name)


def point(data: dict[str, Any], point_id: str) -> dict[str, Any]:
    return next(p for d in data["devices"] for p in d["points"] if p["id"] == point_id)


# -- the diff --------------------------------------------------------------------------------------


def test_the_same_file_changes_nothing() -> None:
    diff = diff_configs(site(), site())
    assert diff == ConfigDiff()
    assert diff.summary() == [] and not diff.devices_differ and not diff.points_differ


def test_a_device_added_and_one_removed() -> None:
    def edit(data: dict[str, Any]) -> None:
        drop_meter(data)
        aux = {
            "name": "tank1-aux",
            "driver": "modbus",
            "endpoint": "tcp://127.0.0.1:5020",
            "points": [{"id": "utilities/cooling/tank1/level_aux", "address": "input:0",
                        "datatype": "float32"}],
        }  # fmt: skip
        data["devices"].append(aux)

    old, new = site(), site(edit)
    diff = diff_configs(old, new)
    meter = tuple(p.id for p in point_defs(old) if p.device == "meter1")
    assert diff.devices_added == ("tank1-aux",)
    assert diff.devices_removed == ("meter1",)
    assert diff.devices_changed == ()
    assert diff.points_added == ("utilities/cooling/tank1/level_aux",)
    assert diff.points_removed == meter and len(meter) == 6
    assert diff.points_changed == ()
    assert diff.anomalies_changed  # its rules named meter1's points
    assert diff.summary() == [
        "+1 device (tank1-aux)",
        "-1 device (meter1)",
        "+1 point",
        "-6 points",
        "anomaly rules changed",
    ]
    # Undone, the same diff the other way round.
    back = diff_configs(new, old)
    assert (back.devices_added, back.devices_removed) == (("meter1",), ("tank1-aux",))


def test_a_point_added_to_a_device_changes_that_device_alone() -> None:
    def edit(data: dict[str, Any]) -> None:
        device(data, "tank1")["points"].append(
            {"id": "utilities/cooling/tank1/spare", "address": "holding:30", "datatype": "uint16"}
        )

    diff = diff_configs(site(), site(edit))
    assert diff.devices_changed == ("tank1",)
    assert diff.points_added == ("utilities/cooling/tank1/spare",)
    assert (diff.devices_added, diff.devices_removed, diff.points_removed) == ((), (), ())


@pytest.mark.parametrize(
    ("key", "value"),
    [("endpoint", "tcp://10.0.0.9:502"), ("options", {"unit_id": 2, "poll_interval_s": 0.2})],
)
def test_a_device_whose_endpoint_or_options_change_is_changed_its_points_not(
    key: str, value: Any
) -> None:
    def edit(data: dict[str, Any]) -> None:
        device(data, "tank1")[key] = value

    diff = diff_configs(site(), site(edit))
    assert diff.devices_changed == ("tank1",)
    assert not diff.points_differ


def test_a_new_range_changes_the_point_and_restarts_its_device() -> None:
    # The driver checks writes against the range: it must get the new one.
    def edit(data: dict[str, Any]) -> None:
        point(data, VALVE)["range"] = {"lo": 0, "hi": 80}

    diff = diff_configs(site(), site(edit))
    assert diff.points_changed == (VALVE,)
    assert diff.devices_changed == ("tank1",)


def test_a_description_or_unit_alone_does_not_restart_the_device() -> None:
    def edit(data: dict[str, Any]) -> None:
        point(data, LEVEL)["description"] = "Level, radar transmitter LT-101"
        point(data, LEVEL)["unit"] = "mm"

    diff = diff_configs(site(), site(edit))
    assert diff.points_changed == (LEVEL,)
    assert diff.devices_changed == ()
    assert diff.summary() == ["~1 point"]


def test_a_disabled_device_is_changed_and_its_points_stay_declared() -> None:
    def edit(data: dict[str, Any]) -> None:
        device(data, "meter1")["enabled"] = False

    diff = diff_configs(site(), site(edit))
    assert diff.devices_changed == ("meter1",)
    assert not diff.points_differ  # a disabled device's points stay in the twin


def test_anomaly_rules_policy_folder_and_log_level_apply_without_restart() -> None:
    def edit(data: dict[str, Any]) -> None:
        data["anomalies"]["rules"] = data["anomalies"]["rules"][:1]
        data["policies"] = {"dir": "policies"}
        data["log_level"] = "DEBUG"

    diff = diff_configs(site(), site(edit))
    assert diff.anomalies_changed and diff.policies_dir_changed and diff.log_level_changed
    assert diff.restart_needed == ()
    assert diff.summary() == ["anomaly rules changed", "policies.dir changed", "log_level changed"]


def test_settings_bound_at_start_are_named_by_key_path() -> None:
    def edit(data: dict[str, Any]) -> None:
        data["http"]["port"] = 8080
        data["http"]["read_access"] = "token"
        data["storage"]["history_days"] = 30
        data["opcua_server"]["users"] = [
            {"username": "scada", "password_hash": "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA",
             "role": "viewer"}
        ]  # fmt: skip
        data["opcua_server"]["security_policies"] = ["Basic256Sha256_SignAndEncrypt"]
        data["sync"] = {"broker": "mqtt://broker.example:1883"}
        data["gateway_id"] = "gw-02"
        point(data, LEVEL)["deadband"] = 0.01  # reloadable: not in the list

    old, new = site(), site(edit)
    diff = diff_configs(old, new)
    assert diff.restart_needed == (
        "gateway_id",
        "storage.history_days",
        "http.port",
        "http.read_access",
        "opcua_server.security_policies",
        "opcua_server.users",
        "sync.broker",
    )
    assert restart_needed(old, new) == diff.restart_needed
    assert diff.points_changed == (LEVEL,)


def test_what_runs_after_a_reload_keeps_the_settings_bound_at_start() -> None:
    def edit(data: dict[str, Any]) -> None:
        data["http"]["port"] = 8080
        data["storage"]["path"] = "/elsewhere/twin.db"
        drop_meter(data)
        data["log_level"] = "WARNING"

    old, new = site(), site(edit)
    running = running_config(old, new)
    assert running.http == old.http and running.storage == old.storage
    assert running.devices == new.devices and running.log_level == "WARNING"
    assert running.anomalies == new.anomalies and running.policies == new.policies
    # Every top-level key is either reloadable or kept.
    assert set(RELOADABLE) < set(SiteConfig.model_fields)
    assert restart_needed(old, running) == ()


def test_many_names_are_cut_short_in_the_summary() -> None:
    def edit(data: dict[str, Any]) -> None:
        for i in range(8):
            data["devices"].append(
                {"name": f"pushed{i}", "driver": "http",
                 "points": [{"id": f"area/pushed{i}/value", "datatype": "float64"}]}
            )  # fmt: skip

    summary = diff_configs(site(), site(edit)).summary()
    assert summary[0] == "+8 devices (pushed0, pushed1, pushed2, pushed3, pushed4, … 3 more)"
    assert summary[1] == "+8 points"


def test_an_http_devices_staleness_limit_is_a_change_of_that_device() -> None:
    def add(limit: float | None) -> Callable[[dict[str, Any]], None]:
        def edit(data: dict[str, Any]) -> None:
            pushed: dict[str, Any] = {
                "name": "lab",
                "driver": "http",
                "points": [{"id": "lab/bench/ph", "datatype": "float64"}],
            }
            if limit is not None:
                pushed["stale_after_s"] = limit
            data["devices"].append(pushed)

        return edit

    diff = diff_configs(site(add(None)), site(add(30.0)))
    assert diff.devices_changed == ("lab",) and not diff.points_differ


def test_the_status_shows_the_file_the_generation_and_the_last_reload() -> None:
    status = ConfigStatus(file=Path("/etc/opstwin/site.yaml"), loaded_at=100.0)
    assert status.health(["tank-level-high"]) == {
        "file": "/etc/opstwin/site.yaml",
        "loaded_at": 100.0,
        "generation": 1,
        "policies": ["tank-level-high"],
        "restart_needed": [],
        "last_reload": None,
    }


# -- one reload at a time --------------------------------------------------------------------------


def idle_gateway(tmp_path: Path) -> Gateway:
    """A gateway built, never started: a reload of a refused file touches nothing of it."""

    def edit(data: dict[str, Any]) -> None:
        data["storage"]["path"] = str(tmp_path / "twin.db")

    return Gateway(site(edit))


async def test_sighups_during_a_reload_make_one_more_and_the_rest_coalesce(
    tmp_path: Path,
) -> None:
    gateway = idle_gateway(tmp_path)
    path = tmp_path / "site.yaml"
    path.write_text("devices: [\n", encoding="utf-8")  # refused: nothing runs to be changed
    reloader = Reloader(gateway, path)
    status = gateway.config_status

    reloader.request()
    reloader.request()  # during start-up: remembered, once
    await reloader.idle()
    assert status.reloads == 0
    reloader.start()
    await asyncio.sleep(0)  # the reload runs: it is reading the file in a worker thread
    assert status.reloads == 1
    for _ in range(3):
        reloader.request()
    await reloader.idle()
    assert status.reloads == 2  # one more for the three, after the first
    assert status.last_reload is not None and status.last_reload["ok"] is False
    assert str(path) in status.last_reload["error"] and "line 2" in status.last_reload["error"]
    assert status.generation == 1

    await reloader.aclose()  # stopping: a SIGHUP now is ignored
    reloader.request()
    await reloader.idle()
    assert status.reloads == 2


async def test_a_gateway_given_no_file_says_there_is_nothing_to_reload(tmp_path: Path) -> None:
    gateway = idle_gateway(tmp_path)
    reloader = Reloader(gateway, None)
    assert await reloader.reload() is False
    assert gateway.config_status.last_reload is not None
    assert "nothing to reload" in gateway.config_status.last_reload["error"]
    assert gateway.config_status.health([])["file"] is None


# -- the policy engine and a new policy set --------------------------------------------------------

AGENT = Principal(name="oven-agent", kind="token", grants=(Grant(role="agent"),))
SUPERVISOR = Principal(name="sam", kind="user", grants=(Grant(role="supervisor"),))


class Rig:
    """A policy engine on a real twin store, writing to a recording device, on a fake clock."""

    def __init__(self, store: TwinStore, points: dict[str, PointDef], clock: FakeClock) -> None:
        self.store = store
        self.points = points
        self.clock = clock
        self.writes: list[tuple[str, float]] = []
        self.life = Lifecycle()

    def set(self, point_id: str, value: Any) -> None:
        self.store.ingest([Sample(point_id, value, Quality.GOOD)])

    async def write(self, point_id: str, value: float) -> float:
        self.writes.append((point_id, value))
        self.set(point_id, value)
        return value

    async def start(self, policies: list[Policy]) -> PolicyEngine:
        engine = PolicyEngine(policies, self.points, self.store, self.write, clock=self.clock)
        await engine.start(self.life)
        await settle(engine)
        return engine

    def oven(self, temperature: float) -> None:
        self.set(SP, 180.0)
        self.set("line1/oven1/running", True)
        self.set("line1/oven1/mode", "AUTO")
        self.set(TEMP, temperature)


@pytest.fixture
async def rig(tmp_path: Path, fake_clock: FakeClock) -> AsyncIterator[Rig]:
    config = site()
    points = {p.id: p for p in point_defs(config)}
    store = TwinStore(tmp_path / "twin.db", list(points.values()), clock=fake_clock)
    store.open()
    rig = Rig(store, points, fake_clock)
    try:
        yield rig
    finally:
        await rig.life.aclose()
        store.close()


@pytest.fixture(scope="module")
def drift() -> Policy:
    config = site()
    policy = next(
        p for p in load_policies(ROOT / "policies", config) if p.id == "oven-overtemp-drift"
    )
    # A few hundred paths judge a test as well as the shipped 10,000 judge the plant.
    return policy.model_copy(
        update={"simulation": policy.simulation.model_copy(update={"paths": 256})}
    )


async def hot_for(rig: Rig, engine: PolicyEngine, seconds: float) -> None:
    """The oven stays above 183 °C for `seconds` more; a new reading comes at the end (beyond
    the point's deadband, so it is a twin change that the trigger looks at)."""
    rig.clock.advance(seconds)
    rig.set(TEMP, 185.0 if rig.store.get(TEMP).value != 185.0 else 185.2)
    await settle(engine)


async def test_an_unchanged_policy_keeps_its_trigger_across_a_new_set(
    rig: Rig, drift: Policy
) -> None:
    rig.oven(temperature=185.0)
    engine = await rig.start([drift])
    await hot_for(rig, engine, 40)  # 40 of the 60 s its trigger needs
    assert not engine.proposals

    engine.replace_policies([drift])  # the same policy, read again from its file
    await hot_for(rig, engine, 20)
    (record,) = engine.recent()
    assert record.proposal.policy == drift.id and "held for 60 s" in record.proposal.reason


async def test_a_changed_policy_starts_its_trigger_afresh(rig: Rig, drift: Policy) -> None:
    rig.oven(temperature=185.0)
    engine = await rig.start([drift])
    await hot_for(rig, engine, 40)
    trigger = drift.trigger.model_copy(update={"for_s": 50.0})
    edited = drift.model_copy(update={"trigger": trigger})
    engine.replace_policies([edited])
    await settle(engine)  # looked at once, now: its new trigger starts holding here
    await hot_for(rig, engine, 20)  # 60 s hot, but only 20 s since the policy changed
    assert not engine.proposals
    await hot_for(rig, engine, 30)
    (record,) = engine.recent()
    assert "for_s 50" in record.proposal.reason


async def test_a_dropped_policy_fires_no_more(rig: Rig, drift: Policy) -> None:
    rig.oven(temperature=185.0)
    engine = await rig.start([drift])
    await hot_for(rig, engine, 40)
    engine.replace_policies([])
    await hot_for(rig, engine, 60)
    assert not engine.proposals and engine.policies == ()
    assert engine.model_policy(SP) is None  # people's proposals on it wait for a person now


async def waiting_proposal(rig: Rig, drift: Policy) -> tuple[PolicyEngine, ProposalRecord]:
    """The drift policy's proposal, waiting for a person: an input is STALE (its last value
    still holds), which forbids writing alone."""
    rig.oven(temperature=185.0)
    rig.store.ingest([Sample("line1/oven1/running", None, Quality.STALE, None, "link down")])
    engine = await rig.start([drift])
    await hot_for(rig, engine, 60)
    (record,) = engine.recent()
    assert record.status in ("pending_approval", "pending_analysis"), record.to_json()
    return engine, record


async def test_a_pending_proposal_keeps_the_policy_it_was_judged_by(
    rig: Rig, drift: Policy
) -> None:
    engine, record = await waiting_proposal(rig, drift)
    engine.replace_policies([])  # the reload dropped the policy
    rig.set("line1/oven1/mode", "MANUAL")  # ... and its interlock `mode == "AUTO"` fails now
    answered = await engine.approve(SUPERVISOR, record.id, comment="checked")
    assert answered.status == "failed" and rig.writes == [], answered.to_json()
    assert answered.error is not None and 'interlock `mode == "AUTO"`' in answered.error
    assert answered.to_json()["judged_by"] == drift.id


async def test_a_pending_proposal_of_a_dropped_policy_is_written_once_approved(
    rig: Rig, drift: Policy
) -> None:
    engine, record = await waiting_proposal(rig, drift)
    engine.replace_policies([])
    answered = await engine.approve(SUPERVISOR, record.id)
    assert answered.status == "succeeded", answered.to_json()
    assert rig.writes == [(SP, record.proposal.value)]
