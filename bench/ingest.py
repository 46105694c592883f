"""Twin-store ingest throughput beside raw SQLite `executemany` of the same rows.

    .venv/bin/python bench/ingest.py [--points 1000] [--updates 300000] [--batch 500] [--repeats 5]

Twin: `TwinStore.ingest()` of driver-sized batches (every sample a change, deadband 0) → filter,
rev, in-memory state → writer thread → SQLite (one compressed frame per run of batches, see
`gateway/twin/schema.py`), timed from the first ingest until `flush()` returns, i.e. until every
update is committed.

Raw: the same rows (same revs, points, values, one timestamp per batch), pre-built, written as
plain rows (one row per update, rowid = rev, no index: what a row-per-sample store costs at
the least) on a connection with the store's settings, in transactions of `flush_rows` rows:
once with per-row `executemany` (the baseline of the ratio), once with multi-row VALUES
statements. No filtering, no thread, no queue, no compression: a ceiling for storing rows,
not a competitor.

Every rate is point updates per second, so the ratios compare like with like. Last, one twin
run with the ingesting thread spinning in Python until everything is committed: the writer's
worst case. The last line of output is one JSON object with the medians.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from drivers.contract import Quality, Sample
from gateway.twin.model import PointDef
from gateway.twin.schema import connect
from gateway.twin.store import TwinStore
from gateway.twin.writer import MultiRowInsert

FLUSH_ROWS = 5000
RAW_TABLE = (
    "CREATE TABLE samples (rev INTEGER PRIMARY KEY, ts REAL NOT NULL, pid INTEGER NOT NULL, "
    "value, quality INTEGER NOT NULL, source_ts REAL, reason TEXT)"
)
RAW_INSERT = (
    "INSERT INTO samples(rev, ts, pid, value, quality, source_ts, reason) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def main(argv: list[str] | None = None) -> int:
    """Run both measurements several times and print medians, then one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--updates", type=int, default=300_000)
    parser.add_argument("--batch", type=int, default=500, help="samples per ingest() call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--busy-updates", type=int, default=50_000, help="0 skips that run")
    parser.add_argument("--dir", default=None, help="where the databases go (default: a temp dir)")
    args = parser.parse_args(argv)

    points = [
        PointDef(f"plant/line{i % 10}/asset{i // 10}/signal{i}", "bench", "float32")
        for i in range(args.points)
    ]
    batches = make_batches(points, args.updates, args.batch)
    print(
        f"twin-store ingest benchmark: {args.points} points, {args.updates:,} point updates, "
        f"batches of {args.batch}, {args.repeats} repeats (medians), "
        f"SQLite {sqlite3.sqlite_version}"
    )
    twin_runs: list[dict[str, float]] = []
    raw_runs: list[float] = []
    multi_runs: list[float] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for repeat in range(args.repeats):
            twin_runs.append(run_twin(Path(tmp) / f"twin{repeat}.db", points, batches))
            raw_runs.append(
                run_raw(Path(tmp) / f"raw{repeat}.db", points, args.updates, args.batch, False)
            )
            multi_runs.append(
                run_raw(Path(tmp) / f"multi{repeat}.db", points, args.updates, args.batch, True)
            )
            print(
                f"  run {repeat + 1}: twin {twin_runs[-1]['rate']:>9,.0f}/s"
                f"  raw executemany {raw_runs[-1]:>9,.0f}/s"
                f"  raw multi-row {multi_runs[-1]:>9,.0f}/s",
                flush=True,
            )
        busy = None
        if args.busy_updates:
            busy_batches = make_batches(points, args.busy_updates, args.batch)
            busy = run_twin(Path(tmp) / "busy.db", points, busy_batches, spin=True)["rate"]

    twin = statistics.median(r["rate"] for r in twin_runs)
    ingest_only = statistics.median(r["ingest_rate"] for r in twin_runs)
    txn_rows = statistics.median(r["rows_per_txn"] for r in twin_runs)
    raw = statistics.median(raw_runs)
    multi = statistics.median(multi_runs)
    ratio = twin / raw
    rows = [
        ("twin: ingest() calls only (in memory + queued)", f"{ingest_only:,.0f}"),
        ("twin: ingest -> committed (until flush returns)", f"{twin:,.0f}"),
        ("raw: executemany of plain rows, committed", f"{raw:,.0f}"),
        ("raw: multi-row VALUES of plain rows, committed", f"{multi:,.0f}"),
        ("ratio twin / raw executemany", f"{ratio:.2f}"),
        ("ratio twin / raw multi-row", f"{twin / multi:.2f}"),
        ("twin rows per transaction", f"{txn_rows:,.0f}"),
    ]
    if busy is not None:
        label = f"twin, ingest thread busy in Python ({args.busy_updates:,} upd.)"
        rows.append((label, f"{busy:,.0f}"))
    print()
    print(f"{'measure':<56} {'point updates/s':>16}")
    print(f"{'-' * 56} {'-' * 16}")
    for label, value in rows:
        print(f"{label:<56} {value:>16}")
    print()
    print("Every rate is point updates per second. Raw runs write pre-built plain rows (one per")
    print(f"update, no index) in transactions of {FLUSH_ROWS} rows on a connection with the")
    print("store's settings: no filtering, no thread, no queue, no compression.")
    print("The busy run spins the ingesting thread in Python until the writer has caught up: the")
    print("worst case of an event loop that never yields the GIL (see writer.MultiRowInsert).")
    ok = twin >= 100_000 and ratio >= 0.5
    print(f"targets (>= 100,000 updates/s and >= 0.50 of raw): {'met' if ok else 'NOT met'}")
    print(
        json.dumps(
            {
                "twin_updates_per_s": round(twin),
                "raw_sqlite_rows_per_s": round(raw),
                "ratio": round(ratio, 3),
            }
        )
    )
    return 0


