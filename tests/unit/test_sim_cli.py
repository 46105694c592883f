"""`opstwin sim run` and `opstwin sim fit`, as a user calls them."""

from __future__ import annotations

import itertools
import json
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import yaml

from drivers.contract import Quality, Sample
from gateway.cli import main
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore

SCENARIO = yaml.safe_load(
    resources.files("gateway.demo").joinpath("oven-scenario.yaml").read_text(encoding="utf-8")
)


def scenario_file(tmp_path: Path, **over) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump({**SCENARIO, **over}))
    return path


def test_sim_run_on_both_backends_agrees(tmp_path, capsys):
    path = scenario_file(tmp_path, paths=4000)
    results = {}
    for backend in ("native", "numpy"):
        assert main(["sim", "run", str(path), "--backend", backend, "--json"]) == 0
        results[backend] = json.loads(capsys.readouterr().out)
    p = [results[b]["constraints"][0]["violation_probability"] for b in results]
    tol = 4 * np.sqrt(max(np.mean(p) * (1 - np.mean(p)), 1e-4) * 2 / 4000)
    assert abs(p[0] - p[1]) <= tol
    assert results["native"]["backend"] == "native"


def test_sim_run_prints_a_readable_summary(tmp_path, capsys):
    assert main(["sim", "run", str(scenario_file(tmp_path, paths=500))]) == 0
    out = capsys.readouterr().out
    assert "P(violation)" in out and "fan (output 0)" in out and "M path-steps/s" in out


def test_a_bad_scenario_names_the_field(tmp_path, capsys):
    bad = {**SCENARIO["model"], "tau": -5}
    assert main(["sim", "run", str(scenario_file(tmp_path, model=bad))]) == 2
    err = capsys.readouterr().err
    assert "model" in err and "tau" in err


def test_sim_fit_recovers_a_known_response_from_twin_history(tmp_path, capsys):
    gain, tau, theta, u0, u1, y0 = 1.5, 40.0, 6.0, 100.0, 120.0, 150.0
    points = [
        PointDef(id="a/setpoint", device="d", datatype="float64"),
        PointDef(id="a/temperature", device="d", datatype="float64"),
    ]
    t0 = time.time() - 900
    now = [t0]
    store = TwinStore(tmp_path / "twin.db", points, clock=lambda: now[0])
    store.open()
    rng = np.random.default_rng(3)
    a = np.exp(-1 / tau)
    x = y0
    for k in range(600):
        now[0] = t0 + k
        u = u1 if k >= 30 else u0
        u_delayed = u1 if k - theta >= 30 else u0
        x = a * x + (1 - a) * (y0 + gain * (u_delayed - u0))
        store.ingest(
            [
                Sample("a/setpoint", u, Quality.GOOD),
                Sample("a/temperature", x + rng.normal(0, 0.05), Quality.GOOD),
            ]
        )
    store.close()
    config = tmp_path / "site.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "site_id": "s",
                "gateway_id": "g",
                "storage": {"path": "twin.db"},
                "devices": [
                    {
                        "name": "d",
                        "driver": "modbus",
                        "endpoint": "tcp://127.0.0.1:1502",
                        "points": [
                            {"id": "a/setpoint", "address": "holding:0", "datatype": "float64"},
                            {"id": "a/temperature", "address": "holding:4", "datatype": "float64"},
                        ],
                    }
                ],
            }
        )
    )
    assert (
        main(
            [
                "sim",
                "fit",
                "--config",
                str(config),
                "a/setpoint",
                "a/temperature",
                "--minutes",
                "30",
                "--json",
            ]
        )
        == 0
    )
    fit = json.loads(capsys.readouterr().out)
    assert abs(fit["gain"] - gain) <= 3 * fit["gain_stderr"] + 1e-3
    assert abs(fit["tau"] - tau) <= 3 * fit["tau_stderr"] + 0.5
    assert fit["theta"] == pytest.approx(theta, abs=1.0)
    assert fit["model"]["gain"]["dist"] == "normal"


def test_sim_fit_without_history_says_so(tmp_path, capsys):
    points = [
        PointDef(id="a/in", device="d", datatype="float64"),
        PointDef(id="a/out", device="d", datatype="float64"),
    ]
    store = TwinStore(tmp_path / "twin.db", points)
    store.open()
    store.close()
    config = tmp_path / "site.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "site_id": "s",
                "gateway_id": "g",
                "storage": {"path": "twin.db"},
                "devices": [
                    {
                        "name": "d",
                        "driver": "modbus",
                        "endpoint": "tcp://127.0.0.1:1502",
                        "points": [
                            {"id": "a/in", "address": "holding:0", "datatype": "float64"},
                            {"id": "a/out", "address": "holding:4", "datatype": "float64"},
                        ],
                    }
                ],
            }
        )
    )
    assert main(["sim", "fit", "--config", str(config), "a/in", "a/out"]) == 1
    assert "not enough GOOD history" in capsys.readouterr().err


def _alias_bomb() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{n}: &{n} [{','.join(['*' + p] * 9)}]" for p, n in itertools.pairwise("abcdefghi")]
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("content", "says"),
    [
        (_alias_bomb(), "alias"),
        (b"model: caf\xe9\n", "UTF-8"),
        ("[" * 5000 + "]" * 5000, "deeper than"),
    ],
    ids=["alias-bomb", "latin-1", "deep"],
)
def test_a_hostile_scenario_file_is_refused_in_one_line(tmp_path, capsys, content, says):
    path = tmp_path / "scenario.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    assert main(["sim", "run", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert str(path) in err and says in err


def test_sim_fit_of_an_unknown_point_is_a_usage_error(tmp_path, capsys):
    store = TwinStore(tmp_path / "twin.db", [PointDef(id="a/in", device="d", datatype="float64")])
    store.open()
    store.close()
    config = tmp_path / "site.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "site_id": "s",
                "gateway_id": "g",
                "storage": {"path": "twin.db"},
                "devices": [
                    {
                        "name": "d",
                        "driver": "modbus",
                        "endpoint": "tcp://127.0.0.1:1502",
                        "points": [{"id": "a/in", "address": "holding:0", "datatype": "float64"}],
                    }
                ],
            }
        )
    )
    assert main(["sim", "fit", "--config", str(config), "a/in", "a/nope"]) == 2
    assert "'a/nope' is not a point" in capsys.readouterr().err
