"""`opstwin mirror`: the reference cloud consumer on the command line.

It prints one line per birth, gap, rebirth request and online/offline change, and every few
seconds a summary per gateway; `--json` prints JSON lines instead. `--serve HOST:PORT` answers
`GET /gateways` and `GET /gateways/{site}/{gateway}/twin`. `--once` waits for the first birth of
every gateway it matches, prints each twin (stdout: one JSON document per gateway; the event
lines go to stderr) and exits, for scripts.

Exit codes: 0 ok; 2 usage or configuration error; 1 broker unreachable at start (retried
within `--timeout`); 3 `--once` timed out before every matched gateway was born.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)

__all__ = ["EXIT_TIMEOUT", "EXIT_UNREACHABLE", "add_mirror_command", "cmd_mirror"]

EXIT_OK = 0
EXIT_UNREACHABLE = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3


def add_mirror_command(sub: Any) -> None:
    """Register `mirror` on the CLI's subparsers."""
    from gateway.twin_cli import positive_arg

    mirror = sub.add_parser(
        "mirror",
        help="rebuild gateways' twins from an MQTT broker (the reference cloud consumer)",
        description="Subscribe to the cloud sync's births and diffs, rebuild each gateway's "
        "twin, detect gaps and ask for rebirths.",
    )
    mirror.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://host:port")
    mirror.add_argument("--prefix", default="aiw/v1", help="topic prefix (default aiw/v1)")
    mirror.add_argument("--site", help="only this site (default: every site)")
    mirror.add_argument("--gateway", help="only this gateway id (default: every gateway)")
    mirror.add_argument("--username", help="broker user name")
    mirror.add_argument("--password-file", help="file whose first line is the broker password")
    mirror.add_argument("--ca-file", help="PEM CA file for an mqtts:// broker (default: system)")
    mirror.add_argument("--cert-file", help="client certificate (PEM) when the broker wants one")
    mirror.add_argument("--key-file", help="the client certificate's private key (PEM)")
    mirror.add_argument(
        "--no-verify-hostname",
        action="store_true",
        help="accept a broker certificate that does not name the host (test brokers only)",
    )
    mirror.add_argument(
        "--client-id",
        help="MQTT client id; with --persistent the broker keeps messages for it while away",
    )
    mirror.add_argument(
        "--persistent",
        action="store_true",
        help="a broker-side session (needs --client-id): nothing is missed across reconnects",
    )
    mirror.add_argument("--serve", metavar="HOST:PORT", help="answer GET /gateways[/...] here")
    mirror.add_argument("--json", action="store_true", help="JSON lines instead of text")
    mirror.add_argument(
        "--once",
        action="store_true",
        help="exit after the first birth of each matched gateway, printing its twin",
    )
    mirror.add_argument(
        "--timeout",
        type=positive_arg,
        default=30.0,
        help="seconds to reach the broker at start and, with --once, to get the births "
        "(default 30)",
    )
    mirror.add_argument(
        "--summary-s",
        type=positive_arg,
        default=5.0,
        help="seconds between summary lines (default 5)",
    )
    mirror.set_defaults(handler=cmd_mirror)


@dataclass(frozen=True)
class Options:
    """The command line, checked."""

    host: str
    port: int
    tls: ssl.SSLContext | None
    verify_hostname: bool
    prefix: str
    site: str | None
    gateway: str | None
    username: str | None
    password: str | None
    client_id: str | None
    persistent: bool
    serve: tuple[str, int] | None
    json: bool
    once: bool
    timeout: float
    summary_s: float


def cmd_mirror(args: argparse.Namespace) -> int:
    """Run the mirror until SIGINT/SIGTERM (or, with --once, until the births)."""
    from gateway.cli import setup_logging

    options = check_options(args)
    setup_logging("WARNING")
    return asyncio.run(run(options, sys.stdout, sys.stderr))


