"""Who may do what, where: roles, asset-scoped grants, and the one `check` every request passes.

Pure: no storage, no clock, no logging. Users and API tokens (stored elsewhere) become a
`Principal` holding `Grant`s; `check` answers with an `AccessDecision` that carries everything an
audit line needs, because the caller records every check, granted or denied.

Operations and the roles that grant them (DESIGN.md §8, RBAC; `Y` = granted):

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

- `read`: see the twin, events, proposals and the audit log of an asset.
- `propose`: submit a setpoint change to the gate. `approve` / `reject`: decide a proposal that
  waits for approval. `execute`: have a change written to the device without a further human
  approval. `rollback`: restore the value a change replaced.
- `viewer` < `agent` < `supervisor`: each has every right of the one before.
- `executor` may propose as well as execute: a service account that may write may always take
  the slower path through the gate, and the OPC UA server already lets every role but `viewer`
  propose (`WRITER_ROLES`). It may neither approve nor reject, and a supervisor may not execute:
  the one who approves a change is not the one who writes it (only `admin` holds both).
- `rollback` belongs to whoever answers for a write: the executor who made it and the
  supervisor who approved it; undoing a change must not wait for someone else.
- `ingest`: push values of points of `driver: http` devices (`POST /telemetry/ingest`). Not a
  `read`-only or `agent` right: an ingested value is a measurement the policies act on, so
  whoever may feed it may as well drive a write; it goes to the service accounts that write
  (`executor`), not to the people who decide (`supervisor`).
- `admin`: everything, including the three `manage_*` operations.

Scope. Every operation but `manage_*` is about an asset (a point id such as
`plant/oven1/temp`, or an asset name): a grant covers the assets its globs match. The `manage_*`
operations concern the whole gateway and are checked with `asset=None`; so is an asset-scoped
operation over every asset at once (list all proposals). Both need a site-wide grant, one whose
globs include `*`. Globs follow `fnmatch.fnmatchcase`: case-sensitive, `*` and `?` also match `/`
(`plant/oven1/*` covers `plant/oven1/zone2/temp`), `[abc]`, `[a-z]` and `[!abc]` are classes,
and nothing else is special. Globs are checked when a grant is made: they may use only the
characters point ids and asset names use (`A-Z a-z 0-9 _ . - /`) and the glob syntax itself, so
a regex (`oven(1|2)`), a shell escape (`oven\\*`), an unclosed class or a reversed range is
refused with the reason, instead of quietly matching nothing.

A principal's grants are tried in order and the first that permits the operation on the asset
decides (its index, role and glob are named in the decision). A disabled principal is denied
everything. `check` never raises for what a request may carry (an unknown operation, an empty or
odd asset name): it denies, with the reason, so the denial is recorded like any other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

__all__ = [
    "GLOBAL_OPERATIONS",
    "OPERATIONS",
    "PRINCIPAL_NAME_PATTERN",
    "ROLES",
    "ROLE_OPERATIONS",
    "SITE_WIDE",
    "AccessDecision",
    "Grant",
    "Operation",
    "Principal",
    "PrincipalKind",
    "Role",
    "check",
    "roles_granting",
    "validate_asset_glob",
]

Role = Literal["viewer", "agent", "supervisor", "executor", "admin"]
Operation = Literal[
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
PrincipalKind = Literal["user", "token"]

ROLES: tuple[Role, ...] = get_args(Role)
OPERATIONS: tuple[Operation, ...] = get_args(Operation)
GLOBAL_OPERATIONS: frozenset[Operation] = frozenset(
    {"manage_users", "manage_tokens", "manage_policies"}
)

# Written out role by role (not built up from each other) so that it reads like the table above.
ROLE_OPERATIONS: dict[Role, frozenset[Operation]] = {
    "viewer": frozenset({"read"}),
    "agent": frozenset({"read", "propose"}),
    "supervisor": frozenset({"read", "propose", "approve", "reject", "rollback"}),
    "executor": frozenset({"read", "propose", "execute", "rollback", "ingest"}),
    "admin": frozenset(OPERATIONS),
}

# The glob that makes a grant site-wide (and the default scope of a grant).
SITE_WIDE = "*"
# Same as OPC UA usernames (gateway/opcua_server/config.py): those users join this store.
PRINCIPAL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
# Point ids are at most 256 characters (gateway/config/model.py); a glob longer than any id
# it could match is a pasted blob, not a scope.
_MAX_GLOB = 256
_MAX_GLOBS = 64
_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-/")
_GLOB_HELP = "globs use `*`, `?` and `[...]` (fnmatch), e.g. `plant/oven1/*`"


def roles_granting(operation: str) -> tuple[Role, ...]:
    """Return the roles whose grants permit `operation`, in the documented order."""
    return tuple(role for role in ROLES if operation in ROLE_OPERATIONS[role])


def validate_asset_glob(glob: str) -> str:
    """Return `glob` if it is a well-formed asset glob; raise ValueError saying why if not."""
    if not isinstance(glob, str):
        raise ValueError(f"an asset glob must be a string, not {type(glob).__name__}")
    if not glob:
        raise ValueError(f"an empty asset glob matches nothing; {_GLOB_HELP}, `*` for every asset")
    if len(glob) > _MAX_GLOB:
        raise ValueError(f"asset glob is {len(glob)} characters long; at most {_MAX_GLOB}")
    i = 0
    while i < len(glob):
        char = glob[i]
        if char == "[":
            i = _class_end(glob, i)
        elif char in "*?" or char in _ID_CHARS:
            i += 1
        elif char == "]":
            raise ValueError(f"asset glob {glob!r}: `]` at {i} closes no `[`; {_GLOB_HELP}")
        else:
            raise ValueError(
                f"asset glob {glob!r}: {char!r} at {i} is not allowed; asset names use "
                f"letters, digits and `_ . - /`, and {_GLOB_HELP} (no regex, no escapes)"
            )
    return glob


class Grant(BaseModel):
    """A role over the assets some globs match."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role = Field(description="`viewer`, `agent`, `supervisor`, `executor` or `admin`.")
    assets: tuple[str, ...] = Field(
        (SITE_WIDE,),
        min_length=1,
        max_length=_MAX_GLOBS,
        description="Globs over point ids and asset names (`plant/oven1/*`), case-sensitive; "
        "`*` (the default) is every asset and also permits the gateway-wide operations.",
    )

    @field_validator("assets", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: Any) -> Any:
        # Config and JSON give lists; the model keeps a tuple so that grants stay hashable.
        return tuple(value) if isinstance(value, list) else value

    @field_validator("assets")
    @classmethod
    def _globs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for glob in value:
            validate_asset_glob(glob)
        return value

    @property
    def site_wide(self) -> bool:
        """Whether this grant covers every asset and the gateway as a whole."""
        return SITE_WIDE in self.assets

    def describe(self) -> str:
        """Name the grant for a decision's reason: role and globs."""
        return f"role {self.role} on {', '.join(f'`{g}`' for g in self.assets)}"


