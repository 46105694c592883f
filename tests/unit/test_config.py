"""Site config validation: every broken file names the file, the key path and the line."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import main
from gateway.config import load_config, parse_config
from gateway.errors import ConfigError
from gateway.opcua_server.users import hash_password

SCADA_HASH = hash_password("correct horse")

GOOD: dict[str, Any] = {
    "site_id": "plant-a",
    "gateway_id": "gw-1",
    "storage": {"path": "twin.db"},
    "devices": [
        {
            "name": f"dev{d}",
            "driver": "modbus",
            "endpoint": f"tcp://127.0.0.1:{5020 + d}",
            "points": [
                {
                    "id": f"area/line/dev{d}/p{p}",
                    "address": f"holding:{p * 2}",
                    "datatype": "uint16",
                    "range": {"lo": 0, "hi": 100},
                }
                for p in range(6)
            ],
        }
        for d in range(3)
    ]
    + [
        {
            "name": "plc",
            "driver": "opcua",
            "endpoint": "opc.tcp://127.0.0.1:4841/plc",
            "options": {"publishing_interval_ms": 250},
            "points": [
                {
                    "id": "line1/oven1/temperature",
                    "address": "ns=2;s=Oven1.Temperature",
                    "datatype": "float64",
                    "range": {"lo": 0, "hi": 400},
                },
                {
                    "id": "line1/oven1/setpoint",
                    "address": "ns=2;s=Oven1.HeaterSetpoint",
                    "datatype": "float64",
                    "range": {"lo": 0, "hi": 300},
                    "writable": True,
                },
            ],
        }
    ],
    "opcua_server": {
        "enabled": True,
        "endpoint": "opc.tcp://0.0.0.0:4840/opstwin",
        "users": [{"username": "scada", "password_hash": SCADA_HASH, "role": "viewer"}],
    },
}


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def broken(change) -> dict[str, Any]:
    data = copy.deepcopy(GOOD)
    change(data)
    return data


def error_of(tmp_path: Path, data: Any) -> str:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message, "the error must name the file"
    return message


def test_good_config_loads_and_resolves_storage_relative_to_the_file(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.site_id == "plant-a"
    assert len(config.devices) == 4
    assert config.storage.path == (tmp_path / "twin.db").resolve()


def test_bundled_demo_config_is_valid():
    text = resources.files("gateway.demo").joinpath("site.yaml").read_text(encoding="utf-8")
    config = parse_config(text, source="demo")
    assert {d.name for d in config.devices} == {"oven-plc", "tank1", "meter1"}
    assert config.opcua_server.enabled


def _set(path, value):
    def change(data):
        target = data
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return change


def _delete(path):
    def change(data):
        target = data
        for part in path[:-1]:
            target = target[part]
        del target[path[-1]]

    return change


def _dup_point(data):
    data["devices"][1]["points"][3]["id"] = data["devices"][0]["points"][2]["id"]


def _dup_device(data):
    data["devices"][2]["name"] = "dev0"


# Each case: how to break the file, the key path the error must name, and a word it must say.
CASES = [
    ("unknown top-level key", _set(("historyy",), 3), "historyy", "unknown key"),
    ("missing site id", _delete(("site_id",)), "site_id", "required"),
    (
        "bad address syntax",
        _set(("devices", 2, "points", 5, "address"), "hold:5"),
        "devices[2].points[5].address",
        "hold:5",
    ),
    (
        "unknown datatype",
        _set(("devices", 1, "points", 0, "datatype"), "float16"),
        "devices[1].points[0].datatype",
        "float32",
    ),
    (
        "point id not a path",
        _set(("devices", 0, "points", 1, "id"), "Level"),
        "devices[0].points[1].id",
        "area/line/asset/signal",
    ),
    ("duplicate point id", _dup_point, "devices[1].points[3].id", "already declared"),
    ("duplicate device name", _dup_device, "devices[2].name", "already used"),
    (
        "writable without range",
        lambda d: (
            d["devices"][0]["points"][4].update(writable=True),
            d["devices"][0]["points"][4].pop("range"),
        ),
        "devices[0].points[4].range",
        "writable",
    ),
    (
        "range lo above hi",
        _set(("devices", 0, "points", 2, "range"), {"lo": 5, "hi": 1}),
        "devices[0].points[2].range",
        "lo must be below hi",
    ),
    (
        "bad endpoint",
        _set(("devices", 1, "endpoint"), "modbus://plc:502"),
        "devices[1].endpoint",
        "tcp://HOST[:PORT]",
    ),
    (
        "endpoint port out of range",
        _set(("devices", 0, "endpoint"), "tcp://plc:70000"),
        "devices[0].endpoint",
        "port 1-65535",
    ),
    (
        "unknown driver option",
        _set(("devices", 0, "options"), {"pol_interval_s": 1}),
        "devices[0].options.pol_interval_s",
        "unknown key",
    ),
    (
        "negative deadband",
        _set(("devices", 0, "points", 0, "deadband"), -1),
        "devices[0].points[0].deadband",
        "greater than or equal to 0",
    ),
    (
        "string without length",
        _set(("devices", 0, "points", 3, "datatype"), "string"),
        "devices[0].points[3].length",
        "length",
    ),
    ("http port out of range", _set(("http",), {"port": 70000}), "http.port", "65535"),
    ("unknown driver", _set(("devices", 0, "driver"), "profibus"), "devices[0].driver", "modbus"),
    (
        "device without points",
        _set(("devices", 2, "points"), []),
        "devices[2].points",
        "at least 1",
    ),
    (
        "limits on a string",
        lambda d: d["devices"][0]["points"][1].update(datatype="string", length=4),
        "devices[0].points[1].range",
        "numeric",
    ),
    (
        "point larger than one read",
        lambda d: (
            d["devices"][0]["points"][0].update(datatype="string", length=40),
            d["devices"][0]["points"][0].pop("range"),
            d["devices"][0].update(options={"max_registers": 10}),
        ),
        "devices[0].options",
        "max_registers",
    ),
    (
        "opcua bad node id",
        _set(("devices", 3, "points", 1, "address"), "ns=x;s=Oven1"),
        "devices[3].points[1].address",
        "ns=x",
    ),
    (
        "opcua endpoint scheme",
        _set(("devices", 3, "endpoint"), "tcp://127.0.0.1:4841"),
        "devices[3].endpoint",
        "opc.tcp://",
    ),
    (
        "opcua unknown option",
        _set(("devices", 3, "options"), {"publish_ms": 1}),
        "devices[3].options.publish_ms",
        "unknown key",
    ),
    (
        "opcua point with a modbus key",
        _set(("devices", 3, "points", 0, "scale"), 2),
        "devices[3].points[0].scale",
        "unknown key",
    ),
    (
        "opcua server password not hashed",
        _set(
            ("opcua_server", "users"),
            [{"username": "scada", "password_hash": "secret", "role": "viewer"}],
        ),
        "opcua_server.users[0].password_hash",
        "argon2",
    ),
    (
        "opcua server unknown role",
        _set(
            ("opcua_server", "users"),
            [{"username": "scada", "password_hash": "secret", "role": "god"}],
        ),
        "opcua_server.users[0].role",
        "viewer",
    ),
    (
        "unknown point key",
        _set(("devices", 0, "points", 0, "deadbnd"), 0.1),
        "devices[0].points[0].deadbnd",
        "unknown key",
    ),
]


@pytest.mark.parametrize(
    ("change", "key_path", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_broken_config_names_key_path(tmp_path, change, key_path, says):
    message = error_of(tmp_path, broken(change))
    line = next((ln for ln in message.splitlines() if key_path + " " in ln + " "), None)
    assert line is not None, f"{key_path!r} not named in:\n{message}"
    assert says.lower() in line.lower(), f"{says!r} not in {line!r}"


def test_error_gives_the_line_of_the_bad_key(tmp_path):
    path = write(tmp_path, broken(_set(("devices", 2, "points", 5, "address"), "hold:5")))
    lines = path.read_text().splitlines()
    expected = next(i for i, ln in enumerate(lines, 1) if "hold:5" in ln)
    where = rf"devices\[2\]\.points\[5\]\.address \(line {expected}\)"
    with pytest.raises(ConfigError, match=where):
        load_config(path)


def test_all_problems_are_reported_at_once(tmp_path):
    def three(data):
        data["devices"][0]["points"][0]["datatype"] = "float16"
        data["devices"][2]["points"][1]["deadband"] = -1
        del data["gateway_id"]

    message = error_of(tmp_path, broken(three))
    assert "3 problems" in message
    for key in ("devices[0].points[0].datatype", "devices[2].points[1].deadband", "gateway_id"):
        assert key in message


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("site_id: a\n  gateway_id: [\n", "invalid YAML"),
        ("site_id: a\nsite_id: b\n", "duplicate key 'site_id'"),
        ("", "empty"),
        ("- a\n- b\n", "list"),
    ],
    ids=["syntax", "duplicate-key", "empty", "top-level-list"],
)
def test_unparseable_files(tmp_path, text, says):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=says) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_duplicate_yaml_key_names_its_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("site_id: a\ngateway_id: g\nsite_id: b\n")
    with pytest.raises(ConfigError, match=r"line 3.*first defined on line 1"):
        load_config(path)


def test_a_password_or_hash_is_never_echoed_in_an_error(tmp_path):
    def leak(data):
        data["opcua_server"]["users"] = [
            {"username": "a", "password_hash": "hunter2-plain", "role": "viewer"},
            {"username": "a", "password_hash": SCADA_HASH, "role": "viewer"},
        ]

    message = error_of(tmp_path, broken(leak))
    assert "opcua_server.users[0].password_hash" in message
    assert "hunter2" not in message and SCADA_HASH not in message


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_check_command_prints_what_the_config_declares(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "4 device(s), 20 point(s)" in out
    assert "opcua server opc.tcp://0.0.0.0:4840/opstwin" in out
    assert "area/line/dev2/p5" in out


def test_check_and_run_refuse_a_broken_config_without_starting(tmp_path, capsys):
    path = write(tmp_path, broken(_set(("devices", 2, "points", 5, "address"), "hold:5")))
    assert main(["check", str(path)]) == 2
    assert "devices[2].points[5].address" in capsys.readouterr().err
    assert main(["run", "--config", str(path)]) == 2
    assert "devices[2].points[5].address" in capsys.readouterr().err
    assert not (tmp_path / "twin.db").exists(), "nothing may start on a bad config"
