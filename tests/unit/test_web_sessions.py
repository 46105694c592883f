"""Web UI sessions and the first-admin link: expiry, logout, CSRF matching, bounds (pure)."""

from __future__ import annotations

from tests_support import FakeClock

from gateway.web.login import _next
from gateway.web.render import duration, num
from gateway.web.sessions import SessionStore, SetupLink, csrf_matches


def store(clock: FakeClock, **kwargs: float) -> SessionStore:
    return SessionStore(idle_s=600, max_s=3600, clock=clock, **kwargs)  # type: ignore[arg-type]


def test_a_session_is_found_by_its_secret_and_touched(fake_clock: FakeClock) -> None:
    sessions = store(fake_clock)
    secret, session = sessions.create("sam")
    fake_clock.advance(500)
    assert sessions.get(secret) is session
    fake_clock.advance(500)  # 1000 s after login, but only 500 s idle
    assert sessions.get(secret) is session
    assert sessions.get(secret + "x") is None
    assert sessions.get("") is None and sessions.get(None) is None


def test_an_idle_session_ends(fake_clock: FakeClock) -> None:
    sessions = store(fake_clock)
    secret, _ = sessions.create("sam")
    fake_clock.advance(601)
    assert sessions.get(secret) is None
    assert len(sessions) == 0, "an expired session is dropped, not kept"


def test_a_busy_session_still_ends_at_its_maximum_age(fake_clock: FakeClock) -> None:
    sessions = store(fake_clock)
    secret, _ = sessions.create("sam")
    for _ in range(7):
        fake_clock.advance(500)
        assert sessions.get(secret) is not None  # never idle for long
    fake_clock.advance(101)
    assert sessions.get(secret) is None, "3601 s after the login: over, however busy"


def test_logout_and_disabling_a_user_end_their_sessions(fake_clock: FakeClock) -> None:
    sessions = store(fake_clock)
    a, _ = sessions.create("sam")
    b, _ = sessions.create("sam")
    c, _ = sessions.create("vera")
    sessions.end(a)
    assert sessions.get(a) is None and sessions.get(b) is not None
    assert sessions.end_user("sam") == 1
    assert sessions.get(b) is None and sessions.get(c) is not None
    sessions.end("never-issued")  # nothing happens


def test_secrets_and_csrf_tokens_are_distinct_and_random(fake_clock: FakeClock) -> None:
    sessions = store(fake_clock)
    made = [sessions.create("sam") for _ in range(50)]
    secrets = {s for s, _ in made}
    tokens = {session.csrf for _, session in made}
    assert len(secrets) == 50 and len(tokens) == 50 and not secrets & tokens
    assert all(len(s) >= 40 for s in secrets)


def test_the_store_keeps_no_secret_in_the_clear(fake_clock: FakeClock) -> None:
    sessions = store(fake_clock)
    secret, _ = sessions.create("sam")
    assert secret not in sessions._sessions  # keyed by its SHA-256


def test_a_login_loop_cannot_grow_the_store_past_its_bound(fake_clock: FakeClock) -> None:
    sessions = SessionStore(idle_s=600, max_s=3600, clock=fake_clock, max_sessions=10)
    first, _ = sessions.create("bot")
    for _ in range(25):
        fake_clock.advance(1)
        sessions.create("bot")
    assert len(sessions) == 10
    assert sessions.get(first) is None, "the least recently used goes first"


def test_csrf_matches_only_its_own_session(fake_clock: FakeClock) -> None:
    sessions = store(fake_clock)
    _, mine = sessions.create("sam")
    _, theirs = sessions.create("vera")
    assert csrf_matches(mine, mine.csrf)
    assert not csrf_matches(mine, theirs.csrf)
    assert not csrf_matches(mine, None)
    assert not csrf_matches(mine, "")
    assert not csrf_matches(mine, mine.csrf[:-1])


def test_the_setup_link_works_once_and_expires(fake_clock: FakeClock) -> None:
    link = SetupLink(valid_s=3600, clock=fake_clock)
    assert link.valid(link.secret)
    assert not link.valid(link.secret + "x") and not link.valid(None) and not link.valid("")
    link.spend()
    assert not link.valid(link.secret)
    late = SetupLink(valid_s=3600, clock=fake_clock)
    fake_clock.advance(3601)
    assert not late.valid(late.secret)


def test_after_login_only_a_page_of_the_ui_is_a_destination() -> None:
    assert _next("/ui/proposals/p-1") == "/ui/proposals/p-1"
    assert _next("/ui/twin?window=1h") == "/ui/twin?window=1h"
    for hostile in (
        "https://evil.example/",
        "//evil.example/ui/",
        "/ui//evil.example",
        "/ui/\\evil",
        "/ui/x\r\nSet-Cookie: a=b",
        "javascript:alert(1)",
        "/twin",
        None,
        "",
    ):
        assert _next(hostile) == "/ui/approvals", hostile


def test_values_are_shown_as_an_operator_reads_them() -> None:
    assert num(182.7312) == "182.7"
    assert num(10000.0) == "10000"
    assert num(0.00061234) == "0.0006123"
    assert num(float("nan")) == "—" and num(None) == "—"
    assert num(True) == "true" and num(7) == "7" and num("AUTO") == "AUTO"
    assert duration(45) == "45 s" and duration(720) == "12 min" and duration(12_600) == "3.5 h"
    assert duration(-5) == "0 s" and duration(float("inf")) == "—"
