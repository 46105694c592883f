"""The Modbus driver: planned block reads at a fixed rate, checked writes with read-back.

One `ModbusDriver` is one device (one unit id) on one endpoint. Its supervisor (see
`drivers.base`) connects, polls and reconnects; a device that refuses some addresses, answers
with garbage or stops answering for a while only marks the affected points BAD. Garbage keeps
the connection (the device is there: a reconnect would only flap its state); silence makes the
driver reconnect by itself after `failures_before_reconnect` silent polls. A poll reads its
blocks with up to `max_in_flight` requests outstanding (Modbus TCP) and applies the answers in
plan order. It hands over only the points whose value changed since it last reported them,
and every BAD one (see `decoder`); after a reconnect, a split plan or dropped batches, all.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pymodbus.client.base import ModbusBaseClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from drivers.backoff import Backoff
from drivers.base import Driver
from drivers.contract import Quality, Sample
from drivers.errors import (
    ConfigurationError,
    ConnectionLostError,
    DeviceResponseError,
    WriteRejectedError,
    WriteVerifyError,
)
from drivers.limits import limit_violation
from drivers.modbus.bus import Bus, BusSettings, MalformedResponse, get_bus, parse_endpoint
from drivers.modbus.codec import DataType, Format, Table, decode, encode, set_bit, tolerance
from drivers.modbus.decoder import BlockDecoder
from drivers.modbus.options import ModbusOptions
from drivers.modbus.plan import Block, plan_reads, split_block
from drivers.modbus.point import ModbusPoint
from drivers.quality import assess, format_range

__all__ = ["EXCEPTION_NAMES", "ModbusDriver"]

log = logging.getLogger(__name__)

EXCEPTION_NAMES = {
    1: "ILLEGAL FUNCTION",
    2: "ILLEGAL DATA ADDRESS",
    3: "ILLEGAL DATA VALUE",
    4: "SERVER DEVICE FAILURE",
    5: "ACKNOWLEDGE",
    6: "SERVER DEVICE BUSY",
    7: "NEGATIVE ACKNOWLEDGE",
    8: "MEMORY PARITY ERROR",
    10: "GATEWAY PATH UNAVAILABLE",
    11: "GATEWAY TARGET DEVICE FAILED TO RESPOND",
}

# Exception codes that describe the device's state, not the addresses asked for: splitting a
# merged read that got one of these would learn nothing. Every other code (2 ILLEGAL DATA
# ADDRESS above all, but devices also answer 3 for a read across a hole, or 4 for the registers
# of a failed module) may concern only some addresses, so the block is split to find them.
_DEVICE_STATE_CODES = frozenset({5, 6, 10, 11})

_READ = {
    Table.COIL: "read_coils",
    Table.DISCRETE: "read_discrete_inputs",
    Table.HOLDING: "read_holding_registers",
    Table.INPUT: "read_input_registers",
}


class ModbusDriver(Driver):
    """Polls one Modbus device and writes its writable points."""

    def __init__(
        self,
        name: str,
        endpoint: str,
        options: ModbusOptions | Mapping[str, Any] | None = None,
        points: Iterable[ModbusPoint] = (),
        *,
        backoff: Backoff | None = None,
        queue_size: int = 256,
        merge_retry_s: float = 60.0,
    ) -> None:
        super().__init__(name, backoff=backoff, queue_size=queue_size)
        try:
            self.options = (
                options
                if isinstance(options, ModbusOptions)
                else ModbusOptions.model_validate(options or {})
            )
        except ValidationError as exc:
            raise ConfigurationError(f"{name}: invalid options: {exc}") from exc
        self.endpoint = parse_endpoint(endpoint)
        self._merge_retry_s = merge_retry_s
        opts = self.options
        framer = opts.framer or ("rtu" if self.endpoint.kind == "serial" else "socket")
        if self.endpoint.kind == "serial" and framer != "rtu":
            raise ConfigurationError(f"{name}: a serial endpoint needs framer rtu, not {framer}")
        if framer == "rtu" and opts.max_in_flight > 1:
            raise ConfigurationError(
                f"{name}: max_in_flight {opts.max_in_flight} needs Modbus TCP (framer socket); "
                "a serial bus carries one frame at a time"
            )
        self.max_in_flight = opts.max_in_flight

        self._points: dict[str, ModbusPoint] = {}
        for p in points:
            if not isinstance(p, ModbusPoint):
                raise ConfigurationError(f"{name}: expected ModbusPoint objects, got {p!r}")
            if p.key in self._points:
                raise ConfigurationError(f"{name}: point key {p.key!r} appears twice")
            self._points[p.key] = p
        self._formats: dict[str, Format] = {
            k: p.format(opts.byte_order, opts.word_order) for k, p in self._points.items()
        }
        try:
            self._plan = plan_reads(
                self._points.values(),
                unit=opts.unit_id,
                max_registers=opts.max_registers,
                max_bits=opts.max_bits,
                max_gap=opts.max_gap,
            )
        except ConfigurationError as exc:
            raise ConfigurationError(f"{name}: {exc}") from None

        delay = opts.inter_frame_delay_s
        if delay is None:
            # Modbus RTU: 3.5 character times of silence (11 bits each), fixed above 19200 bit/s.
            delay = (
                max(3.5 * 11 / opts.baudrate, 0.00175) if self.endpoint.kind == "serial" else 0.0
            )
        settings = BusSettings(
            framer=framer,
            timeout_s=opts.timeout_s,
            inter_frame_delay_s=delay,
            baudrate=opts.baudrate,
            parity=opts.parity,
            stopbits=opts.stopbits,
            bytesize=opts.bytesize,
            max_in_flight=self.max_in_flight,
        )
        self._bus: Bus = get_bus(self.endpoint, settings)
        # One decoder per planned block, built once; each remembers what it last reported, so
        # a poll hands over only the points that changed (issue 14).
        self._decoders = [BlockDecoder(b, self._formats) for b in self._plan]
        self._dropped_seen = 0
        self._overrides: dict[int, _Override] = {}
        self._split_seen: set[Block] = set()
        self._silent_polls = 0
        self._silent_since = 0.0

    # -- Driver API -----------------------------------------------------------------------------

    @property
    def keys(self) -> Sequence[str]:
        """Keys of every point this driver serves."""
        return tuple(self._points)

    @property
    def target(self) -> str:
        """The endpoint, e.g. `tcp://10.0.0.5:502`."""
        return str(self.endpoint)

    @property
    def read_plan(self) -> Sequence[Block]:
        """The merged block reads one poll performs (before any split for refused addresses)."""
        return tuple(self._plan)

    async def write(self, key: str, value: Any) -> Any:
        """Write a point, read it back, verify it, emit it as GOOD and return the value read."""
        point = self._points.get(key)
        if point is None:
            raise WriteRejectedError(f"{self.name}: no point {key!r} on this device")
        fmt = self._formats[key]
        limits = format_range(point.lo, point.hi)
        where = f"{self.name} {point.address} ({key}, limits {limits})"
        refused = f"{where}: refused to write {value!r}"
        if not point.writable:
            raise WriteRejectedError(f"{refused}: the point is not writable")
        problem = _check_value(point, value)
        if problem:
            raise WriteRejectedError(f"{refused}: {problem}")
        try:
            words = encode(fmt, value)
        except ValueError as exc:
            raise WriteRejectedError(f"{refused}: {exc}") from None

        async with self._bus.exclusive():
            read_back, ts = await self._write_and_read_back(point, words, where)
        try:
            actual = decode(fmt, read_back)
        except ValueError as exc:
            raise DeviceResponseError(f"{where}: read-back after write is garbage: {exc}") from None
        ok, tol = _matches(fmt, value, words, actual)
        if not ok:
            detail = f" (tolerance {tol:g})" if tol else ""
            raise WriteVerifyError(f"{where}: wrote {value!r} but read back {actual!r}{detail}")
        log.info("%s: wrote %r to %s (%s)", self.name, actual, point.address, key)
        quality, reason = assess(actual, point.lo, point.hi)
        self._emit([Sample(key, actual, quality, ts, reason)])
        # The next poll must report the point even if its registers read as before the write:
        # the consumer now holds the value written, and the device may have changed it back.
        for decoder in self._all_decoders():
            decoder.forget(key)
        return actual

    # -- supervisor hooks -----------------------------------------------------------------------

    async def _connect(self) -> None:
        # The points went STALE (or never had a value): the first poll reports every one.
        self._reset_decoders()
        await self._bus.attach(self, self._on_link_lost)
        self._silent_polls = 0

    async def _disconnect(self) -> None:
        try:
            await self._bus.detach(self)
        except Exception:  # must not raise; the bus is going away anyway
            log.debug("%s: detach failed", self.name, exc_info=True)

    async def _run(self) -> None:
        await self._poll_every(self.options.poll_interval_s, self._poll)

    def _on_link_lost(self, cause: BaseException) -> None:
        # Fail whatever is in flight now, not when its own timeout expires.
        self._fail_pending(cause)

    # -- polling --------------------------------------------------------------------------------

    async def _poll(self) -> None:
        cycle = _Cycle()
        now = time.monotonic()
        started = asyncio.get_running_loop().time()
        if self.dropped_batches != self._dropped_seen:
            # A batch the consumer never got may have held changes no later poll repeats.
            self._dropped_seen = self.dropped_batches
            self._reset_decoders()
        # One list per planned block, joined in plan order whatever order the answers come in.
        outs: list[list[Sample]] = [[] for _ in self._plan]

        async def read(index: int) -> None:
            block, decoder, out = self._plan[index], self._decoders[index], outs[index]
            override = self._overrides.get(index)
            if override is not None and override.until <= now:
                del self._overrides[index]
                override = None
            if override is not None:
                for sub, sub_decoder in zip(override.blocks, override.decoders, strict=True):
                    await self._read_block(sub, sub_decoder, cycle, out)
                return
            split, bad = await self._read_block(block, decoder, cycle, out)
            if split:
                self._overrides[index] = self._split_plan(block, bad, now)

        try:
            await _run_limited(read, len(self._plan), self.max_in_flight)
        except BaseException:
            # What the finished reads decoded is never handed over: forget it was.
            self._reset_decoders()
            raise
        samples = [s for out in outs for s in out]
        self._log_transitions(samples)
        self._emit(samples)
        if cycle.answered:
            self._silent_polls = 0
            self._mark_healthy()
        elif cycle.failed:
            if not self._silent_polls:
                self._silent_since = started
            self._silent_polls += 1
            limit = self.options.failures_before_reconnect
            if self._silent_polls >= limit:
                cause = ConnectionLostError(
                    f"{self.name}: no valid answer in {limit} consecutive polls "
                    f"(last: {cycle.last_failure})"
                )
                self._bus.drop_if_silent(self._silent_since)
                raise cause

    async def _read_block(
        self, block: Block, decoder: BlockDecoder, cycle: _Cycle, out: list[Sample]
    ) -> tuple[bool, set[str]]:
        """Read one block into `out`; return (had to split, keys refused on their own).

        `out` gets the samples of the points that changed since `decoder` last reported them
        (and of every BAD one). A merged block the device refuses is split into one read per
        point, so only the points the device really refuses go BAD; `_poll` then keeps that
        split plan for a while.
        """
        if cycle.failed >= 2 and not cycle.answered:
            # Two requests in a row unanswered: don't spend a timeout on each remaining block.
            decoder.reset()
            _bad(out, block.points, None, f"not read: {cycle.last_failure}")
            return False, set()
        try:
            data, ts = await self._read_raw(block)
        except _Garbled as exc:
            # The device answers, only not sensibly: the link is fine, a reconnect would not
            # help and would only add DISCONNECTED/CONNECTED transitions per poll.
            cycle.answered += 1
            decoder.reset()
            _bad(out, block.points, time.time(), exc.text)
            return False, set()
        except _Refused as exc:
            cycle.answered += 1
            # Whatever comes next reports these points outside this decoder.
            decoder.reset()
            parts = split_block(block)
            per_address = exc.code not in _DEVICE_STATE_CODES
            if per_address and len(parts) > 1:
                bad: set[str] = set()
                for part in parts:
                    part_decoder = BlockDecoder(part, self._formats)
                    _, part_bad = await self._read_block(part, part_decoder, cycle, out)
                    bad |= part_bad
                return True, bad
            _bad(out, block.points, time.time(), exc.text)
            return False, ({p.key for p in block.points} if per_address else set())
        except _NoAnswer as exc:
            cycle.failed += 1
            cycle.last_failure = exc.text
            decoder.reset()
            _bad(out, block.points, None, exc.text)
            return False, set()
        cycle.answered += 1
        decoder.samples(data, ts, out)
        return False, set()

    async def _read_raw(self, block: Block, *, held: bool = False) -> tuple[list[Any], float]:
        method = _READ[block.table]

        def make(client: ModbusBaseClient) -> Awaitable[ModbusPDU]:
            return getattr(client, method)(block.start, count=block.count, device_id=block.unit)

        response = await self._transact(make, f"reading {block}", held=held)
        ts = time.time()
        if block.table.is_bits:
            bits = list(response.bits)
            if len(bits) < block.count:
                raise _Garbled(
                    f"malformed response reading {block}: {len(bits)} bits for {block.count}"
                )
            return bits[: block.count], ts
        registers = list(response.registers)
        if len(registers) != block.count:
            raise _Garbled(
                f"malformed response reading {block}: {len(registers)} registers for {block.count}"
            )
        return registers, ts

    def _split_plan(self, block: Block, bad: set[str], now: float) -> _Override:
        """Plan a refused block as merged reads of its good points plus single reads of the bad."""
        good = [p for p in block.points if p.key not in bad]
        opts = self.options
        # Gap 0: the hole that made the merged read fail may sit between two good points.
        blocks = plan_reads(
            good,
            unit=block.unit,
            max_registers=opts.max_registers,
            max_bits=opts.max_bits,
            max_gap=0,
        )
        blocks += split_block(
            Block(
                block.unit,
                block.table,
                block.start,
                block.count,
                tuple(p for p in block.points if p.key in bad),
            )
        )
        # Said once; the retry every merge_retry_s that fails the same way is no news.
        level = logging.DEBUG if block in self._split_seen else logging.INFO
        self._split_seen.add(block)
        log.log(
            level,
            "%s: %s refused as a whole; reading its points in %d requests, merged again in %g s",
            self.name,
            block,
            len(blocks),
            self._merge_retry_s,
        )
        return _Override(
            now + self._merge_retry_s, blocks, [BlockDecoder(b, self._formats) for b in blocks]
        )

    def _all_decoders(self) -> Iterator[BlockDecoder]:
        """The decoders of the plan and of every split plan in force."""
        yield from self._decoders
        for override in self._overrides.values():
            yield from override.decoders

    def _reset_decoders(self) -> None:
        """Make the next poll report every point."""
        for decoder in self._all_decoders():
            decoder.reset()

    # -- writing --------------------------------------------------------------------------------

    async def _write_and_read_back(
        self, point: ModbusPoint, words: list[int], where: str
    ) -> tuple[list[Any], float]:
        """Send the write the point needs (FC5/6/15/16, or read-modify-write of a bit)."""
        unit = point.unit_id if point.unit_id is not None else self.options.unit_id
        addr = point.address
        multiple = self.options.write_multiple
        block = Block(unit, addr.table, addr.offset, point.span, (point,))
        what = f"writing {addr}"
        try:
            if addr.table is Table.COIL:
                bit = bool(words[0])
                if multiple:
                    await self._transact(
                        lambda c: c.write_coils(addr.offset, [bit], device_id=unit), what, held=True
                    )
                else:
                    await self._transact(
                        lambda c: c.write_coil(addr.offset, bit, device_id=unit), what, held=True
                    )
            else:
                if addr.bit is not None:
                    current, _ = await self._read_raw(block, held=True)
                    words = [set_bit(int(current[0]), addr.bit, bool(words[0]))]
                await self._write_registers(addr.offset, words, unit, multiple, what)
        except _Refused as exc:
            raise DeviceResponseError(f"{where}: {exc.text}") from None
        except _NoAnswer as exc:
            raise DeviceResponseError(
                f"{where}: {exc.text}; the write may or may not have taken effect"
            ) from None
        try:
            return await self._read_raw(block, held=True)
        except (_Refused, _NoAnswer) as exc:
            raise DeviceResponseError(
                f"{where}: written, but reading it back failed: {exc}"
            ) from None

    async def _write_registers(
        self, offset: int, words: list[int], unit: int, multiple: bool, what: str
    ) -> None:
        if len(words) == 1 and not multiple:
            await self._transact(
                lambda c: c.write_register(offset, words[0], device_id=unit), what, held=True
            )
        else:
            await self._transact(
                lambda c: c.write_registers(offset, words, device_id=unit), what, held=True
            )

    # -- transport ------------------------------------------------------------------------------

    async def _transact(
        self,
        make: Callable[[ModbusBaseClient], Awaitable[ModbusPDU]],
        what: str,
        *,
        held: bool = False,
    ) -> ModbusPDU:
        """Run one request on the bus; turn every way it can fail into one of ours.

        Polls take the bus per request (a write may slip in between; on a pipelined bus they
        only take a slot); a write holds it across its requests and passes `held`.
        """
        try:
            if held:
                response = await self._call(self._bus.request(make))
            else:
                async with self._bus.turn():
                    response = await self._call(self._bus.request(make))
        except ConnectionException as exc:
            raise ConnectionLostError(f"{self.name}: {exc}") from exc
        except MalformedResponse as exc:
            raise _Garbled(f"malformed response {what}: {exc}") from None
        except ModbusIOException as exc:
            if "no response" in str(exc).lower():
                raise _NoAnswer(f"no response within {self.options.timeout_s:g} s {what}") from None
            raise _NoAnswer(f"I/O error {what}: {exc}") from None
        except ModbusException as exc:
            raise _Garbled(f"malformed response {what}: {exc}") from None
        if response is None:
            raise _NoAnswer(f"no response {what}")
        if response.isError():
            code = int(getattr(response, "exception_code", 0))
            name = EXCEPTION_NAMES.get(code, "UNKNOWN")
            raise _Refused(code, f"Modbus exception {code} ({name}) {what}")
        return response


# -- helpers ------------------------------------------------------------------------------------


class _Refused(Exception):
    """The device answered with a Modbus exception code."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class _NoAnswer(Exception):
    """No usable answer: timeout, I/O error, or a response that does not fit the request."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class _Garbled(_NoAnswer):
    """An answer that is no valid response to the request: the device talks, but garbage."""


@dataclass(slots=True)
class _Override:
    until: float
    blocks: list[Block]
    decoders: list[BlockDecoder]


@dataclass(slots=True)
class _Cycle:
    """What one poll's requests learnt so far, shared by the requests in flight."""

    answered: int = 0
    failed: int = 0
    last_failure: str | None = None


