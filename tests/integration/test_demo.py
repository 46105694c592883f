"""`opstwin demo` as a new user runs it: its own plant process, a gateway, and what it prints."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import parse_config
from gateway.control.db import ControlDB, control_db_path
from gateway.control.users import AccountStore
from gateway.demo import (
    SHIPPED_POLICIES,
    demo_config_data,
    demo_policy_text,
    install_policies,
)
from gateway.demo.narrative import Narrator, decided_lines, finished_lines
from gateway.policy.load import load_policies

# One demo run of about 45 s, shared by the tests marked slow; the others need no demo.
slow = pytest.mark.slow

OPSTWIN = [sys.executable, "-m", "gateway.cli"]
LEVEL = "utilities/cooling/tank1/level"
OVEN = "line1/oven1/temperature"
SETPOINT = "line1/oven1/heater_setpoint"
AMBIENT = "line1/oven1/ambient"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    state = tmp_path_factory.mktemp("demo") / "state"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(
        [*OPSTWIN, "demo", "--duration", "58", "--http-port", "0", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    return state, output


@slow
def test_demo_prints_where_to_look_and_shows_the_plant(demo):
    state, out = demo
    assert "OpsTwin demo is running" in out
    assert re.search(r"http://127\.0\.0\.1:\d+/twin", out)
    assert (state / "site.yaml").exists() and (state / "twin.db").exists()
    assert re.search(rf"{re.escape(LEVEL)}\s+\d+\.\d+ m\s+GOOD", out)


@slow
def test_demo_writes_setpoints_through_both_drivers_and_reads_them_back(demo):
    _, out = demo
    assert re.search(r"setpoint utilities/cooling/tank1/inlet_valve <- 65 %: read back 65 %", out)
    # The oven's setpoint is written by the policy engine (OPC UA), verified by reading it back.
    assert re.search(r"written: the device read back 1\d\d(\.\d)? °C \(was 1\d\d(\.\d)? °C\)", out)
    assert "oven-plc: wrote " in out


@slow
def test_demo_asks_the_kernel_a_what_if_from_live_values(demo):
    _, out = demo
    match = re.search(
        r"what-if: oven setpoint 180 -> 200 °C from 1\d\d\.\d °C: "
        r"P\(temperature > 203 °C within 10 min\) = (0\.\d\d|1\.00)",
        out,
    )
    assert match, "the what-if line is missing"


@slow
def test_demo_warms_the_hall_and_the_oven_policy_corrects_it(demo):
    _, out = demo
    warm = out.index("plant: the hall warms up by 10 °C (oven:ambient:10)")
    before, after = out[:warm], out[warm:]
    assert "policy oven-overtemp-drift watches: `temperature > 183` held 6 s" in after
    hall = [float(v) for v in re.findall(rf"{re.escape(AMBIENT)}\s+(\d+\.\d+) °C", before)]
    warmer = [float(v) for v in re.findall(rf"{re.escape(AMBIENT)}\s+(\d+\.\d+) °C", after)]
    assert max(warmer) > hall[-1] + 8, "the plant's hall (its physics) warms up"

    fired = re.search(
        r"proposal (p-\w+-\d+): policy `oven-overtemp-drift` proposes "
        r"line1/oven1/heater_setpoint (1\d\d(?:\.\d)?) -> (1\d\d(?:\.\d)?) °C: "
        r"`temperature > 183` held for \d+ s",
        after,
    )
    assert fired, "the policy fires on the drift"
    pid, was, value = fired[1], float(fired[2]), float(fired[3])
    assert 0 < was - value <= 10, "it lowers the setpoint, within its max step"
    story = after[fired.start() :]
    assert re.search(
        r"simulation \(fopdt, 10,000 paths x 600 steps, 10 min ahead\): [\d,]+ keep every "
        r"safety limit, [\d,]+ improve the objective; p = (0\.9\d\d|1\.000)",
        story,
    )
    assert re.search(r"decision: auto_execute at confidence (0\.9\d\d|1\.000) \(p ", story)
    assert re.search(
        rf"proposal {pid}: written: the device read back {value:g} °C \(was {was:g} °C\)", story
    ), "the PLC holds the new setpoint (the driver read it back)"
    # The engine's own log lines say the same to an operator reading the log.
    assert f"proposal {pid}: auto_execute at confidence" in out
    # Inside the policy's 170..190 °C band all along: without it the oven would settle ~191 °C.
    temperatures = [float(v) for v in re.findall(rf"{re.escape(OVEN)}\s+(\d+\.\d+) °C", after)]
    assert max(temperatures) < 190.0


@slow
def test_demo_agent_proposal_waits_for_a_supervisor_who_approves_it(demo):
    _, out = demo
    agent = re.search(
        r"agent: token `(demo-agent-\w+)` \(role agent on line1/oven1/\*.*\) proposes the "
        r"heater setpoint (\d+(?:\.\d)?) -> (\d+(?:\.\d)?) °C",
        out,
    )
    assert agent, "the agent's proposal is announced"
    story = out[agent.end() :]
    proposed = re.search(rf"proposal (p-\w+-\d+): token `{agent[1]}` proposes ", story)
    assert proposed
    pid = proposed[1]
    decided = story.index("decision: require_approval at confidence", proposed.end())
    waiting = story.index("waiting for a supervisor's approval until", decided)
    approves = story.index("supervisor: user `demo-supervisor` (password", waiting)
    assert f"reads proposal {pid}'s simulation and approves it" in story[approves:]
    written = re.search(
        rf"proposal {pid}: approved by `demo-supervisor`; written: the device read back "
        rf"{float(agent[3]):g} °C",
        story,
    )
    assert written and written.start() > approves


@slow
def test_demo_a_stuck_level_transmitter_waits_for_a_person_instead_of_closing_the_valve(demo):
    _, out = demo
    stuck = out.index("plant: the tank's level transmitter sticks reading 4.45 m")
    story = out[stuck : out.index("plant: the level transmitter reads true again")]
    proposed = re.search(
        r"proposal (p-\w+-\d+): policy `tank-level-high` proposes "
        r"utilities/cooling/tank1/inlet_valve \d+ -> \d+ %",
        story,
    )
    assert proposed, "the policy fires on the stuck reading"
    decided = re.search(
        # Confidence is p x 0.7 (a suspect input's quality 0): approval at p = 1, else analysis.
        r"decision: require_(approval|analysis) at confidence [\d.]+ .*auto-execution forbidden: "
        r"utilities/cooling/tank1/level is suspect: rate_of_change anomaly",
        story[proposed.end() :],
    )
    assert decided, "the jump made the level suspect: a person decides"
    assert f"proposal {proposed[1]}: approved" not in out
    assert f"proposal {proposed[1]}: written" not in out


@slow
def test_demo_scada_client_reads_the_twin_and_cannot_write(demo):
    _, out = demo
    assert "scada: connected to opc.tcp://" in out and "SignAndEncrypt" in out
    assert re.search(
        r"scada: read ns=2;s=line1/oven1/temperature = \d+\.\d+ °C \(Good\), "
        r"EURange 0\.\.400",
        out,
    )
    assert "refused: BadUserAccessDenied" in out


@slow
def test_demo_shows_a_second_gateway_refused_and_health_naming_the_device(demo):
    _, out = demo
    assert re.search(
        r"second gateway on the same database: exit 1: opstwin: another gateway \(pid \d+\) "
        r"is running on ",
        out,
    )
    after = out[out.index("tank:restart") :]
    assert re.search(r"health: degraded: device tank1 is \w+", after), "health names the device"
    assert "health: ok:" in after[after.index("health: degraded") :], "and recovers"


@slow
def test_demo_shows_the_cloud_mirror_equal_to_the_twin_through_a_broker_outage(demo):
    """The demo's local mosquitto, the sync and the reference mirror (bootstrap installs
    mosquitto, so CI always has it)."""
    _, out = demo
    equal = re.compile(
        r"cloud: the mirror \(gateway/mirror, through mosquitto\) is equal to the twin at rev "
        r"(\d+): all (\d+) points, value and quality.*mirror gaps (\d+).*historical events (\d+)"
    )
    before = equal.search(out)
    assert before, "the mirror is shown equal to the twin"
    assert "cloud: the broker stops" in out[before.end() :]
    back = out.index("cloud: the broker is back")
    after = equal.search(out, back)
    assert after, "and equal again after the outage"
    assert int(after.group(1)) > int(before.group(1))
    assert int(after.group(4)) > 0, "the backlog of the outage arrived, marked historical"


@slow
@pytest.mark.parametrize(
    ("command", "point", "unit"), [("tank:restart", LEVEL, "m"), ("oven:restart", OVEN, "°C")]
)
def test_demo_rides_out_a_controller_restart(demo, command, point, unit):
    _, out = demo
    after = out[out.index(command) :]
    stale = re.search(rf"{re.escape(point)}\s+\S+ {unit}\s+STALE", after)
    assert stale, f"{point} goes STALE after {command}"
    assert re.search(rf"{re.escape(point)}\s+\S+ {unit}\s+GOOD", after[stale.start() :]), (
        f"{point} comes back GOOD by itself"
    )


@slow
def test_the_demo_backs_itself_up_online_and_shows_the_operations_commands(demo):
    state, out = demo
    assert re.search(r"http://127\.0\.0\.1:\d+/metrics", out)
    assert re.search(r"opstwin backup --config \S+site\.yaml \S+", out)
    assert re.search(r"kill -HUP \d+", out)
    assert re.search(r"raw history \d+ d, then 60 s buckets 365 d; at most \d+ MB", out)
    # The reload step: a typo refused whole, then the good file applied without a restart.
    assert re.search(
        r"reload: a typo in site\.yaml \(log_levle\): refused, the running config stays: "
        r".*log_levle",
        out,
    )
    assert re.search(
        r"reload: the good file again: applied without a restart .*last_reload\.ok = true", out
    )
    line = re.search(r"backup: twin\.db at rev (\d+) .* checked in [\d.]+ s: (\S+)/", out)
    assert line, "the demo takes an online backup"
    folder = Path(line.group(2))
    folder = folder if folder.is_absolute() else Path.cwd() / folder
    assert folder.resolve().parent == state.resolve(), "beside the demo's database"
    manifest = json.loads((folder / "manifest.json").read_text())
    twin = next(f for f in manifest["files"] if f["name"] == "twin.db")
    assert twin["rev"] == int(line.group(1)) > 0
    for name in ("twin.db", "control.db"):
        conn = sqlite3.connect(f"file:{folder / name}?mode=ro", uri=True)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            conn.close()


@slow
def test_views_read_the_demo_database(demo):
    state, _ = demo
    config = str(state / "site.yaml")

    def opstwin(*args: str) -> str:
        run = subprocess.run([*OPSTWIN, *args], capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stderr
        return run.stdout

    twin = opstwin("twin", "--config", config)
    assert re.search(rf"{re.escape(LEVEL)}\s+\d+\.\d+\s+GOOD", twin)
    history = opstwin("history", "--config", config, LEVEL, "--minutes", "5", "--limit", "1000")
    assert "STALE" in history and "GOOD" in history
    buckets = opstwin("history", "--config", config, LEVEL, "--bucket", "10")
    assert "mean" in buckets.splitlines()[0]
    events = opstwin("events", "--config", config, "--limit", "1000")
    assert "DeviceStateChanged" in events and "DISCONNECTED" in events
    assert "TelemetryChanged" in events
    for kind in ("ProposalCreated", "ProposalDecided", "ApprovalGranted", "ActionSucceeded"):
        assert kind in events, kind
    audit = opstwin("audit", "show", "--config", config)
    for action in ("proposal.decided", "access.execute", "approval.granted", "action.succeeded"):
        assert action in audit, action
    assert "audit chain intact" in opstwin("audit", "verify", "--config", config)

    unknown = subprocess.run(
        [*OPSTWIN, "history", "--config", config, "no/such/point"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert unknown.returncode == 2 and "no/such/point" in unknown.stderr  # a usage error


# -- the demo's policies and narrative, without a demo run -------------------------------------


def test_demo_policy_copies_scale_plant_times_and_keep_everything_else():
    text = (
        "trigger:\n  when: t > 1\n  for_s: 60   # a minute\n"
        "action:\n  rate_limit: {max_writes: 1, per_s: 600}\n"
    )
    out = demo_policy_text(text, 10, "x.yaml")
    assert out.startswith("# Demo copy of policies/x.yaml")
    body = out.split("\n", 2)[2]
    assert body == text.replace("for_s: 60", "for_s: 6").replace("per_s: 600", "per_s: 60")
    assert "# a minute" in body
    assert demo_policy_text("for_s: 0.5\n", 10, "y.yaml").endswith("for_s: 0.05\n")


def test_the_shipped_policies_load_as_demo_copies(tmp_path):
    names = install_policies(tmp_path / "policies")
    assert "oven-overtemp-drift.yaml" in names
    data = demo_config_data(
        device_ports={"oven-plc": 1, "tank1": 2, "meter1": 3},
        http_port=0,
        opcua_port=0,
        policies_dir=str(tmp_path / "policies"),
    )
    config = parse_config(yaml.safe_dump(data, allow_unicode=True), source="test")
    policies = load_policies(tmp_path / "policies", config)
    oven = policies.get("oven-overtemp-drift")
    assert oven is not None and oven.trigger.for_s == 6  # type: ignore[union-attr]
    assert oven.action.rate_limit.per_s == 60
    assert oven.simulation.paths == 10_000, "the model and its paths are the shipped ones"


def test_without_the_shipped_folder_the_demo_runs_with_no_policies(tmp_path, capsys):
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "stale.yaml").write_text("id: left over from a previous run\n")
    assert install_policies(folder, source=tmp_path / "nowhere") == []
    assert list(folder.iterdir()) == [], "a previous run's copies do not linger"
    assert "running without policies" in capsys.readouterr().out
    assert SHIPPED_POLICIES.name == "policies"


PROPOSAL: dict[str, Any] = {
    "id": "p-abc-1",
    "point": "line1/oven1/heater_setpoint",
    "value": 173.6,
    "current_value": 180.0,
    "proposer": {"name": "oven-overtemp-drift", "kind": "policy"},
    "policy": "oven-overtemp-drift",
    "reason": "policy oven-overtemp-drift: `temperature > 183` held for 6 s (for_s 6)",
    "status": "succeeded",
    "decision": "auto_execute",
    "reasons": ["confidence 0.998 >= auto_execute_min 0.9"],
    "confidence": 0.998,
    "confidence_breakdown": {
        "p_sim": 0.998,
        "quality_factor": 1.0,
        "record_factor": 1.0,
        "agreement_factor": 1.0,
    },
    "simulation": {
        "model": "fopdt",
        "paths": 10000,
        "steps": 600,
        "horizon_s": 600.0,
        "paths_safe": 9990,
        "paths_improved": 9985,
    },
    "expires_ts": None,
    "previous_value": 180.0,
    "read_back": 173.6,
    "error": None,
    "restored": None,
    "approver": None,
    "timings_ms": {"simulation": 41.0, "write": 3.2, "total": 48.0},
}


def test_the_narrative_tells_the_simulation_decision_and_verified_write():
    decided = decided_lines(PROPOSAL, "°C")
    assert decided[0] == (
        "proposal p-abc-1: policy `oven-overtemp-drift` proposes line1/oven1/heater_setpoint "
        "180 -> 173.6 °C: `temperature > 183` held for 6 s (for_s 6)"
    )
    assert decided[1] == (
        "  simulation (fopdt, 10,000 paths x 600 steps, 10 min ahead): 9,990 keep every safety "
        "limit, 9,985 improve the objective; p = 0.998 (41 ms)"
    )
    assert decided[2].startswith("  decision: auto_execute at confidence 0.998 (p 1.00 x quality")
    assert finished_lines(PROPOSAL, "°C") == [
        "proposal p-abc-1: written: the device read back 173.6 °C (was 180 °C); write and "
        "read-back 3 ms, 48 ms from the proposal"
    ]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"status": "failed", "error": "BadOutOfRange", "restored": "restored 180"},
            "write failed: BadOutOfRange; restored 180",
        ),
        (
            {"status": "expired", "error": "no approval within 900 s"},
            "expired, nothing written: no approval within 900 s",
        ),
        (
            {"status": "rejected", "error": None, "reasons": ["rate limit"]},
            "rejected, nothing written: rate limit",
        ),
    ],
)
def test_the_narrative_says_why_nothing_was_written(changes, expected):
    assert expected in finished_lines({**PROPOSAL, **changes}, "°C")[0]


def test_the_narrative_survives_missing_and_failed_simulations():
    none = decided_lines(
        {
            **PROPOSAL,
            "simulation": None,
            "confidence": None,
            "decision": "require_analysis",
            "status": "pending_analysis",
            "expires_ts": 1.8e9,
        },
        "°C",
    )
    assert none[1] == "  simulation: none (no policy models this point)"
    assert none[2].startswith("  decision: require_analysis: ")
    assert "waiting for analysis until" in none[3]
    failed = decided_lines({**PROPOSAL, "simulation": {"error": "no value for temperature"}}, "")
    assert failed[1] == "  simulation failed: no value for temperature"
    odd = decided_lines({**PROPOSAL, "value": "hot", "current_value": None, "reason": ""}, "")
    assert odd[0].endswith("proposes line1/oven1/heater_setpoint ? -> hot")


class _Record:
    def __init__(self, **changes):
        self.data = {**PROPOSAL, **changes}
        self.id = self.data["id"]
        self.decision = self.data["decision"]

    def to_json(self):
        return dict(self.data)


class _Engine:
    def __init__(self):
        self.records: list[_Record] = []

    def recent(self, limit=100):
        return list(reversed(self.records))[:limit]


def test_the_narrator_tells_each_proposal_once_decided_and_once_finished():
    engine, said = _Engine(), list[str]()
    narrator = Narrator(engine, {SETPOINT: "°C"}, out=said.append)
    engine.records.append(_Record(decision=None, status="executing"))  # being simulated
    narrator.poll()
    assert said == []
    waiting = {"status": "pending_approval", "decision": "require_approval", "expires_ts": 2e9}
    engine.records[0] = _Record(**waiting)
    narrator.poll()
    narrator.poll()
    assert len(said) == 4, said  # proposal, simulation, decision, waiting: once
    assert said[0].startswith("  proposal p-abc-1: policy `oven-overtemp-drift` proposes")
    assert "waiting for a supervisor's approval until" in said[3]
    engine.records[0] = _Record(status="succeeded", approver="sup")
    narrator.poll()
    narrator.poll()
    assert len(said) == 5, said
    assert "approved by `sup`; written: the device read back 173.6 °C (was 180 °C)" in said[4]


@slow
def test_demo_prints_the_operator_uis_url_and_a_supervisor_that_logs_in(demo):
    state, out = demo
    ui = re.search(
        r"operator UI: open (http://127\.0\.0\.1:\d+)/ui/ and log in as demo-supervisor with "
        r"password '([^']+)'",
        out,
    )
    assert ui, "the banner names the UI's URL and the supervisor's password for this run"
    banner = out[out.index("OpsTwin demo is running") :]
    assert banner.index("operator UI: open") < banner.index("  simulated plant ("), "said first"
    # The printed password is the one control.db holds (argon2), for a supervisor.
    with ControlDB(control_db_path(state / "twin.db")) as db:
        principal = AccountStore(db).authenticate_user("demo-supervisor", ui[2])
    assert [g.role for g in principal.grants] == ["supervisor"]
    # The last agent proposal is left for the person at the browser.
    assert re.search(
        rf"agent: proposal p-\w+-\d+ waits for you in the operator UI's approvals queue "
        rf"\({re.escape(ui[1])}/ui/approvals\)",
        out,
    )
