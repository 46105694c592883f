"""Who may log in to the OPC UA server: argon2 password hashes mapped to gateway principals.

Two kinds of users log in: those of `opcua_server.users` in the site config, each a Principal
with one site-wide Grant of its role, and those of control.db (`opstwin user add`), looked up by
name through an `AccountLookup` each time they log in, so that a user disabled or given other
grants there is seen at the next login. A name in both is the config's (warned about when the
store is made): the config is what the site deployed, and one name must not open with two
passwords. A session's role is the highest of its grants' roles (`ROLES` order); the Principal
itself, with its asset-scoped grants, goes with every write the session proposes.

No asyncua here (the config model imports this module, and every config load would pay for
it); the asyncua UserManager that asks a UserStore lives in `server.py`.

asyncua activates sessions synchronously on the event loop, so a password check cannot be moved
to a thread. Two things keep it from stalling the loop: a credential that verified once is
remembered (as an HMAC under a per-process random key, never the password), so a SCADA client
that reconnects costs microseconds; and failed checks are rationed, so a password-guessing client
cannot buy more than a few argon2 verifications per window. hash_password() uses the OWASP
argon2id parameters (19 MiB, 2 passes, 1 lane: ~25 ms per check) rather than argon2-cffi's
heavier defaults (~150 ms) for the same reason (`gateway/auth/passwords.py`). Any argon2 hash is
accepted; its own parameters decide its cost. Both kinds of users get the same remembering and
rationing; a remembered credential of a control.db user still costs one lookup by name (an
indexed SQLite read, on the loop), so that a disabled account or a changed password takes effect
at once.

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
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from gateway.auth.passwords import dummy_hash as _dummy_hash
from gateway.auth.passwords import hash_password, is_argon2_hash
from gateway.auth.passwords import verify_password as _verify
from gateway.auth.rbac import PRINCIPAL_NAME_PATTERN, ROLES, Grant, Principal
from gateway.ratelog import RateLimitedLog

if TYPE_CHECKING:
    from gateway.opcua_server.config import OpcuaUser

log = logging.getLogger(__name__)

__all__ = [
    "ANONYMOUS",
    "ANONYMOUS_ROLE",
    "Account",
    "AccountLookup",
    "StoredLogin",
    "UserStore",
    "control_db_logins",
    "hash_password",
    "highest_role",
    "is_argon2_hash",
]

ANONYMOUS = "anonymous"
ANONYMOUS_ROLE = "viewer"

# Usernames or addresses with recent failures kept before expired ones are swept out.
_MAX_TRACKED = 1024
_NAME_RE = re.compile(PRINCIPAL_NAME_PATTERN)

AccountSource = Literal["config", "control.db", "anonymous"]


@dataclass(frozen=True, slots=True)
class StoredLogin:
    """A control.db user as a login needs it: the argon2 hash, and who the user is."""

    password_hash: str = field(repr=False)
    principal: Principal


# Returns the control.db user of that name, or None if there is none.
AccountLookup = Callable[[str], "StoredLogin | None"]


class SupportsLoginRecord(Protocol):
    """What `control_db_logins` needs of an AccountStore (gateway/control/users.py)."""

    def login_record(self, name: str) -> tuple[str, Principal] | None: ...


def control_db_logins(accounts: SupportsLoginRecord) -> AccountLookup:
    """Return an AccountLookup over an AccountStore's `login_record`."""

    def lookup(name: str) -> StoredLogin | None:
        record = accounts.login_record(name)
        return None if record is None else StoredLogin(*record)

    return lookup


def highest_role(grants: Iterable[Grant]) -> str | None:
    """Return the highest role among `grants` (in `ROLES` order), or None if there is none."""
    return max((g.role for g in grants), key=ROLES.index, default=None)


@dataclass(frozen=True, slots=True)
class Account:
    """Who a session belongs to: the username (or `anonymous`), role and Principal."""

    username: str
    role: str
    principal: Principal | None = None  # None: anonymous
    source: AccountSource = "anonymous"


@dataclass(frozen=True, slots=True)
class _Entry:
    password_hash: str = field(repr=False)
    principal: Principal
    source: AccountSource


class _Unavailable(Exception):
    """control.db could not be asked about a user (already logged)."""


