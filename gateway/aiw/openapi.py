"""The gateway's self-description: `/openapi.json`, the AIW manifest, and `/schemas`.

    GET /openapi.json                    OpenAPI 3.1 of every route the app serves
    GET /.well-known/aiw-manifest.json   the AIW manifest (gateway/aiw/manifest.py)
    GET /schemas                         `{schemas: [{name, id, url}]}`
    GET /schemas/{name}                  one JSON Schema 2020-12 document; 404 for an unknown name

`OPERATIONS` describes each route by hand: what it takes (parameters, the pydantic model of its
body), what it answers (the model of each status's body), and who may call it. The document is
built by walking the app's router and looking each (method, path) up there, so it lists exactly
what is served: a route served and not described is left out of the document and named by
`undocumented_routes` (a test fails on it), and a description of a route not served is dropped.
aiohttp adds a HEAD route beside every GET; those are not listed (HEAD answers GET's headers).

Bodies come from the same pydantic models the handlers validate with (gateway/aiw/schemas.py,
gateway/http_proposals.py), under `components/schemas`. Every error answer is `{"error": ...}`
(`ErrorBody`), aiohttp's own refusals included (no route, a method not allowed, a body too
large: `json_errors` rewrites them); a schemathesis run in the test suite checks every answer
against the document. The document names this gateway's real points in its examples, and a
proposal's 201 links to what can be done with its id, so that an agent (or a stateful fuzzer)
gets past "unknown point" and "no proposal".

Security depends on the config: with `http.read_access: token` every read but `/health` and the
manifest needs a bearer token or a user (401 without, 403 without a `read` grant); with `open`
reads need nothing. Writes and actions need credentials whatever the mode. The document is built
once per app (the router is frozen once the app runs, and so is the config).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, JsonValue
from pydantic.json_schema import models_json_schema

from gateway import __version__
from gateway.aiw.answers import HttpRefusal, refusal_answer
from gateway.aiw.auth import is_ui_path
from gateway.aiw.manifest import Manifest, build_manifest
from gateway.aiw.schemas import (
    CURSOR_PATTERN,
    MAX_INGEST_ITEMS,
    MAX_SIM_HORIZON_S,
    MAX_SIM_PATHS,
    SCHEMA_BASE,
    SCHEMAS,
    ActionsPage,
    ActionV1,
    ErrorBody,
    EventV1,
    ProposalV1,
    SimRunRequest,
    SimRunResult,
    TelemetryIngest,
    TwinPointAnswer,
    TwinV1,
    schema_document,
)
from gateway.aiw.stream import DIFF_LIMIT, DIFF_MAX_LIMIT
from gateway.aiw.writes import ACTION_STATUSES, MAX_INGEST_BYTES, MAX_SIM_WORK
from gateway.http_proposals import (
    DEFAULT_LIST,
    LIST_STATUSES,
    MAX_LIST,
    ApproveBody,
    ProposeBody,
    RejectBody,
    RollbackBody,
)

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = [
    "OPERATIONS",
    "Operation",
    "add_document_routes",
    "build_openapi",
    "served_routes",
    "undocumented_routes",
]

Access = Literal["open", "read", "auth"]  # never checked / `http.read_access` / credentials


# -- answers only this module describes ----------------------------------------------------------


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class HealthAnswer(_Answer):
    """`GET /health`."""

    status: Literal["ok", "degraded"]
    reasons: list[str] = Field(description="One sentence per cause of `degraded`.")
    version: str
    site_id: str
    gateway_id: str
    rev: int = Field(ge=0)
    uptime_s: float
    devices: dict[str, dict[str, JsonValue]]
    storage: dict[str, JsonValue]


class HistoryRow(_Answer):
    rev: int = Field(ge=0)
    ts: float
    value: JsonValue
    quality: Literal["GOOD", "UNCERTAIN", "BAD", "STALE"]
    source_ts: float | None
    reason: str | None
    downsampled: bool = Field(
        False,
        description="A stored bucket of history older than `storage.history_days` (rev 0, its "
        "mean or, for whole-number points, its last value), not a recorded change.",
    )


class HistoryAnswer(_Answer):
    """`GET /telemetry/query`: a point's recorded changes, oldest first."""

    point_id: str
    start: float
    end: float
    rows: list[HistoryRow]


