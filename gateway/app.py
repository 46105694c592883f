"""The gateway runtime: the twin store, the device drivers, and the pumps between them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any

from drivers.base import ConnectionState, Driver
from drivers.errors import DriverError
from gateway.config import SiteConfig
from gateway.devices import build_drivers, point_defs
from gateway.errors import DeviceError, UnknownPointError
from gateway.opcua_server import TwinOpcuaServer
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore

log = logging.getLogger(__name__)

__all__ = ["Gateway"]


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
        )
        self.drivers: dict[str, Driver] = build_drivers(config)
        self.opcua_server: TwinOpcuaServer | None = None
        if config.opcua_server.enabled:
            self.opcua_server = TwinOpcuaServer(
                config.opcua_server,
                self.store,
                self.points,
                pki_dir=config.storage.pki_dir,
                on_write=self._on_opcua_write,
            )
        self.started_at: float | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self._prune_task: asyncio.Task[None] | None = None
        self._logged_state: dict[str, ConnectionState] = {}

    async def start(self) -> None:
        """Open the store (migrations run off the loop), then start every driver."""
        await asyncio.to_thread(self.store.open)
        self.started_at = time.time()
        for driver in self.drivers.values():
            driver.add_state_listener(self._on_state)
            await driver.start()
            self._pumps.append(asyncio.create_task(self._pump(driver), name=f"pump:{driver.name}"))
        self._prune_task = asyncio.create_task(self._prune_periodically(), name="twin:prune")
        if self.opcua_server is not None:
            try:
                await self.opcua_server.start()
            except BaseException:
                await self.stop()
                raise
            log.info("OPC UA server listening on %s", self.opcua_server.endpoint)
        log.info(
            "gateway %s/%s started: %d devices, %d points, rev %d",
            self.config.site_id,
            self.config.gateway_id,
            len(self.drivers),
            len(self.points),
            self.store.rev,
        )

    async def stop(self) -> None:
        """Stop serving, close drivers, drain what they already sent, flush and close the store."""
        if self._prune_task is not None:
            self._prune_task.cancel()
        if self.opcua_server is not None:
            await self.opcua_server.stop()
        await asyncio.gather(*(d.close() for d in self.drivers.values()), return_exceptions=True)
        # close() ends each sample stream, so the pumps finish after ingesting what was queued.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._pumps, return_exceptions=True), 5)
        for task in self._pumps:
            task.cancel()
        self._pumps.clear()
        await asyncio.to_thread(self.store.close)
        log.info("gateway stopped at rev %d", self.store.rev)

    async def write_point(self, point_id: str, value: Any) -> Any:
        """Write a setpoint through the owning driver; return the value read back."""
        point = self.points.get(point_id)
        if point is None:
            raise UnknownPointError(f"unknown point {point_id!r}")
        if not point.writable:
            raise DeviceError(f"{point_id}: point is not writable")
        # The driver checks limits too; checking here as well means a refusal never depends on
        # one layer alone.
        if _outside_limits(point, value):
            limits = f"[{point.lo}, {point.hi}]"
            raise DeviceError(f"{point_id}: value {value!r} outside limits {limits}")
        driver = self.drivers[point.device]
        try:
            return await driver.write(point_id, value)
        except DriverError as exc:
            raise DeviceError(f"{point_id}: write of {value!r} failed: {exc}") from exc

    def device_states(self) -> dict[str, dict[str, Any]]:
        """Each device's connection state and last error."""
        return {
            name: {"state": d.state.value, "last_error": d.last_error}
            for name, d in self.drivers.items()
        }

    async def _pump(self, driver: Driver) -> None:
        async for batch in driver.samples():
            self.store.ingest(batch)

    def _on_state(self, name: str, state: ConnectionState, reason: str | None) -> None:
        # A device that stays down cycles DISCONNECTED → BACKOFF → CONNECTING → DISCONNECTED;
        # one event per outage, not one per retry.
        if state in (ConnectionState.CONNECTED, ConnectionState.DISCONNECTED) and (
            self._logged_state.get(name) is not state
        ):
            self._logged_state[name] = state
            self.store.append_event(
                "DeviceStateChanged", {"device": name, "state": state.value, "reason": reason}
            )

    def _on_opcua_write(self, user: str, role: str, point_id: str, value: Any) -> None:
        # Until the policy engine exists, a SCADA write is refused; the attempt is on record.
        self.store.append_event(
            "WriteRefused",
            {
                "source": "opcua",
                "user": user,
                "role": role,
                "value": value,
                "reason": "writes from OPC UA clients go through the policy engine (not yet built)",
            },
            point_id=point_id,
        )

    async def _prune_periodically(self) -> None:
        while True:
            await asyncio.sleep(3600)
            try:
                await asyncio.to_thread(self.store.prune)
            except Exception:
                log.exception("history pruning failed; will retry in an hour")


def _outside_limits(point: PointDef, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False  # the driver checks non-numeric values against the datatype
    if not math.isfinite(value):
        return True
    return point.lo is not None and point.hi is not None and not point.lo <= value <= point.hi
