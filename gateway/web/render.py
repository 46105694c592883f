"""Templates: one Jinja2 environment with autoescape on, and the filters the pages share.

Every value a page shows goes through the template engine's escaping (`autoescape=True` for
every template, not only `.html`): a point description, a proposal's reason or a device's error
text comes from config, agents or devices, and none of it may become markup. The charts are the
one exception, and they are `Markup` built by gateway/web/charts.py, which escapes their text.
"""

from __future__ import annotations

import math
import time
from typing import Any

from aiohttp import web
from jinja2 import Environment, PackageLoader, StrictUndefined

from gateway import __version__
from gateway.web.security import WEB, current_user, login_token

__all__ = ["environment", "render"]


def environment() -> Environment:
    """The UI's template engine (templates ship inside the package: no file outside it)."""
    env = Environment(
        loader=PackageLoader("gateway.web", "templates"),
        autoescape=True,
        undefined=StrictUndefined,  # a misspelt name fails the page's test, not shows ""
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=num, when=when, ago=ago, duration=duration, pct=pct)
    env.globals.update(version=__version__)
    return env


def render(
    request: web.Request, template: str, *, status: int = 200, **context: Any
) -> web.Response:
    """A page: `template` with the logged-in user, their CSRF token and the site's names."""
    state = request.app[WEB]
    gateway = request.app[state.gateway_key]
    user = current_user(request)
    response = web.Response(status=status, content_type="text/html", charset="utf-8")
    csrf = user.session.csrf if user is not None else login_token(request, response)
    page = state.templates.get_template(template).render(
        user=user,
        csrf=csrf,
        site_id=gateway.config.site_id,
        gateway_id=gateway.config.gateway_id,
        path=request.path,
        now=time.time(),
        **context,
    )
    response.text = page
    return response


# -- filters -------------------------------------------------------------------------------------


def num(value: Any, digits: int = 4) -> str:
    """A value as an operator reads it: 4 significant digits, booleans and text as they are."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))  # 10000 paths, not 1e+04
        text = f"{value:.{digits}g}"
        return text if "e" in text or abs(value) < 10**digits else f"{value:.0f}"
    return str(value)


def when(ts: Any) -> str:
    """An epoch time as the gateway's local date and time (seconds)."""
    if not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts <= 0:
        return "—"  # 0: a point never heard from
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def ago(ts: Any, now: float | None = None) -> str:
    """How long ago an epoch time was, in the coarsest unit that says it."""
    if not isinstance(ts, (int, float)) or not math.isfinite(ts):
        return "—"
    return duration((now if now is not None else time.time()) - ts) + " ago"


def duration(seconds: Any) -> str:
    """A duration: `45 s`, `12 min`, `3.5 h`, `2 d`."""
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "—"
    s = max(0.0, float(seconds))
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 172_800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86_400:.0f} d"


def pct(value: Any) -> str:
    """A share 0..1 as a percentage."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—"
    return f"{100 * value:.1f} %"
