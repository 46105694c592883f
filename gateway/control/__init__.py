"""Security data of the gateway: users, API tokens and the audit chain, in `control.db`."""

from __future__ import annotations

from gateway.control.audit import AuditLog, append_rows
from gateway.control.db import CONTROL_DB_NAME, SCHEMA_VERSION, ControlDB, control_db_path
from gateway.control.users import (
    AccountError,
    AccountStore,
    Actor,
    AuthError,
    NewToken,
    TokenRecord,
    UserRecord,
    parse_grant,
)

__all__ = [
    "CONTROL_DB_NAME",
    "SCHEMA_VERSION",
    "AccountError",
    "AccountStore",
    "Actor",
    "AuditLog",
    "AuthError",
    "ControlDB",
    "NewToken",
    "TokenRecord",
    "UserRecord",
    "append_rows",
    "control_db_path",
    "parse_grant",
]
