"""asyncua loses a deadband-filtered notification when a variable goes Bad (null value).

Starts an asyncua server on a free port with one Double variable, subscribes to it with an
absolute deadband, then serves the variable Bad (with the null value OPC UA prescribes) and Good
again, and reports which of the three changes reached the client. Needs only asyncua.

    python repro_deadband_null.py        exit 0: every change arrived; 1: one was lost

Run it once against stock asyncua (lost) and once with asyncua-deadband-null-value.patch applied
(arrives); README.md beside it says how.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from importlib.metadata import version
from typing import Any

import asyncua
from asyncua import Client, Server, ua

WAIT_S = 2.0
DEADBAND = 0.5
BAD = ua.StatusCodes.BadSensorFailure


class Notifications:
    """The subscription handler: every DataValue the client is notified of, in order."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[ua.DataValue] = asyncio.Queue()

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        """Queue the notified DataValue."""
        self.queue.put_nowait(data.monitored_item.Value)

    async def next(self) -> ua.DataValue | None:
        """Return the next notification, or None if none comes within WAIT_S."""
        try:
            return await asyncio.wait_for(self.queue.get(), WAIT_S)
        except TimeoutError:
            return None


async def main() -> int:
    """Run the reproduction; return the exit code."""
    print(f"asyncua {version('asyncua')} from {asyncua.__file__}")
    # asyncua's own log lines (and the TypeError's traceback) would bury the result: keep only
    # the errors, one line each.
    errors = _ServerErrors()
    asyncua_log = logging.getLogger("asyncua")
    asyncua_log.setLevel(logging.ERROR)
    asyncua_log.propagate = False
    asyncua_log.addHandler(errors)
    url = f"opc.tcp://127.0.0.1:{_free_port()}/repro/"
    server = Server()
    await server.init()
    server.set_endpoint(url)
    idx = await server.register_namespace("urn:repro:deadband-null")
    var = await server.nodes.objects.add_variable(idx, "Level", 1.0, ua.VariantType.Double)
    async with server, Client(url) as client:
        notifications = Notifications()
        sub = await client.create_subscription(50, notifications)
        await sub.deadband_monitor(client.get_node(var.nodeid), DEADBAND)
        first = await notifications.next()
        print(f"subscribed (absolute deadband {DEADBAND}), initial value: {_show(first)}")

        steps = [
            ("Good 5.0 (beyond the deadband)", _good(5.0)),
            (
                "Bad, null value",
                ua.DataValue(ua.Variant(None, ua.VariantType.Null), ua.StatusCode(BAD)),
            ),
            ("Good 5.0 again", _good(5.0)),
        ]
        lost = 0
        for what, dv in steps:
            await server.write_attribute_value(var.nodeid, dv)
            got = await notifications.next()
            print(f"server serves {what:32} client notified: {_show(got)}")
            for error in errors.take():
                print(f"    the server logged: {error}")
            lost += got is None
    if lost:
        print(f"FAIL: {lost} change(s) never reached the client (TypeError in the deadband check)")
        return 1
    print("OK: every change reached the client")
    return 0


class _ServerErrors(logging.Handler):
    """Keeps the exceptions asyncua logs (it swallows the datachange callback's TypeError)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def take(self) -> list[str]:
        taken, self.errors = self.errors, []
        return taken


def _good(value: float) -> ua.DataValue:
    return ua.DataValue(ua.Variant(value, ua.VariantType.Double))


def _show(dv: ua.DataValue | None) -> str:
    if dv is None:
        return f"nothing within {WAIT_S:g} s  <-- LOST"
    status = dv.StatusCode.name if dv.StatusCode is not None else "Good"
    return f"{status} {dv.Value.Value!r}" if dv.Value is not None else status


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
