"""Password hashing, logins against argon2 hashes (config and control.db users), and the
server certificate on disk."""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests_support import FakeClock

from gateway.auth.rbac import Grant, Principal
from gateway.control import AccountStore, ControlDB
from gateway.errors import GatewayError, StoreError
from gateway.opcua_server import users as users_module
from gateway.opcua_server.config import OpcuaUser
from gateway.opcua_server.server import GatewayUser, TwinUserManager, ensure_certificate
from gateway.opcua_server.trust import ClientTrust
from gateway.opcua_server.users import (
    Account,
    StoredLogin,
    UserStore,
    control_db_logins,
    hash_password,
    highest_role,
    is_argon2_hash,
)

HASH = hash_password("s3cret")
DB_PASSWORD = "correct horse"


def who(account: Account | None) -> tuple[str, str] | None:
    """(username, role) of a login, or None if refused."""
    return None if account is None else (account.username, account.role)


@pytest.fixture
def verifications(monkeypatch):
    """Count argon2 verifications (the expensive step a login may skip)."""
    calls: list[str] = []
    real = users_module._verify

    def counting(password_hash: str, password: str) -> bool:
        calls.append(password)
        return real(password_hash, password)

    monkeypatch.setattr(users_module, "_verify", counting)
    return calls


def store(**kw) -> UserStore:
    accounts = [
        OpcuaUser(username="op", password_hash=HASH, role="supervisor"),
        OpcuaUser(username="viewer1", password_hash=hash_password("look"), role="viewer"),
    ]
    return UserStore(accounts, **kw)


def test_hash_password_makes_argon2id_that_verifies():
    assert HASH.startswith("$argon2id$")
    assert is_argon2_hash(HASH)
    assert hash_password("s3cret") != HASH  # salted


@pytest.mark.parametrize(
    "text", ["s3cret", "", "$argon2id$garbage", "$2b$12$abcdefghijklmnopqrstuv"]
)
def test_other_strings_are_not_argon2_hashes(text):
    assert not is_argon2_hash(text)


def test_an_empty_password_cannot_be_hashed():
    with pytest.raises(ValueError):
        hash_password("")


def test_the_right_password_gives_the_users_role():
    assert who(store().authenticate("op", "s3cret")) == ("op", "supervisor")
    assert who(store().authenticate("viewer1", "look")) == ("viewer1", "viewer")


@pytest.mark.parametrize(
    ("username", "password"),
    [("op", "wrong"), ("op", ""), ("nobody", "s3cret"), ("op", None), ("", "s3cret")],
)
def test_wrong_credentials_are_refused(username, password):
    assert store().authenticate(username, password) is None


def test_an_unknown_user_costs_a_verification_like_a_wrong_password(verifications):
    store().authenticate("nobody", "guess")
    assert verifications == ["guess"]


def test_anonymous_is_a_viewer_only_when_allowed():
    assert store().authenticate(None, None) is None
    assert who(store(allow_anonymous=True).authenticate(None, None)) == ("anonymous", "viewer")


def test_an_unsecured_channel_is_refused_unless_the_none_policy_is_offered():
    assert store().authenticate("op", "s3cret", secured=False) is None
    assert store(allow_anonymous=True).authenticate(None, None, secured=False) is None
    relaxed = store(allow_unsecured=True)
    assert who(relaxed.authenticate("op", "s3cret", secured=False)) == ("op", "supervisor")


def test_a_reconnect_with_the_same_password_skips_argon2(verifications):
    users = store()
    for _ in range(3):
        assert who(users.authenticate("op", "s3cret")) == ("op", "supervisor")
    assert verifications == ["s3cret"]
    # A different password is checked again, and refused.
    assert users.authenticate("op", "other") is None
    assert verifications == ["s3cret", "other"]


HERE, THERE = "10.0.0.5", "10.0.0.9"


