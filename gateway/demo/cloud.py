"""The demo's cloud side: a local broker, the reference mirror beside the gateway, and the
proof that the cloud copy equals the twin, through a broker outage.

The mirror runs on the demo's event loop, as `opstwin mirror` would in the cloud; it sees the
gateway only through the broker. Equality is judged at a committed rev: the gateway's snapshot
is taken, the mirror is given a few seconds to hold that rev, and then every point must have
the same value and quality in both, or a newer change in the mirror (the plant does not stop
while we compare).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from gateway.app import Gateway
from gateway.demo.broker import LocalBroker
from gateway.errors import StoreError
from gateway.mirror.client import Mirror

__all__ = ["CloudView", "compare_twins"]

CATCH_UP_S = 10.0


class CloudView:
    """The mirror of the demo gateway, and the broker it reads, for the demo's cloud steps."""

    def __init__(self, gateway: Gateway, broker: LocalBroker | None) -> None:
        self.gateway = gateway
        self.broker = broker
        config = gateway.config
        self.site, self.gw = config.site_id, config.gateway_id
        self.mirror: Mirror | None = None
        if broker is not None and config.sync.broker is not None:
            host, port, _ = config.sync.endpoint
            self.mirror = Mirror(
                host,
                port,
                prefix=config.sync.topic_prefix,
                site_id=self.site,
                gateway_id=self.gw,
                reconnect_max_s=1.0,
                # A persistent session: what the gateway sends while the mirror reconnects
                # after the broker's outage waits for it in the broker, as in a real cloud.
                client_id=f"opstwin-demo-mirror-{self.site}-{self.gw}",
                persistent=True,
            )

    async def start(self) -> None:
        if self.mirror is not None:
            await self.mirror.start(timeout_s=10)

    async def stop(self) -> None:
        if self.mirror is not None:
            await self.mirror.stop()

    async def check(self) -> None:
        """Print whether the mirror equals the twin, with what the sync has sent."""
        if self.mirror is None:
            return
        try:
            rev, _ = await self.gateway.store.committed_snapshot()
        except StoreError as exc:
            print(f"  cloud: the twin cannot be read: {exc}", flush=True)
            return
        mirror = self.mirror
        try:
            await mirror.wait_until(lambda: self._mirror_rev() >= rev, CATCH_UP_S)
        except TimeoutError:
            print(
                f"  cloud: the mirror holds rev {self._mirror_rev()}, the gateway committed {rev} "
                f"{CATCH_UP_S:g} s ago; still catching up",
                flush=True,
            )
            return
        _, values = self.gateway.store.snapshot()
        twin = {
            pid: {"value": v.value, "quality": str(v.quality), "rev": v.rev}
            for pid, v in values.items()
        }
        stats = mirror.stats(self.site, self.gw)
        differ = compare_twins(twin, mirror.twin(self.site, self.gw)["points"])
        sync = self.gateway.sync.health() if self.gateway.sync is not None else {}
        counts = sync.get("counts", {})
        verdict = (
            f"equal to the twin at rev {rev}: all {len(twin)} points, value and quality"
            if not differ
            else f"DIFFERS from the twin in {len(differ)} points: {', '.join(differ[:3])}"
        )
        print(
            f"  cloud: the mirror (gateway/mirror, through mosquitto) is {verdict}; "
            f"sync sent {counts.get('births', 0)} births, {counts.get('diffs', 0)} diffs, "
            f"{counts.get('events', 0)} events; mirror gaps {stats.get('gaps', 0)}, "
            f"rebirths asked {stats.get('rebirths', 0)}, historical events "
            f"{stats.get('historical_events', 0)}",
            flush=True,
        )

    async def broker_down(self) -> None:
        if self.broker is None:
            return
        print(
            "  cloud: the broker stops (an outage of the plant's uplink); the gateway keeps "
            "every change in its event log until the cloud confirms it",
            flush=True,
        )
        await asyncio.to_thread(self.broker.stop)

    async def broker_up(self) -> None:
        if self.broker is None:
            return
        print(
            "  cloud: the broker is back; the gateway sends a birth, then the backlog (marked "
            "historical), then live changes",
            flush=True,
        )
        await asyncio.to_thread(self.broker.start)

    def _mirror_rev(self) -> int:
        assert self.mirror is not None
        try:
            return int(self.mirror.stats(self.site, self.gw).get("rev") or 0)
        except KeyError:  # nothing from the gateway yet
            return 0


def compare_twins(
    twin: dict[str, dict[str, Any]], mirrored: dict[str, dict[str, Any]]
) -> list[str]:
    """The point ids where the mirror differs from the twin: missing, older, or at the same
    rev with another value or quality. A newer change in the mirror is not a difference."""
    differ = []
    for pid, ours in twin.items():
        theirs = mirrored.get(pid)
        rev = (theirs or {}).get("rev") or 0
        missing = theirs is None or rev < ours["rev"]
        other = (
            theirs is not None
            and rev == ours["rev"]
            and (
                theirs.get("quality") != ours["quality"]
                or not _same(theirs.get("value"), ours["value"])
            )
        )
        if missing or other:
            differ.append(pid)
    return differ


def _same(a: Any, b: Any) -> bool:
    # NaN travels as null: a BAD point's NaN and the mirror's None are the same value.
    if isinstance(b, float) and math.isnan(b):
        return a is None
    return bool(a == b)
