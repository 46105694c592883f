"""The client certificate made on first use and reused, and server certificate pins (files only)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from drivers.errors import ConfigurationError
from drivers.opcua.security import (
    ensure_client_certificate,
    first_certificate,
    load_certificate_file,
    pin_path,
    read_pin,
    thumbprint,
    write_pin,
)

URI = "urn:opstwin:gateway:client"


def test_certificate_is_made_on_first_use_then_reused(tmp_path: Path) -> None:
    first = ensure_client_certificate(tmp_path, URI, host_name="edge-01")
    assert first.cert == tmp_path / "own" / "cert.der"
    assert first.key == tmp_path / "own" / "key.pem"
    assert stat.S_IMODE(first.key.stat().st_mode) == 0o600
    cert = x509.load_der_x509_certificate(first.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert URI in san.get_values_for_type(x509.UniformResourceIdentifier)
    assert "edge-01" in san.get_values_for_type(x509.DNSName)
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 4 * 365

    cert_bytes, key_bytes = first.cert.read_bytes(), first.key.read_bytes()
    again = ensure_client_certificate(tmp_path, URI, host_name="edge-01")
    assert again.cert.read_bytes() == cert_bytes  # reused, not remade
    assert again.key.read_bytes() == key_bytes
    assert again.thumbprint == first.thumbprint


def test_new_application_uri_remakes_the_certificate_with_the_same_key(tmp_path: Path) -> None:
    first = ensure_client_certificate(tmp_path, URI)
    key_bytes = first.key.read_bytes()
    other = ensure_client_certificate(tmp_path, "urn:plant:other")
    assert other.thumbprint != first.thumbprint
    assert other.key.read_bytes() == key_bytes
    cert = x509.load_der_x509_certificate(other.cert.read_bytes())
    key = serialization.load_pem_private_key(key_bytes, password=None)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]


def test_pins_are_per_endpoint_and_round_trip(tmp_path: Path) -> None:
    a = pin_path(tmp_path, "opc.tcp://10.0.0.5:4840/plc")
    b = pin_path(tmp_path, "opc.tcp://10.0.0.6:4840/plc")
    assert a != b and a.parent == tmp_path / "trusted"
    assert read_pin(a) is None
    der = ensure_client_certificate(tmp_path, URI).cert.read_bytes()
    write_pin(a, der)
    assert read_pin(a) == der
    assert len(thumbprint(der)) == 40


def test_first_certificate_of_a_chain(tmp_path: Path) -> None:
    der = ensure_client_certificate(tmp_path, URI).cert.read_bytes()
    assert first_certificate(der + der) == der
    assert thumbprint(der + der) == thumbprint(der)


def test_server_certificate_file_in_der_or_pem(tmp_path: Path) -> None:
    der = ensure_client_certificate(tmp_path, URI).cert.read_bytes()
    pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    (tmp_path / "s.pem").write_bytes(pem)
    assert load_certificate_file(tmp_path / "s.pem") == der
    assert load_certificate_file(tmp_path / "own" / "cert.der") == der
    (tmp_path / "junk.der").write_bytes(b"junk")
    with pytest.raises(ConfigurationError, match="not a DER or PEM certificate"):
        load_certificate_file(tmp_path / "junk.der")
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_certificate_file(tmp_path / "missing.der")
