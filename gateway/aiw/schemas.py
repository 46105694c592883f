"""The AIW JSON Schemas (DESIGN §5): pydantic models the code validates with, and their documents.

Each name the manifest lists (`telemetry.v1`, `anomaly.v1`, `policy.v1`, `proposal.v1`,
`action.v1`, `sim.v1`, `twin.v1`, `event.v1`) maps to one model in `SCHEMAS`;
`schema_document(name)` is that model's JSON Schema 2020-12 (`model_json_schema()`, which emits
2020-12), with `$schema` and an `$id` naming it. The same models are the request bodies and
response schemas of `/openapi.json` (gateway/aiw/openapi.py).

Request models (`TelemetryIngest`, `SimRunRequest`) are strict: unknown keys, strings for
numbers, NaN and infinities are refused, and every list is bounded — they guard the gateway.
Response models describe what the handlers send; they allow keys they do not name, so that an
answer may grow without breaking a client, but every key they name has its real type (a
schemathesis run checks every answer against them).

No I/O here: this module is a contract, imported by the handlers and by the document builders.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PlainValidator,
    WithJsonSchema,
    field_validator,
)

from gateway.config.model import NAME_PATTERN, POINT_ID_PATTERN
from gateway.policy.engine import Status
from gateway.policy.gate import DecisionKind
from gateway.policy.model import Policy

__all__ = [
    "CURSOR_PATTERN",
    "MAX_INGEST_ITEMS",
    "MAX_SIM_HORIZON_S",
    "MAX_SIM_PATHS",
    "SCHEMAS",
    "SCHEMA_BASE",
    "ActionV1",
    "ActionsPage",
    "AnomalyV1",
    "ErrorBody",
    "EventV1",
    "ProposalV1",
    "ProposerV1",
    "SimRunRequest",
    "SimRunResult",
    "TelemetryIngest",
    "TelemetryItem",
    "TwinPointAnswer",
    "TwinPointV1",
    "TwinV1",
    "schema_document",
    "schema_names",
]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
# `$id`s are URNs, not URLs of one gateway: the same document is served by every gateway, and a
# client that caches schemas by id must not fetch them per host.
SCHEMA_BASE = "urn:opstwin:aiw:schema:"
CURSOR_PATTERN = r"^(cursor_)?[0-9]{1,18}$"

MAX_INGEST_ITEMS = 10_000
MAX_TEXT = 4096  # a string point's value; longer is no telemetry
# /sim/run runs the judging policy's simulation in a worker thread: bounded so one request
# cannot hold a core for minutes (a policy's own `paths` default is 1,000; the oven's 10,000).
MAX_SIM_PATHS = 100_000
MAX_SIM_HORIZON_S = 7 * 24 * 3600.0

# The engine's and the gate's own vocabularies: a status or decision the engine gains shows up
# in the schemas (and the fuzzed OpenAPI document) without a second list to keep in step.
ProposalStatus = Status
QualityName = Literal["GOOD", "UNCERTAIN", "BAD", "STALE"]


class _Request(BaseModel):
    # strict: `"12"` or `true` for a number is refused, not coerced; JSON has no NaN, and 1e400
    # parses as infinity: both refused.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class _Answer(BaseModel):
    # What a handler sends: keys it does not name are allowed (answers grow), but not NaN, which
    # the handlers turn into null before sending.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


# -- telemetry.v1 --------------------------------------------------------------------------------


def _telemetry_value(value: Any) -> bool | int | float | str:
    # One sentence for every wrong value (a plain union would report each branch's complaint).
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise ValueError("an integer beyond 64 bits fits no point's datatype")
        return value  # an int64 point keeps every digit (a float would round it)
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, str) and len(value) <= MAX_TEXT:
        return value
    raise ValueError(
        f"a finite number, true/false or text up to {MAX_TEXT} characters, got {_kind(value)}"
    )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return "a number that is not finite"
    if isinstance(value, str):
        return f"text of {len(value)} characters"
    return {"list": "an array", "dict": "an object"}.get(type(value).__name__, "another type")


TelemetryValue = Annotated[
    bool | int | float | str,
    PlainValidator(_telemetry_value),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "boolean"},
                {"type": "number"},
                {"type": "string", "maxLength": MAX_TEXT},
            ]
        }
    ),
]


class TelemetryItem(_Request):
    """One value pushed for one point of an `http` device."""

    point: str = Field(
        pattern=POINT_ID_PATTERN, max_length=256, description="Point id (`area/line/asset/signal`)."
    )
    value: TelemetryValue = Field(
        description="The value: a finite JSON number (a numeric point), true/false (a `bool` "
        "point) or text (a `string` point, up to 4096 characters). Checked against the point's "
        "datatype and range by the gateway.",
    )
    quality: Literal["GOOD", "UNCERTAIN", "BAD"] = Field(
        "GOOD", description="The source's own judgement of the value; STALE is the gateway's."
    )
    source_ts: float | None = Field(
        None, ge=0, description="When the source measured it (Unix seconds); default: on arrival."
    )


class TelemetryIngest(_Request):
    """`POST /telemetry/ingest`: values pushed by a source without a driver."""

    items: list[TelemetryItem] = Field(
        min_length=1, max_length=MAX_INGEST_ITEMS, description="1 to 10,000 values."
    )


# -- anomaly.v1 ----------------------------------------------------------------------------------


class AnomalyV1(_Answer):
    """The `data` of an `AnomalyDetected` event (gateway/policy/anomaly.py `Anomaly`)."""

    kind: Literal["zscore", "ewma", "rate_of_change", "flatline", "out_of_range", "stale"] = Field(
        description="Which detector fired."
    )
    score: float = Field(ge=0, le=1, description="0..1; 0.5 at the detector's threshold.")
    ts: float = Field(description="When it fired (gateway clock, Unix seconds).")
    features: dict[str, float | str | None] = Field(
        description="The detector's measures (z, mean, sd, ...); a non-finite one as its name "
        "(`inf`), an unknown one null."
    )


# -- proposal.v1 ---------------------------------------------------------------------------------


class ProposerV1(_Answer):
    """Who proposed: a principal's name and kind."""

    name: str
    kind: Literal["user", "token", "policy", "opcua"]


