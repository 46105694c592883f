"""The audit log: a hash chain over canonical JSON entries (`chain`)."""

from __future__ import annotations

from gateway.audit.chain import (
    GENESIS_HASH,
    AuditEntry,
    AuditEntryError,
    ChainedRow,
    VerifyResult,
    canonical_json,
    chain_row,
    chain_rows,
    entry_hash,
    verify,
)

__all__ = [
    "GENESIS_HASH",
    "AuditEntry",
    "AuditEntryError",
    "ChainedRow",
    "VerifyResult",
    "canonical_json",
    "chain_row",
    "chain_rows",
    "entry_hash",
    "verify",
]
