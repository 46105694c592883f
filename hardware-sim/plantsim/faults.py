"""Fault injection: switches a test or the demo flips on a running device.

Signal faults (freeze, spike, noise) change what a device *reports*, never the physics behind
it: a stuck transmitter does not stop the water. Link faults (refuse, slow, garbage, drop,
stop/start, restart) act on the device's server. Protocol-specific faults live in subclasses:
`ModbusFaults.exception` and `ModbusFaults.ignore_writes`, `OpcuaFaults.bad_status`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from .modbus.codec import TABLES

# What a signal can be: analog values, switches, counters, and the odd text (a mode).
Value = float | bool | int | str

_BAD = 0x80000000  # OPC UA status severity bits 31..30: 10 = Bad, 01 = Uncertain, 00 = Good


class Link(Protocol):
    """What the faults need from the device that owns them."""

    @property
    def halted(self) -> bool:
        """Whether the server is stopped (by `halt`) while the device runs."""
        ...

    def drop_connections(self) -> int:
        """Close every client connection now; return how many."""
        ...

    async def restart(self, downtime: float = 0.0) -> None:
        """Stop the server and start it again on the same port."""
        ...

    async def halt(self) -> None:
        """Stop the server; the plant keeps running."""
        ...

    async def resume(self) -> None:
        """Serve again on the same port after `halt`."""
        ...


@dataclass(frozen=True)
class _Spike:
    delta: float
    until: float


class Faults:
    """The fault switches every device has."""

    def __init__(
        self,
        signals: Iterable[str],
        *,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create with every fault off; `signals` are the names freeze/spike/noise accept."""
        self.signals = frozenset(signals)
        self._rng = random.Random(f"faults/{seed}")
        self._clock = clock
        self._link: Link | None = None
        self._served: dict[str, Value] = {}
        self.on_change: Callable[[], None] | None = None
        self._reset()

    # -- link faults -------------------------------------------------------------------------

    def drop_connections(self) -> int:
        """Close every client connection now; return how many were open."""
        return self._require_link().drop_connections()

    async def restart(self, downtime: float = 0.0) -> None:
        """Stop the server, wait `downtime` seconds, start it again on the same port."""
        await self._require_link().restart(downtime)

    async def stop(self) -> None:
        """Stop the server (connections are refused) until `start`; the plant keeps running."""
        await self._require_link().halt()

    async def start(self) -> None:
        """Serve again on the same port after `stop`."""
        await self._require_link().resume()

    def refuse(self, on: bool = True) -> None:
        """Close new connections at once (the port stays bound); False accepts again."""
        self.refusing = bool(on)

    def slow(self, seconds: float) -> None:
        """Delay every response by `seconds` (0 turns it off)."""
        if seconds < 0:
            raise ValueError(f"slow: negative delay {seconds}")
        self.delay_s = float(seconds)

    def garbage(self, on: bool = True) -> None:
        """Answer every request with a malformed frame."""
        self.garbled = bool(on)

    # -- signal faults -----------------------------------------------------------------------

    def freeze(self, signal: str, on: bool = True, value: Value | None = None) -> None:
        """Hold `signal` at the value served now, or at `value` (a transmitter stuck at a reading
        of its own); False lets it move again."""
        stuck_at_number = isinstance(value, int | float) and not isinstance(value, bool)
        self._check(signal, numeric=stuck_at_number)
        if on:
            self._frozen[signal] = self._served.get(signal) if value is None else value
        else:
            self._frozen.pop(signal, None)
        self._changed()

    def spike(self, signal: str, delta: float, duration_s: float) -> None:
        """Add `delta` to `signal` for `duration_s` seconds (wall clock)."""
        self._check(signal, numeric=True)
        if duration_s <= 0:
            raise ValueError(f"spike: duration {duration_s} s must be positive")
        self._spikes[signal] = _Spike(float(delta), self._clock() + duration_s)
        self._changed()

    def noise(self, signal: str, sigma: float) -> None:
        """Add Gaussian noise of standard deviation `sigma` to `signal` (0 turns it off)."""
        self._check(signal, numeric=True)
        if sigma < 0:
            raise ValueError(f"noise: negative sigma {sigma}")
        if sigma:
            self._noise[signal] = float(sigma)
        else:
            self._noise.pop(signal, None)
        self._changed()

    def clear(self) -> None:
        """Remove every fault."""
        self._reset()
        self._changed()

    def active(self) -> dict[str, object]:
        """Describe the faults that are on (for logs and the CLI)."""
        now = self._clock()
        out: dict[str, object] = {}
        if self._link is not None and self._link.halted:
            out["stopped"] = True
        if self.refusing:
            out["refuse"] = True
        if self.delay_s:
            out["slow"] = self.delay_s
        if self.garbled:
            out["garbage"] = True
        if self._frozen:
            out["freeze"] = sorted(self._frozen)
        spikes = {k: s.delta for k, s in self._spikes.items() if s.until > now}
        if spikes:
            out["spike"] = spikes
        if self._noise:
            out["noise"] = dict(self._noise)
        return out

    # -- used by the device ------------------------------------------------------------------

    def attach(self, link: Link) -> None:
        """Bind to the device whose server the link faults act on."""
        self._link = link

    def apply(self, values: Mapping[str, Value]) -> dict[str, Value]:
        """Return `values` as the device reports them with the signal faults applied."""
        now = self._clock()
        out = dict(values)
        for name, spike in list(self._spikes.items()):
            if spike.until <= now:
                del self._spikes[name]
            else:
                out[name] = float(out[name]) + spike.delta
        for name, sigma in self._noise.items():
            out[name] = float(out[name]) + self._rng.gauss(0.0, sigma)
        for name, held in self._frozen.items():
            if held is None:
                # Frozen before anything was served: hold the first value served.
                self._frozen[name] = held = out[name]
            out[name] = held
        self._served = out
        return out

    def _reset(self) -> None:
        self.refusing = False
        self.delay_s = 0.0
        self.garbled = False
        self._frozen: dict[str, Value | None] = {}
        self._spikes: dict[str, _Spike] = {}
        self._noise: dict[str, float] = {}

    def _changed(self) -> None:
        if self.on_change:
            self.on_change()

    def _check(self, signal: str, numeric: bool = False) -> None:
        if signal not in self.signals:
            known = ", ".join(sorted(self.signals))
            raise KeyError(f"unknown signal {signal!r}; this device has: {known}")
        served = self._served.get(signal)
        if numeric and isinstance(served, bool | str):
            kind = "a boolean" if isinstance(served, bool) else "a text"
            raise ValueError(f"{signal!r} is {kind} signal; only freeze applies to it")

    def _require_link(self) -> Link:
        if self._link is None:
            raise RuntimeError("these faults are not attached to a running device")
        return self._link


