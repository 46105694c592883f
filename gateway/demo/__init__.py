"""`opstwin demo`: the simulated plant in its own process, and a gateway reading it."""

from __future__ import annotations

import asyncio
import contextlib
import os
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

from gateway.app import Gateway
from gateway.config import SiteConfig, load_config
from gateway.demo.script import Script, banner
from gateway.errors import GatewayError
from gateway.opcua_server.users import hash_password
from gateway.serve import serve

# The real tank's time constant is about 13 minutes; at 10x a level change shows within the
# first minute of the demo.
PLANT_SPEED = 10
SCADA_USER = "scada"


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
    try:
        _wait_for_ports(sim, list(ports.values()), sim_log)
        # A fresh password each run: the demo never ships a default credential.
        password = secrets.token_urlsafe(9)
        config_path = write_demo_config(
            state,
            device_ports=ports,
            http_port=http_port,
            opcua_port=opcua_port,
            users=[
                {"username": SCADA_USER, "password_hash": hash_password(password), "role": "viewer"}
            ],
        )
        config = load_config(config_path)
        asyncio.run(_run(config, config_path, sim, sim_log, password, duration))
    finally:
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
) -> dict[str, Any]:
    """The bundled demo config as data, pointed at the given ports.

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
    data["http"]["port"] = http_port
    data["opcua_server"]["endpoint"] = f"opc.tcp://127.0.0.1:{opcua_port}/opstwin"
    if users:
        data["opcua_server"]["users"] = users
    return data


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
) -> None:
    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()  # held so the script task is not garbage-collected

    async def on_ready(gateway: Gateway, urls: list[str]) -> None:
        base = urls[0] if urls else f"http://{config.http.host}:{config.http.port}"
        banner(gateway, base, config_path, sim_log, SCADA_USER, password)
        script = Script(
            gateway, sim, SCADA_USER, password, base_url=base, config_path=config_path
        ).run(stop, duration)
        tasks.add(asyncio.create_task(script, name="demo:script"))

    await serve(config, on_ready=on_ready, stop=stop)


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
