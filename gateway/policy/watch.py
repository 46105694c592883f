"""The anomaly detectors on the running twin: fed by every ingest, checked on a timer.

`AnomalyWatch` owns the site's `DetectorSet` (gateway/policy/anomaly.py). A twin listener hands
it each ingest's changes, on the event loop, inside `TwinStore.ingest`; a periodic task runs the
time-driven detectors (flatline, stale), which fire when no sample comes. Each anomaly becomes
an `AnomalyDetected` event in the twin, a WARNING line, and, per batch, a call to
`on_anomalies` (the policy engine's anomaly triggers).

The log is limited twice, so that a storm (a whole device's points at once) cannot flood it: one
line per point and kind per `REPEAT_S` (a detector that fires, clears and fires again is
counted into its next line), and at most `LOG_BURST` lines per `LOG_WINDOW_S` in all, the rest
counted into one summary line. The events hold every anomaly.

Nothing here may break ingest: a detector, event or callback failure is counted, logged (rate
limited) and swallowed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from gateway.errors import GatewayError
from gateway.lifecycle import Lifecycle
from gateway.policy.anomaly import (
    EVENT_TYPE,
    KINDS,
    Anomaly,
    AnomalyConfig,
    DetectorSet,
    FlatlineSpec,
    StaleSpec,
)
from gateway.ratelog import RateLimitedLog
from gateway.twin.model import PointDef, PointValue
from gateway.twin.store import TwinStore

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHECK_S",
    "LOG_BURST",
    "LOG_WINDOW_S",
    "MIN_CHECK_S",
    "REPEAT_S",
    "AnomalyCallback",
    "AnomalyWatch",
    "check_interval",
]

AnomalyCallback = Callable[[list[Anomaly]], None]

DEFAULT_CHECK_S = 1.0
# A check over 10,000 points costs well under a millisecond (bench/anomaly.py); faster than
# 10 Hz would still only find a flatline or stale point a little sooner than it matters.
MIN_CHECK_S = 0.1
# Log limits (see the module docstring).
REPEAT_S = 60.0
LOG_BURST = 20
LOG_WINDOW_S = 10.0


def check_interval(detectors: DetectorSet) -> float | None:
    """Seconds between checks of the time-driven detectors: `DEFAULT_CHECK_S`, or a quarter of
    the shortest flatline `duration_s` / stale `max_age_s` if shorter (found at most a quarter
    late), never below `MIN_CHECK_S`; None when there is no such detector."""
    durations = [
        spec.duration_s if isinstance(spec, FlatlineSpec) else spec.max_age_s
        for point_id in detectors.point_ids
        for spec in detectors.specs(point_id)
        if isinstance(spec, FlatlineSpec | StaleSpec)
    ]
    if not durations:
        return None
    return max(MIN_CHECK_S, min(DEFAULT_CHECK_S, min(durations) / 4))


class AnomalyWatch:
    """Runs a DetectorSet on a twin store's changes and a timer; reports what it finds.

    `on_anomalies` gets each batch of anomalies (of one ingest or one check) on the event loop,
    inside ingest: it must return quickly (schedule work, do not do it), and may be set at any
    time. `check_interval_s` None: `check_interval(detectors)`. `clock` gives the time of the
    periodic checks; it must be the twin's clock (wall time), which stamps the changes.
    `log_clock` times the log limits.
    """

    def __init__(
        self,
        store: TwinStore,
        detectors: DetectorSet,
        *,
        on_anomalies: AnomalyCallback | None = None,
        check_interval_s: float | None = None,
        clock: Callable[[], float] = time.time,
        log_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if check_interval_s is not None and not (
            math.isfinite(check_interval_s) and check_interval_s > 0
        ):
            raise ValueError(f"check_interval_s must be a positive number, got {check_interval_s}")
        self.store = store
        self.detectors = detectors
        self.on_anomalies = on_anomalies
        self.check_interval_s = (
            check_interval(detectors) if check_interval_s is None else check_interval_s
        )
        self._clock = clock
        self._log_clock = log_clock
        self._ratelog = RateLimitedLog(log, REPEAT_S, clock=log_clock)
        self._window_start = -math.inf
        self._logged = 0  # anomaly lines in the current window
        self._unlogged = 0  # anomalies over the window's budget
        #: Anomalies reported since construction, per kind.
        self.counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        #: Failures swallowed: detectors raising on a batch, events not appended, callbacks.
        self.failures: dict[str, int] = {"detectors": 0, "events": 0, "callback": 0}
        self._running = False

    @classmethod
    def from_config(
        cls,
        store: TwinStore,
        config: AnomalyConfig,
        points: Iterable[PointDef],
        **options: Any,
    ) -> AnomalyWatch | None:
        """The watch the site config asks for, or None when it has no rules (ConfigError for a
        rule matching no point; the config loader refuses those first)."""
        if not config.rules:
            return None
        return cls(store, DetectorSet.from_config(config, points), **options)

    def start(self, life: Lifecycle) -> None:
        """Listen to the twin and start the periodic check; `life` undoes both (the check
        first). Call on the event loop."""
        if self._running:
            raise GatewayError("the anomaly watch is already running")
        self._running = True
        life.on_stop("anomaly watch", self._stopped)
        life.on_stop("anomaly listener", self.store.add_listener(self.on_changes))
        if self.check_interval_s is not None:
            life.task(self._check_periodically(self.check_interval_s), "anomaly:check")
        log.info(
            "anomaly detectors watching %d points (%s), checked every %s",
            len(self.detectors.point_ids),
            self._kinds_text(),
            "—" if self.check_interval_s is None else f"{self.check_interval_s:g} s",
        )

    def on_changes(self, changes: Sequence[PointValue]) -> None:
        """The twin listener: feed one ingest's changes to the detectors; never raises."""
        try:
            found = self.detectors.on_changes(changes)
        except Exception as exc:
            self.failures["detectors"] += 1
            self._ratelog.log(
                logging.ERROR,
                "detectors",
                "anomaly detectors failed on %d changes (ingest goes on, the batch is not "
                "judged): %s: %s",
                len(changes),
                type(exc).__name__,
                exc,
            )
            return
        if found:
            self._report(found)

    def check(self, now: float | None = None) -> list[Anomaly]:
        """Run the time-driven detectors at `now` (default: the clock), report and return what
        they find; never raises."""
        try:
            found = self.detectors.check(self._clock() if now is None else now)
        except Exception as exc:
            self.failures["detectors"] += 1
            self._ratelog.log(
                logging.ERROR,
                "detectors",
                "anomaly check failed: %s: %s",
                type(exc).__name__,
                exc,
            )
            return []
        if found:
            self._report(found)
        else:
            self._end_window()  # a storm's summary comes without waiting for the next one
        return found

    def stats(self) -> dict[str, Any]:
        """What /health reports: points watched, anomalies per kind, failures swallowed."""
        return {
            "points": len(self.detectors.point_ids),
            "anomalies": dict(self.counts),
            "failures": dict(self.failures),
        }

    # -- helpers ----------------------------------------------------------------------------

    def _report(self, found: list[Anomaly]) -> None:
        for anomaly in found:
            self.counts[anomaly.kind] += 1
            try:
                self.store.append_event(EVENT_TYPE, anomaly.event_data(), point_id=anomaly.point_id)
            except Exception as exc:  # a closing store, a full disk: the log still says it
                self.failures["events"] += 1
                self._ratelog.log(
                    logging.ERROR,
                    "events",
                    "anomaly event not recorded: %s: %s",
                    type(exc).__name__,
                    exc,
                )
            self._log(anomaly)
        callback = self.on_anomalies
        if callback is None:
            return
        try:
            callback(found)
        except Exception as exc:
            self.failures["callback"] += 1
            self._ratelog.log(
                logging.ERROR,
                "callback",
                "anomaly callback %r failed on %d anomalies (ingest goes on): %s: %s",
                callback,
                len(found),
                type(exc).__name__,
                exc,
            )

    def _log(self, anomaly: Anomaly) -> None:
        self._end_window()
        if self._logged >= LOG_BURST:
            self._unlogged += 1
            return
        logged = self._ratelog.log(
            logging.WARNING,
            f"{anomaly.kind}:{anomaly.point_id}",
            "anomaly on %s: %s, score %.2f (%s)",
            anomaly.point_id,
            anomaly.kind,
            anomaly.score,
            _features_text(anomaly.features),
        )
        self._logged += logged

    def _end_window(self) -> None:
        """Start a new log window if the current one is over, summing up what it held back."""
        now = self._log_clock()
        if now - self._window_start < LOG_WINDOW_S:
            return
        if self._unlogged:
            log.warning(
                "%d further anomalies were not logged (at most %d lines per %g s); "
                "the AnomalyDetected events hold every one",
                self._unlogged,
                LOG_BURST,
                LOG_WINDOW_S,
            )
        self._window_start = now
        self._logged = self._unlogged = 0

    async def _check_periodically(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.check()

    def _stopped(self) -> None:
        self._running = False

    def _kinds_text(self) -> str:
        seen = {spec.kind for pid in self.detectors.point_ids for spec in self.detectors.specs(pid)}
        return ", ".join(kind for kind in KINDS if kind in seen)


def _features_text(features: dict[str, float | None]) -> str:
    return ", ".join(
        f"{name}={'—' if value is None else format(value, '.6g')}"
        for name, value in features.items()
    )
