"""Refused client writes, coalesced and capped so that a client cannot flood the event log.

Each limiter stands for one refusal, named by the OPC UA status the client got (`status`, e.g.
BadUserAccessDenied, BadNotWritable, BadTooManyOperations), which its records carry.

Issue 13: a viewer repeating 100-item writes produced 3,056 WriteRefused events a second (5 MB of
database and 7.6 MB of log in 10 s). Every refused attempt is still counted, in few records:

- the first refusal of a (session, user, point) is recorded at once, with count 1, so that a
  single mistaken write shows up immediately;
- repeats of it within `window_s` become one record when the window ends, with their count, the
  last value and the first and last time (a client that keeps writing costs one record per
  window);
- each record costs the session and the user one unit of a budget (`per_session`, `per_user`
  per `period_s`); a user's sessions share the user's budget, so opening more sessions buys
  nothing. Beyond the budget, attempts are only counted: one `suppressed` record per user and
  window gives their count and how many points they touched.

So a session costs at most `per_session` records per period plus one suppressed record per window,
and the counts of all records add up to the attempts. Pure apart from the clocks; not
thread-safe (the server calls it from the event loop only).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RefusalLimiter", "WriteRefusal"]

# Sessions and clients named in a suppressed record; the count says how many attempts there were.
_MAX_NAMED = 8


@dataclass(frozen=True, slots=True)
class WriteRefusal:
    """Refused write attempts of a user: one, several coalesced, or the suppressed rest."""

    user: str
    role: str
    point_id: str | None  # None in a suppressed record: attempts beyond the budget, any point
    value: Any  # the last value written (None in a suppressed record)
    count: int
    first_ts: float
    last_ts: float
    sessions: tuple[str, ...]
    clients: tuple[str, ...]
    points: int = 1  # distinct points among the attempts
    status: str = "BadUserAccessDenied"  # the OPC UA status every one of these attempts got

    @property
    def suppressed(self) -> bool:
        """Whether this record stands for attempts beyond the session's or user's budget."""
        return self.point_id is None


@dataclass(slots=True)
class _Window:
    ends: float
    user: str
    role: str
    session: str
    client: str
    count: int = 0
    value: Any = None
    first_ts: float = 0.0
    last_ts: float = 0.0


@dataclass(slots=True)
class _Overflow:
    ends: float
    role: str
    count: int = 0
    first_ts: float = 0.0
    last_ts: float = 0.0
    sessions: dict[str, None] = field(default_factory=dict)  # ordered set
    clients: dict[str, None] = field(default_factory=dict)
    points: set[str] = field(default_factory=set)


class RefusalLimiter:
    """Turns refused write attempts into few WriteRefusal records whose counts add up."""

    def __init__(
        self,
        *,
        status: str = "BadUserAccessDenied",
        window_s: float = 10.0,
        per_session: int = 20,
        per_user: int = 60,
        period_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.status = status
        self.window_s = window_s
        self.per_session = per_session
        self.per_user = per_user
        self.period_s = period_s
        self._clock = clock
        self._wall = wall
        self._windows: dict[tuple[str, str, str], _Window] = {}  # (session, user, point)
        self._overflow: dict[str, _Overflow] = {}  # user
        self._spent_session: dict[str, deque[float]] = {}
        self._spent_user: dict[str, deque[float]] = {}

    def record(
        self, *, session: str, client: str, user: str, role: str, point_id: str, value: Any
    ) -> list[WriteRefusal]:
        """Count one refused attempt; return the records to write now (none, or this one)."""
        now, ts = self._clock(), self._wall()
        key = (session, user, point_id)
        out: list[WriteRefusal] = []
        window = self._windows.get(key)
        if window is not None and now >= window.ends:
            # Ended but not flushed yet: its repeats are recorded first, and a client still
            # writing continues in the next window.
            out = self._close(key, window, now)
            window = self._windows.get(key)
        if window is not None:
            if window.count == 0:
                window.first_ts = ts
            window.count += 1
            window.value = value
            window.last_ts = ts
            return out
        if self._spend(session, user, now):
            self._windows[key] = _Window(now + self.window_s, user, role, session, client)
            out.append(
                WriteRefusal(
                    user,
                    role,
                    point_id,
                    value,
                    1,
                    ts,
                    ts,
                    (session,),
                    (client,),
                    status=self.status,
                )
            )
        else:
            self._overflow_add(user, role, session, client, point_id, 1, ts, ts, now)
        return out

    def flush(self) -> list[WriteRefusal]:
        """Return the records of windows that have ended."""
        now = self._clock()
        out: list[WriteRefusal] = []
        for key, window in list(self._windows.items()):
            if now >= window.ends:
                out += self._close(key, window, now)
        for user, over in list(self._overflow.items()):
            if now >= over.ends:
                out.append(self._suppressed(user, self._overflow.pop(user)))
        self._forget_spent(now)
        return out

    def flush_all(self) -> list[WriteRefusal]:
        """Return every pending record, window ended or not (at shutdown)."""
        now = self._clock()
        out: list[WriteRefusal] = []
        for key, window in list(self._windows.items()):
            del self._windows[key]
            if window.count:
                out += self._coalesced(key, window, now)
        out += [self._suppressed(user, over) for user, over in self._overflow.items()]
        self._overflow.clear()
        return out

    # -- helpers ----------------------------------------------------------------------------------

    def _close(self, key: tuple[str, str, str], window: _Window, now: float) -> list[WriteRefusal]:
        del self._windows[key]
        if not window.count:
            return []
        out = self._coalesced(key, window, now)
        if out:
            # A client still writing the same point gets a new window, not a record per attempt.
            self._windows[key] = _Window(
                now + self.window_s, window.user, window.role, window.session, window.client
            )
        return out

    def _coalesced(
        self, key: tuple[str, str, str], window: _Window, now: float
    ) -> list[WriteRefusal]:
        session, user, point_id = key
        if self._spend(session, user, now):
            return [
                WriteRefusal(
                    user,
                    window.role,
                    point_id,
                    window.value,
                    window.count,
                    window.first_ts,
                    window.last_ts,
                    (session,),
                    (window.client,),
                    status=self.status,
                )
            ]
        self._overflow_add(
            user,
            window.role,
            session,
            window.client,
            point_id,
            window.count,
            window.first_ts,
            window.last_ts,
            now,
        )
        return []

    def _spend(self, session: str, user: str, now: float) -> bool:
        by_session = self._spent_session.setdefault(session, deque())
        by_user = self._spent_user.setdefault(user, deque())
        for spent in (by_session, by_user):
            while spent and spent[0] <= now - self.period_s:
                spent.popleft()
        if len(by_session) >= self.per_session or len(by_user) >= self.per_user:
            return False
        by_session.append(now)
        by_user.append(now)
        return True

    def _overflow_add(
        self,
        user: str,
        role: str,
        session: str,
        client: str,
        point_id: str,
        count: int,
        first_ts: float,
        last_ts: float,
        now: float,
    ) -> None:
        over = self._overflow.get(user)
        if over is None:
            over = self._overflow[user] = _Overflow(now + self.window_s, role, first_ts=first_ts)
        over.count += count
        over.first_ts = min(over.first_ts, first_ts)
        over.last_ts = max(over.last_ts, last_ts)
        if len(over.sessions) < _MAX_NAMED:
            over.sessions[session] = None
        if len(over.clients) < _MAX_NAMED:
            over.clients[client] = None
        over.points.add(point_id)

    def _suppressed(self, user: str, over: _Overflow) -> WriteRefusal:
        return WriteRefusal(
            user,
            over.role,
            None,
            None,
            over.count,
            over.first_ts,
            over.last_ts,
            tuple(over.sessions),
            tuple(over.clients),
            points=len(over.points),
            status=self.status,
        )

    def _forget_spent(self, now: float) -> None:
        # Sessions come and go: drop the budgets of those that spent nothing for a period.
        for table in (self._spent_session, self._spent_user):
            for name, spent in list(table.items()):
                while spent and spent[0] <= now - self.period_s:
                    spent.popleft()
                if not spent:
                    del table[name]
