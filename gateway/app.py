"""The gateway runtime: the twin store, the device drivers, and the pumps between them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from drivers.base import Driver
from drivers.contract import ConnectionState
from drivers.errors import DriverError
from drivers.limits import limit_violation
from gateway.aiw.push import PushSources
from gateway.auth.rbac import Principal
from gateway.config import SiteConfig
from gateway.control.db import ControlDB, control_db_path
from gateway.control.users import AccountStore
from gateway.devices import build_drivers, point_defs
from gateway.errors import DeviceError, GatewayError, UnknownPointError
from gateway.lifecycle import Lifecycle, ShutdownError, wait_or_cancel
from gateway.opcua_server import TwinOpcuaServer
from gateway.opcua_server.config import OpcuaServerConfig
from gateway.opcua_server.proposals import ClientWrite, WriteAnswer
from gateway.opcua_server.refusals import WriteRefusal
from gateway.opcua_server.users import control_db_logins
from gateway.policy.engine import PolicyEngine
from gateway.policy.load import PolicySet
from gateway.policy.watch import AnomalyWatch
from gateway.reload import ConfigStatus, site_policies
from gateway.sim.fit import usable_rows
from gateway.sync import SyncService
from gateway.sync.gate import gateway_gate
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore

log = logging.getLogger(__name__)

__all__ = ["Gateway"]

PUMP_DRAIN_S = 5.0  # how long a stopping gateway waits for queued samples to reach the twin


class Gateway:
    """Owns the twin store and the device drivers, and moves samples from one to the other."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.points: dict[str, PointDef] = {p.id: p for p in point_defs(config)}
        self.store = TwinStore(
            config.storage.path,
            list(self.points.values()),
            flush_interval_s=config.storage.flush_interval_ms / 1000,
            history_days=config.storage.history_days,
            events_days=config.storage.events_days,
            event_log_minutes=config.storage.event_log_minutes,
            event_log_max_mb=config.storage.event_log_max_mb,
            rollup_s=config.storage.rollup_s,
            rollup_days=config.storage.rollup_days,
            max_db_mb=config.storage.max_db_mb,
            bound_drops_unsynced=config.storage.bound_drops_unsynced,
        )
        self.drivers: dict[str, Driver] = build_drivers(config)
        # The `driver: http` devices have no driver: their points are pushed to the gateway.
        self.push = PushSources(config, self.points)
        # Per device since start, for /metrics: samples received, connections made.
        self.samples_received: Counter[str] = Counter()
        self.connects: Counter[str] = Counter()
        # None without rules; the policy engine sets its `on_anomalies`.
        self.anomaly_watch: AnomalyWatch | None = AnomalyWatch.from_config(
            self.store, config.anomalies, self.points.values()
        )
        # Refused here, before anything starts: an invalid policy set never half-runs.
        self.policy_set: PolicySet = site_policies(config)
        self.control: ControlDB | None = None
        self.accounts: AccountStore | None = None
        self.engine: PolicyEngine | None = None
        self.opcua_server: TwinOpcuaServer | None = None
        # Cloud sync over MQTT (DESIGN §6): None without `sync.broker`.
        self.sync: SyncService | None = None
        if config.sync.broker is not None:
            self.sync = SyncService(
                config.sync,
                self.store,
                site_id=config.site_id,
                gateway_id=config.gateway_id,
                points=self.points,
                gate=gateway_gate(self),
            )
        if config.opcua_server.enabled:
            self.opcua_server = self.make_opcua_server(config.opcua_server, self.points)
        self.started_at: float | None = None
        # Which config runs and how its reloads went, for /health (gateway/reload.py).
        self.config_status = ConfigStatus()
        self._life: Lifecycle | None = None
        self._logged_state: dict[str, ConnectionState] = {}
        # Per running driver: its pump task and its state listener's remover. A reload starts
        # and stops devices one by one, so these are kept by device, not as one list.
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._unlisten: dict[str, Callable[[], None]] = {}
        self._push_watch: asyncio.Task[None] | None = None
        # The anomaly watch's own teardown stack, so that a reload can replace the watch alone.
        self._anomaly_life: Lifecycle | None = None

    async def start(self) -> None:
        """Start every subsystem in order; if one fails, stop what had started and raise."""
        if self._life is not None:
            raise GatewayError("the gateway is already running")
        life = self._life = Lifecycle()
        try:
            await self._start_store(life)
            await self._start_control(life)
            await self._start_drivers(life)
            self._start_push_watch(life)
            self._start_anomaly_watch(life)
            await self._start_engine(life)
            await self._start_sync(life)
            life.task(self._prune_periodically(), "twin:prune")
            await self._start_opcua_server(life)
        except BaseException:
            self._life = None
            with contextlib.suppress(ShutdownError):  # already logged step by step
                await life.aclose()
            raise
        log.info(
            "gateway %s/%s started: %d devices, %d points, rev %d",
            self.config.site_id,
            self.config.gateway_id,
            len(self.drivers),
            len(self.points),
            self.store.rev,
        )

    async def stop(self) -> None:
        """Stop every subsystem, newest first: serving, drivers, draining, then the store."""
        life, self._life = self._life, None
        if life is None:
            return
        try:
            await life.aclose()
        finally:
            log.info("gateway stopped at rev %d", self.store.rev)

    # -- subsystems: each registers its own teardown right after it starts ----------------------

    async def _start_store(self, life: Lifecycle) -> None:
        await asyncio.to_thread(self.store.open)  # migrations run off the loop
        life.on_stop("twin store", lambda: asyncio.to_thread(self.store.close))
        self.started_at = time.time()

    async def _start_control(self, life: Lifecycle) -> None:
        path = control_db_path(self.config.storage.path)
        control = self.control = await asyncio.to_thread(ControlDB, path)
        life.on_stop("control database", lambda: asyncio.to_thread(control.close))
        self.accounts = AccountStore(control)

    async def _start_engine(self, life: Lifecycle) -> None:
        engine = self.engine = PolicyEngine(
            self.policy_set.enabled,
            self.points,
            self.store,
            self.write_point,
            control=self.control,
            history=self._usable_history,
        )
        await engine.start(life)
        if self.anomaly_watch is not None:
            self.anomaly_watch.on_anomalies = engine.on_anomalies

    async def _start_sync(self, life: Lifecycle) -> None:
        # After the store and the engine (cmd/proposal needs it); registered after the store, so
        # it stops before the store closes: `offline` is published and the cursor persisted.
        if self.sync is None:
            return
        life.on_stop("cloud sync", self.sync.stop)
        await self.sync.start()

    def _usable_history(self, point_id: str, start: float, end: float) -> list[tuple[float, float]]:
        """A point's GOOD and UNCERTAIN numeric history, for a fitted model (blocking)."""
        return usable_rows(self.store.history(point_id, start, end, limit=1_000_000))

    async def _start_drivers(self, life: Lifecycle) -> None:
        # Registered before the drivers' own teardown, so it runs after it: close() ends each
        # sample stream, and the pumps finish by ingesting what was already queued. Each step
        # acts on the devices running at stop time, whatever reloads did in between.
        life.on_stop("sample pumps", self._drain_pumps)
        life.on_stop("state listeners", self._remove_state_listeners)
        life.on_stop("drivers", self._close_drivers)
        for driver in list(self.drivers.values()):
            await self.start_device(driver)

    def _start_anomaly_watch(self, life: Lifecycle) -> None:
        life.on_stop("anomaly watch", self._stop_anomaly_watch)
        if self.anomaly_watch is not None:
            self._anomaly_life = Lifecycle()
            self.anomaly_watch.start(self._anomaly_life)

    async def _stop_anomaly_watch(self) -> None:
        sub, self._anomaly_life = self._anomaly_life, None
        if sub is not None:
            await sub.aclose()

    def _start_push_watch(self, life: Lifecycle) -> None:
        life.on_stop("push staleness watch", self._stop_push_watch)
        self._push_watch = asyncio.create_task(
            self.push.watch(self.store.ingest, self.store.get), name="push:stale"
        )

    async def _stop_push_watch(self) -> None:
        task, self._push_watch = self._push_watch, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _start_opcua_server(self, life: Lifecycle) -> None:
        # stop() also undoes a half-done start(); the server stopped is the one running then
        # (a reload may have replaced the first).
        life.on_stop("OPC UA server", self._stop_opcua_server)
        if self.opcua_server is None:
            return
        server = self.opcua_server
        await server.start()
        log.info("OPC UA server listening on %s", server.endpoint)

    async def _stop_opcua_server(self) -> None:
        if self.opcua_server is not None:
            await self.opcua_server.stop()

    def make_opcua_server(
        self, config: OpcuaServerConfig, points: Mapping[str, PointDef]
    ) -> TwinOpcuaServer:
        """The OPC UA server of `points` (plans its address space: ConfigError for a point set
        it cannot serve); no I/O until started. Start-up and a reload share it."""
        return TwinOpcuaServer(
            config,
            self.store,
            points,
            pki_dir=self.config.storage.pki_path,
            on_write=self._on_opcua_write,
            on_propose=self._on_client_write,
            # control.db's users log in too; it opens at start, before the server.
            accounts=control_db_logins(self),
        )

    async def _drain_pumps(self) -> None:
        await wait_or_cancel(list(self._pumps.values()), PUMP_DRAIN_S)
        self._pumps.clear()

    def _remove_state_listeners(self) -> None:
        unlisten, self._unlisten = self._unlisten, {}
        for remove in unlisten.values():
            remove()

    # -- runtime changes (a config reload: gateway/reload.py) -------------------------------------

    async def start_device(self, driver: Driver) -> None:
        """Run one device's driver and the pump that feeds its samples to the twin."""
        name = driver.name
        if name in self._pumps:
            raise GatewayError(f"device {name} is already running")
        self.drivers[name] = driver
        self._pumps[name] = asyncio.create_task(self._pump(driver), name=f"pump:{name}")
        self._unlisten[name] = driver.add_state_listener(self._on_state)
        await driver.start()

    async def stop_device(self, name: str, why: str | None = None) -> None:
        """Stop one device's driver; its queued samples reach the twin first. With `why` (it
        was removed or disabled, not restarted), a `DeviceStateChanged` CLOSED event says so."""
        driver = self.drivers.pop(name, None)
        if driver is None:
            return
        try:
            await driver.close()
        except Exception:
            log.exception("%s: the driver did not close cleanly", name)
        remove = self._unlisten.pop(name, None)
        if remove is not None:
            remove()
        pump = self._pumps.pop(name, None)
        if pump is not None:
            await wait_or_cancel([pump], PUMP_DRAIN_S)
        if why is not None:
            self._logged_state.pop(name, None)
            self.store.append_event(
                "DeviceStateChanged",
                {"device": name, "state": ConnectionState.CLOSED.value, "reason": why},
            )

    async def declare_points(self, points: Mapping[str, PointDef]) -> None:
        """Serve exactly `points` from now on: the twin store first, then `self.points`, in the
        same loop step (everything that holds `self.points` sees the change at once)."""
        await self.store.declare_points(list(points.values()))
        self.points.clear()
        self.points.update(points)

    def replace_policies(self, policy_set: PolicySet) -> None:
        """Run `policy_set` (checked against the points already) from now on."""
        self.policy_set = policy_set
        if self.engine is not None:
            self.engine.replace_policies(policy_set.enabled)

    async def reconfigure_push(self, config: SiteConfig) -> None:
        """Take a reloaded config's `driver: http` devices; restart the staleness watch if its
        limits changed (a device silent since then counts from the reload)."""
        if self.push.reconfigure(config) and self._life is not None:
            await self._stop_push_watch()
            self._push_watch = asyncio.create_task(
                self.push.watch(self.store.ingest, self.store.get), name="push:stale"
            )

    async def replace_anomaly_watch(self, watch: AnomalyWatch | None) -> None:
        """Run `watch` (None: no detectors) instead of the current one; detectors start afresh."""
        await self._stop_anomaly_watch()
        self.anomaly_watch = watch
        if watch is None or self._life is None:
            return
        if self.engine is not None:
            watch.on_anomalies = self.engine.on_anomalies
        self._anomaly_life = Lifecycle()
        watch.start(self._anomaly_life)

    async def replace_opcua_server(self, server: TwinOpcuaServer) -> None:
        """Serve the twin through `server` instead: the old one closes its client connections
        and its port, the new one listens on the same endpoint. GatewayError if it cannot."""
        old = self.opcua_server
        if old is not None:
            await old.stop()
        self.opcua_server = server
        try:
            await server.start()
        except BaseException:
            self.opcua_server = None
            raise
        log.info("OPC UA server listening on %s", server.endpoint)

    async def _close_drivers(self) -> None:
        results = await asyncio.gather(
            *(d.close() for d in self.drivers.values()), return_exceptions=True
        )
        failed = [
            f"{name}: {r}" for name, r in zip(self.drivers, results, strict=True) if r is not None
        ]
        if failed:
            raise GatewayError("drivers did not close cleanly: " + "; ".join(failed))

    async def write_point(self, point_id: str, value: Any) -> Any:
        """Write a setpoint through the owning driver; return the value read back."""
        point = self.points.get(point_id)
        if point is None:
            raise UnknownPointError(f"unknown point {point_id!r}")
        if not point.writable:
            raise DeviceError(f"{point_id}: point is not writable")
        # The driver checks limits too; checking here as well means a refusal never depends on
        # one layer alone.
        why = limit_violation(value, point.lo, point.hi)
        if why is not None:
            limits = f"[{point.lo}, {point.hi}]"
            raise DeviceError(f"{point_id}: value {value!r} outside limits {limits}: {why}")
        driver = self.drivers.get(point.device)
        if driver is None:
            how = "pushed over HTTP (driver: http)" if point.device in self.push.devices else None
            raise DeviceError(
                f"{point_id}: device {point.device} is "
                + (f"{how}: the gateway has no connection to write to" if how else "disabled")
            )
        try:
            return await driver.write(point_id, value)
        except DriverError as exc:
            raise DeviceError(f"{point_id}: write of {value!r} failed: {exc}") from exc

    def device_states(self) -> dict[str, dict[str, Any]]:
        """Each device's connection state, last error and polls skipped by overrunning ones.

        A pushed (`driver: http`) device has no connection: its state says whether its source
        pushes (RECEIVING), has not yet since the start (WAITING), or fell silent for longer
        than `stale_after_s` (STALE), with the age of the last push.
        """
        states = {
            name: {"state": d.state.value, "last_error": d.last_error, "polls_skipped": d.overruns}
            for name, d in self.drivers.items()
        }
        states.update(self.push.device_states())
        return states

    async def _pump(self, driver: Driver) -> None:
        # One pump per driver: ingest never waits on SQLite, so this loop never blocks.
        async for batch in driver.samples():
            self.samples_received[driver.name] += len(batch)
            self.store.ingest(batch)

    def _on_state(self, name: str, state: ConnectionState, reason: str | None) -> None:
        if state is ConnectionState.CONNECTED:
            self.connects[name] += 1
        # A device that stays down cycles DISCONNECTED → BACKOFF → CONNECTING → DISCONNECTED;
        # one event per outage, not one per retry.
        if state in (ConnectionState.CONNECTED, ConnectionState.DISCONNECTED) and (
            self._logged_state.get(name) is not state
        ):
            self._logged_state[name] = state
            self.store.append_event(
                "DeviceStateChanged", {"device": name, "state": state.value, "reason": reason}
            )

    def login_record(self, name: str) -> tuple[str, Principal] | None:
        """A control.db user's password hash and Principal, for the OPC UA server's logins."""
        if self.accounts is None:
            return None  # not started: only the config's users
        return self.accounts.login_record(name)

    async def _on_client_write(self, write: ClientWrite) -> WriteAnswer:
        """An OPC UA client's write to a writable point: a proposal through the gate."""
        if self.engine is None:
            return WriteAnswer("BadResourceUnavailable", "the policy engine is not running")
        status, text, proposal_id = await self.engine.on_client_write(
            write.principal, write.user, write.client, write.point_id, write.value
        )
        return WriteAnswer(status, text, proposal_id)

    def _on_opcua_write(self, refusal: WriteRefusal) -> None:
        # A write the server refused before it reached the engine (a viewer, a read-only point,
        # too many in flight); the attempt is on record. The server coalesces and caps these
        # (one event may stand for many attempts: `count`), so a client looping over writes
        # cannot flood the event log (issue 13).
        data: dict[str, Any] = {
            "source": "opcua",
            "user": refusal.user,
            "role": refusal.role,
            "value": _json_safe(refusal.value),
            "count": refusal.count,
            "first_ts": refusal.first_ts,
            "last_ts": refusal.last_ts,
            "sessions": list(refusal.sessions),
            "clients": list(refusal.clients),
            "status": refusal.status,
        }
        if refusal.suppressed:
            data.update(suppressed=True, points=refusal.points)
        self.store.append_event("WriteRefused", data, point_id=refusal.point_id)

    async def _prune_periodically(self) -> None:
        while True:
            await asyncio.sleep(3600)
            try:
                await asyncio.to_thread(self.store.prune)
            except Exception:
                log.exception("history pruning failed; will retry in an hour")


def _json_safe(value: Any) -> Any:
    """A client-written value as the event log can hold it: plain JSON, at most 256 characters."""
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 256 else text[:256] + "…"
