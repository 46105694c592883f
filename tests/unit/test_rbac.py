"""RBAC: the matrix of role, operation and scope, grants, disabled principals, and asset globs.

The expected answers are written out here, not read from gateway.auth.rbac: a change to who may
do what must change this file too.
"""

from __future__ import annotations

import dataclasses
import re
from fnmatch import fnmatchcase

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.audit import AuditEntry
from gateway.auth import rbac
from gateway.auth.rbac import Grant, Principal, check, validate_asset_glob

# The documented table (the module docstring holds the same text; a test below checks it).
TABLE = """
    operation        viewer  agent  supervisor  executor  admin
    read             Y       Y      Y           Y         Y
    propose          -       Y      Y           Y         Y
    approve          -       -      Y           -         Y
    reject           -       -      Y           -         Y
    execute          -       -      -           Y         Y
    rollback         -       -      Y           Y         Y
    ingest           -       -      -           Y         Y
    manage_users     -       -      -           -         Y
    manage_tokens    -       -      -           -         Y
    manage_policies  -       -      -           -         Y
"""
ROLES = ["viewer", "agent", "supervisor", "executor", "admin"]
OPERATIONS = [
    "read",
    "propose",
    "approve",
    "reject",
    "execute",
    "rollback",
    "ingest",
    "manage_users",
    "manage_tokens",
    "manage_policies",
]
GLOBAL = {"manage_users", "manage_tokens", "manage_policies"}

OVEN = "plant/oven1/*"
IN_SCOPE = "plant/oven1/temp"
OUT_OF_SCOPE = "plant/tank1/level"

# (scope name, the grant's globs, the asset checked, permitted for an asset operation,
#  permitted for a gateway-wide operation): whether the scope lets the role's right through.
SCOPES = [
    ("site-wide grant, one asset", ["*"], OUT_OF_SCOPE, True, False),
    ("site-wide grant, whole site", ["*"], None, True, True),
    ("scoped grant, asset in scope", [OVEN], IN_SCOPE, True, False),
    ("scoped grant, asset out of scope", [OVEN], OUT_OF_SCOPE, False, False),
    ("scoped grant, whole site", [OVEN], None, False, False),
]


def parse_table(text: str) -> dict[tuple[str, str], bool]:
    """Read the Y/- table into {(role, operation): granted}."""
    header, *lines = [line.split() for line in text.strip().splitlines()]
    roles = header[1:]
    return {
        (role, cells[0]): mark == "Y"
        for cells in lines
        for role, mark in zip(roles, cells[1:], strict=True)
    }


GRANTED = parse_table(TABLE)


def principal(*grants: tuple[str, list[str]], disabled: bool = False, kind: str = "user"):
    return Principal.model_validate(
        {
            "name": "alice",
            "kind": kind,
            "grants": [{"role": role, "assets": assets} for role, assets in grants],
            "disabled": disabled,
        }
    )


def test_the_table_covers_every_role_and_operation():
    assert set(GRANTED) == {(r, o) for r in ROLES for o in OPERATIONS}
    assert tuple(ROLES) == rbac.ROLES and tuple(OPERATIONS) == rbac.OPERATIONS


def test_the_module_documents_the_same_table():
    def norm(text: str) -> list[list[str]]:
        return [line.split() for line in text.strip().splitlines()]

    doc = rbac.__doc__ or ""
    start = doc.index("operation ")
    assert norm(doc[start : start + len(TABLE) + 200])[: len(norm(TABLE))] == norm(TABLE)


@pytest.mark.parametrize("scope", SCOPES, ids=[s[0] for s in SCOPES])
@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("role", ROLES)
def test_rbac_matrix(role, operation, scope):
    _, globs, asset, asset_op_ok, global_op_ok = scope
    if operation in GLOBAL and asset is not None:
        expected = False  # a gateway-wide operation is never checked against one asset
    else:
        expected = GRANTED[role, operation] and (
            global_op_ok if operation in GLOBAL else asset_op_ok
        )
    decision = check(principal((role, globs)), operation, asset)
    assert decision.allowed is expected, decision.reason
    assert decision.reason.startswith("allowed: " if expected else "denied: ")
    assert (decision.principal, decision.principal_kind) == ("alice", "user")
    assert (decision.operation, decision.asset) == (operation, asset)
    if expected:
        assert (decision.grant_index, decision.role) == (0, role)
        assert decision.matched_glob in globs
        assert f"grant #0 (role {role} on " in decision.reason
    else:
        assert decision.grant_index is None and decision.role is None