class Principal(BaseModel):
    """A user or an API token, with its grants; what `check` decides for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=PRINCIPAL_NAME_PATTERN, description="Username or token name.")
    kind: PrincipalKind = Field(description="`user` (a person) or `token` (an agent's API key).")
    grants: tuple[Grant, ...] = Field((), description="Roles and their asset scopes.")
    disabled: StrictBool = Field(False, description="A disabled principal is denied everything.")

    @field_validator("grants", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @property
    def label(self) -> str:
        """`user alice` / `token oven-agent`, as reasons and log lines name it."""
        return f"{self.kind} `{self.name}`"


@dataclass(frozen=True, slots=True)
class AccessDecision:
    """The answer to one check, with all an audit line needs to record it."""

    allowed: bool
    reason: str
    principal: str
    principal_kind: str
    operation: str
    asset: str | None
    # Index into the principal's grants of the grant that allowed it, and the glob that matched
    # (None for a denial).
    grant_index: int | None = None
    role: str | None = None
    matched_glob: str | None = None

    def as_audit_fields(self) -> dict[str, Any]:
        """Return the decision as JSON-ready fields of an audit entry (actor, action, …)."""
        fields: dict[str, Any] = {
            "actor": self.principal,
            "actor_kind": self.principal_kind,
            "action": f"access.{self.operation}" if self.operation in OPERATIONS else "access",
            "target": self.asset,
            "decision": "allowed" if self.allowed else "denied",
            "reason": self.reason,
        }
        if self.allowed:
            fields["details"] = {
                "grant": self.grant_index,
                "role": self.role,
                "glob": self.matched_glob,
            }
        return fields


def check(principal: Principal, operation: str, asset: str | None) -> AccessDecision:
    """Decide whether `principal` may perform `operation` on `asset` (None: the whole site)."""

    def deny(why: str) -> AccessDecision:
        return AccessDecision(
            False, f"denied: {why}", principal.name, principal.kind, operation, asset
        )

    target = "the whole site" if asset is None else f"`{asset}`"
    if operation not in ROLE_OPERATIONS["admin"]:
        return deny(f"unknown operation {operation!r}; one of {', '.join(OPERATIONS)}")
    if principal.disabled:
        return deny(f"{principal.label} is disabled")
    if not principal.grants:
        return deny(f"{principal.label} has no grants")
    if operation in GLOBAL_OPERATIONS and asset is not None:
        # A caller bug, but a request can carry it: deny rather than guess a scope.
        return deny(f"{operation} concerns the whole gateway; check it with no asset")
    if asset is not None and not asset:
        return deny("empty asset name")

    roles = roles_granting(operation)
    permitting = [(i, g) for i, g in enumerate(principal.grants) if g.role in roles]
    if not permitting:
        held = ", ".join(sorted({g.role for g in principal.grants}))
        return deny(f"{operation} needs role {' or '.join(roles)}; {principal.label} holds {held}")
    for index, grant in permitting:
        glob = _matching_glob(grant, asset)
        if glob is not None:
            return AccessDecision(
                True,
                f"allowed: {principal.label} grant #{index} ({grant.describe()}) "
                f"permits {operation} on {target}",
                principal.name,
                principal.kind,
                operation,
                asset,
                grant_index=index,
                role=grant.role,
                matched_glob=glob,
            )
    scopes = "; ".join(f"#{i} {g.describe()}" for i, g in permitting)
    return deny(f"{operation} on {target} is outside {principal.label}'s scope ({scopes})")


def _matching_glob(grant: Grant, asset: str | None) -> str | None:
    # The whole site (asset None) is covered only by the site-wide glob, never by a union of
    # narrower ones: what they leave out is unknowable here.
    if asset is None:
        return SITE_WIDE if grant.site_wide else None
    return next((glob for glob in grant.assets if fnmatchcase(asset, glob)), None)


def _class_end(glob: str, start: int) -> int:
    """Return the index after the `[...]` class opening at `start`; raise if it is malformed."""
    i = start + 1
    if i < len(glob) and glob[i] == "!":
        i += 1
    members_start = i
    while i < len(glob) and glob[i] != "]":
        if glob[i] not in _ID_CHARS:
            raise ValueError(
                f"asset glob {glob!r}: {glob[i]!r} at {i} inside `[...]`; a class holds "
                f"letters, digits and `_ . - /`, negated by a leading `!`"
            )
        i += 1
    if i >= len(glob):
        raise ValueError(f"asset glob {glob!r}: `[` at {start} is never closed by `]`")
    members = glob[members_start:i]
    if not members:
        # fnmatch would read `[]` literally or swallow the next `]`: neither is what was meant.
        raise ValueError(f"asset glob {glob!r}: empty class `{glob[start : i + 1]}` at {start}")
    for match in re.finditer(r"(?=(.)-(.))", members):
        low, high = match.group(1), match.group(2)
        if low > high:
            raise ValueError(
                f"asset glob {glob!r}: range `{low}-{high}` at {members_start + match.start()} "
                f"is reversed and matches nothing; write `{high}-{low}`"
            )
    return i + 1
