"""The `opstwin` command: run, check, demo, and read-only views of a gateway's twin database."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.config import SiteConfig, load_config
from gateway.errors import ConfigError, GatewayError

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
        print(f"opstwin: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except GatewayError as exc:
        print(f"opstwin: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except sqlite3.Error as exc:
        # The views turn database errors into GatewayErrors with the file and what to do; this
        # is the net under them, so that no path prints a traceback.
        print(f"opstwin: database error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        return _reader_gone()
    except KeyboardInterrupt:
        return 130


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
    demo.set_defaults(handler=cmd_demo)

    hashpw = sub.add_parser(
        "hash-password", help="print an argon2 hash for an opcua_server user's password_hash"
    )
    hashpw.set_defaults(handler=cmd_hash_password)

    from gateway.sim.cli import add_sim_commands
    from gateway.twin_cli import add_twin_commands

    add_twin_commands(sub)
    add_sim_commands(sub)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    """Run the gateway."""
    from gateway.serve import serve

    config = load_config(args.config)
    setup_logging(config.log_level)
    asyncio.run(serve(config))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a config and describe it."""
    config = load_config(args.config)
    print(describe(config, args.config))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo plant and gateway."""
    from gateway.demo import run_demo

    setup_logging("INFO")
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


def describe(config: SiteConfig, source: str) -> str:
    """A human summary of what a config declares."""
    npoints = sum(len(d.points) for d in config.devices)
    lines = [
        f"{source}: OK",
        f"site {config.site_id}, gateway {config.gateway_id}",
        f"storage {config.storage.path} (history {config.storage.history_days:g} d, "
        f"events {config.storage.events_days:g} d)",
        f"http {config.http.host}:{config.http.port}",
        _describe_opcua_server(config),
        f"{len(config.devices)} device(s), {npoints} point(s):",
    ]
    for device in config.devices:
        state = "" if device.enabled else " [disabled]"
        lines.append(f"  {device.name} ({device.driver}) {device.endpoint}{state}")
        for point in device.points:
            rng = f" [{point.range.lo:g}..{point.range.hi:g}]" if point.range else ""
            flags = " writable" if point.writable else ""
            unit = f" {point.unit}" if point.unit else ""
            lines.append(
                f"    {point.id:<44} {point.address:<14} {point.datatype:<8}{unit}{rng}{flags}"
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


def setup_logging(level: str) -> None:
    """Log to stderr with timestamps (journald adds its own, but a console run needs them)."""
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pymodbus logs every failed request at ERROR; the driver logs transitions itself.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    # asyncua logs every reconnect attempt and unknown request at WARNING/ERROR; the drivers
    # and the server log what an operator needs.
    logging.getLogger("asyncua").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
