"""What the mirror holds, over HTTP (`opstwin mirror --serve`), to compare with a gateway's `/twin`.

`GET /gateways` lists every gateway heard from with its counters; `GET /gateways/{site}/{gw}`
is one gateway's counters; `GET /gateways/{site}/{gw}/twin` its mirrored twin, each point in the
gateway's `/twin` point shape (value, quality, source_ts, gateway_ts, rev, reason, with unit and
datatype from the birth). Read-only; an unknown gateway is a 404 with a JSON error.
"""

from __future__ import annotations

import json

from aiohttp import web

from gateway.mirror.client import Mirror

__all__ = ["MIRROR", "create_mirror_app"]

MIRROR = web.AppKey("mirror", Mirror)


def create_mirror_app(mirror: Mirror) -> web.Application:
    """The read-only HTTP view of a running mirror (the caller starts and stops the mirror)."""
    app = web.Application()
    app[MIRROR] = mirror
    app.router.add_get("/gateways", gateways)
    app.router.add_get("/gateways/{site_id}/{gateway_id}", gateway_stats)
    app.router.add_get("/gateways/{site_id}/{gateway_id}/twin", gateway_twin)
    return app


async def gateways(request: web.Request) -> web.Response:
    """Every gateway heard from, with its counters."""
    mirror = request.app[MIRROR]
    return web.json_response({"connected": mirror.connected, "gateways": mirror.gateways()})


async def gateway_stats(request: web.Request) -> web.Response:
    """One gateway's counters."""
    mirror = request.app[MIRROR]
    site_id, gateway_id = request.match_info["site_id"], request.match_info["gateway_id"]
    try:
        return web.json_response(mirror.stats(site_id, gateway_id))
    except KeyError:
        raise _unknown(site_id, gateway_id) from None


async def gateway_twin(request: web.Request) -> web.Response:
    """One gateway's mirrored twin."""
    mirror = request.app[MIRROR]
    site_id, gateway_id = request.match_info["site_id"], request.match_info["gateway_id"]
    try:
        return web.json_response(mirror.twin(site_id, gateway_id))
    except KeyError:
        raise _unknown(site_id, gateway_id) from None


def _unknown(site_id: str, gateway_id: str) -> web.HTTPNotFound:
    error = {"error": f"gateway {site_id}/{gateway_id}: nothing heard from it yet"}
    return web.HTTPNotFound(text=json.dumps(error), content_type="application/json")