def _bad(out: list[Sample], points: Iterable[ModbusPoint], ts: float | None, reason: str) -> None:
    out.extend(Sample(p.key, None, Quality.BAD, ts, reason) for p in points)


async def _run_limited(job: Callable[[int], Awaitable[None]], count: int, limit: int) -> None:
    """Run `job(0)` .. `job(count - 1)`, started in order, at most `limit` at a time.

    The first failure (a lost connection) cancels the rest and is raised as itself, not as an
    ExceptionGroup: the supervisor logs its text as the reason.
    """
    if limit <= 1 or count <= 1:
        for index in range(count):
            await job(index)
        return
    indices = iter(range(count))

    async def worker() -> None:
        for index in indices:
            await job(index)

    workers = [asyncio.ensure_future(worker()) for _ in range(min(limit, count))]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        # Wait for them to finish so no request outlives its poll, and take each one's
        # outcome: a second failure is moot, not an "exception never retrieved" at exit.
        await asyncio.wait(workers)
        for w in workers:
            if not w.cancelled():
                w.exception()


def _check_value(point: ModbusPoint, value: Any) -> str | None:
    """Why `value` may not be written to `point`, or None."""
    dt = point.datatype
    if dt is DataType.BOOL:
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return None
        return "a bool point takes true/false (or 0/1)"
    if dt is DataType.STRING:
        return None if isinstance(value, str) else "a string point takes text"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"a {dt} point takes a number, not {type(value).__name__}"
    return limit_violation(value, point.lo, point.hi)


def _matches(fmt: Format, value: Any, words: list[int], actual: Any) -> tuple[bool, float]:
    """Compare the value read back with the one written; return (ok, tolerance used)."""
    if fmt.datatype.is_numeric:
        tol = tolerance(fmt, float(value))
        ok = (
            isinstance(actual, int | float) and math.isfinite(actual) and abs(actual - value) <= tol
        )
        return ok, tol
    if fmt.datatype is DataType.STRING:
        return actual == decode(fmt, words), 0.0  # compare as the device stores it (padding)
    return actual == bool(value), 0.0
