"""A real mosquitto broker for tests (`gateway/demo/broker.py`'s, which the demo and the sync
benchmark use too), on a port of the test's choosing.

Tests that exercise the MQTT sync and the cloud mirror talk to a real broker (the contract is
the wire, and a fake broker would only agree with our own misreadings of it). The broker can be
stopped and restarted on the same port, killed, or started with a password file.
"""

from __future__ import annotations

from pathlib import Path

from gateway.demo.broker import LocalBroker, mosquitto_binary, mosquitto_passwd_binary

__all__ = ["MOSQUITTO_HINT", "Mosquitto", "mosquitto_binary", "mosquitto_passwd_binary"]

MOSQUITTO_HINT = "mosquitto not installed: run scripts/bootstrap (apt-get install mosquitto)"


class Mosquitto(LocalBroker):
    """A LocalBroker with the port first, as the tests name it."""

    def __init__(
        self,
        port: int,
        workdir: Path,
        *,
        passwords: dict[str, str] | None = None,
        extra_config: str = "",
    ) -> None:
        super().__init__(workdir, port, passwords=passwords, extra_config=extra_config)
