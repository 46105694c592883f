"""Users and API tokens in the control database, and turning credentials into a `Principal`.

Users (people: web UI, OPC UA) have an argon2id password hash, made by the OPC UA server's
`hash_password` so that both kinds of login cost the same; tokens (agents) are a random secret
shown once at creation, `otw_` + 43 URL-safe base64 characters (32 bytes), of which only the
SHA-256 is kept: a secret with 256 bits of entropy needs no slow hash, and a lookup by digest
costs one index probe per request. Grants are stored as JSON and validated by `rbac.Grant` both
ways, so a row edited by hand cannot grant what `user add` would refuse.

Every change (`add_user`, `disable_user`, `set_password`, `create_token`, `revoke_token`) commits
together with its audit entry, in one transaction on the writer thread: an account never
changes without a record of it. Password hashing happens before, on the caller's thread, so the
writer is never held for the ~25 ms it takes.

`authenticate_user` gives one error for an unknown user, a wrong password and a disabled
account, and costs one argon2 verification in each case (an unknown name is checked against a
dummy hash), so neither the message nor the time tells which names exist. The real reason is in
the error's `why`, for the audit entry and the log, never for the client.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from pydantic import TypeAdapter, ValidationError

from gateway.audit.chain import AuditEntry
from gateway.auth.passwords import dummy_hash, hash_password, is_argon2_hash, verify_password
from gateway.auth.rbac import PRINCIPAL_NAME_PATTERN, ROLES, Grant, Principal
from gateway.control.audit import append_rows
from gateway.control.db import ControlDB
from gateway.errors import GatewayError, StoreError

log = logging.getLogger(__name__)

__all__ = [
    "GATEWAY",
    "LAST_USED_RESOLUTION_S",
    "MAX_PASSWORD",
    "MIN_PASSWORD",
    "TOKEN_PREFIX",
    "AccountError",
    "AccountStore",
    "Actor",
    "AuthError",
    "NewToken",
    "TokenRecord",
    "UserRecord",
    "check_name",
    "check_password",
    "check_token_format",
    "new_token_secret",
    "parse_grant",
    "token_digest",
]

TOKEN_PREFIX = "otw_"
# 32 random bytes in unpadded URL-safe base64.
_TOKEN_RE = re.compile(rf"{TOKEN_PREFIX}[A-Za-z0-9_-]{{43}}")
_NAME_RE = re.compile(PRINCIPAL_NAME_PATTERN)
MIN_PASSWORD = 8
# argon2 takes any length, but a password is typed or pasted: beyond this it is a stray file.
MAX_PASSWORD = 1024
# A token's `last_used` is written at most this often: once a minute tells an operator whether
# an agent is alive without a write per request.
LAST_USED_RESOLUTION_S = 60.0

USER_REFUSED = "wrong username or password"
TOKEN_REFUSED = "API token refused: unknown or revoked"

_GRANTS = TypeAdapter(tuple[Grant, ...])

ActorKind = Literal["user", "token", "policy", "gateway"]


class AuthError(GatewayError):
    """Credentials refused. `str()` is what the client may see; `why` is the real reason."""

    def __init__(self, message: str, *, why: str, principal: str | None = None) -> None:
        super().__init__(message)
        self.why = why
        self.principal = principal


class AccountError(GatewayError, ValueError):
    """A change to users or tokens that cannot be made (taken or unknown name, bad password)."""


class Actor(NamedTuple):
    """Who makes an account change, as its audit entry records them."""

    name: str = "gateway"
    kind: ActorKind = "gateway"
    details: Mapping[str, Any] | None = None


# The default actor: the gateway itself (a later admin route passes the principal).
GATEWAY = Actor()


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A stored user, without its password hash."""

    name: str
    grants: tuple[Grant, ...]
    disabled: bool
    created: float
    updated: float

    def principal(self) -> Principal:
        """The user as `rbac.check` sees them."""
        return Principal(name=self.name, kind="user", grants=self.grants, disabled=self.disabled)


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A stored API token, without its secret."""

    id: int
    name: str
    grants: tuple[Grant, ...]
    created: float
    last_used: float | None
    revoked: float | None

    def principal(self) -> Principal:
        """The token as `rbac.check` sees it (a revoked one is disabled)."""
        return Principal(
            name=self.name, kind="token", grants=self.grants, disabled=self.revoked is not None
        )


@dataclass(frozen=True, slots=True)
class NewToken:
    """A token just created: its record, and the secret, which is never shown again."""

    record: TokenRecord
    secret: str


# -- pure helpers ---------------------------------------------------------------------------------


def check_name(name: Any, what: str = "name") -> str:
    """Return `name` if it is a valid user or token name; raise AccountError saying why."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        shown = repr(name) if isinstance(name, str) and len(name) <= 80 else "given"
        raise AccountError(
            f"{what} {shown} is not allowed: use 1-64 letters, digits and `_ . @ -`, starting "
            "with a letter or digit (the same rule as OPC UA usernames)"
        )
    return name


