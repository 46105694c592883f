"""The audit hash chain: canonical JSON, entry hashes, and a verifier that names the first break.

Rows are kept in a real (in-memory) SQLite table with the documented schema where tampering is
the subject: the tamper is then an SQL statement, as it would be on a gateway.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditEntryError,
    ChainedRow,
    canonical_json,
    chain_row,
    chain_rows,
    entry_hash,
    verify,
)
from gateway.errors import GatewayError

SCHEMA = (
    "CREATE TABLE audit (seq INTEGER PRIMARY KEY, ts REAL NOT NULL, entry TEXT NOT NULL, "
    "hash TEXT NOT NULL)"
)


def make_entry(i: int, **overrides: Any) -> AuditEntry:
    fields: dict[str, Any] = {
        "ts": 1_700_000_000.0 + i * 0.25,
        "actor": "oven-agent" if i % 2 else "alice",
        "actor_kind": "token" if i % 2 else "user",
        "action": "proposal.created",
        "target": f"plant/oven{i % 3}/setpoint",
        "inputs": {"plant/oven1/temp": {"value": 231.5 + i, "quality": "GOOD"}},
        "simulation": {"model": "oven", "paths": 10_000, "p_safe": 0.987, "horizon_s": 600},
        "confidence": {"total": 0.93, "simulation": 0.97, "quality": 1.0, "history": 0.8},
        "decision": "auto_execute",
        "reason": f"ambient drift #{i}: lower the heater setpoint — 235 → 228 °C",
        "correlation_id": f"corr-{i // 3}",
        "details": {"idempotency_key": f"k{i}", "tags": ["drift", None, True]},
    }
    fields.update(overrides)
    return AuditEntry(**fields)


def as_rows(rows: list[ChainedRow]) -> list[tuple[int, str, str]]:
    return [(r.seq, r.entry, r.hash) for r in rows]


@pytest.fixture
def db() -> Iterator[sqlite3.Connection]:
    """Give the test an audit table holding a chain of 50 entries."""
    conn = sqlite3.connect(":memory:")
    conn.execute(SCHEMA)
    conn.executemany(
        "INSERT INTO audit VALUES (?, ?, ?, ?)", chain_rows(make_entry(i) for i in range(50))
    )
    yield conn
    conn.close()


def verify_db(conn: sqlite3.Connection):
    return verify(conn.execute("SELECT seq, entry, hash FROM audit ORDER BY seq"))


# -- canonical JSON and the entry hash ---------------------------------------------------------


def test_canonical_json_is_sorted_compact_utf8():
    entry = {"b": 1, "a": [1.5, "é ☃ \u2028", None, True], "c": {"z": -0.0, "y": 1e-7}}
    assert canonical_json(entry) == (
        '{"a":[1.5,"é ☃ \u2028",null,true],"b":1,"c":{"y":1e-07,"z":0.0}}'
    )


def test_the_entry_hash_is_sha256_of_the_previous_hex_and_the_json():
    # Written out from DESIGN.md, as `printf %s "$prev$entry" | sha256sum` would compute it.
    text = '{"action":"x","n":1}'
    first = hashlib.sha256(("0" * 64 + text).encode()).hexdigest()
    assert GENESIS_HASH == "0" * 64
    assert entry_hash(GENESIS_HASH, {"n": 1, "action": "x"}) == first
    second = hashlib.sha256((first + '{"é":2.5}').encode("utf-8")).hexdigest()
    assert entry_hash(first, {"é": 2.5}) == second
    # The same previous hash as upper-case hex or as the raw digest.
    assert entry_hash(first.upper(), {"é": 2.5}) == second
    assert entry_hash(bytes.fromhex(first), {"é": 2.5}) == second


def test_a_full_entry_hashes_as_pinned():
    # Pinned: a change to the canonical form (field names, float text, key order, what is left
    # out) would break every chain already stored, so it must break this test first.
    row = chain_row(GENESIS_HASH, 1, make_entry(0))
    assert row.entry == (
        '{"action":"proposal.created","actor":"alice","actor_kind":"user",'
        '"confidence":{"history":0.8,"quality":1.0,"simulation":0.97,"total":0.93},'
        '"correlation_id":"corr-0","decision":"auto_execute",'
        '"details":{"idempotency_key":"k0","tags":["drift",null,true]},'
        '"inputs":{"plant/oven1/temp":{"quality":"GOOD","value":231.5}},'
        '"reason":"ambient drift #0: lower the heater setpoint — 235 → 228 °C",'
        '"simulation":{"horizon_s":600,"model":"oven","p_safe":0.987,"paths":10000},'
        '"target":"plant/oven0/setpoint","ts":1700000000.0}'
    )
    assert row.hash == "b9fd5e1303e0eeb0a88f261da245c623597b449822c4fb8f9295531b5cc5d14d"
    assert row.hash == hashlib.sha256(("0" * 64 + row.entry).encode("utf-8")).hexdigest()


@pytest.mark.parametrize(
    ("prev", "says"),
    [
        ("", "not 64 hex digits"),
        ("0" * 63, "not 64 hex digits"),
        ("g" * 64, "not 64 hex digits"),
        (" " + "0" * 63, "not 64 hex digits"),
        (b"\x00" * 31, "not 31 bytes"),
        (None, "not 64 hex digits"),
    ],
)
def test_a_malformed_previous_hash_is_refused(prev, says):
    with pytest.raises(ValueError, match=says):
        entry_hash(prev, {"a": 1})


def test_canonical_form_is_the_same_for_equal_values():
    class Kind(enum.StrEnum):
        USER = "user"

    class Count(enum.IntEnum):
        THREE = 3

    class Float(float):
        def __repr__(self) -> str:
            return "Float(...)"

    a = {"x": 0.1 + 0.2, "y": -0.0, "z": (1, 2), "k": Kind.USER, "n": Count.THREE, "f": Float(2.5)}
    b = {"f": 2.5, "n": 3, "k": "user", "z": [1, 2], "y": 0.0, "x": 0.30000000000000004}
    assert canonical_json(a) == canonical_json(b)
    assert (
        canonical_json(a) == '{"f":2.5,"k":"user","n":3,"x":0.30000000000000004,"y":0.0,"z":[1,2]}'
    )
    # An int and a float are different JSON values, and strings are not normalised.
    assert canonical_json({"x": 1}) != canonical_json({"x": 1.0})
    assert canonical_json({"x": "\u00e9"}) != canonical_json({"x": "e\u0301"})


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"a": value}
    return value


def _cycle() -> dict[str, Any]:
    value: dict[str, Any] = {}
    value["self"] = value
    return value


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"x": math.nan}, "entry.x: nan is not a finite number"),
        ({"x": math.inf}, "entry.x: inf is not a finite number"),
        ({"a": {"b": [1.0, -math.inf]}}, "entry.a.b[1]: -inf is not a finite number"),
        ({1: "x"}, "entry: key 1 is not a string"),
        ({"a": {None: 1}}, "entry.a: key None is not a string"),
        ({"x": b"bytes"}, "entry.x: bytes is not a JSON value"),
        ({"x": {1, 2}}, "entry.x: set is not a JSON value"),
        ({"x": datetime(2026, 1, 1, tzinfo=UTC)}, "entry.x: datetime is not a JSON value"),
        ({"x": 2**63}, "entry.x: integer outside the signed 64-bit range"),
        ({"x": -(2**63) - 1}, "outside the signed 64-bit range"),
        ({"x": 10**5000}, "outside the signed 64-bit range"),
        ({"x": "a\ud800b"}, "entry.x: string holds a lone surrogate"),
        ({"\udfff": 1}, "holds a lone surrogate"),
        (_deep(40), "nested deeper than 32 levels"),
        (_cycle(), "nested deeper than 32 levels"),
        ([1, 2], "a JSON object, not list"),
        ("{}", "a JSON object, not str"),
    ],
)
def test_what_cannot_be_hashed_reproducibly_is_refused(entry, says):
    with pytest.raises(AuditEntryError, match=None) as caught:
        canonical_json(entry)
    assert says in str(caught.value)
    assert isinstance(caught.value, GatewayError) and isinstance(caught.value, ValueError)


def test_the_largest_64_bit_integers_and_the_depth_limit_are_accepted():
    assert canonical_json({"x": 2**63 - 1, "y": -(2**63)}) == (
        '{"x":9223372036854775807,"y":-9223372036854775808}'
    )
    canonical_json(_deep(32))


# -- AuditEntry --------------------------------------------------------------------------------


def test_an_entry_leaves_absent_fields_out_of_its_json():
    entry = AuditEntry(ts=1.0, actor="gateway", action="approval.expired")
    assert entry.canonical() == '{"action":"approval.expired","actor":"gateway","ts":1.0}'
    assert entry.canonical() == canonical_json(entry.to_mapping())
    # A None inside a value is data, kept.
    assert json.loads(make_entry(1).canonical())["details"]["tags"] == ["drift", None, True]


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"ts": math.nan}, "finite number"),
        ({"ts": -1.0}, "greater than or equal to 0"),
        ({"inputs": {"t": math.inf}}, "finite number"),
        ({"inputs": {"t": 2**70}}, "outside the signed 64-bit range"),
        ({"reason": "a\ud800"}, "valid string"),
        ({"action": "Proposal Created"}, "should match pattern"),
        ({"action": "access."}, "should match pattern"),
        ({"actor": ""}, "at least 1 character"),
        ({"actor_kind": "robot"}, "'user', 'token', 'policy' or 'gateway'"),
        ({"who": "x"}, "Extra inputs are not permitted"),
        ({"details": {"d": _deep(40)}}, "nested deeper than 32 levels"),
        ({"simulation": [1, 2]}, "valid dictionary"),
    ],
)
def test_an_entry_that_could_not_be_chained_is_refused_at_construction(fields, says):
    base = {"ts": 1.0, "actor": "alice", "action": "proposal.created"}
    with pytest.raises(ValidationError, match=says):
        AuditEntry(**{**base, **fields})


def test_an_entry_is_frozen():
    entry = make_entry(0)
    with pytest.raises(ValidationError):
        entry.actor = "mallory"  # type: ignore[misc]
    # A copy with changes is hashed as it now reads.
    copy = entry.model_copy(update={"decision": "reject"})
    assert json.loads(copy.canonical())["decision"] == "reject"
    assert chain_row(GENESIS_HASH, 1, copy).hash != chain_row(GENESIS_HASH, 1, entry).hash


def test_a_row_maps_one_to_one_to_the_table(db):
    row = chain_row(GENESIS_HASH, 1, make_entry(0))
    assert row._fields == ("seq", "ts", "entry", "hash")
    assert row == db.execute("SELECT * FROM audit WHERE seq = 1").fetchone()
    assert row.ts == json.loads(row.entry)["ts"]
    assert row.hash == entry_hash(GENESIS_HASH, make_entry(0).to_mapping())


# -- verify --------------------------------------------------------------------------------------


def test_a_long_chain_verifies():
    rows = list(chain_rows(make_entry(i) for i in range(2000)))
    result = verify(as_rows(rows))
    assert result.ok and result.checked == 2000
    assert (result.last_seq, result.last_hash) == (2000, rows[-1].hash)
    assert result.broken_seq is None and result.problem is None
    assert (
        result.describe()
        == f"audit chain intact: 2000 entries, head seq 2000, hash {rows[-1].hash}"
    )


def test_an_empty_chain_verifies():
    result = verify([])
    assert result.ok and result.checked == 0 and result.last_seq is None
    assert result.last_hash == GENESIS_HASH
    assert "0 entries, empty" in result.describe()


def test_verify_resumes_after_a_verified_part():
    rows = list(chain_rows(make_entry(i) for i in range(20)))
    head = verify(as_rows(rows[:12]))
    assert head.last_seq == 12
    rest = verify(as_rows(rows[12:]), prev_hash=head.last_hash, first_seq=head.last_seq + 1)
    assert rest.ok and rest.checked == 8 and rest.last_hash == rows[-1].hash
    assert not verify(as_rows(rows[12:])).ok  # not from the start


def test_verify_streams_and_stops_at_the_first_break():
    pulled = 0

    def rows() -> Iterator[tuple[int, str, str]]:
        nonlocal pulled
        prev = GENESIS_HASH
        for seq in range(1, 100_001):
            pulled += 1
            row = chain_row(prev, seq, make_entry(seq))
            prev = row.hash
            yield (seq, row.entry, row.hash if seq != 30 else "f" * 64)

    result = verify(rows())
    assert (result.ok, result.broken_seq, result.problem, result.checked) == (
        False,
        30,
        "mismatch",
        29,
    )
    assert pulled == 30


def test_verify_accepts_mappings_and_bytes():
    rows = list(chain_rows(make_entry(i) for i in range(3)))
    mixed = [
        (1, json.loads(rows[0].entry), rows[0].hash),
        (2, rows[1].entry.encode(), rows[1].hash),
        (3, rows[2].entry, rows[2].hash),
    ]
    assert verify(mixed).ok


FIELDS = [name for name in AuditEntry.model_fields if name != "ts"] + ["ts"]


@pytest.mark.parametrize("field", FIELDS)
def test_changing_any_field_of_an_entry_is_named(db, field):
    (text,) = db.execute("SELECT entry FROM audit WHERE seq = 17").fetchone()
    entry = json.loads(text)
    entry[field] = {"ts": 1.0, "inputs": {}, "simulation": {}, "confidence": {}, "details": {}}.get(
        field, "tampered"
    )
    db.execute("UPDATE audit SET entry = ? WHERE seq = 17", (canonical_json(entry),))
    result = verify_db(db)
    assert (result.broken_seq, result.problem, result.checked) == (17, "mismatch", 16)
    assert result.describe().startswith("audit chain broken at seq 17: hash mismatch")


def test_removing_or_adding_a_field_is_named(db):
    (text,) = db.execute("SELECT entry FROM audit WHERE seq = 5").fetchone()
    entry = json.loads(text)
    del entry["reason"]
    db.execute("UPDATE audit SET entry = ? WHERE seq = 5", (canonical_json(entry),))
    entry["approved_by"] = "mallory"
    db.execute("UPDATE audit SET entry = ? WHERE seq = 9", (canonical_json(entry),))
    assert verify_db(db).broken_seq == 5


@pytest.mark.parametrize("seq", [1, 2, 25, 49])
def test_a_deleted_row_is_named(db, seq):
    db.execute("DELETE FROM audit WHERE seq = ?", (seq,))
    result = verify_db(db)
    assert (result.broken_seq, result.problem) == (seq, "missing")
    assert f"seq {seq} is missing" in result.reason
    assert f"is seq {seq + 1}" in result.reason


def test_swapping_two_rows_contents_is_named(db):
    a = db.execute("SELECT ts, entry, hash FROM audit WHERE seq = 10").fetchone()
    b = db.execute("SELECT ts, entry, hash FROM audit WHERE seq = 11").fetchone()
    db.execute("UPDATE audit SET ts = ?, entry = ?, hash = ? WHERE seq = 10", b)
    db.execute("UPDATE audit SET ts = ?, entry = ?, hash = ? WHERE seq = 11", a)
    assert (verify_db(db).broken_seq, verify_db(db).problem) == (10, "mismatch")


def test_rows_read_out_of_order_are_named(db):
    rows = db.execute("SELECT seq, entry, hash FROM audit ORDER BY seq").fetchall()
    rows[10], rows[11] = rows[11], rows[10]  # seq 12 read where seq 11 belongs
    assert (verify(rows).broken_seq, verify(rows).problem) == (11, "missing")
    repeated = [*rows[:5], rows[4], *rows[5:]]
    assert (verify(repeated).broken_seq, verify(repeated).problem) == (5, "out_of_order")


def test_an_inserted_row_is_named(db):
    rows = db.execute("SELECT seq, entry, hash FROM audit ORDER BY seq").fetchall()
    # A forger makes room at seq 20, chains a plausible entry after seq 19 and renumbers the rest.
    forged = chain_row(rows[18][2], 20, make_entry(99, actor="mallory"))
    moved = [(seq + 1, entry, h) for seq, entry, h in rows[19:]]
    result = verify([*rows[:19], (forged.seq, forged.entry, forged.hash), *moved])
    assert (result.broken_seq, result.problem) == (21, "mismatch")  # the forged row itself fits
    # Without chaining it properly, the forged row itself is named.
    unchained = chain_row(GENESIS_HASH, 20, make_entry(99, actor="mallory"))
    result = verify([*rows[:19], (20, unchained.entry, unchained.hash), *moved])
    assert (result.broken_seq, result.problem) == (20, "mismatch")


def test_an_appended_row_that_is_not_chained_is_named(db):
    row = chain_row(GENESIS_HASH, 51, make_entry(51))
    db.execute("INSERT INTO audit VALUES (?, ?, ?, ?)", row)
    assert (verify_db(db).broken_seq, verify_db(db).problem) == (51, "mismatch")


@pytest.mark.parametrize(
    ("new_hash", "problem"),
    [
        ("0" * 64, "mismatch"),
        ("F" * 64, "bad_hash"),  # upper case is not what the writer stores
        ("abc", "bad_hash"),
        ("", "bad_hash"),
        (12, "bad_hash"),
    ],
)
def test_a_changed_stored_hash_is_named(db, new_hash, problem):
    db.execute("UPDATE audit SET hash = ? WHERE seq = 33", (new_hash,))
    result = verify_db(db)
    assert (result.broken_seq, result.problem, result.checked) == (33, problem, 32)


def test_a_hash_fixed_up_after_a_tamper_breaks_the_next_row(db):
    (text,) = db.execute("SELECT entry FROM audit WHERE seq = 8").fetchone()
    (prev,) = db.execute("SELECT hash FROM audit WHERE seq = 7").fetchone()
    entry = json.loads(text)
    entry["decision"] = "reject"
    forged = canonical_json(entry)
    db.execute(
        "UPDATE audit SET entry = ?, hash = ? WHERE seq = 8", (forged, entry_hash(prev, entry))
    )
    assert (verify_db(db).broken_seq, verify_db(db).problem) == (9, "mismatch")


@pytest.mark.parametrize(
    ("text", "problem", "says"),
    [
        ("", "unparsable", "not valid JSON"),
        ('{"ts":1.0', "unparsable", "not valid JSON"),
        ("[1,2]", "unparsable", "a JSON object, not list"),
        ('"text"', "unparsable", "a JSON object, not str"),
        ('{"ts":NaN}', "unparsable", "NaN is not a finite number"),
        ('{"ts":Infinity}', "unparsable", "Infinity is not a finite number"),
        ('{"a":1,"a":2}', "unparsable", "duplicate key 'a'"),
        ('{"a":1e999}', "unparsable", "inf is not a finite number"),
        ('{"a":1' + "0" * 5000 + "}", "unparsable", "not valid JSON"),
        ('{"a":"\\ud800"}', "unparsable", "lone surrogate"),
        ("[" * 100_000 + "]" * 100_000, "unparsable", "not valid JSON"),
        ('{ "ts": 1.0 }', "not_canonical", "not canonical JSON"),
        ('{"b":1,"a":2}', "not_canonical", "not canonical JSON"),
        ('{"a":1.50}', "not_canonical", "not canonical JSON"),
        ('{"a":-0.0}', "not_canonical", "not canonical JSON"),
        ('{"a":"\\u00e9"}', "not_canonical", "not canonical JSON"),
    ],
)
def test_a_malformed_entry_text_is_named(db, text, problem, says):
    db.execute("UPDATE audit SET entry = ? WHERE seq = 3", (text,))
    result = verify_db(db)
    assert (result.broken_seq, result.problem, result.checked) == (3, problem, 2), result.reason
    assert says in result.reason


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ((4, "{}"), "not a (seq, entry, hash) row"),
        ((4, "{}", "0" * 64, 1.0), "not a (seq, entry, hash) row"),
        (None, "not a (seq, entry, hash) row"),
        (("4", "{}", "0" * 64), "seq is not an integer"),
        ((True, "{}", "0" * 64), "seq is not an integer"),
        ((4, 42, "0" * 64), "neither JSON text nor a mapping"),
        ((4, b"\xff{}", "0" * 64), "not UTF-8"),
        ((4, {"x": math.nan}, "0" * 64), "cannot be hashed"),
        ((4, "{}", None), "stored hash is not 64 lower-case hex digits: None"),
    ],
)
def test_a_malformed_row_is_named(row, says):
    rows = as_rows(list(chain_rows(make_entry(i) for i in range(3))))
    result = verify([*rows, row])
    assert (result.ok, result.broken_seq, result.checked) == (False, 4, 3)
    assert says in result.reason


# -- properties ------------------------------------------------------------------------------

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)
entries = st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=6)


def _reordered(value: Any, rng: Any) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _reordered(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_reordered(v, rng) for v in value]
    return value


@settings(max_examples=150, deadline=None)
@given(entry=entries, rng=st.randoms(use_true_random=False))
def test_canonical_form_is_stable_across_key_order_and_a_round_trip(entry, rng):
    text = canonical_json(entry)
    assert canonical_json(_reordered(entry, rng)) == text
    assert canonical_json(json.loads(text)) == text
    assert entry_hash(GENESIS_HASH, _reordered(entry, rng)) == entry_hash(GENESIS_HASH, entry)


def _leaf_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _leaf_paths(v, (*path, k))] or [path]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _leaf_paths(v, (*path, i))] or [path]
    return [path]


def _changed(value: Any) -> Any:
    """A value that differs from `value` in canonical JSON."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1 if value < 2**63 - 1 else value - 1
    if isinstance(value, float):
        return value + 1.0 if abs(value) < 1e15 else value / 2
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, None]
    return {**value, "tampered": True}


