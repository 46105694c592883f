"""AIW routes that write or act: push ingest, what-if simulation, executed actions, rollback.

    POST /telemetry/ingest     TelemetryIngest          → 200 {accepted, changed, rejected, rev}
    POST /sim/run              SimRunRequest            → 200 SimRunResult (+ kpis, trajectory)
    GET  /actions?status=&limit=                        → 200 {actions: [ActionV1], hidden}
    GET  /actions/{id}                                  → 200 ActionV1
    POST /rollback/{action_id} {"reason"?}              → 200 ActionV1 (status rolled_back)

Every route needs credentials (gateway/aiw/auth.py), whatever `http.read_access` says: ingest
needs RBAC `ingest` on each point, a simulation and the actions `read`, a rollback `rollback`.
Errors are `{"error": ...}` naming the field (gateway/aiw/answers.py).

Ingest. The body is checked in two steps so that one bad value does not cost a batch: the
envelope (a JSON object with `items`, 1 to 10,000 of them; else 400 naming the field, 413 for a
body over the app's `client_max_size`, 1 MiB: ~10,000 numeric items with short point ids; 415
for another content type), then each item (`TelemetryItem`'s schema, then
its point: a point of an enabled `driver: http` device the caller may ingest to, a value of the
point's datatype, a `source_ts` at most 5 minutes ahead of the gateway's clock). Items that pass
go to the twin as one batch, in order; each other is reported under `rejected` with its index
and why. The answer waits until the batch is committed: `rev` is a committed rev (the decision
of issue 17: nothing that leaves the process names a rev a crash could hand out again), and a
200 means the values are on disk. A point not pushed within its device's `stale_after_s` turns
STALE (gateway/aiw/push.py).

Simulation. `POST /sim/run` asks the policy engine what it would predict for a proposal of that
value (`PolicyEngine.what_if`: the policy that judges the point's proposals, its model, the
current readings), optionally over another horizon or number of paths, and writes nothing; a
`SimulationCompleted` event records it. One simulation runs at a time in the engine's thread
(shared with proposals): a request beyond `_MAX_SIM_WAITING` waiting is 503, and one asking for
more than `MAX_SIM_WORK` path-steps is 400.

Actions are proposals that reached the device (succeeded, rolled back, or failed after a write
was attempted), newest first, on the points the caller may read; `POST /rollback/{action_id}`
is `POST /proposals/{id}/rollback` (the same handler and error mapping) answering the action.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pydantic_core
from aiohttp import web
from pydantic import ValidationError

from drivers.contract import Quality, Sample
from gateway.aiw.answers import (
    HttpRefusal,
    int_query,
    json_answer,
    problem,
    read_body,
    refusal_answer,
    running_engine,
)
from gateway.aiw.auth import (
    audit_denial,
    checks_its_own_access,
    ensure_authenticator,
    readable,
    require,
    require_principal,
)
from gateway.aiw.push import FUTURE_SLACK_S, check_value
from gateway.aiw.schemas import (
    MAX_INGEST_ITEMS,
    ActionV1,
    SimRunRequest,
    TelemetryIngest,
    TelemetryItem,
)
from gateway.auth.rbac import AccessDecision, Principal, check, roles_granting
from gateway.errors import StoreError, UnknownPointError
from gateway.http_proposals import PROPOSAL_ROUTES
from gateway.policy.engine import NoModelError, ProposalNotFoundError, ProposalRecord
from gateway.policy.predict import output_ids, trajectory
from gateway.sim.results import KPI_ORDER

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.policy.engine import WhatIf

__all__ = [
    "ACTION_STATUSES",
    "MAX_INGEST_BYTES",
    "MAX_SIM_WORK",
    "add_write_routes",
]

# The app's `client_max_size` (aiohttp's default, which create_app keeps): what an ingest body
# may weigh (_read_json_body says why no more).
MAX_INGEST_BYTES = 1024 * 1024
# How long an ingest waits for its batch to be committed (the writer commits every few ms; a
# failing disk commits nothing).
COMMIT_WAIT_S = 5.0
# Path-steps one /sim/run may ask for: ~1 s of the C kernel on one core (10,000 paths x 600
# steps, the oven policy's own, is 6 M and takes ~60 ms).
MAX_SIM_WORK = 50_000_000
_MAX_SIM_WAITING = 2
ACTION_STATUSES = ("succeeded", "failed", "rolled_back")
MAX_LIST = 1000
DEFAULT_LIST = 100
_JSON_TYPES = ("application/json",)
_MAX_ID = 64  # the engine's ids are `p-<6 hex>-<n>`

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_write_routes(app: web.Application, gateway_key: web.AppKey[Gateway]) -> None:
    """Register the ingest, simulation, action and rollback routes (after the proposal routes,
    whose rollback `POST /rollback/{action_id}` shares)."""
    proposal_routes = app.get(PROPOSAL_ROUTES)
    if proposal_routes is None:
        raise RuntimeError("add_proposal_routes(app, ...) must run before add_write_routes")
    ensure_authenticator(app)
    routes = _WriteRoutes(gateway_key)

    async def rollback_action(request: web.Request) -> web.Response:
        """Roll back an executed change; answer the action."""
        record = await proposal_routes.rolled_back(request)
        return json_answer(ActionV1.from_record(record).model_dump(mode="json"))

    app.router.add_post("/telemetry/ingest", _answering(routes.ingest))
    app.router.add_post("/sim/run", _answering(routes.sim_run))
    app.router.add_get("/actions", _answering(routes.list_actions))
    app.router.add_get("/actions/{id}", _answering(routes.show_action))
    app.router.add_post("/rollback/{action_id}", proposal_routes.wrapped(rollback_action))


class _WriteRoutes:
    def __init__(self, gateway_key: web.AppKey[Gateway]) -> None:
        self._key = gateway_key
        self._sims_waiting = 0

    # -- ingest -----------------------------------------------------------------------------------

    async def ingest(self, request: web.Request) -> web.Response:
        """Push values of http devices' points; per-item rejections."""
        gateway = request.app[self._key]
        principal = await require_principal(request, gateway)
        if not any(g.role in roles_granting("ingest") for g in principal.grants):
            # Denied for every point alike: one 403 (and one audit entry), not 10,000 rejections.
            require(gateway, principal, "ingest", None, remedy=_INGEST_REMEDY)
        raw = await _read_json_body(request)
        # Parsing and checking 10,000 items takes ~0.1 s of CPU: in a worker thread, so the
        # loop keeps serving meanwhile (the checks only read the config and the principal).
        judged = await asyncio.to_thread(_judge, gateway, principal, raw, time.time())
        if judged.denied:
            _audit_denials(gateway, judged.denied)
        changed = 0
        if judged.samples:
            try:
                changed = gateway.store.ingest(judged.samples)
            except StoreError as exc:
                raise HttpRefusal(
                    503, f"the twin cannot take values now: {exc}", headers={"Retry-After": "5"}
                ) from None
            gateway.push.pushed(s.key for s in judged.samples)
        rev = await _committed(gateway, gateway.store.rev)
        return json_answer(
            {
                "accepted": len(judged.samples),
                "changed": changed,
                "rejected": judged.rejected,
                "rev": rev,
            }
        )

    # -- simulation -------------------------------------------------------------------------------

    async def sim_run(self, request: web.Request) -> web.Response:
        """What-if: simulate a value of a point as the gate would; write nothing."""
        gateway = request.app[self._key]
        engine = running_engine(gateway)
        principal = await require_principal(request, gateway)
        body = await read_body(request, SimRunRequest, required=True)
        point = gateway.points.get(body.point)
        if point is None:
            raise HttpRefusal(404, f"unknown point {body.point!r}; `GET /twin` lists the points")
        require(gateway, principal, "read", body.point, remedy=_READ_REMEDY)
        policy = engine.model_policy(body.point)
        if policy is None:
            raise HttpRefusal(
                422,
                f"no enabled policy models {body.point}: there is no simulation of it to run "
                "(a proposal for it waits for a person); `simulation:` of a policy whose "
                "action sets this point makes one",
            )
        if point.lo is not None and point.hi is not None and not point.lo <= body.value <= point.hi:
            raise HttpRefusal(
                422,
                f"value {body.value:g} is outside {body.point}'s range [{point.lo:g}, "
                f"{point.hi:g}]: the gate rejects such a proposal before any simulation",
            )
        sim = policy.simulation
        paths = body.paths or sim.paths
        horizon = body.horizon_s or sim.horizon_s
        work = paths * math.ceil(horizon / sim.dt_s)
        if work > MAX_SIM_WORK:
            raise HttpRefusal(
                400,
                f"paths x steps = {paths} x {math.ceil(horizon / sim.dt_s)} (horizon_s / the "
                f"policy's dt_s {sim.dt_s:g}) is {work:,}; at most {MAX_SIM_WORK:,}: ask for "
                "fewer `paths` or a shorter `horizon_s`",
            )
        if self._sims_waiting >= _MAX_SIM_WAITING:
            raise HttpRefusal(
                503,
                "simulations are already running or waiting (one runs at a time, beside the "
                "proposals'); retry in a few seconds",
                headers={"Retry-After": "2"},
            )
        self._sims_waiting += 1
        try:
            outcome = await engine.what_if(
                body.point,
                body.value,
                horizon_s=body.horizon_s,
                paths=body.paths,
                by=principal.name,
            )
        except UnknownPointError as exc:
            raise HttpRefusal(404, str(exc)) from None
        except NoModelError as exc:
            raise HttpRefusal(422, str(exc)) from None
        finally:
            self._sims_waiting -= 1
        return json_answer(sim_result(outcome))

    # -- actions ----------------------------------------------------------------------------------

    async def list_actions(self, request: web.Request) -> web.Response:
        """Executed actions, newest first, on the points the caller may read."""
        gateway = request.app[self._key]
        engine = running_engine(gateway)
        principal = await require_principal(request, gateway)
        status = request.query.get("status") or None
        if status is not None and status not in ACTION_STATUSES:
            raise HttpRefusal(400, f"status must be one of {', '.join(ACTION_STATUSES)}")
        limit = int_query(request, "limit", DEFAULT_LIST, 1, MAX_LIST)
        records = [
            r for r in engine.recent(status, limit=len(engine.proposals) or 1) if reached_device(r)
        ]
        visible = (
            records if check(principal, "read", None).allowed else readable(principal, records)
        )
        shown = visible[:limit]
        return json_answer(
            {
                "actions": [ActionV1.from_record(r).model_dump(mode="json") for r in shown],
                "hidden": len(records) - len(visible),
            }
        )

    async def show_action(self, request: web.Request) -> web.Response:
        """One executed action, if the caller may read its point."""
        gateway = request.app[self._key]
        engine = running_engine(gateway)
        principal = await require_principal(request, gateway)
        action_id = request.match_info.get("id", "")
        try:
            if len(action_id) > _MAX_ID:
                raise ProposalNotFoundError(action_id)
            record = engine.get(action_id)
        except ProposalNotFoundError:
            raise HttpRefusal(
                404, f"no action {action_id[:_MAX_ID]!r}; `GET /actions` lists the recent ones"
            ) from None
        require(gateway, principal, "read", record.proposal.point, remedy=_READ_REMEDY)
        if not reached_device(record):
            raise HttpRefusal(
                404,
                f"proposal {record.id} is {record.status} and wrote nothing: it is no action; "
                f"`GET /proposals/{record.id}` shows it",
            )
        return json_answer(ActionV1.from_record(record).model_dump(mode="json"))


