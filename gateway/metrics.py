"""`GET /metrics`: the gateway's figures in Prometheus' text format (prometheus-client).

Read at scrape time from what the gateway already keeps (its devices' counters, the twin store's
stats, the writer's queue and commit time, the sync's cursor, the engine's decisions, the OPC UA
server's connections): nothing on the hot paths but an integer increment, and nothing kept in a
registry shared across gateways (the tests run several in one process). The one figure counted
for this endpoint alone is HTTP requests by route and status, by a middleware.

Names follow Prometheus' conventions: `opstwin_` prefix, `_total` for counters, base units
(seconds, bytes). Access is the reads': open, or a token with `http.read_access: token` (a
scraper sends `Authorization: Bearer ...`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from drivers.contract import ConnectionState
from gateway.errors import GatewayError
from gateway.twin.writer import COMMIT_BUCKETS_S

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["CONTENT_TYPE_LATEST", "GatewayCollector", "add_metrics_route"]

_REQUESTS = web.AppKey("opstwin_http_requests", Counter)
_REGISTRY = web.AppKey("opstwin_metrics_registry", CollectorRegistry)
# States a device can be in, all reported (0 or 1) so that a query sees each series always.
_STATES = [s.value for s in ConnectionState] + ["RECEIVING", "WAITING", "STALE"]


class GatewayCollector(Collector):
    """Every figure of one gateway, read when Prometheus scrapes."""

    def __init__(self, gateway: Gateway, requests: Counter[tuple[str, str, str]]) -> None:
        self.gateway = gateway
        self.requests = requests

    def collect(self) -> Iterator[Metric]:
        yield from self._devices()
        yield from self._store()
        yield from self._engine()
        yield from self._sync()
        yield from self._servers()

    def _devices(self) -> Iterator[Metric]:
        gateway = self.gateway
        states = gateway.device_states()
        samples = CounterMetricFamily(
            "opstwin_device_samples", "Samples received from a device.", labels=["device"]
        )
        connects = CounterMetricFamily(
            "opstwin_device_connects",
            "Connections made to a device: the first and every reconnect.",
            labels=["device"],
        )
        skipped = CounterMetricFamily(
            "opstwin_device_polls_skipped",
            "Polls skipped because the one before overran its interval.",
            labels=["device"],
        )
        state = GaugeMetricFamily(
            "opstwin_device_state",
            "1 for the state a device is in now, 0 for the others.",
            labels=["device", "state"],
        )
        for name, info in sorted(states.items()):
            samples.add_metric([name], gateway.samples_received[name])
            connects.add_metric([name], gateway.connects[name])
            skipped.add_metric([name], info.get("polls_skipped") or 0)
            for each in _STATES:
                state.add_metric([name, each], 1.0 if info["state"] == each else 0.0)
        yield from (samples, connects, skipped, state)

    def _store(self) -> Iterator[Metric]:
        store = self.gateway.store
        stats = store.stats
        load = store.writer_load()
        yield _gauge("opstwin_twin_rev", "The twin's newest rev.", stats.rev)
        yield _gauge(
            "opstwin_twin_uncommitted_revs",
            "Revs handed out and not yet committed to the database.",
            stats.uncommitted_revs,
        )
        yield _counter(
            "opstwin_twin_samples_accepted", "Samples that changed the twin.", stats.accepted
        )
        yield _counter(
            "opstwin_twin_samples_filtered", "Samples within deadband: dropped.", stats.filtered
        )
        yield _gauge(
            "opstwin_writer_queue_items", "Batches waiting for the writer thread.", load.queued
        )
        yield _gauge(
            "opstwin_writer_backlog_rows",
            "Rows the writer holds uncommitted (grows while commits fail).",
            stats.backlog_rows,
        )
        yield _counter("opstwin_writer_commits", "Transactions committed.", load.commits)
        cumulative, buckets = 0, []
        for bound, count in zip((*COMMIT_BUCKETS_S, "+Inf"), load.commit_histogram, strict=True):
            cumulative += count
            buckets.append((str(bound), cumulative))
        yield HistogramMetricFamily(
            "opstwin_writer_commit_seconds",
            "Latency of committed transactions (encoding included).",
            buckets=buckets,
            sum_value=load.commit_seconds,
        )
        yield _gauge(
            "opstwin_writer_longest_step_seconds",
            "The longest compaction, retention or size-bound step since start: nothing is "
            "committed while one runs.",
            load.longest_step_s,
        )
        try:
            info = store.storage_info()
        except GatewayError:
            return  # a store not open (starting, stopping): the rest of the scrape still answers
        yield _gauge("opstwin_event_log_bytes", "Bytes of the event log.", info["event_log_bytes"])
        yield _gauge(
            "opstwin_database_bytes",
            "Bytes of the twin database and its WAL.",
            info["database_bytes"],
        )
        yield _gauge(
            "opstwin_database_used_bytes",
            "Bytes of the twin database's pages in use (what storage.max_db_mb bounds).",
            info["used_bytes"],
        )
        if info["bound_bytes"]:
            yield _gauge(
                "opstwin_database_bound_bytes",
                "The twin database's size bound (storage.max_db_mb).",
                info["bound_bytes"],
            )
        yield _counter(
            "opstwin_storage_bound_episodes",
            "Times the database reached its size bound and the oldest history was removed.",
            info["bound_episodes"],
        )
        yield _counter(
            "opstwin_history_downsampled_samples",
            "Raw samples folded into time buckets by retention or at the size bound.",
            info["downsampled_samples"],
        )

    def _engine(self) -> Iterator[Metric]:
        engine = self.gateway.engine
        if engine is None:
            return
        decisions = CounterMetricFamily(
            "opstwin_decisions", "The gate's decisions, by outcome.", labels=["decision"]
        )
        for kind, count in sorted(engine.decisions.items()):
            decisions.add_metric([kind], count)
        yield decisions
        yield _counter(
            "opstwin_simulations", "Simulations of proposals run.", engine.simulations_run
        )
        yield _counter(
            "opstwin_simulation_seconds",
            "Time the proposals' simulations took; over opstwin_simulations_total, the mean.",
            engine.simulation_seconds,
        )

    def _sync(self) -> Iterator[Metric]:
        sync = self.gateway.sync
        if sync is None:
            return
        health = sync.health()
        yield _gauge(
            "opstwin_sync_connected",
            "1 while the cloud sync is connected to its broker.",
            1.0 if health["state"] == "connected" else 0.0,
        )
        yield _gauge(
            "opstwin_sync_lag_revs",
            "Committed revs the broker has not acknowledged: the backlog.",
            health["lag_revs"],
        )
        yield _gauge(
            "opstwin_sync_cursor_rev", "The last rev the broker confirmed.", health["cursor"]
        )

    def _servers(self) -> Iterator[Metric]:
        opcua = self.gateway.opcua_server
        if opcua is not None:
            yield _gauge(
                "opstwin_opcua_connections",
                "OPC UA client connections open now.",
                opcua.open_connections,
            )
        requests = CounterMetricFamily(
            "opstwin_http_requests",
            "HTTP requests answered, by route, method and status.",
            labels=["route", "method", "status"],
        )
        for (route, method, status), count in sorted(self.requests.items()):
            requests.add_metric([route, method, status], count)
        yield requests


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def add_metrics_route(app: web.Application, gateway_key: web.AppKey[Gateway]) -> None:
    """`GET /metrics`, and the middleware counting every request by route and status."""
    requests: Counter[tuple[str, str, str]] = Counter()
    app[_REQUESTS] = requests

    @web.middleware
    async def count(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            # The route's template, not the path: /twin/{point_id} is one series, however many
            # points; an unmatched path is one series too (no label per probe of a scanner).
            info = request.match_info
            resource = None if info.http_exception is not None else info.route.resource
            name = resource.canonical if resource is not None else "unmatched"
            requests[(name, request.method, str(status))] += 1

    app.middlewares.insert(0, count)

    # A registry of this app's own, not prometheus-client's global one: one gateway's figures.
    registry = app[_REGISTRY] = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(app[gateway_key], requests))

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(request.app[_REGISTRY])
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", metrics)