class BucketRow(_Answer):
    start: float
    end: float
    count: int = Field(ge=0)
    min: JsonValue
    max: JsonValue
    mean: float | None
    last: JsonValue


class AggregateAnswer(_Answer):
    """`GET /telemetry/aggregate`: time buckets of one point."""

    point_id: str
    start: float
    end: float
    bucket_s: float
    buckets: list[BucketRow]


class ProposalsPage(_Answer):
    """`GET /proposals`: the newest first, on points the caller may read."""

    proposals: list[ProposalV1]
    hidden: int = Field(ge=0, description="Proposals on points the caller may not read.")


class DiffPage(_Answer):
    """`GET /diff`: committed events after `since`, in rev order."""

    since: str = Field(pattern=CURSOR_PATTERN)
    next_cursor: str = Field(pattern=CURSOR_PATTERN, description="`since` of the next page.")
    events: list[EventV1]


class Expired(_Answer):
    """410 Gone: the cursor is older than retention."""

    error: str
    log_start_cursor: str = Field(
        pattern=CURSOR_PATTERN, description="The oldest cursor still accepted."
    )
    twin: str = Field(description="Where to re-read the state: `/twin`.")
    hint: str


class IngestRejection(_Answer):
    index: int = Field(ge=0, description="Position of the item in `items`.")
    point: str | None = Field(description="The point the item names, if it names one.")
    error: str = Field(description="Why the item was not taken, naming the field.")


class IngestAnswer(_Answer):
    """`POST /telemetry/ingest`: what was taken, and why each other item was not."""

    accepted: int = Field(ge=0, description="Items ingested.")
    changed: int = Field(ge=0, description="Of those, the ones that changed the twin.")
    rejected: list[IngestRejection]
    rev: int = Field(ge=0, description="A committed rev at or after the batch.")


class SchemaEntry(_Answer):
    name: str
    id: str
    url: str


class SchemaIndex(_Answer):
    """`GET /schemas`."""

    schemas: list[SchemaEntry]


_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_OPENAPI_OBJECT: dict[str, Any] = {
    "type": "object",
    "required": ["openapi", "info", "paths"],
    "properties": {"openapi": {"type": "string", "pattern": "^3\\.1\\."}},
}
_SSE: dict[str, Any] = {"type": "string", "description": "`text/event-stream`: id/event/data."}


# -- the routes ----------------------------------------------------------------------------------

Body = type[BaseModel] | dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Answer:
    """One status's answer: why it comes, and its body (a model, a JSON Schema, or none)."""

    description: str
    body: Body = None
    media: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)  # name -> description
    # OpenAPI links: operationId -> its path parameter that takes this answer's `id`.
    links: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Operation:
    """One route as the document describes it."""

    name: str  # the manifest's endpoint name; also the operationId
    summary: str
    tag: str
    access: Access
    answers: Mapping[int, Answer]
    parameters: tuple[dict[str, Any], ...] = ()
    body: type[BaseModel] | None = None
    body_required: bool = True
    description: str = ""


def _query(name: str, schema: dict[str, Any], description: str, required: bool = False) -> dict:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema,
    }


def _path(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema,
    }


def _header(name: str, description: str) -> dict[str, Any]:
    schema = {"type": "string", "maxLength": 256}
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": schema,
    }


def _error(description: str, **headers: str) -> Answer:
    return Answer(description, ErrorBody, headers=headers)


_POINT_ID = {"type": "string", "minLength": 1, "maxLength": 256}
_EPOCH = {"type": "number"}
_PROPOSAL_ID = {"type": "string", "minLength": 1, "maxLength": 64}
_CURSOR = {"type": "string", "maxLength": 64}
_ETAG = {"ETag": '`"rev:N"`: the committed rev of the snapshot'}
_RETRY = {"Retry-After": "Seconds to wait before retrying."}

