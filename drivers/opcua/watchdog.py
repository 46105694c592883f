"""When a subscription that sends nothing counts as lost. Pure: the caller passes the clock."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MIN_SILENCE_S", "SubscriptionWatchdog", "silence_limit_s"]

# Below this, event-loop hiccups and GC pauses would pass for a dead subscription.
MIN_SILENCE_S = 1.0


def silence_limit_s(
    publishing_interval_ms: float,
    keepalive_count: int,
    factor: float,
    floor_s: float = MIN_SILENCE_S,
) -> float:
    """Seconds without data or keep-alive after which a subscription is treated as lost.

    A healthy server sends at least one message (data or an empty keep-alive) every
    `publishing_interval_ms * keepalive_count`; waiting `factor` such periods tolerates one
    late or lost keep-alive without waiting for minutes.
    """
    if publishing_interval_ms <= 0 or keepalive_count < 1 or factor <= 0:
        raise ValueError(
            "publishing interval, keep-alive count and factor must be positive, got "
            f"{publishing_interval_ms!r}, {keepalive_count!r}, {factor!r}"
        )
    return max(floor_s, factor * publishing_interval_ms / 1000.0 * keepalive_count)


@dataclass(slots=True)
class SubscriptionWatchdog:
    """Remembers when the subscription was last heard from and says when it went silent."""

    limit_s: float
    last_heard: float

    def heard(self, now: float) -> None:
        """Note a message (data, keep-alive or status) from the subscription."""
        self.last_heard = now

    def remaining(self, now: float) -> float:
        """Seconds left before the subscription counts as silent (0 when it already is)."""
        return max(self.last_heard + self.limit_s - now, 0.0)

    def silent_for(self, now: float) -> float | None:
        """How long the subscription has been silent, if past the limit; else None."""
        silence = now - self.last_heard
        return silence if silence >= self.limit_s else None
