"""A local mosquitto for the demo and bench/sync.py: the cloud side of sync on this machine.

The gateway itself never starts a broker (a plant's broker is the plant's); the demo does, when
mosquitto is installed, so a new user sees the cloud copy of the twin kept equal in the first
minute. Anonymous, loopback only, no persistence: nothing here is meant to outlive the run.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["INSTALL_HINT", "LocalBroker", "find_mosquitto"]

INSTALL_HINT = "sudo apt-get install -y mosquitto"


def find_mosquitto() -> str | None:
    """The mosquitto binary, or None (Debian installs it in /usr/sbin, often not on PATH)."""
    found = shutil.which("mosquitto")
    if found is None and Path("/usr/sbin/mosquitto").is_file():
        found = "/usr/sbin/mosquitto"
    return found


class LocalBroker:
    """mosquitto on 127.0.0.1:`port` (0: a free one), its config and log in `workdir`."""

    def __init__(self, workdir: Path, port: int = 0, binary: str | None = None) -> None:
        self.binary = binary or find_mosquitto()
        if self.binary is None:
            raise FileNotFoundError(f"mosquitto is not installed ({INSTALL_HINT})")
        self.workdir = workdir
        self.port = port or _free_port()
        self.log_path = workdir / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start it and wait until it accepts connections; RuntimeError with its log if not."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            f"log_dest file {self.log_path}\n"
            # Bursts of diffs from a gateway catching up must not be dropped by the broker.
            "max_queued_messages 100000\n"
            "max_inflight_messages 0\n"
        )
        self._process = subprocess.Popen(
            [str(self.binary), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        raise RuntimeError(f"mosquitto did not start on port {self.port}: {log.strip()}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
