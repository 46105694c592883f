"""Modbus PDUs and frames, device side: pure parsing and building, no I/O.

Function codes 1, 2, 3, 4, 5, 6, 15 and 16; MBAP framing (Modbus TCP) and RTU framing (unit id,
PDU, CRC-16) for RTU over TCP. Quantity limits follow the Modbus application protocol spec.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

ILLEGAL_FUNCTION = 1
ILLEGAL_DATA_ADDRESS = 2
ILLEGAL_DATA_VALUE = 3
DEVICE_FAILURE = 4
GATEWAY_TARGET_NO_RESPONSE = 11

TABLE_OF_FUNCTION = {
    1: "coil",
    2: "discrete",
    3: "holding",
    4: "input",
    5: "coil",
    6: "holding",
    15: "coil",
    16: "holding",
}
_READ_LIMIT = {1: 2000, 2: 2000, 3: 125, 4: 125}
_WRITE_LIMIT = {15: 1968, 16: 123}


class ModbusError(Exception):
    """A request the device answers with a Modbus exception response."""

    def __init__(self, code: int, message: str = "") -> None:
        """Carry the exception code and, for logs, why."""
        super().__init__(message or f"Modbus exception {code}")
        self.code = code


class FramingError(Exception):
    """Bytes that are not a Modbus frame; a device drops such a connection."""


class Store(Protocol):
    """The data a device serves; raises `ModbusError` for what it refuses."""

    def read(self, table: str, address: int, count: int) -> list[int] | list[bool]:
        """Return `count` words or bits from `address`."""
        ...

    def write(self, table: str, address: int, values: list[int] | list[bool]) -> None:
        """Write words or bits from `address`."""
        ...


@dataclass(frozen=True)
class Request:
    """A decoded request PDU."""

    function: int
    table: str
    address: int
    count: int
    values: tuple[int, ...] | tuple[bool, ...] = ()


def parse_request(pdu: bytes) -> Request:
    """Decode a request PDU; raise `ModbusError` for what a device would reject."""
    if not pdu:
        raise ModbusError(ILLEGAL_FUNCTION, "empty PDU")
    function = pdu[0]
    if function not in TABLE_OF_FUNCTION:
        raise ModbusError(ILLEGAL_FUNCTION, f"function code {function} not supported")
    table = TABLE_OF_FUNCTION[function]
    body = pdu[1:]
    if len(body) < 4:
        raise ModbusError(ILLEGAL_DATA_VALUE, f"function {function}: PDU too short")
    address, second = struct.unpack(">HH", body[:4])
    if function in _READ_LIMIT:
        if not 1 <= second <= _READ_LIMIT[function] or len(body) != 4:
            raise ModbusError(ILLEGAL_DATA_VALUE, f"function {function}: bad quantity {second}")
        _check_span(address, second)
        return Request(function, table, address, second)
    if function == 5:
        if second not in (0x0000, 0xFF00) or len(body) != 4:
            raise ModbusError(ILLEGAL_DATA_VALUE, f"write coil: value {second:#06x}")
        return Request(function, table, address, 1, (second == 0xFF00,))
    if function == 6:
        if len(body) != 4:
            raise ModbusError(ILLEGAL_DATA_VALUE, "write register: PDU length")
        return Request(function, table, address, 1, (second,))
    count = second
    data = body[5:]
    expected = (count + 7) // 8 if function == 15 else 2 * count
    if (
        not 1 <= count <= _WRITE_LIMIT[function]
        or len(body) < 5
        or body[4] != expected
        or len(data) != expected
    ):
        raise ModbusError(ILLEGAL_DATA_VALUE, f"function {function}: bad quantity or byte count")
    _check_span(address, count)
    if function == 15:
        bits = tuple(bool(data[i // 8] >> (i % 8) & 1) for i in range(count))
        return Request(function, table, address, count, bits)
    words = struct.unpack(f">{count}H", data)
    return Request(function, table, address, count, words)


def execute(request: Request, store: Store) -> bytes:
    """Run `request` against `store` and return the response PDU."""
    f = request.function
    if f in (1, 2):
        bits = store.read(request.table, request.address, request.count)
        packed = pack_bits([bool(b) for b in bits])
        return bytes([f, len(packed)]) + packed
    if f in (3, 4):
        words = store.read(request.table, request.address, request.count)
        return bytes([f, 2 * len(words)]) + struct.pack(f">{len(words)}H", *words)
    store.write(request.table, request.address, list(request.values))
    if f == 5:
        return struct.pack(">BHH", f, request.address, 0xFF00 if request.values[0] else 0)
    if f == 6:
        return struct.pack(">BHH", f, request.address, request.values[0])
    return struct.pack(">BHH", f, request.address, request.count)


def exception_pdu(function: int, code: int) -> bytes:
    """Build an exception response PDU."""
    return bytes([(function | 0x80) & 0xFF, code & 0xFF])


def pack_bits(bits: list[bool]) -> bytes:
    """Pack bits LSB first, eight per byte, as Modbus does."""
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def crc16(data: bytes) -> int:
    """Modbus CRC-16 (poly 0xA001, init 0xFFFF); sent low byte first."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


