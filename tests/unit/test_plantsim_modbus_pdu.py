"""The simulator's Modbus PDUs and frames, device side; pure, no sockets."""

from __future__ import annotations

import pytest
from pymodbus.framer.rtu import FramerRTU

from plantsim.modbus.pdu import (
    FramingError,
    ModbusError,
    Request,
    RtuFramer,
    SocketFramer,
    crc16,
    exception_pdu,
    execute,
    parse_request,
)


class DictStore:
    """A store of a few registers and bits; unmapped addresses answer exception 2."""

    def __init__(self) -> None:
        self.data: dict[str, dict[int, int | bool]] = {
            "holding": {0: 7, 1: 8},
            "input": {0: 0x1234},
            "coil": {0: True, 1: False},
            "discrete": {0: False},
        }

    def read(self, table, address, count):
        try:
            return [self.data[table][a] for a in range(address, address + count)]
        except KeyError:
            raise ModbusError(2) from None

    def write(self, table, address, values):
        for i in range(len(values)):
            if address + i not in self.data[table]:
                raise ModbusError(2)
        for i, v in enumerate(values):
            self.data[table][address + i] = v


@pytest.mark.parametrize(
    ("pdu", "response"),
    [
        (bytes.fromhex("03 0000 0002"), bytes.fromhex("03 04 0007 0008")),
        (bytes.fromhex("04 0000 0001"), bytes.fromhex("04 02 1234")),
        (bytes.fromhex("01 0000 0002"), bytes.fromhex("01 01 01")),
        (bytes.fromhex("02 0000 0001"), bytes.fromhex("02 01 00")),
        (bytes.fromhex("05 0001 FF00"), bytes.fromhex("05 0001 FF00")),
        (bytes.fromhex("06 0001 0009"), bytes.fromhex("06 0001 0009")),
        (bytes.fromhex("0F 0000 0002 01 02"), bytes.fromhex("0F 0000 0002")),
        (bytes.fromhex("10 0000 0002 04 000A 000B"), bytes.fromhex("10 0000 0002")),
    ],
)
def test_each_function_code_answers_as_the_spec_says(pdu, response):
    assert execute(parse_request(pdu), DictStore()) == response


def test_writes_reach_the_store():
    store = DictStore()
    execute(parse_request(bytes.fromhex("0F 0000 0002 01 02")), store)
    assert store.data["coil"] == {0: False, 1: True}
    execute(parse_request(bytes.fromhex("10 0000 0002 04 000A 000B")), store)
    assert store.data["holding"] == {0: 10, 1: 11}


@pytest.mark.parametrize(
    ("pdu", "code"),
    [
        (bytes.fromhex("07"), 1),  # read exception status: not supported
        (bytes.fromhex("2B 0E 01 00"), 1),
        (bytes.fromhex("03 0000 0000"), 3),  # zero quantity
        (bytes.fromhex("03 0000 007E"), 3),  # 126 registers > 125
        (bytes.fromhex("01 0000 07D1"), 3),  # 2001 coils > 2000
        (bytes.fromhex("05 0000 1234"), 3),  # coil value neither 0xFF00 nor 0
        (bytes.fromhex("10 0000 0002 03 000A 000B"), 3),  # byte count disagrees
        (bytes.fromhex("03 00"), 3),  # truncated
        (bytes.fromhex("03 FFFF 0002"), 2),  # past the address space
    ],
)
def test_malformed_requests_raise_the_right_exception(pdu, code):
    with pytest.raises(ModbusError) as info:
        parse_request(pdu)
    assert info.value.code == code


def test_unmapped_addresses_come_back_from_the_store_as_exception_2():
    with pytest.raises(ModbusError) as info:
        execute(parse_request(bytes.fromhex("03 0000 0003")), DictStore())
    assert info.value.code == 2


def test_requests_know_their_table_and_span():
    assert parse_request(bytes.fromhex("10 0005 0002 04 000A 000B")) == Request(
        16, "holding", 5, 2, (10, 11)
    )
    assert parse_request(bytes.fromhex("02 0003 0004")).table == "discrete"


def test_exception_pdu_sets_the_high_bit():
    assert exception_pdu(3, 2) == b"\x83\x02"


def test_crc16_matches_the_spec_example_and_pymodbus():
    frame = bytes.fromhex("01 03 0000 000A")
    assert crc16(frame).to_bytes(2, "little") == bytes.fromhex("C5 CD")
    data = bytes(range(40))
    assert crc16(data).to_bytes(2, "little") == FramerRTU.compute_CRC(data).to_bytes(2, "big")


def test_socket_framer_splits_pipelined_and_partial_frames():
    framer = SocketFramer()
    one = bytes.fromhex("0001 0000 0006 01 03 0000 0002")
    two = bytes.fromhex("0002 0000 0006 01 04 0000 0001")
    buffer = bytearray(one + two[:5])
    frames = framer.split(buffer)
    assert [(f.transaction, f.unit, f.pdu) for f in frames] == [(1, 1, one[7:])]
    buffer += two[5:]
    assert [f.transaction for f in framer.split(buffer)] == [2]
    assert buffer == b""
    assert framer.build(frames[0], b"\x83\x02") == bytes.fromhex("0001 0000 0003 01 83 02")


def test_socket_framer_rejects_a_foreign_protocol_id():
    with pytest.raises(FramingError, match="protocol"):
        SocketFramer().split(bytearray(bytes.fromhex("0001 0001 0006 01 03 0000 0002")))


def test_rtu_framer_splits_frames_by_function_and_checks_the_crc():
    framer = RtuFramer()
    read = bytes.fromhex("01 03 0000 000A C5CD")
    body = bytes.fromhex("01 10 0000 0001 02 0005")
    write = body + crc16(body).to_bytes(2, "little")
    buffer = bytearray(read + write[:6])
    assert [f.pdu for f in framer.split(buffer)] == [read[1:-2]]
    buffer += write[6:]
    assert [f.pdu for f in framer.split(buffer)] == [write[1:-2]]
    bad = bytearray(read[:-1] + b"\x00")
    assert framer.split(bad) == [] and bad == b""
    response = framer.build(framer.split(bytearray(read))[0], b"\x83\x02")
    assert response[:3] == b"\x01\x83\x02"
    assert crc16(response[:-2]) == int.from_bytes(response[-2:], "little")
