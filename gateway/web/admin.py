"""The admin side of the web UI: executed actions and their rollback, the audit log, users and
API tokens.

- `/ui/actions`: the proposals that reached a device (written, or a write attempted), newest
  first, on the points the user may read; a rollback form on each succeeded one the user may
  roll back. The rollback goes through the policy engine exactly as `POST /rollback/{id}` does:
  the engine checks the role again, records the check and the rollback in the audit log, and
  writes the previous value back before the page answers.
- `/ui/audit`: the audit chain, newest first, filtered in SQL (actor, action prefix, decision,
  correlation id, time), with the chain's verification at the top.
- `/ui/users`, `/ui/tokens`: control.db's accounts (gateway/control/users.py); every change is
  made in the admin's name, so its audit entry says who. A token's secret is shown once, on the
  answer to the form that made it, and never again (only its SHA-256 is kept).

Roles are checked here before anything is read or written (a denial is audited, as the JSON
routes' are); the templates leave out what the role may not use, but the server is what refuses.
Every account call blocks (argon2, control.db's writer), so it runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlencode

from aiohttp import web

from gateway.aiw.auth import audit_denial, readable
from gateway.aiw.writes import ACTION_STATUSES, reached_device
from gateway.audit.chain import VerifyResult
from gateway.auth.rbac import ROLES, SITE_WIDE, Grant, check
from gateway.control.audit import AuditLog
from gateway.control.users import AccountError, Actor, parse_grant
from gateway.errors import GatewayError
from gateway.policy.engine import (
    AccessDeniedError,
    ProposalNotFoundError,
    ProposalStateError,
)
from gateway.web.approvals import MAX_REASON
from gateway.web.render import render
from gateway.web.security import (
    UI,
    WEB,
    WebUser,
    checked_form,
    engine_of,
    forbidden,
    gateway_of,
    login_required,
)

if TYPE_CHECKING:
    from gateway.control.db import ControlDB
    from gateway.control.users import AccountStore, NewToken

log = logging.getLogger(__name__)
_T = TypeVar("_T")

__all__ = ["AUDIT_PAGE", "AuditQuery", "add_admin_routes"]

# Actions one page lists: the engine holds ~1000 finished proposals, the audit log has them all.
MAX_ACTIONS = 200
AUDIT_PAGE = 100
# Rows one audit page's query may scan (newest first) for its filters: a filter that matches
# nothing in a million rows must not hold a connection for seconds. json_extract costs ~2 µs a
# row (measured on 200,000 rows), so this is ~0.1 s; the "older" link searches on from there.
AUDIT_SCAN_ROWS = 50_000
# The chain's verification is reused while the head is the same row; after an append only the
# new rows are checked (from the head verified last). A row edited in place (the triggers
# dropped) leaves the head as it was: the whole chain is checked again at least this often.
VERIFY_MAX_AGE_S = 300.0
# A form field longer than this is a paste gone wrong or a probe: refused before any check.
MAX_FIELD = 4096
_MAX_FILTER = 200  # an audit filter's text (actor, action, ...); longer matches nothing anyway
# Audit decisions as the stylesheet colours statuses; any other is drawn as `s-<decision>`.
_DECISION_BADGE = {
    "allowed": "s-ok",
    "done": "s-ok",
    "approved": "s-ok",
    "written": "s-ok",
    "denied": "s-failed",
}


@dataclass(slots=True)
class ChainCheck:
    """The last verification of the audit chain, and the head it was made at."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    head: tuple[int, str] | None = None
    result: VerifyResult | None = None
    checked_at: float = -math.inf  # monotonic time of the last full pass
    checked_wall: float | None = None  # its wall-clock time, for the page


_CHAIN = web.AppKey("opstwin_web_audit_chain", ChainCheck)


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get(UI + "/actions", actions)
    app.router.add_post(UI + "/actions/{id}/rollback", rollback)
    app.router.add_get(UI + "/audit", audit)
    app.router.add_get(UI + "/users", users)
    app.router.add_post(UI + "/users", add_user)
    app.router.add_post(UI + "/users/{name}/disable", disable_user)
    app.router.add_post(UI + "/users/{name}/password", set_password)
    app.router.add_get(UI + "/tokens", tokens)
    app.router.add_post(UI + "/tokens", create_token)
    app.router.add_post(UI + "/tokens/{name}/revoke", revoke_token)
    app.router.add_post(UI + "/audit/verify", verify_chain)
    app[_CHAIN] = ChainCheck()


