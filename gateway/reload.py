"""Reload the site config and its policies without a restart: SIGHUP, `systemctl reload`.

A reload runs in two phases, and nothing changes unless the first one passes whole:

1. **Check everything.** Off the event loop, the config file the gateway was started with is
   read with `load_config` (every check `opstwin check` and a start make) and the policy folder
   it names with `load_policies` (checked against the new points); on the loop, what
   `Gateway.__init__` would refuse is built without I/O: each new or changed device's driver,
   the anomaly rules over the new points, the OPC UA server's address space. A file a restart
   would refuse is refused here, whole: the running set stays, one ERROR line names the file
   and key path (the loader's own message), and /health shows it under `config.last_reload`.
   A refused reload leaves /health's `status` as it was: the gateway runs exactly as before.
2. **Apply what changed** (`diff_configs`, a pure function). A removed or changed device's
   driver stops (its queued samples reach the twin first); the twin declares the new point set;
   a new or changed device's driver starts. A device whose config is unchanged keeps its driver,
   its connection and its pump: it loses no sample. Editing a point's `description` or `unit`
   alone does not restart its device. A removed point stops being served and keeps its history
   and events, as when a restart drops it from the config; a re-added one comes back with its
   last value, as at a start. A device removed or disabled gets a `DeviceStateChanged` event
   (CLOSED, with the reason); a disabled one's values turn STALE. The policy engine runs the new
   policies (a pending proposal keeps the policy it was judged by); the anomaly watch is rebuilt
   when its rules or the points they match changed (its detectors start afresh); the OPC UA
   server is rebuilt on the same endpoint when the points it serves changed (its clients
   reconnect: one code path plans the address space, rather than a second one editing it
   live); the cloud sync publishes a new birth; `log_level` applies at once unless
   `--log-level` was given on the command line.

Settings bound at start keep their running values until a restart: everything but `devices`,
`policies`, `anomalies` and `log_level` (the ids, `storage`, `http`, `opcua_server`, `sync`).
The key paths changed in the file are logged at WARNING and listed in /health
`config.restart_needed`.

Reloads run one at a time: SIGHUPs during a reload make one more reload after it, which reads
the file as it is then. systemd hears `RELOADING=1` at the start of each and `READY=1` at the
end (sd_notify(3)), so `systemctl reload` shows the unit reloading meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drivers.base import Driver
from drivers.contract import Quality, Sample
from gateway import sdnotify
from gateway.config import SiteConfig, load_config
from gateway.config.model import DeviceConfig, HttpDeviceConfig
from gateway.devices import build_driver, point_defs
from gateway.errors import ConfigError, GatewayError
from gateway.lifecycle import wait_or_cancel
from gateway.policy.anomaly import resolve
from gateway.policy.load import PolicySet, load_policies
from gateway.policy.model import Policy
from gateway.policy.watch import AnomalyWatch
from gateway.twin.model import PointDef

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.opcua_server import TwinOpcuaServer

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG_RELOADED",
    "RELOADABLE",
    "ConfigDiff",
    "ConfigStatus",
    "Reloader",
    "diff_configs",
    "reload_file",
    "restart_needed",
    "running_config",
    "site_policies",
]

CONFIG_RELOADED = "ConfigReloaded"  # the event of an applied reload
# The top-level keys a reload applies; every other one (including keys added later) is bound
# at start, so a change to it waits for a restart.
RELOADABLE = ("devices", "policies", "anomalies", "log_level")
# A reload still running when the gateway stops gets this long to finish its step (a driver
# closing, pumps draining, the twin declaring points) before it is cancelled.
STOP_WAIT_S = 30.0
_NAMES_SHOWN = 5


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """What differs between the running config and a reloaded one."""

    devices_added: tuple[str, ...] = ()
    devices_removed: tuple[str, ...] = ()
    devices_changed: tuple[str, ...] = ()  # their drivers restart (or stop, when disabled)
    points_added: tuple[str, ...] = ()
    points_removed: tuple[str, ...] = ()
    points_changed: tuple[str, ...] = ()  # definition changed (range, unit, device, …)
    anomalies_changed: bool = False
    policies_dir_changed: bool = False
    log_level_changed: bool = False
    restart_needed: tuple[str, ...] = ()  # key paths bound at start

    @property
    def devices_differ(self) -> bool:
        """Whether any device was added, removed or changed."""
        return bool(self.devices_added or self.devices_removed or self.devices_changed)

    @property
    def points_differ(self) -> bool:
        """Whether the declared point set or any point's definition changed."""
        return bool(self.points_added or self.points_removed or self.points_changed)

    def summary(self) -> list[str]:
        """The changes, one short phrase each (`+1 device (tank2)`, `~3 points`)."""
        parts = [
            _count(sign, len(names), "device") + f" ({_names(names)})"
            for sign, names in (
                ("+", self.devices_added),
                ("-", self.devices_removed),
                ("~", self.devices_changed),
            )
            if names
        ]
        parts += [
            _count(sign, len(ids), "point")
            for sign, ids in (
                ("+", self.points_added),
                ("-", self.points_removed),
                ("~", self.points_changed),
            )
            if ids
        ]
        if self.anomalies_changed:
            parts.append("anomaly rules changed")
        if self.policies_dir_changed:
            parts.append("policies.dir changed")
        if self.log_level_changed:
            parts.append("log_level changed")
        return parts


