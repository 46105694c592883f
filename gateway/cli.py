"""The `opstwin` command: run, check, demo, and read-only views of a gateway's twin database."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sqlite3
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.config import SiteConfig, load_config
from gateway.config.model import HttpDeviceConfig
from gateway.errors import ConfigError, GatewayError
from gateway.logfmt import FORMATS, LogFormat, journal_stream, make_handler

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_CLOSED_PIPE = 141  # what a shell reports for a command ended by SIGPIPE (128 + 13)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run one subcommand; return the process exit code."""
    from gateway.twin_cli import UsageError

    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints them and exits 2
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_CONFIG
    try:
        return int(args.handler(args) or EXIT_OK)
    except (ConfigError, UsageError) as exc:
        _print_error(f"opstwin: {exc}")
        return EXIT_CONFIG
    except GatewayError as exc:
        _print_error(f"opstwin: {exc}")
        return EXIT_ERROR
    except sqlite3.Error as exc:
        # The views turn database errors into GatewayErrors with the file and what to do; this
        # is the net under them, so that no path prints a traceback.
        _print_error(f"opstwin: database error: {' '.join(str(exc).split())}")
        return EXIT_ERROR
    except BrokenPipeError:
        return _reader_gone()
    except KeyboardInterrupt:
        return 130


def _print_error(text: str) -> None:
    """Say why the command failed on stderr; under journald (the unit's `opstwin run`, or its
    `opstwin check` before it) each line is marked `<3>`, an error, as log lines are marked with
    their level: else journald files it as info and `journalctl -p warning` would not show it."""
    try:
        journald = journal_stream(sys.stderr.fileno(), os.environ)
    except (AttributeError, OSError, ValueError):  # a stderr without a descriptor
        journald = False
    if journald:
        text = "\n".join(f"<3>{line}" for line in text.split("\n"))
    print(text, file=sys.stderr)


