"""Password hashing, logins against argon2 hashes, and the server certificate on disk."""

from __future__ import annotations

import logging
import stat

import pytest
from tests_support import FakeClock

from gateway.errors import GatewayError
from gateway.opcua_server import users as users_module
from gateway.opcua_server.config import OpcuaUser
from gateway.opcua_server.server import GatewayUser, TwinUserManager, ensure_certificate
from gateway.opcua_server.trust import ClientTrust
from gateway.opcua_server.users import Account, UserStore, hash_password, is_argon2_hash

HASH = hash_password("s3cret")


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
    assert store().authenticate("op", "s3cret") == Account("op", "supervisor")
    assert store().authenticate("viewer1", "look") == Account("viewer1", "viewer")


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
    assert store(allow_anonymous=True).authenticate(None, None) == Account("anonymous", "viewer")


def test_an_unsecured_channel_is_refused_unless_the_none_policy_is_offered():
    assert store().authenticate("op", "s3cret", secured=False) is None
    assert store(allow_anonymous=True).authenticate(None, None, secured=False) is None
    relaxed = store(allow_unsecured=True)
    assert relaxed.authenticate("op", "s3cret", secured=False) == Account("op", "supervisor")


def test_a_reconnect_with_the_same_password_skips_argon2(verifications):
    users = store()
    for _ in range(3):
        assert users.authenticate("op", "s3cret") == Account("op", "supervisor")
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
    assert users.authenticate("viewer1", "look", address=HERE) == Account("viewer1", "viewer")


def test_an_address_that_keeps_guessing_is_throttled_for_every_account(verifications):
    users = store(max_failures_per_user=3, max_failures_per_address=4, clock=FakeClock())
    for name, guess in (("op", "a"), ("viewer1", "b"), ("nobody", "c"), ("x", "d")):
        assert users.authenticate(name, guess, address=HERE) is None
    assert users.authenticate("viewer1", "look", address=HERE) is None  # not even checked
    assert verifications == ["a", "b", "c", "d"]
    assert users.authenticate("viewer1", "look", address=THERE) == Account("viewer1", "viewer")


def test_the_owner_of_an_account_under_attack_still_logs_in_from_a_clean_address(verifications):
    users = store(max_failures_per_user=3, max_failures_per_address=10, clock=FakeClock())
    for i in range(5):
        users.authenticate("op", f"guess{i}", address=HERE)
    assert users.authenticate("op", "s3cret", address=THERE) == Account("op", "supervisor")
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
    assert users.authenticate("op", "s3cret", address=HERE) == Account("op", "supervisor")
    clock.advance(10.5)
    assert users.authenticate("viewer1", "look", address=HERE) == Account("viewer1", "viewer")


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
