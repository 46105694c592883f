"""What keeps the HTTP listener from being the way to take the gateway down.

Found by probing (issue 13): 1,100 connections that never finished their headers held every file
descriptor, so a dropped Modbus device could not reconnect; each malformed request wrote an ERROR
with a traceback; EMFILE wrote a traceback per accept. Here:

- `GuardedSite` caps concurrent connections: one over the cap is answered 503 and closed at once,
  so it costs a descriptor for microseconds, not for as long as the peer likes;
- aiohttp closes a connection that has not sent a complete request within its keep-alive timeout
  (set from `http.header_timeout_s`), which is what ends a slow-header attack;
- `body_timeout` answers 408 when a request body does not arrive in time;
- `quiet_bad_requests` turns aiohttp's traceback per malformed request into one INFO line per peer
  and interval, and `quiet_accept_errors` does the same for asyncio's "out of system resource".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.fdlimit import HTTP_BACKLOG
from gateway.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

__all__ = ["GuardedSite", "body_timeout", "quiet_accept_errors", "quiet_bad_requests"]

_REFUSAL_BODY = b"too many connections to this gateway: retry later\n"
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Retry-After: 5\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY)
)

_refusals = RateLimitedLog(log, 60.0)


class GuardedSite(web.TCPSite):
    """A TCPSite that serves at most `max_connections` connections at a time."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, max_connections: int) -> None:
        # A small backlog bounds how many connections one accept burst opens past the cap.
        super().__init__(runner, host, port, backlog=HTTP_BACKLOG)
        self.max_connections = max_connections
        self.refused = 0

    async def start(self) -> None:
        """Listen, counting connections through the runner's server."""
        # BaseSite.start registers the site with the runner; TCPSite.start would create the
        # server with aiohttp's own factory, which cannot refuse.
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: self._protocol(server), self._host, self._port, backlog=self._backlog
        )
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else 0

    def _protocol(self, server: web.Server) -> asyncio.BaseProtocol:
        # server.connections holds every connection aiohttp is serving, idle keep-alive included.
        if len(server.connections) < self.max_connections:
            return server()
        self.refused += 1
        _refusals.log(
            logging.WARNING,
            "http-cap",
            "HTTP: %d connections open, the most allowed (http.max_connections); refusing more",
            self.max_connections,
        )
        return _Refuse()


class _Refuse(asyncio.Protocol):
    """Answer 503 and close: no parsing, no timer, the descriptor freed as soon as written."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_REFUSAL)
        transport.close()


def body_timeout(seconds: float) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware: read a request's body within `seconds` before the handler sees it, else 408."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.body_exists:
            try:
                # read() caches the body: handlers calling read()/json() get it at once.
                async with asyncio.timeout(seconds):
                    await request.read()
            except TimeoutError:
                raise web.HTTPRequestTimeout(
                    text=f"the request body did not arrive within {seconds:g} s\n"
                ) from None
        return await handler(request)

    return middleware


class _BadRequestFilter(logging.Filter):
    """Replace aiohttp's ERROR + traceback per malformed request by a rate-limited INFO line."""

    def __init__(self) -> None:
        super().__init__()
        self._lines = RateLimitedLog(log, 60.0)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        peer = str(record.args[0]) if isinstance(record.args, tuple) and record.args else "?"
        reason = (exc.message or type(exc).__name__).strip().splitlines()[0]
        self._lines.log(
            logging.INFO, f"bad-request:{peer}", "HTTP %d from %s: %s", exc.code, peer, reason
        )
        return False


_bad_request_filter = _BadRequestFilter()


def quiet_bad_requests() -> None:
    """Install the malformed-request filter on aiohttp's server logger (idempotent)."""
    logger = logging.getLogger("aiohttp.server")
    if _bad_request_filter not in logger.filters:
        logger.addFilter(_bad_request_filter)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log asyncio's accept failures (EMFILE, ENFILE) as one rate-limited line, not a traceback."""
    lines = RateLimitedLog(log, 60.0)
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if message.startswith("socket.accept() out of system resource"):
            exc = context.get("exception")
            lines.log(
                logging.WARNING,
                "accept",
                "a listener cannot accept connections: %s (descriptors exhausted; asyncio "
                "retries every second)",
                exc,
            )
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
