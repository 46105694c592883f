"""HTTP routes through which people and agents propose, list, approve, reject and roll back changes.

Every setpoint change goes through the policy engine's gate (gateway/policy/engine.py); these
routes only authenticate the caller, check the request's shape, and translate the engine's
answers and errors into HTTP:

    POST /proposals                  {"point", "value", "reason", "idempotency_key"?}  → 201
    GET  /proposals?status=S&limit=N the newest first, on points the caller may read   → 200
    GET  /proposals/{id}                                                                → 200
    POST /proposals/{id}/approve     {"comment"?}                                       → 200
    POST /proposals/{id}/reject      {"reason"?}                                        → 200
    POST /proposals/{id}/rollback    {"reason"?}                                        → 200

Bodies and answers are JSON; an answer with a proposal is `ProposalRecord.to_json()`, whose
`status` says what the gate made of it (`rejected`, `pending_approval`, `succeeded`, ...): a
proposal the gate judged and rejected (outside the point's range, a spent idempotency key) is
201 with `status: rejected`, like any other judged proposal. Every error is `{"error": "..."}`
with one sentence saying what to do:

- 400 a body that is not JSON, lacks or adds keys, a `value` that is not a finite JSON number,
  a reason longer than 2000 characters; a query parameter out of range;
- 401 no or refused credentials (one message for every cause, with `WWW-Authenticate`);
- 403 the caller may not do this on that point. A proposal by someone who may not propose on the
  point at all is still recorded by the engine (a rejection, in the audit log): its 403 carries
  the record under `proposal`, so that the id can be quoted. 403 rather than 201 because the
  gate did not judge the change, only the caller: retrying it unchanged can never succeed, and
  an agent that branches on the status code must not take a missing grant for a verdict;
- 404 an unknown point or proposal; 409 a proposal not in a state that allows it (approving a
  finished one, rolling back one that did not succeed); 429 too many failed logins from this
  address (`Retry-After`);
- 502 a rollback the device refused or did not read back: the one error that is neither the
  client's doing nor the gateway's, with the device's own words. 502 (Bad Gateway: the upstream
  answered badly), not 409: nothing about the request or the proposal's state is wrong, and the
  same request may succeed once the device accepts writes again;
- 503 the gateway has not started its engine yet (or is stopping), or control.db cannot be read.

Authentication, on every route: `Authorization: Bearer otw_...` (an API token; a SHA-256 and
one index probe) or `Basic` (a control.db user's name and password; one argon2 verification,
~25 ms, in a worker thread). A refused login is recorded in the audit log (`auth.refused`, with
the real reason, which the client never sees) and counted against the client's address: within
`window_s`, an address with `max_failures` refused logins, or `max_concurrent` password checks
still running, gets 429 without any check, so a guesser buys at most a few argon2 verifications
a minute and cannot grow the audit log faster than that. Passwords and tokens have separate
rations: an agent looping with a revoked token on the gateway's own host must not lock the
operator's `opstwin approve` (same address) out.

Reads are checked too (RBAC `read`, recorded like every check): `GET /proposals/{id}` on the
proposal's point; `GET /proposals` lists the proposals on the points the caller's grants cover
rather than requiring a site-wide grant, because a supervisor scoped to `line1/oven1/*` must be
able to find the proposals waiting for them. One audit entry per request, not one per point.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from multidict import CIMultiDict
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.audit.chain import AuditEntry
from gateway.auth.rbac import AccessDecision, Principal, check
from gateway.control.audit import append_rows
from gateway.control.users import AuthError
from gateway.errors import GatewayError, UnknownPointError
from gateway.policy.engine import (
    AccessDeniedError,
    ProposalNotFoundError,
    ProposalRecord,
    ProposalStateError,
)
from gateway.ratelog import RateLimitedLog

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.policy.engine import PolicyEngine

log = logging.getLogger(__name__)

__all__ = [
    "CREDENTIALS_REFUSED",
    "LIST_STATUSES",
    "PROPOSAL_ROUTES",
    "ApproveBody",
    "LoginRation",
    "ProposalRoutes",
    "ProposeBody",
    "RejectBody",
    "RollbackBody",
    "add_proposal_routes",
    "parse_authorization",
]

MAX_REASON = 2000  # what the engine keeps of a reason
MAX_KEY = 200  # what the engine keeps of an idempotency key: a longer one would be cut, not kept
MAX_LIST = 1000
DEFAULT_LIST = 100
# Ids the engine makes are `p-<6 hex>-<n>`; anything else cannot be one, and is not echoed whole.
_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
LIST_STATUSES = (
    "pending",  # pending_approval or pending_analysis
    "pending_approval",
    "pending_analysis",
    "executing",
    "succeeded",
    "failed",
    "rejected",
    "rolled_back",
    "expired",
)
CREDENTIALS_REFUSED = (
    "credentials refused: send `Authorization: Bearer <API token>` (`opstwin token create`) or "
    "Basic with a user's name and password (`opstwin user add`)"
)
_CHALLENGES = ('Bearer realm="opstwin"', 'Basic realm="opstwin", charset="UTF-8"')

_T = TypeVar("_T", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- request bodies -------------------------------------------------------------------------------


class _Body(BaseModel):
    # strict: `value: "12"` or `true` is refused, not coerced; allow_inf_nan: JSON has no NaN,
    # and 1e400 parses as infinity.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class ProposeBody(_Body):
    """`POST /proposals`: what to change, to what, and why."""

    point: str = Field(min_length=1, max_length=256, description="Point id.")
    value: float = Field(description="The new value: a JSON number.")
    reason: str = Field(min_length=1, max_length=MAX_REASON, description="Why, in words.")
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_KEY,
        description="The same key never executes twice (a retried request is not a second change).",
    )

    @field_validator("reason")
    @classmethod
    def _says_something(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("say why the change is needed; the audit log keeps it")
        return value


class ApproveBody(_Body):
    """`POST /proposals/{id}/approve`: an optional comment for the record."""

    comment: str = Field("", max_length=MAX_REASON)


class RejectBody(_Body):
    """`POST /proposals/{id}/reject`: an optional reason."""

    reason: str = Field("", max_length=MAX_REASON)


class RollbackBody(_Body):
    """`POST /proposals/{id}/rollback`: an optional reason."""

    reason: str = Field("", max_length=MAX_REASON)


# -- failed-login ration --------------------------------------------------------------------------


class LoginRation:
    """Refused logins per client address within a sliding window; pure but for the clock.

    `retry_after(address)` says whether the address may try (None) or in how many seconds;
    `begin` / `end(ok=...)` bracket one check, so that checks still running count as well
    (a burst of parallel guesses would otherwise all pass before the first one fails).
    """

    def __init__(
        self,
        *,
        max_failures: int,
        window_s: float,
        max_concurrent: int | None = None,
        max_tracked: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 1 or window_s <= 0:
            raise ValueError("a ration allows at least one failure within a window above 0 s")
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_concurrent = max_concurrent
        self._max_tracked = max_tracked
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._running: dict[str, int] = {}

    def retry_after(self, address: str) -> float | None:
        """None if `address` may try a login now; else the seconds until it may."""
        now = self._clock()
        failures = self._recent(address, now)
        if len(failures) >= self.max_failures:
            return max(1.0, failures[0] + self.window_s - now)
        if self.max_concurrent is not None and self._running.get(address, 0) >= self.max_concurrent:
            return 1.0
        return None

    def begin(self, address: str) -> None:
        """A check for `address` starts."""
        self._running[address] = self._running.get(address, 0) + 1

    def end(self, address: str, *, ok: bool) -> None:
        """The check `begin` announced ended; a failure counts for the window."""
        running = self._running.get(address, 0) - 1
        if running > 0:
            self._running[address] = running
        else:
            self._running.pop(address, None)
        if not ok:
            self.fail(address)

    def fail(self, address: str) -> None:
        """Count one refused login of `address`."""
        now = self._clock()
        if address not in self._failures and len(self._failures) >= self._max_tracked:
            # Addresses come from the network: sweep the expired ones, then the oldest.
            for old in list(self._failures):
                self._recent(old, now)
            if len(self._failures) >= self._max_tracked:
                oldest = min(self._failures, key=lambda a: self._failures[a][-1])
                del self._failures[oldest]
        self._failures.setdefault(address, deque()).append(now)

    def _recent(self, address: str, now: float) -> deque[float]:
        failures = self._failures.get(address)
        if failures is None:
            return deque()
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[address]
        return failures


# -- the routes -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    """What an Authorization header offers: a token, or a user's name and password."""

    kind: str  # "token" or "user"
    secret: str  # the token, or the password
    name: str | None = None  # the user's name


