"""The MQTT contract's pure parts (gateway.sync.payloads): topics, builders, parsers, and where
a diff ends; no broker, no I/O."""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.contract import Quality
from gateway.sync.payloads import (
    LEAVES,
    MAX_COMMAND_BYTES,
    PayloadError,
    Topics,
    birth_payload,
    diff_payload,
    parse_birth,
    parse_diff,
    parse_proposal_command,
    parse_proposal_reply,
    parse_state,
    plan_diff,
    proposal_reply,
    split_topic,
    state_payload,
    subscription,
)
from gateway.twin.model import EventRecord, PointDef, PointValue

TEMP = "line1/oven1/temperature"


def event(rev: int, point: str | None = TEMP, kind: str = "TelemetryChanged") -> EventRecord:
    data = {"value": float(rev), "quality": "GOOD", "source_ts": None, "reason": None}
    asset = point.rpartition("/")[0] if point else None
    return EventRecord(rev, 1_700_000_000.0 + rev, kind, asset, point, data)


# -- topics ---------------------------------------------------------------------------------------


def test_topics_are_prefix_site_gateway_leaf():
    topics = Topics("aiw/v1", "plant-a", "gw1")
    assert topics.base == "aiw/v1/plant-a/gw1"
    assert topics.birth == "aiw/v1/plant-a/gw1/birth"
    assert topics.diff == "aiw/v1/plant-a/gw1/diff"
    assert topics.state == "aiw/v1/plant-a/gw1/state"
    assert topics.cmd_rebirth == "aiw/v1/plant-a/gw1/cmd/rebirth"
    assert topics.cmd_proposal == "aiw/v1/plant-a/gw1/cmd/proposal"
    assert topics.reply_proposal == "aiw/v1/plant-a/gw1/reply/proposal"
    assert subscription("aiw/v1") == "aiw/v1/+/+/#"


@pytest.mark.parametrize("leaf", LEAVES)
def test_split_topic_reads_back_every_leaf(leaf: str):
    topics = Topics("fleet/aiw/v1", "site.2", "gw-9")
    assert split_topic(topics.leaf(leaf), "fleet/aiw/v1") == ("site.2", "gw-9", leaf)


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/s/g/birth",  # another prefix
        "aiw/v1/s/g/unknown",  # not a leaf of ours
        "aiw/v1/s/birth",  # no gateway
        "aiw/v1//g/birth",  # empty site
        "aiw/v1/s/g/cmd/rebirth/extra",
        "aiw/v1",
        "",
    ],
)
def test_split_topic_refuses_what_is_not_ours(topic: str):
    assert split_topic(topic, "aiw/v1") is None


@pytest.mark.parametrize(
    ("prefix", "site", "gateway"),
    [("aiw/+", "s", "g"), ("aiw", "s#", "g"), ("aiw", "s", "a/b"), ("aiw", "", "g")],
)
def test_ids_that_cannot_be_in_a_topic_are_refused(prefix: str, site: str, gateway: str):
    with pytest.raises(ValueError, match=r"topic|'/'"):
        Topics(prefix, site, gateway)


# -- builders and their parsers -------------------------------------------------------------------


def test_birth_carries_every_point_with_unit_and_datatype():
    points = {
        TEMP: PointDef(TEMP, "oven-plc", "float64", unit="°C"),
        "line1/oven1/running": PointDef("line1/oven1/running", "oven-plc", "bool"),
    }
    values = {
        TEMP: PointValue(TEMP, math.nan, Quality.BAD, None, 1.5, 7, "sensor open"),
        "line1/oven1/running": PointValue("line1/oven1/running", True, Quality.GOOD, 1.0, 1.2, 3),
    }
    data = birth_payload(
        session="s1",
        rev=7,
        ts=2.0,
        site_id="plant",
        gateway_id="gw1",
        version="0.1.0",
        values=values,
        points=points,
    )
    birth = parse_birth(data)
    assert (birth.session, birth.rev, birth.twin_id) == ("s1", 7, "plant/gw1")
    assert (birth.site_id, birth.gateway_id, birth.version) == ("plant", "gw1", "0.1.0")
    temp = birth.points[TEMP]
    # NaN is no JSON: a BAD point's NaN travels as null.
    assert temp == {
        "value": None,
        "quality": "BAD",
        "source_ts": None,
        "gateway_ts": 1.5,
        "rev": 7,
        "reason": "sensor open",
        "unit": "°C",
        "datatype": "float64",
    }
    assert birth.points["line1/oven1/running"]["value"] is True
    json.loads(data)  # plain JSON any consumer can read


