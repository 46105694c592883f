"""What every simulated device is: a physics model, its faults, a server, and a clock.

`Device` owns the lifecycle (start, stop, restart on the same port) and the tick loop that steps
the model in wall-clock time times `speed`; a protocol subclass (`ModbusDevice`, `OpcuaDevice`)
publishes the faulted signal values and serves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Protocol, Self

from .faults import Faults, Value

log = logging.getLogger(__name__)

# A stalled event loop (debugger, suspended laptop) must not make the plant jump hours ahead.
_MAX_TICK_S = 1.0


class Model(Protocol):
    """A pure physics model a device serves."""

    time_s: float

    def step(self, dt: float) -> None:
        """Advance by `dt` seconds."""
        ...

    def signals(self) -> Mapping[str, Value]:
        """Return every signal by name."""
        ...

    def write(self, signal: str, value: Value) -> None:
        """Apply a command from a client."""
        ...


class Device:
    """A simulated device; use `async with` or `start`/`stop`."""

    kind = "device"
    protocol = "?"

    def __init__(
        self,
        model: Model,
        faults: Faults,
        *,
        name: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        speed: float = 1.0,
        tick_hz: float = 10.0,
    ) -> None:
        """Configure; `tick_hz=0` never steps on its own (tests then call `advance`)."""
        if speed < 0:
            raise ValueError(f"{name or self.kind}: speed {speed} must not be negative")
        if tick_hz < 0:
            raise ValueError(f"{name or self.kind}: tick_hz {tick_hz} must not be negative")
        self.model = model
        self.faults = faults
        self.name = name or self.kind
        self.host = host
        self.port = port
        self.speed = speed
        self.tick_hz = tick_hz
        self.served: dict[str, Value] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._running = False
        self._halted = False
        faults.attach(self)
        faults.on_change = self.refresh
        self.refresh()

    @property
    def endpoint(self) -> str:
        """Return where clients reach the device, e.g. `tcp://127.0.0.1:5020`."""
        return f"tcp://{self.host}:{self.port}"

    @property
    def summary(self) -> str:
        """Describe the protocol settings for the start-up log line."""
        return self.protocol

    @property
    def halted(self) -> bool:
        """Whether the server is stopped by `halt` while the device (and its plant) runs."""
        return self._halted

    async def __aenter__(self) -> Self:
        """Start serving."""
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop serving."""
        await self.stop()

    async def start(self) -> None:
        """Bind the port (0 → a free one, then `.port` is the real one) and start the clock."""
        if self._running:
            raise RuntimeError(f"{self.name}: already running on {self.endpoint}")
        self.refresh()
        self.port = await self._open(self.host, self.port)
        self._running = True
        if self.tick_hz > 0:
            self._ticker = asyncio.create_task(self._tick(), name=f"plantsim:{self.name}:tick")
        log.debug("%s: serving on %s", self.name, self.endpoint)

    async def stop(self) -> None:
        """Stop the clock and the server; close every connection."""
        self._running = False
        self._halted = False
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        await self._close()

    async def restart(self, downtime: float = 0.0) -> None:
        """Stop the server, wait `downtime` seconds, serve again on the same port.

        The plant keeps running meanwhile, as the process does while its controller reboots.
        """
        if not self._running:
            raise RuntimeError(f"{self.name}: not running")
        await self._close()
        self._halted = True
        if downtime > 0:
            await asyncio.sleep(downtime)
        await self._open(self.host, self.port)
        self._halted = False
        log.info("%s: restarted on %s", self.name, self.endpoint)

    async def halt(self) -> None:
        """Stop the server as a power cut would, until `resume`; the plant keeps running."""
        if not self._running:
            raise RuntimeError(f"{self.name}: not running")
        if not self._halted:
            await self._close()
            self._halted = True
            log.info("%s: stopped serving %s", self.name, self.endpoint)

    async def resume(self) -> None:
        """Serve again on the same port after `halt`."""
        if not self._running:
            raise RuntimeError(f"{self.name}: not running")
        if self._halted:
            await self._open(self.host, self.port)
            self._halted = False
            log.info("%s: serving %s again", self.name, self.endpoint)

    def drop_connections(self) -> int:
        """Close every client connection now; return how many were open."""
        raise NotImplementedError

    def advance(self, seconds: float) -> None:
        """Step the model by `seconds` of plant time now and publish the result."""
        self.model.step(seconds)
        self.refresh()

    def refresh(self) -> None:
        """Publish the model's signals, with faults applied, to what the server serves."""
        self.served = self.faults.apply(self.model.signals())
        self._publish(self.served)

    async def _open(self, host: str, port: int) -> int:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    def _publish(self, values: dict[str, Value]) -> None:
        raise NotImplementedError

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        period = 1.0 / self.tick_hz
        last = loop.time()
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            elapsed, last = min(now - last, _MAX_TICK_S), now
            try:
                self.advance(elapsed * self.speed)
            except Exception:
                # A bug in a model must not silently freeze the whole device.
                log.exception("%s: model step failed", self.name)
                raise
