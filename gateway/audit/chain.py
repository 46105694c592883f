"""The audit log's hash chain: canonical JSON, entry hashes, and a streaming verifier.

Pure: no storage, no clock. DESIGN.md §8: `hash_i = SHA-256(hash_{i-1} ‖ canonical JSON of
entry i)`, exactly as follows, so that anyone can re-check a chain with a shell:

- `hash_{i-1}` is the previous entry's hash as stored: 64 lower-case hex digits, as ASCII bytes.
  The first entry follows `GENESIS_HASH` (64 zeros).
- The canonical JSON of an entry is `json.dumps(entry, sort_keys=True, separators=(",", ":"),
  ensure_ascii=False, allow_nan=False)` encoded as UTF-8: keys sorted by code point, no
  whitespace, non-ASCII text as itself. Only JSON values go in: objects with string keys,
  arrays, strings, booleans, null, integers within 64 bits and finite floats. A float is
  written as Python's `repr` (the shortest text that reads back as the same float), so equal
  floats always give the same text and a stored entry reads back to the same bytes; `-0.0` is
  written as `0.0`, its equal. An integer and a float are different JSON values even when equal
  (`1` is not `1.0`): typed fields always give the same one. Strings are not Unicode-normalised.
  (Not RFC 8785: its number format differs; ours is Python's, pinned by tests.)
- Then `hash_i = sha256(hash_{i-1}.encode("ascii") + canonical.encode("utf-8")).hexdigest()`,
  i.e. `printf %s "$prev$entry" | sha256sum`.

Storage (a later piece) is an append-only SQLite table that `ChainedRow` maps to 1:1:

    CREATE TABLE audit (seq INTEGER PRIMARY KEY, ts REAL NOT NULL, entry TEXT NOT NULL,
                        hash TEXT NOT NULL)

`seq` counts from 1 without gaps, `entry` is the canonical JSON text itself (what is hashed is
what is stored, byte for byte), `hash` the hex digest. `ts` copies the entry's own `ts` so that
rows can be found by time; the hash covers the entry's copy, so a display must show that one.
`verify(conn.execute("SELECT seq, entry, hash FROM audit ORDER BY seq"))` reads the rows as
they stream, in constant memory, and names the first broken one.

What a chain cannot show by itself: rows cut off its end, or a forger who rewrites every hash
after the row they changed. Both need the head (last seq and hash) kept somewhere else.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from gateway.errors import GatewayError

__all__ = [
    "GENESIS_HASH",
    "AuditEntry",
    "AuditEntryError",
    "ChainedRow",
    "Problem",
    "VerifyResult",
    "canonical_json",
    "chain_row",
    "chain_rows",
    "entry_hash",
    "verify",
]

GENESIS_HASH = "0" * 64
# Entries are records of decisions, not documents: deeper nesting is a bug upstream (or a
# hostile payload that would otherwise exhaust the stack).
MAX_DEPTH = 32
# Beyond 64 bits, other JSON readers (SQLite's json functions, JavaScript, jq) lose digits,
# and an auditor's re-check with them would not match.
_INT_LIMIT = 2**63
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SURROGATE = re.compile("[\ud800-\udfff]")

Problem = Literal["missing", "out_of_order", "unparsable", "not_canonical", "bad_hash", "mismatch"]


class AuditEntryError(GatewayError, ValueError):
    """An entry that cannot go into the audit chain (not JSON, NaN, too deep); says where."""


def canonical_json(entry: Mapping[str, Any]) -> str:
    """Return the canonical JSON text of `entry`; raise AuditEntryError naming what is wrong."""
    if not isinstance(entry, Mapping):
        raise AuditEntryError(f"an audit entry is a JSON object, not {type(entry).__name__}")
    return json.dumps(
        _normalised(entry, "entry", 0),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )


def entry_hash(prev_hash: bytes | str, entry: Mapping[str, Any]) -> str:
    """Return SHA-256(prev_hash ‖ canonical JSON of entry) as 64 lower-case hex digits.

    `prev_hash` is the previous entry's hash: its hex text, or its 32-byte raw digest.
    """
    return _hash_text(_prev_hex(prev_hash), canonical_json(entry))


class AuditEntry(BaseModel):
    """One audit record: who did what to which target, when, why, and what was decided."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    ts: float = Field(ge=0, description="Wall-clock time, seconds since the Unix epoch.")
    actor: str = Field(min_length=1, max_length=128, description="Principal or policy name.")
    actor_kind: Literal["user", "token", "policy", "gateway"] | None = Field(
        None, description="What the actor is: a person, an API token, a policy, the gateway."
    )
    action: str = Field(
        pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$",
        max_length=64,
        description="What happened, dotted lower case: `access.approve`, `proposal.created`.",
    )
    target: str | None = Field(None, max_length=512, description="Point id, asset or account.")
    inputs: dict[str, JsonValue] | None = Field(None, description="Input values and quality.")
    simulation: dict[str, JsonValue] | None = Field(None, description="Simulation summary.")
    confidence: dict[str, JsonValue] | None = Field(None, description="Confidence breakdown.")
    decision: str | None = Field(None, max_length=64, description="`allowed`, `reject`, …")
    reason: str | None = Field(None, max_length=4096, description="Why, in words.")
    correlation_id: str | None = Field(None, max_length=128, description="Ties a flow together.")
    details: dict[str, JsonValue] | None = Field(None, description="Anything else worth keeping.")

    @model_validator(mode="after")
    def _fits_the_chain(self) -> AuditEntry:
        # Refuse at construction what could not be hashed later (an int beyond 64 bits, a lone
        # surrogate), with the path, instead of failing in the writer thread.
        try:
            canonical_json(self.to_mapping())
        except AuditEntryError as exc:
            raise ValueError(str(exc)) from None
        return self

    def to_mapping(self) -> dict[str, Any]:
        """Return the entry as a JSON-ready dict, absent (None) fields left out."""
        # Left out rather than null: a field added later does not change old entries' hashes.
        return self.model_dump(mode="python", exclude_none=True)

    def canonical(self) -> str:
        """Return the canonical JSON text of this entry (what is stored and hashed)."""
        # Computed each time, not kept from validation: `model_copy(update=...)` would carry a
        # stale copy, and the stored text would then not say what the fields say.
        return canonical_json(self.to_mapping())


