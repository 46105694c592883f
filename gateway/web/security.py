"""The web UI's guards: sessions from cookies, CSRF on every form, roles, security headers.

- `session_middleware` (outermost) turns the `otw_session` cookie into the logged-in user. The
  user's record is read afresh on every request (a worker-thread read of control.db), so an
  admin disabling a user or changing their grants takes effect at their next click, not at
  their next login. On GET and HEAD of the JSON routes the session also counts as credentials
  (`WEB_PRINCIPAL`, read by gateway/aiw/auth.py): the pages' own script reads `/subscribe`
  with it when `http.read_access` is `token`. Never on a POST of a JSON route: those take no
  CSRF token, so a cookie must not be enough to write.
- `checked_form(request)` is how every UI handler of a POST reads its form: the session's CSRF
  token must come back in the form (compared in constant time) and an `Origin` header, when
  the browser sends one, must name this very host. A login or the first-admin setup has no
  session yet: its token is a random pre-login cookie echoed in the form (double submit).
  SameSite=Strict cookies already keep other sites' forms from carrying the session; the token
  is the second, independent lock the issue asks for.
- `security_headers` (on every answer, JSON and SSE included): a CSP with no inline script or
  style and `frame-ancestors 'none'`, nosniff, no referrer, and `no-store` on pages, which
  carry a CSRF token and plant data a shared PC's next user should not find in its cache.
- Roles are checked by each handler with `rbac.check` before it reads or writes anything;
  buttons a role may not use are not drawn, but the server is what refuses.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from aiohttp import web

from gateway.aiw.auth import READ_METHODS, WEB_PRINCIPAL, is_ui_path
from gateway.auth.rbac import Principal, check
from gateway.errors import GatewayError
from gateway.web.sessions import Session, SessionStore, SetupLink, csrf_matches

if TYPE_CHECKING:
    from jinja2 import Environment

    from gateway.app import Gateway
    from gateway.policy.engine import PolicyEngine

log = logging.getLogger(__name__)

__all__ = [
    "COOKIE",
    "LOGIN_COOKIE",
    "WEB",
    "WEB_PRINCIPAL",
    "WebState",
    "WebUser",
    "checked_form",
    "current_user",
    "engine_of",
    "forbidden",
    "gateway_of",
    "login_required",
    "security_headers",
    "session_middleware",
]

COOKIE = "otw_session"
LOGIN_COOKIE = "otw_login"  # the pre-login CSRF token (double submit)
UI = "/ui"
# The pages' forms are all urlencoded (no file upload anywhere). Multipart is refused: aiohttp
# parses it from the stream, which the body-timeout middleware has already read.
FORM_TYPES = ("application/x-www-form-urlencoded",)

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer Chromium sends `Origin: null` on our own
    # forms, which the Origin check must then refuse. Other hosts still get no referrer.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


@dataclass(slots=True)
class WebState:
    """The UI's state on the app: sessions, the first-admin link, the template engine."""

    gateway_key: web.AppKey[Gateway]
    sessions: SessionStore
    templates: Environment
    setup: SetupLink | None = None


WEB = web.AppKey("opstwin_web", WebState)


@dataclass(frozen=True, slots=True)
class WebUser:
    """The logged-in user of a request: their session and their principal (grants as of now)."""

    session: Session
    principal: Principal

    @property
    def name(self) -> str:
        return self.principal.name

    def may(self, operation: str, asset: str | None = None) -> bool:
        """Whether the user's grants allow `operation` on `asset` (None: site-wide)."""
        return check(self.principal, operation, asset).allowed


_USER = web.RequestKey("opstwin_web_user", WebUser)


def gateway_of(request: web.Request) -> Gateway:
    """The gateway the UI's app serves."""
    return request.app[request.app[WEB].gateway_key]


def engine_of(request: web.Request) -> PolicyEngine:
    """The gateway's running policy engine; 503 while it starts or stops."""
    engine = gateway_of(request).engine
    if engine is None:
        raise web.HTTPServiceUnavailable(text="the policy engine is not running; retry shortly\n")
    return engine


def current_user(request: web.Request) -> WebUser | None:
    """The logged-in user of this request, None if nobody is."""
    return request.get(_USER)


@web.middleware
async def session_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Resolve the session cookie into the request's user (module docstring)."""
    state = request.app.get(WEB)
    secret = request.cookies.get(COOKIE)
    if state is not None and secret:
        session = state.sessions.get(secret)
        if session is not None:
            principal = await _principal(request.app[state.gateway_key], session.user)
            if principal is None:
                state.sessions.end(secret)
            else:
                request[_USER] = WebUser(session, principal)
                if request.method in READ_METHODS and not is_ui_path(request.path):
                    request[WEB_PRINCIPAL] = principal
    if state is None or not is_ui_path(request.path):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # A person reads these: a page in the UI's frame with the sentence, same status.
        return error_page(request, exc.status, exc.reason, exc.text or exc.reason)