class ProposalV1(_Answer):
    """A proposal and everything that happened to it (`ProposalRecord.to_json()`)."""

    id: str = Field(description="The proposal's id, also its correlation id in events and audit.")
    point: str
    value: JsonValue = Field(description="The proposed value (a number unless a client erred).")
    current_value: JsonValue = Field(description="The point's value when it was proposed.")
    proposer: ProposerV1
    policy: str | None = Field(description="The policy that proposed it, if one did.")
    judged_by: str | None = Field(description="The policy whose simulation judged it.")
    source: str = Field(description="policy, http, cli, opcua, mqtt, ...")
    reason: str
    idempotency_key: str
    status: ProposalStatus
    created_ts: float
    decision: DecisionKind | None
    reasons: list[str] = Field(description="Why the gate decided as it did.")
    checked: list[str] = Field(description="The checks the gate made.")
    confidence: float | None = Field(ge=0, le=1)
    confidence_breakdown: dict[str, float | None] | None
    simulation: dict[str, JsonValue] | None = Field(description="The simulation's figures.")
    expires_ts: float | None
    previous_value: JsonValue = Field(description="The value the write replaced.")
    read_back: JsonValue = Field(description="The value read back after the write.")
    error: str | None
    restored: str | None
    approver: str | None
    finished_ts: float | None
    timings_ms: dict[str, float | None]


# -- action.v1 -----------------------------------------------------------------------------------


