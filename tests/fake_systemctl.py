"""A stand-in for `systemctl` inside a throwaway root, for tests/integration/test_install.py.

These machines run no systemd as PID 1, so scripts/install is pointed (SYSTEMCTL=) at this
instead. It does what the script asks of systemd with real processes: `start` runs the unit's
ExecStartPre= and ExecStart= lines, as last loaded by `daemon-reload`, under a small supervisor
that holds the sd_notify socket as systemd does, and returns once the service says READY=1
(Type=notify) or fails if it exits first; `stop` sends SIGTERM (KillSignal=) and waits. Every
call is appended to `calls.log` as a JSON list, the service's output to `<unit>.journal`.

What it does not model: the unit's sandbox (DynamicUser=, ProtectSystem=, DeviceAllow=...),
Restart=, the watchdog, and unit dependencies.

Usage: fake_systemctl.py ROOT COMMAND [ARGS...]
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 90.0  # systemd's default TimeoutStartSec=
STOP_TIMEOUT_S = 30.0  # the unit's TimeoutStopSec=
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def main(argv: list[str]) -> int:
    """Run one systemctl command against the units under ROOT."""
    root, command, *args = argv
    fake = FakeSystemd(Path(root))
    if command == "__supervise":
        return fake.supervise(args[0])
    fake.record([command, *args])
    units = [a for a in args if a.endswith(".service")]
    flags = [a for a in args if a.startswith("-")]
    if command == "daemon-reload":
        return fake.daemon_reload()
    if command in ("start", "restart") and units:
        if command == "restart":
            fake.stop(units[0])
        return fake.start(units[0])
    if command == "stop" and units:
        return fake.stop(units[0])
    if command in ("enable", "disable") and units:
        return fake.enable(units[0], command == "enable", now="--now" in flags)
    if command == "is-active" and units:
        state = fake.state(units[0])
        print(state)
        return 0 if state == "active" else 3
    if command == "is-enabled" and units:
        enabled = fake.enabled_marker(units[0]).exists()
        print("enabled" if enabled else "disabled")
        return 0 if enabled else 1
    if command == "reset-failed" and units:
        fake.file(units[0], "exit").unlink(missing_ok=True)
        return 0
    if command == "show" and units:
        print("0")  # NRestarts: this fake never restarts a service
        return 0
    print(f"fake systemctl: unsupported: {shlex.join(argv[1:])}", file=sys.stderr)
    return 1


@dataclass
class Unit:
    """What the fake needs of a service unit."""

    start_pre: list[list[str]] = field(default_factory=list)
    start: list[str] = field(default_factory=list)
    working_directory: str = "/"
    state_directories: list[str] = field(default_factory=list)


class FakeSystemd:
    """Units under ROOT/etc/systemd/system; state under ROOT/run/fake-systemd."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.units = root / "etc/systemd/system"
        self.state_dir = root / "run/fake-systemd"
        (self.state_dir / "loaded").mkdir(parents=True, exist_ok=True)
        (self.state_dir / "enabled").mkdir(parents=True, exist_ok=True)

    def record(self, argv: list[str]) -> None:
        with (self.state_dir / "calls.log").open("a") as log:
            log.write(json.dumps(argv) + "\n")

    def file(self, unit: str, kind: str) -> Path:
        return self.state_dir / f"{unit}.{kind}"

    def enabled_marker(self, unit: str) -> Path:
        return self.state_dir / "enabled" / unit

    def daemon_reload(self) -> int:
        """Load every unit as it is on disk now, with its drop-ins (what `start` then runs)."""
        loaded = self.state_dir / "loaded"
        for old in loaded.iterdir():
            old.unlink()
        for path in sorted(self.units.glob("*.service")):
            dropins = sorted(path.with_name(path.name + ".d").glob("*.conf"))
            text = "\n".join(p.read_text() for p in [path, *dropins])
            (loaded / path.name).write_text(text)
        return 0

    def load(self, unit: str) -> Unit | None:
        """The unit as last loaded; one never loaded is read from disk, as systemd does."""
        loaded = self.state_dir / "loaded" / unit
        path = loaded if loaded.exists() else self.units / unit
        if not path.exists():
            return None
        parsed, section = Unit(), ""
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
                continue
            key, _, value = line.partition("=")
            if section != "[Service]":
                continue
            if key == "ExecStartPre":
                parsed.start_pre.append(_command(value))
            elif key == "ExecStart":
                parsed.start = _command(value)
            elif key == "WorkingDirectory":
                parsed.working_directory = value.lstrip("-")
            elif key == "StateDirectory":
                parsed.state_directories += value.split()
        return parsed

    def enable(self, unit: str, enable: bool, *, now: bool) -> int:
        if not (self.units / unit).exists():
            verb = "enable" if enable else "disable"
            print(f"Failed to {verb} unit: Unit file {unit} does not exist.", file=sys.stderr)
            return 1
        if enable:
            self.enabled_marker(unit).touch()
            return self.start(unit) if now else 0
        self.enabled_marker(unit).unlink(missing_ok=True)
        return self.stop(unit) if now else 0

    def state(self, unit: str) -> str:
        """`active`, `activating`, `failed` or `inactive`, as `systemctl is-active` says."""
        pid = self._pid(unit)
        if pid is not None:
            return "active" if self.file(unit, "ready").exists() else "activating"
        exit_file = self.file(unit, "exit")
        if exit_file.exists() and exit_file.read_text().strip() != "0":
            return "failed"
        return "inactive"

    def start(self, unit: str) -> int:
        """Start the service under a supervisor; wait for READY=1 like a Type=notify start."""
        if self.state(unit) in ("active", "activating"):
            return 0
        if self.load(unit) is None:
            print(f"Failed to start {unit}: Unit {unit} not found.", file=sys.stderr)
            return 5
        for kind in ("ready", "exit", "pid"):
            self.file(unit, kind).unlink(missing_ok=True)
        with self.file(unit, "journal").open("ab") as journal:
            supervisor = subprocess.Popen(
                [sys.executable, __file__, str(self.root), "__supervise", unit],
                stdin=subprocess.DEVNULL,
                stdout=journal,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.file(unit, "supervisor").write_text(str(supervisor.pid))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.file(unit, "ready").exists():
                return 0
            if supervisor.poll() is not None or self.file(unit, "exit").exists():
                supervisor.wait()
                print(
                    f"Job for {unit} failed because the control process exited with error "
                    f'code.\nSee "systemctl status {unit}" and "journalctl -xeu {unit}" for '
                    "details.",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.1)
        self.stop(unit)
        print(f"Job for {unit} failed because a timeout was exceeded.", file=sys.stderr)
        return 1

    def stop(self, unit: str) -> int:
        """SIGTERM the service, SIGKILL it after TimeoutStopSec=, and wait for its supervisor."""
        pid = self._pid(unit)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while self._pid(unit) is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._pid(unit) is not None:
                os.kill(pid, signal.SIGKILL)
        supervisor = self.file(unit, "supervisor")
        if supervisor.exists():
            _wait_gone(int(supervisor.read_text()), STOP_TIMEOUT_S)
            supervisor.unlink()
        # A stopped service is inactive, whatever its exit code on SIGTERM.
        for kind in ("ready", "exit", "pid"):
            self.file(unit, kind).unlink(missing_ok=True)
        return 0

    def supervise(self, unit: str) -> int:
        """Run in the background: ExecStartPre=, then ExecStart= with a notify socket."""
        spec = self.load(unit)
        assert spec is not None
        for name in spec.state_directories:  # systemd makes StateDirectory= before the start
            (self.root / "var/lib" / name).mkdir(mode=0o755, parents=True, exist_ok=True)
        env = {"PATH": SERVICE_PATH, "LANG": "C.UTF-8", "INVOCATION_ID": uuid.uuid4().hex}
        cwd = spec.working_directory
        for argv in spec.start_pre:
            code = subprocess.call(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL)
            if code != 0:
                print(f"fake systemd: ExecStartPre {shlex.join(argv)} exited {code}", flush=True)
                self.file(unit, "exit").write_text(str(code))
                return 1
        # An abstract socket: a path under a pytest tmp dir can exceed sun_path's 108 bytes.
        name = f"fake-systemd-{uuid.uuid4().hex}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + name)
        sock.settimeout(0.2)
        service = subprocess.Popen(
            spec.start, cwd=cwd, env={**env, "NOTIFY_SOCKET": "@" + name}, stdin=subprocess.DEVNULL
        )
        self.file(unit, "pid").write_text(str(service.pid))
        while service.poll() is None:
            try:
                message = sock.recv(4096).decode()
            except TimeoutError:
                continue
            if "READY=1" in message.splitlines():
                self.file(unit, "ready").touch()
        self.file(unit, "pid").unlink(missing_ok=True)
        self.file(unit, "ready").unlink(missing_ok=True)
        self.file(unit, "exit").write_text(str(service.returncode))
        print(f"fake systemd: {unit} exited {service.returncode}", flush=True)
        return 0

    def _pid(self, unit: str) -> int | None:
        """The running service's pid, or None."""
        try:
            pid = int(self.file(unit, "pid").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None


def _command(value: str) -> list[str]:
    # systemd's prefixes (`-` ignore failure, `+` full privileges, ...) change nothing here.
    return shlex.split(value.lstrip("-+!:@"))


def _alive(pid: int) -> bool:
    """Whether a process runs; a zombie does not (the supervisor's parent, the `start` call,
    is gone, and whoever inherits it may reap it late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
