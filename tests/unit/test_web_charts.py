"""The server-drawn SVG charts: well-formed, CSP-clean, escaped, and drawn where the data says."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markupsafe import Markup, escape

from gateway.web.charts import (
    Bucket,
    Fan,
    duration_label,
    fan_chart,
    history_chart,
    nice_ticks,
    sparkline,
)

SVG = "{http://www.w3.org/2000/svg}"
COORDS = {"x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "r"}
Point = tuple[float, float]


def parse(svg: Markup) -> ET.Element:
    assert isinstance(svg, Markup)
    return ET.fromstring(str(svg))


def by_class(root: ET.Element, cls: str) -> list[ET.Element]:
    return [e for e in root.iter() if cls in e.get("class", "").split()]


def points(el: ET.Element) -> list[Point]:
    if el.tag == f"{SVG}circle":
        return [(float(el.get("cx", "")), float(el.get("cy", "")))]
    return [(float(x), float(y)) for x, y in (p.split(",") for p in el.get("points", "").split())]


def line_points(root: ET.Element, cls: str) -> list[Point]:
    """Return every point of the lines (and lone dots) of class `cls`, left to right."""
    return sorted(p for el in by_class(root, cls) for p in points(el))


def texts(root: ET.Element, cls: str) -> list[str]:
    return [el.text or "" for el in by_class(root, cls)]


def ok(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


TIMES = [float(t) for t in range(60, 1801, 60)]
P50 = [160.0 + 30.0 * i / (len(TIMES) - 1) for i in range(len(TIMES))]  # 160 rising to 190
BASE = Fan(
    title="line1/oven1/temp",
    unit="°C",
    times=TIMES,
    bands={
        f"p{p}": [v + d for v in P50] for p, d in ((5, -8), (25, -3), (50, 0), (75, 3), (95, 8))
    },
)


def fan(**changes: Any) -> Fan:
    return dataclasses.replace(BASE, **changes)


def value_to_y(root: ET.Element, f: Fan) -> Callable[[float], float]:
    """Read the y scale off the first and last median points, whose values the test chose."""
    (_, y0), (_, y1) = (pts := line_points(root, "fan-median"))[0], pts[-1]
    p50 = f.bands["p50"]
    v0, v1 = p50[0], p50[-1]
    assert v0 is not None and v1 is not None
    return lambda v: y0 + (v - v0) * (y1 - y0) / (v1 - v0)


def time_to_x(root: ET.Element, f: Fan) -> Callable[[float], float]:
    (x0, _), (x1, _) = (pts := line_points(root, "fan-median"))[0], pts[-1]
    t0, t1 = f.times[0], f.times[-1]
    return lambda t: x0 + (t - t0) * (x1 - x0) / (t1 - t0)


def assert_clean(svg: Markup) -> ET.Element:
    """Check what every chart must be: finite coordinates of one decimal, nothing CSP forbids."""
    root = parse(svg)
    assert root.tag == f"{SVG}svg"
    assert re.fullmatch(r"0 0 \d+ \d+", root.get("viewBox", ""))
    assert root.get("role") == "img" and root.get("aria-label") is not None
    assert root[0].tag == f"{SVG}title"
    assert "nan" not in svg.lower() and "inf" not in svg.lower()
    for el in root.iter():
        assert el.tag not in (f"{SVG}script", f"{SVG}style", f"{SVG}a", f"{SVG}image"), el.tag
        for name, value in el.attrib.items():
            assert name != "style" and not name.lower().startswith("on"), (el.tag, name)
            assert "href" not in name, (el.tag, name)
            numbers = value.replace(",", " ").split() if name == "points" else [value]
            if name in COORDS or name == "points":
                for n in numbers:
                    assert re.fullmatch(r"-?\d+(\.\d)?", n), (el.tag, name, value)
    return root


# -- fan chart ----------------------------------------------------------------------------------


@st.composite
def monotone_fans(draw: st.DrawFn) -> Fan:
    """Fans whose five bands are ordered at each time, with some values missing."""
    n = draw(st.integers(2, 30))
    times = [10.0 * (i + 1) for i in range(n)]
    keys = ("p5", "p25", "p50", "p75", "p95")
    bands: dict[str, list[float | None]] = {k: [] for k in keys}
    for _ in range(n):
        v = draw(st.floats(-1e4, 1e4))
        for k in keys:
            v += draw(st.floats(0, 1e3))
            bands[k].append(v)
    for k, i in draw(st.lists(st.tuples(st.sampled_from(keys), st.integers(0, n - 1)), max_size=6)):
        bands[k][i] = draw(st.sampled_from([None, math.nan, math.inf]))
    return Fan(title="t", unit="", times=times, bands=bands)


def y_ranges(root: ET.Element, cls: str) -> dict[float, tuple[float, float]]:
    """Return, per pixel x, the lowest and highest y the polygons of class `cls` reach there."""
    found: dict[float, list[float]] = {}
    for el in by_class(root, cls):
        for x, y in points(el):
            found.setdefault(x, []).append(y)
    return {x: (min(ys), max(ys)) for x, ys in found.items()}


@settings(max_examples=50, deadline=None)
@given(monotone_fans())
def test_fan_outer_band_contains_inner_band(f):
    root = assert_clean(fan_chart(f))
    outer, inner = y_ranges(root, "fan-outer"), y_ranges(root, "fan-inner")
    for x, (top, bottom) in inner.items():
        if x in outer:
            assert outer[x][0] <= top and bottom <= outer[x][1], x
    assert len(outer) == sum(
        1 for a, b in zip(f.bands["p5"], f.bands["p95"], strict=True) if ok(a) and ok(b)
    )


def test_median_has_one_point_per_finite_time_and_higher_values_are_higher():
    p50: list[float | None] = list(P50)
    p50[3], p50[7], p50[8] = None, math.nan, -math.inf
    f = fan(bands={**BASE.bands, "p50": p50})
    root = assert_clean(fan_chart(f))
    pts = line_points(root, "fan-median")
    assert len(pts) == sum(1 for v in p50 if ok(v))
    ys = [y for _, y in pts]
    assert ys == sorted(ys, reverse=True)  # the values rise, so the line climbs up the page
    assert len(by_class(root, "fan-median")) == 3  # gaps after index 3 and at 7-8


def test_limits_are_dashed_lines_at_their_value_with_a_label():
    f = fan(limits=[("upper", 200.0), ("lower", 150.0)])
    root = assert_clean(fan_chart(f))
    y_of = value_to_y(root, f)
    lines = {float(el.get("y1", "")): el for el in by_class(root, "limit")}
    assert len(lines) == 2
    for value in (200.0, 150.0):
        [line] = [el for y, el in lines.items() if abs(y - y_of(value)) < 0.3]
        assert line.get("y2") == line.get("y1") and line.get("stroke-dasharray")
    assert sorted(texts(root, "limit-label")) == ["lower 150 °C", "upper 200 °C"]


def test_current_value_is_a_dot_at_time_zero_and_the_change_a_line_at_its_time():
    f = fan(current=182.7, change_at_s=300.0)
    root = assert_clean(fan_chart(f))
    x_of, y_of = time_to_x(root, f), value_to_y(root, f)
    [dot] = by_class(root, "now-value")
    assert abs(float(dot.get("cx", "")) - x_of(0.0)) < 0.3
    assert abs(float(dot.get("cy", "")) - y_of(182.7)) < 0.3
    assert texts(root, "now-label") == ["now 182.7 °C"]
    [change] = by_class(root, "change-at")
    assert abs(float(change.get("x1", "")) - x_of(300.0)) < 0.3
    assert change.get("x1") == change.get("x2")
    assert texts(root, "change-label") == ["change"]
    plain = parse(fan_chart(fan()))
    assert not by_class(plain, "now-value") and not by_class(plain, "change-at")


def test_fan_time_axis_is_labelled_in_minutes_from_zero():
    root = parse(fan_chart(fan()))
    [axis] = by_class(root, "x-axis")
    labels = [t.text for t in axis]
    assert labels == ["0", "5 min", "10 min", "15 min", "20 min", "25 min", "30 min"]


def test_fan_y_axis_covers_the_data_with_round_labels():
    root = parse(fan_chart(fan()))
    [axis] = by_class(root, "y-axis")
    values = [float(t.text or "") for t in axis]
    assert values == sorted(values) and len(values) >= 3
    step = values[1] - values[0]
    assert values[0] < 152 + step and values[-1] > 198 - step  # the data runs 152..198


def test_values_that_are_not_finite_never_reach_the_svg():
    bad = [None, math.nan, math.inf, -math.inf]
    f = fan(
        bands={
            k: [bad[i % 4] if i % 3 == 0 else 100.0 + i for i in range(30)]
            for k in ("p5", "p50", "p95")
        },
        current=math.nan,
        limits=[("upper", math.inf), ("lower", 90.0)],
        change_at_s=math.nan,
    )
    assert_clean(fan_chart(f))
    assert_clean(sparkline([1.0, math.nan, 2.0, math.inf, None, -math.inf, 3.0]))
    buckets = [
        Bucket(1000.0 + 60 * i, bad[i % 4], 5.0, math.nan if i % 2 else 4.0) for i in range(20)
    ]
    assert_clean(
        history_chart(buckets, start=1000.0, end=2200.0, title="h", limits=[("hi", math.nan)])
    )


@pytest.mark.parametrize(
    "draw",
    [
        lambda: fan_chart(fan(bands={k: [None] * 30 for k in BASE.bands})),
        lambda: fan_chart(Fan(title="empty", unit="", times=[], bands={})),
        lambda: fan_chart(fan(times=[math.nan] * 30)),
        lambda: sparkline([]),
        lambda: sparkline([None, math.nan]),
        lambda: history_chart([], start=0.0, end=3600.0, title="h"),
        lambda: history_chart([Bucket(10.0, None, None, None)], start=0.0, end=3600.0, title="h"),
        lambda: history_chart(
            [Bucket(10.0, 1.0, 2.0, 1.5)], start=3600.0, end=0.0, title="backwards"
        ),
    ],
    ids=[
        "all-none",
        "no-times",
        "nan-times",
        "spark-empty",
        "spark-none",
        "hist-empty",
        "hist-none",
        "hist-backwards",
    ],
)
def test_no_data_gives_a_small_svg_that_says_so(draw):
    root = assert_clean(draw())
    assert texts(root, "no-data") == ["no data"]
    assert not [e for e in root.iter() if e.tag in (f"{SVG}polygon", f"{SVG}polyline")]


# -- escaping and the content security policy ---------------------------------------------------

HOSTILE = '<script>alert(1)</script>" onload="alert(2)'


@pytest.mark.parametrize(
    "draw",
    [
        lambda: fan_chart(fan(title=HOSTILE, unit=HOSTILE, limits=[(HOSTILE, 200.0)], current=1.0)),
        lambda: sparkline([1.0, 2.0], label=HOSTILE),
        lambda: history_chart(
            [Bucket(0.0, 1.0, 2.0, 1.5), Bucket(60.0, 1.0, 2.0, 1.5)],
            start=0.0,
            end=120.0,
            title=HOSTILE,
            unit=HOSTILE,
            limits=[(HOSTILE, 3.0)],
        ),
    ],
    ids=["fan", "sparkline", "history"],
)
def test_text_is_escaped_and_nothing_runs(draw):
    svg = draw()
    root = assert_clean(svg)  # no script element, no style, no on* attribute
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    assert HOSTILE in (root[0].text or "")  # the reader sees the title as typed
    assert HOSTILE in (root.get("aria-label") or "")
    assert str(escape(svg)) == str(svg)  # Markup: a template embeds it as it is


def test_charts_scale_to_their_container_and_sparklines_keep_their_size():
    for svg in (fan_chart(fan()), history_chart([], start=0, end=1, title="x")):
        root = parse(svg)
        assert root.get("width") == "100%" and root.get("viewBox")
    spark = parse(sparkline([1.0, 2.0], width=100, height=20, label="temp"))
    assert (spark.get("width"), spark.get("height"), spark.get("viewBox")) == (
        "100",
        "20",
        "0 0 100 20",
    )
    assert spark.get("aria-label") == "temp" and spark[0].text == "temp"


# -- sparkline ----------------------------------------------------------------------------------


def test_sparkline_breaks_at_gaps_and_spaces_points_evenly():
    root = assert_clean(sparkline([1.0, 2.0, 3.0, None, 2.0, 5.0, math.nan, 4.0]))
    lines = by_class(root, "spark")
    assert [len(points(el)) for el in lines] == [3, 2, 1]  # the lone 4.0 is a dot
    xs = [x for x, _ in line_points(root, "spark")]
    step = xs[1] - xs[0]
    assert xs[3] - xs[2] == pytest.approx(2 * step, abs=0.2)  # the gap keeps its place
    ys = {v: y for v, (_, y) in zip([1, 2, 3, 2, 5, 4], line_points(root, "spark"), strict=True)}
    assert ys[5] < ys[4] < ys[3] < ys[2] < ys[1]


def test_flat_sparkline_is_drawn_at_mid_height():
    root = assert_clean(sparkline([7.0, 7.0, 7.0], height=28))
    assert {y for _, y in line_points(root, "spark")} == {14.0}


# -- history chart ------------------------------------------------------------------------------

START = 1_800_000_000.0


def minute_buckets(
    n: int, missing: frozenset[int] = frozenset(), dropped: frozenset[int] = frozenset()
) -> list[Bucket]:
    return [
        Bucket(START + 60 * i, *((None,) * 3 if i in missing else (10.0 + i, 12.0 + i, 11.0 + i)))
        for i in range(n)
        if i not in dropped
    ]


def test_history_breaks_mean_and_band_at_a_missing_bucket():
    root = assert_clean(
        history_chart(
            minute_buckets(20, missing=frozenset({8})), start=START, end=START + 1200, title="h"
        )
    )
    means = by_class(root, "hist-mean")
    assert [len(points(el)) for el in means] == [8, 11]
    assert len(by_class(root, "hist-band")) == 2
    xs = [x for x, _ in line_points(root, "hist-mean")]
    assert xs[8] - xs[7] == pytest.approx(2 * (xs[1] - xs[0]), abs=0.3)  # bucket 8 left blank


def test_history_breaks_where_buckets_are_left_out():
    root = assert_clean(
        history_chart(
            minute_buckets(20, dropped=frozenset({5, 6})), start=START, end=START + 1200, title="h"
        )
    )
    assert [len(points(el)) for el in by_class(root, "hist-mean")] == [5, 13]


def test_history_band_spans_min_to_max_around_the_mean():
    root = assert_clean(history_chart(minute_buckets(10), start=START, end=START + 600, title="h"))
    band = y_ranges(root, "hist-band")
    for x, y in line_points(root, "hist-mean"):
        top, bottom = band[x]
        assert top < y < bottom


@pytest.mark.parametrize(
    ("span", "pattern"),
    [(7200, r"\d\d:\d\d"), (3 * 86400, r"\d\d-\d\d \d\d:\d\d"), (90, r"\d\d:\d\d:\d\d")],
)
def test_history_time_labels_are_wall_clock_times_inside_the_window(span, pattern):
    end = START + span
    root = assert_clean(
        history_chart(minute_buckets(2), start=START, end=end, title="h", width=720)
    )
    [axis] = by_class(root, "x-axis")
    labels = [t.text or "" for t in axis]
    assert 2 <= len(labels) <= 7
    assert all(re.fullmatch(pattern, s) for s in labels), labels
    fmt = {r"\d\d:\d\d": "%H:%M", r"\d\d:\d\d:\d\d": "%H:%M:%S"}.get(pattern, "%m-%d %H:%M")
    inside = {time.strftime(fmt, time.localtime(t)) for t in range(int(START), int(end) + 1)}
    assert set(labels) <= inside
    xs = [float(t.get("x", "")) for t in axis]
    assert xs == sorted(xs) and xs[0] >= 48 and xs[-1] <= 720 - 14


def test_history_limits_are_dashed_lines_with_labels():
    root = assert_clean(
        history_chart(
            minute_buckets(10),
            start=START,
            end=START + 600,
            title="h",
            unit="bar",
            limits=[("lo", 0.0), ("hi", 30.0)],
        )
    )
    ys = {el.get("y1") for el in by_class(root, "limit")}
    assert len(ys) == 2
    assert sorted(texts(root, "limit-label")) == ["hi 30 bar", "lo 0 bar"]
    band_ys = [y for _, (top, bottom) in y_ranges(root, "hist-band").items() for y in (top, bottom)]
    hi_y, lo_y = sorted(float(y or "") for y in ys)
    assert hi_y < min(band_ys) and max(band_ys) < lo_y


# -- ticks and labels ---------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.floats(-1e6, 1e6), st.floats(1e-3, 1e6), st.integers(2, 10))
def test_nice_ticks_cover_the_range_in_1_2_5_steps(lo, span, count):
    hi = lo + span
    ticks = nice_ticks(lo, hi, count)
    assert len(ticks) >= 2
    # Ticks are the nearest doubles to round numbers: their differences are exact to an ulp.
    ulp = 4 * math.ulp(max(1.0, abs(lo), abs(hi)))
    step = ticks[1] - ticks[0]
    k = math.floor(math.log10(step))
    assert any(abs(step - m * 10.0**k) <= ulp for m in (1, 2, 5, 10)), ticks
    assert all(abs(b - a - step) <= ulp for a, b in itertools.pairwise(ticks)), ticks
    slack = 1e-9 * max(1.0, abs(lo), abs(hi))
    assert lo - slack <= ticks[0] < lo + step + slack
    assert hi - step - slack < ticks[-1] <= hi + slack
    assert len(ticks) <= 2 * count + 2


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (0, 1, [0, 0.2, 0.4, 0.6, 0.8, 1]),
        (0.3, 0.7, [0.3, 0.4, 0.5, 0.6, 0.7]),
        (-3, 1234, [0, 200, 400, 600, 800, 1000, 1200]),
    ],
)
def test_nice_ticks_examples(lo, hi, expected):
    assert nice_ticks(lo, hi) == expected  # exactly: 0.3, not 0.30000000000000004


def test_nice_ticks_widens_a_flat_range_and_refuses_what_is_not_finite():
    ticks = nice_ticks(5.0, 5.0)
    assert len(ticks) >= 2 and ticks[0] < 5.0 < ticks[-1]
    assert len(nice_ticks(0.0, 0.0)) >= 2
    assert nice_ticks(math.nan, 1.0) == [] and nice_ticks(0.0, math.inf) == []
    assert nice_ticks(10.0, 0.0) == nice_ticks(0.0, 10.0)


@pytest.mark.parametrize(
    ("seconds", "label"),
    [
        (0, "0"),
        (30, "30 s"),
        (59, "59 s"),
        (60, "1 min"),
        (90, "1.5 min"),
        (300, "5 min"),
        (3600, "1 h"),
        (5400, "1.5 h"),
    ],
)
def test_duration_label(seconds, label):
    assert duration_label(seconds) == label
