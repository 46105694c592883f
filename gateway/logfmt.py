"""Log records as one line each: `key=value` text for journald and consoles, or JSON for shippers.

Every event is exactly one line, whatever it carries: journald stores one entry per line and
`grep` finds one event per match, so a message's newlines and an exception's traceback are
escaped into a quoted value (`exc="Traceback …\\n  File …"`), never written as more lines.

    ts=2026-11-20T09:14:03.512Z level=warning component=drivers.base msg="oven-plc: cannot …"
    {"ts": "2026-11-20T09:14:03.512Z", "level": "warning", "component": "drivers.base", …}

The component is the logger's name without the `gateway.` prefix that every module of the
gateway's own package has (`twin.writer`, `serve`); `drivers.…` and third-party loggers
(`asyncua…`, `aiohttp.server`) keep their full names, so that a driver's line says it is one.
Fields come from `extra=` of a log call: every attribute a LogRecord does not have by itself.

Under journald (JOURNAL_STREAM names this process's stderr, systemd.exec(5)) a line starts
with its syslog priority (`<4>` for a warning, sd-daemon(3)), which journald turns into the
entry's PRIORITY and strips (`SyslogLevelPrefix=yes`, the default), so `journalctl -p warning`
filters by level; the text format then leaves the timestamp out, as journald records its own.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, Literal, TextIO

__all__ = [
    "FORMATS",
    "JsonFormatter",
    "LogFormat",
    "TextFormatter",
    "component",
    "fields",
    "journal_stream",
    "make_handler",
    "priority",
    "quote",
]

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")

# The attributes every LogRecord has (taskName too, on the Pythons that add it), and the two
# that Formatter.format sets; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
}
# Names of ours in a line: an extra of the same name is renamed `<name>_` rather than lost.
_RESERVED = frozenset({"ts", "level", "component", "msg", "exc", "stack", "msg_error"})
_PREFIX = "gateway."
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")
_JOURNAL_STREAM = re.compile(r"([0-9]+):([0-9]+)", re.ASCII)
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


class TextFormatter(logging.Formatter):
    """`[ts=…] level=… component=… msg=… key=value … [exc=…]`, one line per record."""

    def __init__(self, *, timestamps: bool = True, priority_prefix: bool = False) -> None:
        super().__init__()
        self.timestamps = timestamps
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        """One line for `record`; never raises, whatever the record holds."""
        try:
            pairs = list(_event(self, record, timestamps=self.timestamps).items())
            text = " ".join(f"{_key(k)}={quote(_text(v))}" for k, v in pairs)
        except Exception as exc:  # the net under a bug here: a line about it, not a lost one
            text = f"level=error component=logfmt msg={quote(_unformattable(record, exc))}"
        return _with_priority(text, record, self.priority_prefix)


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "component", "msg", …fields, "exc"?}`, one JSON object per line."""

    def __init__(self, *, priority_prefix: bool = False) -> None:
        super().__init__()
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        """One JSON object for `record`; never raises: what JSON cannot hold becomes a string."""
        try:
            text = _dumps(_event(self, record, timestamps=True))
        except Exception as exc:
            text = _dumps(
                {
                    "ts": _timestamp(record),
                    "level": "error",
                    "component": "logfmt",
                    "msg": _unformattable(record, exc),
                }
            )
        return _with_priority(text, record, self.priority_prefix)


