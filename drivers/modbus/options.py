"""Options of a Modbus device: the `options:` block of a modbus device in the site config.

Field descriptions are user-facing documentation (the README's configuration reference).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

__all__ = ["ModbusOptions"]


class ModbusOptions(BaseModel):
    """How to talk to one Modbus device (unit) and how to poll it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    unit_id: int = Field(
        1,
        ge=0,
        le=247,
        description="Modbus unit (slave) id of the device, 0..247. Modbus TCP devices usually "
        "ignore it; behind a TCP-to-RTU gateway or on a serial bus it selects the device.",
    )
    framer: Literal["socket", "rtu"] | None = Field(
        None,
        description="Frame format: `socket` (Modbus TCP, MBAP header) or `rtu` (binary frames "
        "with CRC). Default: `socket` for `tcp://` endpoints, `rtu` for `serial://`. Set `rtu` "
        "with a `tcp://` endpoint for RTU over TCP (serial-to-Ethernet converters); devices on "
        "one such endpoint share the bus like a serial line.",
    )
    timeout_s: float = Field(
        1.0, gt=0, le=60, description="Seconds to wait for a connection or for each response."
    )
    poll_interval_s: float = Field(
        1.0,
        ge=0.01,
        le=86400,
        description="Seconds between polls, at a fixed rate: a poll that overruns skips the "
        "ticks it missed instead of bunching up. Skipping is logged when it starts and when it "
        "stops, and counted in `/health` (the device's `polls_skipped`).",
    )
    max_registers: int = Field(
        125,
        ge=1,
        le=125,
        description="Most registers read in one request (FC3/FC4); lower it for devices that "
        "refuse long reads.",
    )
    max_bits: int = Field(
        2000,
        ge=1,
        le=2000,
        description="Most coils or discrete inputs read in one request (FC1/FC2).",
    )
    max_gap: int = Field(
        8,
        ge=0,
        le=124,
        description="Largest run of unused addresses a merged block read may span. Reading a "
        "few unused addresses is cheaper than another request; 0 merges only adjacent points.",
    )
    inter_frame_delay_s: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Silence kept on the bus between the end of one transaction and the next "
        "request. Default: 3.5 character times (at least 1.75 ms) for `serial://`, 0 otherwise.",
    )
    byte_order: Literal["big", "little"] = Field(
        "big",
        description="Byte order inside each register: `big` (the Modbus standard, AB) or "
        "`little` (BA). A point may override it.",
    )
    word_order: Literal["big", "little"] = Field(
        "big",
        description="Register order of 32/64-bit values: `big` (most significant register "
        "first, ABCD) or `little` (CDAB, common on meters). A point may override it.",
    )
    write_multiple: bool = Field(
        False,
        description="Use FC15/FC16 (write multiple) even for a single coil or register; some "
        "devices accept only those.",
    )
    max_in_flight: int = Field(
        1,
        ge=1,
        le=16,
        strict=True,
        description="Most read requests a poll keeps outstanding at once, 1..16 (Modbus TCP "
        "only: a serial bus, `rtu` framer included, carries one frame at a time). Answers are "
        "told apart by transaction id, so a poll of many blocks need not wait a round trip per "
        "block; 4 suits most PLCs and a large register map. The default stays 1 because some "
        "devices and simulators (pymodbus's own server among them) leave a second request "
        "sent in the same TCP segment unanswered until more data arrives, and then every "
        "point goes BAD `no response`: raise it per device once the device is known to cope.",
    )
    failures_before_reconnect: int = Field(
        3,
        ge=1,
        le=1000,
        description="Consecutive polls in which every request timed out or failed before the "
        "connection is treated as lost and reopened (garbled answers do not count: the device "
        "is there, its points are BAD `malformed response`).",
    )
    baudrate: int = Field(
        19200, ge=300, le=4_000_000, description="Serial line speed in bit/s (`serial://` only)."
    )
    parity: Literal["N", "E", "O"] = Field(
        "N", description="Serial parity: `N` none, `E` even, `O` odd (`serial://` only)."
    )
    stopbits: Literal[1, 2] = Field(1, description="Serial stop bits, 1 or 2 (`serial://` only).")
    bytesize: Literal[7, 8] = Field(8, description="Serial data bits, 7 or 8 (`serial://` only).")

    @field_validator("stopbits", "bytesize", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: object, info: ValidationInfo) -> object:
        # A YAML `true` equals 1 to Python, and pydantic's Literal check cannot be made strict.
        if isinstance(value, bool):
            allowed = "1 or 2" if info.field_name == "stopbits" else "7 or 8"
            raise ValueError(f"expected the number {allowed}, not a boolean")
        return value
