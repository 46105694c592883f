"""Events and cursors as they leave the gateway (HTTP `/diff`, SSE, MQTT diffs).

One JSON shape everywhere: `{id, rev, type, ts, twin_id, asset_id, point_id, data}`, where `id`
is the event's cursor. Cursors are opaque to clients; ours encode the rev (`cursor_000123`), and
`cursor_N` means "everything after rev N". Only committed revs are ever encoded (see
`gateway/twin/commits.py`), so a cursor names the same event before and after a crash.
"""

from __future__ import annotations

import math
import re
from typing import Any

from gateway.twin.model import EventRecord

__all__ = ["CursorError", "cursor", "event_json", "parse_cursor", "twin_id"]

_CURSOR = re.compile(r"(?:cursor_)?([0-9]{1,18})")


class CursorError(ValueError):
    """A cursor that is not one of ours."""


def cursor(rev: int) -> str:
    """The cursor naming rev `rev` (and, as `since`, everything after it)."""
    return f"cursor_{rev:06d}"


def parse_cursor(text: str) -> int:
    """The rev a cursor names; `cursor_000123`, or a bare rev (`0`: from the beginning)."""
    match = _CURSOR.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise CursorError(
            f"{text!r} is not a cursor: give one this gateway handed out (e.g. cursor_000123), "
            "or 0 for the oldest event kept"
        )
    return int(match.group(1))


def twin_id(site_id: str, gateway_id: str) -> str:
    """The twin's id in events and topics."""
    return f"{site_id}/{gateway_id}"


def event_json(event: EventRecord, twin: str) -> dict[str, Any]:
    """One event as every AIW channel sends it (JSON-safe: NaN/inf become null)."""
    return {
        "id": cursor(event.rev),
        "rev": event.rev,
        "type": event.type,
        "ts": event.ts,
        "twin_id": twin,
        "asset_id": event.asset_id,
        "point_id": event.point_id,
        "data": _finite(event.data),
    }


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