def check_options(args: argparse.Namespace) -> Options:
    """The options, or UsageError saying which one is wrong."""
    from pydantic import ValidationError

    from gateway.config.model import SyncConfig
    from gateway.twin_cli import UsageError

    try:
        host, port, tls_on = SyncConfig(broker=args.broker).endpoint
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise UsageError(f"--broker: {problem}") from None
    for name in ("prefix", "site", "gateway"):
        value = getattr(args, name)
        if value is not None and (not value.strip("/") or any(c in value for c in "+#\x00")):
            raise UsageError(f"--{name} {value!r} cannot be part of an MQTT topic")
        if name != "prefix" and value is not None and "/" in value:
            raise UsageError(f"--{name} {value!r} must not contain '/'")
    if args.persistent and not args.client_id:
        raise UsageError("--persistent needs --client-id (the session the broker keeps)")
    if (args.username is None) != (args.password_file is None):
        raise UsageError("--username and --password-file go together")
    password = None
    if args.password_file is not None:
        try:
            lines = Path(args.password_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--password-file {args.password_file}: {exc}") from None
        password = lines[0] if lines else ""
    tls_files = [args.ca_file, args.cert_file, args.key_file]
    if not tls_on and (any(tls_files) or args.no_verify_hostname):
        raise UsageError(
            "--ca-file, --cert-file, --key-file and --no-verify-hostname need mqtts://"
        )
    tls = _tls_context(args.ca_file, args.cert_file, args.key_file) if tls_on else None
    if tls is not None and args.no_verify_hostname:
        tls.check_hostname = False  # the certificate is still verified against the CA
    return Options(
        host=host,
        port=port,
        tls=tls,
        verify_hostname=not args.no_verify_hostname,
        prefix=args.prefix.strip("/"),
        site=args.site,
        gateway=args.gateway,
        username=args.username,
        password=password,
        client_id=args.client_id,
        persistent=args.persistent,
        serve=_host_port(args.serve) if args.serve else None,
        json=args.json,
        once=args.once,
        timeout=args.timeout,
        summary_s=args.summary_s,
    )


async def run(options: Options, out: TextIO, err: TextIO) -> int:
    """The command's body on a running loop; return the exit code."""
    from aiohttp import web

    from gateway.mirror.client import Mirror, MqttError
    from gateway.mirror.http import create_mirror_app
    from gateway.mirror.state import Notice

    # With --once stdout is the twins, for the script; what happens on the way goes to stderr.
    events_out = err if options.once else out

    def on_notice(notice: Notice) -> None:
        line = _notice_line(notice, options.json)
        if line is not None:
            print(line, file=events_out, flush=True)

    mirror = Mirror(
        options.host,
        options.port,
        prefix=options.prefix,
        site_id=options.site,
        gateway_id=options.gateway,
        username=options.username,
        password=options.password,
        tls=options.tls,
        tls_check_hostname=options.verify_hostname,
        client_id=options.client_id,
        persistent=options.persistent,
        on_notice=on_notice,
    )
    started = time.monotonic()
    try:
        await mirror.start(options.timeout)
    except MqttError as exc:
        print(f"opstwin mirror: {exc}", file=err)
        return EXIT_UNREACHABLE
    runner: web.AppRunner | None = None
    try:
        if options.serve is not None:
            runner = web.AppRunner(create_mirror_app(mirror), access_log=None)
            await runner.setup()
            try:
                await web.TCPSite(runner, *options.serve).start()
            except OSError as exc:
                print(
                    f"opstwin mirror: --serve {options.serve[0]}:{options.serve[1]}: {exc}",
                    file=err,
                )
                return EXIT_USAGE
        if options.once:
            left = max(options.timeout - (time.monotonic() - started), 0.1)
            return await _once(mirror, options, left, out, err)
        await _run_until_stopped(mirror, options, out)
        return EXIT_OK
    finally:
        if runner is not None:
            await runner.cleanup()
        await mirror.stop()


async def _once(mirror: Any, options: Options, within_s: float, out: TextIO, err: TextIO) -> int:
    """Wait for the first birth of every matched gateway and print the twins."""

    def born() -> list[dict[str, Any]] | None:
        if options.site is not None and options.gateway is not None:
            wanted = [(options.site, options.gateway)]
        else:
            # Every gateway heard from that is not known to be offline.
            wanted = [
                (s["site_id"], s["gateway_id"])
                for s in mirror.gateways()
                if s["online"] is not False
            ]
        stats = {(s["site_id"], s["gateway_id"]): s for s in mirror.gateways()}
        if not wanted or any(stats.get(key, {}).get("birth_rev") is None for key in wanted):
            return None
        return [mirror.twin(*key) for key in wanted]

    try:
        await mirror.wait_until(lambda: born() is not None, within_s)
    except TimeoutError:
        which = (
            f"gateway {options.site}/{options.gateway}"
            if options.site and options.gateway
            else "every matched gateway"
        )
        print(f"opstwin mirror: no birth from {which} within {options.timeout:g} s", file=err)
        return EXIT_TIMEOUT
    for twin in born() or []:
        print(json.dumps(twin) if options.json else json.dumps(twin, indent=2), file=out)
    out.flush()
    return EXIT_OK


async def _run_until_stopped(mirror: Any, options: Options, out: TextIO) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(options.summary_s):
                    await stop.wait()
            for stats in mirror.gateways():
                print(_summary_line(stats, options.json), file=out, flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


# -- output ---------------------------------------------------------------------------------------


def _notice_line(notice: Any, as_json: bool) -> str | None:
    from gateway.mirror.state import Kind

    if as_json:
        return json.dumps({"ts": round(time.time(), 3), **notice.json()})
    d = notice.detail
    what = {
        Kind.BIRTH: lambda: f"rev {d['rev']}, {d['points']} points, session {d['session'][:12]}",
        Kind.GAP: lambda: f"expected rev {d['expected']}, got {d['from_rev']}..{d['to_rev']}",
        Kind.REBIRTH: lambda: f"asked for a rebirth ({d['why']})",
        Kind.STATE: lambda: f"{d['state']}" + (" (retained)" if d.get("retained") else ""),
        Kind.RESET: lambda: f"rev went back to {d['rev']} from {d['covered_rev']}: starting over",
        Kind.MALFORMED: lambda: f"dropped a {d['leaf']} message: {d['error']}",
    }[notice.kind]()
    stamp = time.strftime("%H:%M:%S")
    return f"{stamp} {notice.kind:<9} {notice.site_id}/{notice.gateway_id} {what}"


def _summary_line(stats: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps({"ts": round(time.time(), 3), "kind": "summary", **stats})
    online = {True: "online", False: "offline", None: "unknown"}[stats["online"]]
    return (
        f"{time.strftime('%H:%M:%S')} summary   {stats['site_id']}/{stats['gateway_id']} "
        f"{online}, {stats['points']} points, rev {stats['rev']}, {stats['diffs']} diffs, "
        f"{stats['events']} events, {stats['gaps']} gaps, {stats['rebirths']} rebirths asked, "
        f"{stats['births']} births, {stats['malformed']} malformed"
    )


def _host_port(text: str) -> tuple[str, int]:
    from gateway.twin_cli import UsageError

    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--serve {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8100")
    return host.strip("[]") or "127.0.0.1", int(port)


def _tls_context(
    ca_file: str | None, cert_file: str | None, key_file: str | None
) -> ssl.SSLContext:
    from gateway.twin_cli import UsageError

    if (cert_file is None) != (key_file is None):
        raise UsageError("--cert-file and --key-file go together")
    try:
        context = ssl.create_default_context(cafile=ca_file)
        if cert_file is not None:
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"TLS files: {exc}") from None
    return context
