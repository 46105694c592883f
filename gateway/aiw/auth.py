"""Who is asking, on every HTTP route: credentials to a Principal, and the read-access gate.

One implementation for every route (the proposal routes, the AIW reads and writes):

- `principal_of(request, gateway)`: the Principal of the request's `Authorization` header, or
  None when it carries none. `Bearer otw_...` is an API token (a SHA-256 and one index probe);
  `Basic` is a control.db user's name and password (one argon2 verification, ~25 ms, in a worker
  thread). A refused login answers 401 (one message for every cause, with `WWW-Authenticate`),
  is recorded in the audit log (`auth.refused`, with the real reason, which the client never
  sees) and counted against the client's address: within `window_s`, an address with
  `max_failures` refused logins, or `max_concurrent` password checks still running, gets 429
  without any check, so a guesser buys at most a few argon2 verifications a minute and cannot
  grow the audit log faster than that. Passwords and tokens have separate rations: an agent
  looping with a revoked token on the gateway's own host must not lock the operator's
  `opstwin approve` (same address) out. 503 when control.db cannot be read.
- `require(gateway, principal, operation, asset)`: the RBAC check, 403 when denied.
- `add_read_access(app, gateway_key)`: the middleware of `http.read_access`. `open`: reads pass
  without credentials. `token`: every GET (and HEAD) but `/health` and the AIW manifest needs a
  principal with RBAC `read` on what it reads: the point of `/twin/{point}` and of the telemetry
  queries' `point`, the whole site (`asset=None`) for everything else. Writes (POST) are not
  its business: each write handler authenticates and checks its own operation, whatever the
  mode. Routes that check their own reads (the proposal routes, `/actions`) are marked with
  `checks_its_own_access` and passed through.

Audit: refused logins and denied checks are recorded; allowed reads are not. A UI polling
`/twin` every 2 s would add ~43,000 audit rows a day to control.db, each hashed into the chain,
for no question an auditor asks; writes are recorded by the engine, and every denial is here.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from aiohttp import web
from multidict import CIMultiDict

from gateway.aiw.answers import HttpRefusal, refusal_answer
from gateway.audit.chain import AuditEntry
from gateway.auth.rbac import AccessDecision, Principal, check
from gateway.control.audit import append_rows
from gateway.control.users import AuthError
from gateway.errors import GatewayError
from gateway.ratelog import RateLimitedLog

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)

# Request key under which the web UI's session middleware leaves its user's principal for reads.
WEB_PRINCIPAL = web.RequestKey("opstwin_web_principal", Principal)


class _HasProposal(Protocol):
    @property
    def proposal(self) -> Any: ...


_R = TypeVar("_R", bound=_HasProposal)

__all__ = [
    "AUTHENTICATOR",
    "CREDENTIALS_REFUSED",
    "OPEN_PATHS",
    "WEB_PRINCIPAL",
    "Authenticator",
    "Credentials",
    "LoginRation",
    "add_read_access",
    "audit",
    "audit_denial",
    "checks_its_own_access",
    "ensure_authenticator",
    "is_ui_path",
    "parse_authorization",
    "principal_of",
    "readable",
    "require",
    "require_principal",
    "unauthorized",
]

CREDENTIALS_REFUSED = (
    "credentials refused: send `Authorization: Bearer <API token>` (`opstwin token create`) or "
    "Basic with a user's name and password (`opstwin user add`)"
)
CHALLENGES = ('Bearer realm="opstwin"', 'Basic realm="opstwin", charset="UTF-8"')
# Open whatever `read_access` says: liveness for probes, and the manifest, which tells an agent
# how to authenticate before it has credentials.
OPEN_PATHS = frozenset({"/health", "/.well-known/aiw-manifest.json"})
READ_METHODS = frozenset({"GET", "HEAD"})
UI_PREFIX = "/ui"


def is_ui_path(path: str) -> bool:
    """Whether `path` is one of the web UI's (gateway/web/): pages for people, with sessions,
    not part of the AIW API (the read gate, the OpenAPI document, JSON errors leave them)."""
    return path == "/" or path == UI_PREFIX or path.startswith(UI_PREFIX + "/")


# Query parameter naming the one point a read route reads (the telemetry queries).
_POINT_QUERY_PATHS = frozenset({"/telemetry/query", "/telemetry/aggregate"})
_OWN_ACCESS = "_aiw_checks_its_own_access"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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


# -- credentials ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    """What an Authorization header offers: a token, or a user's name and password."""

    kind: str  # "token" or "user"
    secret: str  # the token, or the password
    name: str | None = None  # the user's name


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


