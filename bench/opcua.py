"""OPC UA notifications/s through the driver into the twin, beside a bare asyncua client.

    .venv/bin/python bench/opcua.py [--items 5000] [--rate 10] [--duration 10] [--repeats 3]

The simulated PLC (`python -m plantsim --plc-extra-signals N`) runs as its own process, so it
does not share the GIL with the measured client. It serves N Double variables
`ns=2;s=Bench.SignalNNNNN` that all change `--rate` times a second (one source timestamp per
update). Every run subscribes to the same N items with the same subscription parameters
(publishing interval, keep-alive, queue size 1, sampling interval = publishing interval), waits
until the initial values are in, then counts notifications for `--duration` seconds:

- gateway: `OpcuaDriver` → `TwinStore.ingest` (real SQLite file in a temp dir), counted at ingest;
- bare handler: `asyncua.Client.create_subscription(params, handler)` +
  `subscribe_data_change`, the handler only counts (asyncua's documented callback API);
- bare raw: the same client one layer down (`UaClient.create_subscription` with a callback
  that counts each publish response's MonitoredItems): asyncua's own ceiling, since every path
  above pays at least this (binary decoding of the publish responses).

The runs alternate, `--repeats` times each; the table shows medians. Beside them, a probe (a
second client with a server-side queue of 100 on 10 items, so no update is coalesced) measures
the rate the server really offers, and /proc gives the server's and client's CPU use: when
the server saturates, every client gets what it offers and the ratio says little.
The last line of output is one JSON object with the medians; its "bare" is the handler path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncua import Client, ua

from benchutil import free_port
from drivers.backoff import Backoff
from drivers.contract import Quality
from drivers.opcua import OpcuaDriver, OpcuaPoint
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore

ROOT = Path(__file__).resolve().parent.parent
PROBE_ITEMS = 10


@dataclass
class Run:
    """One measured window."""

    kind: str
    notifications: int
    seconds: float
    client_cpu_s: float
    server_cpu_s: float
    offered: float  # server updates/s seen by the probe, times the item count

    @property
    def rate(self) -> float:
        return self.notifications / self.seconds

    @property
    def client_cpu(self) -> float:
        return self.client_cpu_s / self.seconds

    @property
    def server_cpu(self) -> float:
        return self.server_cpu_s / self.seconds


def main(argv: list[str] | None = None) -> int:
    """Start the simulated PLC, alternate the runs, print medians, then one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=10.0, help="server updates per second")
    parser.add_argument("--publishing-ms", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=0, help="PLC port (default: a free one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    return asyncio.run(bench(args))


async def bench(args: argparse.Namespace) -> int:
    port = args.port or free_port()
    endpoint = f"opc.tcp://127.0.0.1:{port}/plantsim/oven"
    nodes = [f"ns=2;s=Bench.Signal{i:05d}" for i in range(args.items)]
    print(
        f"OPC UA notification benchmark: {args.items} monitored items changing at "
        f"{args.rate:g} Hz (offered {args.items * args.rate:,.0f}/s), publishing interval "
        f"{args.publishing_ms:g} ms, queue size 1, {args.duration:g} s windows, "
        f"{args.repeats} repeats (medians)",
        flush=True,
    )
    server = _start_plantsim(port, args.items, args.rate)
    print(f"server: python -m plantsim (pid {server.pid}) at {endpoint}", flush=True)
    runs: dict[str, list[Run]] = {"gateway": [], "bare handler": [], "bare raw": []}
    measure: dict[str, Callable[[], Awaitable[Run]]] = {
        "gateway": lambda: run_gateway(endpoint, nodes, args, server.pid),
        "bare handler": lambda: run_bare(endpoint, nodes, args, server.pid, raw=False),
        "bare raw": lambda: run_bare(endpoint, nodes, args, server.pid, raw=True),
    }
    try:
        await _wait_ready(endpoint, nodes[-1])
        for repeat in range(args.repeats):
            line = []
            for kind, fn in measure.items():
                run = await fn()
                runs[kind].append(run)
                line.append(f"{kind} {run.rate:>9,.0f}/s")
                await asyncio.sleep(1.0)  # let the server drop the old session's queues
            print(f"  run {repeat + 1}: " + "   ".join(line), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(server.wait, 10)
        except subprocess.TimeoutExpired:
            server.kill()

    med = {kind: _median_run(rs) for kind, rs in runs.items()}
    gateway, handler, raw = med["gateway"], med["bare handler"], med["bare raw"]
    offered = statistics.median(r.offered for rs in runs.values() for r in rs)
    print()
    print(
        f"{'path':<44} {'notif./s':>10} {'client CPU':>11} {'µs CPU/notif.':>14} {'server CPU':>11}"
    )
    print(f"{'-' * 44} {'-' * 10} {'-' * 11} {'-' * 14} {'-' * 11}")
    for label, run in (
        ("gateway: OpcuaDriver -> TwinStore.ingest", gateway),
        ("bare: asyncua Client + counting handler", handler),
        ("bare raw: UaClient publish callback (ceiling)", raw),
    ):
        us = run.client_cpu_s / max(run.notifications, 1) * 1e6
        print(
            f"{label:<44} {run.rate:>10,.0f} {run.client_cpu:>10.0%} {us:>14.1f} "
            f"{run.server_cpu:>10.0%}"
        )
    print(f"{'server offered (probe, queue 100, x items)':<44} {offered:>10,.0f}")
    print()
    ratio = gateway.rate / handler.rate
    ratio_raw = gateway.rate / raw.rate
    print(f"ratio gateway / bare handler: {ratio:.2f}    gateway / bare raw: {ratio_raw:.2f}")
    per = {kind: r.client_cpu_s / max(r.notifications, 1) for kind, r in med.items()}
    print(
        "client capacity ratio (bare CPU per notification / gateway's): "
        f"vs handler {per['bare handler'] / per['gateway']:.2f}, "
        f"vs raw {per['bare raw'] / per['gateway']:.2f}"
    )
    nominal = args.items * args.rate
    fastest = max(handler.rate, raw.rate)
    if fastest >= 0.85 * offered or offered < 0.9 * nominal:
        print(
            f"note: the server is the bottleneck: it offers {offered:,.0f}/s of a nominal "
            f"{nominal:,.0f}/s at {raw.server_cpu:.0%} CPU, and the fastest client receives "
            f"{fastest:,.0f}/s of it. The rate ratios say little; the capacity ratio (CPU per "
            "notification) says what each path would reach if the client were the bottleneck."
        )
    print(
        "CPU is user+system time of the whole process per wall second (100% = one core); the "
        "gateway's includes the twin's SQLite writer thread."
    )
    print(
        json.dumps(
            {
                "gateway_notifications_per_s": round(gateway.rate, 1),
                "bare_client_notifications_per_s": round(handler.rate, 1),
                "ratio": round(ratio, 3),
            }
        )
    )
    return 0


# -- the three paths ----------------------------------------------------------------------------


async def run_gateway(endpoint: str, nodes: list[str], args: argparse.Namespace, pid: int) -> Run:
    """OpcuaDriver -> TwinStore.ingest into a real SQLite file."""
    keys = [f"bench/plc/signals/s{i:05d}" for i in range(len(nodes))]
    defs = [PointDef(k, "plc", "float64") for k in keys]
    options = {
        "publishing_interval_ms": args.publishing_ms,
        "keepalive_count": 10,
        "lifetime_count": 100,
        "queue_size": 1,
        "timeout_s": 10,
    }
    points = [OpcuaPoint(k, n) for k, n in zip(keys, nodes, strict=True)]
    with tempfile.TemporaryDirectory() as tmp:
        store = TwinStore(Path(tmp) / "twin.db", defs)
        await asyncio.to_thread(store.open)
        driver = OpcuaDriver("plc", endpoint, options, points, backoff=Backoff(0.2, 2))
        counter = _Counter()

        async def consume() -> None:
            async for batch in driver.samples():
                store.ingest(batch)
                good = sum(1 for s in batch if s.quality is Quality.GOOD)
                counter.add(good)

        task = asyncio.create_task(consume())
        await driver.start()
        try:
            run = await _measure("gateway", counter, len(nodes), endpoint, args, pid)
        finally:
            await driver.close()
            await task
            await asyncio.to_thread(store.close)
        if driver.state.value != "CLOSED" or driver.dropped_batches:
            print(f"  (gateway: {driver.dropped_batches} batches dropped)", flush=True)
        return run


async def run_bare(
    endpoint: str, nodes: list[str], args: argparse.Namespace, pid: int, *, raw: bool
) -> Run:
    """A plain asyncua client whose callback only counts."""
    counter = _Counter()
    client = Client(endpoint, timeout=10)
    await client.connect()
    params = _subscription_params(args.publishing_ms)
    try:
        if raw:

            def on_publish(result: ua.PublishResult) -> None:
                for n in result.NotificationMessage.NotificationData or ():
                    if isinstance(n, ua.DataChangeNotification):
                        counter.add(len(n.MonitoredItems))

            created = await client.uaclient.create_subscription(params, on_publish)
            items = [
                ua.MonitoredItemCreateRequest(
                    ItemToMonitor=ua.ReadValueId(
                        NodeId=ua.NodeId.from_string(n), AttributeId=ua.AttributeIds.Value
                    ),
                    MonitoringMode=ua.MonitoringMode.Reporting,
                    RequestedParameters=ua.MonitoringParameters(
                        ClientHandle=i + 1, SamplingInterval=-1, QueueSize=1, DiscardOldest=True
                    ),
                )
                for i, n in enumerate(nodes)
            ]
            await client.uaclient.create_monitored_items(
                ua.CreateMonitoredItemsParameters(
                    SubscriptionId=created.SubscriptionId,
                    TimestampsToReturn=ua.TimestampsToReturn.Both,
                    ItemsToCreate=items,
                )
            )
        else:

            class Handler:
                def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
                    counter.add(1)

            sub = await client.create_subscription(params, Handler())
            await sub.subscribe_data_change(
                [client.get_node(n) for n in nodes], queuesize=1, sampling_interval=-1
            )
        kind = "bare raw" if raw else "bare handler"
        return await _measure(kind, counter, len(nodes), endpoint, args, pid)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), 5)


