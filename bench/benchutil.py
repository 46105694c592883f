"""Small helpers the benchmarks share (they run as scripts: `python bench/NAME.py`)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_to_file(path: Path) -> None:
    """Log at INFO to `path`, as `opstwin run` logs (asyncua's chatter left out), so that the
    bench's table is the only thing on the terminal."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        filename=path,
    )
    logging.getLogger("asyncua").setLevel(logging.ERROR)
