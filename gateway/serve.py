"""Run the gateway until SIGTERM/SIGINT: HTTP listener, drivers, twin, systemd notifications."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway import sdnotify
from gateway.app import Gateway
from gateway.config import SiteConfig
from gateway.errors import GatewayError
from gateway.http import create_app
from gateway.lifecycle import Lifecycle

log = logging.getLogger(__name__)


OnReady = Callable[[Gateway, list[str]], Awaitable[None]]


async def serve(
    config: SiteConfig, *, on_ready: OnReady | None = None, stop: asyncio.Event | None = None
) -> None:
    """Start everything, report READY, and shut down cleanly on SIGTERM, SIGINT or `stop`."""
    gateway = Gateway(config)
    runner = web.AppRunner(create_app(gateway), handle_signals=False, access_log=None)
    life = Lifecycle()
    await runner.setup()  # runs the app's cleanup_ctx: opens the twin, starts the drivers
    life.on_stop("gateway", runner.cleanup)  # stops drivers, flushes and closes the twin
    try:
        site = web.TCPSite(runner, config.http.host, config.http.port)
        try:
            await site.start()
        except OSError as exc:
            raise GatewayError(
                f"cannot listen on http {config.http.host}:{config.http.port}: {exc.strerror}"
                " (is another gateway running? change http.port in the config)"
            ) from exc
        urls = _addresses(runner)
        log.info("HTTP listening on %s", ", ".join(urls))
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            life.on_stop(f"{sig.name} handler", functools.partial(loop.remove_signal_handler, sig))
        life.task(_watchdog(), "sd-watchdog")
        sdnotify.notify(f"READY=1\nSTATUS=serving {len(gateway.points)} points")
        if on_ready is not None:
            await on_ready(gateway, urls)
        await stop.wait()
        log.info("stopping")
        sdnotify.notify("STOPPING=1")
    finally:
        await life.aclose()


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
