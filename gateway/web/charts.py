"""Server-drawn SVG charts for the web UI: forecast fans, sparklines and history bands.

The pages are served under `default-src 'self'; script-src 'self'; style-src 'self'`, so a chart
can carry no inline `style`, `<style>` or script: looks come from SVG presentation attributes
(readable without any CSS) plus class names the stylesheet may refine (`fan-outer`, `fan-inner`,
`fan-median`, `limit`, `now-value`, `change-at`, `axis`, `grid`, `spark`, `hist-band`,
`hist-mean`). Drawing on the server means a page needs no chart library and nothing from the
internet, which an edge gateway often cannot reach. Every text is escaped and the result is a
`Markup`, so templates embed it with autoescape on. Missing values (None, NaN, inf) leave gaps;
no input leaves a small "no data" picture, never an exception.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from markupsafe import Markup, escape

_T = TypeVar("_T")


@dataclass(frozen=True)
class Fan:
    """One simulated output's fan: percentile bands over time from a Monte Carlo run."""

    title: str
    unit: str
    times: Sequence[float]  # seconds after now, ascending
    bands: Mapping[str, Sequence[float | None]]  # "p5", "p25", "p50", "p75", "p95" (maybe "p99")
    limits: Sequence[tuple[str, float]] = ()  # ("upper", 200.0): drawn as dashed lines
    current: float | None = None  # the value measured now, a dot at t=0
    change_at_s: float | None = None  # when the proposed change would happen (0 = at once)


@dataclass(frozen=True)
class Bucket:
    """One time bucket of a point's history."""

    start: float  # epoch seconds
    min: float | None
    max: float | None
    mean: float | None
    last: float | None = None


def fan_chart(fan: Fan, *, width: int = 640, height: int = 280) -> Markup:
    """Draw a forecast fan: p5-p95 and p25-p75 bands, the median, limits, now and the change."""
    label = _titled(fan.title, fan.unit)
    n = len(fan.times)
    ts = [_f(t) for t in fan.times]
    band = {key: _column(fan.bands.get(key, ()), n) for key in ("p5", "p25", "p50", "p75", "p95")}
    # p99 and other extra bands are not drawn, so they do not get to stretch the y axis.
    values = [
        v
        for seq in band.values()
        for v, t in zip(seq, ts, strict=True)
        if v is not None and t is not None
    ]
    finite_ts = [t for t in ts if t is not None]
    if not values or not finite_ts:
        return _no_data(width, height, label)
    limits = [(name, v) for name, raw in fan.limits if (v := _f(raw)) is not None]
    current = _f(fan.current)
    extra = [v for _, v in limits] + ([current] if current is not None else [])
    left, right, top, bottom = 48.0, width - 14.0, 26.0, height - 22.0
    sx = _Scale(*_domain([0.0, *finite_ts], 0.0), left, right)
    sy = _Scale(*_domain(values + extra, 0.05), bottom, top)

    unit_s = _axis_unit(sx.hi - sx.lo)
    x_ticks = [
        (v * unit_s, _in_unit(v * unit_s, unit_s))
        for v in nice_ticks(sx.lo / unit_s, sx.hi / unit_s)
    ]
    out = _axes(sx, sy, x_ticks, top, bottom)
    out += _area(_band_rows(ts, band["p5"], band["p95"]), sx, sy, "fan-outer", "#c6dbef")
    out += _area(_band_rows(ts, band["p25"], band["p75"]), sx, sy, "fan-inner", "#6baed6")
    median = [
        None if t is None or v is None else (sx(t), sy(v))
        for t, v in zip(ts, band["p50"], strict=True)
    ]
    out += _lines(median, "fan-median", "#08306b", 2)
    out += _limits(limits, fan.unit, sy, left, right)
    change = _f(fan.change_at_s)
    if change is not None and sx.lo <= change <= sx.hi:
        x = _c(sx(change))
        out.append(
            f'<line class="change-at" x1="{x}" y1="{_c(top)}" x2="{x}" y2="{_c(bottom)}" '
            'stroke="#555" stroke-width="1.5" stroke-dasharray="3 3"/>'
            + _text(sx(change) + 3, top + 10, "change", "change-label", fill="#555")
        )
    if current is not None:
        cx, cy = sx(0.0), sy(current)
        out.append(
            f'<circle class="now-value" cx="{_c(cx)}" cy="{_c(cy)}" r="4" fill="#000"/>'
            + _text(cx + 7, cy - 6, _join("now", _num(current), fan.unit), "now-label")
        )
    out.append(_text(4, 15, label, "chart-title", size=12))
    out += _legend(
        [("p5\N{EN DASH}p95", "#c6dbef"), ("p25\N{EN DASH}p75", "#6baed6"), ("median", "#08306b")],
        width - 200,
        15,
    )
    return _svg(width, height, label, out, "fan")


