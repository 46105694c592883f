"""Helpers for the backup and restore tests: a gateway's state on disk, and ways to damage it."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from drivers.contract import Quality, Sample
from gateway.control import AccountStore, ControlDB
from gateway.control.users import parse_grant
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore

PASSWORD = "correct horse battery"
POINTS = [PointDef(f"line1/press{i}/count", "plc1", "float64") for i in range(10)]


def write_site(folder: Path, storage: str = "state/twin.db", **extra: Any) -> Path:
    """A site config without devices whose twin database is `folder/storage`."""
    path = folder / "site.yaml"
    data = {"site_id": "plant-a", "gateway_id": "gw-1", "storage": {"path": storage}}
    data.update(extra)
    data.setdefault("devices", [])
    path.write_text(yaml.safe_dump(data))
    return path


def add_history(db: Path, rounds: int, start: float = 0.0) -> int:
    """Ingest `rounds` changes of every point into the twin at `db`; return the committed rev."""
    with TwinStore(db, POINTS) as store:
        for k in range(rounds):
            store.ingest(
                [Sample(p.id, start + k + i / 100, Quality.GOOD) for i, p in enumerate(POINTS)]
            )
        store.flush()
        return store.committed_rev


def add_user(db: Path, name: str) -> None:
    """Add a viewer with PASSWORD to the control database beside the twin at `db`."""
    with ControlDB(db.parent / "control.db") as control:
        AccountStore(control).add_user(name, PASSWORD, [parse_grant("viewer")])


def users(control_db: Path) -> list[str]:
    """The user names a control database holds (read as any SQLite file: WAL and all)."""
    conn = sqlite3.connect(control_db)
    try:
        return [name for (name,) in conn.execute("SELECT name FROM users ORDER BY name")]
    finally:
        conn.close()


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file in `folder` by name: to show that nothing there changed (the lock
    file aside: taking the lock writes the taker's pid into it)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.iterdir()
        if p.is_file() and p.suffix != ".lock"
    }


def damage_page(db: Path, table: str) -> None:
    """Overwrite the cell pointers of a leaf page of `table`: integrity_check fails, the file
    still opens."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?immutable=1", uri=True)
    try:
        (page,) = conn.execute(
            "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' AND ncell > 0 LIMIT 1",
            (table,),
        ).fetchone()
        (size,) = conn.execute("PRAGMA page_size").fetchone()
    finally:
        conn.close()
    with open(db, "r+b") as f:
        f.seek((page - 1) * size + 8)
        f.write(b"\xff" * 16)


def checkpoint(db: Path) -> None:
    """Fold the WAL into the main file, so that bytes changed in it are what SQLite reads."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def edit_manifest(backup: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """Rewrite `backup/manifest.json` after `change(doc)` (which may also return a new doc)."""
    path = backup / "manifest.json"
    doc = json.loads(path.read_text())
    doc = change(doc) or doc
    path.write_text(json.dumps(doc))


def reseal(backup: Path) -> None:
    """Make the manifest's sizes and checksums match the files again (a hand-edited backup)."""

    def fix(doc: dict[str, Any]) -> None:
        for entry in doc["files"]:
            data = (backup / entry["name"]).read_bytes()
            entry["bytes"] = len(data)
            entry["sha256"] = hashlib.sha256(data).hexdigest()

    edit_manifest(backup, fix)


def set_schema_version(db: Path, version: int) -> None:
    """Record a migration `version` in a database (as a newer gateway would have)."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute(
            "INSERT INTO _migrations(version, name, applied_at) VALUES (?, 'from the future', 0)",
            (version,),
        )
        conn.execute("PRAGMA journal_mode=DELETE")
    finally:
        conn.close()
