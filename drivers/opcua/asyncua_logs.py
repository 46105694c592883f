"""asyncua's log records for a lost connection, routed to DEBUG.

An ordinary PLC restart fails the pending Publish request, and a PLC that shuts down in order
first sends an Error message (BadServerHalted). asyncua logs each at ERROR or CRITICAL, the
Publish one with a traceback, from its own tasks, on every restart. The driver notices the
loss itself and logs one line of its own at WARNING ("oven: connection lost: …"), so these
are noise for an operator; they stay available at DEBUG, traceback included.

Only these records of these loggers, and for the publish loop only the exceptions that mean
"connection or session gone" (OSError, asyncua's UaError): any other crash there is a bug and
keeps its level. Nothing else of asyncua is touched.
"""

from __future__ import annotations

import logging

from asyncua import ua

__all__ = ["ConnectionLossToDebug", "install"]

# logger name -> the messages (format strings) that report a connection or session loss
_LOSS_MESSAGES: dict[str, tuple[str, ...]] = {
    "asyncua.client.ua_session.UaSession": ("Publish iteration crashed",),
    "asyncua.client.ua_client.UASocketProtocol": (
        "Received an error",
        "Got error status from server",
    ),
    "asyncua.uaprotocol": ("Received an error",),
}
_LOSS_ERRORS = (OSError, ua.UaError)


class ConnectionLossToDebug(logging.Filter):
    """Turn one logger's connection-loss records into DEBUG records (or drop them below it)."""

    def __init__(self, logger: logging.Logger, messages: tuple[str, ...]) -> None:
        super().__init__()
        self.logger = logger
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        """Pass every other record unchanged; demote a loss record, or drop it if DEBUG is off."""
        if record.levelno <= logging.DEBUG or not isinstance(record.msg, str):
            return True
        if not record.msg.startswith(self.messages):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and not isinstance(exc, _LOSS_ERRORS):
            return True
        # The level was checked when the record was made (at ERROR); handlers check only their
        # own level, usually none: a demoted record must be dropped here unless DEBUG is on.
        if not self.logger.isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return True


def install() -> None:
    """Add the filter to each of asyncua's loggers concerned, once."""
    for name, messages in _LOSS_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, ConnectionLossToDebug) for f in logger.filters):
            logger.addFilter(ConnectionLossToDebug(logger, messages))