BAD_REQUEST = _error("The request is malformed; `error` names the field and what to send.")
NOT_FOUND = _error("No such point (or proposal, or schema).")
UNAVAILABLE = _error(
    "The gateway cannot answer now: its database cannot be read, its engine is starting or "
    "stopping, or a bound is reached; retry later.",
    **_RETRY,
)
TOO_LARGE = _error("The body is larger than the gateway takes.")
TOO_SLOW = _error("The body did not arrive within `http.body_timeout_s`.")
# What credentials can cost any route that reads them.
UNAUTHORIZED = _error(
    "No credentials, or refused ones (`WWW-Authenticate` names Bearer and Basic).",
    **{"WWW-Authenticate": "The schemes accepted."},
)
FORBIDDEN = _error("The credentials' grants do not allow this here.")
THROTTLED = _error("Too many refused logins from this address.", **_RETRY)
_AUTH_ANSWERS = {401: UNAUTHORIZED, 403: FORBIDDEN, 429: THROTTLED, 503: UNAVAILABLE}

# Where a proposal's id goes next (an agent, or a stateful fuzzer, follows these).
_PROPOSAL_LINKS = {
    "proposal": "id",
    "proposal_approve": "id",
    "proposal_reject": "id",
    "proposal_rollback": "id",
    "action": "id",
    "rollback": "action_id",
}
_TWIN_PARAMS = (_header("If-None-Match", '`"rev:N"` from an earlier `ETag`: 304 if unchanged.'),)
_RANGE_PARAMS = (
    _query("point", _POINT_ID, "The point id.", required=True),
    _query("start", _EPOCH, "Unix seconds; default: an hour before `end`."),
    _query("end", _EPOCH, "Unix seconds; default: now."),
)

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("GET", "/health"): Operation(
        "health",
        "Liveness, device states, and why the gateway is degraded if it is.",
        "service",
        "open",
        {200: Answer("Always 200 while the process runs; see `status`.", HealthAnswer)},
    ),
    ("GET", "/metrics"): Operation(
        "metrics",
        "The gateway's figures for Prometheus (devices, twin store, writer, decisions, sync, "
        "HTTP requests).",
        "service",
        "read",
        {
            200: Answer(
                "Prometheus' text exposition format.",
                {"type": "string"},
                media="text/plain",
            )
        },
    ),
    ("GET", "/.well-known/aiw-manifest.json"): Operation(
        "manifest",
        "The AIW manifest: endpoints, schemas, auth, limits.",
        "service",
        "open",
        {200: Answer("The manifest.", Manifest)},
    ),
    ("GET", "/openapi.json"): Operation(
        "openapi",
        "This document.",
        "service",
        "read",
        {200: Answer("OpenAPI 3.1.", _OPENAPI_OBJECT)},
    ),
    ("GET", "/schemas"): Operation(
        "schemas",
        "The JSON Schemas the gateway serves.",
        "service",
        "read",
        {200: Answer("Names, ids and URLs.", SchemaIndex)},
    ),
    ("GET", "/schemas/{name}"): Operation(
        "schema",
        "One JSON Schema 2020-12 document.",
        "service",
        "read",
        {200: Answer("The schema.", _ANY_OBJECT), 404: _error("No schema of that name.")},
        parameters=(_path("name", {"type": "string", "maxLength": 64}, "e.g. `twin.v1`."),),
    ),
    ("GET", "/twin"): Operation(
        "twin",
        "Every point's current value at one committed rev.",
        "twin",
        "read",
        {
            200: Answer("The snapshot.", TwinV1, headers=_ETAG),
            304: Answer("Unchanged since the `If-None-Match` rev.", None, headers=_ETAG),
        },
        parameters=_TWIN_PARAMS,
        description="When the database cannot commit, the values in memory are served without "
        "a rev, cursor or ETag, and `warning` says why (never a 503: operators need the values "
        "most when the disk fails).",
    ),
    ("GET", "/twin/{point_id}"): Operation(
        "twin_point",
        "One point's current value and metadata, with the twin's rev.",
        "twin",
        "read",
        {
            200: Answer("The point.", TwinPointAnswer, headers=_ETAG),
            304: Answer("Unchanged since the `If-None-Match` rev.", None, headers=_ETAG),
            404: NOT_FOUND,
        },
        parameters=(
            _path("point_id", _POINT_ID, "The point id (it contains `/`)."),
            *_TWIN_PARAMS,
        ),
    ),
    ("GET", "/diff"): Operation(
        "diff",
        "Committed events after a cursor, in rev order, one page at a time.",
        "events",
        "read",
        {
            200: Answer("A page; `next_cursor` is the `since` of the next one.", DiffPage),
            400: BAD_REQUEST,
            410: Answer(
                "The cursor is older than the event log keeps: re-read `/twin`, then follow "
                "`/diff` from its cursor.",
                Expired,
            ),
            503: UNAVAILABLE,
        },
        parameters=(
            _query(
                "since",
                _CURSOR,
                "A cursor from /twin, /diff or /subscribe (`cursor_000123`), or a rev; 0: from "
                "the oldest event kept. One ahead of the newest committed event is a 400.",
                required=True,
            ),
            _query(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": DIFF_MAX_LIMIT},
                f"Events per page; default {DIFF_LIMIT}.",
            ),
        ),
    ),
    ("GET", "/subscribe"): Operation(
        "subscribe",
        "Server-sent events: replays after the cursor, then goes live; heartbeats.",
        "events",
        "read",
        {
            200: Answer(
                "The stream; each event's `id:` is its cursor, `event:` its type, `data:` its "
                "event.v1 JSON. An expired cursor is one `expired` event (the 410 body of "
                "`/diff`), then the end; a database that cannot be read, one `error` event.",
                _SSE,
                "text/event-stream",
            ),
            400: BAD_REQUEST,
            503: _error(
                "`http.max_subscribers` streams are open, the gateway is shutting down, or its "
                "database cannot be read.",
                **_RETRY,
            ),
        },
        description="Starts after `Last-Event-ID`, else `since`, else the newest committed "
        "event (live only); replays the event log in pages, then reads it once per commit. "
        "A comment line every `http.sse_heartbeat_s` while nothing flows.",
        parameters=(
            _query("since", _CURSOR, "Resume after this cursor (`Last-Event-ID` wins)."),
            _header("Last-Event-ID", "The last event id received: resume after it."),
        ),
    ),
    ("POST", "/telemetry/ingest"): Operation(
        "telemetry_ingest",
        "Push values of points of `driver: http` devices.",
        "telemetry",
        "auth",
        {
            200: Answer(
                "Committed: `accepted` values (of which `changed` changed the twin) are on disk "
                "at `rev`; each other item is under `rejected` with why.",
                IngestAnswer,
            ),
            400: BAD_REQUEST,
            413: _error("The body is too large: send fewer items per request."),
            415: _error("The body is not `application/json`."),
            **_AUTH_ANSWERS,
            403: _error("The credentials' grants allow no ingest at all."),
            503: _error(
                "The twin cannot take or commit the values now; send them again later.", **_RETRY
            ),
        },
        body=TelemetryIngest,
        description="The envelope is checked first (400 for a malformed one); then each item: "
        "its schema, a point of an enabled `driver: http` device the caller may ingest to "
        "(RBAC `ingest`), a value of the point's datatype, a `source_ts` at most 5 minutes "
        "ahead. The items that pass are ingested as one batch, in order; the answer waits for "
        "their commit.",
    ),
    ("GET", "/telemetry/query"): Operation(
        "telemetry_query",
        "A point's recorded changes in [start, end], oldest first.",
        "telemetry",
        "read",
        {
            200: Answer("The rows.", HistoryAnswer),
            400: BAD_REQUEST,
            404: NOT_FOUND,
            503: UNAVAILABLE,
        },
        parameters=(
            *_RANGE_PARAMS,
            _query("limit", {"type": "integer", "minimum": 1}, "Rows at most; default 1000."),
        ),
    ),
    ("GET", "/telemetry/aggregate"): Operation(
        "telemetry_aggregate",
        "Time-bucket min, max, mean, last and count of one point.",
        "telemetry",
        "read",
        {
            200: Answer("The buckets.", AggregateAnswer),
            400: BAD_REQUEST,
            404: NOT_FOUND,
            503: UNAVAILABLE,
        },
        parameters=(
            *_RANGE_PARAMS,
            _query("bucket_s", {"type": "number"}, "Bucket width in seconds; default 60."),
        ),
    ),
    ("POST", "/sim/run"): Operation(
        "sim_run",
        "What-if: simulate setting a point, without writing anything.",
        "actions",
        "auth",
        {
            200: Answer("What the simulation found; nothing was written.", SimRunResult),
            400: BAD_REQUEST,
            404: NOT_FOUND,
            422: _error(
                "No enabled policy models the point, or the value is outside its range: "
                "there is nothing to simulate."
            ),
            **_AUTH_ANSWERS,
            503: _error(
                "Simulations are already running or waiting, or the engine is not running.",
                **_RETRY,
            ),
        },
        body=SimRunRequest,
        description="Runs the simulation of the policy that judges the point's proposals, as "
        "the gate would for a proposal of `value` (optionally over another horizon or number "
        "of paths), and records a `SimulationCompleted` event. Bounded: paths x steps at most "
        "the manifest's `limits.sim_max_work`.",
    ),
    ("POST", "/proposals"): Operation(
        "proposals",
        "Propose a setpoint change; the policy gate judges it.",
        "proposals",
        "auth",
        {
            201: Answer(
                "Judged: `status` says what the gate made of it.",
                ProposalV1,
                links=_PROPOSAL_LINKS,
            ),
            400: BAD_REQUEST,
            404: NOT_FOUND,
            **_AUTH_ANSWERS,
            403: _error("The caller may not propose on this point; `proposal` holds the record."),
        },
        body=ProposeBody,
    ),
    ("GET", "/proposals"): Operation(
        "proposals_list",
        "Recent proposals, newest first, on the points the caller may read.",
        "proposals",
        "auth",
        {200: Answer("The proposals.", ProposalsPage), 400: BAD_REQUEST, **_AUTH_ANSWERS},
        parameters=(
            _query("status", {"type": "string", "enum": list(LIST_STATUSES)}, "Only these."),
            _query(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": MAX_LIST},
                f"At most this many; default {DEFAULT_LIST}.",
            ),
        ),
    ),
    ("GET", "/proposals/{id}"): Operation(
        "proposal",
        "One proposal.",
        "proposals",
        "auth",
        {200: Answer("The proposal.", ProposalV1), 404: NOT_FOUND, **_AUTH_ANSWERS},
        parameters=(_path("id", _PROPOSAL_ID, "The proposal id."),),
    ),
    ("POST", "/proposals/{id}/approve"): Operation(
        "proposal_approve",
        "Approve a waiting proposal; it is executed before the answer.",
        "proposals",
        "auth",
        {
            200: Answer("The proposal after its execution.", ProposalV1),
            400: BAD_REQUEST,
            404: NOT_FOUND,
            409: _error("The proposal is not waiting for approval."),
            **_AUTH_ANSWERS,
        },
        parameters=(_path("id", _PROPOSAL_ID, "The proposal id."),),
        body=ApproveBody,
        body_required=False,
    ),
    ("POST", "/proposals/{id}/reject"): Operation(
        "proposal_reject",
        "Reject a waiting proposal.",
        "proposals",
        "auth",
        {
            200: Answer("The rejected proposal.", ProposalV1),
            400: BAD_REQUEST,
            404: NOT_FOUND,
            409: _error("The proposal is not waiting for approval."),
            **_AUTH_ANSWERS,
        },
        parameters=(_path("id", _PROPOSAL_ID, "The proposal id."),),
        body=RejectBody,
        body_required=False,
    ),
    ("POST", "/proposals/{id}/rollback"): Operation(
        "proposal_rollback",
        "Restore the value a succeeded change replaced.",
        "proposals",
        "auth",
        {
            200: Answer("The rolled-back proposal.", ProposalV1),
            400: BAD_REQUEST,
            404: NOT_FOUND,
            409: _error("Only a succeeded change rolls back."),
            502: _error("The device refused the rollback or read back another value."),
            **_AUTH_ANSWERS,
        },
        parameters=(_path("id", _PROPOSAL_ID, "The proposal id."),),
        body=RollbackBody,
        body_required=False,
    ),
    ("GET", "/actions"): Operation(
        "actions",
        "Executed changes, newest first.",
        "actions",
        "auth",
        {200: Answer("The actions.", ActionsPage), 400: BAD_REQUEST, **_AUTH_ANSWERS},
        parameters=(
            _query("status", {"type": "string", "enum": list(ACTION_STATUSES)}, "Only these."),
            _query(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": MAX_LIST},
                f"At most this many; default {DEFAULT_LIST}.",
            ),
        ),
        description="Proposals that reached the device: succeeded, rolled back, or failed "
        "after a write was attempted; on the points the caller may read (`hidden` counts the "
        "others).",
    ),
    ("GET", "/actions/{id}"): Operation(
        "action",
        "One executed change.",
        "actions",
        "auth",
        {
            200: Answer("The action.", ActionV1),
            404: _error("No such action (or a proposal that wrote nothing)."),
            **_AUTH_ANSWERS,
        },
        parameters=(_path("id", _PROPOSAL_ID, "The action's (proposal's) id."),),
    ),
    ("POST", "/rollback/{action_id}"): Operation(
        "rollback",
        "Roll back an executed change (as `POST /proposals/{id}/rollback`).",
        "actions",
        "auth",
        {
            200: Answer("The action, rolled back.", ActionV1),
            400: BAD_REQUEST,
            404: NOT_FOUND,
            409: _error("Only a succeeded change rolls back."),
            502: _error("The device refused the rollback or read back another value."),
            **_AUTH_ANSWERS,
        },
        parameters=(_path("action_id", _PROPOSAL_ID, "The action's (proposal's) id."),),
        body=RollbackBody,
        body_required=False,
    ),
}


