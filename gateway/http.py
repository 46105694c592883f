"""The gateway's HTTP listener: health, twin snapshot reads, history and aggregates, proposals.

/health answers 200 while the process runs; `status` is `degraded`, with one sentence per cause
in `reasons`, when a device is not connected, a connected device has every point BAD, or the
twin store cannot commit or has met corruption. Reads that need the database (history,
aggregates) answer 503 with a JSON error when it fails; values in memory (/twin) keep working.
The reads that carry a rev (/twin and its ETag, /diff, the /subscribe SSE stream) are in
gateway/aiw/stream.py: they only ever hand out committed revs.

Setpoint changes are proposed, listed, approved, rejected and rolled back under `/proposals`,
with authentication and RBAC (gateway/http_proposals.py). Later work adds the rest of the AIW
protocol (DESIGN §5) on the same app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

from aiohttp import web

from gateway import __version__
from gateway.aiw.answers import int_query
from gateway.aiw.auth import add_read_access
from gateway.aiw.openapi import add_document_routes
from gateway.aiw.stream import add_stream_routes
from gateway.aiw.writes import add_write_routes
from gateway.app import Gateway
from gateway.errors import StoreError, UnknownPointError
from gateway.http_proposals import add_proposal_routes
from gateway.metrics import add_metrics_route
from gateway.ratelog import RateLimitedLog
from gateway.twin.model import PointValue, Quality
from gateway.web import add_web_routes

log = logging.getLogger(__name__)

GATEWAY = web.AppKey("gateway", Gateway)
_T = TypeVar("_T")
# Any client can repeat a read of a damaged database: one line a minute, not one per request.
_read_failures = RateLimitedLog(log, 60.0)

MAX_HISTORY_ROWS = 10_000
MAX_BUCKETS = 10_000


def create_app(gateway: Gateway) -> web.Application:
    """Build the aiohttp application; the gateway starts and stops with it."""
    app = web.Application()
    app[GATEWAY] = gateway
    app.cleanup_ctx.append(_gateway_lifecycle)
    app.router.add_get("/health", health)
    # /twin, /twin/{point}, /diff, /subscribe: everything that carries a rev, committed only.
    add_stream_routes(app, GATEWAY)
    app.router.add_get("/telemetry/query", telemetry_query)
    app.router.add_get("/telemetry/aggregate", telemetry_aggregate)
    add_proposal_routes(app, GATEWAY)
    # /telemetry/ingest, /sim/run, /actions, /rollback/{action_id} (gateway/aiw/writes.py).
    add_write_routes(app, GATEWAY)
    # `http.read_access: token`: reads need a principal with RBAC `read` (gateway/aiw/auth.py).
    add_read_access(app, GATEWAY)
    # /openapi.json, the manifest, /schemas (from the router, at first request); JSON 404/405/413.
    add_document_routes(app, GATEWAY)
    # The operators' pages under /ui/ (gateway/web/): sessions, CSRF, security headers.
    add_web_routes(app, GATEWAY)
    # GET /metrics for Prometheus, and the count of requests by route and status (outermost).
    add_metrics_route(app, GATEWAY)
    return app


async def _gateway_lifecycle(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    await gateway.start()
    yield
    await gateway.stop()


async def health(request: web.Request) -> web.Response:
    """Liveness, each device's connection state, and why the gateway is degraded if it is."""
    gateway = request.app[GATEWAY]
    devices = gateway.device_states()
    reasons = [*_device_problems(gateway, devices), *gateway.store.problems()]
    sync = gateway.sync
    if sync is not None:
        reasons += sync.problems()  # only when configured and disconnected for over 60 s
    # A part a reload could not bring back (gateway/reload.py); a refused file is no reason:
    # the gateway runs as before, and `config.last_reload` says why the file was refused.
    reasons += gateway.config_status.problems
    return web.json_response(
        {
            "status": "degraded" if reasons else "ok",
            "reasons": reasons,
            "version": __version__,
            "site_id": gateway.config.site_id,
            "gateway_id": gateway.config.gateway_id,
            "rev": gateway.store.rev,
            "uptime_s": round(time.time() - (gateway.started_at or time.time()), 3),
            "devices": devices,
            "storage": gateway.store.storage_info(),
            # The cloud sync's connection, cursor and lag; null when no broker is configured.
            "sync": None if sync is None else sync.health(),
            # The config file, its generation, the policies running, the last reload's outcome
            # and the changed keys that wait for a restart.
            "config": gateway.config_status.health([p.id for p in gateway.policy_set.enabled]),
        }
    )


