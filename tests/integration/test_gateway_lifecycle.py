"""Gateway start and stop as one stack: a failed start unwinds, a failing stop still flushes."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from drivers.contract import ConnectionState
from gateway.app import Gateway
from gateway.config import SiteConfig, parse_config
from gateway.demo import demo_config_data
from gateway.errors import StoreError
from gateway.lifecycle import ShutdownError
from plantsim import MeterDevice, TankDevice


def _config(tmp_path: Path, tank: int, meter: int, *, opcua_port: int | None) -> SiteConfig:
    data = demo_config_data(
        device_ports={"tank1": tank, "meter1": meter}, http_port=0, opcua_port=opcua_port or 0
    )
    data["devices"] = [d for d in data["devices"] if d["name"] in ("tank1", "meter1")]
    for device in data["devices"]:
        device["options"].update(poll_interval_s=0.1, timeout_s=0.3)
    data["storage"]["path"] = str(tmp_path / "twin.db")
    data["opcua_server"]["enabled"] = opcua_port is not None
    if opcua_port is not None:
        data["opcua_server"]["users"] = []
        data["opcua_server"]["allow_anonymous"] = True
    return parse_config(yaml.safe_dump(data), source="test")


def _gateway_tasks() -> set[str]:
    prefixes = ("pump:", "driver:", "twin:", "opcua-server:")
    return {
        t.get_name()
        for t in asyncio.all_tasks()
        if t.get_name().startswith(prefixes) and not t.done()
    }


@pytest.mark.slow
async def test_a_start_that_fails_halfway_unwinds_what_had_started(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        async with TankDevice(seed=3, tick_hz=0) as tank, MeterDevice(seed=3, tick_hz=0) as meter:
            gw = Gateway(_config(tmp_path, tank.port, meter.port, opcua_port=port))
            with pytest.raises(Exception) as caught:
                await gw.start()
            assert not isinstance(caught.value, ShutdownError), "the start's own cause is raised"
            # Everything that had started is stopped again: the drivers, their pumps, the
            # pruning task, and the store (which no longer takes samples).
            assert {d.state for d in gw.drivers.values()} == {ConnectionState.CLOSED}
            assert _gateway_tasks() == set()
            with pytest.raises(StoreError, match="not open"):
                gw.store.ingest([])
            # And it can be started again once the cause is gone.
            busy.close()
            await gw.start()
            await gw.stop()
    finally:
        busy.close()


async def test_stop_reverses_start_and_a_failing_step_still_flushes_the_twin(tmp_path):
    async with TankDevice(seed=3, tick_hz=0) as tank, MeterDevice(seed=3, tick_hz=0) as meter:
        gw = Gateway(_config(tmp_path, tank.port, meter.port, opcua_port=None))
        await gw.start()
        assert _gateway_tasks() >= {"pump:tank1", "pump:meter1", "twin:prune"}
        tank_driver = gw.drivers["tank1"]
        real_close = tank_driver.close

        async def close_then_fail() -> Any:
            await real_close()
            raise RuntimeError("socket would not close")

        tank_driver.close = close_then_fail  # type: ignore[method-assign]
        rev = gw.store.append_event("Marker", {"before": "stop"})
        with pytest.raises(ShutdownError, match="socket would not close"):
            await gw.stop()
        assert _gateway_tasks() == set()
        assert gw.drivers["meter1"].state is ConnectionState.CLOSED
        # The store closed after the failing step: what was ingested before stop is on disk.
        reopened = Gateway(_config(tmp_path, tank.port, meter.port, opcua_port=None))
        await asyncio.to_thread(reopened.store.open)
        try:
            assert reopened.store.rev >= rev
            events = reopened.store.events_since(rev - 1, limit=1)
            assert events[0].type == "Marker"
        finally:
            await asyncio.to_thread(reopened.store.close)


async def test_listeners_are_removed_at_stop(tmp_path):
    async with TankDevice(seed=3, tick_hz=0) as tank, MeterDevice(seed=3, tick_hz=0) as meter:
        gw = Gateway(_config(tmp_path, tank.port, meter.port, opcua_port=None))
        await gw.start()
        driver = gw.drivers["tank1"]
        assert driver._listeners, "the gateway follows each driver's state"
        await gw.stop()
        assert not driver._listeners
