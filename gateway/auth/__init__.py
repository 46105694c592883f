"""Authorization: roles, asset-scoped grants, and the check every request passes (`rbac`)."""

from __future__ import annotations

from gateway.auth.rbac import (
    GLOBAL_OPERATIONS,
    OPERATIONS,
    ROLE_OPERATIONS,
    ROLES,
    AccessDecision,
    Grant,
    Operation,
    Principal,
    PrincipalKind,
    Role,
    check,
    roles_granting,
    validate_asset_glob,
)

__all__ = [
    "GLOBAL_OPERATIONS",
    "OPERATIONS",
    "ROLES",
    "ROLE_OPERATIONS",
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