def make_batches(points: list[PointDef], updates: int, size: int) -> list[list[Sample]]:
    """Driver-like batches in which every sample changes its point's value."""
    rng = random.Random(7)
    values = [rng.uniform(0, 100) for _ in points]
    samples = []
    for i in range(updates):
        k = i % len(points)
        values[k] += rng.uniform(0.01, 1.0)
        samples.append(Sample(points[k].id, values[k], Quality.GOOD, 1.7e9 + i * 1e-3))
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def run_twin(
    path: Path, points: list[PointDef], batches: list[list[Sample]], *, spin: bool = False
) -> dict[str, float]:
    """Ingest every batch, then wait until all is committed; return rates."""
    store = TwinStore(path, points, flush_rows=FLUSH_ROWS)
    store.open()
    try:
        first_rev = store.rev
        t0 = time.perf_counter()
        for batch in batches:
            store.ingest(batch)
        t1 = time.perf_counter()
        if spin:
            while store.committed_rev < store.rev:
                pass
        store.flush(timeout=300)
        t2 = time.perf_counter()
        updates = store.rev - first_rev
        stats = store.stats
        if stats.accepted != sum(len(b) for b in batches):
            raise SystemExit(f"bench: only {stats.accepted} updates were accepted")
    finally:
        store.close()
    return {
        "rate": updates / (t2 - t0),
        "ingest_rate": updates / (t1 - t0),
        "rows_per_txn": stats.rows_written / max(stats.batches, 1),
    }


def run_raw(path: Path, points: list[PointDef], updates: int, batch: int, multi_row: bool) -> float:
    """The same rows through plain SQLite; return updates/s."""
    conn = connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(RAW_TABLE)
    rng = random.Random(7)
    values = [rng.uniform(0, 100) for _ in points]
    rows = []
    for i in range(updates):
        k = i % len(points)
        values[k] += rng.uniform(0.01, 1.0)
        ts = 1.8e9 + (i // batch) * 1e-4
        rows.append((i + 1, ts, k + 1, values[k], 0, 1.7e9 + i * 1e-3, None))
    chunks = [rows[i : i + FLUSH_ROWS] for i in range(0, len(rows), FLUSH_ROWS)]
    insert = MultiRowInsert(conn, RAW_INSERT)
    t0 = time.perf_counter()
    for chunk in chunks:
        conn.execute("BEGIN IMMEDIATE")
        if multi_row:
            insert.write(conn, chunk)
        else:
            conn.executemany(RAW_INSERT, chunk)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    count = conn.execute("SELECT count(*) FROM samples").fetchone()[0]
    conn.close()
    if count != updates:
        raise SystemExit(f"bench: raw wrote {count} rows, expected {updates}")
    return updates / elapsed


if __name__ == "__main__":
    sys.exit(main())
