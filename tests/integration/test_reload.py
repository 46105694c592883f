"""SIGHUP reloads the site config and its policies in a running `opstwin run` process.

The gateway is a real process, reading the simulated plant (hardware-sim) over real Modbus
sockets and serving HTTP and OPC UA; the test rewrites its config file (atomically, as an
editor saves it), sends SIGHUP with os.kill, and watches /health, /twin, /diff, /metrics, the
OPC UA address space, the notify socket (RELOADING=1 … READY=1) and the process's log.

Whether the unchanged device lost a sample is checked by what would betray a lost one: the
simulated tank still holds the very TCP connection the gateway opened at start (a restarted
driver would have a new one), the gateway counts one connect to it, no state event was recorded
for it, and its history runs on across the reload without a gap of more than a second or two
(it is polled every 0.1 s; the bound is loose because the machine is shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import os
import signal
import socket
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import Client, ua
from prometheus_client.parser import text_string_to_metric_families
from tests_support import drop_meter, eventually, free_port

from drivers.modbus import ModbusDriver
from gateway.app import Gateway
from gateway.config import load_config
from gateway.demo import demo_config_data
from gateway.errors import StoreError
from gateway.http import create_app
from gateway.reload import reload_file
from plantsim import Plant

# Each test starts `opstwin run` as a process (imports, plant, gateway): several seconds.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
VIBRATION = "utilities/cooling/tank1/pump_vibration"
LEVEL = "utilities/cooling/tank1/level"
LEVEL_AUX = "utilities/cooling/tank1/level_aux"
POWER = "utilities/power/meter1/power"
POLICY = "tank-level-high"


# -- the rig ---------------------------------------------------------------------------------------


@dataclass
class Running:
    """One `opstwin run` process, its config file, notify socket and log."""

    config: Path
    http: str
    log: Path
    proc: asyncio.subprocess.Process
    notify: socket.socket
    opcua: str | None = None
    notes: list[str] = field(default_factory=list)

    async def get(self, path: str) -> Any:
        def read() -> Any:
            with urllib.request.urlopen(self.http + path, timeout=10) as answer:
                return json.load(answer)

        return await asyncio.to_thread(read)

    async def text(self, path: str) -> str:
        def read() -> str:
            with urllib.request.urlopen(self.http + path, timeout=10) as answer:
                return str(answer.read().decode())

        return await asyncio.to_thread(read)

    async def health(self) -> dict[str, Any]:
        body: dict[str, Any] = await self.get("/health")
        return body

    def write_config(self, data: dict[str, Any] | str) -> None:
        """Save the config as an editor does: a new file renamed over the old one."""
        text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.config)

    async def reload(self, number: int) -> dict[str, Any]:
        """SIGHUP, then wait for reload `number` to be done; return its /health `config`."""
        os.kill(self.proc.pid, signal.SIGHUP)

        async def done() -> dict[str, Any] | None:
            config: dict[str, Any] = (await self.health())["config"]
            last = config["last_reload"]
            return config if last is not None and last["number"] >= number else None

        return await until(done, what=f"reload {number}")

    async def notifications(self, until_prefix: str, within: float = 20.0) -> list[str]:
        """Notify messages until one starts with `until_prefix`."""
        loop = asyncio.get_running_loop()
        got: list[str] = []
        deadline = time.monotonic() + within
        while not any(m.startswith(until_prefix) for m in got):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {until_prefix} within {within} s; got {got}"
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(loop.sock_recv(self.notify, 4096), remaining)
                got.append(data.decode())
        return got

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        found = {}
        for family in text_string_to_metric_families(await self.text("/metrics")):
            for sample in family.samples:
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return found

    def log_lines(self) -> list[str]:
        return self.log.read_text(encoding="utf-8", errors="replace").splitlines()


async def until(check: Callable[[], Any], within: float = 30.0, what: str = "") -> Any:
    """Await `check()` until it returns something truthy (generous: the machine is shared)."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {within} s waiting for {what}"
        await asyncio.sleep(0.1)


def site_data(plant: Plant, http_port: int, *, opcua_port: int | None = None) -> dict[str, Any]:
    """The demo config on this plant: tank1 and meter1 polled every 0.1 s, the tank policy."""
    data = demo_config_data(
        device_ports={"tank1": plant.tank.port, "meter1": plant.meter.port},
        http_port=http_port,
        opcua_port=opcua_port or 0,
        policies_dir="policies",
    )
    for device in data["devices"]:
        device["options"].update(poll_interval_s=0.1, timeout_s=1.0)
    data["opcua_server"]["enabled"] = opcua_port is not None
    return data


