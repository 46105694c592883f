"""Capped exponential backoff with full jitter, as a small pure object."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays that double from `initial` up to `cap`, each drawn uniformly from [d/2, d]."""

    initial: float = 0.5
    cap: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    _attempt: int = 0

    def next_delay(self) -> float:
        """Return the delay before the next attempt and count the attempt."""
        try:
            ceiling = min(self.cap, self.initial * self.factor**self._attempt)
        except OverflowError:
            # factor**attempt leaves the float range after ~1000 attempts (about 8 hours of
            # outage at a 30 s cap); raising here would kill the supervisor for good.
            ceiling = self.cap
        self._attempt += 1
        # Half-jitter: never zero (no reconnect storms against a restarting PLC), never above cap.
        return ceiling / 2 + self.rng.random() * ceiling / 2

    def reset(self) -> None:
        """Start again from `initial` after a success."""
        self._attempt = 0

    @property
    def attempts(self) -> int:
        """Attempts counted since the last reset."""
        return self._attempt