class ChainedRow(NamedTuple):
    """One row of the audit table, in column order: `(seq, ts, entry, hash)`."""

    seq: int
    ts: float
    entry: str
    hash: str


def chain_row(prev_hash: bytes | str, seq: int, entry: AuditEntry) -> ChainedRow:
    """Return the table row for `entry` appended as `seq` after the entry hashed `prev_hash`."""
    text = entry.canonical()
    return ChainedRow(seq, entry.ts, text, _hash_text(_prev_hex(prev_hash), text))


def chain_rows(
    entries: Iterable[AuditEntry], *, prev_hash: bytes | str = GENESIS_HASH, first_seq: int = 1
) -> Iterator[ChainedRow]:
    """Yield the rows of `entries` chained after `prev_hash`, numbered from `first_seq`."""
    prev = _prev_hex(prev_hash)
    for seq, entry in enumerate(entries, start=first_seq):
        row = chain_row(prev, seq, entry)
        prev = row.hash
        yield row


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """What `verify` found: all good, or the first broken entry and why."""

    ok: bool
    checked: int  # rows that verified, before the broken one if any
    last_seq: int | None  # seq of the last row that verified (None: none did)
    last_hash: str  # its hash: the head of the verified part (the start hash if none)
    broken_seq: int | None = None
    problem: Problem | None = None
    reason: str = ""

    def describe(self) -> str:
        """One line for `opstwin audit verify`."""
        if self.ok:
            head = "empty" if self.last_seq is None else f"head seq {self.last_seq}"
            return f"audit chain intact: {self.checked} entries, {head}, hash {self.last_hash}"
        return f"audit chain broken at seq {self.broken_seq}: {self.reason}"


def verify(
    rows: Iterable[Any], *, prev_hash: bytes | str = GENESIS_HASH, first_seq: int = 1
) -> VerifyResult:
    """Check `(seq, entry, hash)` rows in seq order; name the first broken one and why.

    `entry` is the stored canonical JSON text (or bytes, or a mapping). Rows are read one at a
    time; `prev_hash` and `first_seq` resume after a part verified before.
    """
    prev = _prev_hex(prev_hash)
    expected = first_seq
    last_seq: int | None = None
    checked = 0

    def broken(seq: int, problem: Problem, reason: str) -> VerifyResult:
        return VerifyResult(False, checked, last_seq, prev, seq, problem, reason)

    for row in rows:
        try:
            seq, entry, stored = row
        except (TypeError, ValueError):
            return broken(expected, "unparsable", f"not a (seq, entry, hash) row: {_short(row)}")
        if not isinstance(seq, int) or isinstance(seq, bool):
            return broken(expected, "unparsable", f"seq is not an integer: {_short(seq)}")
        if seq > expected:
            after = f"the row after seq {last_seq}" if last_seq is not None else "the first row"
            return broken(
                expected,
                "missing",
                f"seq {expected} is missing: {after} is seq {seq} (a row was deleted, or rows "
                f"are out of order)",
            )
        if seq < expected:
            return broken(
                seq,
                "out_of_order",
                f"seq {seq} comes where seq {expected} belongs (repeated or out of order)",
            )
        text, why = _entry_text(entry)
        if text is None:
            problem: Problem = "not_canonical" if why.startswith("not canonical") else "unparsable"
            return broken(seq, problem, why)
        if not isinstance(stored, str) or not _HEX64.fullmatch(stored):
            return broken(
                seq, "bad_hash", f"stored hash is not 64 lower-case hex digits: {_short(stored)}"
            )
        computed = _hash_text(prev, text)
        if computed != stored:
            return broken(
                seq,
                "mismatch",
                f"hash mismatch: stored {stored}, computed {computed} (this entry or its hash "
                f"was changed, or an earlier row was replaced)",
            )
        prev, last_seq, expected = stored, seq, seq + 1
        checked += 1
    return VerifyResult(True, checked, last_seq, prev)