@dataclass(frozen=True)
class _ExceptionRule:
    code: int
    table: str | None
    addresses: frozenset[int] | None


@dataclass(frozen=True)
class _IgnoreRule:
    above: int
    table: str | None
    addresses: frozenset[int] | None


class ModbusFaults(Faults):
    """Faults of a Modbus device: the common switches plus exception responses and ignored
    writes."""

    def exception(
        self, code: int, table: str | None = None, addresses: Iterable[int] | None = None
    ) -> None:
        """Answer requests (reads and writes) touching `table`/`addresses` with exception `code`.

        No `table` means every table; no `addresses` means every address. Rules add up; the
        newest matching one wins. `clear()` removes them.
        """
        if not 1 <= code <= 255:
            raise ValueError(f"exception: code {code} outside 1..255")
        if table is not None and table not in TABLES:
            raise ValueError(f"exception: table {table!r}; use one of {', '.join(TABLES)}")
        chosen = frozenset(addresses) if addresses is not None else None
        self._rules.insert(0, _ExceptionRule(code, table, chosen))

    def exception_for(self, table: str, address: int, count: int) -> int | None:
        """Return the exception code to answer a request with, or None."""
        for rule in self._rules:
            if rule.table is not None and rule.table != table:
                continue
            if rule.addresses is None or any(
                a in rule.addresses for a in range(address, address + count)
            ):
                return rule.code
        return None

    def ignore_writes(
        self, above: int = -1, table: str | None = None, addresses: Iterable[int] | None = None
    ) -> None:
        """Acknowledge writes of a raw value above `above` to `table`/`addresses`, and keep the
        old value: the device answers as if it wrote, and reading back shows what it held.

        A raw value is the register word (0..65535) or, for a coil, 1 or 0; the default -1
        ignores every write. A request is ignored whole when any value it writes to a matching
        address is above. No `table` means every table; no `addresses` every address. Rules add
        up; `clear()` removes them. Some controllers do this with a setpoint beyond what they
        accept (issue 16: one silently ignored values > 1000).
        """
        if isinstance(above, bool) or not isinstance(above, int) or not -1 <= above <= 0xFFFF:
            raise ValueError(f"ignore_writes: above {above!r} is not a whole number in -1..65535")
        if table is not None and table not in TABLES:
            raise ValueError(f"ignore_writes: table {table!r}; use one of {', '.join(TABLES)}")
        chosen = frozenset(addresses) if addresses is not None else None
        self._ignored.append(_IgnoreRule(above, table, chosen))

    def ignores(self, table: str, address: int, values: Iterable[int | bool]) -> bool:
        """Whether a write of `values` from `address` is to be acknowledged and not applied."""
        for rule in self._ignored:
            if rule.table is not None and rule.table != table:
                continue
            for a, raw in enumerate(values, start=address):
                if (rule.addresses is None or a in rule.addresses) and int(raw) > rule.above:
                    return True
        return False

    def active(self) -> dict[str, object]:
        """Describe the faults that are on, exception and ignored-write rules included."""
        out = super().active()
        if self._rules:
            out["exception"] = [
                (r.code, r.table, sorted(r.addresses) if r.addresses else None) for r in self._rules
            ]
        if self._ignored:
            out["ignore_writes"] = [
                (r.above, r.table, sorted(r.addresses) if r.addresses else None)
                for r in self._ignored
            ]
        return out

    def _reset(self) -> None:
        super()._reset()
        self._rules: list[_ExceptionRule] = []
        self._ignored: list[_IgnoreRule] = []


