"""The gateway's OPC UA client certificate, and the server certificates it pinned.

Layout of the PKI folder the gateway hands the driver (its state folder):

    own/cert.der      the client certificate (self-signed, made on first use, reused after)
    own/key.pem       its private key (PKCS#8, mode 0600)
    trusted/<endpoint>.der   each server's certificate, pinned the first time it was seen

Server certificates are trusted on first use (like SSH host keys): the first secured
connection to an endpoint pins the certificate it presents; a later connection presenting a
different one is refused until the pinned file is deleted (or `server_certificate` names the
expected one). Everything here blocks (key generation, files): call it off the event loop.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

from asyncua.crypto import cert_gen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from drivers.errors import ConfigurationError

__all__ = [
    "CERT_DAYS",
    "ClientCertificate",
    "ensure_app_certificate",
    "ensure_client_certificate",
    "first_certificate",
    "load_certificate_file",
    "pin_path",
    "read_pin",
    "thumbprint",
    "write_pin",
]

log = logging.getLogger(__name__)

# Long enough that a plant is not surprised by an expiry; a server that was told to trust
# this certificate keeps trusting it as long as it is reused.
CERT_DAYS = 5 * 365
# Several drivers share one certificate: only one of them may make it.
_LOCK = threading.Lock()


class ClientCertificate:
    """Paths of the client certificate and key, and the certificate's SHA-1 thumbprint."""

    def __init__(self, cert: Path, key: Path, thumb: str) -> None:
        self.cert = cert
        self.key = key
        self.thumbprint = thumb


def ensure_client_certificate(
    pki_dir: Path, application_uri: str, host_name: str | None = None
) -> ClientCertificate:
    """Return the client certificate in `pki_dir/own/`, making key and certificate if needed."""
    return ensure_app_certificate(
        Path(pki_dir) / "own",
        application_uri,
        common_name="OpsTwin Gateway",
        hosts=[host_name or socket.gethostname()],
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )


def ensure_app_certificate(
    folder: Path,
    application_uri: str,
    *,
    common_name: str,
    hosts: Sequence[str],
    usages: Sequence[x509.ObjectIdentifier],
) -> ClientCertificate:
    """Return the application certificate in `folder`, making key and certificate if needed.

    Shared by the driver (client) and the gateway's OPC UA server. An existing pair is reused
    as long as the certificate is valid for at least another day, names `application_uri` and
    belongs to the key; otherwise a new certificate is made with the same key, and peers that
    pinned the old one must be told to trust the new one: that is logged. An unreadable key is
    refused, never replaced: peers may trust it.
    """
    cert_path, key_path = folder / "cert.der", folder / "key.pem"
    with _LOCK:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if key_path.is_file():
            try:
                key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            except (ValueError, TypeError) as exc:
                key = exc  # type: ignore[assignment]
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ConfigurationError(
                    f"{key_path}: not a readable RSA private key; move it away to make a new "
                    "key and certificate (peers will have to trust the new one)"
                )
        else:
            key = cert_gen.generate_private_key()
            _write_private(key_path, cert_gen.dump_private_key_as_pem(key))
            log.info("made a new OPC UA key at %s", key_path)
        problem = _reuse_problem(cert_path, key, application_uri)
        if problem is not None:
            names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            cert = cert_gen.generate_self_signed_app_certificate(
                key,
                common_name,
                {"organizationName": "OpsTwin Gateway"},
                names,
                extended=list(usages),
                days=CERT_DAYS,
            )
            der = cert.public_bytes(serialization.Encoding.DER)
            _write_atomic(cert_path, der, 0o644)
            log.warning(
                "made a new OPC UA certificate for %s (%s) at %s, thumbprint %s; peers that "
                "check certificates must be told to trust it",
                application_uri,
                problem,
                cert_path,
                thumbprint(der),
            )
        return ClientCertificate(cert_path, key_path, thumbprint(cert_path.read_bytes()))


def pin_path(pki_dir: Path, endpoint: str) -> Path:
    """Where the server certificate of `endpoint` is pinned."""
    readable = re.sub(r"[^A-Za-z0-9.-]+", "_", endpoint.split("://", 1)[-1]).strip("_")[:80]
    digest = hashlib.sha256(endpoint.encode()).hexdigest()[:10]
    return Path(pki_dir) / "trusted" / f"{readable}-{digest}.der"


def read_pin(path: Path) -> bytes | None:
    """The pinned certificate (DER), or None if nothing is pinned yet."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def write_pin(path: Path, der: bytes) -> None:
    """Pin a server certificate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, der, 0o644)


def load_certificate_file(path: str | Path) -> bytes:
    """Read a certificate file (DER or PEM) and return it as DER; ConfigurationError if not one."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read server_certificate {path}: {exc}") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise ConfigurationError(
            f"server_certificate {path} is not a DER or PEM certificate: {exc}"
        ) from None
    return cert.public_bytes(serialization.Encoding.DER)


def first_certificate(der: bytes) -> bytes:
    """The leading certificate of a DER blob that may hold a whole chain."""
    if len(der) > 4 and der[0] == 0x30 and der[1] == 0x82:
        return der[: int.from_bytes(der[2:4], "big") + 4]
    return der


def thumbprint(der: bytes) -> str:
    """SHA-1 thumbprint, as OPC UA tools show it (hex, upper case)."""
    return hashlib.sha1(first_certificate(der)).hexdigest().upper()


def _reuse_problem(cert_path: Path, key: rsa.RSAPrivateKey, application_uri: str) -> str | None:
    """Why the certificate at `cert_path` cannot be reused with `key`, or None if it can."""
    if not cert_path.is_file():
        return "first use"
    try:
        cert = x509.load_der_x509_certificate(cert_path.read_bytes())
    except ValueError:
        return "the old one was unreadable"
    if cert.not_valid_after_utc < dt.datetime.now(dt.UTC) + dt.timedelta(days=1):
        return "the old one expired"
    pub = cert.public_key()
    if (
        not isinstance(pub, rsa.RSAPublicKey)
        or pub.public_numbers() != key.public_key().public_numbers()
    ):
        return "the old one did not match the key"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if application_uri not in uris:
        return f"application_uri changed to {application_uri}"
    return None


def _write_private(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o600)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
