"""A device served over Modbus TCP: a register map over a model, with range-checked writes."""

from __future__ import annotations

from ..device_base import Device, Model
from ..faults import ModbusFaults, Value
from .codec import BIT_TABLES, Image, RegisterMap
from .pdu import ILLEGAL_DATA_ADDRESS, ILLEGAL_DATA_VALUE, ModbusError, Store
from .server import ModbusServer


class ServedModbusDevice(Device):
    """A device whose registers a `ModbusServer` serves for one unit id: the part every Modbus
    device of the plant shares, whatever stands behind its registers."""

    protocol = "modbus"
    faults: ModbusFaults

    def __init__(
        self,
        model: Model,
        faults: ModbusFaults,
        store: Store,
        *,
        seed: int,
        name: str | None,
        host: str,
        port: int,
        framer: str,
        unit_id: int,
        speed: float,
        tick_hz: float,
    ) -> None:
        """Wire model, faults and server; nothing listens until `start`."""
        name = name or self.kind
        self.server = ModbusServer(
            store, faults, unit_id=unit_id, framer=framer, name=name, seed=seed
        )
        super().__init__(
            model, faults, name=name, host=host, port=port, speed=speed, tick_hz=tick_hz
        )

    @property
    def framer(self) -> str:
        """`socket` (MBAP) or `rtu` (RTU over TCP)."""
        return self.server.framer

    @property
    def unit_id(self) -> int:
        """The Modbus unit id the device answers."""
        return self.server.unit_id

    def drop_connections(self) -> int:
        """Abort every client connection now; return how many were open."""
        return self.server.drop_connections()

    async def _open(self, host: str, port: int) -> int:
        return await self.server.start(host, port)

    async def _close(self) -> None:
        await self.server.stop()


class ModbusDevice(ServedModbusDevice):
    """A model behind a register map, served by `ModbusServer` for one unit id."""

    def __init__(
        self,
        model: Model,
        register_map: RegisterMap,
        *,
        seed: int = 0,
        name: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        framer: str = "socket",
        unit_id: int = 1,
        speed: float = 1.0,
        tick_hz: float = 10.0,
    ) -> None:
        """Wire model, map, faults and server; nothing listens until `start`."""
        self.register_map = register_map
        self.image = Image()
        super().__init__(
            model,
            ModbusFaults(register_map.signals(), seed=seed),
            _MapStore(self),
            seed=seed,
            name=name,
            host=host,
            port=port,
            framer=framer,
            unit_id=unit_id,
            speed=speed,
            tick_hz=tick_hz,
        )

    @property
    def summary(self) -> str:
        """Protocol, framer and unit id, for the start-up log line."""
        return f"modbus framer {self.framer}, unit {self.unit_id}"

    def _publish(self, values: dict[str, Value]) -> None:
        self.image = self.register_map.build_image(values)


class _MapStore:
    """The device's registers as a Modbus `Store`: reads from the image, writes to the model."""

    def __init__(self, device: ModbusDevice) -> None:
        self.device = device

    def read(self, table: str, address: int, count: int) -> list[int] | list[bool]:
        image = self.device.image
        source: dict[int, int] | dict[int, bool] = (
            image.bits[table] if table in BIT_TABLES else image.registers[table]
        )
        try:
            return [source[a] for a in range(address, address + count)]
        except KeyError as exc:
            raise ModbusError(
                ILLEGAL_DATA_ADDRESS, f"{table}:{exc.args[0]} is not mapped"
            ) from None

    def write(self, table: str, address: int, values: list[int] | list[bool]) -> None:
        device = self.device
        rmap = device.register_map
        # Validate the whole request before touching the model: a device rejects it whole.
        commands: list[tuple[str, float | bool]] = []
        for i, raw in enumerate(values):
            found = rmap.at(table, address + i)
            if found is None or not found[0].writable:
                raise ModbusError(ILLEGAL_DATA_ADDRESS, f"{table}:{address + i} is not writable")
            point, _ = found
            if point.size != 1:
                raise ModbusError(ILLEGAL_DATA_ADDRESS, f"{point.where}: multi-register point")
            if point.raw_range is not None:
                lo, hi = point.raw_range
                if not lo <= int(raw) <= hi:
                    raise ModbusError(
                        ILLEGAL_DATA_VALUE, f"{point.where}: {raw} outside {lo}..{hi}"
                    )
            if point.datatype == "bool":
                commands.append((point.signal or "", bool(raw)))
            else:
                value = rmap.value_of(point, [int(raw)])
                commands.append((point.signal or "", float(value)))
        for signal, value in commands:
            try:
                device.model.write(signal, value)
            except (KeyError, ValueError) as exc:
                raise ModbusError(ILLEGAL_DATA_VALUE, str(exc)) from exc
        device.refresh()
