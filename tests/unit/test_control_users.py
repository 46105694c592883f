"""Users and API tokens in control.db: what logs in, what is refused, and how alike refusals look.

A real control database in a temporary folder; the clock is a FakeClock where time is the
subject (a token's `last_used`).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests_support import FakeClock

import gateway.control.users as users_module
from gateway.auth.rbac import ROLES, Grant, check
from gateway.control import AccountError, AccountStore, Actor, AuditLog, AuthError, ControlDB
from gateway.control.users import (
    LAST_USED_RESOLUTION_S,
    MAX_PASSWORD,
    TOKEN_PREFIX,
    TOKEN_REFUSED,
    USER_REFUSED,
    check_name,
    check_password,
    check_token_format,
    new_token_secret,
    parse_grant,
    token_digest,
)
from gateway.errors import GatewayError, StoreError

PASSWORD = "correct horse"
ADMIN = [Grant(role="admin")]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[ControlDB]:
    with ControlDB(tmp_path / "control.db") as opened:
        yield opened


@pytest.fixture
def accounts(db: ControlDB, fake_clock: FakeClock) -> AccountStore:
    return AccountStore(db, clock=fake_clock)


@pytest.fixture(scope="module")
def shared_accounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccountStore]:
    """One store with a token, for property tests that only read (hypothesis reruns them)."""
    with ControlDB(tmp_path_factory.mktemp("shared") / "control.db") as opened:
        store = AccountStore(opened)
        store.create_token("agent1", [Grant(role="agent")])
        yield store


# -- pure helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "role", "assets"),
    [
        ("viewer", "viewer", ("*",)),
        ("admin:*", "admin", ("*",)),
        ("supervisor:plant/oven1/*", "supervisor", ("plant/oven1/*",)),
        ("agent:plant/oven[12]/*,utilities/*", "agent", ("plant/oven[12]/*", "utilities/*")),
    ],
)
def test_parse_grant(spec, role, assets):
    grant = parse_grant(spec)
    assert (grant.role, grant.assets) == (role, assets)


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("", "ROLE"),
        ("root", "unknown role 'root'"),
        ("Admin", "unknown role"),
        ("viewer:", "empty asset glob"),
        ("viewer:plant/oven(1|2)", "not allowed"),
        ("viewer:plant/[z-a]", "reversed"),
        ("viewer:plant/[oven", "never closed"),
        ("viewer:a,,b", "empty asset glob"),
        ("viewer:" + "x" * 300, "at most 256"),
        ("viewer:plant\x1b[31m", "not allowed"),
    ],
)
def test_parse_grant_refuses_what_rbac_refuses(spec, says):
    with pytest.raises(AccountError, match=r"grant|ROLE") as info:
        parse_grant(spec)
    assert says in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_parse_grant_never_fails_otherwise(spec):
    try:
        grant = parse_grant(spec)
    except AccountError:
        return
    assert parse_grant(f"{grant.role}:{','.join(grant.assets)}") == grant


@pytest.mark.parametrize("name", ["alice", "oven-agent", "a", "ops.bob@site", "A" * 64])
def test_good_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "-alice", "al ice", "alice\n", "al\x07ice", "a" * 65, "ålice", "a/b", None, 3]
)
def test_hostile_names_are_refused(name):
    with pytest.raises(AccountError, match="not allowed: use 1-64 letters"):
        check_name(name)


def test_a_long_name_is_not_echoed():
    with pytest.raises(AccountError) as info:
        check_name("x" * 10_000)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize(
    ("password", "says"),
    [
        ("short", "too short"),
        ("x" * (MAX_PASSWORD + 1), "at most"),
        ("good pass\0word", "NUL"),
        (b"bytes-password", "text"),
    ],
)
def test_bad_passwords_are_refused_without_echo(password, says):
    with pytest.raises(AccountError, match=says) as info:
        check_password(password)
    assert "pass" not in str(info.value).replace("password", "")


def test_token_secrets_are_random_and_well_formed():
    secrets = {new_token_secret() for _ in range(100)}
    assert len(secrets) == 100
    for secret in secrets:
        assert secret.startswith(TOKEN_PREFIX)
        assert check_token_format(secret) == secret
        assert len(token_digest(secret)) == 64


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "otw_",
        "otw_" + "A" * 42,
        "otw_" + "A" * 44,
        "otw_" + "A" * 42 + "=",  # padded base64
        "otw_" + "A" * 42 + "+",  # standard, not URL-safe, base64
        "xyz_" + "A" * 43,
        "Bearer otw_" + "A" * 43,
        "otw_" + "A" * 42 + "\n",
        "otw_" + "Å" * 43,
        None,
        b"otw_" + b"A" * 43,
    ],
)
def test_malformed_tokens_are_refused_without_echo(secret):
    with pytest.raises(AuthError, match="not an OpsTwin API token") as info:
        check_token_format(secret)
    assert "AAAA" not in str(info.value)
    assert info.value.why == "malformed token"


# -- users --------------------------------------------------------------------------------------


def test_a_user_logs_in_with_their_grants(accounts):
    grants = [Grant(role="supervisor", assets=("plant/oven1/*",)), Grant(role="viewer")]
    accounts.add_user("alice", PASSWORD, grants)
    principal = accounts.authenticate_user("alice", PASSWORD)
    assert (principal.name, principal.kind, principal.grants) == ("alice", "user", tuple(grants))
    assert check(principal, "approve", "plant/oven1/heater").allowed
    assert not check(principal, "approve", "plant/oven2/heater").allowed


def test_the_password_hash_is_argon2_and_never_the_password(accounts, db):
    accounts.add_user("alice", PASSWORD, ADMIN)
    (stored,) = db.read(lambda c: c.execute("SELECT password_hash FROM users").fetchone())
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored


@pytest.mark.parametrize(
    ("name", "password", "why"),
    [
        ("alice", "wrong password", "wrong password"),
        ("mallory", PASSWORD, "unknown user"),
        ("bob", PASSWORD, "user is disabled"),
        ("al\x1bice", PASSWORD, "unknown user"),
        ("alice", "", "password empty or too long"),
        ("alice", "x" * 10_000_000, "password empty or too long"),
    ],
)
def test_refusals_look_alike(accounts, name, password, why):
    accounts.add_user("alice", PASSWORD, ADMIN)
    accounts.add_user("bob", PASSWORD, ADMIN)
    accounts.disable_user("bob")
    with pytest.raises(AuthError) as info:
        accounts.authenticate_user(name, password)
    assert str(info.value) == USER_REFUSED
    assert info.value.why == why


@pytest.mark.parametrize(
    ("name", "password"),
    [
        ("alice", PASSWORD),  # accepted
        ("alice", "wrong password"),
        ("nobody", PASSWORD),
        ("bob", PASSWORD),  # disabled
        ("bad\x00name", PASSWORD),
        ("alice", "x" * 5000),
        ("alice", ""),
    ],
)
def test_every_login_costs_one_argon2_verification(accounts, monkeypatch, name, password):
    # What makes the time alike: an unknown name, a refused one and a good one each verify one
    # argon2 hash (~25 ms); a skipped verification would answer in ~0.1 ms. Counted, not timed.
    accounts.add_user("alice", PASSWORD, ADMIN)
    accounts.add_user("bob", PASSWORD, ADMIN)
    accounts.disable_user("bob")
    calls: list[str] = []
    real = users_module.verify_password

    def counting(password_hash: str, password: str) -> bool:
        calls.append(password_hash)
        return real(password_hash, password)

    monkeypatch.setattr(users_module, "verify_password", counting)
    try:
        accounts.authenticate_user(name, password)
    except AuthError as exc:
        assert str(exc) == USER_REFUSED
    assert len(calls) == 1 and calls[0].startswith("$argon2id$")


def test_a_taken_name_is_refused(accounts):
    accounts.add_user("alice", PASSWORD, ADMIN)
    with pytest.raises(AccountError, match="exists already; `opstwin user passwd alice`"):
        accounts.add_user("alice", "other password", ADMIN)


def test_a_user_needs_a_grant(accounts):
    with pytest.raises(AccountError, match="at least one grant"):
        accounts.add_user("alice", PASSWORD, [])


def test_set_password_replaces_the_old_one(accounts, fake_clock):
    accounts.add_user("alice", PASSWORD, ADMIN)
    fake_clock.advance(5)
    accounts.set_password("alice", "new password!")
    with pytest.raises(AuthError):
        accounts.authenticate_user("alice", PASSWORD)
    assert accounts.authenticate_user("alice", "new password!").name == "alice"
    assert accounts.get_user("alice").updated == fake_clock.now


def test_unknown_users_cannot_be_changed(accounts):
    for change in (
        lambda: accounts.disable_user("ghost"),
        lambda: accounts.set_password("ghost", PASSWORD),
        lambda: accounts.get_user("ghost"),
    ):
        with pytest.raises(AccountError, match="no user named 'ghost'; `opstwin user list`"):
            change()


def test_list_users_by_name(accounts):
    for name in ("carol", "alice", "bob"):
        accounts.add_user(name, PASSWORD, [Grant(role="viewer")])
    accounts.disable_user("bob")
    users = accounts.list_users()
    assert [(u.name, u.disabled) for u in users] == [
        ("alice", False),
        ("bob", True),
        ("carol", False),
    ]


def test_grants_edited_in_the_database_are_refused(accounts, db):
    accounts.add_user("alice", PASSWORD, ADMIN)
    db.write(
        lambda c: c.execute("""UPDATE users SET grants = '[{"role":"root","assets":["*"]}]'""")
    )
    with pytest.raises(StoreError, match="stored grants of user 'alice' are invalid"):
        accounts.authenticate_user("alice", PASSWORD)


def test_a_hash_edited_in_the_database_refuses_the_login(accounts, db):
    accounts.add_user("alice", PASSWORD, ADMIN)
    db.write(lambda c: c.execute("UPDATE users SET password_hash = 'plaintext'"))
    with pytest.raises(AuthError) as info:
        accounts.authenticate_user("alice", "plaintext")
    assert info.value.why == "wrong password"


def test_every_account_change_is_audited_with_its_actor(accounts, db):
    cli = Actor("opstwin-cli", "gateway", {"os_user": "ops"})
    accounts.add_user("alice", PASSWORD, ADMIN, actor=cli)
    accounts.set_password("alice", "another one", actor=cli)
    accounts.disable_user("alice", actor=cli)
    token = accounts.create_token("agent1", [Grant(role="agent")], actor=cli)
    accounts.revoke_token("agent1", actor=cli)
    log = AuditLog(db)
    rows = log.tail(10)
    import json

    entries = [json.loads(r.entry) for r in rows]
    assert [e["action"] for e in entries] == [
        "user.added",
        "user.password_changed",
        "user.disabled",
        "token.created",
        "token.revoked",
    ]
    assert {(e["actor"], e["details"]["os_user"]) for e in entries} == {("opstwin-cli", "ops")}
    assert entries[0]["details"]["grants"] == [{"role": "admin", "assets": ["*"]}]
    every_text = " ".join(r.entry for r in rows)
    assert token.secret not in every_text and token_digest(token.secret) not in every_text
    assert PASSWORD not in every_text
    assert log.verify().ok


def test_a_refused_change_leaves_no_audit_entry(accounts, db):
    accounts.add_user("alice", PASSWORD, ADMIN)
    with pytest.raises(AccountError):
        accounts.add_user("alice", PASSWORD, ADMIN)
    assert AuditLog(db).head()[0] == 1


def test_authenticate_user_async(accounts):
    accounts.add_user("alice", PASSWORD, ADMIN)

    async def both():
        ok = await accounts.authenticate_user_async("alice", PASSWORD)
        with pytest.raises(AuthError):
            await accounts.authenticate_user_async("alice", "nope nope")
        return ok

    assert asyncio.run(both()).name == "alice"


# -- tokens -------------------------------------------------------------------------------------


def test_a_token_authenticates_as_itself(accounts, db):
    token = accounts.create_token("oven-agent", [Grant(role="agent", assets=("plant/oven1/*",))])
    principal = accounts.authenticate_token(token.secret)
    assert (principal.name, principal.kind) == ("oven-agent", "token")
    assert check(principal, "propose", "plant/oven1/heater").allowed
    assert not check(principal, "execute", "plant/oven1/heater").allowed
    (stored,) = db.read(lambda c: c.execute("SELECT secret_sha256 FROM tokens").fetchone())
    assert stored == token_digest(token.secret) and token.secret not in stored


def test_a_revoked_token_cannot_authenticate(accounts):
    token = accounts.create_token("agent1", [Grant(role="agent")])
    revoked = accounts.revoke_token("agent1")
    assert revoked.revoked is not None
    with pytest.raises(AuthError) as info:
        accounts.authenticate_token(token.secret)
    assert str(info.value) == TOKEN_REFUSED and info.value.why == "token is revoked"
    # Revoking again changes nothing, and is not audited twice.
    assert accounts.revoke_token("agent1").revoked == revoked.revoked


def test_an_unknown_token_is_refused_like_a_revoked_one(accounts):
    with pytest.raises(AuthError) as info:
        accounts.authenticate_token(new_token_secret())
    assert str(info.value) == TOKEN_REFUSED and info.value.why == "unknown token"


def test_a_token_name_stays_taken_after_revocation(accounts):
    accounts.create_token("agent1", [Grant(role="agent")])
    accounts.revoke_token("agent1")
    with pytest.raises(AccountError, match="'agent1' is taken \\(revoked"):
        accounts.create_token("agent1", [Grant(role="agent")])


def test_unknown_tokens_cannot_be_revoked(accounts):
    with pytest.raises(AccountError, match="no token named 'ghost'"):
        accounts.revoke_token("ghost")


def test_last_used_is_written_at_most_once_a_minute(accounts, db, fake_clock):
    token = accounts.create_token("agent1", [Grant(role="agent")])
    assert accounts.list_tokens()[0].last_used is None

    def last_used_after_auth() -> float | None:
        accounts.authenticate_token(token.secret)
        db.write(lambda c: None)  # the writer is FIFO: the bookkeeping write is done
        return accounts.list_tokens()[0].last_used

    first = fake_clock.now
    assert last_used_after_auth() == first
    fake_clock.advance(LAST_USED_RESOLUTION_S / 2)
    assert last_used_after_auth() == first
    fake_clock.advance(LAST_USED_RESOLUTION_S)
    assert last_used_after_auth() == fake_clock.now


def test_a_failed_last_used_write_does_not_refuse_the_token(accounts, db, caplog):
    token = accounts.create_token("agent1", [Grant(role="agent")])
    # An audit-only trigger stands in for a failing write (a full disk).
    db.write(
        lambda c: c.execute(
            "CREATE TRIGGER no_touch BEFORE UPDATE ON tokens "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    )
    assert accounts.authenticate_token(token.secret).name == "agent1"
    db.write(lambda c: None)
    assert "could not record a token's last use" in caplog.text


def test_list_tokens_shows_revoked_ones(accounts):
    accounts.create_token("a1", [Grant(role="agent")])
    accounts.create_token("a2", [Grant(role="executor", assets=("plant/*",))])
    accounts.revoke_token("a1")
    tokens = accounts.list_tokens()
    assert [(t.id, t.name, t.revoked is not None) for t in tokens] == [
        (1, "a1", True),
        (2, "a2", False),
    ]
    assert tokens[0].principal().disabled


def test_authenticate_token_async(accounts):
    token = accounts.create_token("agent1", [Grant(role="agent")])
    assert asyncio.run(accounts.authenticate_token_async(token.secret)).name == "agent1"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60) | st.just("otw_") | st.binary(max_size=60))
def test_any_presented_token_is_refused_cleanly(shared_accounts, secret):
    with pytest.raises(AuthError):
        shared_accounts.authenticate_token(secret)


@pytest.mark.parametrize("role", ROLES)
def test_each_role_can_be_given(accounts, role):
    accounts.add_user("u", PASSWORD, [Grant(role=role)])
    assert accounts.authenticate_user("u", PASSWORD).grants[0].role == role


def test_read_only_database_refuses_changes(tmp_path, accounts):
    accounts.add_user("alice", PASSWORD, ADMIN)
    with ControlDB(tmp_path / "control.db", read_only=True) as ro:
        readonly = AccountStore(ro)
        assert [u.name for u in readonly.list_users()] == ["alice"]
        with pytest.raises(StoreError, match="opened read-only"):
            readonly.disable_user("alice")


def test_a_closed_database_says_so(tmp_path):
    db = ControlDB(tmp_path / "control.db")
    db.close()
    db.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        AccountStore(db).list_users()
    with pytest.raises(GatewayError, match="closed"):
        AccountStore(db).create_token("x", [Grant(role="viewer")])


def test_not_a_database_is_refused_with_the_file(tmp_path):
    path = tmp_path / "control.db"
    path.write_bytes(b"this is a text file, not SQLite" * 100)
    with pytest.raises(GatewayError, match=r"control\.db: cannot .* not an SQLite database"):
        ControlDB(path)


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "control.db"
    ControlDB(path).close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO _migrations VALUES (99, 'future', 0)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        ControlDB(path)
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        ControlDB(path, read_only=True)
