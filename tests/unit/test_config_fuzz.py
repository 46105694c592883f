"""Config fuzz: whatever a file holds, loading it ends in a config or in one clean ConfigError.

Hypothesis generates site configs over the real structure (devices, points, options, the OPC UA
server), then breaks them: wrong types, missing and unknown keys, random scalars, deep nesting,
shared nodes (which YAML writes as anchors and aliases, including self-references), spliced
YAML syntax and raw bytes. The property: `load_config` returns a SiteConfig or raises
ConfigError whose message names the file — never another exception, never a hang. A few cases
go through the real `opstwin check` process: exit 0 or 2, never a traceback (the alias bomb,
FIFO and /dev/zero through it are in test_config_hostile.py).

Deterministic (derandomized, no example database) and bounded: a few seconds in all.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.config import SiteConfig, load_config, parse_config
from gateway.errors import ConfigError
from gateway.opcua_server.users import hash_password

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

HASH = hash_password("fuzz")

# -- valid sites, by construction ---------------------------------------------------------------

segments = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True)
names = st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,11}", fullmatch=True)
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@st.composite
def ranges(draw: st.DrawFn) -> dict[str, float]:
    lo = draw(finite)
    return {"lo": lo, "hi": lo + draw(st.floats(0.5, 1e6))}


@st.composite
def modbus_point(draw: st.DrawFn, pid: str, n: int) -> dict[str, Any]:
    datatype = draw(
        st.sampled_from(
            ["bool", "int16", "uint16", "int32", "uint32", "float32", "float64", "string"]
        )
    )
    point: dict[str, Any] = {"id": pid, "datatype": datatype}
    if datatype == "bool":
        point["address"] = draw(st.sampled_from([f"coil:{n}", f"discrete:{n}", f"holding:{n}.3"]))
    else:
        point["address"] = f"{draw(st.sampled_from(['holding', 'input']))}:{n * 4}"
    if datatype == "string":
        point["length"] = draw(st.integers(1, 20))
    elif datatype != "bool":
        if draw(st.booleans()):
            point["range"] = draw(ranges())
            # Only coils and holding registers can be written.
            point["writable"] = point["address"].startswith("holding") and draw(st.booleans())
        if draw(st.booleans()):
            point["scale"] = draw(st.sampled_from([0.1, 0.01, 2, -1]))
            point["deadband"] = draw(st.floats(0, 5))
    if draw(st.booleans()):
        point["unit"] = draw(st.sampled_from(["m", "°C", "kW", "m³/h", ""]))
    return point


@st.composite
def opcua_point(draw: st.DrawFn, pid: str, n: int) -> dict[str, Any]:
    point: dict[str, Any] = {
        "id": pid,
        "datatype": draw(st.sampled_from(["bool", "int32", "float64", "string"])),
        "address": draw(
            st.sampled_from([f"ns=2;s=Tag{n}", f"i={2258 + n}", f"nsu=urn:plc;s=T{n}"])
        ),
    }
    if point["datatype"] in ("int32", "float64") and draw(st.booleans()):
        point["range"] = draw(ranges())
        point["writable"] = draw(st.booleans())
    if draw(st.booleans()):
        point["sampling_interval_ms"] = draw(st.floats(0, 5000))
        point["queue_size"] = draw(st.integers(1, 100))
    return point


@st.composite
def device(draw: st.DrawFn, d: int) -> dict[str, Any]:
    driver = draw(st.sampled_from(["modbus", "opcua"]))
    base = draw(segments)
    make = modbus_point if driver == "modbus" else opcua_point
    points = [draw(make(f"{base}/dev{d}/p{p}", p)) for p in range(draw(st.integers(1, 4)))]
    dev: dict[str, Any] = {"name": f"{draw(names)}-{d}", "driver": driver, "points": points}
    if driver == "modbus":
        dev["endpoint"] = draw(
            st.sampled_from(["tcp://127.0.0.1:5020", "tcp://plc.local", "tcp://[::1]:502"])
        )
        if draw(st.booleans()):
            dev["options"] = draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "unit_id": st.integers(0, 247),
                        "poll_interval_s": st.floats(0.01, 100),
                        "timeout_s": st.floats(0.1, 60),
                        "max_gap": st.integers(0, 124),
                        "word_order": st.sampled_from(["big", "little"]),
                        "write_multiple": st.booleans(),
                    },
                )
            )
    else:
        dev["endpoint"] = draw(
            st.sampled_from(["opc.tcp://127.0.0.1:4841/plc", "opc.tcp://plc:4840"])
        )
        if draw(st.booleans()):
            dev["options"] = draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "mode": st.sampled_from(["subscribe", "poll"]),
                        "publishing_interval_ms": st.floats(1, 10_000),
                        "timeout_s": st.floats(0.5, 100),
                        "security_mode": st.sampled_from(["None", "Sign", "SignAndEncrypt"]),
                    },
                )
            )
    if draw(st.booleans()):
        dev["enabled"] = draw(st.booleans())
    return dev


@st.composite
def sites(draw: st.DrawFn) -> dict[str, Any]:
    site: dict[str, Any] = {
        "site_id": draw(names),
        "gateway_id": draw(names),
        "devices": [draw(device(d)) for d in range(draw(st.integers(0, 3)))],
    }
    if draw(st.booleans()):
        site["storage"] = {"path": "twin.db", "history_days": draw(st.floats(0.1, 365))}
    if draw(st.booleans()):
        site["http"] = {
            "host": draw(st.sampled_from(["127.0.0.1", "0.0.0.0", "::1", "gateway.local"])),
            "port": draw(st.integers(0, 65535)),
        }
    if draw(st.booleans()):
        site["opcua_server"] = {
            "enabled": True,
            "endpoint": "opc.tcp://127.0.0.1:4840/opstwin",
            "users": [{"username": "scada", "password_hash": HASH, "role": "viewer"}],
        }
    if draw(st.booleans()):
        site["log_level"] = draw(st.sampled_from(["DEBUG", "INFO", "WARNING", "ERROR"]))
    return site


# -- breaking them ------------------------------------------------------------------------------

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**20),
    st.floats(),
    st.text(max_size=30),
    st.text(st.characters(codec="utf-8"), max_size=10),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
)
# Snippets of YAML syntax spliced into the text: anchors, aliases, tags, flow brackets, merges,
# documents, directives, block scalars, escapes, control characters.
SNIPPETS = [
    "&a ", "*a", "*zz", "[", "]", "{", "}", ": ", "- ", "? ", "<<: *a\n", "!!binary ",
    "!!python/object:os.system ", "!!int ", "!!float ", "!!timestamp ", "---\n", "...\n",
    "%YAML 1.1\n---\n", "|\n", ">-\n", '"\\x', '"\\u12', "\t", "\ufeff", "\x85", "\u2028",
    "\x07", "#", "'", '"', "0x", "0o7", ".inf", ".nan", "~", "2001-13-45", "9" * 400,
    "&a [*a]", "[" * 80, "{a: " * 70,
]  # fmt: skip


def _paths(node: Any, at: tuple[Any, ...] = (), seen: set[int] | None = None) -> list[Any]:
    """Every key path in `node`, each shared or looping container walked once."""
    seen = set() if seen is None else seen
    out = [at]
    if isinstance(node, (dict, list)):
        if id(node) in seen:
            return out
        seen.add(id(node))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            out += _paths(value, (*at, key), seen)
    return out


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        node = node[part]
    return node


@st.composite
def broken_sites(draw: st.DrawFn) -> dict[str, Any]:
    """A valid site with 1-4 mutations applied."""
    site = copy.deepcopy(draw(sites()))
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(site) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _get(site, path[:-1]), path[-1]
        how = draw(st.sampled_from(["replace", "delete", "unknown", "nest", "share", "self"]))
        if how == "replace":
            parent[key] = draw(junk)
        elif how == "delete":
            del parent[key]
        elif how == "unknown" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=12))] = draw(junk)
        elif how == "nest":
            value = parent[key]
            for _ in range(draw(st.integers(1, 100))):
                value = draw(st.sampled_from([[value], {"x": value}]))
            parent[key] = value
        elif how == "share":  # the same object twice: YAML writes an anchor and an alias
            parent[key] = _get(site, draw(st.sampled_from(paths)))
        elif how == "self" and isinstance(parent[key], (dict, list)):
            target = parent[key]  # a node that contains itself
            if isinstance(target, dict):
                target["loop"] = target
            else:
                target.append(target)
    return site


@st.composite
def texts(draw: st.DrawFn) -> str:
    """YAML text of a (usually broken) site, sometimes with YAML syntax spliced in."""
    site = draw(st.one_of(sites(), broken_sites()))
    try:
        text = yaml.safe_dump(site, sort_keys=False, allow_unicode=draw(st.booleans()))
    except (yaml.YAMLError, RecursionError, ValueError):
        assume(False)
        raise AssertionError("unreachable") from None
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(SNIPPETS)) + text[at:]
    return text


def assert_clean(load: Any, source: str) -> SiteConfig | None:
    """Run `load()`: a SiteConfig, or a ConfigError that names `source`; nothing else."""
    try:
        config = load()
    except ConfigError as exc:
        message = str(exc)
        first = message.splitlines()[0] if message else ""
        assert source in first, f"the error does not name the file:\n{message}"
        assert "Traceback" not in message
        assert len(message) < 20_000, f"a {len(message)}-character error message"
        assert all(line.strip() for line in message.splitlines()), message
        return None
    assert isinstance(config, SiteConfig)
    return config


# -- the properties -----------------------------------------------------------------------------


@settings(FUZZ, max_examples=30)
@given(sites())
def test_generated_sites_load(site):
    # The generator's valid sites are valid: the fuzz starts from configs that work.
    config = parse_config(yaml.safe_dump(site), source="fuzz.yaml")
    assert len(config.devices) == len(site["devices"])


@FUZZ
@given(texts())
@pytest.mark.timeout(120)
def test_any_text_loads_or_is_refused_cleanly(text):
    assert_clean(lambda: parse_config(text, source="fuzz.yaml"), "fuzz.yaml")


@settings(FUZZ, max_examples=100)
@given(
    texts(),
    st.lists(st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=8)), max_size=3),
)
@pytest.mark.timeout(120)
def test_any_file_loads_or_is_refused_cleanly(text, splices):
    data = text.encode("utf-8")
    for at, chunk in splices:
        at %= len(data) + 1
        data = data[:at] + chunk + data[at:]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "site.yaml"
        path.write_bytes(data)
        assert_clean(lambda: load_config(path), str(path))


# -- the real command ---------------------------------------------------------------------------

CHECK_CASES = {
    "valid": "site_id: a\ngateway_id: g\ndevices: []\n",
    "wrong types": "site_id: 5\ngateway_id: [1]\ndevices: {a: 1}\nhttp: {port: true}\n",
    "binary": b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x03\x00>\x00",
}


@pytest.mark.parametrize("case", list(CHECK_CASES))
def test_the_check_command_exits_0_or_2_without_a_traceback(tmp_path, case):
    content = CHECK_CASES[case]
    path = tmp_path / "site.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr
    if case == "valid":
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == 2, done.stderr
        assert str(path) in done.stderr.splitlines()[0]
