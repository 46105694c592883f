"""Refused OPC UA writes: coalesced per session, user and point, and capped per session and user."""

from __future__ import annotations

import random

import pytest
from tests_support import FakeClock

from gateway.opcua_server.refusals import RefusalLimiter, WriteRefusal

WINDOW = 10.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def limiter(clock: FakeClock, **kw) -> RefusalLimiter:
    kw = {"window_s": WINDOW, "per_session": 5, "per_user": 8, "period_s": 60.0, **kw}
    return RefusalLimiter(clock=clock, wall=clock, **kw)


def attempt(lim: RefusalLimiter, point: str, value=1.0, *, session="s1", user="op"):
    return lim.record(
        session=session, client="10.0.0.5", user=user, role="viewer", point_id=point, value=value
    )


def total(records: list[WriteRefusal]) -> int:
    return sum(r.count for r in records)


def test_a_single_refused_write_is_recorded_at_once(clock):
    lim = limiter(clock)
    (record,) = attempt(lim, "a/sp", 55.0)
    assert (record.user, record.role, record.point_id, record.value) == (
        "op",
        "viewer",
        "a/sp",
        55.0,
    )
    assert record.count == 1 and not record.suppressed
    assert record.sessions == ("s1",) and record.clients == ("10.0.0.5",)
    clock.advance(WINDOW + 1)
    assert lim.flush() == []


def test_repeats_within_the_window_become_one_record_with_their_count(clock):
    lim = limiter(clock)
    attempt(lim, "a/sp", 1.0)
    first = clock.now
    for value in (2.0, 3.0, 4.0):
        clock.advance(1)
        assert attempt(lim, "a/sp", value) == []
    assert lim.flush() == []  # the window is still open
    clock.advance(WINDOW)
    (record,) = lim.flush()
    assert (record.point_id, record.count, record.value) == ("a/sp", 3, 4.0)
    assert record.first_ts == first + 1 and record.last_ts == first + 3


def test_a_client_that_keeps_writing_costs_one_record_per_window(clock):
    lim = limiter(clock)
    records = attempt(lim, "a/sp")
    for _ in range(60):  # a minute of one write per second
        clock.advance(1)
        records += attempt(lim, "a/sp") + lim.flush()
    records += lim.flush_all()
    assert len(records) <= 60 / WINDOW + 2
    assert total(records) == 61


def test_one_session_writing_many_points_is_capped_and_the_rest_counted(clock):
    lim = limiter(clock)
    records = []
    for i in range(100):
        records += attempt(lim, f"a/p{i}")
    assert len(records) == 5  # per_session
    clock.advance(WINDOW)
    (overflow,) = lim.flush()
    assert overflow.suppressed and overflow.point_id is None and overflow.value is None
    assert (overflow.count, overflow.points) == (95, 95)
    assert overflow.user == "op" and overflow.sessions == ("s1",)
    assert total(records) + overflow.count == 100


def test_a_user_opening_more_sessions_does_not_get_more_records(clock):
    lim = limiter(clock)
    records = []
    for session in ("s1", "s2", "s3"):
        for i in range(10):
            records += attempt(lim, f"a/p{i}", session=session)
    assert len(records) == 8  # per_user, though each session alone had room for 5
    records += lim.flush_all()
    (overflow,) = [r for r in records if r.suppressed]
    assert overflow.sessions == ("s1", "s2", "s3")
    assert total(records) == 30


def test_users_do_not_share_a_budget(clock):
    lim = limiter(clock)
    for i in range(20):
        attempt(lim, f"a/p{i}", user="mallory")
    assert len(attempt(lim, "a/sp", user="op", session="s2")) == 1


def test_the_budget_comes_back_after_the_period(clock):
    lim = limiter(clock)
    for i in range(10):
        attempt(lim, f"a/p{i}")
    assert attempt(lim, "a/new") == []
    clock.advance(61)
    lim.flush()
    assert len(attempt(lim, "a/newer")) == 1


def test_counts_always_add_up_to_the_attempts(clock):
    rng = random.Random(13)
    lim = limiter(clock)
    records: list[WriteRefusal] = []
    attempts = 0
    start = clock.now
    for _ in range(5000):
        clock.advance(rng.random() * 0.2)
        session = rng.choice(["s1", "s2", "s3", "s4"])
        user = {"s1": "op", "s2": "op", "s3": "anonymous", "s4": "eve"}[session]
        records += attempt(lim, f"a/p{rng.randrange(40)}", session=session, user=user)
        attempts += 1
        if rng.random() < 0.05:
            records += lim.flush()
    records += lim.flush_all()
    assert total(records) == attempts
    # Minutes of a flood from three users: bounded by the budgets, not by the attempts.
    elapsed = clock.now - start
    bound = (elapsed / 60 + 1) * 3 * 8 + 3 * (elapsed / WINDOW + 2)
    assert len(records) <= bound < attempts / 10
    assert lim.flush_all() == []  # nothing pending, nothing counted twice


def test_every_record_carries_the_status_of_its_limiter(clock):
    lim = limiter(clock, status="BadTooManyOperations")
    records = attempt(lim, "a/sp")
    for i in range(30):
        records += attempt(lim, f"a/p{i}")  # beyond the session's budget: a suppressed record
    records += lim.flush_all()
    assert any(r.suppressed for r in records)
    assert {r.status for r in records} == {"BadTooManyOperations"}
    assert {r.status for r in attempt(limiter(clock), "a/sp")} == {"BadUserAccessDenied"}
