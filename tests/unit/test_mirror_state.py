"""The mirror's state machine (gateway/mirror/state.py): births, diffs, gaps, rebirths, hostile
payloads — table-driven, no broker."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mirror.state import (
    Kind,
    MirrorState,
    Notice,
    PayloadError,
    decode_birth,
    decode_diff,
    decode_state,
    rev_order,
)

P = "aiw/v1"
SITE, GW = "plant", "gw1"


def topic(leaf: str, site: str = SITE, gw: str = GW) -> str:
    return f"{P}/{site}/{gw}/{leaf}"


def point(value: Any, rev: int, quality: str = "GOOD") -> dict[str, Any]:
    return {
        "value": value,
        "quality": quality,
        "source_ts": 1.0,
        "gateway_ts": 2.0,
        "rev": rev,
        "reason": None,
        "unit": "m",
        "datatype": "float64",
    }


def birth(rev: int, points: dict[str, dict[str, Any]], session: str = "s1") -> bytes:
    body = {
        "session": session,
        "rev": rev,
        "ts": 10.0,
        "twin_id": f"{SITE}/{GW}",
        "site_id": SITE,
        "gateway_id": GW,
        "version": "test",
        "points": points,
    }
    return json.dumps(body).encode()


def change(rev: int, point_id: str, value: Any, quality: str = "GOOD") -> dict[str, Any]:
    return {
        "id": f"cursor_{rev:06d}",
        "rev": rev,
        "type": "TelemetryChanged",
        "ts": 100.0 + rev,
        "twin_id": f"{SITE}/{GW}",
        "asset_id": point_id.rpartition("/")[0],
        "point_id": point_id,
        "data": {"value": value, "quality": quality, "source_ts": 50.0 + rev, "reason": None},
    }


def other(rev: int, type: str = "DeviceStateChanged") -> dict[str, Any]:
    return {"rev": rev, "type": type, "ts": 100.0 + rev, "point_id": None, "data": {"x": rev}}


def diff(
    from_rev: int,
    to_rev: int,
    events: list[dict[str, Any]] | None = None,
    session: str = "s1",
    historical: bool = False,
) -> bytes:
    if events is None:
        events = [change(rev, "a/x", rev) for rev in range(from_rev, to_rev + 1)]
    body = {
        "session": session,
        "from_rev": from_rev,
        "to_rev": to_rev,
        "historical": historical,
        "events": events,
    }
    return json.dumps(body).encode()


def state(online: bool, session: str = "s1", ts: float = 1.0) -> bytes:
    return json.dumps(
        {"state": "online" if online else "offline", "session": session, "ts": ts}
    ).encode()


def kinds(notices: list[Notice]) -> list[Kind]:
    return [n.kind for n in notices]


@pytest.fixture
def mirror() -> MirrorState:
    return MirrorState(P, rebirth_retry_s=5.0)


def born(mirror: MirrorState, rev: int = 10, **points: Any) -> None:
    pts = {f"a/{k}": point(v, rev) for k, v in (points or {"x": 0.0}).items()}
    assert kinds(mirror.handle(topic("birth"), birth(rev, pts), 0.0)) == [Kind.BIRTH]


def test_birth_then_contiguous_diffs_rebuild_the_twin(mirror):
    born(mirror, 10, x=0.0, y=5.0)
    assert mirror.handle(topic("diff"), diff(11, 12), 1.0) == []
    events = [change(13, "a/y", 6.0, "UNCERTAIN"), other(15)]
    assert mirror.handle(topic("diff"), diff(13, 15, events), 1.0) == []
    gw = mirror.find(SITE, GW)
    assert gw is not None
    twin = gw.twin()
    assert twin["rev"] == 15
    assert twin["points"]["a/x"] == {
        "value": 12,
        "quality": "GOOD",
        "source_ts": 62.0,
        "gateway_ts": 112.0,
        "rev": 12,
        "reason": None,
        "unit": "m",  # kept from the birth
        "datatype": "float64",
    }
    assert twin["points"]["a/y"]["value"] == 6.0
    assert twin["points"]["a/y"]["quality"] == "UNCERTAIN"
    assert [e["rev"] for e in gw.history] == [11, 12, 13, 15]
    stats = gw.stats()
    assert (stats["births"], stats["diffs"], stats["events"], stats["gaps"]) == (1, 2, 4, 0)


def test_a_gap_asks_for_a_rebirth_holds_diffs_and_the_birth_repairs(mirror):
    born(mirror, 10)
    mirror.handle(topic("diff"), diff(11, 12), 1.0)
    # 13..14 lost
    notices = mirror.handle(topic("diff"), diff(15, 16), 2.0)
    assert kinds(notices) == [Kind.GAP, Kind.REBIRTH]
    assert notices[0].detail == {"expected": 13, "from_rev": 15, "to_rev": 16}
    # More diffs while the birth is awaited: held, no second request.
    assert mirror.handle(topic("diff"), diff(17, 18), 2.5) == []
    gw = mirror.find(SITE, GW)
    assert gw is not None and gw.awaiting and gw.stats()["pending_diffs"] == 2
    # The birth (taken at 16) comes; the held diffs replay; 17..18 are newer and apply.
    notices = mirror.handle(topic("birth"), birth(16, {"a/x": point(16, 16)}), 3.0)
    assert kinds(notices) == [Kind.BIRTH]
    assert gw.twin()["points"]["a/x"]["value"] == 18
    assert gw.twin()["rev"] == 18 and not gw.awaiting
    # 13..14 were never seen as events: a hole in the history, not in the state.
    assert gw.history_holes == [(13, 14)]
    assert [e["rev"] for e in gw.history] == [11, 12, 15, 16, 17, 18]
    assert rev_order(gw.history)
    stats = gw.stats()
    assert (stats["gaps"], stats["rebirths"], stats["births"]) == (1, 1, 2)


def test_duplicates_and_overlaps_apply_each_event_once(mirror):
    born(mirror, 10)
    mirror.handle(topic("diff"), diff(11, 13), 1.0)
    assert mirror.handle(topic("diff"), diff(11, 13), 1.0) == []  # resent after a lost PUBACK
    mirror.handle(topic("diff"), diff(12, 15), 1.0)  # overlapping resend: 14, 15 are new
    gw = mirror.find(SITE, GW)
    assert gw is not None
    assert [e["rev"] for e in gw.history] == [11, 12, 13, 14, 15]
    assert gw.stats()["duplicates"] == 1 and gw.stats()["gaps"] == 0
    assert gw.twin()["points"]["a/x"]["value"] == 15


def test_first_diff_after_a_birth_may_start_at_or_before_the_birth(mirror):
    born(mirror, 10)
    # Backlog below the birth (historical): nothing new for the state, no gap.
    assert mirror.handle(topic("diff"), diff(5, 9, historical=True), 1.0) == []
    assert mirror.handle(topic("diff"), diff(8, 11), 1.0) == []
    gw = mirror.find(SITE, GW)
    assert gw is not None and gw.twin()["points"]["a/x"]["value"] == 11
    assert gw.stats()["gaps"] == 0


def test_a_first_diff_beyond_the_birth_is_a_gap(mirror):
    born(mirror, 10)
    assert kinds(mirror.handle(topic("diff"), diff(12, 13), 1.0)) == [Kind.GAP, Kind.REBIRTH]


def test_reconnect_birth_then_historical_backlog_fills_the_history(mirror):
    """Broker outage: the gateway reconnects (new session), births at 20, then sends 13..20 as
    historical backlog and goes live at 21."""
    born(mirror, 10)
    mirror.handle(topic("diff"), diff(11, 12), 1.0)
    mirror.handle(topic("birth"), birth(20, {"a/x": point(20, 20)}, session="s2"), 2.0)
    assert mirror.handle(topic("diff"), diff(13, 20, session="s2", historical=True), 2.0) == []
    mirror.handle(topic("diff"), diff(21, 21, session="s2"), 2.0)
    gw = mirror.find(SITE, GW)
    assert gw is not None
    assert [e["rev"] for e in gw.history] == list(range(11, 22))
    assert gw.history_holes == [] and gw.stats()["gaps"] == 0
    assert gw.stats()["historical_events"] == 8
    assert gw.twin()["points"]["a/x"]["value"] == 21


def test_historical_events_never_overwrite_a_newer_birth(mirror):
    born(mirror, 10, x=0.0)
    mirror.handle(topic("birth"), birth(20, {"a/x": point("from birth", 18)}, session="s2"), 1.0)
    mirror.handle(topic("diff"), diff(11, 20, historical=True), 1.0)  # 11..20 set x = rev
    gw = mirror.find(SITE, GW)
    assert gw is not None
    # rev 19 and 20 are newer than the birth's point (18): applied; 11..18 were not.
    assert gw.twin()["points"]["a/x"] == {**point(20, 20), "source_ts": 70.0, "gateway_ts": 120.0}


def test_a_birth_older_than_diffs_of_its_own_session_keeps_the_newer_points(mirror):
    born(mirror, 10, x=0.0, y=0.0)
    mirror.handle(topic("diff"), diff(11, 14), 1.0)  # x = 14 at rev 14
    # Rebirth answered with a snapshot taken at 12 but published after the diff up to 14.
    mirror.handle(topic("birth"), birth(12, {"a/x": point(12, 12), "a/y": point(1, 12)}), 2.0)
    gw = mirror.find(SITE, GW)
    assert gw is not None
    assert gw.twin()["points"]["a/x"]["value"] == 14
    assert gw.twin()["points"]["a/y"]["value"] == 1
    assert gw.twin()["rev"] == 14 and gw.stats()["resets"] == 0
    assert mirror.handle(topic("diff"), diff(15, 15), 2.0) == []


def test_a_new_session_below_the_mirrored_revs_resets_the_mirror(mirror):
    born(mirror, 10)
    mirror.handle(topic("diff"), diff(11, 30), 1.0)
    notices = mirror.handle(topic("birth"), birth(25, {"a/x": point("r", 25)}, session="s2"), 2.0)
    assert kinds(notices) == [Kind.RESET, Kind.BIRTH]
    gw = mirror.find(SITE, GW)
    assert gw is not None
    assert gw.twin()["rev"] == 25 and gw.twin()["points"]["a/x"]["value"] == "r"
    assert list(gw.history) == []
    assert mirror.handle(topic("diff"), diff(26, 26, session="s2"), 2.0) == []
    assert gw.twin()["points"]["a/x"]["value"] == 26


def test_a_birth_point_without_optional_fields_reads_them_as_null(mirror):
    bare = {"value": 1.5, "quality": "GOOD", "rev": 3, "extra": "ignored"}
    mirror.handle(topic("birth"), birth(3, {"a/x": bare, "a/y": bare}), 0.0)
    mirror.handle(topic("diff"), diff(4, 4), 0.0)
    gw = mirror.find(SITE, GW)
    assert gw is not None
    assert gw.twin()["points"]["a/y"] == {
        "value": 1.5,
        "quality": "GOOD",
        "source_ts": None,
        "gateway_ts": None,
        "rev": 3,
        "reason": None,
        "unit": None,
        "datatype": None,
    }
    assert gw.twin()["points"]["a/x"]["value"] == 4


def test_a_birth_drops_points_it_no_longer_has(mirror):
    born(mirror, 10, x=0.0, y=1.0)
    mirror.handle(topic("birth"), birth(11, {"a/x": point(2.0, 11)}, session="s2"), 1.0)
    gw = mirror.find(SITE, GW)
    assert gw is not None and list(gw.twin()["points"]) == ["a/x"]


def test_a_diff_from_an_unknown_gateway_asks_once_then_waits_for_the_birth(mirror):
    notices = mirror.handle(topic("diff"), diff(5, 6), 0.0)
    assert kinds(notices) == [Kind.REBIRTH]
    assert notices[0].detail == {"why": "diff before any birth"}
    assert mirror.handle(topic("diff"), diff(7, 8), 1.0) == []
    assert mirror.tick(2.0) == []  # within the retry interval
    assert kinds(mirror.tick(5.0)) == [Kind.REBIRTH]  # nothing came: ask again
    assert mirror.tick(6.0) == []
    mirror.handle(topic("birth"), birth(7, {"a/x": point(7, 7)}), 7.0)
    gw = mirror.find(SITE, GW)
    assert gw is not None
    assert gw.twin()["points"]["a/x"]["value"] == 8 and gw.twin()["rev"] == 8
    assert mirror.tick(100.0) == []
    assert gw.stats()["rebirths"] == 2


def test_held_diffs_are_bounded():
    mirror = MirrorState(P, max_pending_events=5)
    mirror.handle(topic("diff"), diff(1, 3), 0.0)
    mirror.handle(topic("diff"), diff(4, 6), 0.0)  # 6 events: over the bound, all dropped
    gw = mirror.find(SITE, GW)
    assert gw is not None
    assert gw.stats()["pending_diffs"] == 0 and gw.stats()["held_dropped"] == 2
    mirror.handle(topic("diff"), diff(7, 7), 0.0)
    mirror.handle(topic("birth"), birth(6, {"a/x": point(6, 6)}), 0.0)
    assert gw.twin()["points"]["a/x"]["value"] == 7


def test_history_is_bounded():
    mirror = MirrorState(P, history_events=3)
    born(mirror, 0)
    mirror.handle(topic("diff"), diff(1, 10), 0.0)
    gw = mirror.find(SITE, GW)
    assert gw is not None
    assert [e["rev"] for e in gw.history] == [8, 9, 10] and gw.stats()["events"] == 10


def test_retained_online_at_start_asks_for_a_birth_a_live_one_does_not(mirror):
    notices = mirror.handle(topic("state"), state(True), 0.0, retained=True)
    assert kinds(notices) == [Kind.STATE, Kind.REBIRTH]
    other_gw = mirror.handle(topic("state", gw="gw2"), state(True), 0.0, retained=False)
    assert kinds(other_gw) == [Kind.STATE]
    # A retained offline of a gateway never seen is not tracked.
    assert mirror.handle(topic("state", gw="gw3"), state(False), 0.0, retained=True) == []
    assert mirror.find(SITE, "gw3") is None


def test_a_stale_last_will_after_the_new_online_is_ignored(mirror):
    mirror.handle(topic("state"), state(True, "old", ts=1.0), 0.0)
    mirror.handle(topic("state"), state(True, "new", ts=5.0), 0.0)
    assert mirror.handle(topic("state"), state(False, "old", ts=1.0), 0.0) == []
    gw = mirror.find(SITE, GW)
    assert gw is not None and gw.online is True
    # The current connection going away is a real transition.
    assert kinds(mirror.handle(topic("state"), state(False, "new", ts=6.0), 0.0)) == [Kind.STATE]
    assert gw.online is False
    # An offline gateway is not asked again for a birth it cannot send.
    mirror.handle(topic("diff"), diff(1, 1), 10.0)
    assert mirror.tick(100.0) == []


def test_after_the_mirror_reconnects_it_asks_every_gateway_not_known_offline(mirror):
    born(mirror, 10)
    mirror.handle(topic("birth", gw="gw2"), birth(1, {}).replace(b'"gw1"', b'"gw2"'), 0.0)
    mirror.handle(topic("state", gw="gw2"), state(False), 0.0)
    notices = mirror.resync(1.0)
    assert [(n.kind, n.gateway_id) for n in notices] == [(Kind.REBIRTH, GW)]
    gw = mirror.find(SITE, GW)
    assert gw is not None and gw.awaiting
    # Diffs are held until the birth; nothing is lost by asking.
    mirror.handle(topic("diff"), diff(11, 12), 1.5)
    mirror.handle(topic("birth"), birth(11, {"a/x": point(11, 11)}), 2.0)
    assert gw.twin()["rev"] == 12 and not gw.awaiting and gw.stats()["gaps"] == 0
    assert [e["rev"] for e in gw.history] == [11, 12]


def test_every_notice_has_a_text_and_a_json_line():
    from gateway.mirror.cli import _notice_line, _summary_line

    mirror = MirrorState(P)
    notices = mirror.handle(topic("state"), state(True), 0.0, retained=True)
    notices += mirror.handle(topic("birth"), birth(10, {"a/x": point(1, 10)}), 0.0)
    notices += mirror.handle(topic("diff"), diff(12, 12), 0.0)
    notices += mirror.handle(topic("birth"), birth(5, {}, session="s2"), 0.0)
    notices += mirror.handle(topic("diff"), b"nope", 0.0)
    assert {n.kind for n in notices} == set(Kind)
    for notice in notices:
        text = _notice_line(notice, as_json=False)
        assert text is not None and f"{SITE}/{GW}" in text and str(notice.kind) in text
        line = _notice_line(notice, as_json=True)
        assert line is not None and json.loads(line)["kind"] == str(notice.kind)
    for stats in mirror.all_stats():
        assert "online, 0 points, rev 5" in _summary_line(stats, as_json=False)
        assert json.loads(_summary_line(stats, as_json=True))["kind"] == "summary"


def test_topics_that_are_not_ours_are_ignored(mirror):
    for t in (
        "other/v1/plant/gw1/birth",
        f"{P}/plant/gw1/cmd/rebirth",
        f"{P}/plant/gw1/reply/proposal",
        f"{P}/plant/gw1/unknown",
        f"{P}/plant//birth",
        f"{P}/plant/gw1",
        f"{P}x/plant/gw1/birth",
    ):
        assert mirror.handle(t, birth(1, {}), 0.0) == [], t
    assert mirror.ignored == 7 and mirror.gateways == {}


def birth_body(**changes: Any) -> bytes:
    body = json.loads(birth(1, {"a/x": point(1.0, 1)}))
    for key, value in changes.items():
        if key.startswith("x_"):
            body["points"]["a/x"][key[2:]] = value
        else:
            body[key] = value
    return json.dumps(body).encode()


HOSTILE = [
    (b"", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    (birth_body(rev=-1), "`rev`"),
    (birth_body(rev=True), "`rev`"),
    (birth_body(session=None), "`session`"),
    (birth_body(points=[]), "`points`"),
    (birth_body(points={"a/x": 3}), "`points`"),
    (birth_body(points={"a/x": {"rev": 1}}), "`points.a/x.quality`"),
    (birth_body(x_rev="1"), "`points.a/x.rev`"),
    (birth_body(x_source_ts="yesterday"), "`points.a/x.source_ts`"),
    (birth_body(x_unit=7), "`points.a/x.unit`"),
    (birth_body(site_id="elsewhere"), "names elsewhere/gw1"),
]


@pytest.mark.parametrize(("payload", "field"), HOSTILE)
def test_a_hostile_birth_is_counted_and_dropped(mirror, payload, field):
    born(mirror, 10)
    notices = mirror.handle(topic("birth"), payload, 1.0)
    assert kinds(notices) == [Kind.MALFORMED]
    assert field in notices[0].detail["error"]
    gw = mirror.find(SITE, GW)
    assert gw is not None and gw.stats()["malformed"] == 1 and gw.twin()["rev"] == 10
    assert mirror.malformed == 1


HOSTILE_DIFFS = [
    ({"from_rev": 12, "to_rev": 11, "events": []}, "to_rev"),
    ({"from_rev": 11, "to_rev": 12, "events": {}}, "`events`"),
    ({"from_rev": 11, "to_rev": 12, "events": [], "historical": "yes"}, "`historical`"),
    (
        {"from_rev": 11, "to_rev": 12, "events": [change(12, "a/x", 1), change(11, "a/x", 1)]},
        "with a rev above",
    ),
    ({"from_rev": 11, "to_rev": 12, "events": [change(13, "a/x", 1)]}, "with a rev above"),
    ({"from_rev": 11, "to_rev": 12, "events": [change(10, "a/x", 1)]}, "with a rev above"),
    ({"from_rev": 11, "to_rev": 12, "events": [7]}, "events[0]"),
    (
        {"from_rev": 11, "to_rev": 12, "events": [{**change(11, "a/x", 1), "point_id": None}]},
        "point_id",
    ),
    ({"from_rev": 11, "to_rev": 12, "events": [{**change(11, "a/x", 1), "type": 3}]}, "type"),
    ({"from_rev": 11, "to_rev": 12, "events": [{**change(11, "a/x", 1), "data": None}]}, "data"),
    ({"from_rev": 11, "to_rev": 12, "events": [{**change(11, "a/x", 1), "data": {}}]}, "quality"),
    ({"from_rev": 11, "to_rev": 12, "events": [{**change(11, "a/x", 1), "ts": "now"}]}, "ts"),
    ({"from_rev": "11", "to_rev": 12, "events": []}, "`from_rev`"),
]


@pytest.mark.parametrize(("body", "field"), HOSTILE_DIFFS)
def test_a_hostile_diff_is_counted_dropped_and_the_next_one_shows_the_gap(mirror, body, field):
    born(mirror, 10)
    payload = json.dumps({"session": "s1", "historical": False, **body}).encode()
    notices = mirror.handle(topic("diff"), payload, 1.0)
    assert kinds(notices) == [Kind.MALFORMED] and field in notices[0].detail["error"]
    gw = mirror.find(SITE, GW)
    assert gw is not None and gw.twin()["rev"] == 10 and list(gw.history) == []
    # The dropped diff's revs are missing for the mirror: the next diff asks for a rebirth.
    assert kinds(mirror.handle(topic("diff"), diff(13, 13), 1.0)) == [Kind.GAP, Kind.REBIRTH]


def test_a_huge_payload_is_refused_before_parsing():
    mirror = MirrorState(P, max_payload=1000)
    notices = mirror.handle(topic("birth"), b" " * 1001, 0.0)
    assert kinds(notices) == [Kind.MALFORMED] and "limit" in notices[0].detail["error"]


@pytest.mark.parametrize(
    "payload",
    [
        b'{"state": "maybe"}',
        b'{"state": "online", "ts": "x"}',
        b'{"state": "online", "session": 3}',
    ],
)
def test_a_hostile_state_is_counted(mirror, payload):
    assert kinds(mirror.handle(topic("state"), payload, 0.0)) == [Kind.MALFORMED]


def test_parsers_name_the_field():
    with pytest.raises(PayloadError, match="`points`"):
        decode_birth(b'{"session": "s", "rev": 1}')
    with pytest.raises(PayloadError, match="`session`"):
        decode_diff(b'{"from_rev": 1, "to_rev": 1, "historical": false, "events": []}')
    with pytest.raises(PayloadError, match="`state`"):
        decode_state(b"{}")
    with pytest.raises(PayloadError, match="limit"):
        decode_state(b'{"state": "online"}', max_payload=5)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=25),
    fate=st.lists(st.sampled_from(["ok", "ok", "ok", "drop", "dup"]), min_size=25, max_size=25),
)
def test_whatever_is_lost_or_repeated_the_mirror_converges_after_a_rebirth(sizes, fate):
    """A stream of diffs, some lost, some repeated; after the rebirths the mirror asked for are
    answered, the twin equals the source's and the history is strictly increasing."""
    mirror = MirrorState(P)
    source: dict[str, dict[str, Any]] = {"a/x": point(0, 0), "a/y": point(0, 0)}
    mirror.handle(topic("birth"), birth(0, source), 0.0)
    rev = 0
    now = 0.0
    pending_rebirth = False
    for size, what in zip(sizes, fate, strict=False):
        events = []
        for _ in range(size):
            rev += 1
            pid = "a/x" if rev % 3 else "a/y"
            events.append(change(rev, pid, rev))
            source[pid] = {
                **point(rev, rev),
                "source_ts": 50.0 + rev,
                "gateway_ts": 100.0 + rev,
            }
        payload = diff(rev - size + 1, rev, events)
        now += 1.0
        if what == "drop":
            continue
        notices = mirror.handle(topic("diff"), payload, now)
        if what == "dup":
            notices += mirror.handle(topic("diff"), payload, now)
        if Kind.REBIRTH in kinds(notices):
            pending_rebirth = True
        if pending_rebirth and what == "ok":
            mirror.handle(topic("birth"), birth(rev, source), now)
            pending_rebirth = False
    # The stream ends; a last diff shows any trailing loss, and the rebirth is answered.
    rev += 1
    source["a/x"] = {**point(rev, rev), "source_ts": 50.0 + rev, "gateway_ts": 100.0 + rev}
    notices = mirror.handle(topic("diff"), diff(rev, rev, [change(rev, "a/x", rev)]), now + 1)
    gw = mirror.find(SITE, GW)
    assert gw is not None
    if gw.awaiting:
        mirror.handle(topic("birth"), birth(rev, source), now + 2)
    assert not gw.awaiting
    twin = gw.twin()
    assert twin["rev"] == rev
    assert twin["points"] == source
    assert rev_order(gw.history)