def check_password(password: Any) -> str:
    """Return `password` if it may be set; raise AccountError saying why (never echoing it)."""
    if not isinstance(password, str):
        raise AccountError(f"a password is text, not {type(password).__name__}")
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password is too short: at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise AccountError(
            f"the password is {len(password)} characters long; at most {MAX_PASSWORD}"
        )
    if "\0" in password:
        # Some clients (C strings) would cut it there and log in with the prefix.
        raise AccountError("the password holds a NUL character; choose one without")
    return password


def parse_grant(spec: str) -> Grant:
    """Parse `ROLE` or `ROLE:GLOB[,GLOB…]` (e.g. `supervisor:plant/oven1/*`) into a Grant."""
    if not isinstance(spec, str) or not spec:
        raise AccountError("a grant is `ROLE` or `ROLE:GLOB[,GLOB…]`, e.g. `viewer:plant/*`")
    role, sep, globs = spec.partition(":")
    if role not in ROLES:
        raise AccountError(
            f"grant {spec[:80]!r}: unknown role {role[:40]!r}; one of {', '.join(ROLES)}"
        )
    data: dict[str, Any] = {"role": role}
    if sep:
        data["assets"] = globs.split(",")
    try:
        return Grant.model_validate(data)
    except ValidationError as exc:
        raise AccountError(f"grant {spec[:80]!r}: {_first_error(exc)}") from None


def new_token_secret() -> str:
    """Return a new API token secret: `otw_` and 32 random bytes in URL-safe base64."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(secret: str) -> str:
    """Return the SHA-256 (hex) of a token secret, as stored."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def check_token_format(secret: Any) -> str:
    """Return `secret` if it looks like an API token; raise AuthError (never echoing it)."""
    if not isinstance(secret, str) or not _TOKEN_RE.fullmatch(secret):
        raise AuthError(
            f"not an OpsTwin API token: expected `{TOKEN_PREFIX}` and 43 URL-safe base64 "
            "characters, as `opstwin token create` prints it",
            why="malformed token",
        )
    return secret


# -- the store ------------------------------------------------------------------------------------


