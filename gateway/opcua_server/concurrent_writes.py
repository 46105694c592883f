"""Let a session's Write requests run beside its other requests, when the session asks for it.

asyncua serves one connection's requests one at a time, each to the end. A Write that becomes a
proposal waits for the policy engine (about 0.1 s; up to `propose_timeout_s` if it hangs), and
meanwhile that session's Reads and Publish responses — an HMI's whole display — would wait too,
and a second Write could not be answered BadTooManyOperations, because it would not be read
before the first was done. OPC UA matches responses to requests by id, not by order, so a Write
may be answered after requests that came later.

`install()` wraps asyncua's `UaProcessor.process_message` once per process: a Write request on a
session that has a `spawn_write(coroutine) -> bool` method is offered to it, and when it accepts
(its server then owns the task, and awaits or cancels it on stop) the connection goes on with its
next request. Sessions without that method — every other asyncua server in the process, such as
the simulated plant's — are served exactly as before.
"""

from __future__ import annotations

import functools
from typing import Any

from asyncua import ua
from asyncua.server.uaprocessor import UaProcessor
from asyncua.ua.ua_binary import nodeid_from_binary

__all__ = ["install"]

_WRITE_REQUEST = ua.NodeId(ua.ObjectIds.WriteRequest_Encoding_DefaultBinary)


def install() -> None:
    """Wrap UaProcessor.process_message so that sessions may take their Writes aside; idempotent."""
    original = UaProcessor.process_message
    if getattr(original, "_opstwin_concurrent_writes", False):
        return

    @functools.wraps(original)
    async def process_message(self: UaProcessor, seqhdr: Any, body: Any) -> Any:
        spawn = getattr(self.session, "spawn_write", None)
        if spawn is not None and _is_write(body):
            request = original(self, seqhdr, body)
            if spawn(request):
                return True  # the connection reads its next request; the Write answers later
            return await request
        return await original(self, seqhdr, body)

    process_message._opstwin_concurrent_writes = True  # type: ignore[attr-defined]
    UaProcessor.process_message = process_message


def _is_write(body: Any) -> bool:
    """Whether a message body is a WriteRequest (read from a copy: `body` is not consumed)."""
    try:
        return bool(nodeid_from_binary(body.copy()) == _WRITE_REQUEST)
    except Exception:
        return False  # malformed: asyncua's own path answers it as it always did