# -- actions ---------------------------------------------------------------------------------------


@login_required
async def actions(request: web.Request, user: WebUser) -> web.StreamResponse:
    """Executed actions, newest first, on the points the user may read."""
    chosen = request.query.get("status") or None
    if chosen is not None and chosen not in ACTION_STATUSES:
        return _actions_page(
            request,
            user,
            None,
            status=400,
            error=f"Status must be one of {', '.join(ACTION_STATUSES)}.",
        )
    return _actions_page(request, user, chosen)


@login_required
async def rollback(request: web.Request, user: WebUser) -> web.StreamResponse:
    """Restore the value a succeeded action replaced, with a reason; then show the proposal."""
    form = await checked_form(request)
    engine = engine_of(request)
    action_id = request.match_info["id"]
    try:
        if len(action_id) > 128:
            raise ProposalNotFoundError(action_id[:128])
        record = engine.get(action_id)
    except ProposalNotFoundError:
        raise web.HTTPNotFound(text=f"no action {action_id[:128]!r} is held\n") from None
    point = record.proposal.point
    if not user.may("read", point):
        raise forbidden(f"you may not see actions on {point}")
    reason = form.get("reason", "").strip()
    # A role without `rollback` goes on to the engine, which refuses it and records the denial
    # in the audit log, as it does for the JSON route; the reason is checked for the others.
    if user.may("rollback", point):
        problem = _reason_problem(reason)
        if problem is not None:
            return _actions_page(request, user, None, status=400, error=problem)
    try:
        await engine.rollback(user.principal, record.id, reason=reason)
    except AccessDeniedError as exc:
        raise forbidden(str(exc)) from None
    except ProposalNotFoundError:  # dropped from memory meanwhile (the engine keeps ~1000)
        raise web.HTTPNotFound(text=f"no action {record.id!r} is held any more\n") from None
    except ProposalStateError as exc:
        return _actions_page(request, user, None, status=409, error=str(exc))
    except GatewayError as exc:
        # The device refused or did not answer: its words, and nothing changed in the record.
        return _actions_page(request, user, None, status=502, error=str(exc))
    log.info("web UI: %s rolled back %s (%s)", user.name, record.id, point)
    raise web.HTTPSeeOther(f"{UI}/proposals/{record.id}")


def _actions_page(
    request: web.Request,
    user: WebUser,
    chosen: str | None,
    *,
    status: int = 200,
    error: str | None = None,
) -> web.Response:
    gateway, engine = gateway_of(request), engine_of(request)
    records = [
        r for r in engine.recent(chosen, limit=len(engine.proposals) or 1) if reached_device(r)
    ]
    visible = readable(user.principal, records)
    shown = visible[:MAX_ACTIONS]
    points = {r.proposal.point for r in shown}
    units = {pid: p.unit for pid in points if (p := gateway.points.get(pid)) is not None}
    return render(
        request,
        "actions.html",
        status=status,
        actions=shown,
        more=len(visible) - len(shown),
        hidden=len(records) - len(visible),
        chosen=chosen or "",
        statuses=ACTION_STATUSES,
        may_rollback={
            r.id: r.status == "succeeded" and user.may("rollback", r.proposal.point) for r in shown
        },
        may_audit=user.may("read"),
        units=units,
        max_reason=MAX_REASON,
        error=error,
    )


def _reason_problem(reason: str) -> str | None:
    if not reason:
        return "Give a reason for the rollback: it goes into the audit log with your name."
    if len(reason) > MAX_REASON:
        return f"The reason is {len(reason)} characters long; at most {MAX_REASON}."
    return None


