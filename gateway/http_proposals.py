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

Authentication, on every route: `Authorization: Bearer otw_...` (an API token) or `Basic` (a
control.db user's name and password), resolved, throttled and audited by gateway/aiw/auth.py,
the one implementation every HTTP route uses (its rations are the app's, shared with the AIW
routes).

Reads are checked too (RBAC `read`, recorded like every check): `GET /proposals/{id}` on the
proposal's point; `GET /proposals` lists the proposals on the points the caller's grants cover
rather than requiring a site-wide grant, because a supervisor scoped to `line1/oven1/*` must be
able to find the proposals waiting for them. One audit entry per request, not one per point.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.aiw.answers import (
    HttpRefusal,
    int_query,
    json_answer,
    read_body,
    refusal_answer,
    running_engine,
)
from gateway.aiw.auth import (
    CREDENTIALS_REFUSED,
    Authenticator,
    LoginRation,
    audit,
    checks_its_own_access,
    ensure_authenticator,
    parse_authorization,
    readable,
    require_principal,
)
from gateway.audit.chain import AuditEntry
from gateway.auth.rbac import AccessDecision, Principal, check
from gateway.errors import GatewayError, UnknownPointError
from gateway.policy.engine import (
    AccessDeniedError,
    ProposalNotFoundError,
    ProposalRecord,
    ProposalStateError,
)

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.policy.engine import PolicyEngine

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


# -- the routes -----------------------------------------------------------------------------------


class ProposalRoutes:
    """The proposal routes of one app; its failed-login rations are the app's authenticator's."""

    def __init__(
        self,
        gateway_key: web.AppKey[Gateway],
        *,
        password_ration: LoginRation | None = None,
        token_ration: LoginRation | None = None,
    ) -> None:
        self._key = gateway_key
        # Replaced by the app's own in register() when the app already has one.
        self.auth = Authenticator(password_ration=password_ration, token_ration=token_ration)

    @property
    def password_ration(self) -> LoginRation:
        """Refused password logins per address (shared by every route of the app)."""
        return self.auth.password_ration

    @password_ration.setter
    def password_ration(self, ration: LoginRation) -> None:
        self.auth.password_ration = ration

    @property
    def token_ration(self) -> LoginRation:
        """Refused token logins per address (shared by every route of the app)."""
        return self.auth.token_ration

    @token_ration.setter
    def token_ration(self, ration: LoginRation) -> None:
        self.auth.token_ration = ration

    def register(self, app: web.Application) -> None:
        """Add the routes to `app`."""
        self.auth = ensure_authenticator(app, self.auth)
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
        body = await read_body(request, ProposeBody, required=True)
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
            raise HttpRefusal(
                404,
                f"unknown point {body.point[:256]!r}; `GET /twin` lists the points, and the "
                "writable ones say `writable: true`",
            ) from None
        # The same pure check the engine made: it rejected the proposal for want of a grant.
        access = check(principal, "propose", body.point)
        if not access.allowed:
            raise HttpRefusal(
                403,
                f"{access.reason}; proposal {record.id} is recorded as rejected. Ask an admin "
                "for an `agent` (or higher) grant covering this point",
                extra={"proposal": record.to_json()},
            )
        return json_answer(record.to_json(), status=201)

    async def list_proposals(self, request: web.Request) -> web.Response:
        """The newest proposals first, on the points the caller may read."""
        gateway, engine = self._engine(request)
        principal = await self._principal(request, gateway)
        status = request.query.get("status") or None
        if status is not None and status not in LIST_STATUSES:
            raise HttpRefusal(400, f"status must be one of {', '.join(LIST_STATUSES)}")
        limit = int_query(request, "limit", DEFAULT_LIST, 1, MAX_LIST)
        site = check(principal, "read", None)
        records = engine.recent(status, limit=len(engine.proposals) or 1)
        if site.allowed:
            shown = records[:limit]
            hidden = 0
        else:
            visible = readable(principal, records)
            shown = visible[:limit]
            hidden = len(records) - len(visible)
        self._audit_access(gateway, site, None, listed=(len(shown), hidden))
        return json_answer({"proposals": [r.to_json() for r in shown], "hidden": hidden})

    async def show(self, request: web.Request) -> web.Response:
        """One proposal, if the caller may read its point."""
        gateway, engine = self._engine(request)
        principal = await self._principal(request, gateway)
        record = _record(engine, request)
        access = check(principal, "read", record.proposal.point)
        self._audit_access(gateway, access, record.id)
        if not access.allowed:
            raise HttpRefusal(403, f"{access.reason}; ask an admin for a grant covering this point")
        return json_answer(record.to_json())

    async def approve(self, request: web.Request) -> web.Response:
        """Approve a waiting proposal; it is executed before the answer."""
        gateway, engine = self._engine(request)
        principal = await self._principal(request, gateway)
        body = await read_body(request, ApproveBody)
        proposal_id = _proposal_id(request)
        return await _act(engine.approve(principal, proposal_id, comment=body.comment))

    async def reject(self, request: web.Request) -> web.Response:
        """Reject a waiting proposal."""
        gateway, engine = self._engine(request)
        principal = await self._principal(request, gateway)
        body = await read_body(request, RejectBody)
        proposal_id = _proposal_id(request)
        return await _act(engine.reject(principal, proposal_id, reason=body.reason))

    async def rollback(self, request: web.Request) -> web.Response:
        """Restore the value a succeeded change replaced."""
        return json_answer((await self.rolled_back(request)).to_json())

    async def rolled_back(self, request: web.Request) -> ProposalRecord:
        """Roll back the proposal the request names (`{id}` or `{action_id}`) as its caller;
        every error a refusal. Shared with `POST /rollback/{action_id}`, which answers with
        the action instead of the proposal."""
        gateway, engine = self._engine(request)
        principal = await self._principal(request, gateway)
        body = await read_body(request, RollbackBody)
        proposal_id = _proposal_id(request)
        return await _acted(engine.rollback(principal, proposal_id, reason=body.reason))

    def wrapped(self, handler: Handler) -> Handler:
        """`handler` (one of this object's) answering its refusals as JSON, for another route."""
        return self._wrap(handler)

    # -- helpers ----------------------------------------------------------------------------------

    def _wrap(self, handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except HttpRefusal as refusal:
                return refusal_answer(refusal)

        # Reads too authenticate here, whatever `http.read_access` says: proposals are never
        # open (gateway/aiw/auth.py's middleware passes these routes through).
        return checks_its_own_access(wrapped)

    def _engine(self, request: web.Request) -> tuple[Gateway, PolicyEngine]:
        gateway = request.app[self._key]
        return gateway, running_engine(gateway)

    async def _principal(self, request: web.Request, gateway: Gateway) -> Principal:
        """Who is asking: the principal of the request's credentials, or a 401 / 429 refusal."""
        return await require_principal(request, gateway)

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
        audit(
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
    """Await an engine call on an existing proposal; the proposal, or its errors, as HTTP."""
    return json_answer((await _acted(call)).to_json())


async def _acted(call: Awaitable[ProposalRecord]) -> ProposalRecord:
    """Await an engine call on an existing proposal; its errors as refusals."""
    try:
        record = await call
    except ProposalNotFoundError as exc:
        raise HttpRefusal(404, _not_found(str(exc))) from None
    except AccessDeniedError as exc:
        raise HttpRefusal(403, f"{exc}; ask an admin for a grant that allows it") from None
    except ProposalStateError as exc:
        raise HttpRefusal(409, f"{exc}; `GET /proposals/{{id}}` shows its state") from None
    except GatewayError as exc:
        # Only a write can fail here: the device refused the rollback or read back another
        # value. The proposal keeps its state; the same request may be tried again.
        raise HttpRefusal(
            502, f"{exc}; the change is still in place: check the device, then try again"
        ) from None
    return record


def _proposal_id(request: web.Request) -> str:
    # `/proposals/{id}/...`, or `/rollback/{action_id}` (an action's id is its proposal's).
    proposal_id = request.match_info.get("id") or request.match_info.get("action_id", "")
    if not _ID_RE.fullmatch(proposal_id):
        raise HttpRefusal(404, _not_found(f"no proposal {proposal_id[:64]!r}"))
    return proposal_id


def _record(engine: PolicyEngine, request: web.Request) -> ProposalRecord:
    proposal_id = _proposal_id(request)
    try:
        return engine.get(proposal_id)
    except ProposalNotFoundError as exc:
        raise HttpRefusal(404, _not_found(str(exc))) from None


def _not_found(message: str) -> str:
    return (
        f"{message}; `GET /proposals` lists the recent ones (the audit log keeps every "
        "proposal, the gateway only the newest 1000 finished ones)"
    )


def _source(request: web.Request) -> str:
    # The client's own claim; only a label for the record (who proposed is the principal).
    agent = request.headers.get("User-Agent", "")
    return "cli" if agent.startswith("opstwin-cli/") else "http"