def test_guessing_one_account_does_not_lock_out_another(verifications):
    users = store(max_failures_per_user=3, max_failures_per_address=10, clock=FakeClock())
    for i in range(6):
        assert users.authenticate("op", f"guess{i}", address=HERE) is None
    # op is rationed: three checks, the other three refused without argon2.
    assert verifications == ["guess0", "guess1", "guess2"]
    # Issue 13: four parallel guessers on one account made a real user's login fail.
    assert who(users.authenticate("viewer1", "look", address=HERE)) == ("viewer1", "viewer")


def test_an_address_that_keeps_guessing_is_throttled_for_every_account(verifications):
    users = store(max_failures_per_user=3, max_failures_per_address=4, clock=FakeClock())
    for name, guess in (("op", "a"), ("viewer1", "b"), ("nobody", "c"), ("x", "d")):
        assert users.authenticate(name, guess, address=HERE) is None
    assert users.authenticate("viewer1", "look", address=HERE) is None  # not even checked
    assert verifications == ["a", "b", "c", "d"]
    assert who(users.authenticate("viewer1", "look", address=THERE)) == ("viewer1", "viewer")


def test_the_owner_of_an_account_under_attack_still_logs_in_from_a_clean_address(verifications):
    users = store(max_failures_per_user=3, max_failures_per_address=10, clock=FakeClock())
    for i in range(5):
        users.authenticate("op", f"guess{i}", address=HERE)
    assert who(users.authenticate("op", "s3cret", address=THERE)) == ("op", "supervisor")
    # A clean address gets one try while the account is rationed; a second guesser there
    # gets no more than that one.
    third = "10.0.0.77"
    assert users.authenticate("op", "wrong", address=third) is None
    assert users.authenticate("op", "wrong again", address=third) is None
    assert verifications == ["guess0", "guess1", "guess2", "s3cret", "wrong"]


def test_throttles_clear_after_the_window_and_remembered_logins_skip_them(verifications, caplog):
    clock = FakeClock()
    users = store(
        max_failures_per_user=3, max_failures_per_address=5, failure_window_s=10.0, clock=clock
    )
    assert users.authenticate("op", "s3cret", address=HERE)
    with caplog.at_level(logging.WARNING, logger="gateway.opcua_server.users"):
        for i in range(8):
            assert users.authenticate("op", f"guess{i}", address=HERE) is None
        for i in range(2):
            assert users.authenticate("viewer1", f"other{i}", address=HERE) is None
        for _ in range(3):
            assert users.authenticate("viewer1", "look", address=HERE) is None  # address rationed
    assert verifications == ["s3cret", "guess0", "guess1", "guess2", "other0", "other1"]
    # One line per rationed account and address, not one per refused attempt.
    throttled = [r.getMessage() for r in caplog.records if "throttled" in r.getMessage()]
    assert len(throttled) == 2, throttled
    assert any("'op'" in line for line in throttled)
    assert any(f"throttled for {HERE}" in line for line in throttled)
    # A credential that verified before still works at once: a SCADA reconnect is not locked out.
    assert who(users.authenticate("op", "s3cret", address=HERE)) == ("op", "supervisor")
    clock.advance(10.5)
    assert who(users.authenticate("viewer1", "look", address=HERE)) == ("viewer1", "viewer")


def test_the_user_manager_hands_asyncua_a_non_admin_user_with_the_role(tmp_path):
    from asyncua.crypto.permission_rules import UserRole

    manager = TwinUserManager(store(), ClientTrust(tmp_path, trust_all=True))
    user = manager.get_user(None, username="op", password="s3cret", certificate=b"peer-cert")
    assert isinstance(user, GatewayUser)
    assert (user.name, user.gateway_role, user.role) == ("op", "supervisor", UserRole.User)
    # No peer certificate: the channel is not secured, and `None` is not offered.
    assert manager.get_user(None, username="op", password="s3cret", certificate=b"") is None
    assert manager.get_user(None, username="op", password="bad", certificate=b"c") is None


