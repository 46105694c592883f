"""A local mosquitto: the cloud side of sync on this machine, for the demo, bench/sync.py and the
tests (which stop, kill and restart it on the same port, or give it a password file).

The gateway itself never starts a broker (a plant's broker is the plant's); the demo does, when
mosquitto is installed, so a new user sees the cloud copy of the twin kept equal in the first
minute. Loopback only, no persistence unless asked: nothing here is meant to outlive the run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = [
    "INSTALL_HINT",
    "LocalBroker",
    "free_port",
    "mosquitto_binary",
    "mosquitto_passwd_binary",
]

INSTALL_HINT = "sudo apt-get install -y mosquitto"


def mosquitto_binary() -> str | None:
    """The mosquitto executable, or None when it is not installed.

    Debian installs it in /usr/sbin, which is not on an ordinary user's PATH.
    """
    found = shutil.which("mosquitto")
    if found:
        return found
    fallback = Path("/usr/sbin/mosquitto")
    return str(fallback) if fallback.is_file() else None


def mosquitto_passwd_binary() -> str | None:
    """The mosquitto_passwd executable, or None when it is not installed."""
    found = shutil.which("mosquitto_passwd")
    if found:
        return found
    for candidate in (Path("/usr/bin/mosquitto_passwd"), Path("/usr/sbin/mosquitto_passwd")):
        if candidate.is_file():
            return str(candidate)
    return None


class LocalBroker:
    """One mosquitto broker on 127.0.0.1:`port` (0: a free one), configured and logging into
    `workdir`."""

    def __init__(
        self,
        workdir: Path,
        port: int = 0,
        *,
        passwords: dict[str, str] | None = None,
        extra_config: str = "",
    ) -> None:
        self.port = port or free_port()
        self.workdir = Path(workdir)
        self.passwords = passwords
        self.extra_config = extra_config
        self.conf = self.workdir / "mosquitto.conf"
        self.log_file = self.workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        binary = mosquitto_binary()
        if binary is None:
            raise FileNotFoundError(f"mosquitto is not installed ({INSTALL_HINT})")
        self.binary = binary

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence false",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            # Tests publish large birth and diff payloads and queue many in-flight messages.
            "max_inflight_messages 0",
            "max_queued_messages 100000",
        ]
        if os.geteuid() == 0:
            # Run as root (a CI container), mosquitto would drop to user `mosquitto`, which
            # cannot read the test's tmp folder (log, password file); "root" keeps it as is.
            lines.append("user root")
        if self.passwords is None:
            lines.append("allow_anonymous true")
        else:
            password_file = self.workdir / "passwords"
            password_file.write_text(
                "".join(f"{user}:{password}\n" for user, password in self.passwords.items()),
                encoding="utf-8",
            )
            password_file.chmod(0o600)
            passwd = mosquitto_passwd_binary()
            if passwd is None:
                raise FileNotFoundError(f"mosquitto_passwd is not installed ({INSTALL_HINT})")
            # -U hashes a plain-text "user:password" file in place.
            subprocess.run([passwd, "-U", str(password_file)], check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        if self.extra_config:
            lines.append(self.extra_config)
        self.conf.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def start(self, timeout: float = 15.0) -> None:
        """Start the broker and return once its port accepts connections."""
        if self.running:
            return
        self._write_config()
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(
                    f"mosquitto exited with {self._proc.returncode}: {err.strip()} "
                    f"(log: {self.log_tail()})"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"mosquitto did not listen on {self.port} within {timeout}s"
                    ) from None
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker cleanly (SIGTERM) and wait for it to exit."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._close(proc)

    def kill(self) -> None:
        """Kill the broker (SIGKILL): no goodbye to its clients."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._close(proc)

    def restart(self, timeout: float = 15.0) -> None:
        """Stop the broker and start a new one on the same port."""
        self.stop()
        self.start(timeout)

    def _close(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.stderr is not None:
            proc.stderr.close()
        self._proc = None

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the broker's log, for failure messages."""
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
