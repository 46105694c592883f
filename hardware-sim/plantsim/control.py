"""Fault commands as text, `DEVICE:FAULT[:ARGS][@DELAY]`, for the command line and stdin.

ARGS are comma-separated. Examples: `tank:spike:level,1.0,10`, `meter:exception:4,input,0-1`,
`tank:refuse:on`, `tank:restart:2`, `meter:slow:0.5@30` (30 s after start), `tank:clear`,
`oven:bad_status:temperature,BadSensorFailure`, `oven:stop`, `oven:start`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .device_base import Device
from .faults import Faults

USAGE = """\
faults (DEVICE:FAULT[:ARGS][@DELAY_S]):
  drop_connections                 close every client connection now
  refuse[:on|off]                  close new connections at once (port stays bound)
  stop / start                     stop the server (port closed) / serve again on the same port
  restart[:DOWNTIME_S]             stop the server and start it again on the same port
  exception:CODE[,TABLE[,ADDR|LO-HI]...]   answer matching requests with a Modbus exception
  ignore_writes:ABOVE[,TABLE[,ADDR|LO-HI]...]  acknowledge writes of raw values > ABOVE, keep old
  bad_status:SIGNAL,STATUS[,on|off]        serve an OPC UA status (BadSensorFailure, 0x808C0000)
  freeze:SIGNAL[,on|off|VALUE]     hold a signal at its current value, or stuck at VALUE
  spike:SIGNAL,DELTA,DURATION_S    add DELTA to a signal for a while
  noise:SIGNAL,SIGMA               extra Gaussian noise (0 turns it off)
  slow:SECONDS                     delay every response
  garbage[:on|off]                 answer with malformed frames
  clear                            remove every fault (and start a stopped server)
  ambient:OFFSET_C                 oven only: the hall warms (cools) by OFFSET_C °C from its usual
                                   22 °C: the physics, not the reading (0 puts it back)"""

# A hall 40 °C warmer or colder than usual is no hall; beyond it the oven's physics says little.
AMBIENT_OFFSET_MAX_C = 40.0

_ON = {
    "on": True,
    "true": True,
    "1": True,
    "yes": True,
    "off": False,
    "false": False,
    "0": False,
    "no": False,
}


class FaultSpecError(ValueError):
    """A fault command that cannot be parsed or applied."""


@dataclass(frozen=True)
class FaultCommand:
    """A parsed fault command."""

    device: str
    fault: str
    args: tuple[str, ...]
    delay_s: float = 0.0
    text: str = ""


def parse_fault(text: str) -> FaultCommand:
    """Parse `DEVICE:FAULT[:ARGS][@DELAY]`."""
    spec = text.strip()
    delay = 0.0
    if "@" in spec:
        spec, _, when = spec.rpartition("@")
        delay = _number(when, text, "delay")
    parts = spec.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise FaultSpecError(f"{text!r}: expected DEVICE:FAULT[:ARGS], e.g. tank:spike:level,1,10")
    args = tuple(a.strip() for a in parts[2].split(",")) if len(parts) == 3 and parts[2] else ()
    return FaultCommand(parts[0], parts[1], args, delay, text.strip())


async def apply_fault(command: FaultCommand, devices: Mapping[str, Device]) -> str:
    """Apply a parsed command to its device; return a line describing what was done."""
    device = devices.get(command.device)
    if device is None:
        raise FaultSpecError(
            f"{command.text!r}: no device {command.device!r}; devices: {', '.join(devices)}"
        )
    f, a, t = device.faults, command.args, command.text
    try:
        match command.fault:
            case "drop_connections" | "drop":
                return f"{device.name}: dropped {f.drop_connections()} connection(s)"
            case "refuse":
                f.refuse(_flag(a, t))
            case "restart":
                await f.restart(_number(a[0], t, "downtime") if a else 0.0)
            case "stop":
                await f.stop()
            case "start":
                await f.start()
            case "exception":
                _exception(device, a, t)
            case "ignore_writes":
                _ignore_writes(device, a, t)
            case "bad_status":
                _bad_status(device, a, t)
            case "ambient":
                _ambient(device, a, t)
            case "freeze":
                _freeze(f, a, t)
            case "spike":
                f.spike(
                    _arg(a, 0, t, "SIGNAL"),
                    _number(_arg(a, 1, t, "DELTA"), t, "delta"),
                    _number(_arg(a, 2, t, "DURATION_S"), t, "duration"),
                )
            case "noise":
                f.noise(_arg(a, 0, t, "SIGNAL"), _number(_arg(a, 1, t, "SIGMA"), t, "sigma"))
            case "slow":
                f.slow(_number(_arg(a, 0, t, "SECONDS"), t, "seconds"))
            case "garbage":
                f.garbage(_flag(a, t))
            case "clear":
                f.clear()
                if device.halted:
                    await f.start()
            case other:
                raise FaultSpecError(f"{t!r}: unknown fault {other!r}\n{USAGE}")
    except (KeyError, ValueError, RuntimeError) as exc:
        if isinstance(exc, FaultSpecError):
            raise
        raise FaultSpecError(f"{t!r}: {exc.args[0] if exc.args else exc}") from exc
    return f"{device.name}: {command.fault}({', '.join(a)}) applied; active: {f.active()}"


def _exception(device: Device, args: tuple[str, ...], text: str) -> None:
    exception = getattr(device.faults, "exception", None)
    if exception is None:
        raise FaultSpecError(f"{text!r}: {device.name} has no Modbus exception fault")
    code = int(_number(_arg(args, 0, text, "CODE"), text, "code"))
    exception(code, *_where(args[1:], text))


def _ignore_writes(device: Device, args: tuple[str, ...], text: str) -> None:
    ignore_writes = getattr(device.faults, "ignore_writes", None)
    if ignore_writes is None:
        raise FaultSpecError(f"{text!r}: {device.name} has no Modbus ignore_writes fault")
    above = _number(_arg(args, 0, text, "ABOVE"), text, "above")
    if not above.is_integer():
        raise FaultSpecError(f"{text!r}: above {args[0]!r} is not a whole raw value")
    ignore_writes(int(above), *_where(args[1:], text))


def _where(args: tuple[str, ...], text: str) -> tuple[str | None, list[int] | None]:
    """`TABLE[,ADDR|LO-HI]...` of a Modbus rule: None for every table, every address."""
    table = args[0] if args and args[0] else None
    addresses: list[int] | None = None
    for item in args[1:]:
        lo, _, hi = item.partition("-")
        first, last = int(_number(lo, text, "address")), int(_number(hi or lo, text, "address"))
        addresses = [*(addresses or []), *range(first, last + 1)]
    return table, addresses


def _ambient(device: Device, args: tuple[str, ...], text: str) -> None:
    # Not a fault of the device: the plant's surroundings change (the demo warms the hall so
    # that the open-loop oven drifts, and the policy engine has something to correct).
    model = device.model
    if not hasattr(model, "ambient_offset_c"):
        raise FaultSpecError(f"{text!r}: {device.name} has no ambient to move (the oven has)")
    offset = _number(_arg(args, 0, text, "OFFSET_C"), text, "offset")
    if not -AMBIENT_OFFSET_MAX_C <= offset <= AMBIENT_OFFSET_MAX_C:  # also refuses NaN
        raise FaultSpecError(f"{text!r}: offset {offset:g} °C outside ±{AMBIENT_OFFSET_MAX_C:g} °C")
    model.ambient_offset_c = offset


def _bad_status(device: Device, args: tuple[str, ...], text: str) -> None:
    bad_status = getattr(device.faults, "bad_status", None)
    if bad_status is None:
        raise FaultSpecError(f"{text!r}: {device.name} has no OPC UA status fault")
    bad_status(_arg(args, 0, text, "SIGNAL"), _arg(args, 1, text, "STATUS"), _flag(args[2:], text))


def _arg(args: tuple[str, ...], i: int, text: str, name: str) -> str:
    if len(args) <= i or not args[i]:
        raise FaultSpecError(f"{text!r}: missing {name}\n{USAGE}")
    return args[i]


def _freeze(faults: Faults, args: tuple[str, ...], text: str) -> None:
    signal = _arg(args, 0, text, "SIGNAL")
    if len(args) > 1 and args[1].lower() not in _ON:
        # A transmitter stuck at a reading of its own: `tank:freeze:level,4.4`.
        faults.freeze(signal, value=_number(args[1], text, "value"))
    else:
        faults.freeze(signal, _flag(args[1:], text))


def _flag(args: tuple[str, ...], text: str) -> bool:
    if not args:
        return True
    try:
        return _ON[args[0].lower()]
    except KeyError:
        raise FaultSpecError(f"{text!r}: {args[0]!r} is not on/off") from None


def _number(value: str, text: str, name: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise FaultSpecError(f"{text!r}: {name} {value!r} is not a number") from None
