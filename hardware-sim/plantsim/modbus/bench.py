"""Modbus bench device: N float32 values in holding registers that all change on every tick.

Value i is 50 + 40 sin(2 pi 0.1 Hz t + phase_i) plus Gaussian noise (sigma 0.5), the same signal
as the OPC UA bench signals, held as float32 in holding registers 2i and 2i+1 (ABCD: the high
word first). The noise makes every value differ from the one before, so a client polling at any
interval sees every point change. The values are made with NumPy, a whole tick at once: 20,000
points cost ~1 ms per tick, so the plant does not compete with the gateway it measures.

The device counts what it serves (`reads`, `registers_read`, `sweeps`): a sweep is a read that
reaches the last register, so sweeps over a window are the polls that read every point.
"""

from __future__ import annotations

import numpy as np

from ..faults import ModbusFaults, Value
from .modbus_device import ServedModbusDevice
from .pdu import ILLEGAL_DATA_ADDRESS, ModbusError

MAX_POINTS = 32_767  # two registers each in one 65,536-register table

_FREQ_HZ = 0.1
_OFFSET = 50.0
_AMPLITUDE = 40.0
_NOISE = 0.5


class BenchModel:
    """`n` sine-plus-noise signals with seeded phases; float32 words of every value at once."""

    def __init__(self, n: int, seed: int = 0) -> None:
        """Create `n` signals; the same seed gives the same phases and noise."""
        if not 0 < n <= MAX_POINTS:
            raise ValueError(f"bench: {n} points outside 1..{MAX_POINTS}")
        self.n = n
        self.time_s = 0.0
        self._rng = np.random.default_rng(seed)
        self._phases = self._rng.uniform(0.0, 2.0 * np.pi, n)

    def step(self, dt: float) -> None:
        """Advance by `dt` seconds."""
        self.time_s += dt

    def signals(self) -> dict[str, Value]:
        """No named signals: the values are served as registers only (see `words`)."""
        return {}

    def write(self, signal: str, value: Value) -> None:
        """Refuse: the bench values are read-only."""
        raise KeyError(f"bench: {signal!r} is read-only")

    def values(self) -> np.ndarray:
        """Every value at the current time, float32; each call draws fresh noise."""
        angle = 2.0 * np.pi * _FREQ_HZ * self.time_s
        noise = self._rng.normal(0.0, _NOISE, self.n)
        return (_OFFSET + _AMPLITUDE * np.sin(angle + self._phases) + noise).astype(np.float32)

    def words(self) -> np.ndarray:
        """The holding registers: value i in words 2i (high) and 2i+1 (low)."""
        return self.values().astype(">f4").view(">u2")


class BenchModbusDevice(ServedModbusDevice):
    """`BenchModel` behind holding registers 0..2N-1, served over Modbus TCP (unit id 1).

    Link faults work as on every Modbus device (drop, refuse, stop/start, restart, slow, garbage,
    exception); signal faults (freeze, spike, noise) do not, as the values have no names.
    """

    kind = "bench"
    model: BenchModel

    def __init__(
        self,
        points: int,
        seed: int = 0,
        *,
        name: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        framer: str = "socket",
        unit_id: int = 1,
        speed: float = 1.0,
        tick_hz: float = 10.0,
    ) -> None:
        """Create `points` values; nothing listens until `start`."""
        self.words = np.zeros(0, dtype=">u2")
        self.reads = 0
        self.registers_read = 0
        self.sweeps = 0
        super().__init__(
            BenchModel(points, seed),
            ModbusFaults((), seed=seed),
            _BenchStore(self),
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
    def points(self) -> int:
        """How many float32 values the device serves."""
        return self.model.n

    @property
    def summary(self) -> str:
        """Protocol and register layout, for the start-up log line."""
        return (
            f"modbus framer {self.framer}, unit {self.unit_id}, "
            f"{self.points} float32 in holding 0..{2 * self.points - 1}"
        )

    def refresh(self) -> None:
        """Make every value anew (there are no signal faults to apply)."""
        self.words = self.model.words()

    def _publish(self, values: dict[str, Value]) -> None:
        # Unused: `refresh` publishes the registers directly.
        pass


class _BenchStore:
    """The bench registers as a Modbus `Store`: holding registers, read-only, counted."""

    def __init__(self, device: BenchModbusDevice) -> None:
        self.device = device

    def read(self, table: str, address: int, count: int) -> list[int] | list[bool]:
        device = self.device
        words = device.words
        end = address + count
        if table != "holding" or end > len(words):
            raise ModbusError(ILLEGAL_DATA_ADDRESS, f"{table}:{address}+{count} is not mapped")
        device.reads += 1
        device.registers_read += count
        if end == len(words):
            device.sweeps += 1
        words_read: list[int] = words[address:end].tolist()
        return words_read

    def write(self, table: str, address: int, values: list[int] | list[bool]) -> None:
        raise ModbusError(ILLEGAL_DATA_ADDRESS, f"{table}:{address}: bench registers are read-only")