def test_diff_is_one_json_document_of_event_shapes():
    events = [event(5), event(6, None, "DeviceStateChanged"), event(9)]
    data = diff_payload(
        session="s1", from_rev=5, to_rev=9, historical=True, events=events, twin="p/g"
    )
    diff = parse_diff(data)
    assert (diff.session, diff.from_rev, diff.to_rev, diff.historical) == ("s1", 5, 9, True)
    assert [e["rev"] for e in diff.events] == [5, 6, 9]
    first = diff.events[0]
    assert first["id"] == "cursor_000005" and first["twin_id"] == "p/g"
    assert first["type"] == "TelemetryChanged" and first["point_id"] == TEMP
    assert first["asset_id"] == "line1/oven1" and first["data"]["value"] == 5.0
    assert diff.events[1]["point_id"] is None


def test_an_empty_diff_is_legal():
    data = diff_payload(session="s", from_rev=3, to_rev=8, historical=True, events=[], twin="p/g")
    assert parse_diff(data).events == []


def test_state_online_and_offline():
    assert parse_state(state_payload("online", "s1", 3.5)) == parse_state(
        b'{"state":"online","session":"s1","ts":3.5}'
    )
    assert parse_state(state_payload("offline", "s1", 4)).state == "offline"
    with pytest.raises(ValueError, match="online or offline"):
        state_payload("maybe", "s1", 1.0)


def test_replies_ok_and_refused():
    ok = parse_proposal_reply(proposal_reply("r1", proposal={"id": "p1", "status": "succeeded"}))
    assert (ok.request_id, ok.ok, ok.proposal, ok.error) == (
        "r1",
        True,
        {"id": "p1", "status": "succeeded"},
        None,
    )
    refused = parse_proposal_reply(proposal_reply(None, error="payload is not JSON"))
    assert (refused.request_id, refused.ok, refused.error) == (None, False, "payload is not JSON")
    # Refused with a record: the gate recorded a rejection the cloud can quote.
    denied = parse_proposal_reply(proposal_reply("r2", proposal={"id": "p2"}, error="denied"))
    assert not denied.ok and denied.proposal == {"id": "p2"}


# -- where a diff ends ----------------------------------------------------------------------------


def test_live_diffs_run_to_the_last_event():
    events = [event(11), event(13)]
    assert plan_diff(events, sent_to=10, birth_rev=10) == (events, 13, False)


def test_backlog_diffs_are_historical_and_stop_at_the_birth():
    events = [event(4), event(6), event(8), event(9)]
    kept, to_rev, historical = plan_diff(events, sent_to=3, birth_rev=7)
    assert [e.rev for e in kept] == [4, 6] and to_rev == 7 and historical
    # Wholly below the birth: to the last event.
    assert plan_diff(events[:2], sent_to=3, birth_rev=7) == (events[:2], 6, True)
    # The backlog's last events are gone (revs skip): an empty diff still closes it at the birth.
    assert plan_diff([event(9)], sent_to=6, birth_rev=7) == ([], 7, True)


@given(
    revs=st.lists(st.integers(1, 200), min_size=1, max_size=40, unique=True).map(sorted),
    sent_to=st.integers(0, 200),
    birth_rev=st.integers(0, 200),
)
def test_a_diff_never_straddles_the_birth(revs: list[int], sent_to: int, birth_rev: int):
    events = [event(r) for r in revs if r > sent_to]
    if not events:
        return
    kept, to_rev, historical = plan_diff(events, sent_to, birth_rev)
    assert to_rev > sent_to
    assert all(sent_to < e.rev <= to_rev for e in kept)
    if historical:
        assert to_rev <= birth_rev and all(e.rev <= birth_rev for e in kept)
    else:
        assert all(e.rev > birth_rev for e in kept) and kept == events


# -- hostile input --------------------------------------------------------------------------------


def command(**changes: Any) -> bytes:
    body: dict[str, Any] = {
        "request_id": "req-1",
        "token": "otw_secret",
        "point": "line1/oven1/heater_setpoint",
        "value": 178.5,
        "reason": "cloud optimiser",
    }
    for key, value in changes.items():
        if value is ...:
            del body[key]
        else:
            body[key] = value
    return json.dumps(body).encode()