def test_a_denied_role_is_told_which_roles_would_do():
    decision = check(principal(("agent", ["*"])), "approve", IN_SCOPE)
    assert decision.reason == (
        "denied: approve needs role supervisor or admin; user `alice` holds agent"
    )


def test_an_out_of_scope_denial_names_the_scope():
    decision = check(principal(("supervisor", [OVEN, "plant/oven2/*"])), "approve", OUT_OF_SCOPE)
    assert not decision.allowed
    assert "`plant/tank1/level` is outside user `alice`'s scope" in decision.reason
    assert "role supervisor on `plant/oven1/*`, `plant/oven2/*`" in decision.reason


def test_several_grants_add_up_and_the_first_that_permits_is_named():
    p = principal(
        ("viewer", ["*"]),
        ("agent", [OVEN]),
        ("supervisor", ["plant/tank1/*"]),
        ("agent", ["plant/tank1/*"]),
    )
    expect = {
        ("read", OUT_OF_SCOPE): 0,
        ("read", None): 0,
        ("propose", IN_SCOPE): 1,
        ("propose", OUT_OF_SCOPE): 2,  # the supervisor grant comes before the second agent one
        ("approve", OUT_OF_SCOPE): 2,
        ("rollback", OUT_OF_SCOPE): 2,
    }
    for (operation, asset), index in expect.items():
        decision = check(p, operation, asset)
        assert decision.allowed, decision.reason
        assert decision.grant_index == index, decision.reason
        assert f"grant #{index} " in decision.reason
    for operation, asset in [
        ("approve", IN_SCOPE),  # supervisor only on the tank
        ("propose", "plant/mixer/speed"),  # neither agent nor supervisor scope
        ("propose", None),  # no site-wide proposing grant
        ("execute", IN_SCOPE),
        ("manage_users", None),
    ]:
        assert not check(p, operation, asset).allowed, (operation, asset)


def test_globs_of_one_grant_are_alternatives():
    p = principal(("agent", ["plant/oven1/*", "plant/oven2/setpoint"]))
    assert check(p, "propose", "plant/oven2/setpoint").matched_glob == "plant/oven2/setpoint"
    assert check(p, "propose", "plant/oven1/x").matched_glob == "plant/oven1/*"
    assert not check(p, "propose", "plant/oven2/temp").allowed


@pytest.mark.parametrize("role", ROLES)
def test_a_disabled_principal_is_denied_everything(role):
    p = principal((role, ["*"]), ("admin", ["*"]), disabled=True, kind="token")
    for operation in OPERATIONS:
        for asset in (None, IN_SCOPE):
            decision = check(p, operation, asset)
            assert not decision.allowed
            assert decision.reason == "denied: token `alice` is disabled"


def test_a_principal_without_grants_is_denied():
    decision = check(principal(), "read", IN_SCOPE)
    assert not decision.allowed
    assert decision.reason == "denied: user `alice` has no grants"


@pytest.mark.parametrize(
    ("operation", "asset", "why"),
    [
        ("write", IN_SCOPE, "unknown operation 'write'"),
        ("READ", IN_SCOPE, "unknown operation 'READ'"),
        ("", IN_SCOPE, "unknown operation ''"),
        ("manage_users", IN_SCOPE, "manage_users concerns the whole gateway"),
        ("read", "", "empty asset name"),
    ],
)
def test_what_a_request_may_carry_is_denied_not_raised(operation, asset, why):
    decision = check(principal(("admin", ["*"])), operation, asset)
    assert not decision.allowed
    assert why in decision.reason


