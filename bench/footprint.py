"""Gateway footprint: CPU, memory and disk per stored sample, as a user would run it.

    .venv/bin/python bench/footprint.py [--points 1000,10000,20000] [--long] [--quick]

For each N: the simulated plant serves N float32 values in holding registers that all change
every 100 ms (`plantsim`'s `BenchModbusDevice`, run inside this process, so its counters are at
hand and it shares no interpreter with the gateway); the gateway runs as its own process,
`python -m gateway.cli run --config …`, with a generated config: one Modbus TCP device, N points
polled every 1 s, deadband 0, so every poll stores N changes. Once every point has its first
value, a warm-up, then a window cut into sub-intervals; per sub-interval, from /proc of the
gateway process (every thread): CPU (utime + stime), RSS and RssAnon, write_bytes; from
/health: the twin's rev (one rev per stored change); from the file system: database + WAL
bytes; from the plant: complete polls.

- stored samples/s: rev growth per second. (The rev counts changes accepted by the twin; the
  writer commits them within `flush_interval_ms`, and a writer that fell behind would show in
  the database growth.) The rev grows in bursts of N, one per poll, so a 5.03 s sub-interval
  holding 5 polls reads ~1 % under N: it is met at >= 98 % of N; complete polls say whether
  any poll was lost.
- complete polls: reads the plant answered that reached the last register. The driver reads a
  poll's blocks in order, so each is a poll that read every point; expected = window / 1 s. The
  driver has no poll counter of its own to ask (nor does /health).
- database bytes per stored sample: growth of the database's committed pages (WAL included,
  as if checkpointed; read with PRAGMA page_count) over the whole window / samples.
- write amplification: bytes the process had written to storage (/proc/PID/io write_bytes)
  over the database growth, both over the window.
- CPU-s per million stored, % of one core, RSS: medians of the sub-intervals; the totals (CPU
  time beside wall time) are printed too.

Long mode (`--long`): an hour of history at `--long-points` points/s (default 1,000), generated
`--long-speedup` times faster than real time (default 10) by the real gateway: the points are
polled every 1/speedup s from a plant ticking faster still, so the gateway ingests
N x speedup samples/s (10,000/s by default, the target load) and the database holds an hour's
rows after 6 minutes. Rows per point, table and index sizes are what an hour gives; only the
timestamps span 6 minutes instead of 60. This was chosen over pre-filling a database through
`TwinStore` in this process: today's storage fills at ~30,000 rows/s and falling once a few
minutes of 10,000 points are in (measured), so the pre-fill would be slower than real time, and
a pre-filled database puts history in front of the measured window, not behind it. Reported:
CPU-s per million in each tenth of the run, and last tenth / first tenth.

Last line of output: one JSON object with the figures of the 10,000-point run (the largest run
if 10,000 was not run), `long_cpu_ratio` (null without `--long`), and per-N figures in `runs`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from benchutil import free_port
from plantsim import BenchModbusDevice

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
TICK = os.sysconf("SC_CLK_TCK")

# Issue 14's targets on the 2-core development machine.
TARGET_CORE = 0.25  # of one core at 10,000 points/s
TARGET_RSS_MB = 150.0  # at 10,000 points/s
TARGET_DB_BYTES = 16.0  # database bytes per stored sample
TARGET_WRITE_AMP = 8.0  # disk writes / database growth
TARGET_LONG_RATIO = 1.15  # CPU per million, last tenth / first tenth


@dataclass
class Probe:
    """What the gateway process and the plant show at one instant."""

    t: float
    cpu_s: float
    rev: int
    write_bytes: int
    db_bytes: int
    rss_mb: float
    rss_anon_mb: float
    hwm_mb: float
    sweeps: int


@dataclass
class Result:
    """One measured window (medians over its sub-intervals unless said otherwise)."""

    points: int
    poll_s: float
    startup_s: float  # gateway start to every point's first value
    wall_s: float
    cpu_s: float
    samples: int
    stored_per_s: float
    cpu_s_per_million: float
    core_fraction: float
    rss_mb: float
    rss_anon_mb: float
    peak_rss_mb: float
    db_bytes_per_sample: float
    write_bytes_per_sample: float
    write_amplification: float
    polls: int
    polls_expected: int

    @property
    def polls_complete(self) -> bool:
        # One poll may straddle each end of the window.
        return self.polls >= self.polls_expected - 1


def main(argv: list[str] | None = None) -> int:
    """Run the measurements, print the tables, then one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default="1000,10000,20000", help="comma-separated N")
    parser.add_argument("--quick", action="store_true", help="1,000 points, short window")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before the window")
    parser.add_argument("--window", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--sub", type=float, default=5.0, help="sub-interval seconds")
    parser.add_argument("--long", action="store_true", help="also run the long mode")
    parser.add_argument("--long-points", type=int, default=1000)
    parser.add_argument("--long-speedup", type=float, default=10.0)
    parser.add_argument("--long-history-s", type=float, default=3600.0)
    parser.add_argument("--dir", default=None, help="where databases go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the databases and configs")
    args = parser.parse_args(argv)
    if args.quick:
        args.points, args.warmup, args.window = "1000", 5.0, 15.0
    counts = [int(p) for p in args.points.split(",") if p.strip()]
    return asyncio.run(bench(args, counts))


async def bench(args: argparse.Namespace, counts: list[int]) -> int:
    base = Path(tempfile.mkdtemp(prefix="footprint-", dir=args.dir))
    print(
        f"Footprint benchmark: one Modbus TCP device, N float32 values changing every 100 ms, "
        f"polled every 1 s, every change stored; warm-up {args.warmup:g} s, window "
        f"{args.window:g} s in {args.sub:g} s sub-intervals (medians); work dir {base}",
        flush=True,
    )
    results: list[Result] = []
    long: list[tuple[float, float]] | None = None
    try:
        for n in counts:
            result, _ = await measure(
                base / f"n{n}", n, 1.0, 10.0, args.warmup, args.window, args.sub
            )
            results.append(result)
            print(f"  N={n:,}: {_one_line(result)}", flush=True)
        if args.long:
            long = await long_mode(base / "long", args)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    report(results, long, args)
    return 0


# -- one measured run ---------------------------------------------------------------------------


async def measure(
    workdir: Path,
    n: int,
    poll_s: float,
    tick_hz: float,
    warmup: float,
    window: float,
    sub: float,
) -> tuple[Result, list[Probe]]:
    """Start plant and gateway, warm up, probe every `sub` s over `window` s, stop both."""
    async with BenchModbusDevice(n, seed=1, port=0, tick_hz=tick_hz) as plant:
        http_port = free_port()
        config = write_config(workdir, n, plant.port, http_port, poll_s)
        gateway = Gateway(config, workdir / "gateway.log", http_port)
        try:
            startup = await gateway.wait_for_rev(n, within=600.0)
            await asyncio.sleep(warmup)
            probes = [await gateway.probe(plant)]
            t_end = probes[0].t + window
            while probes[-1].t < t_end - 1e-3:
                await asyncio.sleep(max(0.0, min(sub, t_end - time.monotonic())))
                probes.append(await gateway.probe(plant))
        finally:
            await gateway.stop()
    return summarize(n, poll_s, startup, probes), probes


def summarize(n: int, poll_s: float, startup: float, probes: list[Probe]) -> Result:
    """Medians over sub-intervals; byte ratios and polls over the whole window."""
    first, last = probes[0], probes[-1]
    pairs = list(itertools.pairwise(probes))
    rates, cpm, cores = [], [], []
    for a, b in pairs:
        dt, samples, cpu = b.t - a.t, b.rev - a.rev, b.cpu_s - a.cpu_s
        rates.append(samples / dt)
        cores.append(cpu / dt)
        cpm.append(cpu / samples * 1e6 if samples else float("inf"))
    samples = last.rev - first.rev
    growth = last.db_bytes - first.db_bytes
    written = last.write_bytes - first.write_bytes
    wall = last.t - first.t
    return Result(
        points=n,
        poll_s=poll_s,
        startup_s=startup,
        wall_s=wall,
        cpu_s=last.cpu_s - first.cpu_s,
        samples=samples,
        stored_per_s=statistics.median(rates),
        cpu_s_per_million=statistics.median(cpm),
        core_fraction=statistics.median(cores),
        rss_mb=statistics.median(p.rss_mb for p in probes[1:]),
        rss_anon_mb=statistics.median(p.rss_anon_mb for p in probes[1:]),
        peak_rss_mb=last.hwm_mb,
        db_bytes_per_sample=growth / samples if samples else float("nan"),
        write_bytes_per_sample=written / samples if samples else float("nan"),
        write_amplification=written / growth if growth > 0 else float("nan"),
        polls=last.sweeps - first.sweeps,
        polls_expected=round(wall / poll_s),
    )


# -- the long mode ------------------------------------------------------------------------------


async def long_mode(workdir: Path, args: argparse.Namespace) -> list[tuple[float, float]]:
    """Make an hour of history faster than real time; (CPU-s/million, samples/s) per tenth."""
    n, speedup = args.long_points, args.long_speedup
    poll_s = 1.0 / speedup
    run_s = args.long_history_s / speedup
    sub = run_s / 40  # four probes per tenth
    print(
        f"Long mode: {args.long_history_s / 3600:g} h of history at {n:,} points/s, {speedup:g}x "
        f"faster than real time: {n:,} points polled every {poll_s * 1000:g} ms "
        f"({n * speedup:,.0f} samples/s) for {run_s:g} s",
        flush=True,
    )
    # A plant that ticks 4 times per poll: every poll sees every value changed.
    result, probes = await measure(workdir, n, poll_s, 4 * speedup, 0.0, run_s, sub)
    print(f"  long: {_one_line(result)}", flush=True)
    tenths = []
    for k in range(10):
        a, b = probes[4 * k], probes[min(4 * k + 4, len(probes) - 1)]
        samples = b.rev - a.rev
        tenths.append(((b.cpu_s - a.cpu_s) / samples * 1e6, samples / (b.t - a.t)))
    return tenths


# -- the gateway process ------------------------------------------------------------------------


class Gateway:
    """`python -m gateway.cli run --config …` as a child process, probed from outside."""

    def __init__(self, config: Path, log_path: Path, http_port: int) -> None:
        self.log_path = log_path
        self.db = config.parent / "twin.db"
        self.url = f"http://127.0.0.1:{http_port}/health"
        self.started = time.monotonic()
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def rev(self) -> int | None:
        """The twin's rev from /health, or None while it does not answer."""

        def get() -> int | None:
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    return int(json.load(response)["rev"])
            except OSError:
                return None

        return await asyncio.to_thread(get)

    async def wait_for_rev(self, rev: int, within: float) -> float:
        """Wait until the rev reaches `rev` (every point has a value); return seconds taken."""
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}: {self._tail()}")
            got = await self.rev()
            if got is not None and got >= rev:
                return time.monotonic() - self.started
            if time.monotonic() - self.started > within:
                raise RuntimeError(f"gateway: rev {got} < {rev} after {within:g} s")
            await asyncio.sleep(0.25)

    async def probe(self, plant: BenchModbusDevice) -> Probe:
        """Read /proc, /health, the file sizes and the plant's counters, close together."""
        rev = await self.rev()
        if rev is None:
            raise RuntimeError(f"gateway /health does not answer: {self._tail()}")
        return _probe(self.proc.pid, self.db, rev, plant.sweeps)

    async def stop(self) -> None:
        """SIGTERM (the gateway flushes and exits), SIGKILL after 60 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)

    def _tail(self) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return " | ".join(lines[-5:])


def write_config(workdir: Path, n: int, modbus_port: int, http_port: int, poll_s: float) -> Path:
    """The site config: one Modbus TCP device, `n` float32 points, every change stored."""
    workdir.mkdir(parents=True)
    lines = [
        "site_id: bench",
        "gateway_id: footprint",
        "log_level: WARNING",
        "storage: {path: twin.db}",
        f"http: {{host: 127.0.0.1, port: {http_port}}}",
        "devices:",
        "  - name: bench",
        "    driver: modbus",
        f"    endpoint: tcp://127.0.0.1:{modbus_port}",
        f"    options: {{poll_interval_s: {poll_s:g}}}",
        "    points:",
    ]
    lines += [
        f"      - {{id: bench/line1/dev1/v{i:05d}, address: 'holding:{2 * i}', datatype: float32}}"
        for i in range(n)
    ]
    path = workdir / "site.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the report ---------------------------------------------------------------------------------


def report(
    results: list[Result], long: list[tuple[float, float]] | None, args: argparse.Namespace
) -> None:
    """Print the table (targets beside figures), the long mode's tenths, then the JSON line."""
    print()
    if results:
        _table(results)
    ratio: float | None = None
    if long is not None:
        ratio = long[-1][0] / long[0][0]
        print()
        print(
            f"Long mode ({args.long_points:,} points x {args.long_speedup:g}): CPU-s per million "
            "stored, by tenth of the run (samples/s)"
        )
        print(
            "  "
            + "  ".join(f"{k + 1}: {cpm:.1f} ({rate:,.0f}/s)" for k, (cpm, rate) in enumerate(long))
        )
        print(
            f"  last tenth / first tenth: {ratio:.2f}   target <= {TARGET_LONG_RATIO:.2f}: "
            f"{_met(ratio <= TARGET_LONG_RATIO)}"
        )
    print()
    print(
        "CPU is utime + stime of the gateway process (every thread) per wall second, 100 % = one "
        "core; the plant runs in the bench process. Rates and CPU are medians of the sub-intervals."
    )
    headline = next((r for r in results if r.points == 10_000), None) or (
        max(results, key=lambda r: r.points) if results else None
    )
    out: dict[str, object] = {}
    if headline is not None:
        out = {
            "points": headline.points,
            "stored_per_s": round(headline.stored_per_s, 1),
            "cpu_s_per_million": round(headline.cpu_s_per_million, 2),
            "core_fraction": round(headline.core_fraction, 4),
            "rss_mb": round(headline.rss_mb, 1),
            "db_bytes_per_sample": round(headline.db_bytes_per_sample, 2),
            "write_amplification": round(headline.write_amplification, 2),
        }
    out["long_cpu_ratio"] = None if ratio is None else round(ratio, 3)
    out["runs"] = {
        str(r.points): {k: _rounded(v) for k, v in asdict(r).items()}
        | {"polls_complete": r.polls_complete}
        for r in results
    }
    print(json.dumps(out))


