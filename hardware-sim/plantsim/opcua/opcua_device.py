"""A device served over OPC UA: a model behind a node map, optional bench signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..device_base import Device, Model
from ..faults import OpcuaFaults, Value
from .bench import BenchSignals
from .nodes import NAMESPACE_INDEX, NAMESPACE_URI, NodeMap, bench_identifier
from .server import PlcServer

log = logging.getLogger(__name__)


class OpcuaDevice(Device):
    """A model behind a node map, served by `PlcServer`; client writes go to the model."""

    protocol = "opcua"
    faults: OpcuaFaults

    def __init__(
        self,
        model: Model,
        node_map: NodeMap,
        *,
        seed: int = 0,
        name: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/plantsim/oven",
        speed: float = 1.0,
        tick_hz: float = 10.0,
        security: bool | Sequence[str] = False,
        pki_dir: str | Path | None = None,
        users: Mapping[str, str] | None = None,
        extra_signals: int = 0,
        extra_rate_hz: float | None = None,
    ) -> None:
        """Wire model, node map, faults and server; nothing listens until `start`."""
        name = name or self.kind
        rate = tick_hz if extra_rate_hz is None else extra_rate_hz
        if rate < 0:
            raise ValueError(f"{name}: extra_rate_hz {rate} must not be negative")
        if not 0 <= extra_signals <= 100_000:
            raise ValueError(f"{name}: extra_signals {extra_signals} outside 0..100000")
        self.node_map = node_map
        self.extra_rate_hz = rate
        self.bench = BenchSignals(extra_signals, seed) if extra_signals else None
        self._bench_task: asyncio.Task[None] | None = None
        self._bench_t0: float | None = None
        faults = OpcuaFaults(node_map.signals(), seed=seed)
        self.server = PlcServer(
            node_map,
            faults,
            on_write=self._client_write,
            name=name,
            path=path,
            security=security,
            pki_dir=pki_dir,
            users=users,
            extra_signals=extra_signals,
        )
        super().__init__(
            model, faults, name=name, host=host, port=port, speed=speed, tick_hz=tick_hz
        )

    @property
    def endpoint(self) -> str:
        """Return the endpoint URL, e.g. `opc.tcp://127.0.0.1:4840/plantsim/oven`."""
        return self.server.url(self.host, self.port)

    @property
    def summary(self) -> str:
        """Protocol, namespace and security, for the start-up log line."""
        policies = "+".join(p.name for p in self.server.policies)
        users = f", {len(self.server.users)} user(s)" if self.server.users else ", anonymous"
        bench = f", {self.bench.n} bench signals at {self.extra_rate_hz:g} Hz" if self.bench else ""
        return f"opcua ns={NAMESPACE_INDEX} {NAMESPACE_URI}, security {policies}{users}{bench}"

    @property
    def namespace_index(self) -> int:
        """Index of `urn:opstwin:plantsim` in the server's namespace array (always 2)."""
        return NAMESPACE_INDEX

    def node_id(self, signal: str) -> str:
        """The node id serving `signal`, e.g. `ns=2;s=Oven1.Temperature`."""
        return self.node_map.node_id(signal, NAMESPACE_INDEX)

    def bench_node_id(self, i: int) -> str:
        """The node id of bench signal `i`, e.g. `ns=2;s=Bench.Signal00042`."""
        return f"ns={NAMESPACE_INDEX};s={bench_identifier(i)}"

    async def start(self) -> None:
        """Build the address space (first start only, ~1 s), bind, start the clocks."""
        await super().start()
        self.update_bench()
        if self.bench is not None and self.extra_rate_hz > 0:
            self._bench_task = asyncio.create_task(
                self._bench_loop(), name=f"plantsim:{self.name}:bench"
            )

    async def stop(self) -> None:
        """Stop the clocks and the server; tear the address space down."""
        task, self._bench_task = self._bench_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await super().stop()
        await self.server.shutdown()

    def drop_connections(self) -> int:
        """Abort every client connection now; return how many were open."""
        return self.server.drop_connections()

    def update_bench(self, t: float | None = None) -> None:
        """Give every bench signal its value at `t` s (default: wall time since start)."""
        if self.bench is None:
            return
        if t is None:
            loop = asyncio.get_running_loop()
            if self._bench_t0 is None:
                self._bench_t0 = loop.time()
            t = loop.time() - self._bench_t0
        self.server.publish_bench(self.bench.values(t))

    async def _open(self, host: str, port: int) -> int:
        try:
            return await self.server.start(host, port)
        except BaseException:
            if not self._running:
                # The first start failed (port taken): do not leave a built server behind.
                await self.server.shutdown()
            raise

    async def _close(self) -> None:
        await self.server.stop()

    def _publish(self, values: dict[str, Value]) -> None:
        self.server.publish(values, self.faults.statuses())

    def _client_write(self, signal: str, value: Value) -> None:
        self.model.write(signal, value)
        self.refresh()

    async def _bench_loop(self) -> None:
        loop = asyncio.get_running_loop()
        period = 1.0 / self.extra_rate_hz
        deadline = loop.time()
        while True:
            deadline += period
            delay = deadline - loop.time()
            if delay < -period:
                # Fell behind (updates slower than the rate): skip, do not burst to catch up.
                deadline, delay = loop.time(), 0.0
            await asyncio.sleep(max(delay, 0.0))
            self.update_bench()
