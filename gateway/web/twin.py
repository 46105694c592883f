"""The twin browser, a point's history, and the devices.

- `/ui/twin`: every asset and its points, with the value, quality, unit and a sparkline of the
  last 15 minutes; values and qualities then follow the `/subscribe` stream (gateway/web/static/
  app.js), the sparklines are as of the page's load.
- `/ui/points/{id}`: one point's facts and a history chart over a chosen window: min-max band
  and mean per bucket, the same figures `/telemetry/aggregate` answers (`TwinStore.aggregate`),
  with the point's range as limits.
- `/ui/devices`: each device's connection state, last error, and how many points it has.

Reads of history run in a worker thread (one per page, not one per point): the loop keeps
serving the drivers while SQLite reads.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from aiohttp import web
from markupsafe import Markup

from gateway.errors import GatewayError
from gateway.twin.history import Bucket as StoredBucket
from gateway.web.charts import Bucket, history_chart, sparkline
from gateway.web.render import render
from gateway.web.security import UI, WebUser, forbidden, gateway_of, login_required

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["WINDOWS", "add_twin_routes"]

SPARK_WINDOW_S = 900.0
SPARK_BUCKETS = 30
# The history windows a point page offers, and the bucket count its chart draws.
WINDOWS = {"15m": 900, "1h": 3600, "6h": 21_600, "24h": 86_400, "7d": 604_800}
CHART_BUCKETS = 240


def add_twin_routes(app: web.Application) -> None:
    app.router.add_get(UI + "/twin", twin)
    app.router.add_get(UI + "/points/{point_id:.+}", point_page)
    app.router.add_get(UI + "/devices", devices)


@login_required
async def twin(request: web.Request, user: WebUser) -> web.StreamResponse:
    """Assets and their points, live."""
    gateway = gateway_of(request)
    _, values = gateway.store.snapshot()
    visible = [pid for pid in sorted(gateway.points) if user.may("read", pid)]
    hidden = len(gateway.points) - len(visible)
    end = time.time()
    sparks = await _sparklines(gateway, visible, end)
    assets: dict[str, list[str]] = defaultdict(list)
    for pid in visible:
        assets[gateway.points[pid].asset_id].append(pid)
    return render(
        request,
        "twin.html",
        assets=sorted(assets.items()),
        defs=gateway.points,
        values=values,
        sparks=sparks,
        hidden=hidden,
    )


async def _sparklines(gateway: Gateway, points: list[str], end: float) -> dict[str, Markup]:
    bucket_s = SPARK_WINDOW_S / SPARK_BUCKETS
    start = end - SPARK_WINDOW_S

    def read() -> dict[str, list[float | None]]:
        series: dict[str, list[float | None]] = {}
        for pid in points:
            if gateway.points[pid].datatype == "string":
                continue
            try:
                buckets = gateway.store.aggregate(pid, start, end, bucket_s)
            except GatewayError:
                return series  # a failing database: the page shows values, not sparklines
            series[pid] = [b.mean for b in _chart_buckets(buckets, start, bucket_s, SPARK_BUCKETS)]
        return series

    series = await asyncio.to_thread(read)
    return {pid: sparkline(v, label=f"{pid}, last 15 min") for pid, v in series.items()}


@login_required
async def point_page(request: web.Request, user: WebUser) -> web.StreamResponse:
    """One point: its facts, its value live, and its history over a chosen window."""
    gateway = gateway_of(request)
    point_id = request.match_info["point_id"]
    point = gateway.points.get(point_id)
    if point is None:
        raise web.HTTPNotFound(text=f"unknown point {point_id[:200]!r}\n")
    if not user.may("read", point_id):
        raise forbidden(f"your grants do not cover {point_id}")
    window = request.query.get("window", "1h")
    if window not in WINDOWS:
        window = "1h"
    span = float(WINDOWS[window])
    end = time.time()
    start = end - span
    bucket_s = span / CHART_BUCKETS
    chart: Markup | None = None
    error = None
    if point.datatype != "string":
        try:
            stored = await asyncio.to_thread(
                gateway.store.aggregate, point_id, start, end, bucket_s
            )
        except GatewayError as exc:
            error = f"the history cannot be read: {exc}"
        else:
            chart = history_chart(
                _chart_buckets(stored, start, bucket_s, CHART_BUCKETS),
                start=start,
                end=end,
                title=point_id,
                unit=point.unit,
                limits=[
                    (kind, float(v))
                    for kind, v in (("lower", point.lo), ("upper", point.hi))
                    if v is not None
                ],
            )
    return render(
        request,
        "point.html",
        point=point,
        value=gateway.store.get(point_id),
        windows=list(WINDOWS),
        window=window,
        chart=chart,
        bucket_s=bucket_s,
        start=start,
        end=end,
        error=error,
        may_propose=point.writable and user.may("propose", point_id),
    )


def _chart_buckets(
    stored: list[StoredBucket], start: float, bucket_s: float, count: int
) -> list[Bucket]:
    """`count` buckets from `start`: the store leaves out those without a measured sample,
    which become gaps (None), so that a chart does not draw a line across them."""
    by_index = {round((b.start - start) / bucket_s): b for b in stored}
    out = []
    for i in range(count):
        b = by_index.get(i)
        t = start + i * bucket_s
        if b is None:
            out.append(Bucket(start=t, min=None, max=None, mean=None))
        else:
            out.append(
                Bucket(
                    start=t,
                    min=_float(b.min),
                    max=_float(b.max),
                    mean=_float(b.mean),
                    last=_float(b.last),
                )
            )
    return out


@login_required
async def devices(request: web.Request, user: WebUser) -> web.StreamResponse:
    """Each device's connection state and last error."""
    if not user.may("read"):
        raise forbidden("the device list needs a site-wide grant")
    gateway = gateway_of(request)
    states = gateway.device_states()
    counts: dict[str, int] = defaultdict(int)
    for point in gateway.points.values():
        counts[point.device] += 1
    configs = {d.name: d for d in gateway.config.devices}
    rows: list[dict[str, Any]] = []
    for name, state in sorted(states.items()):
        device = configs.get(name)
        rows.append(
            {
                "name": name,
                "driver": getattr(device, "driver", "?"),
                "endpoint": getattr(device, "endpoint", None),
                "points": counts.get(name, 0),
                **state,
            }
        )
    return render(request, "devices.html", devices=rows)


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None
