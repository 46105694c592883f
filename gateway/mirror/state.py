"""The cloud mirror's state machine: each gateway's twin rebuilt from MQTT births and diffs.

Pure: no I/O and no clock of its own (callers pass `now`). It takes topics and payload bytes as
they come off the broker, reads them with the sync's own parsers (`gateway/sync/payloads.py`:
one reading of the wire format), checks the fields it relies on beyond those, and returns
`Notice`s: what happened (a birth, a gap, a state change, a malformed payload) and, as `REBIRTH`
notices, the `cmd/rebirth` requests the caller must publish. The contract is DESIGN §6: births
carry the committed snapshot at rev R, diffs committed events, `from_rev == previous to_rev + 1`.

Revs are the gateway's committed revs, so a rev names the same event in every session and after
any crash of the gateway. The mirror therefore reasons on revs alone, never on session ids:
- `covered_rev`: every change up to it is in the mirrored state (from births and diffs);
- `events_rev`: the newest event in the mirror's event history.
A diff whose `from_rev` is above `covered_rev + 1` means changes were lost: a GAP, which asks for a
rebirth. A diff with nothing above `events_rev` is a duplicate (a resend after a lost PUBACK).
Otherwise its new events go to the history and each `TelemetryChanged` newer than the point's
current rev updates the point. A birth replaces the points, keeping any point the mirror already
holds at a rev above the birth's (a diff published just before the birth can carry newer
changes than its snapshot). Only a birth from a NEW session below `covered_rev` means the
gateway's log went backwards (a restored database, commits lost to power failure): the mirror
then starts over from that birth and reports a RESET.

Diffs that arrive while a rebirth is awaited are kept (bounded) and replayed after the birth:
dropping them would leave changes newer than the birth out, and ask for yet another rebirth.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gateway.sync.payloads import (
    Birth,
    Diff,
    PayloadError,
    State,
    parse_birth,
    parse_diff,
    parse_state,
    split_topic,
)

__all__ = [
    "GatewayMirror",
    "Kind",
    "MirrorState",
    "Notice",
    "PayloadError",
    "decode_birth",
    "decode_diff",
    "decode_state",
    "rev_order",
]

TELEMETRY = "TelemetryChanged"
# A mirrored point: the gateway's `/twin` point fields the sync carries.
POINT_KEYS = ("value", "quality", "source_ts", "gateway_ts", "rev", "reason", "unit", "datatype")
LEAVES = ("birth", "diff", "state")  # what the mirror reads; other leaves are commands
# A birth of 20,000 points is a few MB; a payload far above that is an attack or a bug.
MAX_PAYLOAD = 32 * 1024 * 1024
# Diffs kept while a rebirth is awaited, counted in events; above it they are dropped (the
# birth that comes repairs the state; a gap after it asks again).
MAX_PENDING_EVENTS = 200_000
# Events kept per gateway in the history (oldest dropped first).
HISTORY_EVENTS = 100_000
# How long to wait for a requested birth before asking again.
REBIRTH_RETRY_S = 10.0


class Kind(StrEnum):
    """What a notice reports."""

    BIRTH = "birth"
    GAP = "gap"
    REBIRTH = "rebirth"  # publish `{prefix}/{site}/{gateway}/cmd/rebirth` now
    STATE = "state"  # online/offline transition
    RESET = "reset"  # the gateway's revs went backwards: the mirror started over
    MALFORMED = "malformed"  # a payload that is not what the contract says; dropped


@dataclass(frozen=True, slots=True)
class Notice:
    """One thing the caller should print, count or do."""

    kind: Kind
    site_id: str
    gateway_id: str
    detail: dict[str, Any] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        """The notice as one JSON object (the CLI's `--json` line)."""
        return {
            "kind": str(self.kind),
            "site_id": self.site_id,
            "gateway_id": self.gateway_id,
            **self.detail,
        }


# -- checking what the shared parsers leave to the consumer ------------------------------------


def decode_birth(payload: bytes, max_payload: int = MAX_PAYLOAD) -> Birth:
    """A birth whose every point has what the mirror reads (`rev`, `quality`, times), each
    point reduced to the mirror's point shape (missing optional fields are null)."""
    birth = parse_birth(_bounded(payload, max_payload))
    points: dict[str, dict[str, Any]] = {}
    for point_id, point in birth.points.items():
        where = f"birth: `points.{_short(point_id)}"
        rev = point.get("rev")
        if type(rev) is not int or rev < 0:
            raise PayloadError(f"{where}.rev` must be a non-negative integer")
        if not isinstance(point.get("quality"), str):
            raise PayloadError(f"{where}.quality` must be a string")
        for key in ("source_ts", "gateway_ts"):
            if not _number_or_none(point.get(key)):
                raise PayloadError(f"{where}.{key}` must be a finite number or null")
        for key in ("reason", "unit", "datatype"):
            if not isinstance(point.get(key), str | None):
                raise PayloadError(f"{where}.{key}` must be a string or null")
        points[point_id] = {key: point.get(key) for key in POINT_KEYS}
    return dataclasses.replace(birth, points=points)


def decode_diff(payload: bytes, max_payload: int = MAX_PAYLOAD) -> Diff:
    """A diff whose events have what the mirror reads; the shared parser checked their order."""
    diff = parse_diff(_bounded(payload, max_payload))
    # The hot path of a mirror at tens of thousands of changes a second: exact type checks, no
    # calls. orjson (the shared parser) never yields NaN or infinity, so a number is finite.
    number = _NUMBER
    for index, event in enumerate(diff.events):
        data = event.get("data")
        ts = event.get("ts")
        if type(data) is not dict or (ts is not None and type(ts) not in number):
            raise PayloadError(
                f"diff: events[{index}] needs an object `data` and a number or null `ts`"
            )
        kind = event.get("type")
        if kind == TELEMETRY:
            source_ts = data.get("source_ts")
            if (
                type(event.get("point_id")) is not str
                or type(data.get("quality")) is not str
                or (source_ts is not None and type(source_ts) not in number)
            ):
                raise PayloadError(
                    f"diff: events[{index}] is a {TELEMETRY} without a string `point_id`, a "
                    "string `data.quality` and a number or null `data.source_ts`"
                )
        elif type(kind) is not str:
            raise PayloadError(f"diff: events[{index}].type must be a string")
    return diff


def decode_state(payload: bytes, max_payload: int = MAX_PAYLOAD) -> State:
    """A state message."""
    return parse_state(_bounded(payload, max_payload))


def _bounded(payload: bytes, max_payload: int) -> bytes:
    if len(payload) > max_payload:
        raise PayloadError(f"payload of {len(payload)} bytes is above the {max_payload} limit")
    return payload


_NUMBER = (int, float)


def _number_or_none(value: Any) -> bool:
    if value is None:
        return True
    return type(value) in (int, float) and math.isfinite(value)


def _short(value: object, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- one gateway ----------------------------------------------------------------------------------


class GatewayMirror:
    """The mirrored twin of one gateway, and the counters that show how it was kept."""

    def __init__(
        self,
        site_id: str,
        gateway_id: str,
        *,
        history_events: int = HISTORY_EVENTS,
        max_pending_events: int = MAX_PENDING_EVENTS,
        rebirth_retry_s: float = REBIRTH_RETRY_S,
    ) -> None:
        self.site_id = site_id
        self.gateway_id = gateway_id
        self.points: dict[str, dict[str, Any]] = {}
        self.session: str | None = None  # of the newest birth
        self.state_rev: int | None = None  # rev of the newest birth
        self.covered_rev: int | None = None  # the state holds every change up to here
        self.events_rev: int | None = None  # newest event in the history
        self.online: bool | None = None
        self.awaiting = False  # a rebirth was asked for; diffs are held until it comes
        self.history: deque[dict[str, Any]] = deque(maxlen=history_events)
        # (first, last) revs the history has no events for though the state covers them: the
        # changes reached the mirror only through a birth.
        self.history_holes: list[tuple[int, int]] = []
        self.counts = {
            "births": 0,
            "diffs": 0,
            "events": 0,
            "historical_events": 0,
            "gaps": 0,
            "rebirths": 0,
            "duplicates": 0,
            "held": 0,
            "held_dropped": 0,
            "resets": 0,
            "malformed": 0,
        }
        self._pending: list[Diff] = []
        self._pending_events = 0
        self._max_pending_events = max_pending_events
        self._retry_s = rebirth_retry_s
        self._asked_at: float | None = None
        self._state_ts: float | None = None
        self._state_session: str | None = None

    # -- inputs -----------------------------------------------------------------------------------

    def on_birth(self, birth: Birth, now: float) -> list[Notice]:
        """Take a full snapshot; replay the diffs held while it was awaited."""
        notices: list[Notice] = []
        reset = (
            self.covered_rev is not None
            and birth.rev < self.covered_rev
            and birth.session != self.session
        )
        if reset:
            self.counts["resets"] += 1
            notices.append(
                self._notice(
                    Kind.RESET,
                    rev=birth.rev,
                    covered_rev=self.covered_rev,
                    why="a new session's birth is below the revs already mirrored: the "
                    "gateway's log went backwards; starting over from this birth",
                )
            )
            self.points = dict(birth.points)
            self.covered_rev = self.events_rev = birth.rev
            self.history.clear()
            self.history_holes.clear()
        else:
            points = dict(birth.points)
            for point_id, held in self.points.items():
                # A change newer than the snapshot already arrived in a diff: keep it.
                if point_id in points and held["rev"] > birth.rev:
                    points[point_id] = held
            self.points = points
            self.covered_rev = max(self.covered_rev or 0, birth.rev)
            if self.events_rev is None:
                self.events_rev = birth.rev  # the history starts after the first birth
        self.session = birth.session
        self.state_rev = birth.rev
        self.awaiting = False
        self._asked_at = None
        self.counts["births"] += 1
        notices.append(
            self._notice(Kind.BIRTH, rev=birth.rev, session=birth.session, points=len(self.points))
        )
        replay, self._pending, self._pending_events = self._pending, [], 0
        for diff in replay:
            notices += self.on_diff(diff, now)
        return notices

    def on_diff(self, diff: Diff, now: float) -> list[Notice]:
        """Apply a diff, or hold it while a birth is awaited, or ask for a rebirth on a gap."""
        if self.covered_rev is None or self.awaiting:
            return self._hold(diff, now)
        if diff.from_rev > self.covered_rev + 1:
            self.counts["gaps"] += 1
            gap = self._notice(
                Kind.GAP, expected=self.covered_rev + 1, from_rev=diff.from_rev, to_rev=diff.to_rev
            )
            return [gap, *self._hold(diff, now)]
        assert self.events_rev is not None
        if diff.to_rev <= self.events_rev:
            self.counts["duplicates"] += 1
            return []
        first_new = self.events_rev + 1
        if diff.from_rev > first_new:
            # The state has these revs from a birth; the history never saw their events.
            self.history_holes.append((first_new, diff.from_rev - 1))
        for event in diff.events:
            rev = event["rev"]
            if rev < first_new:
                continue
            self.history.append(event)
            self.counts["events"] += 1
            if diff.historical:
                self.counts["historical_events"] += 1
            if event["type"] == TELEMETRY:
                self._apply(event)
        self.counts["diffs"] += 1
        self.events_rev = diff.to_rev
        self.covered_rev = max(self.covered_rev, diff.to_rev)
        return []

    def on_state(self, state: State, retained: bool, now: float) -> list[Notice]:
        """Track online/offline; a gateway found online at start is asked for a birth."""
        if (
            self._state_ts is not None
            and state.ts is not None
            and state.ts < self._state_ts
            and state.session != self._state_session
        ):
            # An older connection's Last Will, delivered after the new connection's online.
            return []
        self._state_ts, self._state_session = state.ts, state.session
        notices: list[Notice] = []
        online = state.state == "online"
        if online != self.online:
            self.online = online
            notices.append(
                self._notice(
                    Kind.STATE,
                    state=state.state,
                    session=state.session,
                    retained=retained,
                )
            )
        # Retained: the mirror just subscribed to a gateway that is already up, whose birth went
        # out before. Live: the gateway has just connected and publishes its birth itself.
        if online and retained and self.state_rev is None:
            self.awaiting = True
            notices += self._ask(now, "found online with no birth seen")
        return notices

    def resync(self, now: float) -> list[Notice]:
        """The mirror may have missed messages (it reconnected): ask for a birth, unless the
        gateway is known to be offline (it births when it connects)."""
        if self.online is False or self.state_rev is None:
            return []
        self.awaiting = True
        self._asked_at = None
        return self._ask(now, "the mirror reconnected")

    def on_malformed(self) -> None:
        """Count a payload on this gateway's topics that was dropped."""
        self.counts["malformed"] += 1

    def tick(self, now: float) -> list[Notice]:
        """Ask again for a birth that has not come within the retry interval."""
        if (
            self.awaiting
            and self.online is not False
            and self._asked_at is not None
            and now - self._asked_at >= self._retry_s
        ):
            return self._ask(now, "no birth yet after asking")
        return []

    # -- outputs ----------------------------------------------------------------------------------

    def twin(self) -> dict[str, Any]:
        """The mirrored twin: `/twin`'s shape, points sorted by id."""
        return {
            "site_id": self.site_id,
            "gateway_id": self.gateway_id,
            "rev": self.covered_rev,
            "session": self.session,
            "points": {pid: dict(self.points[pid]) for pid in sorted(self.points)},
        }

    def stats(self) -> dict[str, Any]:
        """Counters and where the mirror stands (the CLI's summary line)."""
        return {
            "site_id": self.site_id,
            "gateway_id": self.gateway_id,
            "online": self.online,
            "session": self.session,
            "points": len(self.points),
            "rev": self.covered_rev,
            "birth_rev": self.state_rev,
            "events_rev": self.events_rev,
            "awaiting_birth": self.awaiting,
            "pending_diffs": len(self._pending),
            "history_holes": len(self.history_holes),
            **self.counts,
        }

    # -- helpers ----------------------------------------------------------------------------------

    def _apply(self, event: dict[str, Any]) -> None:
        point_id = event["point_id"]
        rev = event["rev"]
        current = self.points.get(point_id)
        if current is None:
            unit = datatype = None  # a point the birth did not have
        elif current["rev"] >= rev:
            return  # the birth already holds this change or a newer one
        else:
            unit, datatype = current["unit"], current["datatype"]
        data = event["data"]
        self.points[point_id] = {
            "value": data.get("value"),
            "quality": data["quality"],
            "source_ts": data.get("source_ts"),
            "gateway_ts": event.get("ts"),
            "rev": rev,
            "reason": data.get("reason"),
            "unit": unit,
            "datatype": datatype,
        }

    def _hold(self, diff: Diff, now: float) -> list[Notice]:
        """Keep a diff for after the birth; ask for the birth unless already asked."""
        self.counts["held"] += 1
        if self._pending_events + len(diff.events) > self._max_pending_events:
            # Bounded: the birth that comes covers these; a gap after it asks again.
            self.counts["held_dropped"] += len(self._pending) + 1
            self._pending, self._pending_events = [], 0
        else:
            self._pending.append(diff)
            self._pending_events += len(diff.events)
        if self.awaiting:
            return []
        self.awaiting = True
        why = "gap" if self.covered_rev is not None else "diff before any birth"
        return self._ask(now, why)

    def _ask(self, now: float, why: str) -> list[Notice]:
        if self._asked_at is not None and now - self._asked_at < self._retry_s:
            return []
        self._asked_at = now
        self.counts["rebirths"] += 1
        return [self._notice(Kind.REBIRTH, why=why)]

    def _notice(self, kind: Kind, **detail: Any) -> Notice:
        return Notice(kind, self.site_id, self.gateway_id, detail)


# -- every gateway under a prefix -------------------------------------------------------------


class MirrorState:
    """Every gateway's mirror under one topic prefix, fed topic by topic."""

    def __init__(
        self,
        prefix: str = "aiw/v1",
        *,
        max_payload: int = MAX_PAYLOAD,
        history_events: int = HISTORY_EVENTS,
        max_pending_events: int = MAX_PENDING_EVENTS,
        rebirth_retry_s: float = REBIRTH_RETRY_S,
    ) -> None:
        self.prefix = prefix.strip("/")
        self.max_payload = max_payload
        self.gateways: dict[tuple[str, str], GatewayMirror] = {}
        self.malformed = 0  # payloads dropped, all gateways
        self.ignored = 0  # topics that are not ours
        self._history_events = history_events
        self._max_pending_events = max_pending_events
        self._rebirth_retry_s = rebirth_retry_s

    def handle(
        self, topic: str, payload: bytes, now: float, *, retained: bool = False
    ) -> list[Notice]:
        """Feed one message; return what happened (REBIRTH notices are requests to publish)."""
        where = split_topic(topic, self.prefix)
        if where is None or where[2] not in LEAVES:
            self.ignored += 1
            return []
        site_id, gateway_id, leaf = where
        try:
            if leaf == "birth":
                birth = decode_birth(payload, self.max_payload)
                if (birth.site_id, birth.gateway_id) != (site_id, gateway_id):
                    raise PayloadError(
                        f"birth: it names {_short(birth.site_id)}/{_short(birth.gateway_id)}, "
                        f"its topic {site_id}/{gateway_id}"
                    )
                return self.gateway(site_id, gateway_id).on_birth(birth, now)
            if leaf == "diff":
                diff = decode_diff(payload, self.max_payload)
                return self.gateway(site_id, gateway_id).on_diff(diff, now)
            state = decode_state(payload, self.max_payload)
        except PayloadError as exc:
            self.malformed += 1
            known = self.gateways.get((site_id, gateway_id))
            if known is not None:
                known.on_malformed()
            return [
                Notice(
                    Kind.MALFORMED,
                    site_id,
                    gateway_id,
                    {"leaf": leaf, "error": str(exc), "bytes": len(payload)},
                )
            ]
        if state.state != "online" and (site_id, gateway_id) not in self.gateways:
            # A retained offline of a gateway never seen: nothing to mirror, nothing to track.
            return []
        return self.gateway(site_id, gateway_id).on_state(state, retained, now)

    def tick(self, now: float) -> list[Notice]:
        """Re-ask overdue rebirths."""
        notices: list[Notice] = []
        for mirror in self.gateways.values():
            notices += mirror.tick(now)
        return notices

    def resync(self, now: float) -> list[Notice]:
        """Ask every gateway that may have been missed while the mirror was away for a birth."""
        notices: list[Notice] = []
        for mirror in self.gateways.values():
            notices += mirror.resync(now)
        return notices

    def gateway(self, site_id: str, gateway_id: str) -> GatewayMirror:
        """The mirror of one gateway, made on first sight."""
        key = (site_id, gateway_id)
        mirror = self.gateways.get(key)
        if mirror is None:
            mirror = self.gateways[key] = GatewayMirror(
                site_id,
                gateway_id,
                history_events=self._history_events,
                max_pending_events=self._max_pending_events,
                rebirth_retry_s=self._rebirth_retry_s,
            )
        return mirror

    def find(self, site_id: str, gateway_id: str) -> GatewayMirror | None:
        """The mirror of one gateway if it was ever heard from."""
        return self.gateways.get((site_id, gateway_id))

    def all_stats(self) -> list[dict[str, Any]]:
        """Every gateway's counters, sorted by (site, gateway)."""
        return [self.gateways[key].stats() for key in sorted(self.gateways)]


def rev_order(events: Iterable[dict[str, Any]]) -> bool:
    """Whether events are in strictly increasing rev order (what a test checks a history for)."""
    last = -1
    for event in events:
        if event["rev"] <= last:
            return False
        last = event["rev"]
    return True
