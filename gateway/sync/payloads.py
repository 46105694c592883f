"""The MQTT contract of the cloud sync as pure functions: topics, payload builders and parsers.

Nothing here does I/O, so the gateway's sync (`service.py`), the reference mirror and the tests
share one reading of the wire format (DESIGN §6):

- topics `{prefix}/{site_id}/{gateway_id}/{leaf}`, leaves `birth`, `diff`, `state`,
  `cmd/rebirth`, `cmd/proposal`, `reply/proposal`;
- `birth`: `{session, rev, ts, twin_id, site_id, gateway_id, version, points}`, the committed
  snapshot at `rev`;
- `diff`: `{session, from_rev, to_rev, historical, events}`, events as `gateway.aiw.events`
  shapes them, in rev order; consecutive diffs chain (`from_rev == previous to_rev + 1`);
- `state`: `{state: online|offline, session, ts}`, retained;
- `cmd/proposal`: `{request_id, token, point, value, reason}` in, `reply/proposal`:
  `{request_id, ok, proposal}` or `{request_id, ok: false, error}` out.

Parsers raise PayloadError naming the field that is wrong; they never raise anything else on
hostile bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.aiw.events import dumps, event_json, twin_id
from gateway.twin.model import EventRecord, PointDef, PointValue

__all__ = [
    "LEAVES",
    "MAX_COMMAND_BYTES",
    "Birth",
    "Diff",
    "PayloadError",
    "ProposalCommand",
    "ProposalReply",
    "State",
    "Topics",
    "birth_payload",
    "diff_payload",
    "parse_birth",
    "parse_diff",
    "parse_proposal_command",
    "parse_proposal_reply",
    "parse_state",
    "plan_diff",
    "proposal_reply",
    "split_topic",
    "state_payload",
    "subscription",
]

LEAVES = ("birth", "diff", "state", "cmd/rebirth", "cmd/proposal", "reply/proposal")
# Inbound commands above this size are refused unread: a proposal is a few hundred bytes, and
# a broker that lets anyone publish must not make us parse megabytes.
MAX_COMMAND_BYTES = 64 * 1024
MAX_REQUEST_ID = 128
MAX_TOKEN = 512
MAX_POINT = 256
MAX_REASON = 2000

_TOPIC_FORBIDDEN = ("+", "#", "\x00")


class PayloadError(ValueError):
    """A payload that does not follow the contract; `request_id` when one could be read."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


# -- topics ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics of one gateway: `{prefix}/{site_id}/{gateway_id}/{leaf}`."""

    prefix: str
    site_id: str
    gateway_id: str

    def __post_init__(self) -> None:
        for name in ("prefix", "site_id", "gateway_id"):
            value = getattr(self, name)
            if not value or any(c in value for c in _TOPIC_FORBIDDEN):
                raise ValueError(f"{name} {value!r} cannot be part of an MQTT topic")
            if name != "prefix" and "/" in value:
                raise ValueError(f"{name} {value!r} must not contain '/'")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.site_id}/{self.gateway_id}"

    def leaf(self, leaf: str) -> str:
        """The full topic of `leaf` (one of LEAVES)."""
        return f"{self.base}/{leaf}"

    @property
    def birth(self) -> str:
        return self.leaf("birth")

    @property
    def diff(self) -> str:
        return self.leaf("diff")

    @property
    def state(self) -> str:
        return self.leaf("state")

    @property
    def cmd_rebirth(self) -> str:
        return self.leaf("cmd/rebirth")

    @property
    def cmd_proposal(self) -> str:
        return self.leaf("cmd/proposal")

    @property
    def reply_proposal(self) -> str:
        return self.leaf("reply/proposal")


def subscription(prefix: str) -> str:
    """The topic filter a cloud consumer subscribes to for every gateway under `prefix`."""
    return f"{prefix}/+/+/#"