_INGEST_REMEDY = "ask an admin for an `executor` (or `admin`) grant covering the points"
_READ_REMEDY = "ask an admin for a grant (any role) covering this point"


def _answering(handler: Handler) -> Handler:
    """`handler` with its refusals answered as JSON; it checks its own access (reads too)."""

    @functools.wraps(handler)
    async def answering(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpRefusal as refusal:
            return refusal_answer(refusal)

    return checks_its_own_access(answering)


# -- ingest helpers -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Judged:
    """An ingest body, judged item by item."""

    samples: list[Sample] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    denied: list[AccessDecision] = field(default_factory=list)  # one per point, in order


def _judge(gateway: Gateway, principal: Principal, raw: bytes, now: float) -> _Judged:
    """The samples of an ingest body's acceptable items, and why each other is not; 400 for a
    malformed envelope. Pure but for `now`: runs in a worker thread."""
    judged = _Judged()
    access: dict[str, AccessDecision] = {}
    for index, item in enumerate(_ingest_items(raw)):
        if isinstance(item, tuple):
            named, error = item
            judged.rejected.append({"index": index, "point": named, "error": error})
            continue
        point = item.point
        why = gateway.push.refusal(point)
        if why is None:
            decision = access.get(point)
            if decision is None:
                decision = access[point] = check(principal, "ingest", point)
                if not decision.allowed:
                    judged.denied.append(decision)
            if not decision.allowed:
                why = decision.reason
        if why is None:
            why, sample = _sample(gateway, item, principal, now)
            if sample is not None:
                judged.samples.append(sample)
        if why is not None:
            judged.rejected.append({"index": index, "point": point, "error": why})
    return judged


async def _read_json_body(request: web.Request) -> bytes:
    """The raw body of a JSON request within the app's `client_max_size`; 415 / 413 otherwise.

    The app's bound, not a larger one of this route's: `opstwin run` reads every body before
    any handler runs (gateway/netguard.py `body_timeout`), before the caller is authenticated,
    so a larger bound would be one for anyone who reaches the port.
    """
    content_type = request.content_type
    if content_type not in _JSON_TYPES and not content_type.endswith("+json"):
        raise HttpRefusal(
            415,
            f"Content-Type is {content_type or 'missing'!r}; send the items as "
            "`Content-Type: application/json`",
        )
    max_bytes = request.client_max_size
    too_big = HttpRefusal(
        413,
        f"the body is over {max_bytes / (1024 * 1024):g} MiB; send at most that, and at most "
        f"{MAX_INGEST_ITEMS:,} items, per request",
    )
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_big
    try:
        return await request.read()  # at once when body_timeout has read it already
    except web.HTTPRequestEntityTooLarge:
        raise too_big from None


def _ingest_items(raw: bytes) -> list[TelemetryItem | tuple[str | None, str]]:
    """Each item of an ingest body, or (the point it names, why it is not one); 400 for a
    malformed envelope."""
    try:
        # The whole batch in one call when it is well-formed (the common case, ~10x faster).
        return list(TelemetryIngest.model_validate_json(raw).items)
    except ValidationError:
        pass
    try:
        body = pydantic_core.from_json(raw, allow_inf_nan=True)
    except ValueError as exc:
        raise HttpRefusal(
            400, f"the body is not JSON ({str(exc)[:120]}); send {_ENVELOPE}"
        ) from None
    if not isinstance(body, dict):
        raise HttpRefusal(400, f"the body is a JSON {_json_kind(body)}; send {_ENVELOPE}")
    extra = sorted(k for k in body if k != "items")
    if extra:
        raise HttpRefusal(400, f"{extra[0][:40]!r}: unknown key; send {_ENVELOPE}")
    items = body.get("items")
    if not isinstance(items, list):
        what = "missing" if items is None else f"a JSON {_json_kind(items)}"
        raise HttpRefusal(400, f"items: {what}, not an array; send {_ENVELOPE}")
    if not 1 <= len(items) <= MAX_INGEST_ITEMS:
        raise HttpRefusal(
            400,
            f"items: {len(items):,} items; send 1 to {MAX_INGEST_ITEMS:,} per request",
        )
    checked: list[TelemetryItem | tuple[str | None, str]] = []
    for item in items:
        try:
            checked.append(TelemetryItem.model_validate(item))
        except ValidationError as exc:
            named = item.get("point") if isinstance(item, dict) else None
            point = named[:256] if isinstance(named, str) else None
            checked.append((point, "; ".join(problem(e) for e in exc.errors()[:3])))
    return checked


_QUALITIES = {q.value: q for q in Quality}
_ENVELOPE = '`{"items": [{"point": ..., "value": ..., "quality"?: ..., "source_ts"?: ...}]}`'


def _sample(
    gateway: Gateway, item: TelemetryItem, principal: Principal, now: float
) -> tuple[str | None, Sample | None]:
    """The sample of an item whose point takes ingest, or why its value or time is refused."""
    point = gateway.points[item.point]
    try:
        value = check_value(point.datatype, item.value)
    except ValueError as exc:
        return f"value: {exc}", None
    source_ts = item.source_ts
    if source_ts is not None and source_ts > now + FUTURE_SLACK_S:
        ahead = source_ts - now
        return (
            f"source_ts: {ahead:.0f} s ahead of the gateway's clock (at most "
            f"{FUTURE_SLACK_S:.0f}); Unix seconds, not milliseconds",
            None,
        )
    quality = _QUALITIES[item.quality]
    reason = None if quality is Quality.GOOD else f"{quality} as pushed by {principal.label}"
    return None, Sample(item.point, value, quality, now if source_ts is None else source_ts, reason)


def _audit_denials(gateway: Gateway, denied: list[AccessDecision]) -> None:
    # One entry per request, not one per point: a batch over a wrong scope is one mistake.
    first = denied[0]
    if len(denied) > 1:
        more = len(denied) - 1
        first = AccessDecision(
            **{
                **{f: getattr(first, f) for f in first.__dataclass_fields__},
                "reason": f"{first.reason} (and {more} more point{'s' * (more > 1)})",
            }
        )
    audit_denial(gateway, first)


async def _committed(gateway: Gateway, rev: int) -> int:
    """Wait until `rev` is committed and return the committed rev; 503 if it is not in time."""
    try:
        async with asyncio.timeout(COMMIT_WAIT_S):
            return await gateway.store.commit_signal().wait_for(rev)
    except TimeoutError:
        raise HttpRefusal(
            503,
            f"the values were taken but the twin database has not committed them within "
            f"{COMMIT_WAIT_S:g} s ({'; '.join(gateway.store.problems()) or 'no reason known'}); "
            "they are in the twin but may be lost in a crash: send them again later",
            headers={"Retry-After": "5"},
        ) from None


def _json_kind(value: Any) -> str:
    return {
        "dict": "object",
        "list": "array",
        "str": "string",
        "int": "number",
        "float": "number",
        "bool": "boolean",
        "NoneType": "null",
    }.get(type(value).__name__, "value")


# -- simulation helpers ---------------------------------------------------------------------------


def sim_result(outcome: WhatIf) -> dict[str, Any]:
    """`SimRunResult` of a what-if, with its fan chart and KPI percentiles when it ran."""
    policy = outcome.policy
    details = outcome.prediction.details
    summary = outcome.prediction.summary
    sim = policy.simulation
    outputs = output_ids(policy)
    answer: dict[str, Any] = {
        "point": outcome.point,
        "value": outcome.value,
        "current_value": outcome.current_value,
        "policy": policy.id,
        "model": details.get("model"),
        "horizon_s": sim.horizon_s,
        "dt_s": sim.dt_s,
        "paths": summary.paths,
        "paths_safe": details.get("paths_safe", 0),
        "paths_ok": summary.paths_ok,
        "p_success": outcome.p_success,
        "violation_probability": details.get("violation_probability", []),
        "objective_now": details.get("objective_now"),
        "objective_median": details.get("objective_median"),
        "seed": details.get("seed"),
        "error": summary.error,
        "elapsed_ms": round(outcome.elapsed_ms, 3),
        "written": False,
    }
    result = outcome.result
    if result is None or summary.error is not None:
        return answer
    answer["constraints"] = [
        {
            "output": outputs[c.constraint.output],
            "kind": c.constraint.kind,
            "limit": c.constraint.limit,
            "violation_probability": c.violation_probability,
            "first_violation_s": c.first_violation,
        }
        for c in result.constraints
    ]
    if result.path_kpis is not None:
        answer["kpis"] = {
            output: {
                kind: _percentiles(result.path_kpis[index, k]) for k, kind in enumerate(KPI_ORDER)
            }
            for index, output in enumerate(outputs)
        }
    fan = trajectory(result, outputs)
    answer["trajectory"] = {"times": fan["times"], "outputs": fan["outputs"]}
    return answer


def _percentiles(values: np.ndarray) -> dict[str, float | None]:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return {"p5": None, "p50": None, "p95": None, "mean": None}
    p5, p50, p95 = np.percentile(finite, (5, 50, 95))
    return {"p5": float(p5), "p50": float(p50), "p95": float(p95), "mean": float(finite.mean())}


def reached_device(record: ProposalRecord) -> bool:
    """Whether a write of the proposal was attempted (a failure before it wrote is no action)."""
    if record.status in ("succeeded", "rolled_back"):
        return True
    return record.status == "failed" and "write" in record.timings_ms
