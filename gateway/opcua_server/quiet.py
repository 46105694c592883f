"""asyncua's server log records about what clients do: to DEBUG, and one rate-limited line of ours.

asyncua logs each refused connection, each connection closed for not logging in, each refused
request (at ERROR) and each malformed message (at ERROR, with a traceback) once per occurrence:
a client can make it write as fast as it can send (issue 13: 9.9 MB of log in 70 s on the OPC UA
port). Every such record is demoted to DEBUG (still there with `--log-level DEBUG`), and the
gateway writes one line of its own per kind and interval, saying what it means for an operator.
Refusals the gateway explains itself (a wrong password, an untrusted certificate) get no second
line. Records that are not about a client (asyncua's own crashes) are left alone.
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.ratelog import RateLimitedLog

log = logging.getLogger("gateway.opcua_server")

__all__ = ["install"]

INTERVAL_S = 60.0

_LOGGERS = (
    "asyncua.server.binary_server_asyncio",
    "asyncua.server.uaprocessor",
    "asyncua.server.internal_session",
)
# Service faults the gateway has already logged in its own words (users.py, trust.py).
_EXPLAINED = frozenset(
    {
        "BadUserAccessDenied",
        "BadIdentityTokenRejected",
        "BadIdentityTokenInvalid",
        "BadCertificateUntrusted",
        "BadCertificateTimeInvalid",
        "BadCertificateInvalid",
    }
)
# Message templates (their start) of records about a client that sent something wrong.
_CLIENT_MISTAKES = (
    "Got malformed header",
    "Exception raised while parsing message from client",
    "Exception raised while processing message from client",
    "Inbound queue full",
    "Received request that exceed the transport limits",
    "Unauthenticated user attempted to connect",
    "Received an error message type",
    "Unsupported message type",
    "Received a request of type",
    "Unknown message received",
    "Rejected active session UserIdentityToken not supported",
    "%s attempted to do something they are not permitted to do",
    "Session timed out after",
)

_lines = RateLimitedLog(log, INTERVAL_S)
_installed = False


class _ClientNoise(logging.Filter):
    """Demote asyncua's per-client records to DEBUG and write our rate-limited line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not isinstance(record.msg, str):
            return True
        if not _summarise(record.msg, record):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def install() -> None:
    """Put the filter on asyncua's server loggers (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    noise = _ClientNoise()
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        logger.addFilter(noise)
        if logger.level == logging.NOTSET:
            # `opstwin run` sets "asyncua" to ERROR, which would keep the WARNING records this
            # filter turns into our lines (a refused connection) from ever being made.
            logger.setLevel(logging.WARNING)


def _summarise(template: str, record: logging.LogRecord) -> bool:
    """Write our line for `record` if it is about a client; return whether it was."""
    args = record.args if isinstance(record.args, tuple) else ()
    if template.startswith("Refusing connection from"):
        peer, cap = _arg(args, 0), _arg(args, 1)
        _lines.log(
            logging.WARNING,
            "cap",
            "OPC UA server: %s connections open, the most allowed (opcua_server.max_connections, "
            "or less to fit the descriptor limit); closing new ones as they arrive (latest from "
            "%s)",
            cap,
            _peer(peer),
        )
        return True
    if template.startswith("Closing idle connection from"):
        peer, seconds = _arg(args, 0), _arg(args, 1)
        _lines.log(
            logging.INFO,
            "idle",
            "OPC UA server: closed a connection from %s that had not logged in within %s s "
            "(opcua_server.handshake_timeout_s)",
            _peer(peer),
            seconds,
        )
        return True
    if template.startswith("sending service fault response"):
        status = str(_arg(args, 1))
        if status not in _EXPLAINED:
            _lines.log(
                logging.INFO,
                f"fault:{status}",
                "OPC UA server: a client request failed with %s",
                status,
            )
        return True
    if template.startswith("Error while processing message"):
        _lines.log(
            logging.WARNING,
            "internal",
            "OPC UA server: a client request raised %s; the client was answered "
            "BadInternalError (traceback at DEBUG)",
            _exception(record),
        )
        return True
    if template.startswith(_CLIENT_MISTAKES):
        _lines.log(
            logging.INFO,
            f"client:{template[:40]}",
            "OPC UA server: %s%s (what a client sent; asyncua's record is at DEBUG)",
            record.getMessage()[:200],
            f": {_exception(record)}" if record.exc_info else "",
        )
        return True
    return False


def _arg(args: tuple[Any, ...], i: int) -> Any:
    return args[i] if len(args) > i else "?"


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _exception(record: logging.LogRecord) -> str:
    exc = record.exc_info[1] if record.exc_info else None
    return repr(exc)[:200] if exc is not None else "an exception"
