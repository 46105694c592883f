"""What `opstwin demo` shows, in the order a new user watches it."""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gateway.app import Gateway
from gateway.auth.rbac import Grant, Principal
from gateway.demo.cloud import CloudView
from gateway.demo.narrative import Narrator
from gateway.errors import GatewayError, StoreError

# The real tank's time constant is about 13 minutes; at 10x a level change shows within the
# first minute of the demo.
PLANT_SPEED = 10
VALVE = "utilities/cooling/tank1/inlet_valve"
OVEN_TEMPERATURE = "line1/oven1/temperature"
OVEN_SETPOINT = "line1/oven1/heater_setpoint"
OVEN_AMBIENT = "line1/oven1/ambient"
OVEN_POLICY = "oven-overtemp-drift"
TANK_POLICY = "tank-level-high"
# Above the policy's 4.2 m and below the 4.5 m alarm (an out_of_range anomaly of its own).
STUCK_LEVEL_M = 4.45
CURE_C = 180.0
# The hall 10 °C warmer: the open-loop oven would settle ~10 °C higher, above its 190 °C limit
# from any start the plant's seeds give (176..183 °C), and the policy corrects it in one step
# (the excess when it fires, ~5..7 °C, is inside its max_step of 10).
HALL_WARMING_C = 10.0
AGENT_ASSETS = "line1/oven1/*"
SUPERVISOR = "demo-supervisor"
WATCHED = [
    OVEN_TEMPERATURE,
    OVEN_SETPOINT,
    OVEN_AMBIENT,
    "utilities/cooling/tank1/level",
    VALVE,
    "utilities/cooling/tank1/outlet_flow",
    "utilities/power/meter1/power",
]

# (seconds after start, step): a setpoint written through the Modbus driver and read back; a
# what-if on the C kernel from the twin's live values; the hall warming up, so that the oven
# drifts and its policy corrects it (the narrator prints the proposal, simulation, decision and
# verified write); a SCADA client reading the twin over OPC UA; a second gateway refused the
# same database; an agent's proposal waiting for a supervisor, who approves it; and two
# controller restarts the gateway rides through, with /health saying what is wrong meanwhile.
HEALTH_WAIT_S = 6.0  # how long a health step waits for the status the story expects

