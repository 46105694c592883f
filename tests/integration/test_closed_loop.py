"""bench/closed_loop.py's short run: the shipped policies through the real gateway, against a
threshold rule and no control, on three scenarios of the simulated plant.

Its own process, as the bench always runs: it makes the process's `time.time` the plant's clock
(bench/closed_loop.py, "Time"), which must not leak into the test session. What is asserted is
what the product promises on these scenarios (no hard-limit violation, no write on a faulty
sensor, the drift kept in spec) and that the harness can see the opposite: the rule, run on the
same seed, does write on the stuck transmitter and does drain the tank past its float switch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = ("oven/ambient-drift", "tank/stuck-sensor", "tank/noisy-sensor")
KEYS = {
    "scenarios",
    "policy_in_spec_min",
    "rule_in_spec_min",
    "out_of_spec_reduction_min",
    "violations",
    "bad_sensor_writes",
    "approvals_per_hour_max",
}


@pytest.fixture(scope="module")
def bench() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "bench/closed_loop.py", "--quick", "--only", *SCENARIOS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert isinstance(figures, dict)
    figures["table"] = done.stdout
    return figures


def run_of(figures: dict[str, Any], scenario: str, controller: str) -> dict[str, Any]:
    (found,) = [
        r for r in figures["runs"] if r["scenario"] == scenario and r["controller"] == controller
    ]
    return found


@pytest.mark.timeout(300)
def test_the_last_line_holds_the_issues_figures_and_the_table_names_each_run(bench):
    assert bench.keys() >= KEYS
    assert bench["scenarios"] == len(SCENARIOS)
    for scenario in SCENARIOS:
        assert scenario in bench["table"]
    assert "target violations == 0: 0 met" in bench["table"]


@pytest.mark.timeout(300)
def test_the_policies_never_break_a_hard_limit_nor_write_on_a_faulty_sensor(bench):
    assert bench["violations"] == 0
    assert bench["bad_sensor_writes"] == 0
    # The harness sees both when they happen: the rule on the same seed closes the valve on
    # the stuck reading until the tank drains past its low float switch.
    rule = run_of(bench, "tank/stuck-sensor", "rule")
    assert rule["bad_sensor_writes"] >= 2 and rule["violations"] >= 1
    assert rule["outside_hard_s"] > 0


@pytest.mark.timeout(300)
def test_a_stuck_transmitter_goes_to_a_person_instead_of_the_valve(bench):
    policy = run_of(bench, "tank/stuck-sensor", "policy")
    assert policy["writes"] == 0
    assert policy["approvals"] == 1, policy["decisions"]
    assert policy["in_spec"] == 1.0


@pytest.mark.timeout(300)
def test_the_drift_leaves_spec_alone_and_the_policies_keep_it_in(bench):
    none = run_of(bench, "oven/ambient-drift", "none")
    policy = run_of(bench, "oven/ambient-drift", "policy")
    assert none["in_spec"] < 0.8 and none["violations"] >= 1, "a disturbance that matters"
    assert policy["writes"] >= 1 and policy["decisions"].get("auto_execute", 0) >= 1
    assert policy["in_spec"] >= 0.99


@pytest.mark.timeout(300)
def test_noise_alone_moves_the_rule_and_not_the_policies(bench):
    rule = run_of(bench, "tank/noisy-sensor", "rule")
    policy = run_of(bench, "tank/noisy-sensor", "policy")
    assert rule["writes"] >= 1 and rule["bad_sensor_writes"] == rule["writes"]
    assert policy["writes"] == 0
    assert policy["readings"] > 100, "the gateway did read the noisy level"