class UserStore:
    """Checks usernames and passwords against argon2 hashes; pure apart from the clock and
    the `accounts` lookup."""

    def __init__(
        self,
        users: Iterable[OpcuaUser],
        *,
        accounts: AccountLookup | None = None,
        allow_anonymous: bool = False,
        allow_unsecured: bool = False,
        max_failures_per_user: int = 5,
        max_failures_per_address: int = 20,
        failure_window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._users = {
            u.username: _Entry(
                u.password_hash,
                Principal(name=u.username, kind="user", grants=(Grant(role=u.role),)),
                "config",
            )
            for u in users
        }
        self.accounts = accounts
        self.allow_anonymous = allow_anonymous
        self.allow_unsecured = allow_unsecured
        self.max_failures_per_user = max_failures_per_user
        self.max_failures_per_address = max_failures_per_address
        self.failure_window_s = failure_window_s
        self._clock = clock
        self._key = os.urandom(32)
        # username -> (HMAC of the credential, the hash it verified against): a changed
        # password (a new hash) is checked again.
        self._verified: dict[str, tuple[bytes, str]] = {}
        # Times of failed checks per username and per client address, within the window.
        self._by_user: dict[str, deque[float]] = {}
        self._by_address: dict[str, deque[float]] = {}
        self._lines = RateLimitedLog(log, failure_window_s)
        self._warn_shadowed()

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
        where = address or "an unknown address"
        try:
            entry = self._entry(username)
        except _Unavailable:
            # Not the client's failure: not counted against its address or the name.
            return None
        digest = self._digest(username, password)
        remembered = self._verified.get(username)
        if (
            entry is not None
            and remembered is not None
            and remembered[1] == entry.password_hash
            and hmac.compare_digest(remembered[0], digest)
        ):
            return self._admit(username, entry, where)
        if self._throttled(username, where):
            return None
        ok = _verify(entry.password_hash if entry else _dummy_hash(), password)
        if not ok or entry is None:
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
        self._verified[username] = (digest, entry.password_hash)
        return self._admit(username, entry, where)

    def current_principal(self, account: Account) -> Principal | None:
        """Return the account's Principal as control.db has it now (disabled if it is gone).

        A session lives for hours: a control.db user disabled or regranted meanwhile is seen
        at its next write, not only at its next login. Config users and anonymous sessions
        are returned as they logged in.
        """
        if account.source != "control.db" or account.principal is None:
            return account.principal
        try:
            entry = self._entry(account.username)
        except _Unavailable:
            entry = None
        if entry is None or entry.source != "control.db":
            # Gone, unreadable, or now shadowed by a config user: the engine denies a disabled
            # principal and records it.
            return account.principal.model_copy(update={"disabled": True})
        return entry.principal

    # -- helpers ----------------------------------------------------------------------------------

    def _entry(self, username: str) -> _Entry | None:
        """The config or control.db user of that name; _Unavailable if control.db fails."""
        entry = self._users.get(username)
        if entry is not None or self.accounts is None or not _NAME_RE.fullmatch(username):
            return entry
        try:
            stored = self.accounts(username)
        except Exception as exc:
            self._lines.log(
                logging.ERROR,
                "control.db",
                "OPC UA login of %.64r refused: cannot read the user from control.db: %s",
                username,
                exc,
            )
            raise _Unavailable from exc
        if stored is None:
            return None
        return _Entry(stored.password_hash, stored.principal, "control.db")

    def _admit(self, username: str, entry: _Entry, where: str) -> Account | None:
        principal = entry.principal
        role = highest_role(principal.grants)
        if principal.disabled or role is None:
            # Rationed by name: a SCADA reconnecting in a loop with a disabled account must
            # not fill the log. Not counted as a failure: its address may serve other users.
            self._lines.log(
                logging.WARNING,
                f"disabled:{username}",
                "OPC UA login refused for %.64r from %s: the account %s in control.db",
                username,
                where,
                "is disabled" if principal.disabled else "has no grants",
            )
            return None
        return Account(username, role, principal, entry.source)

    def _warn_shadowed(self) -> None:
        if self.accounts is None:
            return
        for name in self._users:
            try:
                shadowed = self.accounts(name) is not None
            except Exception as exc:
                log.warning("OPC UA server: cannot look %r up in control.db: %s", name, exc)
                continue
            if shadowed:
                log.warning(
                    "OPC UA server: user %r is both in opcua_server.users and in control.db; "
                    "it logs in as the config says (password and role %s), and `opstwin user` "
                    "commands do not affect it: remove it from one of the two",
                    name,
                    self._users[name].principal.grants[0].role,
                )

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
