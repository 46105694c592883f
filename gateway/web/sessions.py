"""Web UI sessions: who is logged in on which browser, and the one-time first-admin link.

Pure but for the clock. A session is a random 256-bit secret in an HttpOnly, SameSite=Strict
cookie; the store keeps only its SHA-256, so a dump of the process's memory or a log line with a
key in it does not hand out a live session, and a lookup's timing says nothing about the secret.
Each session carries its own CSRF token, which every form posts back (gateway/web/security.py).

Sessions live in memory: a restart of the gateway logs everyone out, which an appliance
restarted for an upgrade or a reload can afford, and nothing about a session survives on disk.
A session ends after `idle_s` without a request or `max_s` after its login, whichever first,
when its user logs out, or when an admin disables the user (checked on every request: the
session names the user, the grants are read afresh each time).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MAX_SESSIONS", "Session", "SessionStore", "SetupLink", "csrf_matches"]

# One gateway serves a control room, not the internet: beyond this many live sessions the oldest
# is dropped, so that a script logging in in a loop cannot grow the process.
MAX_SESSIONS = 1000


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(slots=True)
class Session:
    """One logged-in browser."""

    user: str
    csrf: str
    created: float
    last_seen: float


class SessionStore:
    """Live sessions by the digest of their cookie's secret."""

    def __init__(
        self,
        *,
        idle_s: float,
        max_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.idle_s = idle_s
        self.max_s = max_s
        self._clock = clock
        self._max = max_sessions
        self._sessions: dict[str, Session] = {}

    def create(self, user: str) -> tuple[str, Session]:
        """A new session for `user`: its cookie secret (shown once) and the session."""
        self._sweep()
        while len(self._sessions) >= self._max:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].last_seen)
            del self._sessions[oldest]
        secret = secrets.token_urlsafe(32)
        now = self._clock()
        session = Session(user=user, csrf=secrets.token_urlsafe(32), created=now, last_seen=now)
        self._sessions[_digest(secret)] = session
        return secret, session

    def get(self, secret: str | None) -> Session | None:
        """The live session of a cookie's secret, touched; None if unknown or expired."""
        if not secret:
            return None
        key = _digest(secret)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_seen > self.idle_s or now - session.created > self.max_s:
            del self._sessions[key]
            return None
        session.last_seen = now
        return session

    def end(self, secret: str | None) -> None:
        """Log out: the session of this secret ends (nothing happens for an unknown one)."""
        if secret:
            self._sessions.pop(_digest(secret), None)

    def end_user(self, user: str) -> int:
        """End every session of `user` (disabled, or their password changed); how many."""
        keys = [k for k, s in self._sessions.items() if s.user == user]
        for key in keys:
            del self._sessions[key]
        return len(keys)

    def __len__(self) -> int:
        return len(self._sessions)

    def _sweep(self) -> None:
        now = self._clock()
        for key, s in list(self._sessions.items()):
            if now - s.last_seen > self.idle_s or now - s.created > self.max_s:
                del self._sessions[key]


def csrf_matches(session: Session, offered: str | None) -> bool:
    """Whether a form's CSRF token is its session's (constant time)."""
    return offered is not None and hmac.compare_digest(session.csrf.encode(), offered.encode())


class SetupLink:
    """The one-time link that makes the first admin while none exists (no default password).

    The gateway logs it at start; it works once, for `valid_s`, and only while no enabled admin
    exists. Its secret is compared in constant time.
    """

    def __init__(self, *, valid_s: float = 3600.0, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.secret = secrets.token_urlsafe(24)
        self.expires = clock() + valid_s
        self.used = False

    def valid(self, offered: str | None) -> bool:
        """Whether `offered` is this link's secret, unused and not expired."""
        if self.used or offered is None or self._clock() > self.expires:
            return False
        return hmac.compare_digest(self.secret.encode(), offered.encode("utf-8", "replace"))

    def spend(self) -> None:
        """The link made its admin: it never works again."""
        self.used = True
