"""Bench signals: N doubles that all change on every update, for throughput measurements.

Signal i is 50 + 40 sin(2 pi 0.1 Hz t + phase_i) plus Gaussian noise (sigma 0.5): every value
differs from the one before, so every update is a data change a subscription must deliver. Pure
and seeded.
"""

from __future__ import annotations

import math
import random

_FREQ_HZ = 0.1
_OFFSET = 50.0
_AMPLITUDE = 40.0
_NOISE = 0.5


class BenchSignals:
    """`n` sine-plus-noise signals with per-signal phases."""

    def __init__(self, n: int, seed: int = 0) -> None:
        """Create `n` signals; the same seed gives the same phases and noise."""
        if n < 0:
            raise ValueError(f"bench: negative signal count {n}")
        self.n = n
        self._rng = random.Random(f"bench/{seed}")
        self._phases = [self._rng.uniform(0.0, 2.0 * math.pi) for _ in range(n)]

    def values(self, t: float) -> list[float]:
        """Return every signal's value at time `t` (s); each call draws fresh noise."""
        angle = 2.0 * math.pi * _FREQ_HZ * t
        sin, gauss = math.sin, self._rng.gauss
        return [_OFFSET + _AMPLITUDE * sin(angle + p) + gauss(0.0, _NOISE) for p in self._phases]
