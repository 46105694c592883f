"""Which client certificates the gateway's OPC UA server accepts: a trust list an admin keeps.

Layout, beside the server's own certificate in `<pki_dir>/opcua-server/`:

    trusted/    client certificates (DER or PEM, any file name) the server accepts
    rejected/   a copy of each refused client certificate, named `<common name>_<SHA-1>.der`

A client whose certificate is not in `trusted/` is refused (BadCertificateUntrusted) and its
certificate lands in `rejected/`; to let it in, an admin moves that file to `trusted/`. The server
rereads `trusted/` when the folder changes, so no restart is needed (and deleting a file there
refuses that client's next session). Certificates are matched exactly, by their SHA-256, as OPC UA
servers trust self-signed application certificates; issuer CAs are not followed.
`trust_all_clients: true` skips all of this: for demos only.

Issue 13: before this, any client certificate was accepted. The check runs when a session is
activated, on the secure channel's certificate (the one the client proved it holds the key of),
inside asyncua's synchronous activation: the folder is small and reread only when it changed,
and a refused certificate is written once, so this costs a stat per login.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from drivers.opcua.security import first_certificate, thumbprint
from gateway.errors import GatewayError
from gateway.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

__all__ = ["ClientTrust", "UntrustedCertificate"]

# Enough for every client a plant has plus the ones it tried; more would let a client that makes
# a new certificate per attempt fill the disk.
MAX_REJECTED = 100
# A refused client usually retries every few seconds: one line per certificate per interval.
_LOG_INTERVAL_S = 600.0
_CERT_SUFFIXES = (".der", ".pem", ".crt", ".cer")


class UntrustedCertificate(GatewayError):
    """A client certificate the server does not accept; `status` is the OPC UA status name."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