def _reader_gone() -> int:
    # `opstwin check site.yaml | head -1`: the reader has what it wanted and left. Nothing is
    # wrong; point stdout at /dev/null so the interpreter's last flush does not fail again with
    # a traceback, and end like any command whose reader went away.
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return EXIT_CLOSED_PIPE


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand (the README documents each one)."""
    from gateway.twin_cli import count_arg, positive_arg

    parser = argparse.ArgumentParser(
        prog="opstwin",
        description="OpsTwin Gateway: industrial edge gateway with a digital twin.",
    )
    parser.add_argument("--version", action="version", version=f"opstwin {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway with a site config until SIGTERM/SIGINT")
    run.add_argument("--config", "-c", required=True, help="site config YAML file")
    _add_log_options(run, level_default="the config's log_level")
    run.set_defaults(handler=cmd_run)

    check = sub.add_parser("check", help="validate a site config and print what it declares")
    check.add_argument("config", help="site config YAML file")
    check.set_defaults(handler=cmd_check)

    demo = sub.add_parser(
        "demo", help="start the simulated plant and a gateway reading it; print where to look"
    )
    demo.add_argument(
        "--state-dir", default="opstwin-demo", help="folder for the demo config and database"
    )
    demo.add_argument(
        "--http-port", type=count_arg(0, 65535), default=8000, help="gateway HTTP port (0 = free)"
    )
    demo.add_argument("--seed", type=int, default=7, help="simulated plant seed")
    demo.add_argument(
        "--duration",
        type=positive_arg,
        default=None,
        help="stop after this many seconds (default: run)",
    )
    _add_log_options(demo, level_default="INFO")
    demo.set_defaults(handler=cmd_demo)

    hashpw = sub.add_parser(
        "hash-password", help="print an argon2 hash for an opcua_server user's password_hash"
    )
    hashpw.set_defaults(handler=cmd_hash_password)

    from gateway.backup_cli import add_backup_commands
    from gateway.mirror.cli import add_mirror_command
    from gateway.proposal_cli import add_proposal_commands
    from gateway.sim.cli import add_sim_commands
    from gateway.twin_cli import add_twin_commands

    add_twin_commands(sub)
    add_sim_commands(sub)
    _add_control_commands(sub)
    add_proposal_commands(sub)
    add_mirror_command(sub)
    add_backup_commands(sub)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    """Run the gateway."""
    from gateway.serve import serve

    config = load_config(args.config)
    setup_logging(args.log_level or config.log_level, args.log_format)
    # The file, so that SIGHUP can re-read it (gateway/reload.py).
    pinned = args.log_level is not None
    asyncio.run(serve(config, config_path=Path(args.config).absolute(), log_level_pinned=pinned))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a config and describe it."""
    from gateway.policy.load import load_policies

    config = load_config(args.config)
    # The policies are checked against the points too: `check` refuses what `run` would.
    folder = config.policies.dir
    policies = [] if folder is None else list(load_policies(folder, config))
    print(describe(config, args.config))
    if folder is None:
        print("policies: none (`policies.dir` is not set)")
    else:
        print(f"{len(policies)} polic{'y' if len(policies) == 1 else 'ies'} in {folder}:")
        for policy in policies:
            state = "" if policy.enabled else " [disabled]"
            action = policy.action
            print(
                f"  {policy.id:<28} sets {policy.point_id(action.point)} "
                f"[{action.bounds.lo:g}..{action.bounds.hi:g}], "
                f"{policy.simulation.paths} paths x {policy.simulation.horizon_s:g} s{state}"
            )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo plant and gateway."""
    from gateway.demo import run_demo

    setup_logging(args.log_level or "INFO", args.log_format)
    return run_demo(
        state_dir=args.state_dir, http_port=args.http_port, seed=args.seed, duration=args.duration
    )


def cmd_hash_password(args: argparse.Namespace) -> int:
    """Read a password (twice, unechoed) and print its argon2 hash."""
    import getpass

    from gateway.opcua_server.users import hash_password

    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            print("opstwin: the passwords differ", file=sys.stderr)
            return EXIT_CONFIG
    else:
        first = sys.stdin.readline().rstrip("\n")
    if not first:
        print("opstwin: an empty password is not allowed", file=sys.stderr)
        return EXIT_CONFIG
    print(hash_password(first))
    return EXIT_OK


# -- users, API tokens and the audit log (control.db beside the twin database) ------------------


def _add_control_commands(sub: Any) -> None:
    """Register `user`, `token` and `audit`, each with its actions."""
    from gateway.twin_cli import count_arg

    def action(group: Any, name: str, help: str, handler: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(name, help=help)
        parser.add_argument("--config", "-c", required=True, help="site config YAML file")
        parser.set_defaults(handler=handler)
        return parser

    def group(name: str, help: str, actions: str) -> Any:
        parser = sub.add_parser(name, help=help)
        parser.set_defaults(handler=_needs_action(name, actions))
        return parser.add_subparsers(title="actions", metavar="ACTION")

    grant_help = "ROLE or ROLE:GLOB[,GLOB...], e.g. supervisor:plant/oven1/*; repeatable"
    stdin_help = "read the password from one line of stdin instead of prompting"

    users = group("user", "users of the web UI and the OPC UA server", "add, list, disable, passwd")
    add = action(users, "add", "add a user with a password and grants", cmd_user_add)
    add.add_argument("name", help="user name")
    add.add_argument("--grant", "-g", action="append", required=True, help=grant_help)
    add.add_argument("--password-stdin", action="store_true", help=stdin_help)
    action(users, "list", "list users and their grants", cmd_user_list)
    disable = action(users, "disable", "refuse every login of a user", cmd_user_disable)
    disable.add_argument("name", help="user name")
    passwd = action(users, "passwd", "set a user's password", cmd_user_passwd)
    passwd.add_argument("name", help="user name")
    passwd.add_argument("--password-stdin", action="store_true", help=stdin_help)

    tokens = group("token", "API tokens for agents", "create, list, revoke")
    create = action(tokens, "create", "create a token and print its secret once", cmd_token_create)
    create.add_argument("name", help="token name (the agent it is for)")
    create.add_argument("--grant", "-g", action="append", required=True, help=grant_help)
    action(tokens, "list", "list tokens (never their secrets)", cmd_token_list)
    revoke = action(tokens, "revoke", "revoke a token for good", cmd_token_revoke)
    revoke.add_argument("name", help="token name")

    audit = group("audit", "the hash-chained audit log", "verify, show")
    action(
        audit,
        "verify",
        "re-check the hash chain; exit 1 naming the first broken entry",
        cmd_audit_verify,
    )
    show = action(audit, "show", "list audit entries, newest last", cmd_audit_show)
    show.add_argument(
        "--limit", type=count_arg(1, 10_000), default=20, help="most entries (default 20)"
    )
    show.add_argument("--since", type=count_arg(0, 2**63 - 1), default=None, help="after this seq")
    show.add_argument("--json", action="store_true", help="one JSON object per entry")


def cmd_user_add(args: argparse.Namespace) -> int:
    """Add a user."""
    grants = _grants(args.grant)
    with _account_errors():
        from gateway.control.users import check_name

        check_name(args.name, "user name")
    password = _read_password(args.password_stdin, confirm=True)
    with _control(args.config, write=True) as (_, accounts), _account_errors():
        user = accounts.add_user(args.name, password, grants, actor=_cli_actor())
    print(f"user {user.name} added ({_describe_grants(user.grants)})")
    return EXIT_OK


def cmd_user_list(args: argparse.Namespace) -> int:
    """List users."""
    from gateway.twin_cli import _table

    with _control(args.config) as (_, accounts):
        users = accounts.list_users()
    rows = (
        [u.name, _describe_grants(u.grants), "disabled" if u.disabled else "", _when(u.created)]
        for u in users
    )
    print(_table(["user", "grants", "state", "created"], rows))
    return EXIT_OK


def cmd_user_disable(args: argparse.Namespace) -> int:
    """Disable a user."""
    with _control(args.config, write=True) as (_, accounts), _account_errors():
        accounts.disable_user(args.name, actor=_cli_actor())
    print(f"user {args.name} disabled")
    return EXIT_OK


def cmd_user_passwd(args: argparse.Namespace) -> int:
    """Set a user's password."""
    with _control(args.config, write=True) as (_, accounts), _account_errors():
        accounts.get_user(args.name)  # before the prompt: no typing a password for nobody
        password = _read_password(args.password_stdin, confirm=True)
        accounts.set_password(args.name, password, actor=_cli_actor())
    print(f"password of user {args.name} changed")
    return EXIT_OK