def write_policy(folder: Path, **trigger: Any) -> Path:
    """The shipped tank policy with `trigger` changed, few paths: a quick simulation."""
    data = yaml.safe_load((ROOT / "policies" / f"{POLICY}.yaml").read_text(encoding="utf-8"))
    data["trigger"].update(trigger)
    data["simulation"]["paths"] = 200
    folder.mkdir(exist_ok=True)
    path = folder / f"{POLICY}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def without_meter(data: dict[str, Any]) -> dict[str, Any]:
    """`data` without meter1, nor its points in the anomaly rules."""
    data = copy.deepcopy(data)
    drop_meter(data)
    return data


@contextlib.asynccontextmanager
async def running(tmp_path: Path, data: dict[str, Any]) -> AsyncIterator[Running]:
    """`opstwin run --config` on `data`, READY; SIGTERM and a clean exit afterwards."""
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "gateway.cli", "run", "--config", str(config)),
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    gateway = Running(config, f"http://127.0.0.1:{data['http']['port']}", log, proc, notify)
    try:
        await gateway.notifications("READY=1", within=60)
        yield gateway
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
        assert proc.returncode == 0, log.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        notify.close()


async def all_good(gateway: Running) -> bool:
    twin = await gateway.get("/twin")
    return all(p["quality"] == "GOOD" for p in twin["points"].values())


async def events(gateway: Running, kind: str) -> list[dict[str, Any]]:
    """Every committed event of one type, oldest first."""
    found: list[dict[str, Any]] = []
    since = "0"
    while True:
        page = await gateway.get(f"/diff?since={since}&limit=1000")
        found += [e for e in page["events"] if e["type"] == kind]
        if not page["events"]:
            return found
        since = page["next_cursor"]


# -- refused ---------------------------------------------------------------------------------------


async def test_a_file_that_would_not_start_is_refused_whole_and_the_running_set_stays(
    tmp_path: Path,
) -> None:
    async with Plant(seed=7) as plant:
        data = site_data(plant, free_port())
        write_policy(tmp_path / "policies", when="level > 4.2")
        async with running(tmp_path, data) as gateway:
            await until(lambda: all_good(gateway), what="every point GOOD")
            config = (await gateway.health())["config"]
            assert config["file"] == str(gateway.config)
            assert (config["generation"], config["last_reload"]) == (1, None)
            assert config["policies"] == [POLICY]
            before = await gateway.metrics()

            level = data["devices"][0]["points"].index(
                next(p for p in data["devices"][0]["points"] if p["id"] == LEVEL)
            )
            lo_above_hi = copy.deepcopy(data)
            lo_above_hi["devices"][0]["points"][level]["range"] = {"lo": 5, "hi": 1}
            policy_on_a_gone_point = copy.deepcopy(data)
            policy_on_a_gone_point["devices"] = [d for d in data["devices"] if d["name"] != "tank1"]
            policy_on_a_gone_point["anomalies"] = {"rules": []}
            bad_files: list[tuple[dict[str, Any] | str | None, list[str]]] = [
                (
                    "site_id: demo-plant\ndevices: [\n  {name: tank1\n",
                    [str(gateway.config), "line"],
                ),
                (lo_above_hi, [f"devices[0].points[{level}].range", "lo must be below hi"]),
                # What Gateway.__init__ refuses: a policy on points the new file drops.
                (policy_on_a_gone_point, [f"{POLICY}.yaml", "utilities/cooling/tank1/level"]),
                ("\x00\x01garbage", ["binary file"]),
                (None, [str(gateway.config), "No such file"]),  # deleted
            ]
            for number, (content, said) in enumerate(bad_files, start=1):
                if content is None:
                    gateway.config.unlink()
                else:
                    gateway.write_config(content)
                config = await gateway.reload(number)
                last = config["last_reload"]
                assert last["ok"] is False and config["generation"] == 1, last
                assert all(s in last["error"] for s in said), (said, last["error"])
                # systemd heard of it: reloading, then ready again.
                notes = await gateway.notifications("READY=1")
                assert any(n.startswith("RELOADING=1\nMONOTONIC_USEC=") for n in notes), notes

            # The running set is untouched: same devices, same points, still reporting, and
            # a refused file is no reason to call the gateway degraded.
            health = await gateway.health()
            assert health["status"] == "ok", health["reasons"]
            assert {n: d["state"] for n, d in health["devices"].items()} == {
                "tank1": "CONNECTED",
                "meter1": "CONNECTED",
            }
            assert health["config"]["policies"] == [POLICY]
            twin = await gateway.get("/twin")
            assert POWER in twin["points"] and LEVEL in twin["points"]
            after = await until(
                lambda: _moved(gateway, before), what="samples from both devices after the reloads"
            )
            connects = {k: v for k, v in after.items() if k[0] == "opstwin_device_connects_total"}
            assert set(connects.values()) == {1.0}, connects  # nobody reconnected

    errors = [line for line in gateway.log_lines() if "reload" in line and "refused" in line]
    assert len(errors) == len(bad_files), "\n".join(errors)
    assert all("error" in line.lower() for line in errors), errors  # the level
    assert not any("Traceback" in line for line in gateway.log_lines())