class ClientTrust:
    """The trust list of the server's clients: `trusted/` and `rejected/` under `folder`."""

    def __init__(
        self, folder: Path, *, trust_all: bool = False, max_rejected: int = MAX_REJECTED
    ) -> None:
        self.folder = Path(folder)
        self.trusted_dir = self.folder / "trusted"
        self.rejected_dir = self.folder / "rejected"
        self.trust_all = trust_all
        self.max_rejected = max_rejected
        self._trusted: dict[str, tuple[str, x509.Certificate]] = {}  # SHA-256 -> (file, cert)
        self._seen: tuple[tuple[str, int, int], ...] | None = None
        self._bad_files: set[tuple[str, int]] = set()
        self._lines = RateLimitedLog(log, _LOG_INTERVAL_S)

    def prepare(self) -> None:
        """Make the folders (private: they decide who may connect) and read `trusted/`; blocking."""
        for folder in (self.trusted_dir, self.rejected_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise GatewayError(
                    f"OPC UA server: cannot make the client trust folder {folder}: "
                    f"{exc.strerror or exc}; check storage.pki_dir"
                ) from exc
        self._refresh()

    def add(self, der: bytes, name: str) -> Path:
        """Trust client certificate `der` as `trusted/<name>.der`, as an admin would; blocking."""
        der = first_certificate(der)
        try:
            x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise GatewayError(f"cannot trust {name}: not a DER certificate: {exc}") from exc
        path = self.trusted_dir / f"{name}.der"
        self._write(path, der)
        return path

    def check(self, der: bytes) -> None:
        """Accept the client certificate `der`, or raise UntrustedCertificate saying why."""
        if self.trust_all:
            return
        der = first_certificate(der)  # a client may send its whole chain
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise UntrustedCertificate(
                f"the client sent something that is not an X.509 certificate: {exc}",
                "BadCertificateInvalid",
            ) from exc
        self._refresh()
        found = self._trusted.get(hashlib.sha256(der).hexdigest())
        if found is None:
            raise self._reject(der, cert)
        name = found[0]
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise UntrustedCertificate(
                f"trusted client certificate {self.trusted_dir / name} ({_subject(cert)}) is "
                f"valid from {cert.not_valid_before_utc:%Y-%m-%d} to "
                f"{cert.not_valid_after_utc:%Y-%m-%d}: expired or not yet valid; the client "
                "needs a new certificate, which an admin then puts in trusted/",
                "BadCertificateTimeInvalid",
            )

    # -- helpers ----------------------------------------------------------------------------------

    def _reject(self, der: bytes, cert: x509.Certificate) -> UntrustedCertificate:
        sha1 = thumbprint(der)
        path = self.rejected_dir / f"{_file_stem(cert)}_{sha1}.der"
        kept = self._keep(path, der)
        where = (
            f"a copy is in {path}: to let this client in, move it to {self.trusted_dir}/"
            if kept
            else f"to let this client in, put its certificate in {self.trusted_dir}/"
        )
        self._lines.log(
            logging.WARNING,
            f"untrusted:{sha1}",
            "OPC UA client refused: its certificate is not trusted (%s, SHA-1 thumbprint %s); %s",
            _subject(cert),
            sha1,
            where,
        )
        return UntrustedCertificate(
            f"client certificate {sha1} ({_subject(cert)}) is not in {self.trusted_dir}",
            "BadCertificateUntrusted",
        )

    def _keep(self, path: Path, der: bytes) -> bool:
        if path.exists():
            return True
        try:
            kept = sum(1 for _ in self.rejected_dir.iterdir())
            if kept >= self.max_rejected:
                self._lines.log(
                    logging.WARNING,
                    "rejected-full",
                    "OPC UA server: %s holds %d refused client certificates; not keeping more "
                    "(delete the ones nobody will trust)",
                    self.rejected_dir,
                    kept,
                )
                return False
            self._write(path, der)
        except OSError as exc:
            self._lines.log(
                logging.WARNING,
                "rejected-io",
                "OPC UA server: cannot keep a refused client certificate in %s: %s",
                self.rejected_dir,
                exc.strerror or exc,
            )
            return False
        return True

    @staticmethod
    def _write(path: Path, der: bytes) -> None:
        # Owner-only like the folder; written whole or not at all (the server may be reading).
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, der)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _refresh(self) -> None:
        # The listing, not the folder's mtime: that moves in clock ticks of a few ms, and a
        # file moved in within the same tick as the last read would go unnoticed.
        try:
            with os.scandir(self.trusted_dir) as entries:
                listing = tuple(
                    sorted(
                        (e.name, (st := e.stat()).st_mtime_ns, st.st_size)
                        for e in entries
                        if not e.name.startswith(".") and e.name.lower().endswith(_CERT_SUFFIXES)
                    )
                )
        except OSError:
            listing = ()  # no folder: nobody is trusted (prepare() makes it)
        if listing == self._seen:
            return
        self._seen = listing
        trusted: dict[str, tuple[str, x509.Certificate]] = {}
        for name, _, _ in listing:
            path = self.trusted_dir / name
            try:
                cert = _load(path)
            except (OSError, ValueError) as exc:
                self._warn_bad_file(path, exc)
                continue
            der = cert.public_bytes(serialization.Encoding.DER)
            trusted[hashlib.sha256(der).hexdigest()] = (name, cert)
        self._trusted = trusted

    def _warn_bad_file(self, path: Path, exc: Exception) -> None:
        try:
            key = (path.name, path.stat().st_mtime_ns)
        except OSError:
            key = (path.name, 0)
        if key in self._bad_files:
            return
        self._bad_files.add(key)
        log.warning(
            "OPC UA server: %s is not a DER or PEM certificate (%s); ignored: replace it with "
            "the client's certificate file or delete it",
            path,
            exc,
        )


def _load(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def _subject(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string() or "no subject"
    except ValueError:
        return "unreadable subject"


def _file_stem(cert: x509.Certificate) -> str:
    try:
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(names[0].value) if names else "client"
    except ValueError:
        cn = "client"
    return re.sub(r"[^A-Za-z0-9.-]+", "_", cn).strip("_.")[:40] or "client"