def split_topic(topic: str, prefix: str) -> tuple[str, str, str] | None:
    """`(site_id, gateway_id, leaf)` of a topic under `prefix`, or None when it is not one."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head) :].split("/", 2)
    if len(parts) != 3 or not parts[0] or not parts[1] or parts[2] not in LEAVES:
        return None
    return parts[0], parts[1], parts[2]


# -- builders -------------------------------------------------------------------------------------


def birth_payload(
    *,
    session: str,
    rev: int,
    ts: float,
    site_id: str,
    gateway_id: str,
    version: str,
    values: Mapping[str, PointValue],
    points: Mapping[str, PointDef],
) -> bytes:
    """The birth message: every point's committed value at `rev`, with unit and datatype."""
    out: dict[str, dict[str, Any]] = {}
    for point_id, value in values.items():
        point = points.get(point_id)
        out[point_id] = {
            "value": value.value,
            "quality": str(value.quality),
            "source_ts": value.source_ts,
            "gateway_ts": value.gateway_ts,
            "rev": value.rev,
            "reason": value.reason,
            "unit": point.unit if point is not None else "",
            "datatype": point.datatype if point is not None else None,
        }
    return dumps(
        {
            "session": session,
            "rev": rev,
            "ts": ts,
            "twin_id": twin_id(site_id, gateway_id),
            "site_id": site_id,
            "gateway_id": gateway_id,
            "version": version,
            "points": out,
        }
    )


def plan_diff(
    events: list[EventRecord], sent_to: int, birth_rev: int
) -> tuple[list[EventRecord], int, bool]:
    """The next diff's `(events, to_rev, historical)` from events read after `sent_to`.

    Events at or below the session's birth rev are backlog (`historical`); a diff never mixes
    them with live ones: a backlog diff that reaches past the birth is cut there, and ends at
    `to_rev = birth_rev` (the next diff then starts at `birth_rev + 1`), events or not.
    """
    historical = sent_to < birth_rev
    to_rev = events[-1].rev if events else sent_to
    if historical and to_rev > birth_rev:
        return [event for event in events if event.rev <= birth_rev], birth_rev, True
    return events, to_rev, historical


def diff_payload(
    *,
    session: str,
    from_rev: int,
    to_rev: int,
    historical: bool,
    events: Iterable[EventRecord],
    twin: str,
) -> bytes:
    """One diff message; the whole batch is encoded by one `dumps` call (the hot path)."""
    return dumps(
        {
            "session": session,
            "from_rev": from_rev,
            "to_rev": to_rev,
            "historical": historical,
            "events": [event_json(event, twin) for event in events],
        }
    )


def state_payload(state: str, session: str, ts: float) -> bytes:
    """The retained `state` message (`online`, or `offline` as the Last Will and on stop)."""
    if state not in ("online", "offline"):
        raise ValueError(f"state must be online or offline, not {state!r}")
    return dumps({"state": state, "session": session, "ts": ts})