class OpcuaFaults(Faults):
    """Faults of an OPC UA device: the common switches plus bad status codes per variable."""

    #: The status told to clients before a stop or restart closes them; None: no notice.
    notice: int | None

    def bad_status(self, signal: str, status: str | int, on: bool = True) -> None:
        """Serve `signal` with OPC UA status `status`, a name (`BadSensorFailure`) or a code.

        A Bad status serves a null value, as OPC UA Part 4 says; Uncertain and Good ones keep
        the value. False removes it again; `clear()` removes them all.
        """
        self._check(signal)
        if on:
            code = status_code(status)
            self._status[signal] = code
        else:
            self._status.pop(signal, None)
        self._changed()

    def status_of(self, signal: str) -> int:
        """The status code `signal` is served with now (0 = Good)."""
        return self._status.get(signal, 0)

    def statuses(self) -> dict[str, int]:
        """Every signal served with a status other than Good, and its code."""
        return dict(self._status)

    def garbage(self, on: bool = True) -> None:
        """Refuse: malformed frames are a Modbus fault here; OPC UA has slow, drop, bad_status."""
        if on:
            raise ValueError("garbage: not available on an OPC UA device")

    def shutdown_notice(self, status: str | int | None = "BadServerHalted") -> None:
        """On `stop` and `restart`, first tell each client `status` in an OPC UA Error message.

        A PLC shut down in order (a restart from its engineering tool) does so before closing
        the socket (Part 6, 7.1.5). None: close without a word, as a power cut does (the
        default).
        """
        self.notice = None if status is None else status_code(status)

    def active(self) -> dict[str, object]:
        """Describe the faults that are on, bad status codes included."""
        out = super().active()
        if self._status:
            out["bad_status"] = {s: status_name(c) for s, c in sorted(self._status.items())}
        if self.notice is not None:
            out["shutdown_notice"] = status_name(self.notice)
        return out

    def _reset(self) -> None:
        super()._reset()
        self._status: dict[str, int] = {}
        self.notice = None


def status_code(status: str | int) -> int:
    """Return the numeric OPC UA status code for a name (`BadSensorFailure`) or number."""
    # Imported here: the generic faults need no protocol library to load.
    from asyncua.ua.status_codes import StatusCodes, code_to_name_doc

    if isinstance(status, str):
        text = status.strip()
        if text[:1].isdigit():
            status = int(text, 0)
        else:
            code = getattr(StatusCodes, text, None)
            if not isinstance(code, int):
                raise ValueError(
                    f"unknown OPC UA status {text!r}; use a name such as BadSensorFailure, "
                    "UncertainLastUsableValue, or a number such as 0x808C0000"
                )
            return code
    # The low 16 bits are info bits (overflow, limits); the table knows the upper half.
    if not 0 <= status <= 0xFFFFFFFF or status & 0xFFFF0000 not in code_to_name_doc:
        raise ValueError(f"unknown OPC UA status code {status:#010x}")
    return status


def status_name(code: int) -> str:
    """Return the symbolic name of an OPC UA status code."""
    from asyncua.ua.status_codes import code_to_name_doc

    name = code_to_name_doc.get(code & 0xFFFF0000, (f"{code:#010x}", ""))[0]
    return name if code & 0xFFFF == 0 else f"{name}+{code & 0xFFFF:#06x}"


def is_bad(code: int) -> bool:
    """Whether an OPC UA status code has Bad severity."""
    return bool(code & _BAD)