def test_the_user_manager_refuses_an_untrusted_certificate_before_the_password(
    tmp_path, verifications, opcua_certificates
):
    from asyncua import ua
    from asyncua.common.utils import ServiceError

    trust = ClientTrust(tmp_path / "opcua-server")
    trust.prepare()
    manager = TwinUserManager(store(), trust)
    der = (opcua_certificates / "client" / "own" / "cert.der").read_bytes()
    with pytest.raises(ServiceError) as refused:
        manager.get_user(None, username="op", password="s3cret", certificate=der)
    assert refused.value.code == ua.StatusCodes.BadCertificateUntrusted
    assert verifications == []  # an untrusted client costs no argon2


# -- principals ------------------------------------------------------------------------------------


def test_a_config_user_is_a_principal_with_one_site_wide_grant_of_its_role():
    account = store().authenticate("op", "s3cret")
    assert account is not None and account.source == "config"
    assert account.principal == Principal(
        name="op", kind="user", grants=(Grant(role="supervisor", assets=("*",)),)
    )
    anonymous = store(allow_anonymous=True).authenticate(None, None)
    assert anonymous is not None and anonymous.principal is None


@pytest.mark.parametrize(
    ("roles", "highest"),
    [
        (["viewer"], "viewer"),
        (["viewer", "agent"], "agent"),
        (["supervisor", "agent", "viewer"], "supervisor"),
        (["supervisor", "executor"], "executor"),
        (["admin", "viewer"], "admin"),
        ([], None),
    ],
)
def test_the_highest_role_follows_the_documented_order(roles, highest):
    assert highest_role(Grant(role=r) for r in roles) == highest


# -- control.db users ------------------------------------------------------------------------------


@pytest.fixture
def accounts(tmp_path: Path) -> Iterator[AccountStore]:
    """A real control.db with three users: a scoped agent, a supervisor, and a disabled one."""
    with ControlDB(tmp_path / "control.db") as db:
        store = AccountStore(db)
        store.add_user(
            "ana", DB_PASSWORD, [Grant(role="viewer"), Grant(role="agent", assets=("line1/*",))]
        )
        store.add_user("sam", DB_PASSWORD, [Grant(role="supervisor", assets=("utilities/*",))])
        store.add_user("gone", DB_PASSWORD, [Grant(role="executor")])
        store.disable_user("gone")
        yield store


@pytest.fixture
def lookups(accounts: AccountStore) -> list[str]:
    """The names looked up in control.db, in order."""
    return []


def db_store(accounts: AccountStore, lookups: list[str], **kw) -> UserStore:
    real = control_db_logins(accounts)

    def counting(name: str) -> StoredLogin | None:
        lookups.append(name)
        return real(name)

    made = store(accounts=counting, **kw)
    # Made with a look for each config user (a name in both is warned about): not counted.
    assert lookups == ["op", "viewer1"]
    lookups.clear()
    return made


def test_login_record_gives_the_hash_and_principal_of_a_user_and_nothing_for_others(accounts):
    record = accounts.login_record("ana")
    assert record is not None
    password_hash, principal = record
    assert is_argon2_hash(password_hash)
    assert principal == accounts.get_user("ana").principal()
    gone = accounts.login_record("gone")
    assert gone is not None and gone[1].disabled
    for name in ("nobody", "", "x" * 65, "ana; DROP TABLE users", "../ana", None, 42):
        assert accounts.login_record(name) is None


def test_a_control_db_user_logs_in_with_its_grants_and_highest_role(accounts, lookups):
    users = db_store(accounts, lookups)
    account = users.authenticate("ana", DB_PASSWORD, address="10.0.0.5")
    assert who(account) == ("ana", "agent")
    assert account is not None and account.source == "control.db"
    assert account.principal == accounts.get_user("ana").principal()
    assert account.principal is not None and account.principal.grants[1].assets == ("line1/*",)
    assert who(users.authenticate("sam", DB_PASSWORD)) == ("sam", "supervisor")


