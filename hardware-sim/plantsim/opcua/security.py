"""Who may talk to the simulated PLC: security policies, a self-signed certificate, users.

Enough of a real PLC's security for the gateway's OPC UA driver to be tested against: the policies
a PLC typically offers, a certificate it makes for itself on first start (and reuses), and
username/password logins.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager
from cryptography.x509.oid import ExtendedKeyUsageOID

# `security=True` offers these; a list of names picks others (ua.SecurityPolicyType members).
SECURE_POLICIES = ("None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt")
CERT_FILE = "server_cert.der"
KEY_FILE = "server_key.pem"


def policies(security: bool | Sequence[str], name: str) -> tuple[ua.SecurityPolicyType, ...]:
    """Return the policies `security` asks for; ValueError naming the device if one is unknown."""
    if security is True:
        names: Sequence[str] = SECURE_POLICIES
    elif security is False:
        names = ("None",)
    elif isinstance(security, str):
        names = (security,)
    else:
        names = security
    out = []
    for text in names:
        key = "NoSecurity" if text == "None" else text
        policy = ua.SecurityPolicyType.__members__.get(key)
        if policy is None:
            known = ", ".join(["None", *list(ua.SecurityPolicyType.__members__)[1:]])
            raise ValueError(f"{name}: unknown security policy {text!r}; use {known}")
        out.append(policy)
    if not out:
        raise ValueError(f"{name}: no security policy; use at least None")
    return tuple(out)


async def load_certificate(server: Server, pki: Path) -> None:
    """Give `server` the certificate and key in `pki`, made there first if missing or invalid."""
    await asyncio.to_thread(pki.mkdir, parents=True, exist_ok=True)
    # Reuses a valid key and certificate from an earlier run, else makes new ones.
    await setup_self_signed_certificate(
        pki / KEY_FILE,
        pki / CERT_FILE,
        server.get_application_uri(),
        socket.gethostname(),
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        {"organizationName": "OpsTwin plantsim"},
    )
    await server.load_certificate(pki / CERT_FILE)
    await server.load_private_key(pki / KEY_FILE)


class UserTable(UserManager):
    """Username/password pairs; anything else is refused."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self.users = dict(users)

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        """Return the user if the password matches, else None (BadUserAccessDenied)."""
        expected = self.users.get(username or "")
        if expected is None or password is None:
            return None
        if not hmac.compare_digest(password.encode(), expected.encode()):
            return None
        return User(role=UserRole.User, name=username)
