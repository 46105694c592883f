"""What `opstwin demo` shows, in the order a new user watches it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from gateway.app import Gateway
from gateway.errors import GatewayError, StoreError

VALVE = "utilities/cooling/tank1/inlet_valve"
OVEN_TEMPERATURE = "line1/oven1/temperature"
OVEN_SETPOINT = "line1/oven1/heater_setpoint"
WATCHED = [
    OVEN_TEMPERATURE,
    OVEN_SETPOINT,
    "utilities/cooling/tank1/level",
    VALVE,
    "utilities/cooling/tank1/outlet_flow",
    "utilities/power/meter1/power",
]

# (seconds after start, step): setpoints written through both drivers and read back (the oven's
# first simulated by the C kernel from the twin's live values), a SCADA client reading the twin
# over OPC UA, a second gateway refused the same database, and two controller restarts the
# gateway rides through, with /health saying what is wrong while a device is away.
STEPS: list[tuple[float, tuple]] = [
    (6.0, ("write", VALVE, 65.0)),
    (8.0, ("whatif", 20.0, 203.0)),
    (9.0, ("write", OVEN_SETPOINT, 200.0)),
    (12.0, ("scada",)),
    (14.0, ("second_gateway",)),
    (18.0, ("plant", "tank:restart:3", "the tank's Modbus controller restarts")),
    (20.0, ("health",)),
    (26.0, ("health",)),
    (28.0, ("plant", "oven:restart:3", "the oven's OPC UA PLC restarts")),
    (44.0, ("storage",)),
    (50.0, ("write", VALVE, 50.0)),
]


class Script:
    """Runs the demo's steps and prints a table of live values every two seconds."""

    def __init__(
        self,
        gateway: Gateway,
        sim: subprocess.Popen,
        scada_user: str,
        scada_password: str,
        *,
        base_url: str,
        config_path: Path,
    ) -> None:
        self.gateway = gateway
        self.sim = sim
        self.scada_user = scada_user
        self.scada_password = scada_password
        self.base_url = base_url
        self.config_path = config_path

    async def run(self, stop: asyncio.Event, duration: float | None) -> None:
        """Step through the demo; set `stop` after `duration` seconds if one is given."""
        t0 = time.monotonic()
        steps = list(STEPS)
        try:
            while duration is None or time.monotonic() - t0 < duration:
                await asyncio.sleep(2.0)
                elapsed = time.monotonic() - t0
                while steps and elapsed >= steps[0][0]:
                    _, (kind, *args) = steps.pop(0)
                    await getattr(self, f"_{kind}")(*args)
                self._table(elapsed)
        finally:
            if duration is not None:
                stop.set()

    async def _write(self, point_id: str, value: float) -> None:
        try:
            readback = await self.gateway.write_point(point_id, value)
        except GatewayError as exc:
            print(f"  setpoint {point_id} <- {value:g}: refused: {exc}", flush=True)
            return
        unit = self.gateway.points[point_id].unit
        print(
            f"  setpoint {point_id} <- {value:g} {unit}: read back {readback:g} {unit}", flush=True
        )

    async def _plant(self, command: str, what: str) -> None:
        print(
            f"  plant: {what} ({command}); watch its points go STALE and come back by themselves",
            flush=True,
        )
        if self.sim.stdin is not None:
            self.sim.stdin.write(f"{command}\n".encode())
            self.sim.stdin.flush()

    async def _health(self) -> None:
        """Ask /health over HTTP, as a monitoring system would, and show why if degraded."""
        import aiohttp

        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(f"{self.base_url}/health") as response,
            ):
                body = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            print(f"  health: request failed: {type(exc).__name__}: {exc}", flush=True)
            return
        reasons = "; ".join(body.get("reasons", [])) or "every device connected, storage healthy"
        print(f"  health: {body.get('status')}: {reasons}", flush=True)

    async def _storage(self) -> None:
        # The writer compacts on its own every few minutes; the demo asks now to show it.
        store = self.gateway.store
        try:
            await asyncio.to_thread(store.compact)
            found = await asyncio.to_thread(store.history_footprint)
        except StoreError as exc:
            print(f"  storage: {exc}", flush=True)
            return
        samples = found["block_samples"] + found["frame_samples"]
        stored = found["block_bytes"] + found["frame_bytes"]
        info = store.storage_info()
        print(
            f"  storage: {samples:,} samples of history in {stored:,} bytes "
            f"({stored / max(samples, 1):.1f} bytes each, compressed per point in "
            f"{found['blocks']} blocks); the event log serves revs from {info['log_start_rev']}, "
            f"database {info['database_bytes'] / 1e6:.1f} MB",
            flush=True,
        )

    async def _second_gateway(self) -> None:
        """Start `opstwin run` again on the same config: it must refuse, touching nothing."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "run",
            "--config",
            str(self.config_path),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            print("  second gateway: still running after 60 s (not refused!); stopped it")
            return
        lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
        said = lines[-1] if lines else "(nothing)"
        print(f"  second gateway on the same database: exit {proc.returncode}: {said}", flush=True)

    async def _scada(self) -> None:
        """Read the twin as a SCADA client would: over OPC UA, signed and encrypted."""
        try:
            lines = await scada_read(self.gateway, self.scada_user, self.scada_password)
        except Exception as exc:  # the demo goes on; say what went wrong
            print(f"  scada: OPC UA client failed: {type(exc).__name__}: {exc}", flush=True)
            return
        for line in lines:
            print(f"  scada: {line}", flush=True)

    async def _whatif(self, step: float, limit: float) -> None:
        """Ask the C kernel what a setpoint step would do, from the twin's live values."""
        from importlib import resources

        import yaml

        from gateway.sim.models import Scenario
        from gateway.sim.native import simulate_async

        text = resources.files("gateway.demo").joinpath("oven-scenario.yaml").read_text("utf-8")
        spec = yaml.safe_load(text)
        now_sp = float(self.gateway.store.get(OVEN_SETPOINT).value)
        now_t = float(self.gateway.store.get(OVEN_TEMPERATURE).value)
        spec.update(
            y0=now_t,
            input={"kind": "step", "u0": now_sp, "u1": now_sp + step, "t_step": 0.0},
            constraints=[{"kind": "upper", "limit": limit}],
        )
        scenario = Scenario.model_validate(spec)
        started = time.perf_counter()
        result = await simulate_async(scenario)  # C kernel in a worker thread, GIL released
        ms = (time.perf_counter() - started) * 1000
        c = result.constraints[0]
        p50 = result.percentiles[2]
        print(
            f"  what-if: oven setpoint {now_sp:g} -> {now_sp + step:g} °C from {now_t:.1f} °C: "
            f"P(temperature > {limit:g} °C within 10 min) = {c.violation_probability:.2f}; "
            f"median after 5 / 10 min {p50[299]:.1f} / {p50[-1]:.1f} °C "
            f"({result.paths_run} paths x {scenario.n_steps} steps in {ms:.0f} ms, C kernel)",
            flush=True,
        )

    def _table(self, elapsed: float) -> None:
        rev, values = self.gateway.store.snapshot()
        print(f"  t={elapsed:5.1f}s rev={rev}", flush=True)
        for pid in WATCHED:
            v = values.get(pid)
            if v is None:
                continue
            shown = f"{v.value:.3f}" if isinstance(v.value, float) else str(v.value)
            unit = self.gateway.points[pid].unit
            print(f"    {pid:<40} {shown:>12} {unit:<5} {v.quality}", flush=True)


