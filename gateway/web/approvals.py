"""Approvals: the queue of waiting proposals, a proposal's page with its fan chart, approve or
reject with a reason, and the what-if page that simulates a value before anyone proposes it.

Everything goes through the policy engine (gateway/policy/engine.py), exactly as the JSON
routes do: the engine checks the role again (a supervisor may not approve their own proposal,
a policy may name who approves it), records the decision in the audit log, and an approval
executes through the gate — written, read back, verified or rolled back — before the page
answers, so the page the operator lands on shows the outcome in the device's words.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from markupsafe import Markup

from gateway.aiw.auth import readable
from gateway.errors import GatewayError, UnknownPointError
from gateway.policy.engine import (
    EVENT_TYPES,
    PENDING,
    AccessDeniedError,
    NoModelError,
    ProposalNotFoundError,
    ProposalRecord,
    ProposalStateError,
)
from gateway.policy.predict import output_ids, trajectory
from gateway.web.charts import Fan, fan_chart
from gateway.web.render import render
from gateway.web.security import (
    UI,
    WebUser,
    checked_form,
    engine_of,
    forbidden,
    gateway_of,
    login_required,
)

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.policy.engine import PolicyEngine, WhatIf

__all__ = ["add_approval_routes", "fan_charts"]

MAX_REASON = 2000
QUEUE_EVENTS = " ".join(EVENT_TYPES)
# One what-if at a time per gateway from the UI: it shares the engine's simulation thread with
# the proposals, which must not queue behind a row of impatient clicks.
_WHATIF_LOCK = web.AppKey("opstwin_web_whatif_lock", asyncio.Lock)


def add_approval_routes(app: web.Application) -> None:
    app.router.add_get(UI + "/approvals", approvals)
    app.router.add_get(UI + "/approvals/rows", approval_rows)
    app.router.add_get(UI + "/proposals/{id}", proposal)
    app.router.add_post(UI + "/proposals/{id}/approve", approve)
    app.router.add_post(UI + "/proposals/{id}/reject", reject)
    app.router.add_get(UI + "/whatif", whatif_page)
    app.router.add_post(UI + "/whatif", whatif)
    app.router.add_post(UI + "/whatif/propose", propose)
    app[_WHATIF_LOCK] = asyncio.Lock()


def _queue(request: web.Request, user: WebUser) -> dict[str, Any]:
    engine = engine_of(request)
    waiting = readable(user.principal, engine.recent("pending", limit=500))
    recent = readable(user.principal, engine.recent(limit=60))
    decided = [r for r in recent if r.status not in PENDING][:15]
    return {
        "waiting": waiting,
        "decided": decided,
        "may_approve": {r.id: user.may("approve", r.proposal.point) for r in waiting},
    }


@login_required
async def approvals(request: web.Request, user: WebUser) -> web.StreamResponse:
    """Pending proposals, newest first, updating live."""
    return render(request, "approvals.html", events=QUEUE_EVENTS, **_queue(request, user))


@login_required
async def approval_rows(request: web.Request, user: WebUser) -> web.StreamResponse:
    """The queue's rows alone: what the page's script swaps in when a proposal event arrives."""
    return render(request, "_approval_rows.html", **_queue(request, user))


def _record(request: web.Request, user: WebUser) -> ProposalRecord:
    proposal_id = request.match_info["id"]
    try:
        if len(proposal_id) > 128:
            raise ProposalNotFoundError(proposal_id[:128])
        record = engine_of(request).get(proposal_id)
    except ProposalNotFoundError:
        raise web.HTTPNotFound(text=f"no proposal {proposal_id[:128]!r} is held\n") from None
    if not user.may("read", record.proposal.point):
        raise forbidden(f"you may not see proposals on {record.proposal.point}")
    return record


@login_required
async def proposal(request: web.Request, user: WebUser) -> web.StreamResponse:
    """One proposal: fan chart, confidence breakdown, inputs and their quality, the decision."""
    record = _record(request, user)
    return _proposal_page(request, user, record, error=None)


def _proposal_page(
    request: web.Request,
    user: WebUser,
    record: ProposalRecord,
    *,
    error: str | None,
    status: int = 200,
) -> web.Response:
    gateway = gateway_of(request)
    p = record.proposal
    point = gateway.points.get(p.point)
    inputs = [(p.point, p.current_quality.value, p.current_age_s)] + [
        (i.point, i.quality.value, i.age_s) for i in p.inputs
    ]
    now_values = {pid: gateway.store.get(pid) for pid, _, _ in inputs if pid in gateway.points}
    breakdown = (
        record.decision.confidence.breakdown
        if record.decision is not None and record.decision.confidence is not None
        else {}
    )
    return render(
        request,
        "proposal.html",
        status=status,
        r=record,
        p=p,
        point=point,
        unit=point.unit if point else "",
        pending=record.status in PENDING,
        may_approve=user.may("approve", p.point),
        may_reject=user.may("reject", p.point),
        may_rollback=user.may("rollback", p.point),
        charts=fan_charts(gateway, record.fan, change_at_s=0.0),
        breakdown=sorted(breakdown.items()),
        inputs=inputs,
        now_values=now_values,
        simulation=record.prediction.details if record.prediction else None,
        error=error,
    )


async def _decide(request: web.Request, user: WebUser, approve_it: bool) -> web.StreamResponse:
    form = await checked_form(request)
    record = _record(request, user)
    reason = form.get("reason", "").strip()
    if not reason:
        return _proposal_page(
            request,
            user,
            record,
            status=400,
            error="Give a reason: it goes into the audit log with your name.",
        )
    if len(reason) > MAX_REASON:
        return _proposal_page(
            request,
            user,
            record,
            status=400,
            error=f"The reason is {len(reason)} characters long; at most {MAX_REASON}.",
        )
    engine = engine_of(request)
    try:
        if approve_it:
            await engine.approve(user.principal, record.id, comment=reason)
        else:
            await engine.reject(user.principal, record.id, reason=reason)
    except AccessDeniedError as exc:
        raise forbidden(str(exc)) from None
    except ProposalStateError as exc:
        return _proposal_page(request, user, record, status=409, error=str(exc))
    except GatewayError as exc:
        return _proposal_page(request, user, record, status=503, error=str(exc))
    raise web.HTTPSeeOther(f"{UI}/proposals/{record.id}")


@login_required
async def approve(request: web.Request, user: WebUser) -> web.StreamResponse:
    """Approve with a reason: the engine writes, reads back and verifies, then the page shows it."""
    return await _decide(request, user, True)


@login_required
async def reject(request: web.Request, user: WebUser) -> web.StreamResponse:
    """Reject with a reason."""
    return await _decide(request, user, False)


# -- what-if ---------------------------------------------------------------------------------------


def _modelled(gateway: Gateway, engine: PolicyEngine, user: WebUser) -> list[str]:
    """Writable points a policy simulates and the user may read, for the what-if form."""
    return sorted(
        pid
        for pid, point in gateway.points.items()
        if point.writable and engine.model_policy(pid) is not None and user.may("read", pid)
    )


@login_required
async def whatif_page(request: web.Request, user: WebUser) -> web.StreamResponse:
    """Pick a writable point and a value."""
    gateway, engine = gateway_of(request), engine_of(request)
    points = _modelled(gateway, engine, user)
    chosen = request.query.get("point", points[0] if points else "")
    return _whatif_page(request, user, points, chosen, None, None, None)


def _whatif_page(
    request: web.Request,
    user: WebUser,
    points: list[str],
    chosen: str,
    value: float | None,
    outcome: WhatIf | None,
    error: str | None,
    status: int = 200,
) -> web.Response:
    gateway = gateway_of(request)
    charts: list[Markup] = []
    if (
        outcome is not None
        and outcome.result is not None
        and outcome.prediction.summary.error is None
    ):
        fan = trajectory(outcome.result, output_ids(outcome.policy))
        charts = fan_charts(gateway, fan, change_at_s=0.0)
    return render(
        request,
        "whatif.html",
        status=status,
        points=points,
        chosen=chosen,
        value=value,
        current={pid: gateway.store.get(pid) for pid in points},
        defs=gateway.points,
        outcome=outcome,
        charts=charts,
        may_propose=bool(chosen) and user.may("propose", chosen),
        error=error,
    )


@login_required
async def whatif(request: web.Request, user: WebUser) -> web.StreamResponse:
    """Run the simulation the gate would run for this value; write nothing."""
    form = await checked_form(request)
    gateway, engine = gateway_of(request), engine_of(request)
    points = _modelled(gateway, engine, user)
    chosen = form.get("point", "")
    value = _number(form.get("value"))

    def refused(error: str, status: int) -> web.Response:
        shown = chosen if chosen in points else ""
        return _whatif_page(request, user, points, shown, value, None, error, status)

    if chosen not in points:
        return refused("Choose a writable point a policy simulates.", 400)
    if value is None:
        return refused("Enter a number.", 400)
    point = gateway.points[chosen]
    if point.lo is not None and point.hi is not None and not point.lo <= value <= point.hi:
        return refused(
            f"{value:g} is outside {chosen}'s range [{point.lo:g}, {point.hi:g}]: the gate "
            "would reject it before any simulation.",
            400,
        )
    lock = request.app[_WHATIF_LOCK]
    if lock.locked():
        return refused("Another what-if is running; try again in a moment.", 503)
    async with lock:
        try:
            outcome = await engine.what_if(chosen, value, by=user.name)
        except (UnknownPointError, NoModelError) as exc:
            return refused(str(exc), 422)
    return _whatif_page(request, user, points, chosen, value, outcome, None)


@login_required
async def propose(request: web.Request, user: WebUser) -> web.StreamResponse:
    """Propose the value of a what-if: the gate decides; the proposal's page shows the result."""
    form = await checked_form(request)
    gateway, engine = gateway_of(request), engine_of(request)
    chosen, value = form.get("point", ""), _number(form.get("value"))
    reason = form.get("reason", "").strip()
    if chosen not in gateway.points or value is None:
        raise web.HTTPBadRequest(text="choose a point and a number\n")
    if not user.may("propose", chosen):
        raise forbidden(f"your role may not propose changes to {chosen}")
    if not reason or len(reason) > MAX_REASON:
        points = _modelled(gateway, engine, user)
        return _whatif_page(
            request,
            user,
            points,
            chosen,
            value,
            None,
            f"Give a reason (1 to {MAX_REASON} characters).",
            400,
        )
    record = await engine.propose(user.principal, chosen, value, reason=reason, source="web")
    raise web.HTTPSeeOther(f"{UI}/proposals/{record.id}")


# -- helpers ---------------------------------------------------------------------------------------


def fan_charts(
    gateway: Gateway, fan: Mapping[str, Any] | None, *, change_at_s: float | None
) -> list[Markup]:
    """One fan chart per simulated output of a trajectory (predict.trajectory's shape)."""
    if not fan:
        return []
    charts = []
    for output, bands in fan["outputs"].items():
        point = gateway.points.get(output)
        current = gateway.store.get(output).value if point is not None else None
        limits = [
            (str(lim["kind"]), float(lim["limit"]))
            for lim in fan.get("limits", [])
            if lim["output"] == output
        ]
        charts.append(
            fan_chart(
                Fan(
                    title=output,
                    unit=point.unit if point else "",
                    times=fan["times"],
                    bands={k: v for k, v in bands.items() if k != "p99"},
                    limits=limits,
                    current=current if isinstance(current, (int, float)) else None,
                    change_at_s=change_at_s,
                )
            )
        )
    return charts


def _number(text: str | None) -> float | None:
    try:
        value = float((text or "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None