# -- the router ----------------------------------------------------------------------------------


def served_routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) of every route `app` serves; aiohttp's automatic HEAD beside a
    GET is left out, a HEAD route of its own is not."""
    routes: set[tuple[str, str]] = set()
    for resource in app.router.resources():
        # The canonical form drops a variable's regex: `/twin/{point_id:.+}` is `/twin/{point_id}`.
        path = resource.canonical
        if is_ui_path(path):
            continue  # the web UI's pages are for browsers, not part of the API
        for route in resource:
            routes.add((route.method.upper(), path))
    return {(m, p) for m, p in routes if not (m == "HEAD" and ("GET", p) in routes)}


def undocumented_routes(app: web.Application) -> set[tuple[str, str]]:
    """Routes `app` serves that `OPERATIONS` does not describe (a test keeps this empty)."""
    return served_routes(app) - set(OPERATIONS)


# -- the documents -------------------------------------------------------------------------------


def build_openapi(app: web.Application, gateway: Gateway) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the routes `app` serves, for `gateway`'s config."""
    served = served_routes(app)
    operations = {key: op for key, op in OPERATIONS.items() if key in served}
    token_reads = gateway.config.http.read_access == "token"
    examples = _Examples.of(gateway)
    models = _models(operations.values())
    refs, defs = models_json_schema(
        [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
    )

    def body_schema(body: Body) -> dict[str, Any] | None:
        if body is None:
            return None
        if isinstance(body, dict):
            return body
        return refs[(body, "validation")]

    operation_ids = {op.name for op in operations.values()}
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), op in sorted(operations.items(), key=lambda item: item[0][::-1]):
        needs_token = op.access == "auth" or (op.access == "read" and token_reads)
        answers = dict(op.answers)
        if op.body is not None:
            # aiohttp's own, before any handler: a body too large, or too slow to arrive.
            answers.setdefault(413, TOO_LARGE)
            answers.setdefault(408, TOO_SLOW)
        if op.access == "read" and token_reads:
            answers = {**answers, **{k: v for k, v in _AUTH_ANSWERS.items() if k not in answers}}
        item: dict[str, Any] = {
            "operationId": op.name,
            "summary": op.summary,
            "tags": [op.tag],
            "responses": {
                str(status): _response(answer, body_schema(answer.body), operation_ids)
                for status, answer in sorted(answers.items())
            },
        }
        if op.description:
            item["description"] = op.description
        if op.parameters:
            item["parameters"] = [examples.parameter(p) for p in op.parameters]
        if op.body is not None:
            item["requestBody"] = {
                "required": op.body_required,
                "content": {
                    "application/json": {
                        "schema": body_schema(op.body),
                        **examples.body(op.body),
                    }
                },
            }
        item["security"] = _SECURITY if needs_token else []
        paths.setdefault(path, {})[method.lower()] = item

    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": f"OpsTwin Gateway {gateway.config.site_id}/{gateway.config.gateway_id}",
            "version": __version__,
            "description": (
                "The AIW protocol (v0.3) of one OpsTwin gateway: the twin, its events, history, "
                "ingest, simulation, proposals and actions. Every error is a JSON object "
                '`{"error": "..."}` saying what was wrong and what to do. Reads are '
                + ("token-only" if token_reads else "open")
                + " (`http.read_access`); writes and actions always need a bearer token or a "
                "user whose role allows them."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token (`opstwin token create`).",
                },
                "basic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "A user's name and password (`opstwin user add`).",
                },
            },
        },
    }