def diff_configs(old: SiteConfig, new: SiteConfig) -> ConfigDiff:
    """Compare two validated site configs; pure."""
    before = {d.name: d for d in old.devices}
    after = {d.name: d for d in new.devices}
    old_points = {p.id: p for p in point_defs(old)}
    new_points = {p.id: p for p in point_defs(new)}
    return ConfigDiff(
        devices_added=tuple(n for n in after if n not in before),
        devices_removed=tuple(n for n in before if n not in after),
        devices_changed=tuple(
            n
            for n, device in after.items()
            if n in before and _driver_view(before[n]) != _driver_view(device)
        ),
        points_added=tuple(i for i in new_points if i not in old_points),
        points_removed=tuple(i for i in old_points if i not in new_points),
        points_changed=tuple(
            i for i, p in new_points.items() if i in old_points and old_points[i] != p
        ),
        anomalies_changed=old.anomalies != new.anomalies,
        policies_dir_changed=old.policies != new.policies,
        log_level_changed=old.log_level != new.log_level,
        restart_needed=restart_needed(old, new),
    )


def restart_needed(old: SiteConfig, new: SiteConfig) -> tuple[str, ...]:
    """The key paths (`http.port`, `opcua_server.users`) whose change waits for a restart."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    return tuple(
        path
        for key in SiteConfig.model_fields
        if key not in RELOADABLE
        for path in _changed_paths(a.get(key), b.get(key), key)
    )


def running_config(running: SiteConfig, new: SiteConfig) -> SiteConfig:
    """The config that runs after a reload: `new`, with the keys bound at start as they run."""
    kept = {key: getattr(running, key) for key in SiteConfig.model_fields if key not in RELOADABLE}
    return new.model_copy(update=kept)


def site_policies(config: SiteConfig) -> PolicySet:
    """The policies of the folder `config` names, checked against its points; an empty set
    when it names none. Blocking (reads files); PolicyError lists every problem."""
    folder = config.policies.dir
    if folder is None:
        return PolicySet(Path("."))  # the config names no folder: no policies
    return load_policies(folder, config)


@dataclass(slots=True)
class ConfigStatus:
    """Which config runs, and how the last reload went: /health's `config`."""

    file: Path | None = None
    loaded_at: float = field(default_factory=time.time)
    generation: int = 1  # 1: as started; each applied reload adds one
    reloads: int = 0  # attempts, applied or not
    last_reload: dict[str, Any] | None = None
    restart_needed: tuple[str, ...] = ()
    # What an applied reload could not bring back (the OPC UA server could not listen): these
    # degrade /health, because a part of the gateway is down, not just a file refused.
    problems: list[str] = field(default_factory=list)

    def health(self, policies: Sequence[str]) -> dict[str, Any]:
        """The JSON /health shows under `config`."""
        return {
            "file": None if self.file is None else str(self.file),
            "loaded_at": self.loaded_at,
            "generation": self.generation,
            "policies": list(policies),
            "restart_needed": list(self.restart_needed),
            "last_reload": None if self.last_reload is None else dict(self.last_reload),
        }


