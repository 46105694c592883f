"""Who may log in to the OPC UA server: argon2 password hashes mapped to gateway roles.

No asyncua here (the config model imports this module, and every config load would pay for
it); the asyncua UserManager that asks a UserStore lives in `server.py`.

asyncua activates sessions synchronously on the event loop, so a password check cannot be moved
to a thread. Two things keep it from stalling the loop: a credential that verified once is
remembered (as an HMAC under a per-process random key, never the password), so a SCADA client
that reconnects costs microseconds; and failed checks are rationed, so a password-guessing client
cannot buy more than a few argon2 verifications per window. hash_password() uses the OWASP
argon2id parameters (19 MiB, 2 passes, 1 lane: ~25 ms per check) rather than argon2-cffi's
heavier defaults (~150 ms) for the same reason (`gateway/auth/passwords.py`). Any argon2 hash is
accepted; its own parameters decide its cost.

The ration is kept per username and per client address, not across all of them: with one global
ration, four parallel guessers once made a real user's correct login fail (issue 13). Within
`failure_window_s`:
- an address with `max_failures_per_address` failed checks gets no more checks, for any user;
- a username with `max_failures_per_user` failed checks is checked only for addresses with no
  failure of their own in the window: its owner, logging in from a clean address, still gets
  in, while each guessing address gets at most one more try at it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.auth.passwords import dummy_hash as _dummy_hash
from gateway.auth.passwords import hash_password, is_argon2_hash
from gateway.auth.passwords import verify_password as _verify
from gateway.ratelog import RateLimitedLog

if TYPE_CHECKING:
    from gateway.opcua_server.config import OpcuaUser

log = logging.getLogger(__name__)

__all__ = [
    "ANONYMOUS",
    "ANONYMOUS_ROLE",
    "Account",
    "UserStore",
    "hash_password",
    "is_argon2_hash",
]

ANONYMOUS = "anonymous"
ANONYMOUS_ROLE = "viewer"

# Usernames or addresses with recent failures kept before expired ones are swept out.
_MAX_TRACKED = 1024


@dataclass(frozen=True, slots=True)
class Account:
    """Who a session belongs to: the username (or `anonymous`) and the gateway role."""

    username: str
    role: str


class UserStore:
    """Checks usernames and passwords against argon2 hashes; pure apart from the clock."""

    def __init__(
        self,
        users: Iterable[OpcuaUser],
        *,
        allow_anonymous: bool = False,
        allow_unsecured: bool = False,
        max_failures_per_user: int = 5,
        max_failures_per_address: int = 20,
        failure_window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._users = {u.username: (u.password_hash, u.role) for u in users}
        self.allow_anonymous = allow_anonymous
        self.allow_unsecured = allow_unsecured
        self.max_failures_per_user = max_failures_per_user
        self.max_failures_per_address = max_failures_per_address
        self.failure_window_s = failure_window_s
        self._clock = clock
        self._key = os.urandom(32)
        self._verified: dict[str, bytes] = {}
        # Times of failed checks per username and per client address, within the window.
        self._by_user: dict[str, deque[float]] = {}
        self._by_address: dict[str, deque[float]] = {}
        self._lines = RateLimitedLog(log, failure_window_s)

    def authenticate(
        self,
        username: str | None,
        password: str | None,
        *,
        secured: bool = True,
        address: str | None = None,
    ) -> Account | None:
        """Return the account for these credentials, or None (and log why) to refuse them.

        `address` is the client's IP address; failed checks are rationed per address and per
        username.
        """
        if not secured and not self.allow_unsecured:
            # A channel without signing is only possible when the `None` policy is offered.
            log.warning("OPC UA login refused: unsecured channel and `None` is not configured")
            return None
        if username is None and password is None:
            if self.allow_anonymous:
                return Account(ANONYMOUS, ANONYMOUS_ROLE)
            log.info("OPC UA login refused: anonymous access is not allowed")
            return None
        if not username or password is None:
            log.info("OPC UA login refused: a username needs a password")
            return None
        entry = self._users.get(username)
        digest = self._digest(username, password)
        remembered = self._verified.get(username)
        if entry is not None and remembered is not None and hmac.compare_digest(remembered, digest):
            return Account(username, entry[1])
        where = address or "an unknown address"
        if self._throttled(username, where):
            return None
        ok = _verify(entry[0] if entry else _dummy_hash(), password) and entry is not None
        if not ok:
            now = self._clock()
            for table, key in ((self._by_user, username), (self._by_address, where)):
                if len(table) >= _MAX_TRACKED and key not in table:
                    # Names come from clients: a spray of made-up usernames must not grow this.
                    for old in list(table):
                        self._recent(table, old, now)
                table.setdefault(key, deque()).append(now)
            log.warning(
                "OPC UA login refused for %.64r from %s: wrong username or password",
                username,
                where,
            )
            return None
        assert entry is not None
        self._verified[username] = digest
        return Account(username, entry[1])

    def _digest(self, username: str, password: str) -> bytes:
        message = username.encode() + b"\0" + password.encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _throttled(self, username: str, address: str) -> bool:
        now = self._clock()
        by_address = self._recent(self._by_address, address, now)
        by_user = self._recent(self._by_user, username, now)
        if by_address >= self.max_failures_per_address:
            self._lines.log(
                logging.WARNING,
                f"address:{address}",
                "OPC UA logins throttled for %s: %d failed password checks in %g s; refusing "
                "new credentials from it until the window clears (sessions that logged in "
                "before, and other addresses, are not affected)",
                address,
                by_address,
                self.failure_window_s,
            )
            return True
        if by_user >= self.max_failures_per_user and by_address > 0:
            self._lines.log(
                logging.WARNING,
                f"user:{username}",
                "OPC UA logins throttled for user %.64r: %d failed password checks in %g s; "
                "addresses that failed are refused until the window clears (a login from "
                "another address is still checked)",
                username,
                by_user,
                self.failure_window_s,
            )
            return True
        return False

    def _recent(self, table: dict[str, deque[float]], key: str, now: float) -> int:
        failures = table.get(key)
        if failures is None:
            return 0
        while failures and failures[0] <= now - self.failure_window_s:
            failures.popleft()
        if not failures:
            # Usernames and addresses come from clients: keep no empty entry for either.
            del table[key]
            return 0
        return len(failures)
