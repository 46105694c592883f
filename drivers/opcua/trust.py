"""Secured sessions: checking the server's certificate, pinning it on first use, and saying
why a server refused the gateway's certificate or credentials.

The trust rule (trust on first use, like SSH host keys) and the files it keeps are described in
`drivers.opcua.security`, which blocks and is called here off the event loop. This is the
session-time half: the certificate is compared before any credentials are sent, and pinned
only after the session really came up, so a failed first attempt pins nothing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from asyncua import Client, ua
from asyncua.crypto import security_policies

from drivers.errors import ConfigurationError, DeviceResponseError
from drivers.opcua.convert import status_name
from drivers.opcua.options import OpcuaOptions
from drivers.opcua.security import (
    ensure_client_certificate,
    first_certificate,
    load_certificate_file,
    pin_path,
    read_pin,
    thumbprint,
    write_pin,
)

__all__ = ["SessionTrust", "explain_refusal", "pin_on_first_use", "prepare_security"]

log = logging.getLogger(__name__)

_AUTH_CODES = frozenset(
    {
        ua.StatusCodes.BadUserAccessDenied,
        ua.StatusCodes.BadIdentityTokenRejected,
        ua.StatusCodes.BadIdentityTokenInvalid,
    }
)
_CERT_CODES = frozenset(
    {
        ua.StatusCodes.BadCertificateUntrusted,
        ua.StatusCodes.BadSecurityChecksFailed,
        ua.StatusCodes.BadCertificateInvalid,
        ua.StatusCodes.BadCertificateUriInvalid,
        ua.StatusCodes.BadCertificateTimeInvalid,
        ua.StatusCodes.BadCertificateRevoked,
    }
)


@dataclass(frozen=True, slots=True)
class SessionTrust:
    """What securing one session settled: the client's thumbprint and a pin still to write."""

    client_thumbprint: str
    server_der: bytes
    #: Where to pin `server_der` once connected; None when it is pinned or configured already.
    pin_at: Path | None


async def prepare_security(
    client: Client, name: str, endpoint: str, options: OpcuaOptions, pki_dir: Path | None
) -> SessionTrust:
    """Choose the secured endpoint, check the server's certificate and set up `client`'s keys."""
    if pki_dir is None:
        raise ConfigurationError(
            f"{name}: security_mode {options.security_mode} needs a folder for the "
            "client certificate (pki_dir), and the driver was given none"
        )
    own = await asyncio.to_thread(ensure_client_certificate, pki_dir, options.application_uri)
    pinned_at: Path | None = None
    if options.server_certificate is not None:
        expected: bytes | None = await asyncio.to_thread(
            load_certificate_file, options.server_certificate
        )
        source = f"server_certificate {options.server_certificate}"
    else:
        pinned_at = pin_path(pki_dir, endpoint)
        expected = await asyncio.to_thread(read_pin, pinned_at)
        source = f"the certificate pinned at {pinned_at}"
    mode = getattr(ua.MessageSecurityMode, options.security_mode)
    policy = security_policies.SecurityPolicyBasic256Sha256
    try:
        endpoints = await client.connect_and_get_server_endpoints()
    except TimeoutError:
        raise ConnectionError(f"{endpoint}: no answer within {options.timeout_s:g} s") from None
    try:
        chosen = Client.find_endpoint(endpoints, mode, policy.URI)
    except ua.UaError:
        offered = sorted(
            {f"{e.SecurityPolicyUri.rsplit('#', 1)[-1]} {e.SecurityMode.name}" for e in endpoints}
        )
        raise DeviceResponseError(
            f"{name}: {endpoint} offers no {options.security_policy} "
            f"{options.security_mode} endpoint (it offers: {', '.join(offered)})"
        ) from None
    server_der = first_certificate(chosen.ServerCertificate or b"")
    if not server_der:
        raise DeviceResponseError(f"{name}: {endpoint} presents no server certificate")
    if expected is not None and first_certificate(expected) != server_der:
        raise DeviceResponseError(
            f"{name}: {endpoint} presents a certificate with SHA-1 thumbprint "
            f"{thumbprint(server_der)}, not {source} ({thumbprint(expected)}); refusing "
            "to connect. If the server's certificate was renewed on purpose, delete the "
            "pinned file (or point server_certificate at the new one)."
        )
    await client.set_security(
        policy,
        certificate=str(own.cert),
        private_key=str(own.key),
        server_certificate=server_der,
        mode=mode,
    )
    pin_at = pinned_at if expected is None else None
    return SessionTrust(own.thumbprint, server_der, pin_at)


async def pin_on_first_use(trust: SessionTrust, name: str, endpoint: str) -> None:
    """Pin the server certificate of a session that just came up, if nothing was pinned yet."""
    if trust.pin_at is None:
        return
    await asyncio.to_thread(write_pin, trust.pin_at, trust.server_der)
    log.warning(
        "%s: trusting the server certificate of %s on first use (SHA-1 thumbprint %s); "
        "pinned at %s. A different certificate will be refused until that file is deleted.",
        name,
        endpoint,
        thumbprint(trust.server_der),
        trust.pin_at,
    )


def explain_refusal(
    exc: ua.UaStatusCodeError,
    name: str,
    options: OpcuaOptions,
    pki_dir: Path | None,
    client_thumbprint: str | None,
) -> Exception:
    """Turn the status a server refused a session with into an error that says what to do."""
    code = exc.code
    status = status_name(code)
    if code in _AUTH_CODES:
        if options.username is None:
            return DeviceResponseError(
                f"{name}: the server refused anonymous access: {status} (it needs a "
                "username and password)"
            )
        return DeviceResponseError(
            f"{name}: the server refused user {options.username!r}: {status} (check "
            "username and password)"
        )
    if code in _CERT_CODES:
        own = pki_dir / "own" / "cert.der" if pki_dir else "it"
        thumb = f", SHA-1 {client_thumbprint}" if client_thumbprint else ""
        return DeviceResponseError(
            f"{name}: the server refused the gateway's client certificate: {status} "
            f"(trust {own}{thumb} on the server)"
        )
    return DeviceResponseError(f"{name}: the server refused the connection: {status}")