def test_a_good_proposal_command():
    cmd = parse_proposal_command(command(value=178))
    assert (cmd.request_id, cmd.token, cmd.point, cmd.value) == (
        "req-1",
        "otw_secret",
        "line1/oven1/heater_setpoint",
        178.0,
    )


@pytest.mark.parametrize(
    ("payload", "says", "request_id"),
    [
        (b"", "not JSON", None),
        (b"{not json", "not JSON", None),
        (b"\xff\xfe", "not JSON", None),
        (b"[1, 2]", "JSON object", None),
        (b'"text"', "JSON object", None),
        (command(request_id=...), "request_id", None),
        (command(request_id=7), "request_id", None),
        (command(request_id="x" * 129), "request_id", None),
        (command(token=...), "`token`", "req-1"),
        (command(token=""), "`token`", "req-1"),
        (command(point=None), "`point`", "req-1"),
        (command(value="12"), "`value`", "req-1"),
        (command(value=True), "`value`", "req-1"),
        (command(value=None), "`value`", "req-1"),
        (command(value=[1]), "`value`", "req-1"),
        (command(reason="   "), "`reason`", "req-1"),
        (command(reason="x" * 2001), "`reason`", "req-1"),
        (command(extra=1), "unknown field `extra`", "req-1"),
        (
            b'{"request_id":"req-1","token":"t","point":"a/b","value":1e999,"reason":"r"}',
            "not JSON",
            None,
        ),
        (
            b'{"request_id":"req-1","token":"t","point":"a/b","value":NaN,"reason":"r"}',
            "not JSON",
            None,
        ),
    ],
)
def test_malformed_proposal_commands_name_the_field(
    payload: bytes, says: str, request_id: str | None
):
    with pytest.raises(PayloadError, match=says) as caught:
        parse_proposal_command(payload)
    assert caught.value.request_id == request_id


def test_oversized_commands_are_refused_unread():
    payload = command(reason="x" * MAX_COMMAND_BYTES)
    with pytest.raises(PayloadError, match="exceeds") as caught:
        parse_proposal_command(payload)
    assert caught.value.request_id is None  # not even parsed


@given(st.binary(max_size=300))
def test_any_bytes_give_a_command_or_a_payload_error(data: bytes):
    try:
        parse_proposal_command(data)
    except PayloadError as exc:
        assert str(exc).startswith("proposal: ")


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
        ),
        max_leaves=20,
    )
)
def test_any_json_gives_a_parse_or_a_payload_error(value: Any):
    data = json.dumps(value).encode()  # ints beyond 64 bits too: orjson refuses to read them
    for parse in (
        parse_birth,
        parse_diff,
        parse_state,
        parse_proposal_command,
        parse_proposal_reply,
    ):
        with contextlib.suppress(PayloadError):
            parse(data)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"session": "s", "from_rev": 5, "to_rev": 4, "historical": False, "events": []}, "below"),
        (
            {"session": "s", "from_rev": -1, "to_rev": 4, "historical": False, "events": []},
            "from_rev",
        ),
        ({"session": "s", "from_rev": 1, "to_rev": 4, "historical": 1, "events": []}, "historical"),
        ({"session": "s", "from_rev": 1, "to_rev": 4, "historical": False, "events": {}}, "events"),
        ({"session": 1, "from_rev": 1, "to_rev": 4, "historical": False, "events": []}, "session"),
        (
            {
                "session": "s",
                "from_rev": 1,
                "to_rev": 4,
                "historical": False,
                "events": [{"rev": 5}],
            },
            r"events\[0\]",
        ),
        (
            {
                "session": "s",
                "from_rev": 1,
                "to_rev": 4,
                "historical": False,
                "events": [{"rev": 3}, {"rev": 2}],
            },
            r"events\[1\]",
        ),
        (
            {"session": "s", "from_rev": 1, "to_rev": 4, "historical": False, "events": [7]},
            r"events\[0\]",
        ),
    ],
)
def test_malformed_diffs_name_the_field(body: dict[str, Any], says: str):
    with pytest.raises(PayloadError, match=says):
        parse_diff(json.dumps(body).encode())