def _table(results: list[Result]) -> None:
    rows: list[tuple[str, list[str], str]] = [
        ("stored samples/s", [f"{r.stored_per_s:,.0f}" for r in results], ">= 98 % of N"),
        ("CPU-s per million stored", [f"{r.cpu_s_per_million:.1f}" for r in results], ""),
        ("% of one core", [f"{r.core_fraction:.1%}" for r in results], "<= 25 % at 10,000"),
        ("CPU s / wall s (window)", [f"{r.cpu_s:.1f} / {r.wall_s:.0f}" for r in results], ""),
        ("RSS MB (median)", [f"{r.rss_mb:.0f}" for r in results], "<= 150 at 10,000"),
        ("RssAnon MB (median)", [f"{r.rss_anon_mb:.0f}" for r in results], ""),
        ("peak RSS MB (VmHWM)", [f"{r.peak_rss_mb:.0f}" for r in results], ""),
        ("DB bytes per sample", [f"{r.db_bytes_per_sample:.1f}" for r in results], "<= 16"),
        ("disk writes per sample", [f"{r.write_bytes_per_sample:,.0f}" for r in results], ""),
        ("write amplification", [f"{r.write_amplification:.1f}x" for r in results], "<= 8x"),
        ("complete polls", [f"{r.polls} / {r.polls_expected}" for r in results], "all"),
        ("start to first full poll s", [f"{r.startup_s:.1f}" for r in results], ""),
    ]
    width = 13
    print(
        f"{'N points':<28}"
        + "".join(f"{r.points:>{width},}" for r in results)
        + f"   {'target':<20} met?"
    )
    print("-" * (28 + width * len(results) + 30))
    verdicts = _verdicts(results)
    for label, cells, target in rows:
        print(
            f"{label:<28}"
            + "".join(f"{c:>{width}}" for c in cells)
            + f"   {target:<20} {verdicts.get(label, '')}"
        )


