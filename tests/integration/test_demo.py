"""`opstwin demo` as a new user runs it: its own plant process, a gateway, and what it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # one demo run of about 45 s, shared by the module

OPSTWIN = [sys.executable, "-m", "gateway.cli"]
LEVEL = "utilities/cooling/tank1/level"
OVEN = "line1/oven1/temperature"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    state = tmp_path_factory.mktemp("demo") / "state"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(
        [*OPSTWIN, "demo", "--duration", "42", "--http-port", "0", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    return state, output


def test_demo_prints_where_to_look_and_shows_the_plant(demo):
    state, out = demo
    assert "OpsTwin demo is running" in out
    assert re.search(r"http://127\.0\.0\.1:\d+/twin", out)
    assert (state / "site.yaml").exists() and (state / "twin.db").exists()
    assert re.search(rf"{re.escape(LEVEL)}\s+\d+\.\d+ m\s+GOOD", out)


def test_demo_writes_setpoints_through_both_drivers_and_reads_them_back(demo):
    _, out = demo
    assert re.search(r"setpoint utilities/cooling/tank1/inlet_valve <- 65 %: read back 65 %", out)
    assert re.search(r"setpoint line1/oven1/heater_setpoint <- 200 °C: read back 200 °C", out)


def test_demo_simulates_the_oven_setpoint_change_before_making_it(demo):
    _, out = demo
    match = re.search(
        r"what-if: oven setpoint 180 -> 200 °C from 1\d\d\.\d °C: "
        r"P\(temperature > 203 °C within 10 min\) = (0\.\d\d|1\.00)",
        out,
    )
    assert match, "the what-if line is missing"
    assert out.index("what-if:") < out.index("setpoint line1/oven1/heater_setpoint <- 200")


def test_demo_scada_client_reads_the_twin_and_cannot_write(demo):
    _, out = demo
    assert "scada: connected to opc.tcp://" in out and "SignAndEncrypt" in out
    assert re.search(
        r"scada: read ns=2;s=line1/oven1/temperature = \d+\.\d+ °C \(Good\), "
        r"EURange 0\.\.400",
        out,
    )
    assert "refused: BadUserAccessDenied" in out


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


def test_views_read_the_demo_database(demo):
    state, _ = demo
    config = str(state / "site.yaml")

    def opstwin(*args: str) -> str:
        run = subprocess.run([*OPSTWIN, *args], capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stderr
        return run.stdout

    twin = opstwin("twin", "--config", config)
    assert re.search(rf"{re.escape(LEVEL)}\s+\d+\.\d+\s+GOOD", twin)
    history = opstwin("history", "--config", config, LEVEL, "--minutes", "5")
    assert "STALE" in history and "GOOD" in history
    buckets = opstwin("history", "--config", config, LEVEL, "--bucket", "10")
    assert "mean" in buckets.splitlines()[0]
    events = opstwin("events", "--config", config, "--limit", "1000")
    assert "DeviceStateChanged" in events and "DISCONNECTED" in events
    assert "TelemetryChanged" in events

    unknown = subprocess.run(
        [*OPSTWIN, "history", "--config", config, "no/such/point"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert unknown.returncode == 2 and "no/such/point" in unknown.stderr  # a usage error