async def scada_read(gateway: Gateway, user: str, password: str) -> list[str]:
    """Connect to the gateway's OPC UA server as `user`, read a point, try a write."""
    from asyncua import Client, ua

    from drivers.opcua.security import ensure_client_certificate
    from gateway.opcua_server.address_space import NAMESPACE_URI

    server = gateway.opcua_server
    if server is None:
        return ["the OPC UA server is off in this config"]
    cert = await asyncio.to_thread(
        ensure_client_certificate,
        gateway.config.storage.pki_path / "demo-scada",
        "urn:opstwin:demo-scada",
    )
    # What an admin does for a real SCADA: put its certificate in the server's trusted/.
    await asyncio.to_thread(server.trust.add, cert.cert.read_bytes(), "demo-scada")
    client = Client(server.endpoint, timeout=5)
    client.set_user(user)
    client.set_password(password)
    await client.set_security_string(f"Basic256Sha256,SignAndEncrypt,{cert.cert},{cert.key}")
    out = [f"connected to {server.endpoint} as {user!r} (Basic256Sha256, SignAndEncrypt)"]
    async with client:
        ns = await client.get_namespace_index(NAMESPACE_URI)
        node = client.get_node(f"ns={ns};s={OVEN_TEMPERATURE}")
        value = await node.read_data_value()
        units = await (await node.get_child("0:EngineeringUnits")).read_value()
        eu_range = await (await node.get_child("0:EURange")).read_value()
        out.append(
            f"read {node.nodeid.to_string()} = {value.Value.Value:.2f} "
            f"{units.DisplayName.Text} ({value.StatusCode.name}), "
            f"EURange {eu_range.Low:g}..{eu_range.High:g}"
        )
        setpoint = client.get_node(f"ns={ns};s={OVEN_SETPOINT}")
        try:
            await setpoint.write_value(ua.DataValue(ua.Variant(210.0, ua.VariantType.Double)))
            out.append("write to the setpoint was accepted (it should not be)")
        except ua.UaStatusCodeError as exc:
            name = ua.StatusCode(exc.code).name
            out.append(
                f"write of 210 to {OVEN_SETPOINT} refused: {name} (SCADA writes will go "
                "through the policy engine)"
            )
    return out


def banner(
    gateway: Gateway, base: str, config_path: Path, sim_log: Path, user: str, password: str
) -> None:
    """Print where to look."""
    here = Path.cwd()
    rel = lambda p: p.relative_to(here) if p.is_relative_to(here) else p  # noqa: E731
    devices = "\n".join(
        f"    {d.name:<9} {d.driver:<6} {d.endpoint}" for d in gateway.config.devices
    )
    opcua = gateway.opcua_server
    opcua_lines = (
        f"    {opcua.endpoint}\n"
        f"    user {user!r}, password {password!r} (made for this run), or anonymous "
        "(demo only)\n"
        f"    a client's certificate is refused until moved from {rel(opcua.trust.rejected_dir)}/ "
        f"to {rel(opcua.trust.trusted_dir)}/"
        if opcua is not None
        else "    (off)"
    )
    print(
        f"""
OpsTwin demo is running: a gateway reading the simulated plant.
  simulated plant (log {rel(sim_log)}):
{devices}
  gateway HTTP:
    {base}/health
    {base}/twin
    {base}/twin/{OVEN_TEMPERATURE}
    {base}/telemetry/aggregate?point={OVEN_TEMPERATURE}&bucket_s=10
  gateway OPC UA server (for SCADA/HMI clients):
{opcua_lines}
  config:    {rel(config_path)}      (opstwin check {rel(config_path)})
  database:  {rel(gateway.config.storage.path)}
    opstwin twin --config {rel(config_path)}
    opstwin history --config {rel(config_path)} {OVEN_TEMPERATURE}
    opstwin events --config {rel(config_path)}
Press Ctrl-C to stop.
""",
        flush=True,
    )
