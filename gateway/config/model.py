"""The site configuration as pydantic models: what one YAML file declares.

Every model forbids unknown keys: a misspelt `deadbnd:` must be an error, not a silently
ignored line in a plant config. Field descriptions are user-facing (the README's configuration
reference is checked against them by a test).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictInt,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from drivers.modbus.options import ModbusOptions
from drivers.opcua.options import OpcuaOptions
from gateway.opcua_server.config import OpcuaServerConfig
from gateway.policy.anomaly import AnomalyConfig

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

# area/line/asset/signal: at least asset/signal, lower-case path segments. Names and ids end
# up in topics, node ids and log lines: bounded, so a pasted blob is an error, not an id.
POINT_ID_PATTERN = r"^[a-z0-9][a-z0-9_.-]*(/[a-z0-9][a-z0-9_.-]*)+$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
PointId = Annotated[str, Field(pattern=POINT_ID_PATTERN, max_length=256)]


def _path(value: Any) -> Path:
    # The loader validates in strict mode (a YAML `true` is not a port, a `"80"` not a count),
    # and strict pydantic wants a Path object; a config file can only give a string.
    if isinstance(value, Path):
        return value
    if isinstance(value, str) and value and "\x00" not in value:
        return Path(value)
    raise ValueError("expected a file or folder path (a non-empty string)")


FilePath = Annotated[Path, PlainValidator(_path), WithJsonSchema({"type": "string"})]


def host_problem(host: str) -> str | None:
    """Why `host` is neither an IP address nor a host name, or None if it is one; no I/O.

    A host name is checked by syntax only (RFC 1123 labels); whether it resolves is known only
    when the gateway binds or connects.
    """
    if not host:
        return "an empty host; use 127.0.0.1 for this machine only or 0.0.0.0 for every interface"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if host.startswith("[") and host.endswith("]"):
        return f"{host!r}: write an IPv6 address without brackets here"
    if ":" in host:
        if _HOST_PORT.fullmatch(host):
            return f"{host!r} includes a port; give the host alone and the port in its own key"
        return f"{host!r} is not a valid IPv6 address"
    if _DIGITS_AND_DOTS.fullmatch(host):
        return f"{host!r} is not a valid IPv4 address (four numbers 0-255, e.g. 192.168.1.10)"
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return (
            f"{host!r} is neither an IP address nor a host name (letters, digits and `-`, "
            "in dot-separated labels of 1-63 characters)"
        )
    if labels[-1].isdigit():
        return f"{host!r} is neither an IP address nor a host name (whose last label has a letter)"
    return None


_HOST_PORT = re.compile(r"[^:]+:[0-9]*")
_DIGITS_AND_DOTS = re.compile(r"[0-9.]+")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class _Strict(BaseModel):
    # Non-finite numbers are refused everywhere: a `.inf` retention or a `.nan` scale is a
    # mistake, an infinite range bound defeats the write limits and is no valid JSON in /twin.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Range(_Strict):
    """Engineering range of a point; writes outside it are never sent to a device."""

    lo: float = Field(description="Lowest valid engineering value (a finite number).")
    hi: float = Field(description="Highest valid engineering value (a finite number).")


class _PointBase(_Strict):
    """What every point declares, whatever its protocol."""

    id: PointId = Field(
        description="Path `area/line/asset/signal`, unique across the site (up to 256 characters)."
    )
    datatype: DataType = Field(description="Datatype of the value (raw datatype for Modbus).")
    unit: str = Field("", description="Engineering unit, e.g. `m`, `°C`, `kW`.")
    range: Range | None = Field(
        None,
        description="Engineering range `{lo, hi}`; required if writable and numeric.",
    )
    writable: bool = Field(False, description="Whether setpoints may be written to this point.")
    deadband: float = Field(
        0.0, ge=0, description="Absolute change below which updates are dropped."
    )
    description: str = Field("", description="Free text shown to operators.")


class ModbusPointConfig(_PointBase):
    """One point of a Modbus device."""

    address: str = Field(description="Modbus address, e.g. `holding:0`, `input:3`, `holding:5.2`.")
    scale: float = Field(1.0, description="Engineering value = raw * scale + offset.")
    offset: float = Field(0.0, description="See `scale`.")
    length: int | None = Field(None, ge=1, le=250, description="Characters, for `string` points.")
    byte_order: Literal["big", "little"] | None = Field(
        None, description="Byte order within a register; default from the device options."
    )
    word_order: Literal["big", "little"] | None = Field(
        None, description="Register order of 32/64-bit values; default from the device options."
    )


class OpcuaPointConfig(_PointBase):
    """One point of an OPC UA server (a PLC)."""

    address: str = Field(
        description="Node id, e.g. `ns=2;s=Oven1.Temperature`, `i=2258`, or "
        "`nsu=urn:vendor:plc;s=Oven1.Temperature` (namespace by URI, resolved at connect)."
    )
    sampling_interval_ms: float | None = Field(
        None, ge=0, description="Sampling interval of this item; default from the device options."
    )
    queue_size: int | None = Field(
        None, ge=1, le=10_000, description="Server-side queue of this item; default from options."
    )


class ModbusDeviceConfig(_Strict):
    """A Modbus TCP or RTU device."""

    name: Name = Field(
        description="Unique device name (letters, digits, `_ . -`, up to 64 characters)."
    )
    driver: Literal["modbus"] = Field(description="Protocol driver: `modbus`.")
    endpoint: str = Field(description="`tcp://host:port` or `serial:///dev/ttyUSB0`.")
    enabled: bool = Field(True, description="A disabled device is declared but not polled.")
    options: ModbusOptions = Field(default_factory=ModbusOptions, description="Driver options.")
    points: list[ModbusPointConfig] = Field(min_length=1, description="The device's points.")


class OpcuaDeviceConfig(_Strict):
    """A PLC or other OPC UA server the gateway reads as a client."""

    name: Name = Field(
        description="Unique device name (letters, digits, `_ . -`, up to 64 characters)."
    )
    driver: Literal["opcua"] = Field(description="Protocol driver: `opcua`.")
    endpoint: str = Field(description="`opc.tcp://host:port/path`.")
    enabled: bool = Field(True, description="A disabled device is declared but not read.")
    options: OpcuaOptions = Field(default_factory=OpcuaOptions, description="Driver options.")
    points: list[OpcuaPointConfig] = Field(min_length=1, description="The device's points.")


class HttpPointConfig(_PointBase):
    """A point whose values arrive by `POST /telemetry/ingest` (no protocol address)."""


class HttpDeviceConfig(_Strict):
    """A source without a driver: something on the network pushes its values over HTTP."""

    name: Name = Field(
        description="Unique device name (letters, digits, `_ . -`, up to 64 characters)."
    )
    driver: Literal["http"] = Field(
        description="`http`: values are pushed to `POST /telemetry/ingest` by a token or user "
        "whose role grants `ingest` (`executor` or `admin`); the gateway reads nothing."
    )
    enabled: bool = Field(True, description="A disabled device's points refuse ingest.")
    stale_after_s: float | None = Field(
        None,
        gt=0,
        description="A point not pushed within this time turns STALE (None: never).",
    )
    points: list[HttpPointConfig] = Field(min_length=1, description="The device's points.")


DeviceConfig = Annotated[
    ModbusDeviceConfig | OpcuaDeviceConfig | HttpDeviceConfig, Field(discriminator="driver")
]
DRIVERS = ("modbus", "opcua", "http")


class StorageConfig(_Strict):
    """Where and how long the twin keeps its data."""

    path: FilePath = Field(
        Path("twin.db"), description="SQLite file; a relative path is relative to the config file."
    )
    history_days: float = Field(
        30.0,
        gt=0,
        description="Days of raw point history kept (every recorded change); older history "
        "is kept as `rollup_s` buckets.",
    )
    rollup_s: float = Field(
        60.0,
        ge=1,
        le=3600,
        description="Width in seconds of the buckets (count, min, max, mean, last) that keep "
        "history older than `history_days`; must divide 3600. Text points keep none.",
    )
    rollup_days: float = Field(
        365.0, gt=0, description="Days the downsampled buckets are kept (counted from now)."
    )
    max_db_mb: float | None = Field(
        4096.0,
        gt=0,
        description="Most disk the twin database may use (its -wal adds at most 64 MB). At "
        "the bound the oldest raw history goes first (downsampled), then the oldest buckets, "
        "then the oldest events; never current values, never events sync has not delivered "
        "(unless `bound_drops_unsynced`), never the audit log (control.db). Each time, a "
        "`StorageBoundReached` event says what went. `null`: no bound.",
    )
    bound_drops_unsynced: bool = Field(
        False,
        description="Whether the size bound may remove events that sync has not delivered yet.",
    )
    events_days: float = Field(
        7.0,
        gt=0,
        description="Days of non-telemetry events kept (device states, refusals, actions).",
    )
    event_log_minutes: float = Field(
        15.0,
        ge=0,
        le=7 * 24 * 60,
        description="Minutes of telemetry changes the event log serves at least (AIW `/diff`, "
        "SSE resume); a cursor older than that gets 410 Gone and re-reads the twin. A consumer "
        "that holds a cursor (sync) keeps the log longer, up to `event_log_max_mb`.",
    )
    event_log_max_mb: float = Field(
        512.0,
        gt=0,
        description="Most disk the event log's telemetry may take (compressed, ~5 bytes a "
        "change); beyond it the oldest goes even if a consumer still holds it.",
    )
    flush_interval_ms: float = Field(
        5.0, gt=0, le=1000, description="Longest time an accepted update waits before commit."
    )
    pki_dir: FilePath | None = Field(
        None,
        description="Folder for certificates made on first run (OPC UA client and server); "
        "default `pki/` beside the database. A relative path is relative to the config file.",
    )

    @field_validator("rollup_s")
    @classmethod
    def _divides_the_hour(cls, value: float) -> float:
        if not (3600 / value).is_integer():
            raise ValueError(f"must divide 3600 (60, 300, 600 …), got {value:g}")
        return value

    @model_validator(mode="after")
    def _bound_holds_the_log(self) -> StorageConfig:
        if self.max_db_mb is not None and self.max_db_mb < 2 * self.event_log_max_mb:
            raise ValueError(
                f"max_db_mb ({self.max_db_mb:g}) must be at least twice event_log_max_mb "
                f"({self.event_log_max_mb:g}): the event log alone may take that much"
            )
        return self

    @property
    def pki_path(self) -> Path:
        """The certificate folder: `pki_dir`, or `pki/` beside the database when unset."""
        return self.pki_dir if self.pki_dir is not None else self.path.parent / "pki"


class HttpConfig(_Strict):
    """The gateway's HTTP listener (health, twin reads)."""

    host: str = Field(
        "127.0.0.1",
        description="Address to bind: an IP address or a host name; `0.0.0.0` for every interface.",
    )
    port: StrictInt = Field(8000, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    max_connections: StrictInt = Field(
        64,
        ge=1,
        le=10_000,
        description="Concurrent HTTP connections; more are answered 503 and closed. Kept well "
        "below the process's descriptor limit, which the gateway raises at start when it can.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="A connection that has not sent a complete request within this time is "
        "closed (also idle keep-alive connections).",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=600,
        description="A request body not received within this time gets 408.",
    )

    read_access: Literal["open", "token"] = Field(
        "open",
        description="Who may read the twin, history, events and schemas: `open` (anyone who "
        "reaches the port) or `token` (a bearer token or user of any role). Writes always need "
        "a token or user whose role allows them. `/health` and the AIW manifest stay open.",
    )
    sse_heartbeat_s: float = Field(
        15.0,
        gt=0,
        le=300,
        description="`/subscribe` sends a comment line this often when no event flows, so "
        "proxies and clients see a live stream.",
    )
    max_subscribers: StrictInt = Field(
        16,
        ge=1,
        le=1000,
        description="Concurrent `/subscribe` streams; one more is answered 503.",
    )
    session_idle_s: float = Field(
        1800.0,
        ge=60,
        le=86_400,
        description="A web UI session unused for this long ends; its user logs in again.",
    )
    session_max_s: float = Field(
        43_200.0,
        ge=300,
        le=604_800,
        description="A web UI session ends this long after its login however busy it is "
        "(12 h: one shift, on a PC that several people share).",
    )

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        problem = host_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class SyncTlsConfig(_Strict):
    """TLS towards the MQTT broker."""

    ca_file: FilePath | None = Field(
        None,
        description="PEM file of the CA(s) that signed the broker's certificate; None: the "
        "system's trust store. A relative path is relative to the config file.",
    )
    cert_file: FilePath | None = Field(
        None, description="Client certificate (PEM) when the broker asks for one."
    )
    key_file: FilePath | None = Field(None, description="The client certificate's private key.")
    verify_hostname: bool = Field(
        True, description="Check that the broker's certificate names the host connected to."
    )


class SyncConfig(_Strict):
    """Cloud sync over MQTT (DESIGN §6): birth, diffs in rev order, store-and-forward."""

    broker: str | None = Field(
        None,
        description="`mqtt://host:port` or `mqtts://host:port` (TLS); None: no cloud sync.",
    )
    client_id: str | None = Field(
        None,
        max_length=128,
        description="MQTT client id; default `opstwin-{site_id}-{gateway_id}`.",
    )
    username: str | None = Field(None, max_length=256, description="Broker user name.")
    password_file: FilePath | None = Field(
        None,
        description="File whose first line is the broker password (kept out of the site "
        "config). A relative path is relative to the config file.",
    )
    tls: SyncTlsConfig = Field(
        default_factory=SyncTlsConfig, description="TLS settings, used with `mqtts://`."
    )
    topic_prefix: str = Field(
        "aiw/v1",
        pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$",
        max_length=128,
        description="Topics are `{topic_prefix}/{site_id}/{gateway_id}/...`.",
    )
    keepalive_s: StrictInt = Field(30, ge=5, le=3600, description="MQTT keep-alive interval.")
    batch_max_events: StrictInt = Field(
        1000, ge=1, le=100_000, description="Most events in one diff message."
    )
    max_inflight: StrictInt = Field(
        16,
        ge=1,
        le=1000,
        description="Diff messages published and not yet acknowledged (PUBACK) at once.",
    )
    reconnect_max_s: float = Field(
        30.0, gt=0, le=3600, description="Longest wait between reconnect attempts (jittered)."
    )
    accept_proposals: bool = Field(
        True,
        description="Take proposals from `.../cmd/proposal` (each carries an API token and "
        "goes through the policy gate like any other).",
    )

    @field_validator("broker")
    @classmethod
    def _broker(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = re.fullmatch(r"(mqtts?)://([^:/?#]+|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?/?", value)
        if match is None:
            raise ValueError(
                f"{value!r}: expected mqtt://host:port or mqtts://host:port "
                "(port optional: 1883, or 8883 with TLS)"
            )
        host = match.group(2).strip("[]")
        problem = host_problem(host)
        if problem is not None:
            raise ValueError(problem)
        if match.group(3) is not None and not 0 < int(match.group(3)) < 65536:
            raise ValueError(f"{value!r}: the port must be 1-65535")
        return value

    @property
    def endpoint(self) -> tuple[str, int, bool]:
        """(host, port, tls) of `broker`; only valid when `broker` is set."""
        assert self.broker is not None
        scheme, _, rest = self.broker.partition("://")
        rest = rest.rstrip("/")
        tls = scheme == "mqtts"
        if rest.startswith("["):
            host, _, port = rest[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = rest.partition(":")
        return host, int(port) if port else (8883 if tls else 1883), tls


class PoliciesConfig(_Strict):
    """Where the policy engine finds its policies."""

    dir: FilePath | None = Field(
        None,
        description="Folder of policy files (`*.yaml`, one policy each; the project ships "
        "examples in `policies/`); a relative path is relative to the config file. Loaded and "
        "checked against the points at start: one invalid file refuses the whole set. None: "
        "no policies (people and agents can still propose changes).",
    )


class SiteConfig(_Strict):
    """The whole site configuration file."""

    site_id: Name = Field(
        description="Site identifier (letters, digits, `_ . -`, up to 64 characters)."
    )
    gateway_id: Name = Field(description="This gateway's identifier within the site.")
    devices: list[DeviceConfig] = Field(description="Devices and their points.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Twin storage.")
    http: HttpConfig = Field(default_factory=HttpConfig, description="HTTP listener.")
    opcua_server: OpcuaServerConfig = Field(
        default_factory=OpcuaServerConfig,
        description="The gateway's own OPC UA server, for SCADA/HMI clients.",
    )
    policies: PoliciesConfig = Field(
        default_factory=PoliciesConfig, description="Policy files (see `policies/`)."
    )
    sync: SyncConfig = Field(
        default_factory=SyncConfig, description="Cloud sync over MQTT (off unless `broker`)."
    )
    anomalies: AnomalyConfig = Field(
        default_factory=AnomalyConfig,
        description="Anomaly detectors per point: `rules`, applied in order, each "
        "`{points: [globs], detectors: [{kind, ...}], disable: [kinds]}`; kinds `zscore`, `ewma`, "
        "`rate_of_change`, `flatline`, `out_of_range`, `stale`. Each firing is an "
        "`AnomalyDetected` event (kind, score 0..1, features) and a log line. Every glob must "
        "match a declared point. Default: no detectors.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log verbosity."
    )