def cmd_token_create(args: argparse.Namespace) -> int:
    """Create an API token and print its secret."""
    grants = _grants(args.grant)
    with _control(args.config, write=True) as (_, accounts), _account_errors():
        token = accounts.create_token(args.name, grants, actor=_cli_actor())
    # The secret alone on stdout (`TOKEN=$(opstwin token create ...)`); the rest on stderr.
    print(
        f"token {token.record.name} (id {token.record.id}, {_describe_grants(token.record.grants)})"
        " created; its secret is shown only now, store it:",
        file=sys.stderr,
    )
    print(token.secret)
    return EXIT_OK


def cmd_token_list(args: argparse.Namespace) -> int:
    """List API tokens."""
    from gateway.twin_cli import _table

    with _control(args.config) as (_, accounts):
        tokens = accounts.list_tokens()
    rows = (
        [
            t.id,
            t.name,
            _describe_grants(t.grants),
            _when(t.created),
            _when(t.last_used) if t.last_used is not None else "never",
            f"revoked {_when(t.revoked)}" if t.revoked is not None else "",
        ]
        for t in tokens
    )
    print(_table(["id", "token", "grants", "created", "last used", "state"], rows))
    return EXIT_OK


def cmd_token_revoke(args: argparse.Namespace) -> int:
    """Revoke an API token."""
    with _control(args.config, write=True) as (_, accounts), _account_errors():
        token = accounts.revoke_token(args.name, actor=_cli_actor())
    print(f"token {token.name} (id {token.id}) revoked")
    return EXIT_OK


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Re-check the audit chain."""
    from gateway.control.audit import AuditLog

    with _control(args.config) as (db, _):
        result = AuditLog(db).verify()
    if not result.ok:
        print(f"opstwin: {result.describe()}", file=sys.stderr)
        return EXIT_ERROR
    print(result.describe())
    return EXIT_OK


def cmd_audit_show(args: argparse.Namespace) -> int:
    """List audit entries, newest last."""
    import json

    from gateway.control.audit import AuditLog
    from gateway.twin_cli import _table

    with _control(args.config) as (db, _):
        log = AuditLog(db)
        rows = log.tail(args.limit) if args.since is None else log.rows(args.since, args.limit)
    if args.json:
        for row in rows:
            entry = _parsed(row.entry)
            shown = entry if entry is not None else row.entry
            print(json.dumps({"seq": row.seq, "hash": row.hash, "entry": shown}))
        return EXIT_OK
    table = []
    for row in rows:
        entry = _parsed(row.entry) or {}
        fields = [entry.get(k) for k in ("actor", "action", "target", "decision", "reason")]
        table.append(
            [row.seq, _when(entry.get("ts", row.ts))] + [_printable(f, 60) for f in fields]
        )
    print(_table(["seq", "time", "actor", "action", "target", "decision", "reason"], table))
    return EXIT_OK


def _needs_action(group: str, actions: str) -> Any:
    def handler(args: argparse.Namespace) -> int:
        from gateway.twin_cli import UsageError

        raise UsageError(f"`opstwin {group}` needs an action: {actions} (see --help)")

    return handler


@contextlib.contextmanager
def _control(config_file: str, *, write: bool = False) -> Iterator[tuple[Any, Any]]:
    """Open the control database a config implies; read-only unless `write`."""
    from gateway.control.db import ControlDB, control_db_path
    from gateway.control.users import AccountStore

    storage = load_config(config_file).storage.path
    path = control_db_path(storage)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.exists():
        raise ConfigError(
            f"no control database at {path} (beside storage.path of {config_file}); "
            "`opstwin user add` or `opstwin token create` makes one"
        )
    with ControlDB(path, read_only=not write) as db:
        yield db, AccountStore(db)


@contextlib.contextmanager
def _account_errors() -> Iterator[None]:
    """A refused account change is the command line's fault: exit 2 with its message."""
    from gateway.control.users import AccountError
    from gateway.twin_cli import UsageError

    try:
        yield
    except AccountError as exc:
        raise UsageError(str(exc)) from None


