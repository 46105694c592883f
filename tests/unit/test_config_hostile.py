"""Config files an attacker or a careless operator hands to `opstwin check` and `run`.

Every one of them is refused with exit 2 and a one-line message naming the file (and the line
where there is one), quickly: never a hang, a traceback or a config `run` would reject later.
"""

from __future__ import annotations

import copy
import itertools
import os
import resource
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import main
from gateway.config import load_config
from gateway.config.load import MAX_CONFIG_BYTES
from gateway.config.model import ModbusDeviceConfig, OpcuaDeviceConfig
from gateway.config.yamlpos import MAX_ALIAS_VALUES, MAX_DEPTH

MiB = 1024 * 1024

SITE: dict[str, Any] = {
    "site_id": "plant-a",
    "gateway_id": "gw-1",
    "devices": [
        {
            "name": "tank1",
            "driver": "modbus",
            "endpoint": "tcp://127.0.0.1:5020",
            "points": [
                {
                    "id": "utilities/tank1/level",
                    "address": "holding:0",
                    "datatype": "uint16",
                    "range": {"lo": 0, "hi": 100},
                },
                {
                    "id": "utilities/tank1/valve",
                    "address": "holding:1",
                    "datatype": "uint16",
                    "range": {"lo": 0, "hi": 100},
                    "writable": True,
                },
            ],
        },
        {
            "name": "plc",
            "driver": "opcua",
            "endpoint": "opc.tcp://127.0.0.1:4841/plc",
            "points": [
                {
                    "id": "line1/oven1/temperature",
                    "address": "ns=2;s=Oven1.Temperature",
                    "datatype": "float64",
                }
            ],
        },
    ],
}