def _verdicts(results: list[Result]) -> dict[str, str]:
    by_n = {r.points: r for r in results}
    out: dict[str, str] = {}
    at10k = by_n.get(10_000)
    if at10k is not None:
        out["% of one core"] = _met(at10k.core_fraction <= TARGET_CORE)
        out["RSS MB (median)"] = _met(at10k.rss_mb <= TARGET_RSS_MB)
    out["stored samples/s"] = _met(
        all(r.stored_per_s >= 0.98 * r.points / r.poll_s for r in results)
    )
    out["DB bytes per sample"] = _met(
        all(r.db_bytes_per_sample <= TARGET_DB_BYTES for r in results)
    )
    out["write amplification"] = _met(
        all(r.write_amplification <= TARGET_WRITE_AMP for r in results)
    )
    out["complete polls"] = _met(all(r.polls_complete for r in results))
    return out


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _one_line(r: Result) -> str:
    return (
        f"{r.stored_per_s:,.0f} stored/s, {r.cpu_s_per_million:.1f} CPU-s/million, "
        f"{r.core_fraction:.0%} core, RSS {r.rss_mb:.0f} MB, {r.db_bytes_per_sample:.0f} B/sample, "
        f"writes {r.write_amplification:.1f}x, polls {r.polls}/{r.polls_expected}, "
        f"first full poll after {r.startup_s:.1f} s"
    )