async def telemetry_query(request: web.Request) -> web.Response:
    """History rows of one point in [start, end], oldest first."""
    gateway = request.app[GATEWAY]
    point_id, start, end = _range_args(request, gateway)
    limit = int_query(request, "limit", 1000, 1, MAX_HISTORY_ROWS)
    rows = await _read(request, gateway.store.history, point_id, start, end, limit)
    return web.json_response(
        {"point_id": point_id, "start": start, "end": end, "rows": [_jsonable(r) for r in rows]}
    )


async def telemetry_aggregate(request: web.Request) -> web.Response:
    """Time-bucket aggregates (min, max, mean, last, count) of one point."""
    gateway = request.app[GATEWAY]
    point_id, start, end = _range_args(request, gateway)
    bucket = _float_arg(request, "bucket_s", 60.0)
    if bucket <= 0:
        raise _error(400, "bucket_s must be > 0")
    if (end - start) / bucket > MAX_BUCKETS:
        raise _error(400, f"range/bucket_s gives more than {MAX_BUCKETS} buckets")
    buckets = await _read(request, gateway.store.aggregate, point_id, start, end, bucket)
    return web.json_response(
        {
            "point_id": point_id,
            "start": start,
            "end": end,
            "bucket_s": bucket,
            "buckets": [_jsonable(b) for b in buckets],
        }
    )


# -- helpers -----------------------------------------------------------------------------------


def _device_problems(gateway: Gateway, devices: dict[str, dict[str, Any]]) -> Iterator[str]:
    """A disconnected device, or a connected one whose every point is BAD (it refuses reads).

    A pushed (`driver: http`) device has no connection: it is a problem only when STALE (its
    source fell silent for longer than `stale_after_s`), not while RECEIVING or WAITING for a
    first push (gateway/aiw/push.py).
    """
    _, values = gateway.store.snapshot()
    by_device: dict[str, list[PointValue]] = {}
    for point_id, value in values.items():
        by_device.setdefault(gateway.points[point_id].device, []).append(value)
    for name, device in devices.items():
        if device["state"] not in ("CONNECTED", "RECEIVING", "WAITING"):
            error = device["last_error"]
            yield f"device {name} is {device['state']}" + (f": {error}" if error else "")
            continue
        points = by_device.get(name, [])
        # Points not heard from yet are BAD "waiting for initial data": not evidence alone.
        if points and any(v.rev for v in points) and all(v.quality is Quality.BAD for v in points):
            reasons = Counter(v.reason for v in points if v.rev)
            reason = reasons.most_common(1)[0][0] or "no reason given"
            yield f"device {name}: all {len(points)} points are BAD ({reason})"


async def _read(request: web.Request, read: Callable[..., _T], *args: Any) -> _T:
    """Run a blocking store read off the loop; a failing database is a 503, not a 500."""
    try:
        return await asyncio.to_thread(read, *args)
    except UnknownPointError as exc:
        raise _error(404, str(exc)) from None
    except StoreError as exc:
        _read_failures.log(logging.WARNING, request.path, "%s: answered 503: %s", request.path, exc)
        raise _error(503, f"the twin database cannot be read: {exc}") from None


def _range_args(request: web.Request, gateway: Gateway) -> tuple[str, float, float]:
    point_id = request.query.get("point")
    if not point_id:
        raise _error(400, "query parameter `point` is required")
    if point_id not in gateway.points:
        raise _error(404, f"unknown point {point_id!r}")
    now = time.time()
    end = _float_arg(request, "end", now)
    start = _float_arg(request, "start", end - 3600)
    if start > end:
        raise _error(400, "start must not be after end")
    return point_id, start, end


def _float_arg(request: web.Request, name: str, default: float) -> float:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise _error(400, f"{name} must be a number (epoch seconds), got {text!r}") from None
    if not math.isfinite(value):
        raise _error(400, f"{name} must be finite")
    return value


def _jsonable(row: Any) -> Any:
    if hasattr(row, "_asdict"):
        row = row._asdict()
    elif hasattr(row, "__dataclass_fields__"):
        row = {f: getattr(row, f) for f in row.__dataclass_fields__}
    if isinstance(row, dict):
        return {k: _finite(v) for k, v in row.items()}
    return row


def _finite(value: Any) -> Any:
    # JSON has no NaN; a BAD point may still carry one.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return str(value)
    return value


def _error(status: int, message: str) -> web.HTTPException:
    cls = {400: web.HTTPBadRequest, 404: web.HTTPNotFound, 503: web.HTTPServiceUnavailable}[status]
    return cls(text=json.dumps({"error": message}), content_type="application/json")