STEPS: list[tuple[float, tuple]] = [
    (6.0, ("write", VALVE, 65.0)),
    (8.0, ("whatif", 20.0, 203.0)),
    (10.0, ("warm_hall", HALL_WARMING_C)),
    (12.0, ("scada",)),
    (14.0, ("second_gateway",)),
    (16.0, ("warm_check",)),
    (18.0, ("plant", "tank:restart:3", "the tank's Modbus controller restarts")),
    (20.0, ("health", "degraded")),
    (24.0, ("agent",)),
    (26.0, ("approve",)),
    (26.0, ("health", "ok")),
    (28.0, ("plant", "oven:restart:3", "the oven's OPC UA PLC restarts")),
    (29.0, ("health", "degraded")),
    (36.0, ("health", "ok")),
    (32.0, ("cloud",)),
    (38.0, ("cloud_outage",)),
    (40.0, ("stuck",)),
    (44.0, ("storage",)),
    (46.0, ("cloud_back",)),
    (47.0, ("unstick",)),
    (48.0, ("backup",)),
    (51.0, ("reload",)),
    (50.0, ("write", VALVE, 50.0)),
    (52.0, ("cloud",)),
    (54.0, ("agent", True)),
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
        cloud: CloudView | None = None,
        supervisor_password: str = "",
    ) -> None:
        self.gateway = gateway
        self.supervisor_password = supervisor_password
        self.cloud = cloud
        self.sim = sim
        self.scada_user = scada_user
        self.scada_password = scada_password
        self.base_url = base_url
        self.config_path = config_path
        self.ambient_before: float | None = None
        self.waiting: str | None = None  # the agent's proposal, until the supervisor sees it

    async def run(self, stop: asyncio.Event, duration: float | None) -> None:
        """Step through the demo; set `stop` after `duration` seconds if one is given."""
        t0 = time.monotonic()
        steps = list(STEPS)
        done = asyncio.Event()
        engine = self.gateway.engine
        if engine is not None:
            units = {pid: p.unit or "" for pid, p in self.gateway.points.items()}
            narrator = asyncio.create_task(Narrator(engine, units).run(done), name="demo:narrator")
        if self.cloud is not None:
            try:
                await self.cloud.start()
            except GatewayError as exc:
                print(f"  cloud: the mirror cannot reach the broker: {exc}", flush=True)
                self.cloud = None
        try:
            while duration is None or time.monotonic() - t0 < duration:
                await asyncio.sleep(2.0)
                elapsed = time.monotonic() - t0
                while steps and elapsed >= steps[0][0]:
                    _, (kind, *args) = steps.pop(0)
                    await getattr(self, f"_{kind}")(*args)
                self._table(elapsed)
        finally:
            done.set()
            if engine is not None:
                await narrator
            if self.cloud is not None:
                await self.cloud.stop()
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

    async def _plant(self, command: str, what: str, *, quiet: bool = False) -> None:
        if not quiet:
            print(
                f"  plant: {what} ({command}); watch its points go STALE and come back by "
                "themselves",
                flush=True,
            )
        if self.sim.stdin is not None:
            self.sim.stdin.write(f"{command}\n".encode())
            self.sim.stdin.flush()

    async def _warm_hall(self, offset: float) -> None:
        """Warm the oven's hall: the open-loop oven drifts up, and its policy should act."""
        temperature = _number(self.gateway.store.get(OVEN_TEMPERATURE).value)
        self.ambient_before = _number(self.gateway.store.get(OVEN_AMBIENT).value)
        drift = (
            ""
            if temperature is None
            else f", from {temperature:.1f} toward ~{temperature + offset:.0f} °C"
        )
        print(
            f"  plant: the hall warms up by {offset:g} °C (oven:ambient:{offset:g}); the oven's "
            "heater runs open loop from a curve calibrated at 22 °C, so the oven drifts up with "
            f"it{drift}",
            flush=True,
        )
        engine = self.gateway.engine
        policy = (
            None
            if engine is None
            else next((p for p in engine.policies if p.id == OVEN_POLICY), None)
        )
        if policy is None:
            print(
                f"  policy: {OVEN_POLICY} is not loaded; nothing will correct the oven", flush=True
            )
        else:
            trigger = policy.trigger
            held = getattr(trigger, "for_s", 0.0)
            band = ", ".join(
                f"{c.lower:g}..{c.upper:g}" for c in policy.safety if c.lower is not None
            )
            when = getattr(getattr(trigger, "when", None), "text", str(trigger))
            print(
                f"  policy {OVEN_POLICY} watches: `{when}` held {held:g} s (the demo's copy: "
                f"{held * PLANT_SPEED:g} s in policies/, the plant runs {PLANT_SPEED}x fast) -> "
                "lower the heater setpoint by the excess, if a simulation of the next "
                f"{policy.simulation.horizon_s / 60:g} min keeps the oven inside {band} °C",
                flush=True,
            )
        await self._plant(f"oven:ambient:{offset:g}", "the hall warms up", quiet=True)

    async def _stuck(self) -> None:
        """A level transmitter sticks reading high: the policy fires on it, but the jump is a
        sensor-fault anomaly, so the level is a suspect input and nothing is written alone."""
        print(
            f"  plant: the tank's level transmitter sticks reading {STUCK_LEVEL_M:g} m "
            f"(tank:freeze:level,{STUCK_LEVEL_M:g}) while the water stays where it is; "
            f"{TANK_POLICY} will fire on the reading, but the jump (faster than any tank fills: "
            "a rate_of_change anomaly) makes the level a suspect input, so its proposal waits "
            "for a person instead of closing the valve",
            flush=True,
        )
        await self._plant(f"tank:freeze:level,{STUCK_LEVEL_M:g}", "", quiet=True)

    async def _unstick(self) -> None:
        print(
            "  plant: the level transmitter reads true again (tank:freeze:level,off); its next "
            "sample clears the suspicion",
            flush=True,
        )
        await self._plant("tank:freeze:level,off", "", quiet=True)

    async def _warm_check(self) -> None:
        """Say so if the plant did not warm (an old plantsim without the ambient command)."""
        now = _number(self.gateway.store.get(OVEN_AMBIENT).value)
        before = self.ambient_before
        if before is not None and now is not None and now < before + HALL_WARMING_C / 2:
            print(
                f"  plant: the hall is at {now:.1f} °C, not warmer: the plant did not take "
                "the ambient command (see its log); the oven will not drift",
                flush=True,
            )

    async def _agent(self, for_the_browser: bool = False) -> None:
        """An AI agent's token proposes a setpoint: it may propose, not execute. The last one is
        left waiting for the person at the operator UI (`for_the_browser`)."""
        engine, accounts = self.gateway.engine, self.gateway.accounts
        if engine is None or accounts is None:
            print("  agent: the policy engine is not running", flush=True)
            return
        setpoint = _number(self.gateway.store.get(OVEN_SETPOINT).value)
        temperature = _number(self.gateway.store.get(OVEN_TEMPERATURE).value)
        if setpoint is None or temperature is None:
            print("  agent: no oven readings to reason from; no proposal", flush=True)
            return
        name = f"demo-agent-{secrets.token_hex(2)}"
        try:
            token = await asyncio.to_thread(
                accounts.create_token, name, [Grant(role="agent", assets=(AGENT_ASSETS,))]
            )
            principal = await accounts.authenticate_token_async(token.secret)
        except GatewayError as exc:
            print(f"  agent: cannot make its token: {exc}", flush=True)
            return
        value = round(setpoint - (temperature - CURE_C), 1)
        print(
            f"  agent: token `{name}` (role agent on {AGENT_ASSETS}, made in control.db for "
            f"this run) proposes the heater setpoint {setpoint:g} -> {value:g} °C to bring the "
            f"cure from {temperature:.1f} back to {CURE_C:g} °C; an agent may propose, "
            "not execute",
            flush=True,
        )
        try:
            record = await engine.propose(
                principal,
                OVEN_SETPOINT,
                value,
                reason=f"bring the cure back to {CURE_C:g} °C",
                source="agent",
            )
        except GatewayError as exc:
            print(f"  agent: proposal failed: {exc}", flush=True)
            return
        if not for_the_browser:
            self.waiting = record.id
        elif record.status in ("pending_approval", "pending_analysis"):
            print(
                f"  agent: proposal {record.id} waits for you in the operator UI's approvals "
                f"queue ({self.base_url}/ui/approvals): read its fan chart, then approve or "
                "reject it with a reason",
                flush=True,
            )

    async def _approve(self) -> None:
        """A supervisor approves the agent's waiting proposal; the engine writes it."""
        engine, accounts, proposal = self.gateway.engine, self.gateway.accounts, self.waiting
        if engine is None or accounts is None or proposal is None:
            print("  supervisor: no proposal waits for approval", flush=True)
            return
        self.waiting = None
        try:
            status = engine.get(proposal).status
        except GatewayError as exc:
            print(f"  supervisor: {exc}", flush=True)
            return
        if status not in ("pending_approval", "pending_analysis"):
            print(f"  supervisor: proposal {proposal} is {status}; nothing to approve", flush=True)
            return
        password = self.supervisor_password or secrets.token_urlsafe(9)
        try:
            principal = await asyncio.to_thread(make_supervisor, accounts, password)
        except GatewayError as exc:
            print(f"  supervisor: cannot log in: {exc}", flush=True)
            return
        print(
            f"  supervisor: user `{SUPERVISOR}` (password {password!r}, made for this run) "
            f"reads proposal {proposal}'s simulation and approves it",
            flush=True,
        )
        try:
            await engine.approve(principal, proposal, comment="simulation read; approved")
        except GatewayError as exc:
            print(f"  supervisor: approval refused: {exc}", flush=True)

    async def _cloud(self) -> None:
        if self.cloud is not None:
            await self.cloud.check()

    async def _cloud_outage(self) -> None:
        if self.cloud is not None:
            await self.cloud.broker_down()

    async def _cloud_back(self) -> None:
        if self.cloud is not None:
            await self.cloud.broker_up()

    async def _health(self, expect: str | None = None) -> None:
        """Ask /health over HTTP, as a monitoring system would, and show why if degraded.

        With `expect` ("degraded" after a restart, "ok" once it should be over), ask again
        every half second for up to HEALTH_WAIT_S until it says so: on a loaded machine the
        restart (or the reconnect) can land a moment after the demo's step.
        """
        import aiohttp

        deadline = time.monotonic() + (HEALTH_WAIT_S if expect else 0.0)
        while True:
            try:
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                    session.get(f"{self.base_url}/health") as response,
                ):
                    body = await response.json()
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                print(f"  health: request failed: {type(exc).__name__}: {exc}", flush=True)
                return
            if expect is None or body.get("status") == expect or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.5)
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

    async def _reload(self) -> None:
        """SIGHUP, as `systemctl reload` sends it: a file with a typo is refused whole (the
        running set stays), then the good file again is applied."""
        good = self.config_path.read_text()
        try:
            _replace_private(self.config_path, good + "\nlog_levle: DEBUG\n")
            refused = await self._sighup()
            if refused is not None:
                print(
                    f"  reload: a typo in {self.config_path.name} (log_levle): refused, the "
                    f"running config stays: {_tail(str(refused.get('error')), 110)}",
                    flush=True,
                )
        finally:
            _replace_private(self.config_path, good)
        applied = await self._sighup()
        if applied is not None:
            changes = ", ".join(applied.get("changes") or []) or "nothing changed"
            print(
                f"  reload: the good file again: applied without a restart ({changes}); "
                f"/health config.last_reload.ok = {str(applied.get('ok')).lower()}",
                flush=True,
            )

    async def _sighup(self) -> dict[str, Any] | None:
        """Send SIGHUP to this process and wait for /health to show the reload's outcome."""
        import aiohttp

        async def last() -> dict[str, Any]:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(f"{self.base_url}/health") as response,
            ):
                body = await response.json()
            return dict(body.get("config", {}).get("last_reload") or {})

        try:
            before = (await last()).get("number", 0)
            os.kill(os.getpid(), signal.SIGHUP)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                await asyncio.sleep(0.3)
                now = await last()
                if now.get("number", 0) > before:
                    return now
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            print(f"  reload: /health failed: {type(exc).__name__}: {exc}", flush=True)
            return None
        print("  reload: /health did not show the reload within 15 s", flush=True)
        return None

    async def _backup(self) -> None:
        """An online backup of both databases while the plant runs (`opstwin backup`)."""
        from gateway.backup import CONTROL_NAME, TWIN_NAME, backup

        storage = self.gateway.config.storage.path
        dest = storage.parent / f"backup-{time.strftime('%Y%m%dT%H%M%S')}"
        try:
            done = await asyncio.to_thread(backup, storage, dest)
        except GatewayError as exc:
            print(f"  backup: {exc}", flush=True)
            return
        twin, control = done.manifest.file(TWIN_NAME), done.manifest.file(CONTROL_NAME)
        here = Path.cwd()
        shown = dest.relative_to(here) if dest.is_relative_to(here) else dest
        print(
            f"  backup: twin.db at rev {twin.details.get('rev')} ({twin.bytes / 1e6:.1f} MB) and "
            f"control.db (users: {control.details.get('users')}, audit to seq "
            f"{control.details.get('audit_seq')}) copied while the plant ran and checked in "
            f"{done.seconds:.2f} s: {shown}/ (restore: stop, then opstwin restore)",
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
                f"write of 210 to {OVEN_SETPOINT} refused: {name} (user {user!r} is a viewer: "
                "it may read, not propose a change)"
            )
    return out