def test_a_wrong_password_or_a_disabled_control_db_user_is_refused(
    accounts, lookups, verifications, caplog
):
    users = db_store(accounts, lookups, clock=FakeClock())
    assert users.authenticate("ana", "wrong horse", address="10.0.0.5") is None
    with caplog.at_level(logging.WARNING, logger="gateway.opcua_server.users"):
        for _ in range(3):  # a SCADA reconnecting with a disabled account
            assert users.authenticate("gone", DB_PASSWORD, address="10.0.0.6") is None
    lines = [r.getMessage() for r in caplog.records if "disabled" in r.getMessage()]
    assert len(lines) == 1 and "'gone'" in lines[0]
    # The right password of a disabled account is not a failure of its address, which may
    # serve other users (one SCADA host, many accounts).
    assert users._by_address.get("10.0.0.6") is None
    assert who(users.authenticate("sam", DB_PASSWORD, address="10.0.0.6")) == ("sam", "supervisor")


def test_an_unknown_or_hostile_name_costs_a_verification_and_no_odd_lookup(
    accounts, lookups, verifications
):
    users = db_store(accounts, lookups)
    hostile = ["nobody", "x" * 100_000, "ana' OR '1'='1", "ana\x00", "../../etc/passwd", "ÄNA"]
    for name in hostile:
        assert users.authenticate(name, "guess") is None
    assert len(verifications) == len(hostile)  # like a wrong password: the time tells nothing
    assert lookups == ["nobody"]  # only a well-formed name reaches control.db


def test_a_remembered_control_db_login_still_sees_a_disable_or_a_new_password(
    accounts, lookups, verifications
):
    users = db_store(accounts, lookups)
    assert who(users.authenticate("sam", DB_PASSWORD)) == ("sam", "supervisor")
    assert who(users.authenticate("sam", DB_PASSWORD)) == ("sam", "supervisor")
    assert verifications == [DB_PASSWORD]  # the reconnect skipped argon2, not the lookup
    assert lookups == ["sam", "sam"]

    accounts.set_password("sam", "a new password")
    assert users.authenticate("sam", DB_PASSWORD) is None  # checked again, and refused
    assert who(users.authenticate("sam", "a new password")) == ("sam", "supervisor")
    accounts.disable_user("sam")
    assert users.authenticate("sam", "a new password") is None


def test_a_name_in_the_config_and_control_db_logs_in_as_configured_with_a_warning(tmp_path, caplog):
    with ControlDB(tmp_path / "control.db") as db:
        accounts = AccountStore(db)
        accounts.add_user("op", DB_PASSWORD, [Grant(role="admin")])
        with caplog.at_level(logging.WARNING, logger="gateway.opcua_server.users"):
            users = store(accounts=control_db_logins(accounts))
        (line,) = [r.getMessage() for r in caplog.records if "both" in r.getMessage()]
        assert "'op'" in line and "opcua_server.users" in line and "control.db" in line
        assert who(users.authenticate("op", "s3cret")) == ("op", "supervisor")
        assert users.authenticate("op", DB_PASSWORD) is None


def test_control_db_failing_refuses_its_users_without_blaming_the_client(accounts, caplog):
    def broken(name: str) -> StoredLogin | None:
        raise StoreError("control.db: disk I/O error")

    users = store(accounts=broken, max_failures_per_address=1)
    with caplog.at_level(logging.ERROR, logger="gateway.opcua_server.users"):
        for _ in range(5):
            assert users.authenticate("ana", DB_PASSWORD, address="10.0.0.5") is None
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1 and "disk I/O error" in lines[0]
    # Not counted against the address: config users from it still log in.
    assert who(users.authenticate("op", "s3cret", address="10.0.0.5")) == ("op", "supervisor")


