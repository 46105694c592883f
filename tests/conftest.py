"""Fixtures shared by the unit and integration tests.

What is expensive to make and only read by tests (a compiled kernel, certificates) is made once
per session; what a test may change is made per test, or copied from the session's original.
Plain helpers are in tests_support.py, so that helper classes can use them as well.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from asyncua.crypto import cert_gen
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from mqtt_support import MOSQUITTO_HINT, Mosquitto, mosquitto_binary
from native_kernel import HAVE_GCC, build
from tests_support import SCADA_CLIENT_URI, ClientPki, FakeClock, free_port


@pytest.fixture
def fake_clock() -> FakeClock:
    """Give the test a clock that moves only when it says so."""
    return FakeClock()


@pytest.fixture(scope="session")
def simkernel(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """Compile the C kernel (native/) with -Werror once per session and import it."""
    if not HAVE_GCC:
        pytest.skip("gcc not found: cannot build the C kernel")
    return build(tmp_path_factory.mktemp("simkernel"))


@pytest.fixture(scope="session")
def opcua_certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Make, once per session, the PKI folders a gateway and an OPC UA client would make.

    `gateway/` is a gateway's `pki_dir` holding its OPC UA server certificate (for the default
    application URI), `client/` a client's holding `own/cert.der` and `own/key.pem`. Tests copy
    them with `install_pki` and never write here.
    """
    # Imported here so that a unit-test run never loads asyncua and cryptography for nothing.
    from drivers.opcua.security import ensure_client_certificate
    from gateway.opcua_server.server import default_app_uri, ensure_certificate

    root = tmp_path_factory.mktemp("opcua-pki")
    ensure_certificate(
        root / "gateway" / "opcua-server",
        default_app_uri(),
        "OpsTwin Gateway (tests)",
        [socket.gethostname(), "localhost", "127.0.0.1"],
    )
    ensure_client_certificate(root / "client", "urn:test:scada")
    return root


@pytest.fixture
def install_pki(opcua_certificates: Path) -> Callable[[str, Path], Path]:
    """Copy one of the session's PKI folders (`gateway` or `client`) to where a test wants it."""

    def install(which: str, dest: Path) -> Path:
        # A copy, not the folder itself: drivers pin server certificates into their pki_dir.
        shutil.copytree(opcua_certificates / which, dest)
        return dest

    return install


@pytest.fixture(scope="session")
def client_pki(tmp_path_factory: pytest.TempPathFactory) -> ClientPki:
    """One SCADA client certificate for every test: RSA key generation is the slow part."""
    folder = tmp_path_factory.mktemp("scada-pki")
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key,
        "scada",
        {},
        [x509.UniformResourceIdentifier(SCADA_CLIENT_URI), x509.DNSName(socket.gethostname())],
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    pki = ClientPki(folder / "cert.der", folder / "key.pem")
    pki.cert.write_bytes(cert.public_bytes(Encoding.DER))
    pki.key.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return pki


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real mosquitto broker on a free port, anonymous, stopped after the test.

    The test may stop, kill or restart it (same port). Skipped only when the binary is absent:
    CI installs it through scripts/bootstrap.
    """
    if mosquitto_binary() is None:
        pytest.skip(MOSQUITTO_HINT)
    broker = Mosquitto(free_port(), tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()
