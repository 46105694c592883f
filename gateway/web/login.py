"""Log in, log out, and the one-time link that makes the first admin.

There is no default password. The first admin comes from
`opstwin user add --config FILE NAME --grant admin` or, while no enabled admin exists, from the
link the gateway logs at start (`/ui/setup/<secret>`, one use, one hour). A login is checked,
throttled and audited by the same `Authenticator` as HTTP Basic (gateway/aiw/auth.py): ten
refused logins a minute per address, then 429.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.aiw.answers import HttpRefusal
from gateway.aiw.auth import AUTHENTICATOR
from gateway.auth.rbac import Grant
from gateway.control.users import AccountError, Actor
from gateway.errors import GatewayError
from gateway.web.render import render
from gateway.web.security import (
    COOKIE,
    UI,
    WEB,
    checked_form,
    current_user,
    forbidden,
    set_session_cookie,
)

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)

HOME = f"{UI}/approvals"


def add_login_routes(app: web.Application) -> None:
    app.router.add_get("/", _home)
    app.router.add_get(UI, _home)
    app.router.add_get(UI + "/", _home)
    app.router.add_get(UI + "/login", login_page)
    app.router.add_post(UI + "/login", login)
    app.router.add_post(UI + "/logout", logout)
    app.router.add_get(UI + "/setup/{secret}", setup_page)
    app.router.add_post(UI + "/setup/{secret}", setup)


async def _home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther(HOME)


def _next(target: str | None) -> str:
    """Where to go after the login: a page of this UI only (never another site)."""
    if (
        target
        and target.startswith(UI + "/")
        and not target.startswith(UI + "//")
        and "\\" not in target
        and not any(ord(c) < 32 for c in target)
    ):
        return target
    return HOME


async def login_page(request: web.Request) -> web.StreamResponse:
    """The login form (a logged-in user goes straight on)."""
    if current_user(request) is not None:
        raise web.HTTPSeeOther(_next(request.query.get("next")))
    return render(request, "login.html", next=_next(request.query.get("next")), error=None)


async def login(request: web.Request) -> web.StreamResponse:
    """Check the name and password; on success a new session and its cookie."""
    form = await checked_form(request)
    state = request.app[WEB]
    gateway = request.app[state.gateway_key]
    name, password = form.get("name", "").strip(), form.get("password", "")
    target = _next(form.get("next"))
    if not name or not password:
        return render(
            request, "login.html", status=400, next=target, error="Enter your name and password."
        )
    try:
        principal = await request.app[AUTHENTICATOR].login(request, gateway, name, password)
    except HttpRefusal as refusal:
        wait = refusal.message.split("; ")[-1].capitalize()
        message = {
            401: "Wrong name or password, or the user is disabled.",
            429: f"Too many failed logins from this address. {wait}.",
        }.get(refusal.status, refusal.message)
        response = render(request, "login.html", status=refusal.status, next=target, error=message)
        if refusal.headers:
            response.headers.update(refusal.headers)
        response.headers.popall("WWW-Authenticate", None)  # not a Basic challenge: a form
        return response
    secret, _ = state.sessions.create(principal.name)
    log.info("web UI: %s logged in from %s", principal.name, request.remote)
    response = web.HTTPSeeOther(target)
    set_session_cookie(request, response, secret)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    """End this browser's session."""
    await checked_form(request)
    request.app[WEB].sessions.end(request.cookies.get(COOKIE))
    response = web.HTTPSeeOther(f"{UI}/login")
    response.del_cookie(COOKIE, path="/")
    raise response


# -- the first admin ----------------------------------------------------------------------------


async def setup_page(request: web.Request) -> web.StreamResponse:
    """The form that makes the first admin, while the link is valid and no admin exists."""
    await _setup_allowed(request)
    return render(request, "setup.html", error=None, name="")


async def setup(request: web.Request) -> web.StreamResponse:
    """Make the first admin, log them in, and spend the link."""
    form = await checked_form(request)
    await _setup_allowed(request)
    state = request.app[WEB]
    gateway = request.app[state.gateway_key]
    name, password = form.get("name", "").strip(), form.get("password", "")
    if password != form.get("again", ""):
        return render(request, "setup.html", status=400, error="The passwords differ.", name=name)
    accounts = gateway.accounts
    assert accounts is not None  # _setup_allowed checked it
    actor = Actor("setup-link", "gateway", {"address": (request.remote or "?")[:128]})
    try:
        await asyncio.to_thread(
            accounts.add_user, name, password, [Grant(role="admin")], actor=actor
        )
    except (AccountError, ValueError) as exc:
        return render(request, "setup.html", status=400, error=str(exc), name=name)
    assert state.setup is not None
    state.setup.spend()
    log.warning("web UI: first admin %r made through the setup link from %s", name, request.remote)
    secret, _ = state.sessions.create(name)
    response = web.HTTPSeeOther(HOME)
    set_session_cookie(request, response, secret)
    raise response


async def _setup_allowed(request: web.Request) -> None:
    state = request.app[WEB]
    link = state.setup
    if link is None or not link.valid(request.match_info["secret"]):
        raise web.HTTPNotFound(text="this setup link is unknown, used or expired\n")
    gateway = request.app[state.gateway_key]
    if await has_admin(gateway):
        link.spend()
        raise forbidden("an admin exists already: log in, or ask them for an account")


async def has_admin(gateway: Gateway) -> bool:
    """Whether an enabled user holds a site-wide admin grant."""
    accounts = gateway.accounts
    if accounts is None:
        raise web.HTTPServiceUnavailable(text="the gateway is starting; retry in a few seconds\n")
    try:
        users = await asyncio.to_thread(accounts.list_users)
    except GatewayError as exc:
        raise web.HTTPServiceUnavailable(text=f"control.db cannot be read: {exc}\n") from None
    return any(
        not u.disabled and any(g.role == "admin" and "*" in g.assets for g in u.grants)
        for u in users
    )