class _Refusal(Exception):
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


def parse_authorization(header: str | None) -> Credentials | None:
    """Return the credentials an Authorization header carries, None if it carries none.

    ValueError (the reason, never echoing the header) when it is there but malformed.
    """
    if header is None or not header.strip():
        return None
    scheme, _, rest = header.strip().partition(" ")
    rest = rest.strip()
    if scheme.lower() == "bearer":
        if not rest or " " in rest:
            raise ValueError("a Bearer header holds one token")
        return Credentials("token", rest)
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise ValueError("Basic credentials are not base64 of UTF-8 `name:password`") from None
        name, colon, password = decoded.partition(":")
        if not colon:
            raise ValueError("Basic credentials have no `:` between name and password")
        return Credentials("user", password, name)
    raise ValueError("the Authorization scheme is neither Bearer nor Basic")


class ProposalRoutes:
    """The proposal routes of one app, with its failed-login rations."""

    def __init__(
        self,
        gateway_key: web.AppKey[Gateway],
        *,
        password_ration: LoginRation | None = None,
        token_ration: LoginRation | None = None,
    ) -> None:
        self._key = gateway_key
        # Each refused password costs ~25 ms of argon2: 10 a minute per address is plenty for a
        # person who mistyped, and bounds a guesser. Tokens cost a hash and an index probe; their
        # ration only bounds the audit rows a broken agent can cause.
        self.password_ration = password_ration or LoginRation(
            max_failures=10, window_s=60.0, max_concurrent=4
        )
        self.token_ration = token_ration or LoginRation(max_failures=30, window_s=60.0)
        self._lines = RateLimitedLog(log, 60.0)

    def register(self, app: web.Application) -> None:
        """Add the routes to `app`."""
        app[PROPOSAL_ROUTES] = self
        app.router.add_post("/proposals", self._wrap(self.propose))
        app.router.add_get("/proposals", self._wrap(self.list_proposals))
        app.router.add_get("/proposals/{id}", self._wrap(self.show))
        app.router.add_post("/proposals/{id}/approve", self._wrap(self.approve))
        app.router.add_post("/proposals/{id}/reject", self._wrap(self.reject))
        app.router.add_post("/proposals/{id}/rollback", self._wrap(self.rollback))

    # -- handlers ---------------------------------------------------------------------------------

    async def propose(self, request: web.Request) -> web.Response:
        """Put a change through the gate; 201 with the proposal as the gate left it."""
        gateway, engine = self._engine(request)
        principal = await self._principal(request, gateway)
        body = await _body(request, ProposeBody, required=True)
        try:
            record = await engine.propose(
                principal,
                body.point,
                body.value,
                reason=body.reason,
                source=_source(request),
                idempotency_key=body.idempotency_key,
            )
        except UnknownPointError:
            raise _Refusal(
                404,
                f"unknown point {body.point[:256]!r}; `GET /twin` lists the points, and the "
                "writable ones say `writable: true`",
            ) from None
        # The same pure check the engine made: it rejected the proposal for want of a grant.
        access = check(principal, "propose", body.point)
        if not access.allowed:
            raise _Refusal(
                403,
                f"{access.reason}; proposal {record.id} is recorded as rejected. Ask an admin "
                "for an `agent` (or higher) grant covering this point",
                extra={"proposal": record.to_json()},
            )
        return _json(record.to_json(), status=201)

    async def list_proposals(self, request: web.Request) -> web.Response:
        """The newest proposals first, on the points the caller may read."""
        gateway, engine = self._engine(request)
        principal = await self._principal(request, gateway)
        status = request.query.get("status") or None
        if status is not None and status not in LIST_STATUSES:
            raise _Refusal(400, f"status must be one of {', '.join(LIST_STATUSES)}")
        limit = _int_query(request, "limit", DEFAULT_LIST, 1, MAX_LIST)
        site = check(principal, "read", None)
        records = engine.recent(status, limit=len(engine.proposals) or 1)
        if site.allowed:
            shown = records[:limit]
            hidden = 0
        else:
            readable: dict[str, bool] = {}
            visible = []
            for record in records:
                point = record.proposal.point
                if point not in readable:
                    readable[point] = check(principal, "read", point).allowed
                if readable[point]:
                    visible.append(record)
            shown = visible[:limit]
            hidden = len(records) - len(visible)
        self._audit_access(gateway, site, None, listed=(len(shown), hidden))
        return _json({"proposals": [r.to_json() for r in shown], "hidden": hidden})

    async def show(self, request: web.Request) -> web.Response:
        """One proposal, if the caller may read its point."""
        gateway, engine = self._engine(request)
        principal = await self._principal(request, gateway)
        record = _record(engine, request)
        access = check(principal, "read", record.proposal.point)
        self._audit_access(gateway, access, record.id)
        if not access.allowed:
            raise _Refusal(403, f"{access.reason}; ask an admin for a grant covering this point")
        return _json(record.to_json())

    async def approve(self, request: web.Request) -> web.Response:
        """Approve a waiting proposal; it is executed before the answer."""
        gateway, engine = self._engine(request)
        principal = await self._principal(request, gateway)
        body = await _body(request, ApproveBody)
        proposal_id = _proposal_id(request)
        return await _act(engine.approve(principal, proposal_id, comment=body.comment))

    async def reject(self, request: web.Request) -> web.Response:
        """Reject a waiting proposal."""
        gateway, engine = self._engine(request)
        principal = await self._principal(request, gateway)
        body = await _body(request, RejectBody)
        proposal_id = _proposal_id(request)
        return await _act(engine.reject(principal, proposal_id, reason=body.reason))

    async def rollback(self, request: web.Request) -> web.Response:
        """Restore the value a succeeded change replaced."""
        gateway, engine = self._engine(request)
        principal = await self._principal(request, gateway)
        body = await _body(request, RollbackBody)
        proposal_id = _proposal_id(request)
        return await _act(engine.rollback(principal, proposal_id, reason=body.reason))

    # -- helpers ----------------------------------------------------------------------------------

    def _wrap(self, handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except _Refusal as refusal:
                body = {"error": refusal.message, **refusal.extra}
                return _json(body, status=refusal.status, headers=refusal.headers)

        return wrapped

    def _engine(self, request: web.Request) -> tuple[Gateway, PolicyEngine]:
        gateway = request.app[self._key]
        engine = getattr(gateway, "engine", None)
        if engine is None or getattr(gateway, "accounts", None) is None:
            raise _Refusal(
                503,
                "the gateway's policy engine is not running (the gateway is starting or "
                "stopping); retry in a few seconds",
                headers={"Retry-After": "5"},
            )
        return gateway, engine

    async def _principal(self, request: web.Request, gateway: Gateway) -> Principal:
        """Who is asking: the principal of the request's credentials, or a 401 / 429 refusal."""
        address = request.remote or "unknown"
        header = request.headers.get("Authorization")
        try:
            credentials = parse_authorization(header)
        except ValueError as exc:
            # Malformed Basic counts against the password ration, anything else the token's.
            kind = "user" if (header or "").strip().lower().startswith("basic") else "token"
            ration = self.password_ration if kind == "user" else self.token_ration
            self._throttle(ration, address)
            ration.fail(address)
            self._refused(gateway, kind, None, str(exc), address)
            raise self._unauthorized() from None
        if credentials is None:
            # Nothing offered, nothing tried: not counted (a browser's first request).
            raise self._unauthorized()
        ration = self.password_ration if credentials.kind == "user" else self.token_ration
        self._throttle(ration, address)
        accounts = gateway.accounts
        assert accounts is not None  # _engine checked it
        ration.begin(address)
        ok = False
        try:
            if credentials.kind == "user":
                principal = await accounts.authenticate_user_async(
                    credentials.name or "", credentials.secret
                )
            else:
                principal = await accounts.authenticate_token_async(credentials.secret)
            ok = True
        except AuthError as exc:
            self._refused(gateway, credentials.kind, exc.principal, exc.why, address)
            raise self._unauthorized() from None
        except GatewayError as exc:
            # control.db cannot be read: not the client's failure, and not a refusal.
            ok = True
            raise _Refusal(
                503,
                f"the gateway cannot check credentials: {exc}",
                headers={"Retry-After": "5"},
            ) from None
        finally:
            ration.end(address, ok=ok)
        return principal

    def _throttle(self, ration: LoginRation, address: str) -> None:
        wait = ration.retry_after(address)
        if wait is None:
            return
        self._lines.log(
            logging.WARNING,
            f"throttled:{address}",
            "HTTP logins from %s throttled: %d refused logins within %g s (or too many at once)",
            address,
            ration.max_failures,
            ration.window_s,
        )
        seconds = math.ceil(wait)
        raise _Refusal(
            429,
            f"too many refused logins from this address; retry in {seconds} s",
            headers={"Retry-After": str(seconds)},
        )

    @staticmethod
    def _unauthorized() -> _Refusal:
        headers: CIMultiDict[str] = CIMultiDict()
        for challenge in _CHALLENGES:
            headers.add("WWW-Authenticate", challenge)
        return _Refusal(401, CREDENTIALS_REFUSED, headers=headers)

    def _refused(
        self, gateway: Gateway, kind: str, name: str | None, why: str, address: str
    ) -> None:
        """Record a refused login: one audit entry, and a log line per address and minute."""
        self._lines.log(
            logging.WARNING,
            f"refused:{address}",
            "HTTP login refused from %s (%s %.64r): %s",
            address,
            kind,
            name or "?",
            why,
        )
        _audit(
            gateway,
            lambda: AuditEntry(
                ts=time.time(),
                actor=(name or "unknown")[:128],
                actor_kind="user" if kind == "user" else "token",
                action="auth.refused",
                decision="denied",
                reason=why,
                details={"via": "http", "address": address[:128]},
            ),
        )

    @staticmethod
    def _audit_access(
        gateway: Gateway,
        decision: AccessDecision,
        correlation: str | None,
        *,
        listed: tuple[int, int] | None = None,
    ) -> None:
        fields = decision.as_audit_fields()
        if listed is not None and not decision.allowed:
            shown, hidden = listed
            fields["decision"] = "filtered"
            fields["reason"] = (
                f"{fields['reason']}; listed the {shown} proposals on points the grants cover, "
                f"left out {hidden} on others"
            )
        _audit(
            gateway,
            lambda: AuditEntry(ts=time.time(), correlation_id=correlation, **fields),
        )


PROPOSAL_ROUTES = web.AppKey("proposal_routes", ProposalRoutes)


def add_proposal_routes(app: web.Application, gateway_key: web.AppKey[Gateway]) -> ProposalRoutes:
    """Register the proposal routes on `app`, whose gateway is under `gateway_key`."""
    routes = ProposalRoutes(gateway_key)
    routes.register(app)
    return routes


# -- helpers --------------------------------------------------------------------------------------


async def _act(call: Awaitable[ProposalRecord]) -> web.Response:
    """Await an engine call on an existing proposal; its errors as HTTP answers."""
    try:
        record = await call
    except ProposalNotFoundError as exc:
        raise _Refusal(404, _not_found(str(exc))) from None
    except AccessDeniedError as exc:
        raise _Refusal(403, f"{exc}; ask an admin for a grant that allows it") from None
    except ProposalStateError as exc:
        raise _Refusal(409, f"{exc}; `GET /proposals/{{id}}` shows its state") from None
    except GatewayError as exc:
        # Only a write can fail here: the device refused the rollback or read back another
        # value. The proposal keeps its state; the same request may be tried again.
        raise _Refusal(
            502, f"{exc}; the change is still in place: check the device, then try again"
        ) from None
    return _json(record.to_json())


def _proposal_id(request: web.Request) -> str:
    proposal_id = request.match_info.get("id", "")
    if not _ID_RE.fullmatch(proposal_id):
        raise _Refusal(404, _not_found(f"no proposal {proposal_id[:64]!r}"))
    return proposal_id


def _record(engine: PolicyEngine, request: web.Request) -> ProposalRecord:
    proposal_id = _proposal_id(request)
    try:
        return engine.get(proposal_id)
    except ProposalNotFoundError as exc:
        raise _Refusal(404, _not_found(str(exc))) from None


def _not_found(message: str) -> str:
    return (
        f"{message}; `GET /proposals` lists the recent ones (the audit log keeps every "
        "proposal, the gateway only the newest 1000 finished ones)"
    )


async def _body(request: web.Request, model: type[_T], *, required: bool = False) -> _T:
    """The request's JSON body as `model`; 400 naming each problem."""
    raw = await request.read()
    if not raw.strip() and not required:
        raw = b"{}"
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(_problem(error) for error in exc.errors()[:5])
        keys = ", ".join(
            f"`{name}`" + ("" if info.is_required() else "?")
            for name, info in model.model_fields.items()
        )
        raise _Refusal(
            400, f"invalid request body: {problems}; send a JSON object with {keys}"
        ) from None


def _problem(error: Any) -> str:
    # Keys come from the client (an unknown key is named): short, escaped.
    where = ".".join(
        repr(part)[:40] if isinstance(part, str) else str(part) for part in error["loc"]
    )
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _int_query(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise _Refusal(400, f"{name} must be a whole number in [{lo}, {hi}]") from None
    if not lo <= value <= hi:
        raise _Refusal(400, f"{name} must be in [{lo}, {hi}]")
    return value


def _source(request: web.Request) -> str:
    # The client's own claim; only a label for the record (who proposed is the principal).
    agent = request.headers.get("User-Agent", "")
    return "cli" if agent.startswith("opstwin-cli/") else "http"


def _json(
    data: Any, *, status: int = 200, headers: CIMultiDict[str] | dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        text=json.dumps(_finite(data), allow_nan=False, default=str),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _finite(value: Any) -> Any:
    # JSON has no NaN: a simulation figure over no paths can be one.
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _audit(gateway: Gateway, make: Callable[[], AuditEntry]) -> None:
    """Queue one audit entry on control.db's writer; a failure is logged, never raised."""
    control = getattr(gateway, "control", None)
    if control is None:
        return
    try:
        entry = make()
        future = control.submit(lambda conn: append_rows(conn, [entry]))
    except (GatewayError, ValueError) as exc:
        log.error("HTTP: cannot record an audit entry: %s", exc)
        return
    future.add_done_callback(_log_audit_failure)


def _log_audit_failure(future: Any) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("HTTP: cannot record an audit entry: %s", exc)
