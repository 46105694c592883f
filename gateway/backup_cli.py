"""`opstwin backup` and `opstwin restore`: the command line over `gateway/backup.py`."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gateway.backup import (
    MANIFEST_NAME,
    BackupFile,
    BackupResult,
    Manifest,
    RestoreResult,
    backup,
    database_paths,
    restore,
)
from gateway.config import load_config

__all__ = ["add_backup_commands", "cmd_backup", "cmd_restore"]

EXIT_TERMINATED = 128 + signal.SIGTERM


def add_backup_commands(sub: Any) -> None:
    """Register `backup` and `restore` on the CLI's subparsers."""
    take = sub.add_parser("backup", help="back up twin.db and control.db while the gateway runs")
    take.add_argument("--config", "-c", required=True, help="site config YAML file")
    take.add_argument("dest", metavar="DEST", help="a new (or empty) directory for the backup")
    take.set_defaults(handler=cmd_backup)

    put = sub.add_parser("restore", help="replace twin.db and control.db with a checked backup")
    put.add_argument("--config", "-c", required=True, help="site config YAML file")
    put.add_argument("src", metavar="SRC", help="a directory written by `opstwin backup`")
    put.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="restore without asking (needed when stdin is not a terminal)",
    )
    put.set_defaults(handler=cmd_restore)


def cmd_backup(args: argparse.Namespace) -> int:
    """Take a backup and print what it holds."""
    storage = load_config(args.config).storage.path
    with _terminate_cleanly():
        result = backup(storage, Path(args.dest))
    print(_describe_backup(result, args.config))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Restore a backup after checking it, keeping the files it replaces."""
    from gateway.twin_cli import UsageError

    if not args.yes and not sys.stdin.isatty():
        raise UsageError(
            "restore replaces the gateway's databases: pass --yes to confirm (stdin is not a "
            "terminal, so there is no prompt)"
        )
    storage = load_config(args.config).storage.path
    confirm = None if args.yes else _ask
    with _terminate_cleanly():
        result = restore(storage, Path(args.src), confirm=confirm)
    print(_describe_restore(result, Path(args.src), storage))
    return 0


def describe_backup_file(entry: BackupFile) -> str:
    """One line about a database in a backup: size, schema and what it holds."""
    details = entry.details
    if "rev" in details:
        held = f"rev {details['rev']}"
        if details.get("current_rev") is not None:
            held += f" (current values stored as of rev {details['current_rev']})"
    else:
        users, tokens = details.get("users", 0), details.get("tokens", 0)
        held = (
            f"{users} user{'s' * (users != 1)}, {tokens} active token{'s' * (tokens != 1)}, "
            f"audit log to seq {details.get('audit_seq', 0)}"
        )
    return f"{_size(entry.bytes):>10}  schema {entry.schema_version}  {held}"


def _describe_backup(result: BackupResult, config: str) -> str:
    manifest = result.manifest
    width = max(len(f.name) for f in manifest.files)
    lines = [
        f"backup written to {result.dest} in {result.seconds:.1f} s; every copy passes "
        "PRAGMA integrity_check:",
        *(f"  {f.name:<{width}}  {describe_backup_file(f)}" for f in manifest.files),
        f"  {MANIFEST_NAME} (sizes and SHA-256 of the files, created {manifest.created})",
        f"taken from {manifest.source}",
        f"restore it with: opstwin restore --config {config} {result.dest}",
    ]
    if result.restarts:
        lines.append(f"(the copy started over {result.restarts} time(s) as the data changed)")
    return "\n".join(lines)


def _describe_restore(result: RestoreResult, src: Path, storage: Path) -> str:
    manifest = result.manifest
    targets = database_paths(storage)
    width = max(len(str(p)) for p in targets.values())
    lines = [
        f"restored {src} (taken {manifest.created} by opstwin {manifest.opstwin_version}) in "
        f"{result.seconds:.1f} s:",
        *(f"  {targets[f.name]!s:<{width}}  {describe_backup_file(f)}" for f in manifest.files),
    ]
    if result.kept:
        lines.append(
            "the files it replaced are kept (to undo: stop the gateway and rename them back, "
            "each without its .before-restore-… part):"
        )
        lines += [f"  {path}" for path in result.kept]
    else:
        lines.append("there were no files to replace")
    lines.append("start the gateway: systemctl start opstwin-gateway")
    return "\n".join(lines)


def _ask(manifest: Manifest, existing: Sequence[Path]) -> bool:
    """Show what a restore will do and read `yes` from the terminal."""
    lines = [
        f"the backup (taken {manifest.created} by opstwin {manifest.opstwin_version} from "
        f"{manifest.source}) passes every check:",
        *(f"  {f.name:<10}  {describe_backup_file(f)}" for f in manifest.files),
    ]
    if existing:
        lines.append("it replaces (keeping each as <name>.before-restore-<time>):")
        lines += [f"  {path}" for path in existing]
    print("\n".join(lines), file=sys.stderr)
    print("type yes to restore: ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline(16)
    return answer.strip().lower() == "yes"


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """Turn SIGTERM (a cron or systemd timeout) into SystemExit, so that a backup removes its
    partial directory and a restore its temporary files and lock, as on Ctrl-C."""

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(EXIT_TERMINATED)

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (an in-process caller): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop returns