# -- the audit log ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """An audit page's filters: exact actor, action prefix, exact decision and correlation id,
    a time range (epoch seconds, `until` excluded), and the seq the page starts below."""

    actor: str = ""
    action: str = ""
    decision: str = ""
    correlation: str = ""
    since: float | None = None
    until: float | None = None
    before: int | None = None

    def sql(self, top: int, bottom: int, limit: int) -> tuple[str, list[Any]]:
        """The SELECT of rows `bottom <= seq < top` that match, newest first, at most `limit`."""
        # The seq range first: it is the primary key, so SQLite walks that range backwards and
        # stops at `limit`; the JSON filters are evaluated only on the rows it walks.
        where = ["seq < ?", "seq >= ?"]
        args: list[Any] = [top, bottom]
        for column, value in (
            ("actor", self.actor),
            ("decision", self.decision),
            ("correlation_id", self.correlation),
        ):
            if value:
                where.append(f"json_extract(entry, '$.{column}') = ?")
                args.append(value)
        if self.action:
            where.append("substr(json_extract(entry, '$.action'), 1, ?) = ?")
            args += [len(self.action), self.action]
        if self.since is not None:
            where.append("ts >= ?")
            args.append(self.since)
        if self.until is not None:
            where.append("ts < ?")
            args.append(self.until)
        sql = (
            "SELECT seq, ts, entry FROM audit WHERE "
            + " AND ".join(where)
            + " ORDER BY seq DESC LIMIT ?"
        )
        return sql, [*args, limit]

    def link(self, before: int | None) -> str:
        """The query string of this filter starting below `before`."""
        params: dict[str, Any] = {
            "actor": self.actor,
            "action": self.action,
            "decision": self.decision,
            "correlation": self.correlation,
            "from": _local(self.since),
            "to": _local(self.until),
            "before": before,
        }
        return "?" + urlencode({k: v for k, v in params.items() if v not in ("", None)})


@login_required
async def audit(request: web.Request, user: WebUser) -> web.StreamResponse:
    """The audit log, newest first, filtered and paged, with the chain's verification."""
    _require(request, user, "read")
    control = _control(request)
    form = {k: request.query.get(k, "")[:_MAX_FILTER] for k in _FILTERS}
    chain_log = AuditLog(control)
    try:
        head = await asyncio.to_thread(chain_log.head)
        chain, chain_error = await _verified(request.app, chain_log, head), None
    except GatewayError as exc:
        head, chain, chain_error = (0, ""), None, str(exc)
    page: dict[str, Any] = {
        "form": form,
        "chain": chain,
        "chain_checked": request.app[_CHAIN].checked_wall,
        "chain_error": chain_error,
        "rows": [],
        "older": None,
        "searched": None,
        "filtered": any(form.values()),
    }
    try:
        query = _audit_query(request)
    except ValueError as exc:
        return render(request, "audit.html", status=400, error=str(exc), **page)
    top = head[0] + 1 if query.before is None else min(query.before, head[0] + 1)
    bottom = max(1, top - AUDIT_SCAN_ROWS)
    try:
        found = await asyncio.to_thread(_select, control, query, top, bottom)
    except GatewayError as exc:
        return render(request, "audit.html", status=503, error=str(exc), **page)
    older: int | None = None
    if len(found) > AUDIT_PAGE:
        found = found[:AUDIT_PAGE]
        older = found[-1][0]
    elif bottom > 1:
        older = bottom  # the scan stopped at its bound, not at the first row: search on below it
    page.update(
        rows=[_audit_row(*row) for row in found],
        older=query.link(older) if older is not None else None,
        searched=(bottom, top - 1) if bottom > 1 or query.before is not None else None,
    )
    return render(request, "audit.html", error=None, **page)


@login_required
async def verify_chain(request: web.Request, user: WebUser) -> web.StreamResponse:
    """Re-check the whole chain now (the page otherwise checks what was appended, and the whole
    chain every few minutes)."""
    await checked_form(request)
    _require(request, user, "read")
    request.app[_CHAIN].result = None  # the next look is a full pass
    raise web.HTTPSeeOther(UI + "/audit")


_FILTERS = ("actor", "action", "decision", "correlation", "from", "to", "before")


def _audit_query(request: web.Request) -> AuditQuery:
    q = request.query
    for name in _FILTERS:
        if len(q.get(name, "")) > _MAX_FILTER:
            raise ValueError(f"The filter `{name}` is longer than {_MAX_FILTER} characters.")
    before_text = q.get("before", "").strip()
    before: int | None = None
    if before_text:
        if not before_text.isdigit() or int(before_text) < 1:
            raise ValueError(f"`before` is a sequence number (1 or more), not {before_text!r}.")
        before = int(before_text)
    return AuditQuery(
        actor=q.get("actor", "").strip(),
        action=q.get("action", "").strip(),
        decision=q.get("decision", "").strip(),
        correlation=q.get("correlation", "").strip(),
        since=_epoch(q.get("from", ""), "From"),
        until=_epoch(q.get("to", ""), "To"),
        before=before,
    )


