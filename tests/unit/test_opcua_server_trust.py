"""Which client certificates the gateway's OPC UA server accepts: the files in `trusted/`."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from drivers.opcua.security import thumbprint
from gateway.opcua_server.trust import ClientTrust, UntrustedCertificate

NOW = dt.datetime.now(dt.UTC)


def make_cert(cn: str, *, days: int = 365, expired: bool = False) -> bytes:
    """A self-signed client certificate (DER); a small key, as only the bytes matter here."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    start = NOW - dt.timedelta(days=days + 10) if expired else NOW - dt.timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def scada() -> bytes:
    return make_cert("scada / HMI 1")


@pytest.fixture
def trust(tmp_path: Path) -> ClientTrust:
    trust = ClientTrust(tmp_path / "opcua-server")
    trust.prepare()
    return trust


def test_an_unknown_client_is_refused_and_its_certificate_kept_for_an_admin(trust, scada, caplog):
    with (
        caplog.at_level(logging.INFO, logger="gateway.opcua_server"),
        pytest.raises(UntrustedCertificate) as refused,
    ):
        trust.check(scada)
    assert refused.value.status == "BadCertificateUntrusted"
    (kept,) = trust.rejected_dir.iterdir()
    assert kept.read_bytes() == scada
    assert kept.name == f"scada_HMI_1_{thumbprint(scada)}.der"
    # One line that says what happened and what to do, with the file and the thumbprint.
    (line,) = [r.getMessage() for r in caplog.records]
    assert str(kept) in line and thumbprint(scada) in line
    assert "CN=scada / HMI 1" in line
    assert f"move it to {trust.trusted_dir}" in line

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gateway.opcua_server"):
        for _ in range(20):  # a client that retries every second
            with pytest.raises(UntrustedCertificate):
                trust.check(scada)
    assert caplog.records == []
    assert len(list(trust.rejected_dir.iterdir())) == 1


def test_a_certificate_moved_to_trusted_is_accepted_without_a_restart(trust, scada):
    with pytest.raises(UntrustedCertificate):
        trust.check(scada)
    (kept,) = trust.rejected_dir.iterdir()
    kept.rename(trust.trusted_dir / kept.name)
    trust.check(scada)
    # And taken back: removing the file refuses the client again.
    (trust.trusted_dir / kept.name).unlink()
    with pytest.raises(UntrustedCertificate):
        trust.check(scada)


def test_pem_files_are_trusted_too_and_a_bad_file_is_named_and_skipped(trust, scada, caplog):
    pem = x509.load_der_x509_certificate(scada).public_bytes(serialization.Encoding.PEM)
    (trust.trusted_dir / "scada.pem").write_bytes(pem)
    (trust.trusted_dir / "notes.der").write_text("not a certificate")
    with caplog.at_level(logging.WARNING, logger="gateway.opcua_server"):
        trust.check(scada)
        trust.check(scada)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "notes.der" in line and "not a DER or PEM certificate" in line


def test_a_trusted_certificate_that_expired_is_refused_with_the_date(trust):
    old = make_cert("old-hmi", days=30, expired=True)
    (trust.trusted_dir / "old.der").write_bytes(old)
    with pytest.raises(UntrustedCertificate) as refused:
        trust.check(old)
    assert refused.value.status == "BadCertificateTimeInvalid"
    assert "expired" in str(refused.value) and "old.der" in str(refused.value)


def test_bytes_that_are_no_certificate_are_refused_as_invalid(trust):
    with pytest.raises(UntrustedCertificate) as refused:
        trust.check(b"\x30\x03\x02\x01\x00")
    assert refused.value.status == "BadCertificateInvalid"
    assert list(trust.rejected_dir.iterdir()) == []


def test_rejected_is_bounded(tmp_path, caplog):
    trust = ClientTrust(tmp_path / "pki", max_rejected=2)
    trust.prepare()
    certs = [make_cert(f"intruder{i}") for i in range(4)]
    with caplog.at_level(logging.INFO, logger="gateway.opcua_server"):
        for der in certs:
            with pytest.raises(UntrustedCertificate):
                trust.check(der)
    assert len(list(trust.rejected_dir.iterdir())) == 2
    full = [r.getMessage() for r in caplog.records if "not keeping" in r.getMessage()]
    assert len(full) == 1 and str(trust.rejected_dir) in full[0]


def test_trust_all_clients_accepts_any_certificate(tmp_path, scada):
    trust = ClientTrust(tmp_path / "pki", trust_all=True)
    trust.prepare()
    trust.check(scada)
    assert list(trust.rejected_dir.iterdir()) == []


def test_the_folders_are_made_private(tmp_path):
    trust = ClientTrust(tmp_path / "pki")
    trust.prepare()
    for folder in (trust.trusted_dir, trust.rejected_dir):
        assert folder.is_dir() and folder.stat().st_mode & 0o077 == 0


def test_prepare_twice_keeps_what_is_trusted(tmp_path, scada):
    trust = ClientTrust(tmp_path / "pki")
    trust.prepare()
    (trust.trusted_dir / "scada.der").write_bytes(scada)
    again = ClientTrust(tmp_path / "pki")
    again.prepare()
    again.check(scada)


def test_add_trusts_a_certificate_as_an_admin_would(trust, scada):
    path = trust.add(scada, "hmi-1")
    assert path == trust.trusted_dir / "hmi-1.der" and path.read_bytes() == scada
    trust.check(scada)
