"""The demo plant's devices, and `Plant`, which runs them together."""

from __future__ import annotations

import asyncio
from typing import Self

from .device import Device
from .meter import MeterModel, MeterParams
from .modbus.codec import WordOrder
from .modbus.device import ModbusDevice
from .modbus.maps import meter_map, tank_map
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


class Plant:
    """The whole demo plant: the tank and the meter, started and stopped together."""

    def __init__(
        self,
        seed: int = 0,
        *,
        host: str = "127.0.0.1",
        tank_port: int = 0,
        meter_port: int = 0,
        framer: str = "socket",
        meter_word_order: WordOrder = "little",
        speed: float = 1.0,
        tick_hz: float = 10.0,
    ) -> None:
        """Create every device; ports 0 pick free ones."""
        common = {"host": host, "framer": framer, "speed": speed, "tick_hz": tick_hz}
        self.tank = TankDevice(seed, port=tank_port, **common)  # type: ignore[arg-type]
        self.meter = MeterDevice(
            seed,
            port=meter_port,
            word_order=meter_word_order,
            **common,  # type: ignore[arg-type]
        )

    @property
    def devices(self) -> dict[str, Device]:
        """Every device by name."""
        return {d.name: d for d in (self.tank, self.meter)}

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