def _grants(specs: Sequence[str]) -> list[Any]:
    from gateway.control.users import parse_grant

    with _account_errors():
        return [parse_grant(spec) for spec in specs]


def _read_password(from_stdin: bool, *, confirm: bool) -> str:
    """Read a password from the terminal (twice) or one line of stdin; never from argv."""
    import getpass

    from gateway.control.users import MAX_PASSWORD, check_password
    from gateway.twin_cli import UsageError

    if from_stdin:
        try:
            # Bounded: a file piped in by mistake is refused without being read whole.
            line = sys.stdin.readline(MAX_PASSWORD + 2)
        except UnicodeDecodeError:
            raise UsageError("the password on stdin is not valid UTF-8") from None
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
        if len(password) > MAX_PASSWORD:
            raise UsageError(f"the password on stdin is longer than {MAX_PASSWORD} characters")
    elif sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if confirm and getpass.getpass("again: ") != password:
            raise UsageError("the passwords differ")
    else:
        raise UsageError(
            "stdin is not a terminal, so there is no prompt for the password: pass "
            "--password-stdin to read it from one line of stdin"
        )
    with _account_errors():
        return check_password(password)


def _cli_actor() -> Any:
    """Who the audit log names for a command-line change: the CLI, and the OS user running it."""
    import getpass

    from gateway.control.users import Actor

    try:
        os_user = getpass.getuser()[:64]
    except (OSError, KeyError):
        os_user = "unknown"
    return Actor("opstwin-cli", "gateway", {"os_user": os_user})


def _describe_grants(grants: Sequence[Any]) -> str:
    """Grants in the syntax `--grant` takes: `role:glob,glob`."""
    return " ".join(f"{g.role}:{','.join(g.assets)}" for g in grants)


def _when(ts: Any) -> str:
    from datetime import datetime

    if isinstance(ts, bool) or not isinstance(ts, int | float):
        return _printable(ts, 30)
    try:
        return datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return repr(ts)


def _parsed(text: str) -> dict[str, Any] | None:
    import json

    try:
        entry = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return entry if isinstance(entry, dict) else None


