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


# -- anomaly detectors (`anomalies:`) ------------------------------------------------------------

ANOMALIES: dict[str, Any] = {
    "rules": [
        {
            "points": ["area/line/*/p?"],
            "detectors": [{"kind": "stale", "max_age_s": 30}],
        },
        {
            "points": ["line1/oven1/temperature"],
            "detectors": [
                {"kind": "out_of_range", "lo": 150, "hi": 215},
                {"kind": "rate_of_change", "max_rate": 5},
            ],
        },
        {"points": ["area/line/dev2/**"], "disable": ["stale"]},
    ]
}


def with_anomalies(rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    data = copy.deepcopy(GOOD)
    data["anomalies"] = copy.deepcopy(ANOMALIES) if rules is None else {"rules": rules}
    return data


def test_anomaly_rules_load_and_give_each_point_its_detectors(tmp_path):
    from gateway.devices import point_defs
    from gateway.policy.anomaly import resolve

    config = load_config(write(tmp_path, with_anomalies()))
    chosen = {
        pid: [s.kind for s in specs]
        for pid, specs in resolve(config.anomalies, point_defs(config)).items()
    }
    assert chosen["line1/oven1/temperature"] == ["rate_of_change", "out_of_range"]
    assert chosen["area/line/dev0/p5"] == ["stale"]
    assert "area/line/dev2/p0" not in chosen  # switched off by the last rule
    assert len(chosen) == 1 + 12


def test_no_anomalies_section_means_no_detectors(tmp_path):
    assert load_config(write(tmp_path, GOOD)).anomalies.rules == []


def test_the_gateway_builds_its_anomaly_watch_from_the_config(tmp_path):
    from gateway.app import Gateway

    assert Gateway(load_config(write(tmp_path, GOOD))).anomaly_watch is None
    watch = Gateway(load_config(write(tmp_path, with_anomalies()))).anomaly_watch
    assert watch is not None
    assert "line1/oven1/temperature" in watch.detectors.point_ids


def _rule(points: list[str], *detectors: dict[str, Any]) -> dict[str, Any]:
    return {"points": points, "detectors": list(detectors) or [{"kind": "stale", "max_age_s": 9}]}


# Each case: the rules, the key path the error must name, and a word it must say.
ANOMALY_CASES = [
    (
        "unknown detector kind",
        [_rule(["line1/**"], {"kind": "isolation_forest"})],
        "anomalies.rules[0].detectors[0].kind",
        "zscore",
    ),
    (
        "glob matching no point",
        [_rule(["line1/**"]), _rule(["line1/oven1/temperature", "line2/**"])],
        "anomalies.rules[1].points[1]",
        "matches no declared point",
    ),
    (
        "an id that is not declared",
        [_rule(["line1/oven1/temprature"])],
        "anomalies.rules[0].points[0]",
        "matches no declared point",
    ),
    (
        "a star does not cross segments",
        [_rule(["line1/*"])],
        "anomalies.rules[0].points[0]",
        "`**` crosses",
    ),
    (
        "upper-case glob",
        [_rule(["Line1/**"])],
        "anomalies.rules[0].points[0]",
        "pattern",
    ),
    (
        "rule without points",
        [{"points": [], "detectors": [{"kind": "stale", "max_age_s": 5}]}],
        "anomalies.rules[0].points",
        "at least 1",
    ),
    (
        "unknown key in a detector",
        [_rule(["line1/**"], {"kind": "stale", "max_age": 5})],
        "anomalies.rules[0].detectors[0].stale.max_age",
        "unknown key",
    ),
    (
        "NaN threshold",
        [_rule(["line1/**"], {"kind": "zscore", "threshold": float("nan")})],
        "anomalies.rules[0].detectors[0].zscore.threshold",
        "finite",
    ),
    (
        "infinite duration",
        [_rule(["line1/**"], {"kind": "flatline", "duration_s": float("inf")})],
        "anomalies.rules[0].detectors[0].flatline.duration_s",
        "finite",
    ),
    (
        "negative age",
        [_rule(["line1/**"], {"kind": "stale", "max_age_s": -1})],
        "anomalies.rules[0].detectors[0].stale.max_age_s",
        "greater than 0",
    ),
    (
        "a boolean for a window",
        [_rule(["line1/**"], {"kind": "zscore", "window": True})],
        "anomalies.rules[0].detectors[0].zscore.window",
        "integer",
    ),
    (
        "a window of a billion samples",
        [_rule(["line1/**"], {"kind": "zscore", "window": 10**9})],
        "anomalies.rules[0].detectors[0].zscore.window",
        "10000",
    ),
    (
        "a pasted blob for a glob",
        [_rule(["a" * 100_000])],
        "anomalies.rules[0].points[0]",
        "at most 256",
    ),
    (
        "range upside down",
        [_rule(["line1/**"], {"kind": "out_of_range", "lo": 5, "hi": 1})],
        "anomalies.rules[0].detectors[0].out_of_range",
        "below hi",
    ),
    (
        "one kind twice",
        [_rule(["line1/**"], {"kind": "stale", "max_age_s": 1}, {"kind": "stale", "max_age_s": 2})],
        "anomalies.rules[0]",
        "twice",
    ),
]


@pytest.mark.parametrize(
    ("rules", "key_path", "says"), [c[1:] for c in ANOMALY_CASES], ids=[c[0] for c in ANOMALY_CASES]
)
def test_broken_anomaly_rules_name_key_path(tmp_path, rules, key_path, says):
    message = error_of(tmp_path, with_anomalies(rules))
    line = next((ln for ln in message.splitlines() if key_path + " " in ln + " "), None)
    assert line is not None, f"{key_path!r} not named in:\n{message}"
    assert says.lower() in line.lower(), f"{says!r} not in {line!r}"


def test_a_numeric_detector_on_switches_only_is_refused(tmp_path):
    data = with_anomalies(
        [
            {
                "points": ["area/line/dev0/switch*"],
                "detectors": [{"kind": "stale", "max_age_s": 5}, {"kind": "zscore"}],
            }
        ]
    )
    data["devices"][0]["points"] += [
        {"id": f"area/line/dev0/switch{k}", "address": f"coil:{k}", "datatype": "bool"}
        for k in range(2)
    ]
    message = error_of(tmp_path, data)
    assert "1 problem:" in message
    assert "anomalies.rules[0].detectors[1].kind" in message
    assert "zscore needs numeric points, and this rule's points are bool" in message


def test_a_glob_matching_nothing_is_named_with_its_line(tmp_path):
    path = write(tmp_path, with_anomalies([_rule(["line1/**", "line9/**"])]))
    expected = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if "line9" in ln)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert f"anomalies.rules[0].points[1] (line {expected}): 'line9/**' matches no" in message


