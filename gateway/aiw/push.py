"""Points pushed over HTTP (`driver: http` devices): which take ingest, their values, staleness.

A pushed point has no driver to notice that its source went quiet, so the gateway does what a
driver does when its device is lost (drivers/base.py): a point not pushed within its device's
`stale_after_s` keeps its last value and turns STALE; one that never had a value has nothing to
be stale about and stays BAD ("waiting for initial data"). The next push makes it current again.
The clock starts when the gateway starts: a source that never pushes after a restart goes STALE
like one that stopped.

Pure but for the clock: `PushSources` answers questions and produces Samples; the gateway runs
`watch` as a task, the ingest route (gateway/aiw/writes.py) calls `refusal`, `check_value` and
`pushed`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from drivers.contract import Quality, Sample
from gateway.config.model import HttpDeviceConfig, SiteConfig
from gateway.twin.model import PointDef

log = logging.getLogger(__name__)

__all__ = ["FUTURE_SLACK_S", "PushSources", "check_value"]

# A source's clock may run ahead of ours by a little; a timestamp further ahead is a wrong clock
# (or a unit mistake: milliseconds), and would sort history and staleness wrongly.
FUTURE_SLACK_S = 300.0
# How often the staleness check runs at most: a fraction of the shortest `stale_after_s`, so a
# point turns STALE at most a quarter late, and never more often than 20 times a second.
_MIN_TICK_S = 0.05
_MAX_TICK_S = 1.0

_INT_RANGES = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
_FLOAT32_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]


def check_value(datatype: str, value: Any) -> bool | int | float | str:
    """`value` as a point of `datatype` holds it; ValueError saying why it cannot be one.

    JSON has one number type: an integral number (`3.0`) is taken for an integer point, and an
    integer for a float point. Nothing else converts: `"12"` is no number, `1` no boolean.
    """
    if datatype == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError(f"a bool point takes true or false, not {_kind(value)}")
    if datatype == "string":
        if isinstance(value, str):
            return value
        raise ValueError(f"a string point takes text, not {_kind(value)}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"a {datatype} point takes a number, not {_kind(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"a {datatype} point takes a finite number, not {value}")
    bounds = _INT_RANGES.get(datatype)
    if bounds is not None:
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"a {datatype} point takes a whole number, not {value!r}")
            value = int(value)
        lo, hi = bounds
        if not lo <= value <= hi:
            raise ValueError(f"{value} is outside {datatype}'s range [{lo}, {hi}]")
        return value
    value = float(value)
    if datatype == "float32" and abs(value) > _FLOAT32_MAX:
        raise ValueError(f"{value!r} is beyond float32's range (±{_FLOAT32_MAX:.6g})")
    return value


class PushSources:
    """The http devices of a site: refusals, last pushes, and the STALE samples they lead to."""

    def __init__(
        self,
        config: SiteConfig,
        points: Mapping[str, PointDef],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.points = points
        self.devices: dict[str, HttpDeviceConfig] = {
            d.name: d for d in config.devices if isinstance(d, HttpDeviceConfig)
        }
        self._drivers = {d.name: d.driver for d in config.devices}
        self._enabled = {d.name: d.enabled for d in config.devices}
        # Monotonic time of each pushed point's last push; of each device's last push.
        self._point_push: dict[str, float] = {}
        self._device_push: dict[str, float] = {}
        self._stale: set[str] = set()
        self._started = clock()
        self._watched = {
            name: d.stale_after_s
            for name, d in self.devices.items()
            if d.enabled and d.stale_after_s is not None
        }

    def reconfigure(self, config: SiteConfig) -> bool:
        """Take a reloaded config's http devices (their points are already in `points`); a
        point still pushed keeps its last push time. Return whether the staleness limits
        changed (then the gateway restarts `watch`)."""
        watched = dict(self._watched)
        self.devices = {d.name: d for d in config.devices if isinstance(d, HttpDeviceConfig)}
        self._drivers = {d.name: d.driver for d in config.devices}
        self._enabled = {d.name: d.enabled for d in config.devices}
        self._watched = {
            name: d.stale_after_s
            for name, d in self.devices.items()
            if d.enabled and d.stale_after_s is not None
        }
        kept = {p.id for d in self.devices.values() for p in d.points}
        self._point_push = {k: t for k, t in self._point_push.items() if k in kept}
        self._device_push = {k: t for k, t in self._device_push.items() if k in self.devices}
        self._stale &= kept
        return watched != self._watched

    def refusal(self, point_id: str) -> str | None:
        """Why `point_id` takes no ingest (unknown, another driver's, a disabled device's)."""
        point = self.points.get(point_id)
        if point is None:
            return f"unknown point {point_id!r}; `GET /twin` lists the points"
        driver = self._drivers.get(point.device)
        if driver != "http":
            return (
                f"{point_id} is read from device {point.device} over {driver}; only points of "
                "`driver: http` devices take ingest"
            )
        if not self._enabled.get(point.device, False):
            return (
                f"device {point.device} is disabled (`enabled: false`): its points take no ingest"
            )
        return None

    def pushed(self, point_ids: Iterable[str]) -> None:
        """These points were just pushed (their values accepted)."""
        now = self._clock()
        for point_id in point_ids:
            self._point_push[point_id] = now
            self._device_push[self.points[point_id].device] = now
            self._stale.discard(point_id)

    def stale_samples(self, current: Callable[[str], Any]) -> list[Sample]:
        """STALE samples for the points whose device's `stale_after_s` passed since their last
        push (or since start), once per silence; `current(point_id)` is the twin's PointValue."""
        now = self._clock()
        samples: list[Sample] = []
        for name, limit in self._watched.items():
            for point in self.devices[name].points:
                if point.id in self._stale:
                    continue
                since = self._point_push.get(point.id, self._started)
                if now - since <= limit:
                    continue
                self._stale.add(point.id)
                value = current(point.id)
                if value.rev == 0 or value.value is None:
                    continue  # never had a value: BAD already, nothing to be stale about
                silent = now - since
                samples.append(
                    Sample(
                        point.id,
                        None,
                        Quality.STALE,
                        None,
                        f"not pushed for {silent:.1f} s (device {name}: stale_after_s {limit:g})",
                    )
                )
        return samples

    def device_states(self) -> dict[str, dict[str, Any]]:
        """Each enabled http device's state: RECEIVING, WAITING (nothing pushed since start) or
        STALE (nothing within `stale_after_s`), with the age of its last push."""
        now = self._clock()
        states = {}
        for name, device in self.devices.items():
            if not device.enabled:
                continue
            last = self._device_push.get(name)
            silent = now - (self._started if last is None else last)
            limit = device.stale_after_s
            error = None
            if limit is not None and silent > limit:
                state = "STALE"
                what = "nothing pushed since the gateway started" if last is None else "no push"
                error = f"{what} for {silent:.0f} s (stale_after_s {limit:g})"
            else:
                state = "WAITING" if last is None else "RECEIVING"
            states[name] = {
                "state": state,
                "driver": "http",
                "last_error": error,
                "polls_skipped": 0,
                "last_push_age_s": None if last is None else round(silent, 3),
                "stale_after_s": limit,
            }
        return states

    async def watch(
        self, ingest: Callable[[list[Sample]], Any], current: Callable[[str], Any]
    ) -> None:
        """Turn silent points STALE, forever (a task of the gateway's; cancel it to stop).

        Silence is counted from this call on: the gateway's start.
        """
        self._started = self._clock()
        if not self._watched:
            return
        tick = min(_MAX_TICK_S, max(_MIN_TICK_S, min(self._watched.values()) / 4))
        while True:
            await asyncio.sleep(tick)
            try:
                samples = self.stale_samples(current)
                if samples:
                    ingest(samples)
            except Exception:
                log.exception("pushed points: the staleness check failed; trying again")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"text ({len(value)} characters)"
    return {"list": "an array", "dict": "an object"}.get(type(value).__name__, "another type")