def test_a_decision_is_frozen_and_fills_an_audit_entry():
    decision = check(principal(("executor", [OVEN]), kind="token"), "execute", IN_SCOPE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.allowed = False  # type: ignore[misc]
    entry = AuditEntry(ts=1.0, correlation_id="c1", **decision.as_audit_fields())
    assert (entry.actor, entry.actor_kind, entry.action) == ("alice", "token", "access.execute")
    assert (entry.target, entry.decision) == (IN_SCOPE, "allowed")
    assert entry.details == {"grant": 0, "role": "executor", "glob": OVEN}
    denied = check(principal(("viewer", ["*"])), "manage_users", None)
    entry = AuditEntry(ts=1.0, **denied.as_audit_fields())
    assert (entry.decision, entry.target, entry.details) == ("denied", None, None)
    assert entry.reason == denied.reason
    odd = check(principal(("viewer", ["*"])), "drop tables", None)
    assert AuditEntry(ts=1.0, **odd.as_audit_fields()).action == "access"


# -- globs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("glob", "asset", "matches"),
    [
        ("*", "plant/oven1/temp", True),
        ("*", "x", True),
        ("plant/oven1/*", "plant/oven1/temp", True),
        ("plant/oven1/*", "plant/oven1/zone2/temp", True),  # `*` crosses `/` (fnmatch)
        ("plant/oven1/*", "plant/oven10/temp", False),
        ("plant/oven1*", "plant/oven10/temp", True),  # what a missing `/` costs
        ("plant/oven1/*", "plant/oven1", False),
        ("plant/oven1/*", "Plant/oven1/temp", False),  # case-sensitive
        ("PLANT/*", "plant/x", False),
        ("oven1.*", "oven1.temp", True),
        ("oven1.*", "oven1xtemp", False),  # `.` is a dot, not a regex
        ("oven?", "oven1", True),
        ("oven?", "oven12", False),
        ("oven?", "oven", False),
        ("oven[12]", "oven2", True),
        ("oven[12]", "oven3", False),
        ("oven[!12]", "oven3", True),
        ("oven[!12]", "oven1", False),
        ("oven[0-9]", "oven7", True),
        ("oven[0-9]", "ovenx", False),
        ("plant/oven1/temp", "plant/oven1/temp", True),
        ("plant/oven1/temp", "plant/oven1/temp\n", False),  # no `$`-style newline slack
        ("plant/oven1/temp", "plant/oven1/temp/", False),
        ("plant/oven1/temp", " plant/oven1/temp", False),
        ("*/temp", "plant/oven1/temp", True),
        ("**", "a/b/c", True),
    ],
)
def test_glob_matching(glob, asset, matches):
    assert check(principal(("viewer", [glob])), "read", asset).allowed is matches