def make_supervisor(accounts: Any, password: str) -> Principal:
    """The demo's supervisor with a password made for this run (blocking: argon2)."""
    try:
        accounts.add_user(SUPERVISOR, password, [Grant(role="supervisor")])
    except GatewayError:  # a previous run's: same user, this run's password
        accounts.set_password(SUPERVISOR, password)
    principal: Principal = accounts.authenticate_user(SUPERVISOR, password)
    return principal


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _replace_private(path: Path, text: str) -> None:
    """Write `path` whole (a new file renamed over it, as editors save), mode 0600: a reload
    must never read a half-written file, and the demo config holds password hashes."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def _tail(text: str, limit: int) -> str:
    """The end of a long message (where a loader says what is wrong), on one line."""
    text = " ".join(text.split())
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def banner(
    gateway: Gateway,
    base: str,
    config_path: Path,
    sim_log: Path,
    user: str,
    password: str,
    *,
    ui_password: str = "",
) -> None:
    """Print where to look."""
    here = Path.cwd()
    rel = lambda p: p.relative_to(here) if p.is_relative_to(here) else p  # noqa: E731
    devices = "\n".join(
        f"    {d.name:<9} {d.driver:<6} {getattr(d, 'endpoint', '(pushed over HTTP)')}"
        for d in gateway.config.devices  # an http device has no endpoint
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
    engine = gateway.engine
    loaded = ", ".join(p.id for p in engine.policies) if engine is not None else ""
    folder = gateway.config.policies.dir
    policies = (
        f"{rel(folder)}/ ({loaded or 'none loaded'}; copies of policies/, their plant times "
        f"/ {PLANT_SPEED} like the plant's clock)"
        if folder is not None
        else "none"
    )
    kept = gateway.config.storage
    backup_dir = rel(config_path.parent / "backup")
    storage = (
        f"raw history {kept.history_days:g} d, then {kept.rollup_s:g} s buckets "
        f"{kept.rollup_days:g} d; at most {kept.max_db_mb:g} MB"
        if kept.max_db_mb is not None
        else f"raw history {kept.history_days:g} d, then {kept.rollup_s:g} s buckets"
    )
    print(
        f"""