# -- measuring ----------------------------------------------------------------------------------


class _Counter:
    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n


async def _measure(
    kind: str, counter: _Counter, items: int, endpoint: str, args: argparse.Namespace, pid: int
) -> Run:
    """Wait for the initial values, then count over the window, with the probe running."""
    deadline = time.monotonic() + 60
    while counter.count < items:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{kind}: only {counter.count} of {items} initial values in 60 s")
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # past the initial burst
    probe = _Probe(endpoint)
    await probe.start(args.publishing_ms)
    start_count, start_probe = counter.count, probe.count
    t0, c0, s0 = time.perf_counter(), time.process_time(), _proc_cpu(pid)
    await asyncio.sleep(args.duration)
    t1, c1, s1 = time.perf_counter(), time.process_time(), _proc_cpu(pid)
    got, probed = counter.count - start_count, probe.count - start_probe
    await probe.stop()
    offered = probed / PROBE_ITEMS / (t1 - t0) * items
    return Run(kind, got, t1 - t0, c1 - c0, s1 - s0, offered)


class _Probe:
    """Counts every update of a few items (server-side queue 100: nothing coalesced)."""

    def __init__(self, endpoint: str) -> None:
        self.client = Client(endpoint, timeout=10)
        self.count = 0

    async def start(self, publishing_ms: float) -> None:
        await self.client.connect()

        def on_publish(result: ua.PublishResult) -> None:
            for n in result.NotificationMessage.NotificationData or ():
                if isinstance(n, ua.DataChangeNotification):
                    self.count += len(n.MonitoredItems)

        created = await self.client.uaclient.create_subscription(
            _subscription_params(publishing_ms), on_publish
        )
        items = [
            ua.MonitoredItemCreateRequest(
                ItemToMonitor=ua.ReadValueId(
                    NodeId=ua.NodeId(f"Bench.Signal{i:05d}", 2), AttributeId=ua.AttributeIds.Value
                ),
                MonitoringMode=ua.MonitoringMode.Reporting,
                RequestedParameters=ua.MonitoringParameters(
                    ClientHandle=i + 1, SamplingInterval=0, QueueSize=100, DiscardOldest=True
                ),
            )
            for i in range(PROBE_ITEMS)
        ]
        await self.client.uaclient.create_monitored_items(
            ua.CreateMonitoredItemsParameters(
                SubscriptionId=created.SubscriptionId,
                TimestampsToReturn=ua.TimestampsToReturn.Both,
                ItemsToCreate=items,
            )
        )
        await asyncio.sleep(0.5)  # the initial values
        self.count = 0

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.disconnect(), 5)


def _subscription_params(publishing_ms: float) -> ua.CreateSubscriptionParameters:
    return ua.CreateSubscriptionParameters(
        RequestedPublishingInterval=publishing_ms,
        RequestedLifetimeCount=100,
        RequestedMaxKeepAliveCount=10,
        MaxNotificationsPerPublish=0,
        PublishingEnabled=True,
        Priority=0,
    )


def _median_run(runs: list[Run]) -> Run:
    ordered = sorted(runs, key=lambda r: r.rate)
    return ordered[len(ordered) // 2]


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc); 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the simulated PLC --------------------------------------------------------------------------


def _start_plantsim(port: int, items: int, rate: float) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "plantsim", "--seed", "1", "--plc-port", str(port),
        "--plc-extra-signals", str(items), "--plc-extra-rate", f"{rate:g}",
        "--tank-port", "0", "--meter-port", "0", "--log-level", "WARNING",
    ]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL)


async def _wait_ready(endpoint: str, last_node: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while True:
        client = Client(endpoint, timeout=2)
        try:
            await client.connect()
            try:
                await client.get_node(last_node).read_value()
                return
            finally:
                await client.disconnect()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