def error_page(request: web.Request, status: int, title: str, message: str) -> web.Response:
    """An error as a page of the UI (its sentence escaped like any other text)."""
    from gateway.web.render import render  # render imports this module

    return render(request, "error.html", status=status, title=title, message=message.strip())


async def _principal(gateway: Gateway, name: str) -> Principal | None:
    accounts = gateway.accounts
    if accounts is None:
        return None
    try:
        record = await asyncio.to_thread(accounts.get_user, name)
    except GatewayError:
        return None  # removed, or control.db unreadable: not logged in (the login page says why)
    return None if record.disabled else record.principal()


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the security headers every answer carries."""
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if request.path.startswith(UI + "/") and not request.path.startswith(UI + "/static/"):
        response.headers["Cache-Control"] = "no-store"


def login_required(
    handler: Callable[[web.Request, WebUser], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A page for logged-in users: others are sent to the login page (and back after it)."""

    async def page(request: web.Request) -> web.StreamResponse:
        user = current_user(request)
        if user is None:
            if request.method in READ_METHODS:
                target = quote(request.path_qs, safe="/?=&")
                raise web.HTTPSeeOther(f"{UI}/login?next={target}")
            raise forbidden("your session has ended: log in again")
        return await handler(request, user)

    page.__name__ = handler.__name__
    page.__doc__ = handler.__doc__
    return page


def forbidden(message: str) -> web.HTTPForbidden:
    """A 403 with a plain sentence (the pages' forms only fail this way on forgery or expiry)."""
    return web.HTTPForbidden(text=message + "\n", content_type="text/plain")


async def checked_form(request: web.Request) -> dict[str, str]:
    """The POSTed form of a UI page, after the CSRF and Origin checks (403 when either fails)."""
    _same_origin(request)
    if request.content_type not in FORM_TYPES:
        raise web.HTTPUnsupportedMediaType(
            text=f"a form is sent as {FORM_TYPES[0]}, not {request.content_type!r}\n"
        )
    try:
        form = await request.post()
    except (ValueError, UnicodeDecodeError, web.HTTPException) as exc:
        if isinstance(exc, web.HTTPException) and exc.status == 413:
            raise
        # A body that claims to be a form and is not (a broken multipart boundary, bad bytes).
        raise web.HTTPBadRequest(text="the form cannot be read: send it again\n") from None
    offered = form.get("csrf")
    token = offered if isinstance(offered, str) else None
    user = current_user(request)
    if user is not None:
        ok = csrf_matches(user.session, token)
    else:
        # Before a session exists: the pre-login cookie and the form must carry the same token.
        cookie = request.cookies.get(LOGIN_COOKIE)
        ok = bool(cookie and token) and hmac.compare_digest(
            (cookie or "").encode(), (token or "").encode()
        )
    if not ok:
        log.warning(
            "web UI: %s %s refused: missing or wrong CSRF token", request.method, request.path
        )
        raise forbidden("the form's security token is missing or out of date: reload the page")
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _same_origin(request: web.Request) -> None:
    origin = request.headers.get("Origin")
    if origin is None:
        return  # not every client sends one; the CSRF token still has to match
    if urlsplit(origin).netloc != request.host:
        log.warning("web UI: %s %s refused: Origin %.80r", request.method, request.path, origin)
        raise forbidden("a form from another site is refused")


def login_token(request: web.Request, response: web.StreamResponse) -> str:
    """The pre-login CSRF token of this browser, set as a cookie on `response` if new."""
    token = request.cookies.get(LOGIN_COOKIE)
    if not token or len(token) > 64:
        token = secrets.token_urlsafe(24)
        response.set_cookie(
            LOGIN_COOKIE, token, httponly=True, samesite="Strict", path=UI, secure=request.secure
        )
    return token


def set_session_cookie(request: web.Request, response: web.StreamResponse, secret: str) -> None:
    """The session cookie: HttpOnly, SameSite=Strict, Secure when the page came over HTTPS."""
    response.set_cookie(
        COOKIE, secret, httponly=True, samesite="Strict", path="/", secure=request.secure
    )


def typed(value: Any) -> str:
    """Form values come as str; anything else (a file upload) is refused as empty."""
    return value if isinstance(value, str) else ""
