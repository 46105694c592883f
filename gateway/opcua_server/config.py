"""Configuration of the gateway's own OPC UA server (the site config's `opcua_server:` key).

Field descriptions are user-facing: the README's configuration reference is generated from them.
Cross-field rules live in the model so a bad `opcua_server:` block is refused at load, with the
key path, before anything listens on a port.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

from gateway.auth.rbac import Role
from gateway.opcua_server.users import is_argon2_hash

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_SECURITY_POLICIES",
    "OpcuaServerConfig",
    "OpcuaUser",
    "Role",
    "SecurityPolicyName",
]

SecurityPolicyName = Literal["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"]

# This machine only, like HTTP: reachable from the plant network only when the config says so.
DEFAULT_ENDPOINT = "opc.tcp://127.0.0.1:4840/opstwin"
DEFAULT_SECURITY_POLICIES: list[SecurityPolicyName] = [
    "Basic256Sha256_SignAndEncrypt",
    "Basic256Sha256_Sign",
]
USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"


class _Strict(BaseModel):
    # A plain password pasted into `password_hash` must not be echoed by a printed error.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class OpcuaUser(_Strict):
    """One user an OPC UA client may log in as (username and password)."""

    username: str = Field(
        pattern=USERNAME_PATTERN,
        description="Login name: letters, digits, `_ . @ -`, up to 64 characters.",
    )
    password_hash: str = Field(
        repr=False,
        description="argon2 hash of the password (`$argon2id$…`), printed by "
        "`opstwin hash-password`; never the password itself.",
    )
    role: Role = Field(
        description="`viewer`, `agent`, `supervisor`, `executor` or `admin`, site-wide; every "
        "role may read, and every role but `viewer` may write a writable point, which proposes "
        "the change to the policy engine.",
    )

    @field_validator("password_hash")
    @classmethod
    def _argon2(cls, value: str) -> str:
        if not is_argon2_hash(value):
            # Never echo the value: a plain password pasted here by mistake must not reach a log.
            raise ValueError(
                "not an argon2 hash (expected a `$argon2id$v=19$m=…` string); "
                "make one with `opstwin hash-password`"
            )
        return value


class OpcuaServerConfig(_Strict):
    """The gateway's own OPC UA server, through which SCADA/HMI clients read the twin."""

    enabled: StrictBool = Field(False, description="Serve the twin over OPC UA.")
    endpoint: str = Field(
        DEFAULT_ENDPOINT,
        description="`opc.tcp://host:port/path` to listen on; the default host `127.0.0.1` is "
        "reachable from this machine only, `0.0.0.0` listens on every interface (what SCADA on "
        "another machine needs); port 0 picks a free one.",
    )
    security_policies: list[SecurityPolicyName] = Field(
        DEFAULT_SECURITY_POLICIES,
        min_length=1,
        description="Security policies offered: `Basic256Sha256_SignAndEncrypt`, "
        "`Basic256Sha256_Sign`, and `None` (no signing, no encryption) only if listed.",
    )
    allow_anonymous: StrictBool = Field(
        False, description="Let clients in without a login, as role `viewer`."
    )
    trust_all_clients: StrictBool = Field(
        False,
        description="Accept any client certificate without checking "
        "`<pki_dir>/opcua-server/trusted/` — for demos only: then anyone who can reach the port "
        "may open a secure channel. Otherwise a client whose certificate is not in `trusted/` "
        "is refused and its certificate copied to `rejected/`, for an admin to move.",
    )
    max_connections: StrictInt = Field(
        64,
        ge=1,
        le=10_000,
        description="Concurrent OPC UA client connections, logged in or not; more are closed as "
        "they arrive. Kept well below the process's descriptor limit, so devices and the "
        "database always have descriptors.",
    )
    handshake_timeout_s: StrictFloat = Field(
        10.0,
        gt=0,
        le=300,
        description="A connection that has not logged in (Hello, secure channel, session, "
        "activation) within this time is closed: it frees what a stalled or hostile client "
        "holds.",
    )
    propose_timeout_s: StrictFloat = Field(
        # Below asyncua clients' own 4 s request timeout, so they see BadTimeout; a decision
        # takes ~0.1 s (bench/decide.py).
        3.0,
        gt=0,
        le=300,
        description="How long a client's write to a writable point waits for the policy "
        "engine's answer before the client gets BadTimeout. The engine may still decide it "
        "(the event log tells); several points in one request share this time.",
    )
    max_proposals_in_flight: StrictInt = Field(
        4,
        ge=1,
        le=64,
        description="Client writes the policy engine may be deciding at once, for the whole "
        "server; a session has at most one. Writes beyond either are answered "
        "BadTooManyOperations at once.",
    )
    users: list[OpcuaUser] = Field(
        default_factory=list,
        description="Users who log in with username and password, besides the users of "
        "`control.db` (`opstwin user add`); a name in both logs in as configured here.",
    )
    server_name: str = Field(
        "OpsTwin Gateway", min_length=1, description="Application name shown to clients."
    )
    application_uri: str | None = Field(
        None,
        description="Application URI, written into the server certificate; default "
        "`urn:<hostname>:opstwin:gateway`.",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "opc.tcp" or not parts.hostname or port is None:
            raise ValueError(
                f"expected `opc.tcp://host:port/path` (e.g. {DEFAULT_ENDPOINT}), got {value!r}"
            )
        return value

    @field_validator("security_policies")
    @classmethod
    def _no_repeats(cls, value: list[SecurityPolicyName]) -> list[SecurityPolicyName]:
        repeated = sorted({p for p in value if value.count(p) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed more than once")
        return value

    @field_validator("application_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        if value is not None and (":" not in value or value != value.strip()):
            raise ValueError(f"expected a URI such as `urn:plant1:opstwin:gateway`, got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> OpcuaServerConfig:
        seen: set[str] = set()
        for i, user in enumerate(self.users):
            if user.username in seen:
                raise ValueError(f"users[{i}]: username {user.username!r} is listed twice")
            seen.add(user.username)
        if self.users and self.security_policies == ["None"]:
            raise ValueError(
                "with only the `None` security policy, passwords would cross the network in "
                "plain text: add `Basic256Sha256_SignAndEncrypt` to `security_policies`"
            )
        # An enabled server with neither `users` nor anonymous access is not refused here:
        # its users may be in control.db (`opstwin user add`), which the config cannot see.
        return self
