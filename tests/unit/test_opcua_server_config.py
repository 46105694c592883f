"""The `opcua_server:` config block: defaults and the errors a wrong block gets."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.opcua_server.config import OpcuaServerConfig
from gateway.opcua_server.users import hash_password

HASH = hash_password("s3cret")


def user(name: str = "op", role: str = "viewer", password_hash: str = HASH) -> dict:
    return {"username": name, "password_hash": password_hash, "role": role}


def errors(**data) -> list[tuple[tuple, str]]:
    with pytest.raises(ValidationError) as info:
        OpcuaServerConfig.model_validate(data)
    return [(err["loc"], err["msg"]) for err in info.value.errors()]


def test_defaults_are_off_secure_and_closed():
    config = OpcuaServerConfig()
    assert config.enabled is False
    # Like HTTP: reachable from this machine only until the config names an interface.
    assert config.endpoint == "opc.tcp://127.0.0.1:4840/opstwin"
    assert config.security_policies == ["Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign"]
    assert "None" not in config.security_policies
    assert config.allow_anonymous is False
    assert config.users == []
    assert config.trust_all_clients is False
    assert config.max_connections == 64
    assert config.handshake_timeout_s == 10.0


def test_a_full_block_is_accepted():
    config = OpcuaServerConfig.model_validate(
        {
            "enabled": True,
            "endpoint": "opc.tcp://127.0.0.1:0/x",
            "security_policies": ["None", "Basic256Sha256_SignAndEncrypt"],
            "allow_anonymous": True,
            "users": [user("scada", "viewer"), user("shift.lead", "supervisor")],
            "server_name": "Plant 1",
            "application_uri": "urn:plant1:opstwin:gateway",
        }
    )
    assert [u.role for u in config.users] == ["viewer", "supervisor"]


def test_a_password_hash_that_is_not_argon2_names_the_field_and_hides_the_value():
    found = errors(users=[user(password_hash="hunter2")])
    assert found[0][0] == ("users", 0, "password_hash")
    assert "not an argon2 hash" in found[0][1] and "opstwin hash-password" in found[0][1]
    with pytest.raises(ValidationError) as info:
        OpcuaServerConfig.model_validate({"users": [user(password_hash="hunter2")]})
    assert "hunter2" not in str(info.value)


def test_a_mangled_argon2_hash_is_refused():
    assert errors(users=[user(password_hash=HASH.replace("m=", "q="))])


def test_usernames_must_be_unique():
    (found,) = errors(users=[user("op"), user("op", "admin")])
    assert "users[1]: username 'op' is listed twice" in found[1]


@pytest.mark.parametrize("role", ["operator", "Admin", ""])
def test_roles_are_the_gateway_roles(role):
    (found,) = errors(users=[user(role=role)])
    assert found[0] == ("users", 0, "role")


def test_users_with_only_the_none_policy_are_refused():
    (found,) = errors(users=[user()], security_policies=["None"])
    assert "plain text" in found[1] and "Basic256Sha256_SignAndEncrypt" in found[1]


def test_anonymous_alone_may_use_the_none_policy():
    config = OpcuaServerConfig(enabled=True, allow_anonymous=True, security_policies=["None"])
    assert config.security_policies == ["None"]


def test_an_enabled_server_without_config_users_is_accepted_for_control_db_users():
    # Its users may all be in control.db (`opstwin user add`), which the config cannot see;
    # the server refuses to start when it is given neither (test_opcua_server_users.py).
    config = OpcuaServerConfig.model_validate({"enabled": True})
    assert config.users == [] and config.allow_anonymous is False


def test_proposal_limits_default_to_ten_seconds_and_four_in_flight():
    config = OpcuaServerConfig()
    assert config.propose_timeout_s == 3.0
    assert config.max_proposals_in_flight == 4
    assert OpcuaServerConfig(propose_timeout_s=2, max_proposals_in_flight=1).propose_timeout_s == 2


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("propose_timeout_s", 0),
        ("propose_timeout_s", -1.0),
        ("propose_timeout_s", 301.0),
        ("propose_timeout_s", "10"),
        ("max_proposals_in_flight", 0),
        ("max_proposals_in_flight", 65),
        ("max_proposals_in_flight", 2.5),
        ("max_proposals_in_flight", True),
    ],
)
def test_proposal_limits_out_of_range_or_of_the_wrong_type_are_refused(key, value):
    (found,) = errors(**{key: value})
    assert found[0] == (key,)


@pytest.mark.parametrize(
    "policies", [[], ["Basic256"], ["Basic256Sha256_Sign", "Basic256Sha256_Sign"]]
)
def test_security_policies_are_checked(policies):
    (found,) = errors(security_policies=policies)
    assert found[0][0] == "security_policies"


@pytest.mark.parametrize(
    "endpoint",
    ["http://0.0.0.0:4840", "opc.tcp://:4840/x", "opc.tcp://host/x", "opc.tcp://h:99999"],
)
def test_the_endpoint_must_be_an_opc_tcp_url_with_a_port(endpoint):
    (found,) = errors(endpoint=endpoint)
    assert found[0] == ("endpoint",)
    assert "opc.tcp://host:port/path" in found[1]


def test_unknown_keys_are_refused():
    (found,) = errors(anonymous=True)
    assert found[0] == ("anonymous",)


def test_the_config_is_frozen():
    config = OpcuaServerConfig()
    with pytest.raises(ValidationError):
        config.enabled = True  # type: ignore[misc]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_connections", True),  # YAML `true` is not the number 1
        ("max_connections", "64"),
        ("max_connections", 0),
        ("max_connections", 1.5),
        ("trust_all_clients", "yes"),
        ("trust_all_clients", 1),
        ("allow_anonymous", 1),
        ("enabled", "true"),
        ("handshake_timeout_s", True),
        ("handshake_timeout_s", 0),
    ],
)
def test_counts_booleans_and_timeouts_take_only_their_own_type(key, value):
    (found,) = errors(**{key: value})
    assert found[0] == (key,)


def test_trust_all_clients_says_it_is_for_demos():
    description = OpcuaServerConfig.model_fields["trust_all_clients"].description or ""
    assert "demos only" in description
