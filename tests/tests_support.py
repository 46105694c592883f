"""Helpers shared by the test modules (on pytest's pythonpath; see pyproject.toml).

Plain functions and classes live here, so that helper classes (a fake plant, a proxy) can use
them too; fixtures that wrap them live in conftest.py.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from gateway.config import SiteConfig

# A realistic epoch (November 2023): code that stores or formats wall-clock times sees a
# plausible one, and code that only takes differences does not care.
EPOCH = 1_700_000_000.0


class FakeClock:
    """A clock the test moves by hand, for code that takes a `clock` callable."""

    def __init__(self, now: float = EPOCH) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the clock forward and return the new time."""
        self.now += seconds
        return self.now


def import_file(path: Path, name: str | None = None) -> ModuleType:
    """Import a Python file that is not on sys.path, as module `name` (default: its stem)."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    assert spec is not None and spec.loader is not None, f"cannot import {path}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    # Not port 0 at bind time: fakes that restart (a PLC power cycle) must come back on the
    # port the driver was configured with. Nothing holds it in between; a collision is rare.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def eventually(check: Callable[[], Any], within: float = 10.0, what: str = "") -> Any:
    """Poll `check` until it returns a truthy value; fail with `what` after `within` s."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what or check}")
        await asyncio.sleep(0.05)


def plant_config(tmp_path: Path, tank_port: int, meter_port: int) -> SiteConfig:
    """The demo config pointed at a test's tank and meter, polling fast, no OPC UA server."""
    import yaml

    from gateway.config import parse_config
    from gateway.demo import demo_config_data

    data = demo_config_data(
        device_ports={"tank1": tank_port, "meter1": meter_port}, http_port=0, opcua_port=0
    )
    for device in data["devices"]:
        device["options"].update(poll_interval_s=0.1, timeout_s=0.3)
    data["storage"]["path"] = str(tmp_path / "twin.db")
    data["opcua_server"]["enabled"] = False
    return parse_config(yaml.safe_dump(data), source="test")


def stored_telemetry(conn: Any) -> list[tuple[Any, ...]]:
    """Every telemetry row a twin database holds (blocks, then the frames not compacted yet),
    as `(rev, ts, pid, value, quality, source_ts, reason)` in rev order."""
    from gateway.twin import codec

    (compacted,) = conn.execute("SELECT value FROM meta WHERE key = 'compacted_rev'").fetchone()
    rows: list[tuple[Any, ...]] = []
    for (body,) in conn.execute("SELECT body FROM blocks"):
        rows += codec.decode(body).rows()
    for (body,) in conn.execute("SELECT body FROM frames WHERE rev0 > ?", (compacted,)):
        rows += codec.decode(body).rows()
    return sorted(rows)


def stored_revs(conn: Any) -> list[int]:
    """Every rev a twin database holds, telemetry and other events, ascending."""
    return sorted(
        [row[0] for row in stored_telemetry(conn)]
        + [rev for (rev,) in conn.execute("SELECT rev FROM events")]
    )


def write_policy(
    folder: Path, source: Path, changes: Mapping[str, Any], *, policy_id: str | None = None
) -> Path:
    """Copy the policy file `source` into `folder` with `changes` made, and return the copy.

    `changes` maps dotted key paths (`trigger.for_s`, `simulation.model.gain`) to new values;
    None deletes the key; `policy_id` renames it (the file is named after the id). The copy is
    parsed (gateway.policy.load, without a site config), so a test that breaks its policy fails
    here, naming the key, not later as a gateway that refuses to start.
    """
    import yaml

    from gateway.policy.load import parse_policy

    data = yaml.safe_load(source.read_text(encoding="utf-8"))
    if policy_id is not None:
        data["id"] = policy_id
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{data['id']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    parse_policy(path.read_text(encoding="utf-8"), source=str(path))
    return path


async def logged_events(store: Any, *types: str) -> list[Any]:
    """The events of the given types (all, if none) a TwinStore has committed, oldest first."""
    await store.aflush()
    events = await asyncio.to_thread(store.events_since, 0, 1_000_000)
    return [e for e in events if not types or e.type in types]


# The application URI of the test SCADA client's certificate (conftest's `client_pki`).
SCADA_CLIENT_URI = "urn:opstwin-tests:scada"


@dataclass(frozen=True)
class ClientPki:
    """A SCADA client's certificate and key files."""

    cert: Path
    key: Path


async def account_headers(
    accounts: Any, specs: Mapping[str, tuple[str, list[str]]], password: str
) -> dict[str, dict[str, str]]:
    """Make each account of `specs` (name → ("user" or "token", grant specs)) in control.db,
    users with `password`; return each one's Authorization header."""
    import base64

    from gateway.control.users import parse_grant

    headers: dict[str, dict[str, str]] = {}
    for name, (kind, grant_specs) in specs.items():
        grants = [parse_grant(spec) for spec in grant_specs]
        if kind == "user":
            await asyncio.to_thread(accounts.add_user, name, password, grants)
            secret = base64.b64encode(f"{name}:{password}".encode()).decode()
            headers[name] = {"Authorization": f"Basic {secret}"}
        else:
            token = await asyncio.to_thread(accounts.create_token, name, grants)
            headers[name] = {"Authorization": f"Bearer {token.secret}"}
    return headers


async def settle(engine: Any) -> None:
    """Let a PolicyEngine finish what it started: scheduled evaluations and policy tasks."""
    for _ in range(1000):
        await asyncio.sleep(0)
        tasks = list(engine._tasks)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        elif not engine._scheduled:
            return
    pytest.fail("the engine never settled")


def drop_meter(data: dict[str, Any]) -> None:
    """Remove meter1 from demo config data, and its points from the anomaly rules (each glob
    must match a point)."""
    data["devices"] = [d for d in data["devices"] if d["name"] != "meter1"]
    rules = []
    for rule in data["anomalies"]["rules"]:
        rule["points"] = [g for g in rule["points"] if "/meter1/" not in g]
        if rule["points"]:
            rules.append(rule)
    data["anomalies"]["rules"] = rules


NOBODY = 65534  # the unprivileged user and group a child drops to


def as_nobody(work: Callable[[], str], *, cwd: Path | None = None) -> str:
    """Run `work` in a forked child as user nobody (when root: root ignores permission bits)
    and return the text it returns, or `Type: message` of what it raised.

    Forked rather than a new interpreter: nobody cannot read the interpreter under /root. The
    child changes into `cwd` first, while it still may.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            if cwd is not None:
                os.chdir(cwd)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)
            try:
                outcome = work()
            except BaseException as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            os.write(write, outcome.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    return outcome