@pytest.mark.parametrize(
    ("glob", "says"),
    [
        ("", "empty asset glob"),
        (" ", "' ' at 0 is not allowed"),
        ("plant/oven1/* ", "' ' at 13 is not allowed"),
        ("oven(1|2)", "'(' at 4 is not allowed"),
        ("oven.+", "'+' at 5 is not allowed"),
        ("^oven$", "'^' at 0 is not allowed"),
        ("oven\\*", "'\\\\' at 4 is not allowed"),
        ("oven{1,2}", "'{' at 4 is not allowed"),
        ("oven1|*", "'|' at 5 is not allowed"),
        ("(?i)oven", "'(' at 0 is not allowed"),
        ("oven[", "`[` at 4 is never closed"),
        ("oven[1-", "`[` at 4 is never closed"),
        ("oven]", "`]` at 4 closes no `[`"),
        ("oven[]", "empty class `[]`"),
        ("oven[!]", "empty class `[!]`"),
        ("oven[]]", "empty class `[]`"),
        ("oven[^1]", "'^' at 5 inside `[...]`"),
        ("oven[[]", "'[' at 5 inside `[...]`"),
        ("oven[*]", "'*' at 5 inside `[...]`"),
        ("oven[a!]", "'!' at 6 inside `[...]`"),
        ("oven[z-a]", "range `z-a` at 5 is reversed"),
        ("oven[0-9z-a]", "range `z-a` at 8 is reversed"),
        ("a" * 257, "257 characters long"),
        ("oven\x00", "'\\x00' at 4 is not allowed"),
        ("oven\n", "'\\n' at 4 is not allowed"),
        ("ovén", "'é' at 2 is not allowed"),
        ("oven\u200b", "at 4 is not allowed"),  # zero-width space
    ],
)
def test_hostile_globs_are_refused_with_the_reason(glob, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        validate_asset_glob(glob)
    with pytest.raises(ValidationError, match=re.escape(says)):
        Grant(role="viewer", assets=(glob,))


@pytest.mark.parametrize(
    ("assets", "says"),
    [
        ([], "at least 1 item"),
        (["*"] * 65, "at most 64 items"),
        ([1], "valid string"),
        ("plant/*", "valid tuple"),  # a bare string is not a list of globs
        (None, "valid tuple"),
    ],
)
def test_a_grant_needs_a_list_of_globs(assets, says):
    with pytest.raises(ValidationError, match=says):
        Grant.model_validate({"role": "viewer", "assets": assets})


def test_grants_and_principals_load_from_config_data_strictly():
    data = {
        "name": "oven-agent",
        "kind": "token",
        "grants": [{"role": "agent", "assets": [OVEN]}, {"role": "viewer"}],
    }
    p = Principal.model_validate(data, strict=True)
    assert p.grants == (Grant(role="agent", assets=(OVEN,)), Grant(role="viewer", assets=("*",)))
    assert hash(p) == hash(Principal.model_validate_json(p.model_dump_json()))
    for bad, says in [
        ({**data, "role": "admin"}, "Extra inputs are not permitted"),
        ({**data, "kind": "service"}, "'user' or 'token'"),
        ({**data, "name": "bad name"}, "should match pattern"),
        ({**data, "name": "x" * 65}, "should match pattern"),
        ({**data, "disabled": "yes"}, "valid boolean"),
        ({**data, "grants": [{"role": "root"}]}, "'viewer', 'agent', 'supervisor'"),
        ({**data, "grants": [{"role": "agent", "asset": OVEN}]}, "Extra inputs"),
    ]:
        with pytest.raises(ValidationError, match=re.escape(says)):
            Principal.model_validate(bad, strict=True)


def test_roles_granting_follows_the_table():
    for operation in OPERATIONS:
        expected = tuple(r for r in ROLES if GRANTED[r, operation])
        assert rbac.roles_granting(operation) == expected
    assert rbac.roles_granting("nonsense") == ()


# -- properties -------------------------------------------------------------------------------

_ALNUM = "abcxyz019"
_ASSET_CHARS = _ALNUM + "/._-"


def oracle_match(glob: str, text: str) -> bool:
    """A glob matcher written from the documented rules, to check `check` against."""

    def in_class(members: str, char: str) -> bool:
        i = 0
        while i < len(members):
            if i + 2 < len(members) and members[i + 1] == "-":
                if members[i] <= char <= members[i + 2]:
                    return True
                i += 3
            else:
                if members[i] == char:
                    return True
                i += 1
        return False

    def match(g: int, t: int) -> bool:
        if g == len(glob):
            return t == len(text)
        char = glob[g]
        if char == "*":
            return any(match(g + 1, k) for k in range(t, len(text) + 1))
        if t == len(text):
            return False
        if char == "?":
            return match(g + 1, t + 1)
        if char == "[":
            start = g + 1
            negated = glob[start] == "!"
            start += negated
            end = glob.index("]", start)
            if in_class(glob[start:end], text[t]) == negated:
                return False
            return match(end + 1, t + 1)
        return char == text[t] and match(g + 1, t + 1)

    return match(0, 0)


@st.composite
def glob_classes(draw: st.DrawFn) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            low, high = sorted(draw(st.lists(st.sampled_from(_ALNUM), min_size=2, max_size=2)))
            parts.append(f"{low}-{high}")
        else:
            parts.append(draw(st.sampled_from(_ALNUM)))
    return "[" + ("!" if draw(st.booleans()) else "") + "".join(parts) + "]"


globs = st.lists(
    st.one_of(st.sampled_from([*_ASSET_CHARS, "*", "?"]), glob_classes()),
    min_size=1,
    max_size=8,
).map("".join)
assets = st.text(alphabet=_ASSET_CHARS, min_size=1, max_size=10)


@settings(max_examples=600, deadline=None)
@given(
    role=st.sampled_from(ROLES),
    operation=st.sampled_from([o for o in OPERATIONS if o not in GLOBAL]),
    glob=globs,
    asset=assets,
)
def test_check_agrees_with_the_table_and_the_glob_rules(role, operation, glob, asset):
    decision = check(principal((role, [glob])), operation, asset)
    assert decision.allowed is (GRANTED[role, operation] and oracle_match(glob, asset))
    assert oracle_match(glob, asset) is fnmatchcase(asset, glob)


@settings(max_examples=150, deadline=None)
@given(grants=st.lists(st.tuples(st.sampled_from(ROLES), globs), max_size=4), asset=assets)
def test_several_grants_allow_exactly_when_one_would_alone(grants, asset):
    p = principal(*[(role, [glob]) for role, glob in grants])
    for operation in OPERATIONS:
        if operation in GLOBAL:
            continue
        alone = [check(principal((r, [g])), operation, asset).allowed for r, g in grants]
        decision = check(p, operation, asset)
        assert decision.allowed is any(alone)
        if decision.allowed:
            assert decision.grant_index == alone.index(True)


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.text(max_size=40), st.text(alphabet="az09/.*?[]!-^\\( \n", max_size=12)))
def test_any_text_is_a_valid_glob_or_refused_with_a_value_error(text):
    try:
        validate_asset_glob(text)
    except ValueError as exc:
        assert str(exc)
        return
    allowed = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-/*?[]!"
    assert set(text) <= set(allowed)
    assert text.count("[") == text.count("]")
    fnmatchcase("plant/oven1/temp", text)  # and it can be matched without error
