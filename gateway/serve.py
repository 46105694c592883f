"""Run the gateway until SIGTERM/SIGINT: HTTP listener, drivers, twin, systemd notifications.

SIGHUP (`systemctl reload`) re-reads the config file and its policies (gateway/reload.py).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from gateway import sdnotify
from gateway.app import Gateway
from gateway.config import SiteConfig
from gateway.errors import GatewayError
from gateway.fdlimit import DescriptorBudget, plan_budget, raise_nofile_limit
from gateway.http import create_app
from gateway.lifecycle import Lifecycle
from gateway.netguard import GuardedSite, body_timeout, quiet_accept_errors, quiet_bad_requests
from gateway.reload import Reloader

log = logging.getLogger(__name__)


OnReady = Callable[[Gateway, list[str]], Awaitable[None]]


async def serve(
    config: SiteConfig,
    *,
    on_ready: OnReady | None = None,
    stop: asyncio.Event | None = None,
    config_path: Path | None = None,
    log_level_pinned: bool = False,
) -> None:
    """Start everything, report READY, and shut down cleanly on SIGTERM, SIGINT or `stop`.

    SIGHUP reloads `config_path`, the file `config` was loaded from (without one, a SIGHUP
    only logs that there is nothing to reload); `log_level_pinned`: the command line set the
    log level, and a reload leaves it.
    """
    gateway = Gateway(config)
    budget = _descriptor_budget(gateway)
    app = create_app(gateway)
    app.middlewares.append(body_timeout(config.http.body_timeout_s))
    quiet_bad_requests()
    quiet_accept_errors(asyncio.get_running_loop())
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        # aiohttp closes a connection that has sent no complete request within this time: the
        # header timeout that ends a slow-header attack (and idle keep-alive, for the same price).
        keepalive_timeout=config.http.header_timeout_s,
    )
    life = Lifecycle()
    loop = asyncio.get_running_loop()
    reloader = Reloader(gateway, config_path, log_level_pinned=log_level_pinned)
    # Installed before the start and removed after the stop: SIGHUP's default action ends the
    # process, and one that comes during start-up (remembered) or shutdown (ignored) must not.
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    life.on_stop("SIGHUP handler", functools.partial(loop.remove_signal_handler, signal.SIGHUP))
    try:
        await runner.setup()  # runs the app's cleanup_ctx: opens the twin, starts the drivers
        life.on_stop("gateway", runner.cleanup)  # stops drivers, flushes and closes the twin
        # Before the gateway stops (a stack): a reload in progress finishes its step first.
        life.on_stop("config reloads", reloader.aclose)
        site = GuardedSite(runner, config.http.host, config.http.port, budget.http_connections)
        try:
            await site.start()
        except OSError as exc:
            raise GatewayError(
                f"cannot listen on http {config.http.host}:{config.http.port}: "
                f"{exc.strerror or exc} ({bind_advice(exc, 'http.host', 'http.port')})"
            ) from exc
        urls = _addresses(runner)
        log.info("HTTP listening on %s", ", ".join(urls))
        stop = stop or asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            life.on_stop(f"{sig.name} handler", functools.partial(loop.remove_signal_handler, sig))
        life.task(_watchdog(), "sd-watchdog")
        sdnotify.notify(f"READY=1\nSTATUS=serving {len(gateway.points)} points")
        reloader.start()  # runs a reload asked for during start-up, if any
        if on_ready is not None:
            await on_ready(gateway, urls)
        await stop.wait()
        log.info("stopping")
        sdnotify.notify("STOPPING=1")
    finally:
        await life.aclose()


def bind_advice(exc: OSError, host_key: str, port_key: str) -> str:
    """What to do about a listener that cannot bind, by the cause."""
    if isinstance(exc, socket.gaierror):
        return f"the host name does not resolve here: change {host_key}"
    if exc.errno == errno.EADDRINUSE:
        return f"is another gateway running? change {port_key} in the config"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"no interface of this machine has that address: change {host_key}"
    if exc.errno == errno.EACCES:
        return f"ports below 1024 need privileges the gateway does not have: change {port_key}"
    return f"check {host_key} and {port_key}"


def _descriptor_budget(gateway: Gateway) -> DescriptorBudget:
    soft, hard = raise_nofile_limit()
    server = gateway.opcua_server
    budget = plan_budget(
        soft,
        len(gateway.drivers),
        gateway.config.http.max_connections,
        server.max_connections if server is not None else 0,
    )
    if server is not None:
        server.max_connections = budget.opcua_connections
    log.info(
        "descriptors: limit %d (hard %d), %d reserved for devices and the database; "
        "at most %d HTTP and %d OPC UA connections",
        soft,
        hard,
        budget.reserve,
        budget.http_connections,
        budget.opcua_connections,
    )
    return budget


def _addresses(runner: web.AppRunner) -> list[str]:
    out = []
    for address in runner.addresses:
        host, port = address[0], address[1]
        out.append(f"http://{host}:{port}")
    return out


async def _watchdog() -> None:
    interval = sdnotify.watchdog_interval()
    if interval is None:
        return
    while True:
        sdnotify.notify("WATCHDOG=1")
        await asyncio.sleep(interval)