class ActionV1(_Answer):
    """An executed (or executing) change: a proposal that reached the device, as `/actions` lists
    it. Built from a `ProposalRecord` by `from_record`, the one mapping."""

    id: str = Field(description="The proposal's id; `POST /rollback/{id}` undoes it.")
    point: str
    value: JsonValue = Field(description="The value written.")
    previous_value: JsonValue = Field(description="The value it replaced (what a rollback writes).")
    read_back: JsonValue = Field(description="The value the device reported after the write.")
    status: Literal["executing", "succeeded", "failed", "rolled_back"]
    verified: bool = Field(description="The device read back the value written.")
    rolled_back: bool
    proposer: ProposerV1
    approver: str | None
    policy: str | None
    reason: str
    created_ts: float = Field(description="When it was proposed.")
    executed_ts: float | None = Field(description="When the write finished (or the rollback).")
    error: str | None
    restored: str | None = Field(description="What a failed write's restore, or a rollback, did.")

    @classmethod
    def from_record(cls, record: Any) -> ActionV1:
        """The action of a `gateway.policy.engine.ProposalRecord` that reached the device."""
        data = record.to_json()
        status = data["status"]
        return cls(
            id=data["id"],
            point=data["point"],
            value=data["value"],
            previous_value=_json_safe(data["previous_value"]),
            read_back=data["read_back"],
            status=status,
            verified=status in ("succeeded", "rolled_back") and data["read_back"] is not None,
            rolled_back=status == "rolled_back",
            proposer=ProposerV1(**data["proposer"]),
            approver=data["approver"],
            policy=data["policy"],
            reason=data["reason"],
            created_ts=data["created_ts"],
            executed_ts=data["finished_ts"],
            error=data["error"],
            restored=data["restored"],
        )


class ActionsPage(_Answer):
    """`GET /actions`: executed actions, newest first, on the points the caller may read."""

    actions: list[ActionV1]
    hidden: int = Field(ge=0, description="Actions on points the caller may not read.")


# -- sim.v1 --------------------------------------------------------------------------------------