def test_every_unmatched_glob_is_reported_at_once(tmp_path):
    rules = [_rule(["nope/**"]), _rule(["line1/**"]), _rule(["area/line/dev9/*", "zz/*"])]
    message = error_of(tmp_path, with_anomalies(rules))
    assert "3 problems" in message
    for key in ("rules[0].points[0]", "rules[2].points[0]", "rules[2].points[1]"):
        assert f"anomalies.{key} " in message


def test_a_glob_that_would_backtrack_for_ages_is_judged_at_once(tmp_path):
    # As a regex, `**a**a...**b` against a long id of `a`s backtracks exponentially: 10 stars
    # took 3.5 s on a 100-character id, and each further star ~50 times that. A config must
    # never hang `check` (pytest's timeout stands guard; no timing is asserted).
    data = copy.deepcopy(GOOD)
    long_id = "a" * 120 + "/" + "a" * 120
    data["devices"][0]["points"].append(
        {"id": long_id, "address": "holding:50", "datatype": "uint16"}
    )
    hostile = "**a" * 80 + "**b"
    data["anomalies"] = {"rules": [_rule([hostile]), _rule(["*a" * 60 + "*/**a*a*"])]}
    message = error_of(tmp_path, data)
    assert "anomalies.rules[0].points[0]" in message and "matches no declared point" in message
    assert "anomalies.rules[1]" not in message  # it matches the long id


@pytest.mark.parametrize(
    ("pattern", "point_id", "matches"),
    [
        ("line1/**", "line1/oven1/temperature", True),
        ("line1/*", "line1/oven1/temperature", False),
        ("*/oven?/temp*", "line1/oven1/temperature", True),
        ("**/temperature", "line1/oven1/temperature", True),
        ("**temperature", "line1/oven1/temperature", True),
        ("line1/oven1/temperature", "line1/oven1/temperature", True),
        ("line1/oven1/temperatur", "line1/oven1/temperature", False),
        ("line1/oven1.temperature", "line1/oven1/temperature", False),  # `.` is no wildcard
        ("*a*a*a*/**", "banana/x", True),
        ("**a**a**a**a", "a/a/a/a", True),
        ("**a**a**a**a", "a/a/a", False),
        ("*a*a*a*a*", "aaa/a", False),
        ("?*?*?*?", "ab/cd", False),
        ("?*?*?*/?*", "abc/d", True),
    ],
)
def test_globs_mean_what_the_reference_says(pattern, point_id, matches):
    from gateway.policy.anomaly import glob_matcher, glob_regex

    assert glob_matcher(pattern)(point_id) is matches
    assert (glob_regex(pattern).fullmatch(point_id) is not None) is matches


def test_the_glob_matcher_agrees_with_the_regex_on_random_globs():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from gateway.policy.anomaly import glob_matcher, glob_regex

    glob = st.lists(st.sampled_from(["a", "b", "ab", "/", "*", "**", "?"]), max_size=9).map("".join)
    text = st.text(alphabet="ab/", max_size=14)

    @settings(max_examples=1000, deadline=None)
    @given(glob, text)
    def agree(pattern: str, point_id: str) -> None:
        expected = glob_regex(pattern).fullmatch(point_id) is not None
        assert glob_matcher(pattern)(point_id) is expected

    agree()
