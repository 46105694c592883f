"""Log lines that an attacker or a broken peer can trigger, at most once per interval.

A failure that repeats thousands of times a second (a refused connection, a refused write, an
exhausted descriptor table) must cost one line per interval, not one line (or traceback) each: the
log is on the same disk as the twin. The first occurrence is logged at once; later ones within the
interval are counted and reported with the next line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """One logger call per `interval_s` for each key; the rest are counted, not written."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        self._log = logger
        self._interval = interval_s
        self._clock = clock
        self._max_keys = max_keys
        # key -> (time of the last line written, occurrences suppressed since)
        self._state: dict[str, tuple[float, int]] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log `msg % args` unless `key` was logged within the interval; return whether it was."""
        now = self._clock()
        last = self._state.get(key)
        if last is not None and now - last[0] < self._interval:
            self._state[key] = (last[0], last[1] + 1)
            return False
        if last is None and len(self._state) >= self._max_keys:
            # Keys come from peers (addresses, users): bound the table, forget the oldest.
            oldest = min(self._state, key=lambda k: self._state[k][0])
            del self._state[oldest]
        suppressed = last[1] if last is not None else 0
        if suppressed:
            msg += f" ({suppressed} more like this since the last such line, not logged)"
        self._log.log(level, msg, *args)
        self._state[key] = (now, 0)
        return True