def make_handler(
    fmt: LogFormat = "text",
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.StreamHandler[TextIO]:
    """A handler writing `fmt` lines to `stream` (stderr), shaped for journald when it is there."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    stream = sys.stderr if stream is None else stream
    try:
        fd: int | None = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last
        fd = None
    journald = fd is not None and journal_stream(fd, os.environ if environ is None else environ)
    handler = logging.StreamHandler(stream)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(priority_prefix=journald)
    else:
        formatter = TextFormatter(timestamps=not journald, priority_prefix=journald)
    handler.setFormatter(formatter)
    return handler


def journal_stream(fd: int, environ: Mapping[str, str]) -> bool:
    """Whether `fd` is the journal stream JOURNAL_STREAM (`device:inode`) names.

    systemd.exec(5): checking that the variable is set is not enough, since a service's child
    inherits it with another stderr; the descriptor's device and inode must match.
    """
    found = _JOURNAL_STREAM.fullmatch(environ.get("JOURNAL_STREAM", ""))
    if found is None:
        return False
    try:
        stat = os.fstat(fd)
    except OSError:
        return False
    return (stat.st_dev, stat.st_ino) == (int(found[1]), int(found[2]))


def priority(levelno: int) -> int:
    """The syslog priority of a logging level: 2 (crit) … 7 (debug), as sd-daemon(3) numbers."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def component(name: str) -> str:
    """The component a logger name stands for: `gateway.twin.writer` → `twin.writer`."""
    return name[len(_PREFIX) :] if name.startswith(_PREFIX) and len(name) > len(_PREFIX) else name


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's `extra=` fields: every attribute a LogRecord does not have by itself."""
    found: dict[str, Any] = {}
    for key, value in vars(record).items():
        name = str(key)
        if name in _STANDARD or name.startswith("_"):
            continue  # underscored: private to some filter or library, not meant to be shown
        found[name + "_" if name in _RESERVED else name] = value
    return found


def quote(value: str) -> str:
    """A logfmt value: as is when plain, else double-quoted with `\\"`, `\\\\`, `\\n`… escaped.

    Printable unicode stays as it is (°C, ü); anything not printable (control characters, line
    and paragraph separators, lone surrogates) is escaped, so a value never breaks the line.
    """
    if value and all(c.isprintable() and c not in ' "=\\' for c in value):
        return value
    return '"' + "".join(_escape(c) for c in value) + '"'


# -- helpers ------------------------------------------------------------------------------------


def _event(
    formatter: logging.Formatter, record: logging.LogRecord, *, timestamps: bool
) -> dict[str, Any]:
    """The record's parts in line order: ts, level, component, msg, fields, exc, stack."""
    event: dict[str, Any] = {}
    if timestamps:
        event["ts"] = _timestamp(record)
    event["level"] = record.levelname.lower()
    event["component"] = component(record.name)
    try:
        # Without the newline some messages end with (warnings.formatwarning's): it is no part
        # of what they say, and would only show as a trailing `\n`.
        event["msg"] = record.getMessage().rstrip("\r\n")
    except Exception as exc:  # `log.info("%d", "x")`: the template and the arguments, as they are
        event["msg"] = _safe_str(record.msg)
        event["msg_error"] = (
            f"{type(exc).__name__}: {_safe_str(exc)}; args {_safe_repr(record.args)}"
        )
    event.update(fields(record))
    if record.exc_info and not record.exc_text:
        # Cached on the record, as logging.Formatter does, for any other handler.
        record.exc_text = formatter.formatException(record.exc_info)
    if record.exc_text:
        event["exc"] = record.exc_text
    if record.stack_info:
        event["stack"] = formatter.formatStack(record.stack_info)
    return event


def _timestamp(record: logging.LogRecord) -> str:
    # UTC, so that lines from a factory PC sort and compare across a DST change and between
    # sites; milliseconds, as journald and shippers show them.
    when = dt.datetime.fromtimestamp(record.created, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z"


def _with_priority(text: str, record: logging.LogRecord, prefix: bool) -> str:
    return f"<{priority(record.levelno)}>{text}" if prefix else text


def _key(name: str) -> str:
    return _KEY_CHARS.sub("_", name) or "_"


def _text(value: Any) -> str:
    """A field's value as text: true/false and null as in JSON, anything else as str() says."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return _safe_str(value)


def _escape(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    if c == " " or c.isprintable():
        return c
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _dumps(event: dict[str, Any]) -> str:
    """JSON for one event; a value JSON cannot hold (an object, NaN, a cycle) becomes a string."""
    try:
        text = json.dumps(event, ensure_ascii=False, allow_nan=False, default=_safe_str)
    except (TypeError, ValueError, RecursionError):
        safe = {str(k): _jsonable(v) for k, v in event.items()}
        text = json.dumps(safe, ensure_ascii=False, allow_nan=False, default=_safe_str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (a filename decoded with surrogateescape)
        text = json.dumps(json.loads(text), ensure_ascii=True)
    return text


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False, default=_safe_str)
    except (TypeError, ValueError, RecursionError):
        return _safe_str(value)
    return value


def _safe_str(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return _safe_repr(value)


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _unformattable(record: logging.LogRecord, exc: Exception) -> str:
    return (
        f"a log record could not be formatted ({type(exc).__name__}: {_safe_str(exc)}); "
        f"logger {_safe_str(getattr(record, 'name', '?'))}, message {_safe_repr(record.msg)}"
    )
