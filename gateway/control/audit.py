"""The audit log in the control database: appends on the writer thread, reads, verification.

The chain itself (canonical JSON, hashes, the verifier) is `gateway/audit/chain.py`; this module
stores it. An append reads the chain's head inside the same write transaction that inserts after
it (`append_rows`), so two processes appending at once (the gateway and an `opstwin user`
command) still make one chain: the second waits for the first's lock, then reads its row.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator

from gateway.audit.chain import (
    GENESIS_HASH,
    AuditEntry,
    ChainedRow,
    VerifyResult,
    chain_row,
    verify,
)
from gateway.control.db import ControlDB
from gateway.errors import StoreError

__all__ = ["MAX_ROWS", "AuditLog", "append_rows"]

# Most rows one `rows`/`tail` call returns: a page for a screen or an HTTP response.
MAX_ROWS = 10_000

_SELECT = "SELECT seq, ts, entry, hash FROM audit"


class AuditLog:
    """The audit chain of one control database."""

    def __init__(self, db: ControlDB) -> None:
        self.db = db

    def append(self, entry: AuditEntry) -> ChainedRow:
        """Append `entry` after the chain's head (on the writer thread); return its row."""
        return self.db.write(lambda conn: append_rows(conn, [entry])[0])

    async def append_async(self, entry: AuditEntry) -> ChainedRow:
        """`append` for the event loop."""
        return (await self.db.write_async(lambda conn: append_rows(conn, [entry])))[0]

    def append_many(self, entries: Iterable[AuditEntry]) -> list[ChainedRow]:
        """Append several entries in one transaction (one fsync), in order."""
        batch = list(entries)
        return self.db.write(lambda conn: append_rows(conn, batch))

    async def append_many_async(self, entries: Iterable[AuditEntry]) -> list[ChainedRow]:
        """`append_many` for the event loop."""
        batch = list(entries)
        return await self.db.write_async(lambda conn: append_rows(conn, batch))

    def rows(self, since_seq: int = 0, limit: int = 100) -> list[ChainedRow]:
        """Return up to `limit` rows after `since_seq`, oldest first."""
        limit = _checked_limit(limit)
        return self.db.read(
            lambda conn: [
                ChainedRow(*row)
                for row in conn.execute(
                    f"{_SELECT} WHERE seq > ? ORDER BY seq LIMIT ?", (since_seq, limit)
                )
            ]
        )

    def tail(self, limit: int = 20) -> list[ChainedRow]:
        """Return the newest `limit` rows, oldest first (newest last, as a log reads)."""
        limit = _checked_limit(limit)
        rows = self.db.read(
            lambda conn: conn.execute(f"{_SELECT} ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        )
        return [ChainedRow(*row) for row in reversed(rows)]

    def head(self) -> tuple[int, str]:
        """Return the last row's `(seq, hash)`, or `(0, GENESIS_HASH)` for an empty log."""
        return self.db.read(_head)

    def verify(self) -> VerifyResult:
        """Re-check the whole chain, streaming over a cursor; name the first broken row."""
        with self.db.reader() as conn:
            return verify(_stream(conn))

    def verify_after(self, seq: int, head_hash: str) -> VerifyResult:
        """Re-check only the rows after `seq`, chained from `head_hash`: the head of a part
        verified before (what was appended since; the rows before are not read)."""
        with self.db.reader() as conn:
            rows = conn.execute(
                "SELECT seq, entry, hash FROM audit WHERE seq > ? ORDER BY seq", (seq,)
            )
            return verify(rows, prev_hash=head_hash, first_seq=seq + 1)


def append_rows(conn: sqlite3.Connection, entries: Iterable[AuditEntry]) -> list[ChainedRow]:
    """Append `entries` after the head, within the caller's write transaction; return the rows.

    For writes that must commit together with their audit entry (an account change).
    """
    seq, prev = _head(conn)
    rows = []
    for entry in entries:
        try:
            row = chain_row(prev, seq + 1, entry)
        except ValueError as exc:
            # Only a stored hash edited by hand gets here: refuse to extend a chain whose head
            # is already wrong, rather than hide the break behind new rows.
            raise StoreError(
                f"audit log head (seq {seq}) has a malformed hash, so nothing more can be "
                f"appended: {exc}. Run `opstwin audit verify` to find the damage."
            ) from None
        conn.execute("INSERT INTO audit(seq, ts, entry, hash) VALUES (?, ?, ?, ?)", row)
        rows.append(row)
        seq, prev = row.seq, row.hash
    return rows


def _head(conn: sqlite3.Connection) -> tuple[int, str]:
    last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    return (0, GENESIS_HASH) if last is None else (int(last[0]), last[1])


def _stream(conn: sqlite3.Connection) -> Iterator[tuple[object, object, object]]:
    # One SELECT is one read snapshot under WAL: appends made meanwhile are not half-seen.
    yield from conn.execute("SELECT seq, entry, hash FROM audit ORDER BY seq")


def _checked_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_ROWS:
        raise ValueError(f"limit must be a whole number 1..{MAX_ROWS}, got {limit!r}")
    return limit