_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"basic": []}]


def _response(answer: Answer, schema: dict[str, Any] | None, served: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"description": answer.description}
    links = {
        target: {"operationId": target, "parameters": {parameter: "$response.body#/id"}}
        for target, parameter in answer.links.items()
        if target in served
    }
    if links:
        out["links"] = links
    if schema is not None:
        out["content"] = {answer.media: {"schema": schema}}
    if answer.headers:
        out["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in answer.headers.items()
        }
    return out


def _models(operations: Iterable[Operation]) -> list[type[BaseModel]]:
    found: dict[type[BaseModel], None] = {}
    for op in operations:
        if op.body is not None:
            found[op.body] = None
        for answer in op.answers.values():
            if isinstance(answer.body, type):
                found[answer.body] = None
    found[ErrorBody] = None
    return list(found)


@dataclass(frozen=True, slots=True)
class _Examples:
    """Real point ids of this gateway, so that an agent (or a fuzzer) has a valid start."""

    point: str | None
    writable: str | None
    writable_value: float | None
    pushed: str | None  # a point of a `driver: http` device

    @classmethod
    def of(cls, gateway: Gateway) -> _Examples:
        points = sorted(gateway.points.values(), key=lambda p: p.id)
        writable = next(
            (p for p in points if p.writable and p.lo is not None and p.hi is not None), None
        )
        value = None
        if writable is not None and writable.lo is not None and writable.hi is not None:
            value = (writable.lo + writable.hi) / 2
            if not math.isfinite(value):
                value = None
        http = {d.name for d in gateway.config.devices if d.driver == "http" and d.enabled}
        pushed = next((p.id for p in points if p.device in http), None)
        return cls(
            points[0].id if points else None,
            writable.id if writable else None,
            value,
            pushed,
        )

    def parameter(self, parameter: dict[str, Any]) -> dict[str, Any]:
        if parameter["name"] in ("point", "point_id") and self.point is not None:
            return {**parameter, "example": self.point}
        return parameter

    def body(self, model: type[BaseModel]) -> dict[str, Any]:
        example: dict[str, Any] | None = None
        if model is TelemetryIngest and self.pushed is not None:
            example = {"items": [{"point": self.pushed, "value": 1.0}]}
        elif self.writable is None or self.writable_value is None:
            return {}
        elif model is ProposeBody:
            example = {"point": self.writable, "value": self.writable_value, "reason": "example"}
        elif model is SimRunRequest:
            example = {"point": self.writable, "value": self.writable_value}
        return {} if example is None else {"example": example}


