"""`python -m plantsim`: run the simulated plant until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Mapping

from .control import USAGE, FaultCommand, FaultSpecError, apply_fault, parse_fault
from .device_base import Device
from .modbus.bench import MAX_POINTS as BENCH_MAX_POINTS
from .plant import Plant

log = logging.getLogger("plantsim")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the plant, return an exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.plc_port is None:
        given = [flag for flag, on in _PLC_OPTIONS.items() if on(args)]
        if given:
            parser.error(f"{', '.join(given)} need(s) --plc-port (the oven runs only with it)")
    try:
        users = dict(_user(text) for text in args.plc_user)
    except ValueError as exc:
        parser.error(str(exc))
    level = getattr(logging, args.log_level)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # asyncua logs every request at INFO; its warnings and errors still show.
    logging.getLogger("asyncua").setLevel(max(level, logging.WARNING))
    try:
        faults = [parse_fault(text) for text in args.fault]
    except FaultSpecError as exc:
        print(f"plantsim: {exc}", file=sys.stderr)
        return 2
    plant = Plant(
        args.seed,
        host=args.host,
        tank_port=args.tank_port,
        meter_port=args.meter_port,
        plc_port=args.plc_port,
        framer=args.framer,
        meter_word_order=args.meter_word_order,
        speed=args.speed,
        plc_security=args.plc_security,
        plc_pki_dir=args.plc_pki_dir,
        plc_users=users,
        plc_extra_signals=args.plc_extra_signals,
        plc_extra_rate_hz=args.plc_extra_rate,
        bench_points=args.bench_points,
        bench_port=args.bench_port,
    )
    try:
        asyncio.run(_run(plant, faults, args))
    except OSError as exc:
        print(f"plantsim: cannot serve: {exc}", file=sys.stderr)
        return 1
    except FaultSpecError as exc:
        print(f"plantsim: {exc}", file=sys.stderr)
        return 2
    return 0


async def _run(plant: Plant, faults: list[FaultCommand], args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with plant:
        for device in plant.devices.values():
            log.info("%s", describe(device, args.seed))
        tasks = [asyncio.create_task(_later(c, plant.devices)) for c in faults if c.delay_s]
        for command in faults:
            if not command.delay_s:
                log.info("%s", await apply_fault(command, plant.devices))
        if args.stdin:
            tasks.append(asyncio.create_task(_read_stdin(plant.devices)))
        await stop.wait()
        log.info("stopping")
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    log.info("stopped")


def describe(device: Device, seed: int) -> str:
    """Return the start-up line for a device: name, endpoint, protocol settings."""
    return (
        f"{device.name} listening on {device.endpoint} ({device.summary}, "
        f"seed {seed}, speed {device.speed:g})"
    )


async def _later(command: FaultCommand, devices: Mapping[str, Device]) -> None:
    await asyncio.sleep(command.delay_s)
    try:
        log.info("%s", await apply_fault(command, devices))
    except FaultSpecError as exc:
        log.error("%s", exc)


async def _read_stdin(devices: Mapping[str, Device]) -> None:
    """Apply one fault command per line of stdin (the demo's tiny control channel)."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def pump() -> None:
        # A daemon thread, not the loop's executor: a blocked readline must not delay exit.
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, "")

    threading.Thread(target=pump, name="plantsim-stdin", daemon=True).start()
    pending: set[asyncio.Task[None]] = set()
    while line := await lines.get():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            command = parse_fault(line)
            if command.delay_s:
                task = asyncio.create_task(_later(command, devices))
                pending.add(task)
                task.add_done_callback(pending.discard)
            else:
                log.info("%s", await apply_fault(command, devices))
        except FaultSpecError as exc:
            log.error("%s", exc)


_PLC_OPTIONS = {
    "--plc-security": lambda a: a.plc_security,
    "--plc-pki-dir": lambda a: a.plc_pki_dir is not None,
    "--plc-user": lambda a: bool(a.plc_user),
    "--plc-extra-signals": lambda a: bool(a.plc_extra_signals),
    "--plc-extra-rate": lambda a: a.plc_extra_rate is not None,
}


def _user(text: str) -> tuple[str, str]:
    name, sep, password = text.partition(":")
    if not sep or not name:
        raise ValueError(f"--plc-user {text!r}: expected NAME:PASSWORD")
    return name, password


def _count(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"{text} outside 0..100000")
    return value


def _bench_count(text: str) -> int:
    value = int(text)
    if not 0 <= value <= BENCH_MAX_POINTS:
        raise argparse.ArgumentTypeError(f"{text} outside 0..{BENCH_MAX_POINTS}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m plantsim",
        description="Run the simulated plant (cooling-water tank and energy meter over Modbus "
        "TCP; with --plc-port, the curing oven behind an OPC UA PLC; with --bench-points, a "
        "Modbus bench device) until SIGINT or SIGTERM.",
        epilog=USAGE + "\n\nDEVICE is tank, meter, oven or bench. Examples: "
        "--fault tank:spike:level,1.0,10@30  --fault oven:bad_status:temperature,BadSensorFailure",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random process")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--tank-port", type=int, default=5020, help="tank's port; 0 picks a free one")
    p.add_argument("--meter-port", type=int, default=5021, help="meter's port; 0 picks one")
    p.add_argument(
        "--plc-port",
        type=int,
        default=None,
        help="serve the oven's OPC UA PLC on this port (0 picks a free one); without it, no oven",
    )
    p.add_argument(
        "--plc-security",
        action="store_true",
        help="also offer Basic256Sha256 Sign and SignAndEncrypt (self-signed certificate)",
    )
    p.add_argument(
        "--plc-pki-dir",
        default=None,
        metavar="DIR",
        help="where the PLC's certificate and key are made (default: a temporary directory)",
    )
    p.add_argument(
        "--plc-user",
        action="append",
        default=[],
        metavar="NAME:PASSWORD",
        help="require a username and password (repeatable); default anonymous",
    )
    p.add_argument(
        "--plc-extra-signals",
        type=_count,
        default=0,
        metavar="N",
        help="add N bench doubles ns=2;s=Bench.Signal00000.. changing on every update",
    )
    p.add_argument(
        "--plc-extra-rate",
        type=_non_negative,
        default=None,
        metavar="HZ",
        help="bench signal update rate (default: the tick rate, 10 Hz)",
    )
    p.add_argument(
        "--bench-points",
        type=_bench_count,
        default=0,
        metavar="N",
        help="also serve N float32 values in holding registers 0..2N-1, all changing on every "
        "tick (device `bench`); default none",
    )
    p.add_argument(
        "--bench-port", type=int, default=5022, help="bench device's port; 0 picks a free one"
    )
    p.add_argument("--speed", type=_non_negative, default=1.0, help="plant seconds per wall second")
    p.add_argument(
        "--meter-word-order",
        choices=("little", "big"),
        default="little",
        help="word order of the meter's 32/64-bit values (default little = CDAB)",
    )
    p.add_argument(
        "--framer",
        choices=("socket", "rtu"),
        default="socket",
        help="Modbus TCP (socket, MBAP) or RTU framing over TCP",
    )
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="DEVICE:FAULT[:ARGS][@S]",
        help="inject a fault at start (or S seconds later); repeatable",
    )
    p.add_argument(
        "--stdin", action="store_true", help="also read fault commands, one per line, from stdin"
    )
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


if __name__ == "__main__":
    sys.exit(main())
