"""The read-only CLI commands over a twin database: current values, history, the event log.

They open the database read-only beside a running gateway (WAL lets readers and the writer
proceed together) and read the views the schema defines with sqlite-utils.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from gateway.config import load_config
from gateway.errors import GatewayError
from gateway.twin.history import HistoryReader

__all__ = ["add_twin_commands"]


def add_twin_commands(sub: Any) -> None:
    """Register `twin`, `history` and `events` on the CLI's subparsers."""
    twin = sub.add_parser("twin", help="current values from the twin database")
    twin.add_argument("--config", "-c", required=True, help="site config YAML file")
    twin.add_argument("--json", action="store_true", help="print JSON instead of a table")
    twin.set_defaults(handler=cmd_twin)

    history = sub.add_parser("history", help="a point's history or time-bucket aggregates")
    history.add_argument("--config", "-c", required=True, help="site config YAML file")
    history.add_argument("point", help="point id, e.g. utilities/cooling/tank1/level")
    history.add_argument("--minutes", type=float, default=10.0, help="how far back (default 10)")
    history.add_argument("--bucket", type=float, default=None, help="aggregate per S seconds")
    history.add_argument("--limit", type=int, default=50, help="most rows to print (default 50)")
    history.set_defaults(handler=cmd_history)

    events = sub.add_parser("events", help="the event log")
    events.add_argument("--config", "-c", required=True, help="site config YAML file")
    events.add_argument("--since", type=int, default=None, help="events after this rev")
    events.add_argument("--limit", type=int, default=30, help="most events to print (default 30)")
    events.set_defaults(handler=cmd_events)


def cmd_twin(args: argparse.Namespace) -> int:
    """Print every point's current value."""
    db = _open(args.config)
    rows = list(db.query("SELECT * FROM current_values ORDER BY point_id"))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        _table(
            ["point", "value", "quality", "rev", "age", "reason"],
            (
                [
                    r["point_id"],
                    _fmt(r["value"]),
                    r["quality"],
                    r["rev"],
                    _age(r["gateway_ts"]),
                    r["reason"] or "",
                ]
                for r in rows
            ),
        )
    )
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """Print a point's recent history or its aggregates."""
    path = _db_path(args.config)
    reader = HistoryReader(path)
    end = time.time()
    start = end - args.minutes * 60
    try:
        if args.bucket:
            buckets = reader.aggregate(args.point, start, end, args.bucket)[-args.limit :]
            print(
                _table(
                    ["bucket start", "count", "min", "max", "mean", "last"],
                    (
                        [
                            _clock(b.start),
                            b.count,
                            _fmt(b.min),
                            _fmt(b.max),
                            _fmt(b.mean),
                            _fmt(b.last),
                        ]
                        for b in buckets
                    ),
                )
            )
        else:
            rows = reader.history(args.point, start, end, limit=1_000_000)[-args.limit :]
            print(
                _table(
                    ["time", "value", "quality", "rev", "reason"],
                    (
                        [_clock(r.ts), _fmt(r.value), str(r.quality), r.rev, r.reason or ""]
                        for r in rows
                    ),
                )
            )
    finally:
        reader.close()
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    """Print the event log, newest last."""
    db = _open(args.config)
    if args.since is None:
        sql = "SELECT * FROM (SELECT * FROM event_log ORDER BY rev DESC LIMIT ?) ORDER BY rev"
        rows = list(db.query(sql, [args.limit]))
    else:
        sql = "SELECT * FROM event_log WHERE rev > ? ORDER BY rev LIMIT ?"
        rows = list(db.query(sql, [args.since, args.limit]))
    print(
        _table(
            ["rev", "time", "type", "point / asset", "data"],
            (
                [
                    r["rev"],
                    _clock(r["ts"]),
                    r["type"],
                    r["point_id"] or r["asset_id"] or "",
                    r["data"] or "",
                ]
                for r in rows
            ),
        )
    )
    return 0


# -- helpers -----------------------------------------------------------------------------------


def _db_path(config_file: str) -> Path:
    path = load_config(config_file).storage.path
    if not path.exists():
        raise GatewayError(f"no twin database at {path} (has the gateway run with this config?)")
    return path


def _open(config_file: str) -> sqlite_utils.Database:
    path = _db_path(config_file)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    return sqlite_utils.Database(conn)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    body = [[str(c) for c in row] for row in rows]
    if not body:
        return "(no rows)"
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, body)]).rstrip()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]


def _age(ts: float | None) -> str:
    return "" if ts is None else f"{time.time() - ts:.1f}s"