class SimRunRequest(_Request):
    """`POST /sim/run`: what would happen if `point` were set to `value` (nothing is written)."""

    point: str = Field(pattern=POINT_ID_PATTERN, max_length=256, description="A writable point.")
    value: float = Field(description="The value to try: a finite JSON number.")
    horizon_s: float | None = Field(
        None,
        gt=0,
        le=MAX_SIM_HORIZON_S,
        description="Prediction horizon in seconds; default: the judging policy's.",
    )
    paths: int | None = Field(
        None,
        ge=1,
        le=MAX_SIM_PATHS,
        description="Monte Carlo paths; default: the judging policy's.",
    )

    @field_validator("paths", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        # JSON Schema counts 10.0 as an integer: a client the document lets through is served.
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value


class ConstraintOutcome(_Answer):
    output: str
    kind: Literal["upper", "lower"]
    limit: float
    violation_probability: float | None = Field(ge=0, le=1)
    first_violation_s: dict[str, float | None] | None = Field(
        description="Seconds to the first violation on the paths that violate it (p5, p50, "
        "p95, mean); null when none does."
    )


class Percentiles(_Answer):
    p5: float | None
    p50: float | None
    p95: float | None
    mean: float | None


class Trajectory(_Answer):
    times: list[float | None] = Field(description="Seconds from now.")
    outputs: dict[str, dict[str, list[float | None]]] = Field(
        description="Per output, per percentile (`p5`, `p50`, ...): the values at `times`."
    )


class SimRunResult(_Answer):
    """What the simulation of a `SimRunRequest` found (the figures the gate would judge by)."""

    point: str
    value: float
    current_value: JsonValue = Field(description="The point's value now.")
    policy: str | None = Field(description="The policy whose model simulated it; none: no model.")
    model: str | None = Field(None, description="The model's kind (fopdt, tank, ...).")
    horizon_s: float | None = None
    paths: int = Field(ge=0, description="Paths run.")
    paths_safe: int = Field(ge=0, description="Paths on which every safety constraint held.")
    paths_ok: int = Field(ge=0, description="Paths safe and with the objective improved.")
    p_success: float = Field(ge=0, le=1, description="paths_ok / paths (0 with no paths).")
    violation_probability: list[float | None] = Field(
        default_factory=list, description="Per safety constraint, the share of paths violating it."
    )
    objective_now: float | None = None
    objective_median: float | None = None
    seed: int | None = None
    error: str | None = Field(None, description="Why there is no simulation, or why it failed.")
    dt_s: float | None = Field(None, description="The model's step, in seconds.")
    elapsed_ms: float | None = Field(None, ge=0, description="How long the simulation took.")
    written: Literal[False] = Field(False, description="Always false: nothing is written.")
    constraints: list[ConstraintOutcome] | None = Field(
        None, description="Each safety constraint: how likely it is violated, and how soon."
    )
    kpis: dict[str, dict[str, Percentiles]] | None = Field(
        None, description="Per output, per path statistic (final, mean, max, min): percentiles."
    )
    trajectory: Trajectory | None = Field(
        None, description="The fan chart: per output, percentiles of the value over time."
    )


# -- twin.v1 -------------------------------------------------------------------------------------


class RangeV1(_Answer):
    lo: float | None
    hi: float | None


class TwinPointV1(_Answer):
    """One point's current value and metadata, as `/twin` lists it."""

    id: str
    value: JsonValue = Field(description="null while unknown, or when not finite.")
    quality: QualityName
    reason: str | None = Field(description="Why the quality is not GOOD.")
    source_ts: float | None
    gateway_ts: float | None
    rev: int = Field(ge=0, description="The rev of the point's last change.")
    unit: str
    range: RangeV1 | None
    writable: bool
    datatype: str
    device: str
    description: str


class TwinPointAnswer(TwinPointV1):
    """`GET /twin/{point}`: one point, and the committed rev of the snapshot it was read from."""

    twin_rev: int | None = Field(
        ge=0, description="The snapshot's committed rev; null: the database is not committing."
    )
    cursor: str | None = Field(
        pattern=CURSOR_PATTERN, description="Follow `/diff` from here to see what changes next."
    )
    warning: str | None = Field(None, description="Why there is no rev, when there is none.")


class TwinV1(_Answer):
    """`GET /twin`: every point at one committed rev (the `ETag` is `"rev:N"`).

    When the database cannot commit, the values in memory are served without a rev, a cursor or
    an ETag, and `warning` says why.
    """

    site_id: str = Field(pattern=NAME_PATTERN)
    gateway_id: str = Field(pattern=NAME_PATTERN)
    rev: int | None = Field(ge=0, description="The committed rev of the snapshot.")
    cursor: str | None = Field(
        pattern=CURSOR_PATTERN, description="Follow `/diff` from here to see what changes next."
    )
    points: dict[str, TwinPointV1]
    warning: str | None = Field(None, description="Why there is no rev, when there is none.")


# -- event.v1 ------------------------------------------------------------------------------------


class EventV1(_Answer):
    """One event as `/diff`, `/subscribe` and MQTT diffs send it (gateway/aiw/events.py)."""

    id: str = Field(pattern=CURSOR_PATTERN, description="The event's cursor.")
    rev: int = Field(ge=0)
    type: str = Field(description="TelemetryChanged, AnomalyDetected, ProposalCreated, ...")
    ts: float
    twin_id: str = Field(description="`site_id/gateway_id`.")
    asset_id: str | None
    point_id: str | None
    data: dict[str, JsonValue]


# -- errors --------------------------------------------------------------------------------------


class ErrorBody(_Answer):
    """Every 4xx/5xx answer: one sentence saying what was wrong and what to do."""

    error: str


# -- the registry --------------------------------------------------------------------------------

SCHEMAS: dict[str, type[BaseModel]] = {
    "telemetry.v1": TelemetryIngest,
    "anomaly.v1": AnomalyV1,
    "policy.v1": Policy,
    "proposal.v1": ProposalV1,
    "action.v1": ActionV1,
    "sim.v1": SimRunRequest,
    "twin.v1": TwinV1,
    "event.v1": EventV1,
}
# sim.v1 is a pair: the request, and the result under `$defs` (one document per name).
_COMPANIONS: dict[str, dict[str, type[BaseModel]]] = {
    "telemetry.v1": {"TelemetryItem": TelemetryItem},
    "sim.v1": {"SimRunResult": SimRunResult},
}


def schema_names() -> list[str]:
    """Every schema name, in the manifest's order."""
    return list(SCHEMAS)


def schema_document(name: str) -> dict[str, Any]:
    """The JSON Schema 2020-12 document of schema `name`; KeyError if there is none."""
    model = SCHEMAS[name]
    document = model.model_json_schema(mode="validation")
    defs = document.setdefault("$defs", {})
    for title, companion in _COMPANIONS.get(name, {}).items():
        extra = companion.model_json_schema(mode="validation", ref_template="#/$defs/{model}")
        defs.update(extra.pop("$defs", {}))
        defs.setdefault(title, extra)
    if not defs:
        del document["$defs"]
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": SCHEMA_BASE + name, **document}


def _json_safe(value: Any) -> Any:
    # previous_value comes from the device as read: NaN and infinities are no JSON numbers.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