class Authenticator:
    """Credentials to principals for one app, with its failed-login rations and log lines."""

    def __init__(
        self,
        *,
        password_ration: LoginRation | None = None,
        token_ration: LoginRation | None = None,
    ) -> None:
        # Each refused password costs ~25 ms of argon2: 10 a minute per address is plenty for a
        # person who mistyped, and bounds a guesser. Tokens cost a hash and an index probe; their
        # ration only bounds the audit rows a broken agent can cause.
        self.password_ration = password_ration or LoginRation(
            max_failures=10, window_s=60.0, max_concurrent=4
        )
        self.token_ration = token_ration or LoginRation(max_failures=30, window_s=60.0)
        self._lines = RateLimitedLog(log, 60.0)

    async def principal(self, request: web.Request, gateway: Gateway) -> Principal | None:
        """The principal of the request's credentials; None if it offers none; a 401 / 429 /
        503 HttpRefusal if they are refused, throttled or cannot be checked."""
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
            raise unauthorized() from None
        if credentials is None:
            # Nothing offered, nothing tried: not counted (a browser's first request). A web UI
            # session counts for reads (gateway/web/security.py sets it on GET and HEAD only).
            return request.get(WEB_PRINCIPAL)
        return await self.check(request, gateway, credentials)

    async def login(
        self, request: web.Request, gateway: Gateway, name: str, password: str
    ) -> Principal:
        """A user's name and password from the web UI's login form, throttled and audited as a
        Basic login is (the same ration: a guesser gains nothing by switching doors)."""
        return await self.check(request, gateway, Credentials("user", password, name))

    async def check(
        self, request: web.Request, gateway: Gateway, credentials: Credentials
    ) -> Principal:
        """The principal of `credentials`; a 401 / 429 / 503 HttpRefusal otherwise."""
        address = request.remote or "unknown"
        accounts = getattr(gateway, "accounts", None)
        if accounts is None:
            raise HttpRefusal(
                503,
                "the gateway cannot check credentials yet (it is starting or stopping); retry "
                "in a few seconds",
                headers={"Retry-After": "5"},
            )
        ration = self.password_ration if credentials.kind == "user" else self.token_ration
        self._throttle(ration, address)
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
            raise unauthorized() from None
        except GatewayError as exc:
            # control.db cannot be read: not the client's failure, and not a refusal.
            ok = True
            raise HttpRefusal(
                503, f"the gateway cannot check credentials: {exc}", headers={"Retry-After": "5"}
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
        raise HttpRefusal(
            429,
            f"too many refused logins from this address; retry in {seconds} s",
            headers={"Retry-After": str(seconds)},
        )

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
        audit(
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


AUTHENTICATOR = web.AppKey("aiw_authenticator", Authenticator)


def ensure_authenticator(
    app: web.Application, default: Authenticator | None = None
) -> Authenticator:
    """The app's authenticator, set to `default` (or a new one) if it has none; call before the
    app starts (a running app's state is frozen)."""
    existing = app.get(AUTHENTICATOR)
    if existing is not None:
        return existing
    authenticator = app[AUTHENTICATOR] = default or Authenticator()
    return authenticator


def unauthorized() -> HttpRefusal:
    """The one 401 every missing or refused credential gets."""
    headers: CIMultiDict[str] = CIMultiDict()
    for challenge in CHALLENGES:
        headers.add("WWW-Authenticate", challenge)
    return HttpRefusal(401, CREDENTIALS_REFUSED, headers=headers)


async def principal_of(request: web.Request, gateway: Gateway) -> Principal | None:
    """The principal of the request's credentials, None if it offers none (HttpRefusal 401,
    429 or 503 when they are refused, throttled or cannot be checked)."""
    authenticator = request.config_dict.get(AUTHENTICATOR)
    if authenticator is None:
        raise RuntimeError("no Authenticator on this app: call ensure_authenticator(app) first")
    return await authenticator.principal(request, gateway)


async def require_principal(request: web.Request, gateway: Gateway) -> Principal:
    """The request's principal; HttpRefusal 401 when it offers no credentials."""
    principal = await principal_of(request, gateway)
    if principal is None:
        raise unauthorized()
    return principal


def require(
    gateway: Gateway,
    principal: Principal,
    operation: str,
    asset: str | None,
    *,
    remedy: str = "ask an admin for a grant that allows it",
) -> AccessDecision:
    """The RBAC decision for `operation` on `asset`; a denial is audited and raised as 403."""
    decision = check(principal, operation, asset)
    if not decision.allowed:
        audit_denial(gateway, decision)
        raise HttpRefusal(403, f"{decision.reason}; {remedy}")
    return decision


def audit_denial(
    gateway: Gateway, decision: AccessDecision, correlation: str | None = None
) -> None:
    """Record a denied access check (allowed reads are not recorded: module docstring)."""
    audit(
        gateway,
        lambda: AuditEntry(
            ts=time.time(), correlation_id=correlation, **decision.as_audit_fields()
        ),
    )


def audit(gateway: Gateway, make: Callable[[], AuditEntry]) -> None:
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


# -- the read-access gate -------------------------------------------------------------------------


def checks_its_own_access(handler: Handler) -> Handler:
    """Mark a read handler that authenticates and checks RBAC itself (the middleware skips it)."""
    setattr(handler, _OWN_ACCESS, True)
    return handler


def add_read_access(app: web.Application, gateway_key: web.AppKey[Gateway]) -> None:
    """Install the `http.read_access` middleware on `app` (module docstring)."""
    ensure_authenticator(app)

    @web.middleware
    async def read_access(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in READ_METHODS or request.path in OPEN_PATHS:
            return await handler(request)
        if is_ui_path(request.path):
            return await handler(request)  # the pages check their own session and roles
        match = request.match_info
        if match.http_exception is not None:
            return await handler(request)  # 404 / 405: nothing is read
        if getattr(match.handler, _OWN_ACCESS, False):
            return await handler(request)
        gateway = request.app[gateway_key]
        if gateway.config.http.read_access != "token":
            return await handler(request)
        try:
            principal = await require_principal(request, gateway)
            require(
                gateway,
                principal,
                "read",
                _read_asset(request),
                remedy="ask an admin for a grant (any role) covering it",
            )
        except HttpRefusal as refusal:
            return refusal_answer(refusal)
        return await handler(request)

    app.middlewares.append(read_access)


def _read_asset(request: web.Request) -> str | None:
    """The one point a read reads, or None for a site-wide read (the twin, events, schemas)."""
    point = request.match_info.get("point_id")
    if point:
        return point
    if request.path in _POINT_QUERY_PATHS:
        return request.query.get("point") or None
    return None


def readable(principal: Principal, records: Iterable[_R]) -> list[_R]:
    """The proposal records whose point `principal` may read, in their order (one check per
    point). Filtered, not refused: a supervisor of `line1/oven1/*` must find the oven's ones."""
    allowed: dict[str, bool] = {}
    kept = []
    for record in records:
        point = record.proposal.point
        if point not in allowed:
            allowed[point] = check(principal, "read", point).allowed
        if allowed[point]:
            kept.append(record)
    return kept
