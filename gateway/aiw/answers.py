"""HTTP answers and request parsing shared by every JSON route (proposals, AIW reads and writes).

Every error is an `HttpRefusal` raised by the handler and answered as `{"error": "..."}` (plus any
extra keys) with its status and headers: one sentence saying what was wrong, where, and what to
do. Bodies are parsed by the pydantic model the OpenAPI document names, so the schema a client
reads is the check the gateway makes.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from multidict import CIMultiDict
from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.policy.engine import PolicyEngine

__all__ = [
    "HttpRefusal",
    "int_query",
    "json_answer",
    "problem",
    "read_body",
    "refusal_answer",
    "running_engine",
]

_T = TypeVar("_T", bound=BaseModel)


class HttpRefusal(Exception):
    """An HTTP error answer: status, the sentence for `error`, extra headers and body keys."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        headers: CIMultiDict[str] | dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.extra = extra or {}


def refusal_answer(refusal: HttpRefusal) -> web.Response:
    """The JSON answer `{"error": ..., **extra}` of a refusal."""
    body = {"error": refusal.message, **refusal.extra}
    return json_answer(body, status=refusal.status, headers=refusal.headers)


def json_answer(
    data: Any, *, status: int = 200, headers: CIMultiDict[str] | dict[str, str] | None = None
) -> web.Response:
    """A JSON answer; NaN and infinities (a simulation figure over no paths) become null."""
    return web.Response(
        text=json.dumps(_finite(data), allow_nan=False, default=str),
        status=status,
        content_type="application/json",
        headers=headers,
    )


async def read_body(request: web.Request, model: type[_T], *, required: bool = False) -> _T:
    """The request's JSON body as `model`; 400 naming each problem (an empty body is `{}`
    unless `required`)."""
    raw = await request.read()
    if not raw.strip() and not required:
        raw = b"{}"
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(problem(error) for error in exc.errors()[:5])
        keys = ", ".join(
            f"`{name}`" + ("" if info.is_required() else "?")
            for name, info in model.model_fields.items()
        )
        raise HttpRefusal(
            400, f"invalid request body: {problems}; send a JSON object with {keys}"
        ) from None


def problem(error: Any) -> str:
    """One pydantic error as `where: what` (the field path first)."""
    # Keys come from the client (an unknown key is named): short, escaped.
    where = ".".join(
        repr(part)[:40] if isinstance(part, str) else str(part) for part in error["loc"]
    )
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def int_query(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    """Query parameter `name` as a whole number in [lo, hi]; 400 if it is not one."""
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise HttpRefusal(400, f"{name} must be a whole number in [{lo}, {hi}]") from None
    if not lo <= value <= hi:
        raise HttpRefusal(400, f"{name} must be in [{lo}, {hi}]")
    return value


def running_engine(gateway: Gateway) -> PolicyEngine:
    """The gateway's policy engine; 503 while the gateway is starting or stopping."""
    engine = getattr(gateway, "engine", None)
    if engine is None or getattr(gateway, "accounts", None) is None:
        raise HttpRefusal(
            503,
            "the gateway's policy engine is not running (the gateway is starting or "
            "stopping); retry in a few seconds",
            headers={"Retry-After": "5"},
        )
    return engine


def _finite(value: Any) -> Any:
    # JSON has no NaN: a simulation figure over no paths can be one.
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