class AccountStore:
    """Users and API tokens of one control database."""

    def __init__(self, db: ControlDB, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self._clock = clock

    # users

    def add_user(
        self, name: str, password: str, grants: Iterable[Grant], *, actor: Actor = GATEWAY
    ) -> UserRecord:
        """Create a user; AccountError if the name is taken or anything is invalid."""
        check_name(name, "user name")
        grant_list = _checked_grants(grants)
        password_hash = hash_password(check_password(password))
        now = self._clock()

        def add(conn: Any) -> None:
            if conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise AccountError(
                    f"user {name!r} exists already; `opstwin user passwd {name}` sets a new "
                    "password"
                )
            conn.execute(
                "INSERT INTO users(name, password_hash, grants, disabled, created, updated) "
                "VALUES (?, ?, ?, 0, ?, ?)",
                (name, password_hash, _grants_json(grant_list), now, now),
            )
            self._audit(conn, actor, "user.added", name, now, {"grants": _grants_data(grant_list)})

        self.db.write(add)
        return UserRecord(name, grant_list, False, now, now)

    def list_users(self) -> list[UserRecord]:
        """Every user, by name."""
        rows = self.db.read(
            lambda conn: conn.execute(
                "SELECT name, grants, disabled, created, updated FROM users ORDER BY name"
            ).fetchall()
        )
        return [_user(row) for row in rows]

    def get_user(self, name: str) -> UserRecord:
        """One user; AccountError if there is none of that name."""
        row = self.db.read(lambda conn: _user_row(conn, name))
        if row is None:
            raise AccountError(_no_user(name))
        return _user(row[:1] + row[2:])

    def disable_user(self, name: str, *, actor: Actor = GATEWAY) -> UserRecord:
        """Disable a user (kept, for the audit log's sake, but refused at every login)."""
        now = self._clock()

        def disable(conn: Any) -> None:
            if _user_row(conn, name) is None:
                raise AccountError(_no_user(name))
            conn.execute("UPDATE users SET disabled = 1, updated = ? WHERE name = ?", (now, name))
            self._audit(conn, actor, "user.disabled", name, now)

        self.db.write(disable)
        return self.get_user(name)

    def set_password(self, name: str, password: str, *, actor: Actor = GATEWAY) -> None:
        """Replace a user's password."""
        password_hash = hash_password(check_password(password))
        now = self._clock()

        def change(conn: Any) -> None:
            if _user_row(conn, name) is None:
                raise AccountError(_no_user(name))
            conn.execute(
                "UPDATE users SET password_hash = ?, updated = ? WHERE name = ?",
                (password_hash, now, name),
            )
            self._audit(conn, actor, "user.password_changed", name, now)

        self.db.write(change)

    def authenticate_user(self, name: str, password: str) -> Principal:
        """Return the user's Principal; AuthError (one message for every reason) if refused."""
        row = None
        if isinstance(name, str) and _NAME_RE.fullmatch(name):
            row = self.db.read(lambda conn: _user_row(conn, name))
        if not isinstance(password, str) or not password or len(password) > MAX_PASSWORD:
            # Still pay for one verification: the time must not say the name exists.
            _verify(dummy_hash(), "x")
            raise AuthError(USER_REFUSED, why="password empty or too long", principal=_safe(name))
        if row is None:
            _verify(dummy_hash(), password)
            raise AuthError(USER_REFUSED, why="unknown user", principal=_safe(name))
        if not _verify(row[1], password):
            raise AuthError(USER_REFUSED, why="wrong password", principal=name)
        user = _user(row[:1] + row[2:])
        if user.disabled:
            raise AuthError(USER_REFUSED, why="user is disabled", principal=name)
        return user.principal()

    def login_record(self, name: str) -> tuple[str, Principal] | None:
        """Return (password hash, Principal) of a user, or None if there is none of that name.

        Read-only, for a login checked elsewhere (the OPC UA server rations and caches its own
        password checks); a disabled user is returned, with a disabled Principal.
        """
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            return None
        row = self.db.read(lambda conn: _user_row(conn, name))
        if row is None:
            return None
        return row[1], _user(row[:1] + row[2:]).principal()

    async def authenticate_user_async(self, name: str, password: str) -> Principal:
        """`authenticate_user` off the event loop (argon2 takes ~25 ms)."""
        return await asyncio.to_thread(self.authenticate_user, name, password)

    # tokens

    def create_token(
        self, name: str, grants: Iterable[Grant], *, actor: Actor = GATEWAY
    ) -> NewToken:
        """Create an API token; its secret is in the result and nowhere else."""
        check_name(name, "token name")
        grant_list = _checked_grants(grants)
        secret = new_token_secret()
        now = self._clock()

        def create(conn: Any) -> int:
            taken = conn.execute("SELECT revoked FROM tokens WHERE name = ?", (name,)).fetchone()
            if taken is not None:
                was = " (revoked, but its name stays in the audit log)" if taken[0] else ""
                raise AccountError(f"token name {name!r} is taken{was}; choose another name")
            cursor = conn.execute(
                "INSERT INTO tokens(name, secret_sha256, grants, created) VALUES (?, ?, ?, ?)",
                (name, token_digest(secret), _grants_json(grant_list), now),
            )
            token_id = int(cursor.lastrowid)
            self._audit(
                conn,
                actor,
                "token.created",
                name,
                now,
                {"id": token_id, "grants": _grants_data(grant_list)},
            )
            return token_id

        token_id = self.db.write(create)
        return NewToken(TokenRecord(token_id, name, grant_list, now, None, None), secret)

    def list_tokens(self) -> list[TokenRecord]:
        """Every token, revoked ones too, by id."""
        rows = self.db.read(
            lambda conn: conn.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY id").fetchall()
        )
        return [_token(row) for row in rows]

    def revoke_token(self, name: str, *, actor: Actor = GATEWAY) -> TokenRecord:
        """Revoke a token by name; revoking it again changes nothing."""
        now = self._clock()

        def revoke(conn: Any) -> tuple[Any, ...]:
            row = conn.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise AccountError(
                    f"no token named {_safe(name)!r}; `opstwin token list` shows them"
                )
            if row[5] is None:
                conn.execute("UPDATE tokens SET revoked = ? WHERE name = ?", (now, name))
                self._audit(conn, actor, "token.revoked", name, now, {"id": row[0]})
                row = (*row[:5], now)
            return tuple(row)

        return _token(self.db.write(revoke))

    def authenticate_token(self, secret: str) -> Principal:
        """Return the token's Principal; AuthError if it is malformed, unknown or revoked."""
        check_token_format(secret)
        digest = token_digest(secret)
        row = self.db.read(
            lambda conn: conn.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE secret_sha256 = ?", (digest,)
            ).fetchone()
        )
        if row is None:
            raise AuthError(TOKEN_REFUSED, why="unknown token")
        token = _token(row)
        if token.revoked is not None:
            raise AuthError(TOKEN_REFUSED, why="token is revoked", principal=token.name)
        now = self._clock()
        if token.last_used is None or now - token.last_used >= LAST_USED_RESOLUTION_S:
            # Not waited for: a login must not queue behind the writer, and a failed
            # bookkeeping write must not refuse a valid token.
            future = self.db.submit(
                lambda conn: conn.execute(
                    "UPDATE tokens SET last_used = ? WHERE id = ?", (now, token.id)
                )
            )
            future.add_done_callback(_log_failure)
        return token.principal()

    async def authenticate_token_async(self, secret: str) -> Principal:
        """`authenticate_token` off the event loop."""
        return await asyncio.to_thread(self.authenticate_token, secret)

    def _audit(
        self,
        conn: Any,
        actor: Actor,
        action: str,
        target: str,
        now: float,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        merged = {**(actor.details or {}), **(details or {})}
        entry = AuditEntry(
            ts=now,
            actor=actor.name,
            actor_kind=actor.kind,
            action=action,
            target=target,
            decision="done",
            details=merged or None,
        )
        append_rows(conn, [entry])


# -- helpers --------------------------------------------------------------------------------------

_TOKEN_COLUMNS = "id, name, grants, created, last_used, revoked"


def _checked_grants(grants: Iterable[Grant]) -> tuple[Grant, ...]:
    result = tuple(grants)
    if not result:
        raise AccountError("at least one grant is needed, e.g. `viewer` or `agent:plant/oven1/*`")
    for grant in result:
        if not isinstance(grant, Grant):
            raise AccountError(f"a grant is an rbac.Grant, not {type(grant).__name__}")
    return result


def _grants_data(grants: tuple[Grant, ...]) -> list[dict[str, Any]]:
    return [grant.model_dump(mode="json") for grant in grants]


def _grants_json(grants: tuple[Grant, ...]) -> str:
    return json.dumps(_grants_data(grants), separators=(",", ":"))


def _load_grants(text: str, whose: str) -> tuple[Grant, ...]:
    try:
        return _GRANTS.validate_json(text)
    except ValidationError as exc:
        # Only a row edited outside this store gets here; refuse it rather than guess.
        raise StoreError(
            f"the stored grants of {whose} are invalid ({_first_error(exc)}); the row was "
            "changed outside opstwin: recreate the account"
        ) from None


def _user_row(conn: Any, name: str) -> tuple[Any, ...] | None:
    row = conn.execute(
        "SELECT name, password_hash, grants, disabled, created, updated FROM users WHERE name = ?",
        (name,),
    ).fetchone()
    return None if row is None else tuple(row)


def _user(row: tuple[Any, ...]) -> UserRecord:
    name, grants, disabled, created, updated = row
    grant_list = _load_grants(grants, f"user {name!r}")
    return UserRecord(name, grant_list, bool(disabled), created, updated)


def _token(row: tuple[Any, ...]) -> TokenRecord:
    token_id, name, grants, created, last_used, revoked = row
    return TokenRecord(
        token_id, name, _load_grants(grants, f"token {name!r}"), created, last_used, revoked
    )


def _no_user(name: str) -> str:
    return f"no user named {_safe(name)!r}; `opstwin user list` shows them"


def _safe(name: Any) -> str:
    # Names in errors and logs come from clients: keep them short, and repr() escapes the rest.
    return name[:64] if isinstance(name, str) else type(name).__name__


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


def _verify(password_hash: str, password: str) -> bool:
    if not is_argon2_hash(password_hash):
        log.error("stored password hash is not an argon2 hash; reset it with `opstwin user passwd`")
        verify_password(dummy_hash(), password)  # still pay one verification, then refuse
        return False
    return verify_password(password_hash, password)


def _log_failure(future: Any) -> None:
    exc = future.exception()
    if exc is not None:
        log.warning("could not record a token's last use: %s", exc)
