"""The server's side of client writes as proposals, without a network: how many may wait for
the engine, which status names an answer may carry, how values are shown in a log line, and
how a request is told to be a Write."""

from __future__ import annotations

import math

import pytest
from asyncua import ua
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import struct_to_binary

from gateway.auth.rbac import Grant, Principal
from gateway.opcua_server.concurrent_writes import _is_write
from gateway.opcua_server.proposals import ClientWrite, InFlight, WriteAnswer
from gateway.opcua_server.server import _shown, _status_code


def test_one_write_per_session_is_in_flight_and_a_few_in_all():
    slots = InFlight(cap=2)
    assert slots.take("#1") is None
    assert "session" in (slots.take("#1") or "")
    assert slots.take("#2") is None
    why = slots.take("#3")
    assert why is not None and "2 writes" in why and "max_proposals_in_flight" in why
    slots.release("#1")
    assert slots.take("#3") is None
    assert len(slots) == 2
    slots.release("#never-taken")  # ignored
    slots.release("#2")
    slots.release("#3")
    assert len(slots) == 0


def test_a_cap_below_one_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        InFlight(cap=0)


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("Good", ua.StatusCodes.Good),
        ("BadOutOfRange", ua.StatusCodes.BadOutOfRange),
        ("BadRequestNotComplete", ua.StatusCodes.BadRequestNotComplete),
        ("BadUserAccessDenied", ua.StatusCodes.BadUserAccessDenied),
        ("UncertainLastUsableValue", ua.StatusCodes.UncertainLastUsableValue),
    ],
)
def test_status_names_of_asyncua_map_to_their_codes(name, code):
    assert _status_code(name) == code


@pytest.mark.parametrize(
    "name",
    [
        "BadNoSuchThing",
        "good",
        "",
        "__class__",
        "__doc__",
        "mro",
        " Good",
        None,
        0,
        ua.StatusCodes.Good,
        b"Good",
        ["Good"],
    ],
)
def test_anything_else_is_no_status(name):
    assert _status_code(name) is None


def test_values_in_log_lines_are_cut_short():
    assert _shown(55.0) == "55.0"
    assert _shown(math.nan) == "nan"
    huge = _shown("x" * 1_000_000)
    assert len(huge) < 120 and "1000002 characters" in huge


def test_the_contract_types_are_frozen_values():
    principal = Principal(name="ana", kind="user", grants=(Grant(role="agent"),))
    write = ClientWrite("a/b", 1.5, "ana", "agent", principal, "#1", "10.0.0.5")
    assert write == ClientWrite("a/b", 1.5, "ana", "agent", principal, "#1", "10.0.0.5")
    with pytest.raises(AttributeError):
        write.value = 2.0  # type: ignore[misc]
    assert WriteAnswer("Good", "executed").proposal_id is None


def _request(request: object) -> Buffer:
    return Buffer(struct_to_binary(request))


def test_a_write_request_is_told_from_other_requests_without_consuming_it():
    write = ua.WriteRequest()
    write.Parameters.NodesToWrite = [ua.WriteValue()]
    body = _request(write)
    before = len(body)
    assert _is_write(body)
    assert len(body) == before  # asyncua reads the same body afterwards
    assert not _is_write(_request(ua.ReadRequest()))
    assert not _is_write(_request(ua.PublishRequest()))


@pytest.mark.parametrize("data", [b"", b"\x01", b"\xff" * 3, b"\x05\x00" + b"\x00" * 2])
def test_a_malformed_body_is_not_a_write(data):
    assert not _is_write(Buffer(data))