OpsTwin demo is running: a gateway reading the simulated plant.
  operator UI: open {base}/ui/ and log in as {SUPERVISOR} with password {ui_password!r}
    (made for this run): approvals with fan charts, the twin, what-if, actions, audit
  simulated plant (log {rel(sim_log)}):
{devices}
  gateway HTTP:
    {base}/health
    {base}/twin
    {base}/twin/{OVEN_TEMPERATURE}
    {base}/telemetry/aggregate?point={OVEN_TEMPERATURE}&bucket_s=10
    {base}/metrics      (Prometheus)
  gateway OPC UA server (for SCADA/HMI clients):
{opcua_lines}
  config:    {rel(config_path)}      (opstwin check {rel(config_path)})
  database:  {rel(gateway.config.storage.path)}      ({storage})
    opstwin twin --config {rel(config_path)}
    opstwin history --config {rel(config_path)} {OVEN_TEMPERATURE}
    opstwin events --config {rel(config_path)}
    opstwin backup --config {rel(config_path)} {backup_dir}      (online, while it runs)
  reload:    edit {rel(config_path)}, then: kill -HUP {os.getpid()}      (applied without a restart)
  policies:  {policies}
    opstwin audit show --config {rel(config_path)}      (every proposal, decision and write)
    opstwin audit verify --config {rel(config_path)}    (the hash chain)
Press Ctrl-C to stop.
""",
        flush=True,
    )