def _epoch(text: str, label: str) -> float | None:
    """A `datetime-local` field (the gateway's local time, as the page shows times) as epoch."""
    text = text.strip()
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except (ValueError, OverflowError, OSError):
        raise ValueError(
            f"{label}: {text!r} is not a date and time like 2026-11-05T14:30 (the gateway's "
            "local time)."
        ) from None


def _local(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts).isoformat(timespec="seconds")


def _select(
    control: ControlDB, query: AuditQuery, top: int, bottom: int
) -> list[tuple[int, float, str]]:
    sql, args = query.sql(top, bottom, AUDIT_PAGE + 1)
    # A connection of its own, not the shared one: the session check of every other request
    # reads users through that one, and must not wait behind a filtered scan.
    with control.reader() as conn:
        rows: list[Any] = conn.execute(sql, args).fetchall()
    return [(int(r[0]), float(r[1]), str(r[2])) for r in rows]


async def _verified(
    app: web.Application, chain_log: AuditLog, head: tuple[int, str]
) -> VerifyResult:
    """The chain's verification, made again only when its head moved or it grew old."""
    # One at a time: ten page views after an append re-hash the chain once, not ten times.
    state = app[_CHAIN]
    async with state.lock:
        age = time.monotonic() - state.checked_at
        known = state.result
        if known is None or not known.ok or age > VERIFY_MAX_AGE_S:
            # The whole chain: at first, after a break, on request, and every few minutes (a
            # row edited in place leaves the head as it was; only a full pass finds it).
            result = await asyncio.to_thread(chain_log.verify)
            state.checked_at, state.checked_wall = time.monotonic(), time.time()
        elif state.head != head:
            # Appended since (every action appends): only the new rows, from the verified head.
            # A full pass re-canonicalises every entry (~90 us a row: seconds for a year's log),
            # which an operator opening the page after each approval must not wait for.
            new = await asyncio.to_thread(
                chain_log.verify_after, known.last_seq or 0, known.last_hash
            )
            result = (
                replace(
                    new,
                    checked=known.checked + new.checked,
                    last_seq=new.last_seq if new.last_seq is not None else known.last_seq,
                )
                if new.ok
                else new
            )
        else:
            result = known
        state.result, state.head = result, head
        return result


def _audit_row(seq: int, ts: float, text: str) -> dict[str, Any]:
    """One row for the page: the entry's own fields (the hash covers those, not the column)."""
    try:
        entry = json.loads(text)
    except ValueError:
        entry = None
    if not isinstance(entry, dict):
        return {"seq": seq, "ts": ts, "raw": _short(text)}
    decision = str(entry.get("decision") or "")
    more = {k: entry[k] for k in ("inputs", "simulation", "confidence", "details") if entry.get(k)}
    return {
        "seq": seq,
        "ts": entry.get("ts", ts),
        "actor": str(entry.get("actor", "")),
        "actor_kind": str(entry.get("actor_kind") or ""),
        "action": str(entry.get("action", "")),
        "target": str(entry.get("target") or ""),
        "decision": decision,
        "badge": _DECISION_BADGE.get(decision, f"s-{decision}"),
        "reason": str(entry.get("reason") or ""),
        "correlation": str(entry.get("correlation_id") or ""),
        "more": _short(json.dumps(more, ensure_ascii=False, separators=(", ", ": ")))
        if more
        else "",
        "raw": None,
    }