# -- helpers ----------------------------------------------------------------------------------


def _hash_text(prev_hex: str, text: str) -> str:
    return hashlib.sha256(prev_hex.encode("ascii") + text.encode("utf-8")).hexdigest()


def _prev_hex(prev_hash: bytes | str) -> str:
    if isinstance(prev_hash, bytes | bytearray):
        if len(prev_hash) != 32:
            raise ValueError(
                f"a previous hash given as bytes is the 32-byte SHA-256 digest, "
                f"not {len(prev_hash)} bytes; or pass its 64-digit hex text"
            )
        return bytes(prev_hash).hex()
    if isinstance(prev_hash, str) and _HEX64.fullmatch(prev_hash.lower()):
        return prev_hash.lower()
    raise ValueError(
        f"previous hash {_short(prev_hash)} is not 64 hex digits; the first entry follows "
        f"GENESIS_HASH ({GENESIS_HASH[:8]}…)"
    )


def _entry_text(entry: Any) -> tuple[str | None, str]:
    """Return the canonical text a stored entry must be, or (None, why it cannot be)."""
    if isinstance(entry, Mapping):
        try:
            return canonical_json(entry), ""
        except AuditEntryError as exc:
            return None, f"entry cannot be hashed: {exc}"
    if isinstance(entry, bytes | bytearray):
        try:
            entry = bytes(entry).decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, f"entry is not UTF-8: {exc}"
    if not isinstance(entry, str):
        return None, f"entry is neither JSON text nor a mapping: {type(entry).__name__}"
    try:
        parsed = json.loads(entry, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_nan)
    except (ValueError, RecursionError) as exc:
        return None, f"entry is not valid JSON: {_short(str(exc))}"
    try:
        text = canonical_json(parsed)
    except AuditEntryError as exc:
        return None, f"entry cannot be hashed: {exc}"
    if text != entry:
        # Same content in another spelling still means the row was rewritten by hand: what is
        # hashed is the stored text, so say that rather than a bare mismatch.
        return None, "not canonical JSON (the row was rewritten outside the audit writer)"
    return text, ""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads would keep the last of two equal keys: a row edited to say two things.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_nan(constant: str) -> Any:
    raise ValueError(f"{constant} is not a finite number")


def _normalised(value: Any, path: str, depth: int) -> Any:
    """Return `value` as plain JSON types, or raise AuditEntryError naming `path`."""
    if depth > MAX_DEPTH:
        raise AuditEntryError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if value is None or value is True or value is False:
        return value
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise AuditEntryError(f"{path}: string holds a lone surrogate (not valid UTF-8)")
        # A str subclass (an enum) is stored as its plain text.
        return str.__str__(value)
    if isinstance(value, int):
        if not -_INT_LIMIT <= value < _INT_LIMIT:
            raise AuditEntryError(
                f"{path}: integer outside the signed 64-bit range; store it as a string"
            )
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditEntryError(
                f"{path}: {value} is not a finite number; record why it is missing "
                f"(null, or a string) instead"
            )
        # float(): a subclass (numpy.float64) is written as a plain float; + 0.0 makes -0.0 0.0.
        return float(value) + 0.0
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditEntryError(f"{path}: key {key!r} is not a string")
            if _SURROGATE.search(key):
                raise AuditEntryError(f"{path}: key {key!r} holds a lone surrogate")
            out[str.__str__(key)] = _normalised(item, f"{path}.{key}", depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_normalised(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise AuditEntryError(
        f"{path}: {type(value).__name__} is not a JSON value; convert it first "
        f"(numbers to int or float, times to seconds, sets to sorted lists)"
    )


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