def _tamper_leaf(entry: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
    entry = json.loads(json.dumps(entry))
    if not path:
        return {**entry, "tampered": True}
    holder = entry
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = _changed(holder[path[-1]])
    return entry


TAMPERS = ["leaf", "text", "hash", "delete", "swap", "insert", "duplicate"]


@pytest.mark.parametrize("tamper", TAMPERS)
@settings(max_examples=30, deadline=None)
@given(chain=st.lists(entries, min_size=2, max_size=6), data=st.data())
def test_any_single_tamper_names_the_first_broken_seq(tamper, chain, data):
    rows: list[tuple[int, Any, str]] = []
    prev = GENESIS_HASH
    for seq, entry in enumerate(chain, start=1):
        prev = entry_hash(prev, entry)
        rows.append((seq, canonical_json(entry), prev))
    assert verify(rows).ok
    i = data.draw(st.integers(0, len(rows) - 1), label="row index")
    seq, text, stored = rows[i]
    expected: tuple[int, str | tuple[str, ...]]
    if tamper == "leaf":
        entry = json.loads(text)
        path = data.draw(st.sampled_from(_leaf_paths(entry)), label="path")
        rows[i] = (seq, canonical_json(_tamper_leaf(entry, path)), stored)
        expected = (seq, "mismatch")
    elif tamper == "text":
        pos = data.draw(st.integers(0, len(text) - 1), label="position")
        char = data.draw(st.characters(codec="utf-8"), label="char")
        assume(text[pos] != char)
        rows[i] = (seq, text[:pos] + char + text[pos + 1 :], stored)
        expected = (seq, ("mismatch", "unparsable", "not_canonical"))
    elif tamper == "hash":
        pos = data.draw(st.integers(0, 63), label="position")
        digit = data.draw(st.sampled_from("0123456789abcdef"), label="digit")
        assume(stored[pos] != digit)
        rows[i] = (seq, text, stored[:pos] + digit + stored[pos + 1 :])
        expected = (seq, "mismatch")
    elif tamper == "delete":
        del rows[i]
        expected = (seq, "missing")
        if i == len(chain) - 1:
            expected = (0, "undetectable")  # the tail: the chain cannot know
    elif tamper == "swap":
        assume(i + 1 < len(rows))
        assume(rows[i][1] != rows[i + 1][1])
        rows[i], rows[i + 1] = (seq, rows[i + 1][1], rows[i + 1][2]), (seq + 1, text, stored)
        expected = (seq, "mismatch")
    elif tamper == "insert":
        # A forger chains a new row after the one before and renumbers the rest: the forged
        # row fits, and the first original row after it is named.
        forged = data.draw(entries, label="forged entry")
        before = rows[i - 1][2] if i else GENESIS_HASH
        rows.insert(i, (seq, canonical_json(forged), entry_hash(before, forged)))
        rows[i + 1 :] = [(s + 1, t, h) for s, t, h in rows[i + 1 :]]
        expected = (seq + 1, "mismatch")
    else:  # duplicate: the same row read twice
        rows.insert(i, rows[i])
        expected = (seq, "out_of_order")
    result = verify(rows)
    if expected[1] == "undetectable":
        assert result.ok
        return
    broken_seq, problem = expected
    assert not result.ok
    assert result.broken_seq == broken_seq, result.reason
    assert result.problem in (problem if isinstance(problem, tuple) else (problem,))
    # Every row before the broken one verified (a repeated row is named after its first copy).
    assert result.checked == (broken_seq if tamper == "duplicate" else broken_seq - 1)