def test_the_current_principal_follows_control_db_through_a_long_session(accounts, lookups):
    users = db_store(accounts, lookups)
    account = users.authenticate("sam", DB_PASSWORD)
    assert account is not None and account.principal is not None
    assert users.current_principal(account) == account.principal
    accounts.disable_user("sam")
    now = users.current_principal(account)
    assert now is not None and now.disabled and now.grants == account.principal.grants
    config = users.authenticate("op", "s3cret")
    assert config is not None and users.current_principal(config) is config.principal
    assert users.current_principal(Account("anonymous", "viewer")) is None


def test_the_current_principal_of_a_vanished_or_unreadable_user_is_disabled(accounts):
    rows: dict[str, StoredLogin | None] = {"ana": control_db_logins(accounts)("ana")}
    users = store(accounts=lambda name: rows.get(name))
    account = users.authenticate("ana", DB_PASSWORD)
    assert account is not None
    del rows["ana"]
    gone = users.current_principal(account)
    assert gone is not None and gone.disabled and gone.name == "ana"

    def broken(name: str) -> StoredLogin | None:
        raise StoreError("control.db is closed")

    users.accounts = broken
    unreadable = users.current_principal(account)
    assert unreadable is not None and unreadable.disabled


def test_the_user_manager_hands_asyncua_the_control_db_principal(accounts, tmp_path):
    manager = TwinUserManager(
        store(accounts=control_db_logins(accounts)), ClientTrust(tmp_path, trust_all=True)
    )
    user = manager.get_user(None, username="ana", password=DB_PASSWORD, certificate=b"cert")
    assert isinstance(user, GatewayUser)
    assert (user.name, user.gateway_role) == ("ana", "agent")
    assert user.principal == accounts.get_user("ana").principal()
    assert manager.get_user(None, username="gone", password=DB_PASSWORD, certificate=b"c") is None


def test_a_server_nobody_could_log_in_to_is_refused_at_construction(tmp_path):
    from gateway.opcua_server.config import OpcuaServerConfig
    from gateway.opcua_server.server import TwinOpcuaServer
    from gateway.twin.store import TwinStore

    config = OpcuaServerConfig(enabled=True)
    twin = TwinStore(tmp_path / "twin.db", [])
    with pytest.raises(GatewayError, match="nobody could log in"):
        TwinOpcuaServer(config, twin, {}, pki_dir=tmp_path)
    # With control.db's users it may start: they are looked up as they log in.
    TwinOpcuaServer(config, twin, {}, pki_dir=tmp_path, accounts=lambda name: None)


# -- certificate ----------------------------------------------------------------------------------


def test_the_certificate_is_made_once_and_reused(tmp_path):
    folder = tmp_path / "pki" / "opcua-server"
    cert, key, thumbprint = ensure_certificate(folder, "urn:h:opstwin:gateway", "GW", ["h"])
    assert cert.exists() and key.exists()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(thumbprint) == 40
    again = ensure_certificate(folder, "urn:h:opstwin:gateway", "GW", ["h"])
    assert again == (cert, key, thumbprint)


def test_a_new_application_uri_gets_a_new_certificate_for_the_same_key(tmp_path, caplog):
    folder = tmp_path / "pki"
    _, key, first = ensure_certificate(folder, "urn:a:opstwin:gateway", "GW", ["localhost"])
    key_bytes = key.read_bytes()
    with caplog.at_level(logging.WARNING):
        _, _, second = ensure_certificate(folder, "urn:b:opstwin:gateway", "GW", ["localhost"])
    assert second != first
    assert key.read_bytes() == key_bytes
    assert "urn:a:opstwin:gateway" in caplog.text


def test_an_unreadable_key_is_not_overwritten(tmp_path):
    folder = tmp_path / "pki"
    folder.mkdir()
    (folder / "key.pem").write_text("not a key")
    with pytest.raises(GatewayError, match="cannot read the OPC UA server's private key"):
        ensure_certificate(folder, "urn:a", "GW", [])
    assert (folder / "key.pem").read_text() == "not a key"
