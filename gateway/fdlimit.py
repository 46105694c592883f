"""File descriptors: raise the soft limit when allowed, and share it so listeners cannot take all.

Every device socket, database file and client connection is a descriptor. systemd starts services
with a soft limit of 1024; a flood of 1,100 slow HTTP connections once held every one of them, and
a dropped Modbus device could not reconnect for the whole attack. So the gateway raises the soft
limit to the hard one at start (capped: nothing here needs more), keeps a reserve for devices, the
database and logs, and caps each listener's connections within what is left.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

log = logging.getLogger(__name__)

__all__ = ["DescriptorBudget", "plan_budget", "raise_nofile_limit"]

# Far above any real site's needs; some hosts report an "unlimited" hard limit.
NOFILE_CEILING = 65536
# Descriptors kept for everything but the listeners: the database (main, WAL, shm, one reader per
# thread), the lock file, logs, the C kernel's threads, asyncio's self-pipe, certificates opened
# at reconnect, and DNS lookups. Measured use with the demo plant is ~40; the rest is headroom.
BASE_RESERVE = 96
# Per device: its socket, a reconnect overlapping the old socket's close, a certificate read.
PER_DEVICE_RESERVE = 4
# asyncio accepts up to `backlog` connections per wake-up before any of them can be refused and
# closed, so a flood briefly holds that many beyond a listener's cap. Ours is small; asyncua's
# server uses asyncio's default and offers no way to change it.
HTTP_BACKLOG = 16
OPCUA_BACKLOG = 100


@dataclass(frozen=True, slots=True)
class DescriptorBudget:
    """What each listener may hold, after the reserve."""

    soft_limit: int
    reserve: int
    http_connections: int
    opcua_connections: int


def raise_nofile_limit(ceiling: int = NOFILE_CEILING) -> tuple[int, int]:
    """Raise the soft descriptor limit toward the hard one; return (soft, hard) in effect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # a container may forbid it: work within soft
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc)
        else:
            log.info("descriptor limit raised from %d to %d", soft, target)
            soft = target
    return soft, hard


def plan_budget(soft_limit: int, devices: int, http_max: int, opcua_max: int) -> DescriptorBudget:
    """Fit the configured listener caps under the limit, leaving the reserve to devices and SQLite.

    When the configured caps do not fit, both shrink in proportion and a warning says so: a
    listener refusing connections early is better than a device that cannot reconnect.
    """
    reserve = BASE_RESERVE + PER_DEVICE_RESERVE * devices + HTTP_BACKLOG
    if opcua_max:
        reserve += OPCUA_BACKLOG
    available = max(soft_limit - reserve, 2)
    wanted = http_max + opcua_max
    if wanted <= available:
        return DescriptorBudget(soft_limit, reserve, http_max, opcua_max)
    http = max(1, available * http_max // wanted)
    opcua = max(1, available - http) if opcua_max else 0
    log.warning(
        "descriptor limit %d leaves %d for clients after the reserve of %d: HTTP connections "
        "capped at %d (configured %d), OPC UA at %d (configured %d); raise LimitNOFILE= in the "
        "unit to allow more",
        soft_limit,
        available,
        reserve,
        http,
        http_max,
        opcua,
        opcua_max,
    )
    return DescriptorBudget(soft_limit, reserve, http, opcua)