def proposal_reply(
    request_id: str | None,
    *,
    proposal: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> bytes:
    """A `reply/proposal` message: ok with the proposal, or not ok with an error sentence.

    An error with a proposal is a proposal the gate recorded as refused (no grant): it has an id
    the cloud can quote.
    """
    body: dict[str, Any] = {"request_id": request_id, "ok": error is None}
    if proposal is not None:
        body["proposal"] = proposal
    if error is not None:
        body["error"] = error
    return dumps(body)


# -- parsers --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Birth:
    session: str
    rev: int
    ts: float
    twin_id: str
    site_id: str
    gateway_id: str
    version: str
    points: dict[str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Diff:
    session: str
    from_rev: int
    to_rev: int
    historical: bool
    events: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class State:
    state: str
    session: str
    ts: float


class ProposalCommand(BaseModel):
    """A `cmd/proposal` message: a change proposed from the cloud, with the proposer's token."""

    # strict: `value: "12"` or `true` is refused, not coerced (as over HTTP); no NaN in JSON.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    request_id: str = Field(
        min_length=1, max_length=MAX_REQUEST_ID, description="Echoed in the reply."
    )
    token: str = Field(min_length=1, max_length=MAX_TOKEN, description="An API token (otw_...).")
    point: str = Field(min_length=1, max_length=MAX_POINT, description="Point id.")
    value: float = Field(description="The new value: a JSON number.")
    reason: str = Field(min_length=1, max_length=MAX_REASON, description="Why, in words.")

    @field_validator("reason")
    @classmethod
    def _says_something(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("say why the change is needed; the audit log keeps it")
        return value


@dataclass(frozen=True, slots=True)
class ProposalReply:
    request_id: str | None
    ok: bool
    proposal: dict[str, Any] | None
    error: str | None


def parse_birth(data: bytes) -> Birth:
    """A birth message; PayloadError naming the field that is wrong."""
    body = _object(data, "birth")
    points = body.get("points")
    if not isinstance(points, dict) or not all(isinstance(v, dict) for v in points.values()):
        raise PayloadError("birth: `points` must be an object of point objects")
    return Birth(
        session=_str(body, "session", "birth"),
        rev=_rev(body, "rev", "birth"),
        ts=_number(body, "ts", "birth"),
        twin_id=_str(body, "twin_id", "birth"),
        site_id=_str(body, "site_id", "birth"),
        gateway_id=_str(body, "gateway_id", "birth"),
        version=_str(body, "version", "birth"),
        points=points,
    )


def parse_diff(data: bytes) -> Diff:
    """A diff message; PayloadError naming the field that is wrong (events are checked for
    shape and order, not for every field: a mirror reads them at 50,000 a second)."""
    body = _object(data, "diff")
    from_rev = _rev(body, "from_rev", "diff")
    to_rev = _rev(body, "to_rev", "diff")
    if to_rev < from_rev:
        raise PayloadError(f"diff: to_rev {to_rev} is below from_rev {from_rev}")
    historical = body.get("historical")
    if not isinstance(historical, bool):
        raise PayloadError("diff: `historical` must be true or false")
    events = body.get("events")
    if not isinstance(events, list):
        raise PayloadError("diff: `events` must be a list")
    last = from_rev - 1
    for index, event in enumerate(events):
        rev = event.get("rev") if isinstance(event, dict) else None
        if type(rev) is not int or not last < rev <= to_rev:
            raise PayloadError(
                f"diff: events[{index}] must be an event with a rev above {last} and at most "
                f"to_rev {to_rev}"
            )
        last = rev
    return Diff(_str(body, "session", "diff"), from_rev, to_rev, historical, events)


def parse_state(data: bytes) -> State:
    """A state message; PayloadError naming the field that is wrong."""
    body = _object(data, "state")
    state = body.get("state")
    if state not in ("online", "offline"):
        raise PayloadError("state: `state` must be online or offline")
    return State(state, _str(body, "session", "state"), _number(body, "ts", "state"))


def parse_proposal_command(data: bytes) -> ProposalCommand:
    """A `cmd/proposal` message; PayloadError naming the field, with the request id when the
    payload had a usable one (so that the error reply can name the request)."""
    if len(data) > MAX_COMMAND_BYTES:
        raise PayloadError(f"proposal: payload of {len(data)} bytes exceeds {MAX_COMMAND_BYTES}")
    body = _object(data, "proposal")
    request_id = body.get("request_id")
    rid = (
        request_id
        if isinstance(request_id, str) and 0 < len(request_id) <= MAX_REQUEST_ID
        else None
    )
    try:
        return ProposalCommand.model_validate(body)
    except ValidationError as exc:
        raise PayloadError(f"proposal: {_problem(exc)}", rid) from None


def parse_proposal_reply(data: bytes) -> ProposalReply:
    """A `reply/proposal` message; PayloadError naming the field that is wrong."""
    body = _object(data, "reply")
    request_id = body.get("request_id")
    if request_id is not None and not isinstance(request_id, str):
        raise PayloadError("reply: `request_id` must be a string or null")
    ok = body.get("ok")
    if not isinstance(ok, bool):
        raise PayloadError("reply: `ok` must be true or false")
    proposal = body.get("proposal")
    if proposal is not None and not isinstance(proposal, dict):
        raise PayloadError("reply: `proposal` must be an object")
    error = body.get("error")
    if (error is None) == (not ok) or (error is not None and not isinstance(error, str)):
        raise PayloadError("reply: `error` must be a string exactly when `ok` is false")
    return ProposalReply(request_id, ok, proposal, error)


# -- helpers --------------------------------------------------------------------------------------


def _object(data: bytes, what: str) -> dict[str, Any]:
    try:
        body = orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError):
        raise PayloadError(f"{what}: payload is not JSON") from None
    if not isinstance(body, dict):
        raise PayloadError(f"{what}: payload must be a JSON object")
    return body


def _problem(exc: ValidationError) -> str:
    """The first problem pydantic found, naming the field (`value`: must be a number)."""
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "payload"
    if error["type"] == "extra_forbidden":
        return f"unknown field `{where}`"
    return f"`{where}`: {error['msg']}"


def _str(body: Mapping[str, Any], key: str, what: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise PayloadError(f"{what}: `{key}` must be a string")
    return value


def _rev(body: Mapping[str, Any], key: str, what: str) -> int:
    value = body.get(key)
    if type(value) is not int or value < 0:
        raise PayloadError(f"{what}: `{key}` must be a non-negative integer")
    return value


def _number(body: Mapping[str, Any], key: str, what: str) -> float:
    value: Any = body.get(key)
    if type(value) not in (int, float):
        raise PayloadError(f"{what}: `{key}` must be a number")
    return float(value)
