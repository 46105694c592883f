"""The gateway's HTTP listener: health, twin snapshot reads, history and aggregates.

Later work adds the rest of the AIW protocol (DESIGN §5) on the same app.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.app import Gateway
from gateway.errors import UnknownPointError
from gateway.twin.model import PointValue

GATEWAY = web.AppKey("gateway", Gateway)

MAX_HISTORY_ROWS = 10_000
MAX_BUCKETS = 10_000


def create_app(gateway: Gateway) -> web.Application:
    """Build the aiohttp application; the gateway starts and stops with it."""
    app = web.Application()
    app[GATEWAY] = gateway
    app.cleanup_ctx.append(_gateway_lifecycle)
    app.router.add_get("/health", health)
    app.router.add_get("/twin", twin_snapshot)
    app.router.add_get("/twin/{point_id:.+}", twin_point)
    app.router.add_get("/telemetry/query", telemetry_query)
    app.router.add_get("/telemetry/aggregate", telemetry_aggregate)
    return app


async def _gateway_lifecycle(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    await gateway.start()
    yield
    await gateway.stop()


async def health(request: web.Request) -> web.Response:
    """Liveness plus each device's connection state."""
    gateway = request.app[GATEWAY]
    devices = gateway.device_states()
    ok = all(d["state"] == "CONNECTED" for d in devices.values())
    return web.json_response(
        {
            "status": "ok" if ok else "degraded",
            "version": __version__,
            "site_id": gateway.config.site_id,
            "gateway_id": gateway.config.gateway_id,
            "rev": gateway.store.rev,
            "uptime_s": round(time.time() - (gateway.started_at or time.time()), 3),
            "devices": devices,
        }
    )


async def twin_snapshot(request: web.Request) -> web.Response:
    """Every point's current value, with the rev it was taken at."""
    gateway = request.app[GATEWAY]
    rev, values = gateway.store.snapshot()
    etag = f'"rev:{rev}"'
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers={"ETag": etag})
    body = {
        "site_id": gateway.config.site_id,
        "gateway_id": gateway.config.gateway_id,
        "rev": rev,
        "points": {pid: _point_json(gateway, v) for pid, v in sorted(values.items())},
    }
    return web.json_response(body, headers={"ETag": etag})


async def twin_point(request: web.Request) -> web.Response:
    """One point's current value and metadata."""
    gateway = request.app[GATEWAY]
    point_id = request.match_info["point_id"]
    try:
        value = gateway.store.get(point_id)
    except UnknownPointError:
        raise _error(404, f"unknown point {point_id!r}") from None
    return web.json_response({"rev": gateway.store.rev, **_point_json(gateway, value)})


async def telemetry_query(request: web.Request) -> web.Response:
    """History rows of one point in [start, end], oldest first."""
    gateway = request.app[GATEWAY]
    point_id, start, end = _range_args(request, gateway)
    limit = _int_arg(request, "limit", 1000, 1, MAX_HISTORY_ROWS)
    rows = await asyncio.to_thread(gateway.store.history, point_id, start, end, limit)
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
    buckets = await asyncio.to_thread(gateway.store.aggregate, point_id, start, end, bucket)
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


def _point_json(gateway: Gateway, value: PointValue) -> dict[str, Any]:
    point = gateway.points[value.point_id]
    return {
        "id": point.id,
        "value": _finite(value.value),
        "quality": str(value.quality),
        "reason": value.reason,
        "source_ts": value.source_ts,
        "gateway_ts": value.gateway_ts,
        "rev": value.rev,
        "unit": point.unit,
        "range": None if point.lo is None else {"lo": point.lo, "hi": point.hi},
        "writable": point.writable,
        "datatype": point.datatype,
        "device": point.device,
        "description": point.description,
    }


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


def _int_arg(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise _error(400, f"{name} must be an integer, got {text!r}") from None
    if not lo <= value <= hi:
        raise _error(400, f"{name} must be in [{lo}, {hi}]")
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
    cls = {400: web.HTTPBadRequest, 404: web.HTTPNotFound}[status]
    return cls(text=json.dumps({"error": message}), content_type="application/json")