def _printable(value: Any, limit: int) -> str:
    """Text safe for a terminal: control characters escaped (entries quote what clients sent),
    cut to `limit`."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit * 4])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe_storage(config: SiteConfig) -> str:
    storage = config.storage
    bound = (
        f"at most {storage.max_db_mb:g} MB, oldest history first"
        if storage.max_db_mb is not None
        else "no size bound"
    )
    return (
        f"storage {storage.path} (raw history {storage.history_days:g} d, then "
        f"{storage.rollup_s:g} s buckets {storage.rollup_days:g} d; events "
        f"{storage.events_days:g} d; {bound})"
    )


def _describe_sync(config: SiteConfig) -> str:
    sync = config.sync
    if sync.broker is None:
        return "cloud sync off (no sync.broker)"
    who = f" as {sync.username}" if sync.username else ""
    return (
        f"cloud sync to {sync.broker}{who}, topics "
        f"{sync.topic_prefix}/{config.site_id}/{config.gateway_id}/..."
    )


def describe(config: SiteConfig, source: str) -> str:
    """A human summary of what a config declares."""
    npoints = sum(len(d.points) for d in config.devices)
    lines = [
        f"{source}: OK",
        f"site {config.site_id}, gateway {config.gateway_id}",
        _describe_storage(config),
        f"http {config.http.host}:{config.http.port} (reads {config.http.read_access}; "
        f"web UI at /ui/, sessions end after {config.http.session_idle_s / 60:g} min idle or "
        f"{config.http.session_max_s / 3600:g} h)",
        _describe_opcua_server(config),
        _describe_sync(config),
        f"{len(config.devices)} device(s), {npoints} point(s):",
    ]
    for device in config.devices:
        state = "" if device.enabled else " [disabled]"
        # An http device has no endpoint nor addresses: its values are pushed to the gateway.
        endpoint = (
            "(pushed to POST /telemetry/ingest)"
            if isinstance(device, HttpDeviceConfig)
            else device.endpoint
        )
        lines.append(f"  {device.name} ({device.driver}) {endpoint}{state}")
        for point in device.points:
            rng = f" [{point.range.lo:g}..{point.range.hi:g}]" if point.range else ""
            flags = " writable" if point.writable else ""
            unit = f" {point.unit}" if point.unit else ""
            lines.append(
                f"    {point.id:<44} {getattr(point, 'address', 'pushed'):<14} "
                f"{point.datatype:<8}{unit}{rng}{flags}"
            )
    return "\n".join(lines)


def _describe_opcua_server(config: SiteConfig) -> str:
    server = config.opcua_server
    if not server.enabled:
        return "opcua server: off"
    anonymous = "anonymous allowed" if server.allow_anonymous else "no anonymous access"
    return (
        f"opcua server {server.endpoint} (security {', '.join(server.security_policies)}; "
        f"{anonymous}; {len(server.users)} user(s))"
    )


def _add_log_options(parser: argparse.ArgumentParser, *, level_default: str) -> None:
    """`--log-format` and `--log-level`: command-line options, not config keys, so that the
    unit (or whoever starts the gateway for a log shipper) decides how its stderr is read."""
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="stderr lines as key=value text (default; journald-aware) or JSON objects",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        default=None,
        help=f"least severe level logged (default: {level_default})",
    )


def setup_logging(level: str, fmt: LogFormat = "text") -> None:
    """Log to stderr one line per event, `fmt` "text" (key=value) or "json" (gateway.logfmt).

    Shaped for journald when stderr is its stream: a `<N>` priority prefix on each line and, in
    text, no timestamp of ours (journald records its own). Like logging.basicConfig, it leaves
    a root logger that already has handlers alone (a test runner's, a program embedding us).
    """
    handler = make_handler(fmt)
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    if handler in logging.getLogger().handlers:
        # A warnings.warn() is written as several lines (the source line under it) unless
        # logging takes it: then it is one event like any other (component py.warnings).
        logging.captureWarnings(True)
        # Likewise a crash: one critical event with its traceback in `exc`, not loose lines.
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
    # pymodbus logs every failed request at ERROR; the driver logs transitions itself.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    # asyncua logs every reconnect attempt and unknown request at WARNING/ERROR; the drivers
    # and the server log what an operator needs.
    logging.getLogger("asyncua").setLevel(logging.ERROR)


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("gateway").critical(
        "uncaught %s; exiting", kind.__name__, exc_info=(kind, value, tb)
    )


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return  # what threading's own hook ignores too
    thread = args.thread.name if args.thread is not None else "?"
    logging.getLogger("gateway").critical(
        "thread %s ended by an uncaught %s",
        thread,
        args.exc_type.__name__,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
    )


if __name__ == "__main__":
    sys.exit(main())