@dataclass(frozen=True)
class Frame:
    """One request frame: unit id, PDU, and what the response must echo (MBAP transaction)."""

    unit: int
    pdu: bytes
    transaction: int = 0


class SocketFramer:
    """MBAP framing: transaction id, protocol id 0, length, unit id, PDU."""

    name = "socket"

    def split(self, buffer: bytearray) -> list[Frame]:
        """Remove and return every complete frame in `buffer`; raise `FramingError` on junk."""
        frames = []
        while len(buffer) >= 7:
            tid, pid, length = struct.unpack(">HHH", buffer[:6])
            if pid != 0 or not 2 <= length <= 254:
                raise FramingError(f"bad MBAP header: protocol {pid}, length {length}")
            if len(buffer) < 6 + length:
                break
            frames.append(Frame(buffer[6], bytes(buffer[7 : 6 + length]), tid))
            del buffer[: 6 + length]
        return frames

    def build(self, request: Frame, pdu: bytes) -> bytes:
        """Frame a response PDU for `request`."""
        return struct.pack(">HHHB", request.transaction, 0, len(pdu) + 1, request.unit) + pdu


class RtuFramer:
    """RTU framing over a byte stream: unit id, PDU, CRC-16 (low byte first)."""

    name = "rtu"

    def split(self, buffer: bytearray) -> list[Frame]:
        """Remove and return every complete frame; drop the buffer on a CRC error."""
        frames = []
        while len(buffer) >= 4:
            size = _rtu_request_size(buffer)
            if size is None:
                # Unknown function: no length rule, so the frame is whatever arrived.
                size = len(buffer)
            if len(buffer) < size:
                break
            frame = bytes(buffer[:size])
            if crc16(frame[:-2]) != int.from_bytes(frame[-2:], "little"):
                # A slave ignores a bad frame; with no inter-frame silence to resync on, drop all.
                buffer.clear()
                break
            frames.append(Frame(frame[0], frame[1:-2]))
            del buffer[:size]
        return frames

    def build(self, request: Frame, pdu: bytes) -> bytes:
        """Frame a response PDU for `request`."""
        body = bytes([request.unit]) + pdu
        return body + crc16(body).to_bytes(2, "little")


FRAMERS: dict[str, type[SocketFramer] | type[RtuFramer]] = {
    "socket": SocketFramer,
    "rtu": RtuFramer,
}


def _check_span(address: int, count: int) -> None:
    if address + count > 0x10000:
        raise ModbusError(ILLEGAL_DATA_ADDRESS, f"span {address}+{count} beyond 65535")


def _rtu_request_size(buffer: bytearray) -> int | None:
    function = buffer[1]
    if function in (1, 2, 3, 4, 5, 6):
        return 8
    if function in (15, 16):
        return 9 + buffer[6] if len(buffer) >= 7 else 9
    return None
