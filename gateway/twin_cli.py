"""The read-only CLI commands over a twin database: current values, history, the event log.

They open the database read-only beside a running gateway (WAL lets readers and the writer
proceed together). History and the event log's telemetry are compressed (see
`gateway/twin/schema.py`), so they are read through the store's own readers, not SQL views.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from gateway.config import load_config
from gateway.errors import ConfigError, GatewayError, UnknownPointError
from gateway.twin.history import CursorExpiredError, HistoryReader, decode_value
from gateway.twin.schema import QUALITIES, SCHEMA_VERSION, fault
from gateway.twin.store import load_current

__all__ = [
    "UsageError",
    "add_twin_commands",
    "count_arg",
    "known_point",
    "positive_arg",
    "reading_twin",
    "twin_db_path",
]

MAX_REV = 2**63 - 1  # SQLite's largest integer
MAX_ROWS = 1_000_000


class UsageError(GatewayError):
    """A command-line argument that cannot be right (the CLI exits 2, like argparse)."""


def count_arg(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], refused with a message saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}..{high}, got {text}")
        return value

    return parse


def positive_arg(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def add_twin_commands(sub: Any) -> None:
    """Register `twin`, `history` and `events` on the CLI's subparsers."""
    twin = sub.add_parser("twin", help="current values from the twin database")
    twin.add_argument("--config", "-c", required=True, help="site config YAML file")
    twin.add_argument("--json", action="store_true", help="print JSON instead of a table")
    twin.set_defaults(handler=cmd_twin)

    history = sub.add_parser("history", help="a point's history or time-bucket aggregates")
    history.add_argument("--config", "-c", required=True, help="site config YAML file")
    history.add_argument("point", help="point id, e.g. utilities/cooling/tank1/level")
    history.add_argument(
        "--minutes", type=positive_arg, default=10.0, help="how far back (default 10)"
    )
    history.add_argument(
        "--bucket", type=positive_arg, default=None, help="aggregate per S seconds"
    )
    history.add_argument(
        "--limit", type=count_arg(1, MAX_ROWS), default=50, help="most rows to print (default 50)"
    )
    history.set_defaults(handler=cmd_history)

    events = sub.add_parser("events", help="the event log")
    events.add_argument("--config", "-c", required=True, help="site config YAML file")
    events.add_argument(
        "--since", type=count_arg(0, MAX_REV), default=None, help="events after this rev"
    )
    events.add_argument(
        "--limit",
        type=count_arg(1, MAX_ROWS),
        default=30,
        help="most events to print (default 30)",
    )
    events.set_defaults(handler=cmd_events)


def cmd_twin(args: argparse.Namespace) -> int:
    """Print every point's current value."""
    path = twin_db_path(args.config)
    with _database(path) as db:
        current, _ = load_current(db.conn)
        points = {
            pid: (point_id, decode_value(datatype))
            for pid, point_id, datatype in db.conn.execute("SELECT pid, id, datatype FROM points")
        }
    rows = []
    for rev, ts, pid, value, quality, source_ts, reason in current.values():
        point_id, decode = points[pid]
        rows.append(
            {
                "point_id": point_id,
                "value": decode(value) if decode else value,
                "quality": str(QUALITIES[quality]),
                "source_ts": source_ts,
                "gateway_ts": ts,
                "rev": rev,
                "reason": reason,
            }
        )
    rows.sort(key=lambda row: row["point_id"])
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
    path = twin_db_path(args.config)
    with _database(path):
        pass  # one check that it is a twin database at all, with the CLI's messages
    reader = HistoryReader(path)
    end = time.time()
    start = end - args.minutes * 60
    try:
        if args.bucket:
            with known_point(args.point, path):
                buckets = reader.aggregate(args.point, start, end, args.bucket)
            buckets = buckets[-args.limit :]
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
            with known_point(args.point, path):
                rows = reader.history(args.point, start, end, limit=MAX_ROWS)
            rows = rows[-args.limit :]
            print(
                _table(
                    ["time", "value", "quality", "rev", "reason"],
                    (
                        [
                            _clock(r.ts),
                            _fmt(r.value),
                            str(r.quality),
                            r.rev if not r.downsampled else "-",
                            r.reason or ("downsampled" if r.downsampled else ""),
                        ]
                        for r in rows
                    ),
                )
            )
    finally:
        reader.close()
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    """Print the event log, newest last."""
    path = twin_db_path(args.config)
    with _database(path) as db:
        since = args.since
        if since is None:
            top = db.conn.execute(
                "SELECT max(coalesce((SELECT max(rev1) FROM frames), 0), "
                "coalesce((SELECT max(rev) FROM events), 0))"
            ).fetchone()[0]
            start = int(
                db.conn.execute("SELECT value FROM meta WHERE key = 'log_start_rev'").fetchone()[0]
            )
            since = max(top - args.limit, start - 1, 0)
    reader = HistoryReader(path)
    try:
        events = reader.events_since(since, args.limit)
    except CursorExpiredError as exc:
        raise UsageError(
            f"{exc}: `opstwin events --since {exc.log_start_rev - 1}` shows the oldest kept"
        ) from None
    finally:
        reader.close()
    print(
        _table(
            ["rev", "time", "type", "point / asset", "data"],
            (
                [
                    e.rev,
                    _clock(e.ts),
                    e.type,
                    e.point_id or e.asset_id or "",
                    json.dumps(e.data, separators=(",", ":"), default=str),
                ]
                for e in events
            ),
        )
    )
    return 0


# -- helpers -----------------------------------------------------------------------------------


def twin_db_path(config_file: str) -> Path:
    """The database a config names; ConfigError (exit 2) if there is none yet."""
    path = load_config(config_file).storage.path
    if not path.exists():
        raise ConfigError(
            f"no twin database at {path} (storage.path of {config_file}); has the gateway run "
            "with this config?"
        )
    return path


# What a twin database has, whatever its schema version; a file without them is another one.
_TWIN_OBJECTS = {"events", "current_values", "event_log"}


@contextlib.contextmanager
def _database(path: Path) -> Iterator[sqlite_utils.Database]:
    """A read-only view of the twin database; its failures become one-line GatewayErrors."""
    # A URI, so that the file is never created or written; as_uri() escapes `?` and `#`.
    conn = None
    try:
        with reading_twin(path):
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            missing = _TWIN_OBJECTS - names
            if not missing and "frames" not in names:
                raise GatewayError(
                    f"{path}: the twin database has an older schema; start the gateway once "
                    f"with this version (it migrates the database to schema {SCHEMA_VERSION})"
                )
            if missing:
                raise GatewayError(
                    f"{path}: not a twin database (it has no {', '.join(sorted(missing))}); "
                    "check storage.path in the config"
                )
            yield sqlite_utils.Database(conn)
    finally:
        if conn is not None:
            conn.close()


@contextlib.contextmanager
def reading_twin(path: Path) -> Iterator[None]:
    """Turn SQLite's errors while reading `path` into one line saying what to do."""
    try:
        yield
    except sqlite3.Error as exc:
        # A damaged page, a file that is no database, a disk error: the store's own wording,
        # with the recovery steps when the file is damaged.
        raise fault(exc, path, "read") from None


@contextlib.contextmanager
def known_point(point_id: str, path: Path) -> Iterator[None]:
    """Turn the store's "unknown point" into a usage error naming the point and the database."""
    try:
        yield
    except UnknownPointError:
        raise UsageError(
            f"{point_id!r} is not a point of the twin database {path} "
            "(`opstwin twin -c CONFIG` lists them)"
        ) from None


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