def _short(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- users -----------------------------------------------------------------------------------------


@login_required
async def users(request: web.Request, user: WebUser) -> web.StreamResponse:
    """Every user, and the forms that add, disable and re-password them."""
    _require(request, user, "manage_users")
    return await _users_page(request, user)


@login_required
async def add_user(request: web.Request, user: WebUser) -> web.StreamResponse:
    """Add a user with one grant (role over asset globs)."""
    form = await checked_form(request)
    _require(request, user, "manage_users")
    accounts = _accounts(request)
    name, kept = _named_grant(form)
    try:
        grant = _form_grant(form)
        await asyncio.to_thread(
            accounts.add_user, name, form.get("password", ""), [grant], actor=_actor(user)
        )
    except AccountError as exc:
        return await _users_page(request, user, status=400, error=str(exc), form=kept)
    except GatewayError as exc:
        return await _users_page(request, user, status=503, error=str(exc), form=kept)
    log.info("web UI: %s added user %s (%s)", user.name, name, _grant_text(grant))
    return await _users_page(request, user, done=f"User {name} added: {_grant_text(grant)}.")


@login_required
async def disable_user(request: web.Request, user: WebUser) -> web.StreamResponse:
    """Disable a user and end their sessions (an admin may not disable themselves)."""
    await checked_form(request)
    _require(request, user, "manage_users")
    accounts = _accounts(request)
    name = request.match_info["name"]
    if name == user.name:
        return await _users_page(
            request,
            user,
            status=400,
            error="You may not disable yourself: ask another admin (so that an admin who can "
            "log in always remains).",
        )
    try:
        await asyncio.to_thread(accounts.disable_user, name, actor=_actor(user))
    except AccountError as exc:
        return await _users_page(request, user, status=400, error=str(exc))
    except GatewayError as exc:
        return await _users_page(request, user, status=503, error=str(exc))
    # The session check reads the user on every request and would refuse them anyway; ending
    # the sessions also drops them from memory at once.
    ended = request.app[WEB].sessions.end_user(name)
    log.warning("web UI: %s disabled user %s (%d sessions ended)", user.name, name, ended)
    return await _users_page(
        request, user, done=f"User {name} is disabled; {_sessions(ended)} ended."
    )


@login_required
async def set_password(request: web.Request, user: WebUser) -> web.StreamResponse:
    """Give a user a new password and end their sessions (theirs log in again with it)."""
    form = await checked_form(request)
    _require(request, user, "manage_users")
    accounts = _accounts(request)
    name = request.match_info["name"]
    password = form.get("password", "")
    try:
        _fit(form)
        if password != form.get("again", ""):
            raise AccountError("the two passwords differ; type the same one twice")
        await asyncio.to_thread(accounts.set_password, name, password, actor=_actor(user))
    except AccountError as exc:
        return await _users_page(request, user, status=400, error=str(exc))
    except GatewayError as exc:
        return await _users_page(request, user, status=503, error=str(exc))
    ended = request.app[WEB].sessions.end_user(name)
    log.warning("web UI: %s set a new password for %s (%d sessions ended)", user.name, name, ended)
    if name == user.name:
        raise web.HTTPSeeOther(f"{UI}/login")  # their own session ended with the others
    return await _users_page(
        request, user, done=f"User {name} has a new password; {_sessions(ended)} ended."
    )


async def _users_page(
    request: web.Request,
    user: WebUser,
    *,
    status: int = 200,
    error: str | None = None,
    done: str | None = None,
    form: Mapping[str, str] | None = None,
) -> web.Response:
    listed = await _listed(_accounts(request).list_users)
    return render(
        request,
        "users.html",
        status=status,
        users=[(u, _grants_text(u.grants)) for u in listed],
        roles=ROLES,
        form={"name": "", "role": "viewer", "assets": SITE_WIDE, **(form or {})},
        error=error,
        done=done,
    )


# -- tokens ----------------------------------------------------------------------------------------


@login_required
async def tokens(request: web.Request, user: WebUser) -> web.StreamResponse:
    """Every API token, and the forms that create and revoke them."""
    _require(request, user, "manage_tokens")
    return await _tokens_page(request)


@login_required
async def create_token(request: web.Request, user: WebUser) -> web.StreamResponse:
    """Create a token; its secret is on this answer and nowhere else, ever."""
    form = await checked_form(request)
    _require(request, user, "manage_tokens")
    accounts = _accounts(request)
    name, kept = _named_grant(form)
    try:
        grant = _form_grant(form)
        new = await asyncio.to_thread(accounts.create_token, name, [grant], actor=_actor(user))
    except AccountError as exc:
        return await _tokens_page(request, status=400, error=str(exc), form=kept)
    except GatewayError as exc:
        return await _tokens_page(request, status=503, error=str(exc), form=kept)
    log.info("web UI: %s created token %s (%s)", user.name, name, _grant_text(grant))
    return await _tokens_page(request, new=new)


@login_required
async def revoke_token(request: web.Request, user: WebUser) -> web.StreamResponse:
    """Revoke a token (its name stays taken, so the audit log's `token x` stays one token)."""
    await checked_form(request)
    _require(request, user, "manage_tokens")
    accounts = _accounts(request)
    name = request.match_info["name"]
    try:
        await asyncio.to_thread(accounts.revoke_token, name, actor=_actor(user))
    except AccountError as exc:
        return await _tokens_page(request, status=400, error=str(exc))
    except GatewayError as exc:
        return await _tokens_page(request, status=503, error=str(exc))
    log.warning("web UI: %s revoked token %s", user.name, name)
    return await _tokens_page(request, done=f"Token {name} is revoked.")


async def _tokens_page(
    request: web.Request,
    *,
    status: int = 200,
    error: str | None = None,
    done: str | None = None,
    form: Mapping[str, str] | None = None,
    new: NewToken | None = None,
) -> web.Response:
    listed = await _listed(_accounts(request).list_tokens)
    return render(
        request,
        "tokens.html",
        status=status,
        tokens=[(t, _grants_text(t.grants)) for t in reversed(listed)],
        roles=ROLES,
        form={"name": "", "role": "agent", "assets": SITE_WIDE, **(form or {})},
        new=new,
        error=error,
        done=done,
    )


# -- helpers ---------------------------------------------------------------------------------------


def _control(request: web.Request) -> ControlDB:
    control = gateway_of(request).control
    if control is None:
        raise web.HTTPServiceUnavailable(text="the gateway is starting; retry in a few seconds\n")
    return control


def _accounts(request: web.Request) -> AccountStore:
    accounts = gateway_of(request).accounts
    if accounts is None:
        raise web.HTTPServiceUnavailable(text="the gateway is starting; retry in a few seconds\n")
    return accounts


def _require(request: web.Request, user: WebUser, operation: str) -> None:
    """Refuse (403) a user whose grants do not allow a site-wide `operation`; audit the denial."""
    decision = check(user.principal, operation, None)
    if not decision.allowed:
        audit_denial(gateway_of(request), decision)
        raise forbidden(f"{decision.reason}; an admin can grant it")


def _actor(user: WebUser) -> Actor:
    return Actor(user.name, "user", {"via": "web"})


def _fit(form: Mapping[str, str]) -> None:
    for key, value in form.items():
        if len(value) > MAX_FIELD:
            raise AccountError(
                f"the field `{key[:40]}` is {len(value)} characters long; at most {MAX_FIELD}"
            )


async def _listed(read: Callable[[], list[_T]]) -> list[_T]:
    """Users or tokens from control.db, off the loop; 503 when it cannot be read."""
    try:
        return await asyncio.to_thread(read)
    except GatewayError as exc:
        raise web.HTTPServiceUnavailable(text=f"control.db cannot be read: {exc}\n") from None


def _named_grant(form: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """The name a user or token form gives, and its fields cut short to show them again."""
    name = form.get("name", "").strip()
    role, assets = form.get("role", ""), form.get("assets", "").strip() or SITE_WIDE
    return name, {"name": name[:64], "role": role[:16], "assets": assets[:256]}


def _form_grant(form: Mapping[str, str]) -> Grant:
    """The grant a user or token form asks for (AccountError for an oversized field)."""
    _fit(form)
    return _grant(form.get("role", ""), form.get("assets", "").strip() or SITE_WIDE)


def _grant(role: str, assets: str) -> Grant:
    """One grant from the form's role and its comma-separated asset globs."""
    if role not in ROLES:
        raise AccountError(f"choose a role: one of {', '.join(ROLES)}")
    globs = ",".join(g.strip() for g in assets.split(","))
    return parse_grant(f"{role}:{globs}")


def _grant_text(grant: Grant) -> str:
    return f"{grant.role}:{','.join(grant.assets)}"


def _grants_text(grants: tuple[Grant, ...]) -> str:
    return "; ".join(_grant_text(g) for g in grants)


def _sessions(count: int) -> str:
    return "1 live session" if count == 1 else f"{count} live sessions"