async def _moved(gateway: Running, before: dict[Any, float]) -> dict[Any, float] | None:
    now = await gateway.metrics()
    for device in ("tank1", "meter1"):
        key = ("opstwin_device_samples_total", (("device", device),))
        if now.get(key, 0) <= before.get(key, 0):
            return None
    return now


# -- applied ---------------------------------------------------------------------------------------


async def test_a_good_file_applies_a_new_point_a_removed_device_and_loses_no_sample(
    tmp_path: Path,
) -> None:
    async with Plant(seed=8) as plant:
        opcua_port = free_port()
        data = site_data(plant, free_port(), opcua_port=opcua_port)
        policy = write_policy(tmp_path / "policies", when="level > 4.2")  # never, at ~2.5 m
        async with running(tmp_path, data) as gateway:
            await until(lambda: all_good(gateway), what="every point GOOD")
            endpoint = f"opc.tcp://127.0.0.1:{opcua_port}/opstwin"
            assert await opcua_read(endpoint, POWER) is not None
            assert await opcua_read(endpoint, LEVEL_AUX) is None
            # The tank's side of the gateway's connection (the simulated device's own record).
            (tank_connection,) = plant.tank.server._connections
            assert await events(gateway, "ProposalCreated") == []

            new = without_meter(data)
            aux = copy.deepcopy(new["devices"][0])
            aux.update(name="tank1-aux", points=[
                {"id": LEVEL_AUX, "address": "input:0", "datatype": "float32", "unit": "m"}
            ])  # fmt: skip
            new["devices"].append(aux)
            new["http"]["max_connections"] = 32  # bound at start: waits for a restart
            gateway.write_config(new)
            write_policy(policy.parent, when="level > 0.5", for_s=1)  # fires at once
            reloaded_at = time.time()
            config = await gateway.reload(1)

            last = config["last_reload"]
            assert last["ok"] is True and config["generation"] == 2, last
            assert last["changes"] == [
                "+1 device (tank1-aux)",
                "-1 device (meter1)",
                "+1 point",
                "-6 points",
                "anomaly rules changed",
                "policies 1 (edited)",
            ]
            assert config["restart_needed"] == ["http.max_connections"]
            (reloaded,) = await events(gateway, "ConfigReloaded")
            assert reloaded["data"] == {
                "generation": 2,
                "changes": last["changes"],
                "restart_needed": ["http.max_connections"],
            }

            # The new point gets values; the removed device's points are no longer served.
            twin = await until(
                lambda: _with_good(gateway, LEVEL_AUX), what="the new point GOOD in /twin"
            )
            assert not any(p.startswith("utilities/power/meter1/") for p in twin["points"])
            # The same register as tank1's level, read by the new device's own driver.
            assert twin["points"][LEVEL_AUX]["value"] == pytest.approx(
                twin["points"][LEVEL]["value"], abs=0.05
            )
            # Its history is served like any other's; a removed point's is not, as after a
            # restart that drops it (the rows stay in the database).
            aux = await gateway.get(f"/telemetry/query?point={LEVEL_AUX}&start=0")
            assert aux["rows"] and aux["rows"][-1]["quality"] == "GOOD"
            with pytest.raises(urllib.error.HTTPError) as gone:
                await gateway.get(f"/telemetry/query?point={POWER}&start=0")
            assert gone.value.code == 404
            health = await gateway.health()
            assert set(health["devices"]) == {"tank1", "tank1-aux"}
            assert health["status"] == "ok", health["reasons"]

            # The removed device's driver stopped: the meter has no connection left, and the
            # event log says why.
            await eventually(lambda: plant.meter.server.connections == 0, what="meter closed")
            closed = [e for e in await events(gateway, "DeviceStateChanged")
                      if e["data"]["state"] == "CLOSED"]  # fmt: skip
            assert [(e["data"]["device"], e["data"]["reason"]) for e in closed] == [
                ("meter1", "removed from the site config (reload 1)")
            ]

            # The unchanged device lost nothing: the same connection, one connect, no state
            # change, and its history runs on across the reload.
            assert tank_connection in plant.tank.server._connections
            metrics = await gateway.metrics()
            assert metrics[("opstwin_device_connects_total", (("device", "tank1"),))] == 1.0
            tank_states = [e for e in await events(gateway, "DeviceStateChanged")
                           if e["data"]["device"] == "tank1"]  # fmt: skip
            assert [e["data"]["state"] for e in tank_states] == ["CONNECTED"]
            await asyncio.sleep(1.0)  # a second of samples after the reload
            rows = (
                await gateway.get(
                    f"/telemetry/query?point={VIBRATION}&start={reloaded_at - 3}"
                    f"&end={reloaded_at + 10}&limit=10000"
                )
            )["rows"]
            stamps = [r["ts"] for r in rows]
            assert stamps[0] < reloaded_at < stamps[-1], (stamps[:3], reloaded_at, stamps[-3:])
            worst = max(b - a for a, b in itertools.pairwise(stamps))
            assert worst < 2.0, f"a {worst:.2f} s gap in {VIBRATION}'s history (polled at 0.1 s)"

            # The edited policy decides now: its proposal is in the event log.
            created = await until(
                lambda: events(gateway, "ProposalCreated"), what="the edited policy's proposal"
            )
            assert created[0]["data"]["policy"] == POLICY, created[0]

            # The OPC UA server serves the new point set on the same endpoint.
            value = await until(lambda: opcua_read(endpoint, LEVEL_AUX), what="the new node")
            assert value == pytest.approx(plant.tank.model.level_m, abs=0.05)
            assert await opcua_read(endpoint, POWER) is None

    lines = gateway.log_lines()
    summary = [line for line in lines if "reload 1:" in line and "+1 device" in line]
    assert len(summary) == 1, "\n".join(lines[-40:])
    assert "-1 device (meter1)" in summary[0] and "policies 1 (edited)" in summary[0]
    restart = [line for line in lines if "reload 1: not applied until a restart" in line]
    assert len(restart) == 1 and "http.max_connections" in restart[0]
    assert not any("Traceback" in line for line in lines)


