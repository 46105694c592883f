"""Child process of the crash test: ingest bursts until killed, printing each newly committed rev.

    python twin_crash_child.py DB_PATH

First line: `open REV` (the rev the store reopened at). Then one line per change of
`committed_rev`, printed only after the writer has committed it, so the parent knows a lower bound
of what must survive a `kill -9`.
"""

from __future__ import annotations

import random
import sys
import time

from drivers.contract import Quality, Sample
from gateway.twin import writer
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore

POINTS = [PointDef(f"crash/line{i % 4}/asset{i}/value", "dev", "float32") for i in range(200)]


def main(path: str) -> int:
    """Ingest forever; the parent ends this with SIGKILL."""
    # Compact every few bursts and keep no event-log window, so kills land in compactions and
    # trims too: both must leave every rev exactly once (in a block or a frame) and the current
    # values. Set here, not at import: the test imports this module for POINTS.
    writer.COMPACT_ROWS = 3000
    store = TwinStore(path, POINTS, flush_interval_s=0.002, flush_rows=2000, event_log_minutes=0)
    store.open()
    print(f"open {store.rev}", flush=True)
    rng = random.Random()
    reported = store.committed_rev
    bursts = 0
    while True:
        burst = []
        for point in rng.sample(POINTS, 150):
            roll = rng.random()
            if roll < 0.03:  # a lost device: keep the value, change the quality
                burst.append(Sample(point.id, None, Quality.STALE, None, "device disconnected"))
            else:
                quality = Quality.GOOD if roll < 0.9 else Quality.UNCERTAIN
                burst.append(Sample(point.id, rng.uniform(0, 100), quality, rng.random()))
        store.ingest(burst)
        bursts += 1
        if bursts % 10 == 0:
            store.append_event("DeviceStateChanged", {"device": "dev", "burst": bursts})
        committed = store.committed_rev
        if committed != reported:
            reported = committed
            print(committed, flush=True)
        # A driver's cadence: bursts back to back, each a poll of many points. Without any pause
        # this loop would hold the GIL and starve the writer (see writer.MultiRowInsert).
        time.sleep(0.0005)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