class Reloader:
    """Runs the reloads of one gateway, one at a time; SIGHUP calls `request`."""

    def __init__(self, gateway: Gateway, path: Path | None, *, log_level_pinned: bool = False):
        self.gateway = gateway
        self.path = path
        # `--log-level` on the command line wins over the file's `log_level`, reload or not.
        self.log_level_pinned = log_level_pinned
        self._lock = asyncio.Lock()
        self._wanted = False
        self._started = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        gateway.config_status.file = path

    def request(self) -> None:
        """Reload soon (a signal handler: returns at once); requests made meanwhile coalesce.

        Before `start` the request waits for it; after `aclose` it is ignored.
        """
        if self._closed:
            log.info("SIGHUP while stopping: no reload")
            return
        self._wanted = True
        if not self._started:
            log.info("SIGHUP during start-up: the config is reloaded once the gateway is ready")
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="config:reload")

    def start(self) -> None:
        """The gateway is ready: reload from now on (now, if a SIGHUP came meanwhile)."""
        self._started = True
        if self._wanted:
            self._wanted = False
            self.request()

    async def reload(self) -> bool:
        """Reload now, after any reload in progress; return whether the file was applied."""
        async with self._lock:
            return await self._reload_once()

    async def idle(self) -> None:
        """Wait until no reload is running or requested."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def aclose(self) -> None:
        """Let a running reload finish (or cancel it after STOP_WAIT_S); no more after it."""
        self._closed = True
        self._wanted = False
        if self._task is not None:
            await wait_or_cancel([self._task], STOP_WAIT_S)

    async def _run(self) -> None:
        while self._wanted:
            self._wanted = False
            await self.reload()

    async def _reload_once(self) -> bool:
        status = self.gateway.config_status
        status.reloads += 1
        number = status.reloads
        sdnotify.notify(
            f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}\n"
            f"STATUS=reloading the site config (reload {number})"
        )
        at = time.time()
        try:
            if self.path is None:
                raise ConfigError(
                    "nothing to reload: this gateway was started with a config given in code, "
                    "not from a file"
                )
            summary = await reload_file(
                self.gateway, self.path, number=number, log_level_pinned=self.log_level_pinned
            )
        except GatewayError as exc:
            # A file refused (ConfigError, PolicyError), or the twin could not declare the
            # points (StoreError, undone): nothing changed.
            error = _one_line(str(exc))
            log.error(
                "reload %d refused; the running config (generation %d) stays: %s",
                number,
                status.generation,
                error,
            )
            status.last_reload = {"number": number, "at": at, "ok": False, "error": error}
            return False
        except Exception as exc:
            # A bug: part of the new config may be running. Say so; a restart starts clean.
            log.exception("reload %d failed while applying; restart the gateway", number)
            status.last_reload = {
                "number": number,
                "at": at,
                "ok": False,
                "error": f"failed while applying ({type(exc).__name__}: {exc}); parts of the "
                "new config may be running: restart the gateway",
            }
            return False
        else:
            status.generation += 1
            status.loaded_at = at
            status.last_reload = {
                "number": number,
                "at": at,
                "ok": True,
                "error": None,
                "changes": summary,
            }
            # An event like every accepted change: its rev moves /twin's ETag (the point set or
            # a point's definition may have changed with no value changing), and /diff,
            # /subscribe and the cloud hear of it.
            self.gateway.store.append_event(
                CONFIG_RELOADED,
                {
                    "generation": status.generation,
                    "changes": summary,
                    "restart_needed": list(status.restart_needed),
                },
            )
            return True
        finally:
            sdnotify.notify(
                f"READY=1\nSTATUS=serving {len(self.gateway.points)} points "
                f"(config generation {status.generation})"
            )


async def reload_file(
    gateway: Gateway, path: Path, *, number: int = 1, log_level_pinned: bool = False
) -> list[str]:
    """Check `path` and its policies whole, then apply what changed; return the changes.

    ConfigError (or PolicyError) with nothing changed when the file or its policies would not
    start a gateway; StoreError, with the stopped devices put back, when the twin cannot
    declare the new points.
    """
    running = gateway.config
    new, policies = await asyncio.to_thread(_read, path, running)
    diff = diff_configs(running, new)
    plan = _prepare(gateway, running_config(running, new), diff, policies)
    await _apply(gateway, plan, number, log_level_pinned)
    changes = diff.summary()
    if plan.policies_changed:
        before, now = len(plan.policies_before), len(plan.policies.enabled)
        changes.append(f"policies {before}→{now}" if before != now else f"policies {now} (edited)")
    log.info("reload %d: %s", number, ", ".join(changes) or "nothing changed")
    gateway.config_status.restart_needed = diff.restart_needed
    if diff.restart_needed:
        log.warning(
            "reload %d: not applied until a restart (the running values stay): %s",
            number,
            ", ".join(diff.restart_needed),
        )
    return changes


# -- the two phases --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    """Everything a reload applies, built and checked before anything changes."""

    config: SiteConfig  # as it will run (keys bound at start as they run)
    diff: ConfigDiff
    points: dict[str, PointDef]
    drivers: dict[str, Driver]  # of the added and changed devices that read (enabled, not http)
    policies: PolicySet
    policies_before: tuple[Policy, ...]  # the enabled ones that ran
    policies_changed: bool
    replace_watch: bool
    anomaly_watch: AnomalyWatch | None
    opcua_server: TwinOpcuaServer | None  # a new one, when the served points changed


def _read(path: Path, running: SiteConfig) -> tuple[SiteConfig, PolicySet]:
    """The new config and its policies, checked as a start checks them (blocking)."""
    new = load_config(path)
    return new, site_policies(running_config(running, new))


def _prepare(gateway: Gateway, config: SiteConfig, diff: ConfigDiff, policies: PolicySet) -> _Plan:
    """Build, without I/O, what Gateway.__init__ builds for what changed: its checks refuse."""
    points = {p.id: p for p in point_defs(config)}
    by_name = {d.name: d for d in config.devices}
    drivers: dict[str, Driver] = {}
    for name in (*diff.devices_added, *diff.devices_changed):
        try:
            driver = build_driver(by_name[name], pki_dir=config.storage.pki_path)
        except Exception as exc:  # the driver's own validation; load_config checked it too
            raise ConfigError(f"devices: {name}: {exc}") from exc
        if driver is not None:
            drivers[name] = driver
    running = gateway.config
    replace_watch = diff.anomalies_changed or (
        diff.points_differ
        and resolve(running.anomalies, gateway.points.values())
        != resolve(config.anomalies, points.values())
    )
    watch = (
        AnomalyWatch.from_config(gateway.store, config.anomalies, points.values())
        if replace_watch
        else gateway.anomaly_watch
    )
    server = None
    # Rebuilt when the points served changed, or when an earlier rebuild could not listen.
    if config.opcua_server.enabled and (diff.points_differ or gateway.opcua_server is None):
        old = gateway.opcua_server
        # The endpoint the running server resolved (a configured port 0 became a real one):
        # clients reconnect to where they were.
        server_config = config.opcua_server
        if old is not None:
            server_config = server_config.model_copy(update={"endpoint": old.endpoint})
        server = gateway.make_opcua_server(server_config, points)
        if old is not None:
            server.max_connections = old.max_connections  # what the descriptor budget allowed
    return _Plan(
        config=config,
        diff=diff,
        points=points,
        drivers=drivers,
        policies=policies,
        policies_before=gateway.policy_set.enabled,
        policies_changed=policies.policies != gateway.policy_set.policies,
        replace_watch=replace_watch,
        anomaly_watch=watch,
        opcua_server=server,
    )


async def _apply(gateway: Gateway, plan: _Plan, number: int, log_level_pinned: bool) -> None:
    diff = plan.diff
    before = {d.name: d for d in gateway.config.devices}
    after = {d.name: d for d in plan.config.devices}
    stopped: list[str] = []
    disabled: list[str] = []
    for name in (*diff.devices_removed, *diff.devices_changed):
        if name not in gateway.drivers:
            continue  # disabled or pushed over HTTP: no driver runs
        device = after.get(name)
        why = None
        if device is None:
            why = f"removed from the site config (reload {number})"
        elif not device.enabled:
            why = f"disabled in the site config (reload {number})"
            disabled.append(name)
        stopped.append(name)
        await gateway.stop_device(name, why)
    if diff.points_differ:
        try:
            await gateway.declare_points(plan.points)
        except GatewayError:
            # Nothing else changed yet: the devices stopped for this reload run again as before.
            for name in stopped:
                driver = build_driver(before[name], pki_dir=gateway.config.storage.pki_path)
                if driver is not None:
                    await gateway.start_device(driver)
            raise
    # From here on the new config runs: the same loop step as the points' swap.
    gateway.config = plan.config
    try:
        await _switch(gateway, plan, disabled, number)
    except Exception as exc:
        # Not a refusal: the new config is partly running (a bug, or a failure nothing
        # checked for). Not a GatewayError, so the reloader does not call it "refused".
        raise RuntimeError(f"after the new points were declared: {exc}") from exc
    problems: list[str] = []
    if plan.opcua_server is not None:
        try:
            await gateway.replace_opcua_server(plan.opcua_server)
            log.info(
                "reload %d: the OPC UA server was restarted with %d points; its clients reconnect",
                number,
                len(plan.points),
            )
        except Exception as exc:
            problem = (
                f"the OPC UA server is down since reload {number}: {_one_line(str(exc))}; "
                "fix the cause and reload again, or restart the gateway"
            )
            log.error("%s", problem)
            problems.append(problem)
    gateway.config_status.problems = problems
    if diff.points_differ and gateway.sync is not None:
        gateway.sync.request_rebirth()  # the cloud's view of the points changed
    if diff.log_level_changed and not log_level_pinned:
        logging.getLogger().setLevel(plan.config.log_level)


async def _switch(gateway: Gateway, plan: _Plan, disabled: list[str], number: int) -> None:
    """Policies, push sources, drivers and detectors onto the new config (it is committed)."""
    if plan.policies_changed or plan.diff.points_differ:
        gateway.replace_policies(plan.policies)
    after = {d.name: d for d in plan.config.devices}
    for name in disabled:
        _mark_stale(gateway, after[name], f"device disabled in the site config (reload {number})")
    if plan.diff.devices_differ:
        await gateway.reconfigure_push(plan.config)
    for driver in plan.drivers.values():
        await gateway.start_device(driver)
    if plan.replace_watch:
        await gateway.replace_anomaly_watch(plan.anomaly_watch)


def _mark_stale(gateway: Gateway, device: DeviceConfig, reason: str) -> None:
    """A disabled device's values stay but are no longer current: STALE, as a lost device's."""
    if isinstance(device, HttpDeviceConfig):
        return
    samples = [
        Sample(p.id, None, Quality.STALE, None, reason)
        for p in device.points
        if gateway.store.get(p.id).rev  # never had a value: BAD already, nothing to be stale
    ]
    if samples:
        gateway.store.ingest(samples)


# -- helpers ---------------------------------------------------------------------------------------


def _driver_view(device: DeviceConfig) -> DeviceConfig:
    """The device as its driver sees it: without the points' descriptions and units."""
    points = [p.model_copy(update={"description": "", "unit": ""}) for p in device.points]
    return device.model_copy(update={"points": points})


def _changed_paths(old: Any, new: Any, path: str) -> Iterator[str]:
    """Dotted key paths under `path` where two JSON documents differ; lists are compared whole."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        keys = [*old, *(k for k in new if k not in old)]
        for key in keys:
            yield from _changed_paths(old.get(key), new.get(key), f"{path}.{key}")
    elif old != new:
        yield path


def _count(sign: str, n: int, noun: str) -> str:
    return f"{sign}{n} {noun}{'s' if n != 1 else ''}"


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown + (f", … {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


def _one_line(message: str) -> str:
    """A loader's message (a head line, then one indented line per problem) as one line."""
    head, *rest = message.strip().splitlines() or [""]
    return " ".join([head, "; ".join(line.strip() for line in rest)]).strip()
