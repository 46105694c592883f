"""Requests split into batches the server accepts, and what the driver learned about its limits.

A server states its per-call limits (OperationLimits), or states none (absent, or 0 for "no
limit"), or states more than it really takes and answers BadTooManyOperations. The batch size
starts from what the options or the server say and halves on every such refusal; the size that
worked is remembered for the rest of the driver's life, across reconnections, because asking
again at a refused size would cost a refused request every time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from asyncua import ua

from drivers.errors import ConnectionLostError

__all__ = [
    "CREATE_ITEMS",
    "DEFAULT_ITEMS_PER_CALL",
    "DEFAULT_NODES_PER_READ",
    "READ",
    "OperationLimits",
]

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Result = TypeVar("Result")

# Used when the server does not state its OperationLimits: large enough to need few requests,
# small enough for any server's message size.
DEFAULT_NODES_PER_READ = 1000
DEFAULT_ITEMS_PER_CALL = 1000

#: Service names, as the batch sizes and counters are keyed.
READ = "Read"
CREATE_ITEMS = "CreateMonitoredItems"

_TOO_MANY = ua.StatusCodes.BadTooManyOperations


class OperationLimits:
    """Batch sizes per service, with counts of the requests sent (for tests and metrics)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._size = {READ: DEFAULT_NODES_PER_READ, CREATE_ITEMS: DEFAULT_ITEMS_PER_CALL}
        self._learned: dict[str, int] = {}  # service -> largest batch not refused
        #: Requests sent per service since start, refused ones included.
        self.calls: dict[str, int] = {}
        #: Largest batch sent per service since start.
        self.largest: dict[str, int] = {}

    def size(self, service: str) -> int:
        """Items per request of `service` on the current connection."""
        return self._size[service]

    def set_stated(self, service: str, stated: int) -> None:
        """Take the size the options or the server state, unless a refusal taught a smaller one."""
        self._size[service] = min(stated, self._learned.get(service, stated))

    async def send(
        self,
        service: str,
        requests: Sequence[Request],
        send: Callable[[list[Request]], Awaitable[list[Result]]],
    ) -> list[Result]:
        """Send `requests` in batches; halve the batch while the server says too many."""
        results: list[Result] = []
        start = 0
        while start < len(requests):
            size = self._size[service]
            batch = list(requests[start : start + size])
            self.calls[service] = self.calls.get(service, 0) + 1
            self.largest[service] = max(self.largest.get(service, 0), len(batch))
            try:
                answer = await send(batch)
            except ua.UaStatusCodeError as exc:
                if exc.code != _TOO_MANY or size == 1:
                    raise
                smaller = max(size // 2, 1)
                self._learned[service] = smaller
                self._size[service] = min(size, smaller)
                log.info(
                    "%s: %s of %d items refused as too many; trying %d per request",
                    self.name,
                    service,
                    len(batch),
                    smaller,
                )
                continue
            if len(answer) != len(batch):
                raise ConnectionLostError(
                    f"{self.name}: {service} answered {len(answer)} results for {len(batch)} items"
                )
            results.extend(answer)
            start += len(batch)
        return results
