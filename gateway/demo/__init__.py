"""`opstwin demo`: the simulated plant in its own process, and a gateway reading it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

import gateway
from gateway.app import Gateway
from gateway.config import SiteConfig, load_config
from gateway.demo.broker import INSTALL_HINT, LocalBroker, mosquitto_binary
from gateway.demo.cloud import CloudView
from gateway.demo.script import PLANT_SPEED, Script, banner, make_supervisor
from gateway.errors import ConfigError, GatewayError
from gateway.opcua_server.users import hash_password
from gateway.policy.anomaly import glob_matcher
from gateway.policy.load import load_policies
from gateway.serve import serve

SCADA_USER = "scada"
# The repo's policies for the demo plant (the project is installed editable, so they sit beside
# the package); the demo runs copies of them, their plant times scaled to PLANT_SPEED.
SHIPPED_POLICIES = Path(gateway.__file__).resolve().parents[1] / "policies"
# Keys holding seconds of plant time: a hold and a rate-limit window. A simulation's horizon
# stays as it is: it is plant time inside the model too.
_PLANT_SECONDS = re.compile(r"\b(for_s|per_s)(\s*:\s*)(\d+(?:\.\d*)?)")


def run_demo(*, state_dir: str, http_port: int, seed: int, duration: float | None) -> int:
    """Start the plant simulator, write the demo config, run the gateway; return an exit code."""
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    ports = {"tank1": _free_port(), "meter1": _free_port(), "oven-plc": _free_port()}
    http_port = _prefer(http_port, "HTTP")
    opcua_port = _prefer(4840, "OPC UA")
    sim_log = state / "plantsim.log"
    with sim_log.open("w") as log_file:
        # Its own process, as real hardware would be: the gateway reaches it only over TCP.
        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "plantsim",
                "--seed",
                str(seed),
                "--speed",
                str(PLANT_SPEED),
                "--tank-port",
                str(ports["tank1"]),
                "--meter-port",
                str(ports["meter1"]),
                "--plc-port",
                str(ports["oven-plc"]),
                "--stdin",
            ],
            stdin=subprocess.PIPE,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    broker = _start_broker(state)
    try:
        _wait_for_ports(sim, list(ports.values()), sim_log)
        # A fresh password each run: the demo never ships a default credential.
        password = secrets.token_urlsafe(9)
        policies = install_policies(state / "policies")
        config_path = write_demo_config(
            state,
            device_ports=ports,
            http_port=http_port,
            opcua_port=opcua_port,
            users=[
                {"username": SCADA_USER, "password_hash": hash_password(password), "role": "viewer"}
            ],
            policies_dir="policies",
            sync_broker=broker.url if broker is not None else None,
        )
        config = load_config(config_path)
        if policies:
            _check_policies(state / "policies", config)
        asyncio.run(_run(config, config_path, sim, sim_log, password, duration, broker))
    finally:
        if broker is not None:
            broker.stop()
        sim.terminate()
        try:
            sim.wait(5)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait()
    return 0


def demo_config_data(
    *,
    device_ports: Mapping[str, int],
    http_port: int,
    opcua_port: int,
    users: list[dict[str, str]] | None = None,
    policies_dir: str | None = None,
    sync_broker: str | None = None,
) -> dict[str, Any]:
    """The bundled demo config as data, pointed at the given ports (and policy folder).

    Devices without a port are left out (a test may start only part of the plant).
    """
    text = resources.files("gateway.demo").joinpath("site.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    kept = []
    for device in data["devices"]:
        port = device_ports.get(device["name"])
        if port is None:
            continue
        scheme, _, rest = device["endpoint"].partition("://")
        path = rest.partition("/")[2]
        device["endpoint"] = f"{scheme}://127.0.0.1:{port}" + (f"/{path}" if path else "")
        kept.append(device)
    data["devices"] = kept
    _keep_anomaly_rules_of(data)
    data["http"]["port"] = http_port
    data["opcua_server"]["endpoint"] = f"opc.tcp://127.0.0.1:{opcua_port}/opstwin"
    if users:
        data["opcua_server"]["users"] = users
    if policies_dir is not None:
        data["policies"] = {"dir": policies_dir}
    if sync_broker is not None:
        # Reconnects within 2 s, so the demo's broker outage ends on screen, not 30 s later.
        data["sync"] = {"broker": sync_broker, "reconnect_max_s": 2.0}
    return data


def install_policies(folder: Path, source: Path = SHIPPED_POLICIES) -> list[str]:
    """Fill `folder` with demo copies of the shipped policies; return their file names.

    Copies, not the files: the demo plant runs PLANT_SPEED times faster than real time, so
    each copy's `for_s` and `per_s` (plant seconds) are divided by it. A previous run's copies
    are replaced. Without the shipped folder the demo runs with none, and says so.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.y*ml"):
        old.unlink()
    if not source.is_dir():
        print(f"opstwin demo: no policies folder at {source}; running without policies")
        return []
    names = []
    for path in sorted(source.glob("*.yaml")):
        text = demo_policy_text(path.read_text(encoding="utf-8"), PLANT_SPEED, path.name)
        (folder / path.name).write_text(text, encoding="utf-8")
        names.append(path.name)
    return names


