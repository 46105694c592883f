"""The appliance's unit file: systemd's own checks of it, and the one hardening setting that a
wrong guess would turn into a crash at start (MemoryDenyWriteExecute), tried for real.

These machines have no systemd as PID 1, so the unit is never started here: `systemd-analyze`
(scripts/bootstrap installs systemd's tools when missing) checks its syntax and rates its
exposure offline, and the kernel's own form of MemoryDenyWriteExecute, `prctl(PR_SET_MDWE)`,
runs the gateway's native parts with writable-and-executable memory refused.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "opstwin-gateway.service"
OPSTWIN = Path(sys.executable).with_name("opstwin")
MAX_EXPOSURE = 2.0


def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing: run scripts/bootstrap (Debian package systemd)")
    return found


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # The unit names the installed paths (/opt/opstwin/...), which a checkout does not have:
    # a copy naming this virtualenv's opstwin instead, everything else as shipped.
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/opstwin/.venv/bin/opstwin", str(OPSTWIN)))
    run = subprocess.run(
        [analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    ours = [line for line in (run.stdout + run.stderr).splitlines() if UNIT.name in line]
    assert run.returncode == 0 and not ours, run.stdout + run.stderr


def test_the_units_exposure_is_at_most_two() -> None:
    run = subprocess.run(
        [analyze(), "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", run.stdout)
    assert found, run.stdout + run.stderr
    assert float(found[1]) <= MAX_EXPOSURE, run.stdout


def test_every_setting_is_explained() -> None:
    """A comment says why for every group of settings: no line of the [Service] section is
    more than a few settings away from the comment above it."""
    service = UNIT.read_text().split("[Service]", 1)[1].split("[Install]", 1)[0]
    since_comment = 0
    for line in service.splitlines():
        if line.startswith("#"):
            since_comment = 0
        elif line.strip():
            since_comment += 1
            assert since_comment <= 9, f"no comment near {line!r}"
    for setting in (
        "UMask=0077",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectKernelLogs=yes",
        "ProtectProc=invisible",
        "PrivateUsers=yes",
        "MemoryDenyWriteExecute=yes",
        "DevicePolicy=closed",
        "LimitNOFILE=",
        "MemoryMax=",
    ):
        assert setting in service, setting


MDWE = textwrap.dedent(
    """
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN: what MemoryDenyWriteExecute= asks of the kernel.
    if libc.prctl(65, 1, 0, 0, 0) != 0:
        sys.exit("prctl(PR_SET_MDWE): " + os.strerror(ctypes.get_errno()))
    os.execv(sys.argv[1], sys.argv[1:])
    """
)


def under_mdwe(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", MDWE, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_writable_executable_memory_is_really_refused_under_mdwe() -> None:
    """The control: without it the next test could pass on a kernel that ignores the flag."""
    probe = textwrap.dedent(
        """
        import mmap
        try:
            mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except PermissionError:
            print("refused")
        else:
            print("allowed")
        """
    )
    run = under_mdwe(sys.executable, "-c", probe)
    if "PR_SET_MDWE" in run.stderr:
        pytest.fail(f"this kernel has no PR_SET_MDWE (Linux >= 6.3 needed): {run.stderr}")
    assert run.stdout.strip() == "refused", run.stdout + run.stderr


def test_the_gateways_native_parts_run_without_writable_executable_memory(
    tmp_path: Path,
) -> None:
    """The C kernel (cffi), argon2, the OPC UA PKI (cryptography), SQLite, orjson and numpy, as
    `opstwin` runs them, with MemoryDenyWriteExecute's refusal in force."""
    scenario = ROOT / "gateway" / "demo" / "oven-scenario.yaml"
    run = under_mdwe(str(OPSTWIN), "sim", "run", str(scenario), "--backend", "native", "--json")
    assert run.returncode == 0, run.stderr
    assert '"paths_run"' in run.stdout or '"paths"' in run.stdout, run.stdout[:500]
    run = under_mdwe(str(OPSTWIN), "hash-password", stdin="correct horse battery\n")
    assert run.returncode == 0 and run.stdout.startswith("$argon2"), run.stdout + run.stderr
    script = textwrap.dedent(
        f"""
        import asyncio, orjson, sqlite3
        from pathlib import Path
        from drivers.opcua.security import ensure_client_certificate
        from gateway.control.db import ControlDB
        from gateway.control.users import AccountStore
        from gateway.auth.rbac import Grant
        from gateway.web.render import environment

        pki = Path({str(tmp_path)!r}) / "pki"
        ensure_client_certificate(pki, "urn:test:mdwe")
        with ControlDB(Path({str(tmp_path)!r}) / "control.db") as db:
            AccountStore(db).add_user("sam", "correct horse battery", [Grant(role="admin")])
        environment().get_template("login.html")
        print(orjson.dumps({{"ok": True}}).decode())
        """
    )
    run = under_mdwe(sys.executable, "-c", script)
    assert run.returncode == 0 and '{"ok":true}' in run.stdout, run.stdout + run.stderr
