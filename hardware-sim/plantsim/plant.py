"""The demo plant's devices, and `Plant`, which runs them together."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

from .device_base import Device
from .meter import MeterModel, MeterParams
from .modbus.bench import BenchModbusDevice
from .modbus.codec import WordOrder
from .modbus.maps import meter_map, tank_map
from .modbus.modbus_device import ModbusDevice
from .opcua.nodes import oven_map
from .opcua.opcua_device import OpcuaDevice
from .oven import OvenModel, OvenParams
from .tank import TankModel, TankParams


class TankDevice(ModbusDevice):
    """The cooling-water tank behind Modbus TCP (register map in hardware-sim/README.md)."""

    kind = "tank"
    model: TankModel

    def __init__(
        self,
        seed: int = 0,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        framer: str = "socket",
        unit_id: int = 1,
        speed: float = 1.0,
        tick_hz: float = 10.0,
        params: TankParams | None = None,
        name: str | None = None,
    ) -> None:
        """Create the tank; it serves nothing until started."""
        super().__init__(
            TankModel(seed, params),
            tank_map(),
            seed=seed,
            name=name,
            host=host,
            port=port,
            framer=framer,
            unit_id=unit_id,
            speed=speed,
            tick_hz=tick_hz,
        )


class MeterDevice(ModbusDevice):
    """The energy meter behind Modbus TCP; 32/64-bit word order is configurable."""

    kind = "meter"
    model: MeterModel

    def __init__(
        self,
        seed: int = 0,
        *,
        word_order: WordOrder = "little",
        host: str = "127.0.0.1",
        port: int = 0,
        framer: str = "socket",
        unit_id: int = 1,
        speed: float = 1.0,
        tick_hz: float = 10.0,
        params: MeterParams | None = None,
        name: str | None = None,
    ) -> None:
        """Create the meter; it serves nothing until started."""
        if word_order not in ("big", "little"):
            raise ValueError(f"meter: word_order {word_order!r}; use big or little")
        self.word_order = word_order
        super().__init__(
            MeterModel(seed, params),
            meter_map(word_order),
            seed=seed,
            name=name,
            host=host,
            port=port,
            framer=framer,
            unit_id=unit_id,
            speed=speed,
            tick_hz=tick_hz,
        )


class OvenDevice(OpcuaDevice):
    """The curing oven behind an OPC UA PLC (node map in hardware-sim/README.md)."""

    kind = "oven"
    model: OvenModel

    def __init__(
        self,
        seed: int = 0,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        speed: float = 1.0,
        tick_hz: float = 10.0,
        params: OvenParams | None = None,
        name: str | None = None,
        security: bool | Sequence[str] = False,
        pki_dir: str | Path | None = None,
        users: Mapping[str, str] | None = None,
        extra_signals: int = 0,
        extra_rate_hz: float | None = None,
    ) -> None:
        """Create the oven; it serves nothing until started."""
        super().__init__(
            OvenModel(seed, params),
            oven_map(),
            seed=seed,
            name=name,
            host=host,
            port=port,
            path="/plantsim/oven",
            speed=speed,
            tick_hz=tick_hz,
            security=security,
            pki_dir=pki_dir,
            users=users,
            extra_signals=extra_signals,
            extra_rate_hz=extra_rate_hz,
        )


class Plant:
    """The whole demo plant: tank, meter and (given `plc_port`) the oven, run together.

    With `bench_points` > 0 it also runs a `BenchModbusDevice` of that many float32 values on
    `bench_port` (0 picks a free one), for throughput and footprint measurements.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        host: str = "127.0.0.1",
        tank_port: int = 0,
        meter_port: int = 0,
        plc_port: int | None = None,
        framer: str = "socket",
        meter_word_order: WordOrder = "little",
        speed: float = 1.0,
        tick_hz: float = 10.0,
        plc_security: bool | Sequence[str] = False,
        plc_pki_dir: str | Path | None = None,
        plc_users: Mapping[str, str] | None = None,
        plc_extra_signals: int = 0,
        plc_extra_rate_hz: float | None = None,
        bench_points: int = 0,
        bench_port: int = 0,
    ) -> None:
        """Create every device; ports 0 pick free ones; `plc_port=None` leaves the oven out."""
        common = {"host": host, "framer": framer, "speed": speed, "tick_hz": tick_hz}
        self.tank = TankDevice(seed, port=tank_port, **common)  # type: ignore[arg-type]
        self.meter = MeterDevice(
            seed,
            port=meter_port,
            word_order=meter_word_order,
            **common,  # type: ignore[arg-type]
        )
        self.oven: OvenDevice | None = None
        if plc_port is not None:
            self.oven = OvenDevice(
                seed,
                host=host,
                port=plc_port,
                speed=speed,
                tick_hz=tick_hz,
                security=plc_security,
                pki_dir=plc_pki_dir,
                users=plc_users,
                extra_signals=plc_extra_signals,
                extra_rate_hz=plc_extra_rate_hz,
            )
        self.bench: BenchModbusDevice | None = None
        if bench_points:
            self.bench = BenchModbusDevice(
                bench_points,
                seed,
                port=bench_port,
                **common,  # type: ignore[arg-type]
            )

    @property
    def devices(self) -> dict[str, Device]:
        """Every device by name."""
        devices: list[Device] = [self.tank, self.meter]
        if self.oven is not None:
            devices.append(self.oven)
        if self.bench is not None:
            devices.append(self.bench)
        return {d.name: d for d in devices}

    async def __aenter__(self) -> Self:
        """Start every device."""
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop every device."""
        await self.stop()

    async def start(self) -> None:
        """Start every device; if one fails, stop the ones already started."""
        started: list[Device] = []
        try:
            for device in self.devices.values():
                await device.start()
                started.append(device)
        except BaseException:
            for device in started:
                await device.stop()
            raise

    async def stop(self) -> None:
        """Stop every device."""
        await asyncio.gather(*(d.stop() for d in self.devices.values()))