def demo_policy_text(text: str, speed: float, name: str) -> str:
    """A policy file's text with its plant-time durations divided by `speed`, comments kept."""

    def scaled(match: re.Match[str]) -> str:
        return f"{match[1]}{match[2]}{float(match[3]) / speed:g}"

    header = (
        f"# Demo copy of policies/{name}, written by `opstwin demo`; edit the original instead.\n"
        f"# for_s and per_s are divided by {speed:g}: the demo plant runs {speed:g}x faster than "
        "real time.\n"
    )
    return header + _PLANT_SECONDS.sub(scaled, text)


def _check_policies(folder: Path, config: SiteConfig) -> None:
    # An invalid policy would stop the gateway from starting; the demo runs without instead.
    try:
        load_policies(folder, config)
    except ConfigError as exc:
        first = str(exc).splitlines()[0]
        print(f"opstwin demo: the policies do not load ({first}); running without policies")
        for path in folder.glob("*.y*ml"):
            path.unlink()


def _keep_anomaly_rules_of(data: dict[str, Any]) -> None:
    """Drop the anomaly globs of the points of devices left out, and rules left with none:
    every glob of a config must match a declared point."""
    ids = [point["id"] for device in data["devices"] for point in device["points"]]
    rules = []
    for rule in data.get("anomalies", {}).get("rules", []):
        rule["points"] = [g for g in rule["points"] if any(map(glob_matcher(g), ids))]
        if rule["points"]:
            rules.append(rule)
    if "anomalies" in data:
        data["anomalies"]["rules"] = rules


def write_demo_config(state: Path, **ports: Any) -> Path:
    """Write the demo config (see `demo_config_data`) into `state`; return its path."""
    data = demo_config_data(**ports)
    path = state / "site.yaml"
    header = "# Written by `opstwin demo` from gateway/demo/site.yaml; edit that file instead.\n"
    # It holds the users' password hashes: private whatever the umask (0600 before any byte).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        f.write(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


async def _run(
    config: SiteConfig,
    config_path: Path,
    sim: subprocess.Popen,
    sim_log: Path,
    password: str,
    duration: float | None,
    broker: LocalBroker | None = None,
) -> None:
    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()  # held so the script task is not garbage-collected

    async def on_ready(gateway: Gateway, urls: list[str]) -> None:
        base = urls[0] if urls else f"http://{config.http.host}:{config.http.port}"
        # The operator UI's user for this run: a supervisor with a fresh password (no default).
        supervisor_password = secrets.token_urlsafe(9)
        try:
            await asyncio.to_thread(make_supervisor, gateway.accounts, supervisor_password)
        except GatewayError as exc:
            print(f"operator UI: cannot make the demo's supervisor: {exc}", flush=True)
        banner(
            gateway,
            base,
            config_path,
            sim_log,
            SCADA_USER,
            password,
            ui_password=supervisor_password,
        )
        script = Script(
            gateway,
            sim,
            SCADA_USER,
            password,
            base_url=base,
            config_path=config_path,
            cloud=CloudView(gateway, broker),
            supervisor_password=supervisor_password,
        ).run(stop, duration)
        tasks.add(asyncio.create_task(script, name="demo:script"))

    # The file, so that SIGHUP (the script's reload step, or `kill -HUP`) re-reads it; the
    # log level is the command line's.
    await serve(
        config, on_ready=on_ready, stop=stop, config_path=config_path, log_level_pinned=True
    )


def _start_broker(state: Path) -> LocalBroker | None:
    """A local mosquitto for the cloud side of the demo, or None (and how to get one)."""
    if mosquitto_binary() is None:
        print(
            f"cloud sync: mosquitto is not installed, so the demo runs without its cloud side; "
            f"`{INSTALL_HINT}` and run the demo again to see the cloud mirror",
            flush=True,
        )
        return None
    folder = state / "broker"
    # Sessions and queued messages kept across the demo's broker outage (saved to disk when it
    # stops), as a cloud broker would: the mirror's persistent session then gets the backlog
    # the gateway sends before the mirror is back. A previous run's are not this run's.
    (folder / "mosquitto.db").unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    broker = LocalBroker(
        folder,
        extra_config=f"persistence true\npersistence_location {folder}/\nautosave_interval 0",
    )
    try:
        broker.start()
    except (OSError, RuntimeError) as exc:
        print(f"cloud sync: the local mosquitto did not start ({exc}); running without it")
        return None
    return broker


def _prefer(port: int, what: str) -> int:
    if port and not _port_is_free(port):
        # A demo should start on a busy laptop; a production config fails loudly instead.
        chosen = _free_port()
        print(f"opstwin demo: {what} port {port} is in use; using {chosen}")
        return chosen
    return port


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _wait_for_ports(sim: subprocess.Popen, ports: list[int], sim_log: Path) -> None:
    deadline = time.monotonic() + 30
    pending = list(ports)
    while pending:
        if sim.poll() is not None:
            raise GatewayError(
                f"the plant simulator exited with code {sim.returncode}:\n{sim_log.read_text()}"
            )
        if time.monotonic() > deadline:
            raise GatewayError(f"the plant simulator did not open ports {pending}; see {sim_log}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", pending[0]), 0.5):
            pending.pop(0)
            continue
        time.sleep(0.1)
