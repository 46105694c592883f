"""gateway.logfmt: one line per event, whatever it carries; journald's stream detected for real."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from logs_support import LEVELS, parse_json, parse_text, split_priority, unescape

from gateway.cli import build_parser, main
from gateway.logfmt import (
    JsonFormatter,
    TextFormatter,
    component,
    journal_stream,
    make_handler,
    priority,
    quote,
)

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def record(
    msg: str = "oven-plc: cannot connect",
    *args: Any,
    name: str = "gateway.twin.writer",
    level: int = logging.WARNING,
    extra: dict[str, Any] | None = None,
    exc_info: Any = None,
) -> logging.LogRecord:
    """A record made the way Logger.makeRecord makes it for `log.warning(msg, *args, extra=…)`."""
    return logging.getLogger(name).makeRecord(
        name, level, "file.py", 1, msg, args, exc_info, extra=extra
    )


def raised() -> Any:
    try:
        raise ValueError("the PLC said:\n  no")
    except ValueError:
        return sys.exc_info()


# -- quoting ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("oven-plc", "oven-plc"),
        ("°C", "°C"),  # printable unicode stays readable
        ("", '""'),
        ("two words", '"two words"'),
        ('say "hi"', r'"say \"hi\""'),
        ("a=b", '"a=b"'),
        ("C:\\plc", r'"C:\\plc"'),
        ("one\ntwo", r'"one\ntwo"'),
        ("cr\rlf", r'"cr\rlf"'),
        ("tab\there", r'"tab\there"'),
        ("nul\x00esc\x1b", r'"nul\x00esc\x1b"'),
        ("line\u2028sep", r'"line\u2028sep"'),  # str.splitlines and some viewers split here
        ("nel\x85", r'"nel\x85"'),
        ("nb\xa0sp", r'"nb\xa0sp"'),
        ("bad\udcffbyte", r'"bad\udcffbyte"'),  # a filename decoded with surrogateescape
        ("😀", "😀"),
    ],
)
def test_quote_escapes_what_would_split_or_blur_a_pair(value: str, written: str):
    assert quote(value) == written
    assert parse_text(f"k={written}") == {"k": value}


@given(st.text(alphabet=st.characters(codec=None, exclude_categories=())))
def test_any_text_stays_on_one_line_and_reads_back_the_same(value: str):
    line = f"msg={quote(value)} next=1"
    assert len(line.splitlines()) == 1
    assert parse_text(line) == {"msg": value, "next": "1"}


def test_the_test_parser_refuses_what_is_not_one_event():
    # The parser the tests read lines with must be able to say no.
    for bad in ['msg="open', "msg=a b", 'msg="a\\q"', "k=v\nk2=v", "msg=x  y=1", "=v"]:
        with pytest.raises(AssertionError):
            parse_text(bad)
    assert unescape(r"\x41\u00b0\U0001f600") == "A°😀"


# -- the text line --------------------------------------------------------------------------------


def test_text_line_has_level_component_message_and_extra_fields():
    rec = record(
        "%s: cannot connect to %s",
        "oven-plc",
        "opc.tcp://10.0.0.5:4840",
        name="gateway.twin.writer",
        extra={"device": "oven-plc", "attempt": 3, "up": False, "last": None, "why": 'a "b"'},
    )
    line = TextFormatter(timestamps=False).format(rec)
    assert line.startswith("level=warning component=twin.writer msg=")
    assert parse_text(line) == {
        "level": "warning",
        "component": "twin.writer",
        "msg": "oven-plc: cannot connect to opc.tcp://10.0.0.5:4840",
        "device": "oven-plc",
        "attempt": "3",
        "up": "false",
        "last": "null",
        "why": 'a "b"',
    }


def test_text_line_starts_with_a_utc_timestamp_off_journald():
    rec = record()
    rec.created, rec.msecs = 1_700_000_000.25, 250.0
    line = TextFormatter(timestamps=True).format(rec)
    assert line.startswith("ts=2023-11-14T22:13:20.250Z level=warning ")


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("gateway.twin.writer", "twin.writer"),
        ("gateway.serve", "serve"),
        ("gateway", "gateway"),
        ("gatewayish.x", "gatewayish.x"),
        ("drivers.modbus.driver", "drivers.modbus.driver"),
        ("asyncua.client.ua_client", "asyncua.client.ua_client"),
        ("root", "root"),
    ],
)
def test_component_is_the_logger_name_without_the_gateway_package(name: str, shown: str):
    assert component(name) == shown


def test_an_exception_is_one_escaped_field_not_more_lines():
    rec = record("poll failed", level=logging.ERROR, exc_info=raised())
    line = TextFormatter().format(rec)
    assert "\n" not in line
    exc = parse_text(line)["exc"]
    assert exc.startswith("Traceback (most recent call last):\n")
    assert exc.endswith("ValueError: the PLC said:\n  no")


def test_stack_info_is_one_field_too():
    logger = logging.getLogger("gateway.test_logfmt")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    logger.addHandler(handler)
    try:
        logger.warning("where am I", stack_info=True)
    finally:
        logger.removeHandler(handler)
    (line,) = stream.getvalue().splitlines()
    assert parse_text(line)["stack"].startswith("Stack (most recent call last):\n")


def test_message_newlines_and_a_trailing_newline():
    line = TextFormatter().format(record("first\nsecond\n"))
    assert parse_text(line)["msg"] == "first\nsecond"


def test_extras_that_clash_with_our_names_or_are_odd_keep_their_values():
    rec = record(extra={"level": "x", "ts": 1, "a key=": "v", "_private": "hidden"})
    fields = parse_text(TextFormatter().format(rec))
    assert fields["level"] == "warning" and fields["level_"] == "x" and fields["ts_"] == "1"
    assert fields["a_key_"] == "v"
    assert "_private" not in fields


def test_a_message_whose_arguments_do_not_fit_is_still_one_line():
    line = TextFormatter().format(record("%d devices", "many"))
    fields = parse_text(line)
    assert fields["msg"] == "%d devices"
    assert fields["msg_error"].startswith("TypeError:") and "'many'" in fields["msg_error"]


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_an_extra_that_cannot_be_printed_does_not_lose_the_line():
    rec = record(extra={"thing": Unprintable(), "device": "tank1"})
    fields = parse_text(TextFormatter().format(rec))
    assert fields["thing"] == "<unprintable Unprintable>" and fields["device"] == "tank1"
    event = parse_json(JsonFormatter().format(rec))
    assert event["thing"] == "<unprintable Unprintable>" and event["device"] == "tank1"


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_a_broken_record_gives_a_line_about_it_instead_of_an_exception(formatter):
    rec = record("hello")
    rec.levelname = None  # type: ignore[assignment]  # what a misbehaving filter could do
    line = formatter.format(rec)
    text = line if isinstance(formatter, JsonFormatter) else ""
    fields = parse_json(text) if text else parse_text(line)
    assert fields["level"] == "error" and fields["component"] == "logfmt"
    assert "could not be formatted" in fields["msg"] and "'hello'" in fields["msg"]


# -- JSON lines ---------------------------------------------------------------------------------


def test_json_line_parses_with_the_fields_and_the_exception():
    rec = record(
        "%s: wrote %r",
        "oven-plc",
        182.5,
        name="drivers.opcua.driver",
        level=logging.INFO,
        extra={"device": "oven-plc", "value": 182.5, "points": ["a", "b"], "ok": True},
        exc_info=raised(),
    )
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    event = parse_json(line)
    assert TS.fullmatch(event["ts"])
    assert event["level"] == "info" and event["component"] == "drivers.opcua.driver"
    assert event["msg"] == "oven-plc: wrote 182.5"
    assert (event["device"], event["value"], event["points"], event["ok"]) == (
        "oven-plc",
        182.5,
        ["a", "b"],
        True,
    )
    assert event["exc"].endswith("ValueError: the PLC said:\n  no")


def test_json_turns_what_json_cannot_hold_into_strings():
    cycle: list[Any] = []
    cycle.append(cycle)
    rec = record(
        extra={
            "nan": math.nan,
            "inf": math.inf,
            "path": Path("/var/lib/opstwin"),
            "cycle": cycle,
            "tuple_keys": {(1, 2): 3},
            "surrogate": "bad\udcffbyte",
            "unicode": "182 °C",
            "bytes": b"\x00\xff",
        }
    )
    line = JsonFormatter().format(rec)
    line.encode("utf-8")  # writable to any UTF-8 stream: no lone surrogate left raw
    event = parse_json(line)
    # Strict JSON (what a shipper's parser takes): no NaN or Infinity literals.
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {line}")) == event
    assert (event["nan"], event["inf"], event["path"]) == ("nan", "inf", "/var/lib/opstwin")
    assert event["cycle"] == "[[...]]" and event["tuple_keys"] == "{(1, 2): 3}"
    assert event["surrogate"] == "bad\udcffbyte" and event["unicode"] == "182 °C"
    assert event["bytes"] == "b'\\x00\\xff'"


# -- journald -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("levelno", "expected"),
    [
        (logging.CRITICAL, 2),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
        (logging.DEBUG, 7),
        (25, 6),
        (45, 3),
        (60, 2),
        (1, 7),
    ],
)
def test_priority_is_the_syslog_level_sd_daemon_defines(levelno: int, expected: int):
    assert priority(levelno) == expected


def _stream_id(fd: int) -> str:
    stat = os.fstat(fd)
    return f"{stat.st_dev}:{stat.st_ino}"


def test_journal_stream_matches_only_the_descriptor_it_names(tmp_path: Path):
    with open(tmp_path / "journal", "w") as journal, open(tmp_path / "other", "w") as other:
        env = {"JOURNAL_STREAM": _stream_id(journal.fileno())}
        assert journal_stream(journal.fileno(), env)
        # A child that inherited the variable but writes its stderr elsewhere: not journald.
        assert not journal_stream(other.fileno(), env)
        assert not journal_stream(journal.fileno(), {})
        closed = os.dup(journal.fileno())
        os.close(closed)
        assert not journal_stream(closed, env)


@pytest.mark.parametrize(
    "value", ["", "1", "1:", ":1", "a:b", "1:2:3", " 1:2", "1:2 ", "-1:2", "+1:2", "²:1", "1_0:2"]
)
def test_journal_stream_with_a_garbled_variable_is_not_journald(tmp_path: Path, value: str):
    with open(tmp_path / "f", "w") as f:
        assert not journal_stream(f.fileno(), {"JOURNAL_STREAM": value})


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_under_journald_lines_carry_their_priority_and_text_no_timestamp(tmp_path, fmt):
    with open(tmp_path / "stderr", "w", encoding="utf-8") as stream:
        env = {"JOURNAL_STREAM": _stream_id(stream.fileno())}
        handler = make_handler(fmt, stream, env)
        for level in (logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG):
            handler.handle(record("event", level=level))
    lines = (tmp_path / "stderr").read_text(encoding="utf-8").splitlines()
    assert [split_priority(line)[0] for line in lines] == [3, 4, 6, 7]
    for line in lines:
        rest = split_priority(line)[1]
        event = parse_json(rest) if fmt == "json" else parse_text(rest)
        assert event["level"] in LEVELS
        # journald stamps each entry; a JSON line keeps its ts for shippers reading the journal.
        assert ("ts" in event) == (fmt == "json")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_off_journald_no_prefix_and_a_timestamp(tmp_path, fmt):
    with open(tmp_path / "stderr", "w") as stream, open(tmp_path / "journal", "w") as journal:
        env = {"JOURNAL_STREAM": _stream_id(journal.fileno())}  # inherited, not ours
        make_handler(fmt, stream, env).handle(record("event"))
    (line,) = (tmp_path / "stderr").read_text().splitlines()
    assert split_priority(line)[0] is None
    event = parse_json(line) if fmt == "json" else parse_text(line)
    assert TS.fullmatch(event["ts"])


def test_a_stream_without_a_descriptor_is_not_journald():
    stream = io.StringIO()
    make_handler("text", stream, {"JOURNAL_STREAM": "1:1"}).handle(record("event"))
    assert stream.getvalue().startswith("ts=")


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="xml"):
        make_handler("xml")  # type: ignore[arg-type]


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["run", "-c", "site.yaml"], ["demo"]])
def test_run_and_demo_take_log_format_and_log_level(command: list[str]):
    args = build_parser().parse_args([*command, "--log-format", "json", "--log-level", "debug"])
    assert (args.log_format, args.log_level) == ("json", "DEBUG")
    args = build_parser().parse_args(command)
    assert (args.log_format, args.log_level) == ("text", None)  # run: the config's log_level


@pytest.mark.parametrize("bad", [["--log-format", "xml"], ["--log-level", "loud"]])
def test_a_bad_log_option_is_a_usage_error(bad: list[str], capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["run", "-c", "site.yaml", *bad])
    assert exit.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_a_failed_command_says_why_at_err_priority_under_journald(tmp_path, capfd, monkeypatch):
    # `opstwin check` runs as the unit's ExecStartPre: its refusal must pass `journalctl -p err`.
    monkeypatch.setenv("JOURNAL_STREAM", _stream_id(sys.stderr.fileno()))
    assert main(["check", str(tmp_path / "missing.yaml")]) == 2
    err = capfd.readouterr().err
    assert err.startswith("<3>opstwin: ") and "missing.yaml" in err
    lines = err.splitlines()
    assert all(line.startswith("<3>") for line in lines), err
    monkeypatch.delenv("JOURNAL_STREAM")
    assert main(["check", str(tmp_path / "missing.yaml")]) == 2
    assert capfd.readouterr().err.startswith("opstwin: ")
