"""Reading the gateway's log lines back (gateway.logfmt), for the unit and integration tests.

The parser is written from the format's rules, not from the formatter's code: a line is
`key=value` pairs separated by one space, a value bare or double-quoted with backslash escapes.
"""

from __future__ import annotations

import json
import re
from typing import Any

LEVELS = ("debug", "info", "warning", "error", "critical")

_PAIR = re.compile(r'([A-Za-z0-9_.\-]+)=("(?:[^"\\]|\\.)*"|[^\s"=\\]+)')
_ESCAPE = re.compile(r'\\(?:x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8})|(["\\nrt]))')
_SIMPLE = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}
_PRIORITY = re.compile(r"<([0-7])>")


def split_priority(line: str) -> tuple[int | None, str]:
    """A line's `<N>` syslog priority prefix (None without one) and the rest."""
    found = _PRIORITY.match(line)
    return (int(found[1]), line[found.end() :]) if found else (None, line)


def parse_text(line: str) -> dict[str, str]:
    """The pairs of one text line, in order; AssertionError naming the place if it is not one."""
    assert "\n" not in line and "\r" not in line, f"a line break inside a line: {line!r}"
    pairs: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        found = _PAIR.match(line, pos)
        assert found, f"not key=value at column {pos}: {line!r}"
        key, raw = found.groups()
        assert key not in pairs, f"{key} twice in {line!r}"
        pairs[key] = unescape(raw[1:-1]) if raw.startswith('"') else raw
        pos = found.end()
        if pos < len(line):
            assert line[pos] == " ", f"no space after a pair at column {pos}: {line!r}"
            pos += 1
    return pairs


def unescape(quoted: str) -> str:
    """The text a quoted value (without its quotes) stands for."""

    def one(m: re.Match[str]) -> str:
        hex_code = m[1] or m[2] or m[3]
        return chr(int(hex_code, 16)) if hex_code else _SIMPLE[m[4]]

    rest = _ESCAPE.sub("", quoted)
    assert "\\" not in rest and '"' not in rest, f"a stray backslash or quote in {quoted!r}"
    return _ESCAPE.sub(one, quoted)


def parse_json(line: str) -> dict[str, Any]:
    """One JSON line as an object with the fields every event has."""
    event = json.loads(line)
    assert isinstance(event, dict), line
    assert event["level"] in LEVELS and event["component"] and isinstance(event["msg"], str), line
    return event
