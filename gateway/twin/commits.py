"""Waking the event loop when the twin writer commits.

Everything that leaves the process with a rev (an ETag, a `/diff` page, an SSE id, an MQTT
diff) must carry a committed rev: the store assigns revs in memory at ingest, and after a crash
the uncommitted tail's revs are handed out again for other changes. Consumers therefore wait for
the commit rather than poll for it. The writer thread calls `committed(rev)` after each commit;
at most one wake-up is queued on the loop at a time, whatever the commit rate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["CommitSignal"]


class CommitSignal:
    """The newest committed rev, as the event loop sees it, and a way to wait for the next."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_rev: Callable[[], int]) -> None:
        self._loop = loop
        self._read_rev = read_rev
        self._event = asyncio.Event()
        self._queued = False
        self.rev = read_rev()

    def committed(self, rev: int) -> None:
        """The writer committed up to `rev` (called on the writer thread)."""
        if self._queued:
            return  # the queued wake-up reads the rev when it runs, so it sees this one too
        self._queued = True
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:
            self._queued = False  # the loop is closed: nobody is waiting any more

    async def wait_past(self, rev: int) -> int:
        """Wait until a rev above `rev` is committed and return the committed rev (bound the
        wait with `asyncio.timeout`: a failing database commits nothing)."""
        while self.rev <= rev:
            await self._event.wait()
        return self.rev

    async def wait_for(self, rev: int) -> int:
        """Wait until `rev` itself is committed (rev 0: at once)."""
        return await self.wait_past(rev - 1) if rev > self.rev else self.rev

    def _wake(self) -> None:
        # Cleared before the rev is read: a commit landing in between queues another wake-up.
        self._queued = False
        self.rev = self._read_rev()
        event, self._event = self._event, asyncio.Event()
        event.set()
