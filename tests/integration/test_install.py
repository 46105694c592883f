"""scripts/install in a throwaway root: install, upgrade (and its rollback), uninstall.

No systemd runs as PID 1 here, and neither a container nor a chroot is available: the script
runs with OPSTWIN_ROOT set to a folder under tmp_path (its /opt, /etc, /var/lib and
/etc/systemd/system are in there) and SYSTEMCTL set to tests/fake_systemctl.py, which runs the
installed unit's ExecStartPre= and ExecStart= lines as real processes with a real sd_notify
socket. So the gateway that answers /health is the real one, from the virtualenv the script
built with pip (dependencies, C kernel compiled and all).

Not covered here: real systemd (the unit's sandbox: DynamicUser=, ProtectSystem=, DeviceAllow=
and the drop-in narrowing it, the start timeout, Restart=, journald), apt-get (a test root only
checks that the build's packages are present), the checks for root and for systemd as PID 1,
and the ownership of files the dynamic user owns (the backup keeps owners, here always the
test's own user).

A virtualenv built from nothing costs 40-90 s here (pip unpacking ~190 MB of wheels on a busy
2-core machine); one that reuses the packages of another (what upgrade does, and an install
after a refused config) 15-30 s. So one root is shared by the tests in file order: an install
refused for a broken config, the install after it, upgrade, a failed upgrade, uninstall.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from tests_support import free_port

from gateway import __version__
from gateway.config import load_config
from gateway.twin.schema import SCHEMA_VERSION

# Builds and starts take minutes on a busy machine: far above the suite's 120 s default, which
# would count the shared fixture's two builds against whichever test comes first.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
# Overridable to run these tests against a modified copy (does each fail when the script errs?).
SCRIPT = Path(os.environ.get("OPSTWIN_INSTALL_SCRIPT") or REPO / "scripts" / "install")
FAKE_SYSTEMCTL = REPO / "tests" / "fake_systemctl.py"
TEMPLATE = REPO / "systemd" / "site.yaml.example"
UNIT = "opstwin-gateway.service"
POINT = "lab/bench/temperature"
BUILD_TIMEOUT_S = 600  # one run of the script: a venv build, a start, maybe a rollback


def load_script() -> ModuleType:
    """scripts/install as a module (it has no .py suffix), for its helpers."""
    loader = importlib.machinery.SourceFileLoader("opstwin_install_script", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # dataclasses look their module up
    loader.exec_module(module)
    return module


script = load_script()


@dataclass
class Root:
    """A throwaway root, the environment that points scripts/install into it, and its port."""

    path: Path
    env: dict[str, str]
    port: int

    @property
    def site(self) -> Path:
        return self.path / "etc/opstwin/site.yaml"

    @property
    def venv(self) -> Path:
        return self.path / "opt/opstwin/.venv"

    @property
    def state(self) -> Path:
        return self.path / "var/lib/opstwin"

    @property
    def unit(self) -> Path:
        return self.path / "etc/systemd/system" / UNIT

    def install(self, *args: str, source: Path = REPO) -> subprocess.CompletedProcess[str]:
        """Run scripts/install with this root's environment."""
        return subprocess.run(
            [sys.executable, str(SCRIPT), *args],
            env={**self.env, "OPSTWIN_SOURCE": str(source)},
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )

    def calls(self) -> list[list[str]]:
        """Every systemctl call so far."""
        log = self.path / "run/fake-systemd/calls.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def journal(self) -> str:
        """What the service and its supervisor printed."""
        journal = self.path / f"run/fake-systemd/{UNIT}.journal"
        return journal.read_text(errors="replace") if journal.exists() else ""

    def opstwin(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """The installed `opstwin` command, as an operator on the PC runs it."""
        return subprocess.run(
            [str(self.venv / "bin/opstwin"), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def get(self, path: str, token: str | None = None) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.load(answer)

    def ingest(self, token: str, value: float) -> Any:
        body = json.dumps({"items": [{"point": POINT, "value": value}]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/telemetry/ingest",
            data=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.load(answer)

    def stop(self) -> None:
        """Stop whatever gateway the fake systemd runs (test teardown)."""
        subprocess.run(
            [sys.executable, str(FAKE_SYSTEMCTL), str(self.path), "stop", UNIT],
            capture_output=True,
            timeout=120,
        )


def make_root(base: Path, template_text: str) -> Root:
    """A root folder, a fake systemctl for it, and a site template with a free port."""
    root = base / "root"
    root.mkdir()
    port = free_port()
    assert template_text.count("port: 8000\n") == 1
    template = base / "site.yaml.example"
    template.write_text(template_text.replace("port: 8000\n", f"port: {port}\n"))
    systemctl = base / "systemctl"
    systemctl.write_text(
        f'#!/bin/sh\nexec {sys.executable} {FAKE_SYSTEMCTL} {root} "$@"\n', encoding="utf-8"
    )
    systemctl.chmod(0o755)
    env = {
        **os.environ,
        "OPSTWIN_ROOT": str(root),
        "SYSTEMCTL": str(systemctl),
        # The interpreter these tests run on (>= 3.11, with venv and headers: scripts/bootstrap).
        "OPSTWIN_PYTHON": sys.executable,
        "OPSTWIN_SITE_TEMPLATE": str(template),
        "OPSTWIN_HEALTH_TIMEOUT": "120",
    }
    return Root(root, env, port)


def template_with_a_pushed_point() -> str:
    """The shipped template with one device whose values the test pushes over HTTP."""
    text = TEMPLATE.read_text()
    assert text.count("\ndevices: []\n") == 1
    device = (
        "\ndevices:\n"
        "  - name: lab-pusher\n"
        "    driver: http\n"
        "    points:\n"
        f"      - {{id: {POINT}, datatype: float64, unit: °C}}\n"
    )
    return text.replace("\ndevices: []\n", device)


def release(base: Path, version: str, *, broken: bool = False) -> Path:
    """A copy of this source tree as a release with another version (and maybe a fault)."""
    tree = base / f"release-{version}"
    shutil.copytree(REPO, tree, ignore=script.BUILD_IGNORE, symlinks=True)
    init = tree / "gateway/__init__.py"
    text, found = re.subn(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text())
    assert found == 1
    init.write_text(text)
    if broken:
        with (tree / "gateway/twin/schema.py").open("a") as schema:
            schema.write(BROKEN_RELEASE)
    return tree


# A faulty release, the worst case an upgrade must undo: it migrates the twin database to a
# schema the installed code does not know (which refuses a database newer than itself), then
# fails to start. `opstwin check` passes: the fault shows only when the gateway opens the twin.
BROKEN_RELEASE = """

# -- appended by tests/integration/test_install.py: a faulty release -------------------------------
def _m_injected(db):
    db.execute("CREATE TABLE injected_release (note TEXT)")


MIGRATIONS.append((SCHEMA_VERSION + 1, "injected by test_install", _m_injected))
SCHEMA_VERSION = MIGRATIONS[-1][0]
_released_migrate = migrate


def migrate(conn, *args, **kwargs):
    import sys as _sys

    version = _released_migrate(conn, *args, **kwargs)
    print(f"injected fault: twin migrated to schema {version}, now failing", file=_sys.stderr)
    raise StoreError(f"injected fault after migrating the twin to schema {version}")
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def venv_version(venv: Path) -> str:
    done = subprocess.run(
        [str(venv / "bin/python"), "-I", "-m", "gateway.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1]


def twin_schema(db: Path) -> tuple[int, bool]:
    """The twin database's newest migration, and whether the faulty release's table is there."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        version = conn.execute("SELECT max(version) FROM _migrations").fetchone()[0]
        injected = conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE name = 'injected_release'"
        ).fetchone()[0]
    finally:
        conn.close()
    return int(version), bool(injected)


def explain(done: subprocess.CompletedProcess[str], root: Root) -> str:
    return f"{done.stdout}\n{done.stderr}\n--- journal ---\n{root.journal()[-4000:]}"


# -- one installed root, taken through install, upgrade, a failed upgrade and uninstall ------------


@dataclass
class Installed:
    """The shared root, and what happened when the fixture installed into it."""

    root: Root
    refused: subprocess.CompletedProcess[str]  # the first try, with a broken site.yaml
    broken: str  # that site.yaml
    refused_state: dict[str, Any]  # what the root held after the refusal
    first: subprocess.CompletedProcess[str]  # the install after the operator removed it
    token: str = ""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = make_root(tmp_path_factory.mktemp("installed"), template_with_a_pushed_point())
    # An operator's own site.yaml, already in place, with a port no TCP stack has.
    root.site.parent.mkdir(parents=True)
    broken_text = (
        TEMPLATE.read_text()
        .replace("port: 8000", "port: 99999")
        .replace("/var/lib/opstwin", str(root.state))
    )
    root.site.write_text(broken_text)
    try:
        refused = root.install("install")
        refused_state = {
            "site": root.site.read_text(),
            "unit": root.unit.exists(),
            "calls": root.calls(),
            "venv.new": (root.path / "opt/opstwin/.venv.new").exists(),
        }
        # The operator gives up on it and starts from the template.
        root.site.unlink()
        first = root.install("install")
        yield Installed(root, refused, broken_text, refused_state, first)
    finally:
        root.stop()


def test_a_broken_site_config_stops_the_install_before_any_start(installed: Installed) -> None:
    root, done = installed.root, installed.refused
    assert done.returncode == 1, explain(done, root)
    # The checker's own message (file, key path, what is wrong), and what to do.
    assert f"refuses {root.site}" in done.stderr
    assert "http.port" in done.stderr and "65535" in done.stderr, done.stderr
    assert "run `install` again" in done.stderr
    state = installed.refused_state
    assert state["site"] == installed.broken  # never overwritten, not even a broken one
    assert not state["unit"] and state["calls"] == []  # nothing installed, nothing started
    assert state["venv.new"]  # kept, so that the next try reuses its packages


def test_install_builds_places_and_starts_a_healthy_gateway(installed: Installed) -> None:
    root, done = installed.root, installed.first
    assert done.returncode == 0, explain(done, root)
    assert "its packages reused" in done.stdout  # the refused try's build, not a new one
    assert "wrote" in done.stdout and str(root.site) in done.stdout

    # The code: a virtualenv at its final path, whose scripts name that path, C kernel built.
    assert venv_version(root.venv) == __version__
    assert (root.venv / "bin/opstwin").read_text().startswith(f"#!{root.venv}/bin/python")
    assert not (root.path / "opt/opstwin/.venv.new").exists()
    kernels = list(root.venv.glob("lib/python3*/site-packages/gateway/_simkernel*.so"))
    assert kernels, "the C kernel was not compiled into the virtualenv"
    assert (root.path / "opt/opstwin/README.md").read_text() == (REPO / "README.md").read_text()

    # The config: from the template, its paths moved into the root, readable by the service.
    assert mode(root.site.parent) == 0o755 and mode(root.site) == 0o644
    assert str(root.state / "twin.db") in root.site.read_text()
    assert load_config(root.site).storage.path == root.state / "twin.db"

    # The unit as shipped, paths moved into the root; the drop-in allows no serial port.
    unit = root.unit.read_text()
    assert f"ExecStart={root.venv}/bin/opstwin run --config {root.site}\n" in unit
    assert unit.replace(str(root.path), "") == (REPO / "systemd" / UNIT).read_text()
    assert mode(root.unit) == 0o644
    dropin = root.unit.with_name(UNIT + ".d") / "devices.conf"
    assert [ln for ln in dropin.read_text().splitlines() if ln.startswith("DeviceAllow")] == [
        "DeviceAllow="
    ]

    # systemd was told about the unit before it was enabled and started.
    calls = [c for c in root.calls() if c[0] not in ("show", "is-active")]
    assert calls == [["daemon-reload"], ["enable", "--now", UNIT]]
    assert (root.path / f"run/fake-systemd/enabled/{UNIT}").exists()

    health = root.get("/health")
    assert health["status"] == "ok" and health["version"] == __version__, health
    assert f"http://127.0.0.1:{root.port}/health says ok" in done.stdout


def test_install_again_refuses_and_leaves_the_running_gateway(installed: Installed) -> None:
    root = installed.root
    done = root.install("install")
    assert done.returncode == 1
    assert "already installed" in done.stderr and "upgrade" in done.stderr
    assert root.get("/health")["status"] == "ok"


def test_upgrade_keeps_config_and_data(installed: Installed, tmp_path: Path) -> None:
    root = installed.root
    old = venv_version(root.venv)
    # Data written the way a site does: a token in control.db, a value in twin.db.
    made = root.opstwin(
        "token", "create", "pusher", "--grant", "executor", "--config", str(root.site)
    )
    assert made.returncode == 0, made.stderr
    installed.token = made.stdout.strip()
    assert root.ingest(installed.token, 42.5)["accepted"] == 1
    with root.site.open("a") as site:
        site.write("# edited by the operator\n")
    config_before = root.site.read_bytes()

    new = f"{__version__}.post1"
    done = root.install("upgrade", source=release(tmp_path, new))
    assert done.returncode == 0, explain(done, root)

    assert root.get("/health")["version"] == new
    assert root.site.read_bytes() == config_before
    assert root.get(f"/twin/{POINT}")["value"] == 42.5
    assert root.ingest(installed.token, 43.5)["accepted"] == 1  # the token survived too
    assert venv_version(root.venv) == new
    assert venv_version(root.path / "opt/opstwin/.venv.prev") == old
    backup = root.state / f"upgrade-backup-{old}"
    assert {"twin.db", "control.db", "databases.json"} <= {p.name for p in backup.iterdir()}
    lifecycle = [c[0] for c in root.calls() if c[0] in ("stop", "start", "daemon-reload")]
    assert lifecycle[-3:] == ["stop", "daemon-reload", "start"]


def test_upgrade_that_fails_to_start_rolls_back_code_and_databases(
    installed: Installed, tmp_path: Path
) -> None:
    root = installed.root
    if not installed.token:
        pytest.skip("needs test_upgrade_keeps_config_and_data's token")
    old = venv_version(root.venv)
    assert root.ingest(installed.token, 7.25)["accepted"] == 1

    done = root.install("upgrade", source=release(tmp_path, f"{__version__}.post2", broken=True))

    assert done.returncode == 1, explain(done, root)
    assert "did not start" in done.stderr, done.stderr
    assert "rolled back" in done.stderr and f"opstwin {old} runs again" in done.stderr
    assert "journalctl -u opstwin-gateway -n 50" in done.stderr
    # The faulty release did migrate the twin before failing: the restore is what undid it.
    assert "injected fault: twin migrated to schema" in root.journal()
    assert twin_schema(root.state / "twin.db") == (SCHEMA_VERSION, False)
    health = root.get("/health")
    assert health["version"] == old and health["status"] == "ok", health
    assert root.get(f"/twin/{POINT}")["value"] == 7.25
    assert root.ingest(installed.token, 8.0)["accepted"] == 1
    assert venv_version(root.venv) == old
    assert not (root.path / "opt/opstwin/.venv.new").exists()


def test_devices_allows_exactly_the_serial_ports_the_config_names(installed: Installed) -> None:
    root = installed.root
    serial = (
        "  - name: meter1\n"
        "    driver: modbus\n"
        "    endpoint: serial:///dev/ttyUSB7\n"
        "    points:\n"
        "      - {id: utilities/meter1/power, address: input:0, datatype: float32}\n"
    )
    text = root.site.read_text()
    assert text.count("\ndevices:\n") == 1
    root.site.write_text(text.replace("\ndevices:\n", "\ndevices:\n" + serial))
    reloads = root.calls().count(["daemon-reload"])

    done = root.install("devices")

    assert done.returncode == 0, explain(done, root)
    dropin = (root.unit.with_name(UNIT + ".d") / "devices.conf").read_text()
    allowed = [line for line in dropin.splitlines() if line.startswith("DeviceAllow")]
    assert allowed == ["DeviceAllow=", "DeviceAllow=/dev/ttyUSB7 rw"]
    assert root.calls().count(["daemon-reload"]) == reloads + 1
    assert "systemctl restart opstwin-gateway" in done.stdout  # applies at the next start


def test_uninstall_keeps_data_purge_removes_it_and_both_run_twice(installed: Installed) -> None:
    root = installed.root
    done = root.install("uninstall")
    assert done.returncode == 0, explain(done, root)
    assert ["disable", "--now", UNIT] in root.calls()
    with pytest.raises(urllib.error.URLError):
        root.get("/health")
    assert not root.unit.exists() and not root.unit.with_name(UNIT + ".d").exists()
    assert not (root.path / "opt/opstwin").exists()
    assert root.site.exists() and (root.state / "twin.db").exists()
    assert (root.state / "control.db").exists()
    assert "kept" in done.stdout

    again = root.install("uninstall")
    assert again.returncode == 0 and "nothing to remove" in again.stdout, explain(again, root)

    purged = root.install("uninstall", "--purge")
    assert purged.returncode == 0, explain(purged, root)
    assert str(root.site.parent) in purged.stdout and str(root.state) in purged.stdout
    assert not root.site.parent.exists() and not root.state.exists()
    assert root.install("uninstall", "--purge").returncode == 0


# -- refusals before anything starts ---------------------------------------------------------------


def test_a_config_the_service_cannot_read_is_refused_before_building(tmp_path: Path) -> None:
    root = make_root(tmp_path, TEMPLATE.read_text())
    root.site.parent.mkdir(parents=True)
    root.site.write_text(TEMPLATE.read_text())
    root.site.chmod(0o600)

    done = root.install("install")

    assert done.returncode == 1
    assert "dynamic user" in done.stderr and f"chmod 644 {root.site}" in done.stderr
    assert not (root.path / "opt/opstwin").exists()  # refused before any build


def test_upgrade_and_devices_without_an_install_say_so(tmp_path: Path) -> None:
    root = make_root(tmp_path, TEMPLATE.read_text())
    for command in ("upgrade", "devices"):
        done = root.install(command)
        assert done.returncode == 1 and "run `install` first" in done.stderr, done.stderr
    assert root.calls() == []


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("OPSTWIN_ROOT", "relative/root", "give an absolute path"),
        ("OPSTWIN_HEALTH_TIMEOUT", "soon", "expected seconds"),
        ("OPSTWIN_PYTHON", "/nonexistent/python3", "Python >= 3.11 is required"),
    ],
)
def test_garbage_in_the_environment_is_named(
    tmp_path: Path, variable: str, value: str, says: str
) -> None:
    root = make_root(tmp_path, TEMPLATE.read_text())
    root.env[variable] = value
    done = root.install("install")
    assert done.returncode == 1
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (root.path / "opt").exists()


def test_a_source_without_pyproject_is_refused(tmp_path: Path) -> None:
    root = make_root(tmp_path, TEMPLATE.read_text())
    done = root.install("install", source=tmp_path)
    assert done.returncode == 1 and "pyproject.toml missing" in done.stderr


def test_purge_removes_the_dynamic_users_private_state_too(tmp_path: Path) -> None:
    # With DynamicUser=yes systemd keeps the state in /var/lib/private/opstwin and links
    # /var/lib/opstwin to it; a purge that removed only the link would leave the databases.
    root = make_root(tmp_path, TEMPLATE.read_text())
    private = root.path / "var/lib/private/opstwin"
    private.mkdir(parents=True)
    (private / "twin.db").write_bytes(b"data")
    root.state.symlink_to(private)
    root.site.parent.mkdir(parents=True)
    root.site.write_text("site_id: x\n")

    done = root.install("uninstall", "--purge")

    assert done.returncode == 0, done.stderr
    assert not root.state.is_symlink() and not private.exists() and not root.site.exists()
    assert (root.path / "var/lib/private").exists()  # systemd's, not ours


# -- the template and the serial-port drop-in, without a build -------------------------------------


def test_the_template_and_its_commented_examples_pass_the_checker(tmp_path: Path) -> None:
    text = script.Layout(tmp_path).relocate(TEMPLATE.read_text())
    (tmp_path / "plain.yaml").write_text(text)
    assert load_config(tmp_path / "plain.yaml").storage.path == tmp_path / "var/lib/opstwin/twin.db"

    # The commented device list, uncommented in place of `devices: []`.
    lines = text.splitlines()
    start = lines.index("# devices:")
    examples = [line[2:] for line in lines[start:] if line.startswith("# ")]
    body = "\n".join([*lines[: lines.index("devices: []")], "devices:", *examples[1:]])
    (tmp_path / "examples.yaml").write_text(body + "\n")
    config = load_config(tmp_path / "examples.yaml")
    assert [d.name for d in config.devices] == ["tank1", "meter1", "oven-plc"]
    assert yaml.safe_load(body)["devices"][1]["endpoint"] == "serial:///dev/ttyUSB0"


def test_the_devices_dropin_narrows_the_units_serial_lines(tmp_path: Path) -> None:
    ctx = script.Context(
        layout=script.Layout(tmp_path),
        systemctl=["false"],
        python=sys.executable,
        source=REPO,
        pip_args=[],
        template=TEMPLATE,
        health_timeout=1.0,
    )
    facts = script.Facts("127.0.0.1", 8000, [], ["/dev/ttyUSB0", "/dev/serial/by-id/usb-FTDI%1"])
    script.write_dropin(ctx, facts)
    dropin = ctx.layout.dropin.read_text()
    allowed = [line for line in dropin.splitlines() if line.startswith("DeviceAllow")]
    assert allowed == [
        "DeviceAllow=",
        "DeviceAllow=/dev/ttyUSB0 rw",
        "DeviceAllow=/dev/serial/by-id/usb-FTDI%%1 rw",  # `%` is a specifier in unit files
    ]

    # systemd's own parser takes the unit with the drop-in (systemd-analyze, if present).
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        unit = tmp_path / UNIT
        shipped = (REPO / "systemd" / UNIT).read_text()
        unit.write_text(
            shipped.replace(
                "/opt/opstwin/.venv/bin/opstwin", str(Path(sys.executable).with_name("opstwin"))
            )
            + dropin  # a second [Service] section: what systemd makes of a drop-in
        )
        run = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
        ours = [line for line in (run.stdout + run.stderr).splitlines() if UNIT in line]
        assert not ours, run.stdout + run.stderr

    for bad in ("/dev/tty USB0", "COM3"):
        with pytest.raises(script.InstallError, match="a path under /dev"):
            script.write_dropin(ctx, script.Facts("127.0.0.1", 8000, [], [bad]))
