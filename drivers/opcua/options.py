"""Options of an OPC UA server connection: the `options:` block of an opcua device in the config.

Field descriptions are user-facing documentation (the README's configuration reference).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

__all__ = ["OpcuaOptions"]


class OpcuaOptions(BaseModel):
    """How to reach one OPC UA server (a PLC) and how to read it."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    mode: Literal["subscribe", "poll"] = Field(
        "subscribe",
        description="`subscribe`: the server reports changes (monitored items in one "
        "subscription), the normal choice. `poll`: the gateway reads every point each "
        "`poll_interval_s`, for servers whose subscriptions are broken or limited.",
    )
    publishing_interval_ms: float = Field(
        500.0,
        ge=1,
        le=600_000,
        description="How often the server sends the changes it collected, in milliseconds "
        "(`subscribe` mode). The server may revise it; the revised value is used.",
    )
    sampling_interval_ms: float | None = Field(
        None,
        ge=0,
        le=600_000,
        description="How often the server samples each value, in milliseconds (`subscribe` "
        "mode). Default: the publishing interval. 0 asks for the fastest rate the server "
        "supports. A point may override it.",
    )
    queue_size: int = Field(
        1,
        ge=1,
        le=10_000,
        description="Values the server keeps per item between two publishes (`subscribe` "
        "mode). 1 keeps only the latest; more delivers every sampled value. A point may "
        "override it.",
    )
    deadband: float = Field(
        0.0,
        ge=0,
        description="Absolute deadband the server applies before reporting a numeric change "
        "(`subscribe` mode; an OPC UA DataChangeFilter); 0 reports every change. Used for "
        "points that set no deadband of their own.",
    )
    keepalive_count: int = Field(
        6,
        ge=1,
        le=10_000,
        description="Publishing intervals without any change after which the server sends an "
        "empty keep-alive message. Together with the publishing interval it sets how fast a "
        "silent subscription is noticed (see `watchdog_factor`).",
    )
    lifetime_count: int = Field(
        60,
        ge=3,
        le=100_000,
        description="Publishing intervals without any request from the gateway after which "
        "the server deletes the subscription. At least 3 x `keepalive_count`.",
    )
    watchdog_factor: float = Field(
        2.0,
        ge=1.1,
        le=100,
        description="A subscription that sent neither data nor a keep-alive for this many "
        "keep-alive periods (publishing interval x `keepalive_count`, as revised by the "
        "server; at least 1 s) counts as lost: the driver marks its points STALE, drops the "
        "session and connects and subscribes again.",
    )
    poll_interval_s: float = Field(
        1.0,
        ge=0.01,
        le=86_400,
        description="Seconds between reads in `poll` mode, at a fixed rate: a read that "
        "overruns skips the ticks it missed.",
    )
    timeout_s: float = Field(
        4.0,
        gt=0,
        le=120,
        description="Seconds to wait for the connection and for each request. The server "
        "is also probed at this interval (it must answer within it): a connection that died "
        "without closing is noticed within about twice this time.",
    )
    session_timeout_s: float = Field(
        60.0,
        ge=1,
        le=3600,
        description="Session timeout asked of the server, in seconds: how long it keeps the "
        "session (and its subscription) after the gateway stops talking to it.",
    )
    reconnect_cap_s: float = Field(
        15.0,
        ge=1,
        le=60,
        description="Longest wait between two reconnection attempts, in seconds. Waits start "
        "at 0.5 s and double (with jitter) up to this cap while the server stays away.",
    )
    security_mode: Literal["None", "Sign", "SignAndEncrypt"] = Field(
        "None",
        description="Message security: `None`, `Sign` or `SignAndEncrypt`. With `Sign` and "
        "`SignAndEncrypt` the gateway makes its own client certificate on first use "
        "(in `own/` of the gateway's PKI folder); servers that check clients must be told to "
        "trust it. The server's certificate is trusted on first use and pinned: see "
        "`server_certificate`.",
    )
    security_policy: Literal["Basic256Sha256"] = Field(
        "Basic256Sha256",
        description="Security policy when `security_mode` is not `None`: `Basic256Sha256`.",
    )
    server_certificate: str | None = Field(
        None,
        description="Path of the server's certificate (DER or PEM) to trust, relative to the "
        "config file; checked when the config is loaded. Default: trust "
        "on first use: the certificate the server presents at the first secured connection "
        "is pinned in `trusted/` of the gateway's PKI folder, and a later connection to a server "
        "presenting a different one is refused (loudly) until that file is deleted.",
    )
    username: str | None = Field(
        None,
        min_length=1,
        description="User name for the session; none connects anonymously.",
    )
    password: SecretStr | None = Field(
        None,
        description="Password for `username`. Use `SignAndEncrypt` (or a server that "
        "encrypts the password token): with `None` security some servers receive it in "
        "plain text.",
    )
    application_uri: str = Field(
        "urn:opstwin:gateway:client",
        min_length=1,
        description="The gateway's OPC UA application URI, also written into its client "
        "certificate. Servers that check it compare it with the certificate.",
    )
    max_nodes_per_read: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Most nodes read in one request (`poll` mode, and read-back after "
        "writes). Default: the server's MaxNodesPerRead, or 1000 when it gives none.",
    )
    max_monitored_items_per_call: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Most monitored items created in one request. Default: the server's "
        "MaxMonitoredItemsPerCall, or 1000 when it gives none.",
    )
    write_verify_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description="After a write, how long the value read back may take to show the "
        "written value (a PLC may apply it at its next scan) before the write is reported as "
        "not verified.",
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> OpcuaOptions:
        if self.lifetime_count < 3 * self.keepalive_count:
            raise ValueError(
                f"lifetime_count ({self.lifetime_count}) must be at least 3 x keepalive_count "
                f"({3 * self.keepalive_count}): the server would delete the subscription "
                "between two keep-alives"
            )
        if self.password is not None and self.username is None:
            raise ValueError("password is set but username is not")
        return self