async def _with_good(gateway: Running, point_id: str) -> dict[str, Any] | None:
    twin: dict[str, Any] = await gateway.get("/twin")
    point = twin["points"].get(point_id)
    return twin if point is not None and point["quality"] == "GOOD" else None


async def opcua_read(endpoint: str, point_id: str) -> float | None:
    """A SCADA client's read of a point's variable; None when the server has no such node."""
    async with Client(endpoint, timeout=10) as client:
        node = client.get_node(ua.NodeId(point_id, 2))
        try:
            data = await node.read_data_value()
        except ua.UaStatusCodeError as exc:
            if exc.code == ua.StatusCodes.BadNodeIdUnknown:
                return None
            raise
    if data.StatusCode is not None and not data.StatusCode.is_good():
        return None
    return float(data.Value.Value) if data.Value is not None else None


# -- undone ---------------------------------------------------------------------------------------


async def test_when_the_twin_cannot_declare_the_points_the_stopped_devices_run_again(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    """In-process, to see the drivers themselves: the twin's points cannot be written (another
    connection holds the database's write lock past the busy timeout), so the reload is undone:
    the device stopped for it runs again with its old settings, and nothing else changed."""
    async with Plant(seed=9) as plant:
        data = site_data(plant, 0)
        data["policies"] = {"dir": None}
        data["storage"]["path"] = str(tmp_path / "twin.db")
        path = tmp_path / "site.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        gateway = Gateway(load_config(path))
        await aiohttp_client(create_app(gateway))
        await eventually(lambda: gateway.store.get(LEVEL).quality.name == "GOOD", what="level")
        running = gateway.config
        old_tank = gateway.drivers["tank1"]

        new = copy.deepcopy(data)
        new["devices"][0]["options"]["poll_interval_s"] = 0.5  # tank1 changed: it restarts
        new["devices"][0]["points"].append(
            {"id": "utilities/cooling/tank1/spare", "address": "holding:30", "datatype": "uint16"}
        )
        path.write_text(yaml.safe_dump(new, sort_keys=False), encoding="utf-8")
        holder = sqlite3.connect(gateway.store.path, timeout=0, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreError, match="locked"):
                await reload_file(gateway, path, number=1)
        finally:
            holder.execute("ROLLBACK")
            holder.close()

        assert gateway.config is running
        assert "utilities/cooling/tank1/spare" not in gateway.points
        tank = gateway.drivers["tank1"]
        assert tank is not old_tank  # stopped for the reload, then started again as it was
        assert isinstance(tank, ModbusDriver) and tank.options.poll_interval_s == 0.1
        await eventually(
            lambda: gateway.device_states()["tank1"]["state"] == "CONNECTED", what="tank1 back"
        )
        before = gateway.samples_received["tank1"]
        await eventually(lambda: gateway.samples_received["tank1"] > before, what="tank samples")