def billion_laughs(levels: int = 9) -> str:
    """The classic nine-level alias bomb: a few hundred bytes that expand to 9**9 strings."""
    names = string.ascii_lowercase[:levels]
    lines = [f'{names[0]}: &{names[0]} ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in itertools.pairwise(names):
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + "\n"


def check_file(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run `opstwin check PATH` in-process; return its exit code and stderr."""
    code = main(["check", str(path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def refused(path: Path, capsys: pytest.CaptureFixture[str], *says: str) -> str:
    """Assert `check` refuses the file with exit 2 and one line naming it; return that line."""
    code, err = check_file(path, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert str(path) in lines[0], lines[0]
    for word in says:
        assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"
    return lines[0]


def write(tmp_path: Path, data: Any, name: str = "site.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def changed(change: Any) -> dict[str, Any]:
    data = copy.deepcopy(SITE)
    change(data)
    return data


# -- finding 2: YAML and file-level hostility --------------------------------------------------


@pytest.mark.timeout(10)
def test_the_billion_laughs_bomb_is_refused_at_once(tmp_path, capsys):
    text = billion_laughs()
    assert len(text.encode()) <= 520
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    line = refused(path, capsys, "alias", "line ")
    assert f"{MAX_ALIAS_VALUES:,}" in line


def test_ordinary_aliases_and_merge_keys_still_work(tmp_path):
    text = """\
site_id: plant-a
gateway_id: gw-1
devices:
- name: tank1
  driver: modbus
  endpoint: tcp://127.0.0.1:5020
  options: &fast {poll_interval_s: 0.5, timeout_s: 0.5}
  points:
  - &level {id: u/tank1/level, address: 'holding:0', datatype: uint16, range: &pct {lo: 0, hi: 100}}
  - {<<: *level, id: u/tank1/valve, address: 'holding:1'}
- name: tank2
  driver: modbus
  endpoint: tcp://127.0.0.1:5021
  options: *fast
  points:
  - {id: u/tank2/level, address: 'holding:0', datatype: uint16, range: *pct}
"""
    path = tmp_path / "aliases.yaml"
    path.write_text(text)
    config = load_config(path)
    tank1, tank2 = config.devices
    assert isinstance(tank1, ModbusDeviceConfig) and isinstance(tank2, ModbusDeviceConfig)
    assert tank2.options.poll_interval_s == 0.5
    assert tank1.points[1].range == tank2.points[0].range
    assert tank1.points[1].address == "holding:1"


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "text",
    [
        "site_id: &a [*a]\n",
        "site_id: &a {k: [1, {j: *a}]}\n",
        "gateway_id: g\nsite_id: &a [*a, *a]\n",
    ],
    ids=["list", "nested-map", "twice"],
)
def test_a_self_referencing_alias_is_refused(tmp_path, capsys, text):
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    refused(path, capsys, "alias", "refers to", "line ")


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "text",
    [
        "[" * 20_000 + "]" * 20_000 + "\n",
        "site_id: " + "{a: " * 20_000 + "1" + "}" * 20_000 + "\n",
        "".join(" " * i + "- \n" for i in range(0, 300, 2)) + " " * 300 + "x\n",
    ],
    ids=["flow-list", "flow-map", "block"],
)
def test_nesting_deeper_than_the_bound_is_refused(tmp_path, capsys, text):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    refused(path, capsys, f"deeper than {MAX_DEPTH}", "line ")


@pytest.mark.timeout(10)
def test_aliases_may_not_nest_deeper_than_the_bound_either(tmp_path, capsys):
    # Each anchor is 20 levels deep and holds the previous one: no single piece of text is
    # deeper than the bound, the value it stands for is.
    lines = ["a0: &a0 " + "[" * 20 + "1" + "]" * 20]
    lines += [f"a{i}: &a{i} " + "[" * 20 + f"*a{i - 1}" + "]" * 20 for i in range(1, 40)]
    path = tmp_path / "deep-alias.yaml"
    path.write_text("\n".join(lines) + "\n")
    refused(path, capsys, f"deeper than {MAX_DEPTH}")


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"site_id: caf\xe9\ngateway_id: g\n", ["UTF-8", "line 1"]),
        (b"site_id: a\ngateway_id: g\ndevices: []\n# \xff\xfe\n", ["UTF-8", "line 4"]),
        ("site_id: a\n".encode("utf-16"), ["UTF-8"]),
        (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03site.yaml.gz", ["binary"]),
        (b"site_id: a\ngateway_id: g\x00\x00\x00\x01\n", ["binary", "line 2"]),
    ],
    ids=["latin-1", "late-bad-byte", "utf-16", "gzip", "nul-bytes"],
)
def test_non_utf8_and_binary_files_are_refused(tmp_path, capsys, data, says):
    path = tmp_path / "site.yaml"
    path.write_bytes(data)
    refused(path, capsys, *says)


def test_a_directory_is_not_a_config(tmp_path, capsys):
    refused(tmp_path, capsys, "directory")


def test_a_config_larger_than_the_documented_size_is_refused_before_reading(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.write(b"site_id: plant-a\ngateway_id: gw-1\n")
        f.truncate(MAX_CONFIG_BYTES + 1)  # sparse: costs no disk
    refused(path, capsys, f"{MAX_CONFIG_BYTES // MiB} MiB")


def test_the_size_limit_is_documented_in_the_readme():
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    assert f"{MAX_CONFIG_BYTES // MiB} MiB" in readme
    assert f"{MAX_DEPTH} levels" in readme
    assert f"{MAX_ALIAS_VALUES:,}" in readme


def _limit_memory() -> None:
    # Today's reader would try to read a character device to its end; keep that from hurting
    # the machine running the tests.
    resource.setrlimit(resource.RLIMIT_AS, (2 * 1024 * MiB, 2 * 1024 * MiB))


@pytest.mark.parametrize("kind", ["fifo", "char-device"])
def test_a_fifo_or_a_device_as_config_is_refused_without_blocking(tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "site.yaml"
        os.mkfifo(path)  # nobody ever writes to it: opening it for reading would block
    else:
        path = Path("/dev/zero")  # reading it never ends
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "check", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            preexec_fn=_limit_memory,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`opstwin check {path}` hung on a {kind}")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], done.stderr
    assert "not a regular file" in lines[0]


@pytest.mark.timeout(60)
def test_the_bomb_through_the_real_command_exits_2_quickly(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=_limit_memory,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("site_id: a\ngateway_id: g\ndevices: []\nhttp: {port: " + "9" * 5000 + "}\n", "line 4"),
        ("site_id: a\ngateway_id: g\ndevices: []\nwhen: 2001-13-45\n", "line 4"),
        ("site_id: !!int abc\ngateway_id: g\ndevices: []\n", "line 1"),
        ("site_id: !!python/object:os.system {}\n", "line 1"),
        # PyYAML raises AttributeError / KeyError for these (the fuzz test found them)
        ("site_id: a\ngateway_id: !!timestamp not-a-date\ndevices: []\n", "line 2"),
        ("site_id: a\ngateway_id: g\ndevices: []\nhttp: {enabled: !!bool maybe}\n", "line 4"),
    ],
    ids=[
        "int-too-long",
        "impossible-date",
        "bad-int-tag",
        "python-tag",
        "bad-timestamp-tag",
        "bad-bool-tag",
    ],
)
def test_values_yaml_cannot_construct_are_refused_with_their_line(tmp_path, capsys, text, says):
    path = tmp_path / "site.yaml"
    path.write_text(text)
    refused(path, capsys, says)


# -- finding 6: what `run` would reject, `check` rejects -----------------------------------------


def _set(path: tuple[str | int, ...], value: Any) -> Any:
    def change(data: dict[str, Any]) -> None:
        target: Any = data
        for part in path[:-1]:
            target = target.setdefault(part, {}) if isinstance(part, str) else target[part]
        target[path[-1]] = value

    return change


RUN_WOULD_REJECT = [
    ("http host not an address", _set(("http", "host"), "999.999.999.999"), "http.host", "999"),
    ("http host empty", _set(("http", "host"), ""), "http.host", "0.0.0.0"),
    ("http host with a port", _set(("http", "host"), "127.0.0.1:8000"), "http.host", "port"),
    ("http host bad label", _set(("http", "host"), "gate_way..local"), "http.host", "host"),
    ("http port true", _set(("http", "port"), True), "http.port", "integer"),
    ("http port string", _set(("http", "port"), "80"), "http.port", "integer"),
    ("http port float", _set(("http", "port"), 80.0), "http.port", "integer"),
    (
        "opcua server host",
        _set(("opcua_server", "endpoint"), "opc.tcp://999.999.999.999:4840/x"),
        "opcua_server.endpoint",
        "999.999.999.999",
    ),
    (
        "opcua server enabled as a string",
        _set(("opcua_server", "enabled"), "yes"),
        "opcua_server.enabled",
        "boolean",
    ),
    (
        "modbus device host",
        _set(("devices", 0, "endpoint"), "tcp://300.1.1.1:502"),
        "devices[0].endpoint",
        "300.1.1.1",
    ),
    (
        "opcua device host",
        _set(("devices", 1, "endpoint"), "opc.tcp://-plc-:4840"),
        "devices[1].endpoint",
        "-plc-",
    ),
    (
        "writable as a number",
        _set(("devices", 0, "points", 0, "writable"), 1),
        "devices[0].points[0].writable",
        "boolean",
    ),
    ("enabled as a string", _set(("devices", 0, "enabled"), "false"), "devices[0].enabled", "bool"),
    (
        "unit id true",
        _set(("devices", 0, "options"), {"unit_id": True}),
        "devices[0].options.unit_id",
        "integer",
    ),
    (
        "max registers float",
        _set(("devices", 0, "options"), {"max_registers": 10.0}),
        "devices[0].options.max_registers",
        "integer",
    ),
    (
        "queue size true",
        _set(("devices", 1, "options"), {"queue_size": True}),
        "devices[1].options.queue_size",
        "integer",
    ),
    (
        "timeout as a string",
        _set(("devices", 1, "options"), {"timeout_s": "4"}),
        "devices[1].options.timeout_s",
        "number",
    ),
    (
        "stop bits true",
        _set(("devices", 0, "options"), {"stopbits": True}),
        "devices[0].options.stopbits",
        "1 or 2",
    ),
    (
        "writable range infinite",
        _set(("devices", 0, "points", 1, "range"), {"lo": float("-inf"), "hi": float("inf")}),
        "devices[0].points[1].range.lo",
        "finite",
    ),
    (
        "writable range half open",
        _set(("devices", 0, "points", 1, "range"), {"lo": 0, "hi": float("inf")}),
        "devices[0].points[1].range.hi",
        "finite",
    ),
    (
        "range not a number",
        _set(("devices", 0, "points", 0, "range"), {"lo": float("nan"), "hi": 1}),
        "devices[0].points[0].range.lo",
        "nan",
    ),
    (
        "scale infinite",
        _set(("devices", 0, "points", 0, "scale"), float("inf")),
        "devices[0].points[0].scale",
        "finite",
    ),
    (
        "history days infinite",
        _set(("storage", "history_days"), float("inf")),
        "storage.history_days",
        "finite",
    ),
    (
        "missing server certificate",
        _set(("devices", 1, "options"), {"server_certificate": "certs/plc.der"}),
        "devices[1].options.server_certificate",
        "certs/plc.der",
    ),
    (
        "point id that is also a folder, served over OPC UA",
        lambda d: (
            d.update(opcua_server={"enabled": True, "allow_anonymous": True}),
            d["devices"][0]["points"][1].update(id="utilities/tank1/level/valve"),
        ),
        "devices[0].points[1].id",
        "folder",
    ),
    ("database is a folder", _set(("storage", "path"), "."), "storage.path", "directory"),
    (
        "database in a folder that is a file",
        _set(("storage", "path"), "site.yaml/twin.db"),
        "storage.path",
        "not a directory",
    ),
    ("pki dir is a file", _set(("storage", "pki_dir"), "site.yaml"), "storage.pki_dir", "not a"),
]


@pytest.mark.parametrize(
    ("change", "key_path", "says"),
    [c[1:] for c in RUN_WOULD_REJECT],
    ids=[c[0] for c in RUN_WOULD_REJECT],
)
def test_check_refuses_what_run_would_refuse(tmp_path, capsys, change, key_path, says):
    path = write(tmp_path, changed(change))
    code, err = check_file(path, capsys)
    assert code == 2, err
    line = next((ln for ln in err.splitlines() if f"{key_path} (line" in ln), None)
    assert line is not None, f"{key_path!r} not named in:\n{err}"
    assert says.lower() in line.lower(), f"{says!r} not in {line!r}"


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "0.0.0.0", "::1", "::", "fe80::1%eth0", "gateway.plant.local", "localhost"],
)
def test_valid_http_hosts_pass(tmp_path, host):
    config = load_config(write(tmp_path, changed(_set(("http", "host"), host))))
    assert config.http.host == host


def test_a_read_only_point_may_not_have_an_open_range_either(tmp_path, capsys):
    # An infinite bound is no valid JSON in /twin, and no limit the gateway could check.
    data = changed(_set(("devices", 0, "points", 0, "range"), {"lo": 0, "hi": float("inf")}))
    code, err = check_file(write(tmp_path, data), capsys)
    assert code == 2
    assert "devices[0].points[0].range.hi (line" in err and "finite" in err


def test_a_server_certificate_is_found_relative_to_the_config_and_must_be_one(
    tmp_path, capsys, opcua_certificates
):
    certs = tmp_path / "certs"
    certs.mkdir()
    der = opcua_certificates / "client" / "own" / "cert.der"
    (certs / "plc.der").write_bytes(der.read_bytes())
    path = write(
        tmp_path, changed(_set(("devices", 1, "options"), {"server_certificate": "certs/plc.der"}))
    )
    plc = load_config(path).devices[1]
    assert isinstance(plc, OpcuaDeviceConfig)
    assert plc.options.server_certificate == str((certs / "plc.der").resolve())

    (certs / "plc.der").write_text("not a certificate")
    code, err = check_file(path, capsys)
    assert code == 2
    assert "devices[1].options.server_certificate (line" in err and "certificate" in err


def test_config_errors_never_echo_a_huge_value(tmp_path, capsys):
    path = write(tmp_path, changed(_set(("site_id",), "x" * 100_000)))
    code, err = check_file(path, capsys)
    assert code == 2 and "site_id" in err
    assert len(err) < 1000


def test_a_key_with_a_line_break_stays_on_its_line(tmp_path, capsys):
    path = tmp_path / "site.yaml"
    path.write_text('site_id: a\ngateway_id: g\ndevices: []\n"bad\\nkey": 1\n')
    code, err = check_file(path, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 2, err  # the summary line and one problem