# -- the handlers --------------------------------------------------------------------------------

_OPENAPI = web.AppKey("aiw_openapi", dict)


def add_document_routes(app: web.Application, gateway_key: web.AppKey[Gateway]) -> None:
    """Register `/openapi.json`, the manifest and `/schemas` on `app`."""
    cache: dict[str, Any] = {}

    async def openapi(request: web.Request) -> web.Response:
        """The OpenAPI 3.1 document of every route served."""
        if "openapi" not in cache:
            cache["openapi"] = build_openapi(request.app, request.app[gateway_key])
        return web.json_response(cache["openapi"])

    async def manifest(request: web.Request) -> web.Response:
        """The AIW manifest."""
        if "manifest" not in cache:
            gateway = request.app[gateway_key]
            document = build_manifest(
                gateway.config, served_endpoints(request.app), _limits(gateway)
            )
            cache["manifest"] = document.model_dump(mode="json")
        return web.json_response(cache["manifest"])

    async def schema_index(request: web.Request) -> web.Response:
        """Every schema's name, id and URL."""
        entries = [
            {"name": name, "id": SCHEMA_BASE + name, "url": f"/schemas/{name}"} for name in SCHEMAS
        ]
        return web.json_response({"schemas": entries})

    async def schema(request: web.Request) -> web.Response:
        """One schema document; 404 naming the ones there are."""
        name = request.match_info["name"]
        if name not in SCHEMAS:
            return web.json_response(
                {
                    "error": f"no schema {name[:64]!r}; there are {', '.join(SCHEMAS)} "
                    "(`GET /schemas` lists them)"
                },
                status=404,
            )
        return web.json_response(schema_document(name))

    app.middlewares.append(json_errors)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/.well-known/aiw-manifest.json", manifest)
    app.router.add_get("/schemas", schema_index)
    app.router.add_get("/schemas/{name}", schema)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals as `{"error": ...}`, as the document promises for every error.

    aiohttp answers in text when no route matches (a point id with a newline matches no
    `{point_id:.+}`), for a method a route does not take, and for a body above the app's
    `client_max_size`; the handlers' own errors are JSON already and pass untouched, and an
    `HttpRefusal` a handler raises is answered here.
    """
    try:
        return await handler(request)
    except HttpRefusal as refusal:
        # Any handler may raise the AIW refusal; those with their own wrapper never get here.
        return refusal_answer(refusal)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json" or is_ui_path(request.path):
            raise  # the web UI answers its errors as pages (gateway/web/security.py)
        if exc.status == 404:
            message = (
                f"no route {request.method} {request.path[:200]!r}; GET /openapi.json lists them"
            )
        elif exc.status == 405:
            message = (
                f"{request.method} is not allowed on {request.path[:200]!r}; allowed: "
                f"{exc.headers.get('Allow', 'none')}"
            )
        else:
            message = exc.text or exc.reason
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in _ENTITY_HEADERS}
        return web.json_response({"error": message}, status=exc.status, headers=headers)


_ENTITY_HEADERS = frozenset({"content-type", "content-length"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def served_endpoints(app: web.Application) -> dict[str, str]:
    """Endpoint name → path template, for every described route `app` serves."""
    served = served_routes(app)
    return {
        op.name: path
        for (method, path), op in sorted(OPERATIONS.items(), key=lambda item: item[0][::-1])
        if (method, path) in served
    }


def _limits(gateway: Gateway) -> dict[str, float | int]:
    # Imported here, not at the top: gateway.http imports this module.
    from gateway.http import MAX_BUCKETS, MAX_HISTORY_ROWS

    http = gateway.config.http
    return {
        "diff_max_limit": DIFF_MAX_LIMIT,
        "diff_default_limit": DIFF_LIMIT,
        "ingest_max_items": MAX_INGEST_ITEMS,
        "ingest_max_bytes": MAX_INGEST_BYTES,
        "history_max_rows": MAX_HISTORY_ROWS,
        "aggregate_max_buckets": MAX_BUCKETS,
        "proposals_list_max": MAX_LIST,
        "sim_max_paths": MAX_SIM_PATHS,
        "sim_max_horizon_s": MAX_SIM_HORIZON_S,
        "sim_max_work": MAX_SIM_WORK,
        "max_subscribers": http.max_subscribers,
        "sse_heartbeat_s": http.sse_heartbeat_s,
        "max_connections": http.max_connections,
        "body_timeout_s": http.body_timeout_s,
    }
