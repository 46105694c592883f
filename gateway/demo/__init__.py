"""`opstwin demo`: the simulated plant in its own process, and a gateway reading it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import yaml

from gateway.app import Gateway
from gateway.config import load_config
from gateway.errors import GatewayError
from gateway.serve import serve

WATCHED = [
    "utilities/cooling/tank1/level",
    "utilities/cooling/tank1/inlet_valve",
    "utilities/cooling/tank1/outlet_flow",
    "utilities/cooling/tank1/pump_vibration",
    "utilities/power/meter1/power",
    "utilities/power/meter1/energy",
]
VALVE = "utilities/cooling/tank1/inlet_valve"
# The real tank's time constant is about 13 minutes; at 10x a level change shows within the
# first minute of the demo.
PLANT_SPEED = 10
# (seconds after start, what happens): a setpoint written and read back, a controller restart
# the gateway rides through by itself, and the setpoint put back.
SCRIPT = [
    (8.0, ("write", VALVE, 65.0)),
    (20.0, ("plant", "tank:restart:3")),
    (45.0, ("write", VALVE, 50.0)),
]


def run_demo(*, state_dir: str, http_port: int, seed: int, duration: float | None) -> int:
    """Start the plant simulator, write the demo config, run the gateway; return an exit code."""
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    tank_port, meter_port = _free_port(), _free_port()
    if http_port and not _port_is_free(http_port):
        # A demo should start on a busy laptop; a production config fails loudly instead.
        busy, http_port = http_port, _free_port()
        print(f"opstwin demo: port {busy} is in use; the gateway listens on {http_port}")
    sim_log = state / "plantsim.log"
    with sim_log.open("w") as log_file:
        # Its own process, as real hardware would be: the gateway reaches it only over TCP.
        sim = subprocess.Popen(
            [sys.executable, "-m", "plantsim", "--seed", str(seed), "--speed", str(PLANT_SPEED),
             "--tank-port", str(tank_port), "--meter-port", str(meter_port), "--stdin"],
            stdin=subprocess.PIPE,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_ports(sim, [tank_port, meter_port], sim_log)
        config_path = write_demo_config(state, tank_port, meter_port, http_port)
        config = load_config(config_path)
        asyncio.run(_run(config, config_path, sim, sim_log, duration))
    finally:
        sim.terminate()
        try:
            sim.wait(5)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait()
    return 0


def write_demo_config(state: Path, tank_port: int, meter_port: int, http_port: int) -> Path:
    """Copy the bundled demo config into `state` with the simulator's ports filled in."""
    text = resources.files("gateway.demo").joinpath("site.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    ports = {"tank1": tank_port, "meter1": meter_port}
    for device in data["devices"]:
        device["endpoint"] = f"tcp://127.0.0.1:{ports[device['name']]}"
    data["http"]["port"] = http_port
    path = state / "site.yaml"
    header = "# Written by `opstwin demo` from gateway/demo/site.yaml; edit that file instead.\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


async def _run(
    config, config_path: Path, sim: subprocess.Popen, sim_log: Path, duration: float | None
) -> None:
    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()  # held so the script task is not garbage-collected

    async def on_ready(gateway: Gateway, urls: list[str]) -> None:
        base = urls[0] if urls else f"http://{config.http.host}:{config.http.port}"
        _banner(gateway, base, config_path, sim_log)
        script = _script(gateway, sim, stop, duration)
        tasks.add(asyncio.create_task(script, name="demo:script"))

    await serve(config, on_ready=on_ready, stop=stop)


def _banner(gateway: Gateway, base: str, config_path: Path, sim_log: Path) -> None:
    here = Path.cwd()
    rel = lambda p: p.relative_to(here) if p.is_relative_to(here) else p  # noqa: E731
    devices = "\n".join(
        f"    {d.name:<8} {d.driver} {d.endpoint}" for d in gateway.config.devices
    )
    print(
        f"""
OpsTwin demo is running: a gateway reading the simulated plant.
  simulated plant (log {rel(sim_log)}):
{devices}
  gateway HTTP:
    {base}/health
    {base}/twin
    {base}/twin/{WATCHED[0]}
    {base}/telemetry/aggregate?point={WATCHED[0]}&bucket_s=10
  config:    {rel(config_path)}      (opstwin check {rel(config_path)})
  database:  {rel(gateway.config.storage.path)}
    opstwin twin --config {rel(config_path)}
    opstwin history --config {rel(config_path)} {WATCHED[0]}
    opstwin events --config {rel(config_path)}
Press Ctrl-C to stop.
""",
        flush=True,
    )


async def _script(
    gateway: Gateway, sim: subprocess.Popen, stop: asyncio.Event, duration: float | None
) -> None:
    """Show values moving, a setpoint written and read back, and a device outage ridden out."""
    t0 = time.monotonic()
    steps = list(SCRIPT)
    try:
        while duration is None or time.monotonic() - t0 < duration:
            await asyncio.sleep(2.0)
            elapsed = time.monotonic() - t0
            while steps and elapsed >= steps[0][0]:
                _, (kind, *args) = steps.pop(0)
                if kind == "write":
                    await _write(gateway, *args)
                else:
                    _plant_command(sim, *args)
            _table(gateway, elapsed)
    finally:
        if duration is not None:
            stop.set()


async def _write(gateway: Gateway, point_id: str, value: float) -> None:
    try:
        readback = await gateway.write_point(point_id, value)
    except GatewayError as exc:
        print(f"  setpoint {point_id} <- {value:g}: refused: {exc}", flush=True)
        return
    unit = gateway.points[point_id].unit
    print(f"  setpoint {point_id} <- {value:g} {unit}: read back {readback:g} {unit}", flush=True)


def _plant_command(sim: subprocess.Popen, command: str) -> None:
    print(f"  plant: {command} (a fault injected in the simulator; watch the tank go STALE "
          "and come back by itself)", flush=True)
    if sim.stdin is not None:
        sim.stdin.write(f"{command}\n".encode())
        sim.stdin.flush()


def _table(gateway: Gateway, elapsed: float) -> None:
    rev, values = gateway.store.snapshot()
    print(f"  t={elapsed:5.1f}s rev={rev}", flush=True)
    for pid in WATCHED:
        v = values.get(pid)
        if v is None:
            continue
        shown = f"{v.value:.3f}" if isinstance(v.value, float) else str(v.value)
        unit = gateway.points[pid].unit
        print(f"    {pid:<40} {shown:>12} {unit:<5} {v.quality}", flush=True)


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
    deadline = time.monotonic() + 20
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
