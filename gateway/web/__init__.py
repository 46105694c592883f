"""The local web UI for operators (DESIGN §10): served by the gateway's own aiohttp app.

Server-rendered pages (Jinja2, autoescaped), a little plain JavaScript for live updates over the
`/subscribe` SSE stream, our own CSS: no build step, nothing fetched from another host (factory
networks are offline). Pages, under `/ui/`:

    login, logout, setup/<secret>      gateway/web/login.py
    approvals, proposals/<id>, whatif  gateway/web/approvals.py
    twin, points/<id>, devices         gateway/web/twin.py
    actions, audit, users, tokens      gateway/web/admin.py

The same users, roles and tokens as the HTTP API (control.db); sessions, CSRF and the security
headers are gateway/web/security.py, the charts gateway/web/charts.py (SVG drawn on the server).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.aiw.auth import ensure_authenticator
from gateway.config.model import HttpConfig
from gateway.web.render import environment
from gateway.web.security import (
    UI,
    WEB,
    WebState,
    security_headers,
    session_middleware,
)
from gateway.web.sessions import SessionStore, SetupLink

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)

__all__ = ["add_web_routes", "setup_url"]

STATIC = Path(str(files("gateway.web") / "static"))


def add_web_routes(app: web.Application, gateway_key: web.AppKey[Gateway]) -> None:
    """Install the UI's pages, static files, session middleware and security headers."""
    from gateway.web.admin import add_admin_routes
    from gateway.web.approvals import add_approval_routes
    from gateway.web.login import add_login_routes
    from gateway.web.twin import add_twin_routes

    # Session lifetimes come from the config at start (_web_lifecycle): the routes can be built
    # without a gateway (the docs test lists them).
    app[WEB] = WebState(
        gateway_key=gateway_key,
        sessions=SessionStore(
            idle_s=HttpConfig.model_fields["session_idle_s"].default,
            max_s=HttpConfig.model_fields["session_max_s"].default,
        ),
        templates=environment(),
    )
    ensure_authenticator(app)
    # Outermost: the session is known to every other middleware (the read-access gate too).
    app.middlewares.insert(0, session_middleware)
    app.on_response_prepare.append(security_headers)
    app.router.add_static(UI + "/static", STATIC, append_version=False)
    add_login_routes(app)
    add_approval_routes(app)
    add_twin_routes(app)
    add_admin_routes(app)
    app.cleanup_ctx.append(_web_lifecycle)


async def _web_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """At start (after the gateway's): the sessions' lifetimes from the config, and while no
    admin exists, a one-time setup link in the log."""
    from gateway.web.login import has_admin

    state = app[WEB]
    gateway = app[state.gateway_key]
    state.sessions.idle_s = gateway.config.http.session_idle_s
    state.sessions.max_s = gateway.config.http.session_max_s
    try:
        missing = not await has_admin(gateway)
    except web.HTTPException:
        missing = False  # control.db unreadable: its own error is already in the log
    if missing:
        state.setup = SetupLink()
        log.warning(
            "no admin user exists: make one with `opstwin user add --config FILE NAME --grant "
            "admin`, or open %s within an hour (works once)",
            setup_url(gateway, state.setup),
        )
    yield


def setup_url(gateway: Gateway, link: SetupLink) -> str:
    """The first-admin link as a URL on the configured HTTP address."""
    http = gateway.config.http
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{http.port}{UI}/setup/{link.secret}"
