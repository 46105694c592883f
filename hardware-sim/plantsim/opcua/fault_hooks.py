"""How injected faults change what the simulated PLC serves.

Each hook sits on an instance we own, never on asyncua's classes (a test process may run other
asyncua servers): the listener refuses connections while `refuse` is on, each connection delays
service requests while `slow` is on, and a `bad_status` turns a value into what a PLC sends with
that status.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from asyncua import ua
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol

from asyncua_glue.datavalue import SharedDataValue

from ..faults import OpcuaFaults, Value, is_bad
from .node_items import VARIANT_TYPES, coerce

GOOD = ua.StatusCode(ua.StatusCodes.Good)
_NULL = ua.Variant(None, ua.VariantType.Null)


def served_value(datatype: str, value: Value, status: int, now: datetime) -> ua.DataValue:
    """Return the DataValue a client gets for `value` served with status code `status`."""
    if is_bad(status):
        # OPC UA Part 4, 7.7.1: with a Bad status the value is to be ignored; servers send null.
        return SharedDataValue(_NULL, ua.StatusCode(status), now, now)
    code = GOOD if status == 0 else ua.StatusCode(status)
    variant = ua.Variant(coerce(datatype, value), VARIANT_TYPES[datatype])
    return SharedDataValue(variant, code, now, now)


class FaultyTcpServer(BinaryServer):
    """asyncua's TCP listener, with the fault hooks on every connection."""

    def __init__(
        self, iserver: Any, host: str, port: int, limits: Any, faults: OpcuaFaults
    ) -> None:
        super().__init__(iserver, host, port, limits)
        self.faults = faults

    def _make_protocol(self) -> OPCUAProtocol:
        # Private in asyncua, and the one place it builds a connection's protocol.
        return _Connection(
            self.faults,
            iserver=self.iserver,
            policies=self._policies,
            clients=self.clients,
            closing_tasks=self.closing_tasks,
            limits=self.limits,
        )


class _Connection(OPCUAProtocol):
    """One client connection: refused while `faults.refusing`, delayed while `faults.delay_s`."""

    def __init__(self, faults: OpcuaFaults, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.faults = faults

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.faults.refusing:
            transport.close()
            return
        super().connection_made(transport)
        processor = self.processor
        if processor is not None:
            processor.process = _delayed(processor.process, self.faults)


def _delayed(
    process: Callable[[Any, Any], Awaitable[bool]], faults: OpcuaFaults
) -> Callable[[Any, Any], Awaitable[bool]]:
    async def process_late(header: Any, body: Any) -> bool:
        # Service requests only (reads, writes, browse, publish, sessions): Hello and
        # OpenSecureChannel stay prompt, so a client's connect timeout measures the PLC, not us.
        if faults.delay_s and header.MessageType == ua.MessageType.SecureMessage:
            await asyncio.sleep(faults.delay_s)
        return await process(header, body)

    return process_late
