"""The site configuration as pydantic models: what one YAML file declares.

Every model forbids unknown keys: a misspelt `deadbnd:` must be an error, not a silently
ignored line in a plant config. Field descriptions are user-facing (the README's configuration
reference is checked against them by a test).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from drivers.modbus.options import ModbusOptions

DataType = Literal[
    "bool",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float32",
    "float64",
    "string",
]

# area/line/asset/signal: at least asset/signal, lower-case path segments.
POINT_ID_PATTERN = r"^[a-z0-9][a-z0-9_.-]*(/[a-z0-9][a-z0-9_.-]*)+$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Strict):
    """Engineering range of a point; writes outside it are never sent to a device."""

    lo: float = Field(description="Lowest valid engineering value.")
    hi: float = Field(description="Highest valid engineering value.")


class PointConfig(_Strict):
    """One point of a device."""

    id: Annotated[str, Field(pattern=POINT_ID_PATTERN)] = Field(
        description="Path `area/line/asset/signal`, unique across the site."
    )
    address: str = Field(
        description="Protocol address, e.g. `holding:0`, `input:3`, `holding:5.2`."
    )
    datatype: DataType = Field(description="Raw datatype on the device.")
    unit: str = Field("", description="Engineering unit, e.g. `m`, `°C`, `kW`.")
    range: Range | None = Field(
        None, description="Engineering range `{lo, hi}`; required if writable and numeric."
    )
    writable: bool = Field(False, description="Whether setpoints may be written to this point.")
    deadband: float = Field(
        0.0, ge=0, description="Absolute change below which updates are dropped."
    )
    scale: float = Field(1.0, description="Engineering value = raw * scale + offset.")
    offset: float = Field(0.0, description="See `scale`.")
    length: int | None = Field(None, ge=1, le=250, description="Characters, for `string` points.")
    byte_order: Literal["big", "little"] | None = Field(
        None, description="Byte order within a register; default from the device options."
    )
    word_order: Literal["big", "little"] | None = Field(
        None, description="Register order of 32/64-bit values; default from the device options."
    )
    description: str = Field("", description="Free text shown to operators.")


class ModbusDeviceConfig(_Strict):
    """A Modbus TCP or RTU device."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)] = Field(description="Unique device name.")
    driver: Literal["modbus"] = Field(description="Protocol driver: `modbus`.")
    endpoint: str = Field(description="`tcp://host:port` or `serial:///dev/ttyUSB0`.")
    enabled: bool = Field(True, description="A disabled device is declared but not polled.")
    options: ModbusOptions = Field(default_factory=ModbusOptions, description="Driver options.")
    points: list[PointConfig] = Field(min_length=1, description="The device's points.")


DeviceConfig = ModbusDeviceConfig


class StorageConfig(_Strict):
    """Where and how long the twin keeps its data."""

    path: Path = Field(
        Path("twin.db"), description="SQLite file; a relative path is relative to the config file."
    )
    history_days: float = Field(30.0, gt=0, description="Days of point history kept.")
    events_days: float = Field(7.0, gt=0, description="Days of event log kept.")
    flush_interval_ms: float = Field(
        5.0, gt=0, le=1000, description="Longest time an accepted update waits before commit."
    )


class HttpConfig(_Strict):
    """The gateway's HTTP listener (health, twin reads)."""

    host: str = Field("127.0.0.1", description="Address to bind; `0.0.0.0` for every interface.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 picks a free one.")


class SiteConfig(_Strict):
    """The whole site configuration file."""

    site_id: Annotated[str, Field(pattern=NAME_PATTERN)] = Field(description="Site identifier.")
    gateway_id: Annotated[str, Field(pattern=NAME_PATTERN)] = Field(
        description="This gateway's identifier within the site."
    )
    devices: list[DeviceConfig] = Field(description="Devices and their points.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Twin storage.")
    http: HttpConfig = Field(default_factory=HttpConfig, description="HTTP listener.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log verbosity."
    )