def _rounded(value: object) -> object:
    return round(value, 3) if isinstance(value, float) else value


def _fields(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


def _probe(pid: int, db: Path, rev: int, sweeps: int) -> Probe:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    status = _fields(Path(f"/proc/{pid}/status").read_text())
    io = _fields(Path(f"/proc/{pid}/io").read_text())
    return Probe(
        t=time.monotonic(),
        cpu_s=(int(stat[11]) + int(stat[12])) / TICK,
        rev=rev,
        write_bytes=int(io["write_bytes"]),
        db_bytes=_db_bytes(db),
        rss_mb=int(status["VmRSS"].split()[0]) / 1024,
        rss_anon_mb=int(status["RssAnon"].split()[0]) / 1024,
        hwm_mb=int(status["VmHWM"].split()[0]) / 1024,
        sweeps=sweeps,
    )


def _db_bytes(db: Path) -> int:
    """The database's size as if checkpointed: committed pages x page size (WAL included).

    The files' sizes would mislead over a short window: the WAL grows to its working size
    first, and the main file only grows at checkpoints. Whatever layout the twin uses, this is
    what it has committed to keep.
    """
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        (size,) = conn.execute("PRAGMA page_size").fetchone()
    finally:
        conn.close()
    return int(pages) * int(size)


if __name__ == "__main__":
    sys.exit(main())
