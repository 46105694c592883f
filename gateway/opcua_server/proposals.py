"""The contract between the OPC UA server and the policy engine: a client's write, its answer.

A client's Value write to a writable point, by a session whose role may propose changes, is
handed to the engine as a `ClientWrite`; the engine answers with a `WriteAnswer` whose `status`
is the name of the OPC UA status code the client gets. No asyncua and no I/O here: the engine
imports this module, and `InFlight` (how many writes may wait for the engine at once) is plain
bookkeeping, tested without a server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.auth.rbac import Principal

__all__ = ["ClientWrite", "InFlight", "ProposeHook", "WriteAnswer"]


@dataclass(frozen=True, slots=True)
class ClientWrite:
    """A client's write to a writable point, to be decided by the policy engine."""

    point_id: str
    value: Any  # what the client sent (Variant's Value), unchecked
    user: str  # login name, or "anonymous"
    role: str  # the session's gateway role
    principal: Principal | None  # gateway.auth.rbac.Principal of the session (None: anonymous)
    session: str
    client: str  # peer address


@dataclass(frozen=True, slots=True)
class WriteAnswer:
    """The engine's answer to a ClientWrite: the status the client gets, and why."""

    # An OPC UA status code NAME from asyncua's ua.StatusCodes: "Good", "BadOutOfRange",
    # "BadUserAccessDenied", "BadRequestNotComplete" (waits for approval), ...
    status: str
    text: str  # one line for the log: why
    proposal_id: str | None = None


ProposeHook = Callable[[ClientWrite], Awaitable[WriteAnswer]]


class InFlight:
    """Client writes waiting for the engine: at most one per session and `cap` in all.

    A write counts from the moment it is handed to the engine until the engine returns, even
    when the client was answered BadTimeout before that: a hung engine then holds at most `cap`
    calls, and every further write is refused at once instead of piling up behind it.
    """

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError(f"at least one write must be allowed in flight, not {cap}")
        self.cap = cap
        self._sessions: set[str] = set()

    def __len__(self) -> int:
        return len(self._sessions)

    def take(self, session: str) -> str | None:
        """Claim the session's slot; return None if claimed, else why not (for the log)."""
        if session in self._sessions:
            return "the session's previous write is still being decided"
        if len(self._sessions) >= self.cap:
            return f"{self.cap} writes are being decided already (max_proposals_in_flight)"
        self._sessions.add(session)
        return None

    def release(self, session: str) -> None:
        """Free the session's slot (a slot not taken is ignored)."""
        self._sessions.discard(session)