def sparkline(
    values: Sequence[float | None], *, width: int = 120, height: int = 28, label: str = ""
) -> Markup:
    """Draw recent values as a tiny line, equally spaced, with gaps where a value is missing."""
    ys = [_f(v) for v in values]
    finite = [v for v in ys if v is not None]
    if not finite:
        return _no_data(width, height, label, fixed=True)
    sy = _Scale(*_domain(finite, 0.0), height - 3.0, 3.0)
    last = max(len(ys) - 1, 1)
    step = (width - 6.0) / last
    x0 = 3.0 if len(ys) > 1 else width / 2
    points = [None if v is None else (x0 + i * step, sy(v)) for i, v in enumerate(ys)]
    line = _lines(points, "spark", "#08519c", 1.5)
    return _svg(width, height, label or "trend", line, "spark", fixed=True)


def history_chart(
    buckets: Sequence[Bucket],
    *,
    start: float,
    end: float,
    title: str,
    unit: str = "",
    limits: Sequence[tuple[str, float]] = (),
    width: int = 720,
    height: int = 260,
) -> Markup:
    """Draw a point's history over [start, end]: the min-max band and the mean, gaps left open."""
    label = _titled(title, unit)
    t0, t1 = _f(start), _f(end)
    if t0 is None or t1 is None or t1 <= t0:
        return _no_data(width, height, label)
    rows = sorted(((s, b) for b in buckets if (s := _f(b.start)) is not None), key=lambda r: r[0])
    diffs = [b - a for (a, _), (b, _) in itertools.pairwise(rows) if b > a]
    bucket_s = min(diffs, default=0.0)
    # A bucket stands for its whole interval, so its point sits at the interval's middle.
    rows = [(s + bucket_s / 2, b) for s, b in rows if t0 <= s + bucket_s / 2 <= t1]
    band: list[tuple[float, float, float] | None] = []
    mean: list[tuple[float, float] | None] = []
    previous: float | None = None
    for x, b in rows:
        # The store may leave empty buckets out instead of sending Nones: a jump is a gap too.
        if previous is not None and x - previous > 1.5 * bucket_s:
            band.append(None)
            mean.append(None)
        previous = x
        lo, hi, avg = _f(b.min), _f(b.max), _f(b.mean)
        band.append(None if lo is None or hi is None else (x, min(lo, hi), max(lo, hi)))
        mean.append(None if avg is None else (x, avg))
    values = [v for r in band if r for v in r[1:]] + [r[1] for r in mean if r]
    if not values:
        return _no_data(width, height, label)
    finite_limits = [(name, v) for name, raw in limits if (v := _f(raw)) is not None]
    left, right, top, bottom = 48.0, width - 14.0, 26.0, height - 22.0
    sx = _Scale(t0, t1, left, right)
    sy = _Scale(*_domain(values + [v for _, v in finite_limits], 0.05), bottom, top)

    out = _axes(sx, sy, _clock_ticks(t0, t1, 6), top, bottom)
    out += _area(band, sx, sy, "hist-band", "#9ecae1")
    out += _lines(
        [None if r is None else (sx(r[0]), sy(r[1])) for r in mean], "hist-mean", "#08519c", 1.5
    )
    out += _limits(finite_limits, unit, sy, left, right)
    out.append(_text(4, 15, label, "chart-title", size=12))
    out += _legend([("min\N{EN DASH}max", "#9ecae1"), ("mean", "#08519c")], width - 130, 15)
    return _svg(width, height, label, out, "history")


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Return about `count` round values (steps of 1, 2 or 5 x 10^k) inside [lo, hi].

    No tick is more than one step from either end; lo == hi is widened so there are ticks.
    """
    if _f(lo) is None or _f(hi) is None:
        return []
    lo, hi = min(lo, hi), max(lo, hi)
    if lo == hi:
        lo, hi = _widen(lo)
    step0 = (hi - lo) / max(count, 1)
    if not step0 > 1e-300:  # 10.0**power would underflow to 0 below
        return [lo, hi]
    power = math.floor(math.log10(step0))
    error = step0 / 10.0**power
    # The 1-2-5 step nearest step0 on a log scale: the cut-offs are geometric midpoints.
    factor = next(f for f, cut in ((10, 50), (5, 10), (2, 2), (1, 0)) if error * error >= cut)
    while True:
        step = factor * 10.0**power
        # The 1e-9 slack keeps lo/step rounding (0.3 / 0.1 = 2.999...) from losing an end tick.
        k0, k1 = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        if k1 > k0:
            break
        # One tick is no scale (count 2 over 1..8 picks 5): take the next smaller 1-2-5 step.
        factor, power = {10: (5, power), 5: (2, power), 2: (1, power), 1: (5, power - 1)}[factor]
    if k1 - k0 > 10 * max(count, 1):  # float noise on tiny spans; never a thousand labels
        return [lo, hi]
    if power < 0:  # divide by an exact power of ten: 3 / 10 is 0.3, 3 * 0.1 is not
        return [round(k * factor / 10.0**-power, -power) for k in range(k0, k1 + 1)]
    return [k * step for k in range(k0, k1 + 1)]


def duration_label(seconds: float) -> str:
    """Say a duration in the largest unit it fills: "0", "30 s", "5 min", "1.5 h"."""
    unit = next((u for _, u in _UNITS[::-1] if abs(seconds) >= u), 1)
    return _in_unit(seconds, unit)


# -- helpers ------------------------------------------------------------------------------------

_NS = "http://www.w3.org/2000/svg"
_UNITS = (("s", 1), ("min", 60), ("h", 3600))
# Magnitudes beyond this are treated as missing: no sensor reads them, and scaling them would
# overflow to inf and put "nan" into coordinates.
_HUGE = 1e300
# Round steps for a wall-clock axis: seconds, minutes, then hours up to a week.
_CLOCK_STEPS = (
    *(1, 2, 5, 10, 15, 30),
    *(60 * m for m in (1, 2, 5, 10, 15, 30)),
    *(3600 * h for h in (1, 2, 3, 6, 12, 24, 48, 168)),
)


@dataclass(frozen=True)
class _Scale:
    """Map the domain [lo, hi] linearly onto pixels [a, b] (b < a for a y axis)."""

    lo: float
    hi: float
    a: float
    b: float

    def __call__(self, v: float) -> float:
        return self.a + (v - self.lo) / (self.hi - self.lo) * (self.b - self.a)


def _f(v: float | None) -> float | None:
    """Return `v` as a float, or None if it is missing, not finite or absurdly large."""
    if v is None or isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and abs(x) <= _HUGE else None


def _column(seq: Sequence[float | None], n: int) -> list[float | None]:
    """Return `seq` cleaned and cut or padded with None to length `n`."""
    return [_f(seq[i]) if i < len(seq) else None for i in range(n)]


def _widen(v: float) -> tuple[float, float]:
    w = abs(v) * 0.1 or 1.0
    return v - w, v + w


def _domain(values: Sequence[float], pad: float) -> tuple[float, float]:
    """Return the range of non-empty `values`, widened if flat, padded by `pad` of its span."""
    lo, hi = min(values), max(values)
    if lo == hi:
        return _widen(lo)
    margin = (hi - lo) * pad
    return lo - margin, hi + margin


def _axis_unit(span: float) -> int:
    """Pick the time unit for an axis: the largest that the span holds at least twice."""
    return next((u for _, u in _UNITS[::-1] if span >= 2 * u), 1)


def _in_unit(seconds: float, unit: int) -> str:
    if seconds == 0:
        return "0"
    name = next(n for n, u in _UNITS if u == unit)
    return f"{seconds / unit:.4g} {name}"


def _clock_ticks(start: float, end: float, count: int) -> list[tuple[float, str]]:
    """Return ticks on round local wall-clock times in [start, end], with their labels."""
    span = end - start
    step = next((s for s in _CLOCK_STEPS if span / s <= count), None)
    if step is None:
        step = math.ceil(span / count / 604800) * 604800
    fmt = "%m-%d %H:%M" if span > 86400 else "%H:%M:%S" if step < 60 else "%H:%M"
    try:
        # Rounded in local time so that ticks fall on the hour the reader sees; a DST change
        # inside the window shifts the later ticks by the change, which is accepted.
        offset = time.localtime(start).tm_gmtoff
        t = math.ceil((start + offset) / step) * step - offset
        ticks = []
        while t <= end:
            ticks.append((float(t), time.strftime(fmt, time.localtime(t))))
            t += step
    except (OverflowError, OSError, ValueError):
        return []
    return ticks


def _runs(rows: Iterable[_T | None]) -> list[list[_T]]:
    """Split `rows` at each None into the runs between."""
    runs: list[list[_T]] = [[]]
    for row in rows:
        if row is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(row)
    return [r for r in runs if r]


def _c(v: float) -> str:
    """Format a coordinate to one decimal, without a trailing ".0" or a "-0"."""
    s = f"{round(v, 1) + 0.0:.1f}"
    return s[:-2] if s.endswith(".0") else s


def _num(v: float) -> str:
    return f"{v + 0.0:.4g}"


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _titled(title: str, unit: str) -> str:
    return f"{title} ({unit})" if unit else title


def _points(points: Iterable[tuple[float, float]]) -> str:
    return " ".join(f"{_c(x)},{_c(y)}" for x, y in points)


def _band_rows(
    ts: Sequence[float | None], lo: Sequence[float | None], hi: Sequence[float | None]
) -> list[tuple[float, float, float] | None]:
    return [
        None if t is None or a is None or b is None else (t, min(a, b), max(a, b))
        for t, a, b in zip(ts, lo, hi, strict=True)
    ]


def _area(
    rows: Sequence[tuple[float, float, float] | None], sx: _Scale, sy: _Scale, cls: str, fill: str
) -> list[str]:
    """Fill between the low and high edges of (x, low, high) rows, one polygon per run."""
    out = []
    for run in _runs(rows):
        edge = [(sx(x), sy(hi)) for x, _, hi in run] + [(sx(x), sy(lo)) for x, lo, _ in run[::-1]]
        out.append(f'<polygon class="{cls}" points="{_points(edge)}" fill="{fill}" stroke="none"/>')
    return out


def _lines(
    points: Sequence[tuple[float, float] | None], cls: str, stroke: str, w: float
) -> list[str]:
    """Draw a line broken at each None; a lone point between gaps becomes a dot."""
    out = []
    for run in _runs(points):
        if len(run) == 1:
            x, y = run[0]
            out.append(f'<circle class="{cls}" cx="{_c(x)}" cy="{_c(y)}" r="{w}" fill="{stroke}"/>')
        else:
            out.append(
                f'<polyline class="{cls}" points="{_points(run)}" fill="none" stroke="{stroke}" '
                f'stroke-width="{w}" stroke-linejoin="round"/>'
            )
    return out


def _limits(
    limits: Sequence[tuple[str, float]], unit: str, sy: _Scale, left: float, right: float
) -> list[str]:
    out = []
    for name, v in limits:
        y = _c(sy(v))
        out.append(
            f'<line class="limit" x1="{_c(left)}" y1="{y}" x2="{_c(right)}" y2="{y}" '
            'stroke="#d62728" stroke-width="1.5" stroke-dasharray="6 4"/>'
            + _text(
                right - 2, sy(v) - 3, _join(name, _num(v), unit), "limit-label", "end", "#d62728"
            )
        )
    return out


def _axes(
    sx: _Scale, sy: _Scale, x_ticks: Sequence[tuple[float, str]], top: float, bottom: float
) -> list[str]:
    """Draw the grid, the y labels, the x labels and the baseline."""
    left, right = sx.a, sx.b
    grid, ys, xs = [], [], []
    for v in nice_ticks(sy.lo, sy.hi, 5):
        y = sy(v)
        grid.append(f'<line x1="{_c(left)}" y1="{_c(y)}" x2="{_c(right)}" y2="{_c(y)}"/>')
        ys.append(_text(left - 5, y + 3.5, _num(v), "tick", "end"))
    for t, text in x_ticks:
        x = sx(t)
        grid.append(f'<line x1="{_c(x)}" y1="{_c(top)}" x2="{_c(x)}" y2="{_c(bottom)}"/>')
        xs.append(_text(x, bottom + 14, text, "tick", "end" if x > right - 20 else "middle"))
    return [
        f'<g class="grid" stroke="#e3e3e3" stroke-width="1">{"".join(grid)}</g>',
        f'<g class="axis y-axis">{"".join(ys)}</g>',
        f'<g class="axis x-axis">{"".join(xs)}</g>',
        f'<line class="axis" x1="{_c(left)}" y1="{_c(bottom)}" x2="{_c(right)}" y2="{_c(bottom)}" '
        'stroke="#888" stroke-width="1"/>',
    ]


def _legend(entries: Sequence[tuple[str, str]], x: float, y: float) -> list[str]:
    out = []
    for text, colour in entries:
        out.append(f'<rect x="{_c(x)}" y="{_c(y - 8)}" width="10" height="8" fill="{colour}"/>')
        out.append(_text(x + 13, y, text, "legend", size=10))
        x += 22 + 6 * len(text)
    return ['<g class="legend">' + "".join(out) + "</g>"]


def _text(
    x: float,
    y: float,
    text: str,
    cls: str,
    anchor: str = "start",
    fill: str = "#333",
    size: int = 11,
) -> str:
    return (
        f'<text class="{cls}" x="{_c(x)}" y="{_c(y)}" text-anchor="{anchor}" fill="{fill}" '
        f'font-size="{size}">{escape(text)}</text>'
    )


def _svg(
    width: int, height: int, label: str, body: Sequence[str], cls: str, *, fixed: bool = False
) -> Markup:
    # Charts fill their container; a sparkline keeps its size so it fits a table cell.
    size = f'width="{int(width)}" height="{int(height)}"' if fixed else 'width="100%"'
    return Markup(
        f'<svg xmlns="{_NS}" viewBox="0 0 {int(width)} {int(height)}" {size} role="img" '
        f'aria-label="{escape(label)}" class="chart {cls}-chart" font-family="sans-serif">'
        f"<title>{escape(label)}</title>{''.join(body)}</svg>"
    )


def _no_data(width: int, height: int, label: str, *, fixed: bool = False) -> Markup:
    size = min(12, max(8, height // 3))
    text = _text(width / 2, height / 2 + size / 3, "no data", "no-data", "middle", "#777", size)
    return _svg(width, height, label or "no data", [text], "empty", fixed=fixed)
