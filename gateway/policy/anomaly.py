"""Anomaly detectors per point: rolling z-score, EWMA chart, rate of change, flatline, out of
range, stale. Each firing is an `Anomaly` (score in [0, 1], kind, features) for the event log.

Config (`AnomalyConfig`) maps point-id globs to detector specs; `resolve` says which detectors
each declared point gets, and `DetectorSet` runs them on the ingest path's batches.

What every detector shares:

- **Quality.** A sample counts when its quality is GOOD or UNCERTAIN (drivers mark a value
  outside the engineering range UNCERTAIN: skipping those would blind `out_of_range`). BAD and
  STALE samples are skipped by the statistics; `flatline` restarts its run after one, and
  `stale` measures the time since the last sample that counts.
- **Values.** Numeric detectors take what `float()` takes (ints, floats, a bool as 0/1, numeric
  text) when it is finite; NaN, ±inf, other text and missing values are skipped, never an
  exception. For `stale` any counted value is fresh except a missing or non-finite one.
  `DetectorSet` gives numeric detectors to numeric points only.
- **Time.** `ts` is the gateway's clock when the batch arrived (as the twin stamps
  `gateway_ts`), not the device's `source_ts`: `check(now)` compares against the same clock,
  and device clocks drift or are absent.
- **Score.** `score(r) = 1 - 2**-r`, where r is the detector's measure over its threshold
  (r = 1 at the threshold): 0.5 when it just fires, 0.75 at twice the threshold, 1 at infinity.
  Measures: z-score |z| / threshold; EWMA |ewma - target| / control limit; rate of change
  |rate| / max_rate; flatline and stale time / duration; out of range 1 + excess / span.
- **No storms (hysteresis).** A detector that fired is latched and stays quiet until its
  condition clears: the measure falls below `clear_ratio` of its threshold (z-score, EWMA,
  rate of change), the value is back inside the range by `clear_margin` (out of range), the
  value moves (flatline), a fresh sample arrives (stale). A hold-off timer would re-fire on a
  condition that never cleared; this fires once per episode.

Two implementations of the same semantics: one class per detector (`ZScoreDetector`, ...), a
scalar `update(ts, value, quality)` per sample, O(1) (amortised: the z-score window is summed
afresh once per pass, see `ZScoreDetector`), used for one point and as the reference; and
column banks (`_ZScoreBank`, ...) that `DetectorSet` uses by default, one numpy pass per batch
for all points. The banks do the same floating-point operations in the same order, so both give
identical anomalies (a property test holds them to it). Why two: with all six detectors on every
point the objects cost 3-4 times the twin's own ingest per sample; the banks ~0.2 us a sample on
batches of 10,000 (a sixth of the twin's ingest), but a batch also costs a fixed ~100-300 us
whatever its size, so small batches cost more per sample (`bench/anomaly.py`).

On a change-filtered feed (Modbus reports changed points only, the twin drops repeats within the
deadband) a constant value sends no samples: `flatline` and `stale` then fire from
`DetectorSet.check(now)`, which the owner calls periodically, and `stale` cannot tell a dead
sensor from a steady one. Use `stale` on points that always move; a lost connection already
turns a point's quality BAD or STALE.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Protocol, TypeAlias

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from drivers.contract import Quality, Sample
from gateway.errors import ConfigError
from gateway.twin.model import PointDef, PointValue

__all__ = [
    "EVENT_TYPE",
    "KINDS",
    "Anomaly",
    "AnomalyConfig",
    "AnomalyRule",
    "Detector",
    "DetectorSet",
    "DetectorSpec",
    "EwmaDetector",
    "EwmaSpec",
    "FlatlineDetector",
    "FlatlineSpec",
    "OutOfRangeDetector",
    "OutOfRangeSpec",
    "RateOfChangeDetector",
    "RateOfChangeSpec",
    "StaleDetector",
    "StaleSpec",
    "TimedDetector",
    "ZScoreDetector",
    "ZScoreSpec",
    "glob_matcher",
    "glob_regex",
    "make_detector",
    "resolve",
    "score",
]

EVENT_TYPE = "AnomalyDetected"
Kind = Literal["zscore", "ewma", "rate_of_change", "flatline", "out_of_range", "stale"]
#: Every kind, in the order anomalies of one sample are reported.
KINDS: tuple[Kind, ...] = ("zscore", "ewma", "rate_of_change", "flatline", "out_of_range", "stale")
USABLE = frozenset({Quality.GOOD, Quality.UNCERTAIN})
NUMERIC_TYPES = frozenset(
    {"int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"}
)
# A window update whose change is this many times the variance it leaves lost ~6 of 16 digits.
_CANCELLED = 1e6
# Batch layouts kept for reuse: one per device is enough (each device reports its own batches).
_LAYOUTS = 64
_RANK: dict[str, int] = {kind: n for n, kind in enumerate(KINDS)}
_INF = math.inf
_NAN = math.nan

Features: TypeAlias = dict[str, float | None]


@dataclass(frozen=True, slots=True)
class Anomaly:
    """One detector firing on one point: what an `AnomalyDetected` event records."""

    point_id: str
    kind: str
    score: float  # in [0, 1]; 0.5 at the threshold (module docstring)
    ts: float  # gateway clock
    features: Features

    def event_data(self) -> dict[str, Any]:
        """The event's data, JSON-safe: a non-finite feature is written as its name (`inf`)."""
        return {
            "kind": self.kind,
            "score": self.score,
            "ts": self.ts,
            "features": {k: _json_number(v) for k, v in self.features.items()},
        }


def score(ratio: float) -> float:
    """Map a measure over its threshold (1 at the threshold) to [0, 1]: `1 - 2**-ratio`."""
    if not ratio > 0.0:  # also NaN
        return 0.0
    return 1.0 - 0.5**ratio


# -- config -----------------------------------------------------------------------------------


class _Strict(BaseModel):
    # As the site config: unknown keys are errors, a YAML `true` is no count, `.nan` no number.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class _Latching(_Strict):
    clear_ratio: float = Field(
        0.75,
        gt=0,
        le=1,
        description="After firing, the detector stays quiet until its measure falls below this "
        "fraction of the threshold (hysteresis: one anomaly per episode, not one per sample).",
    )


class ZScoreSpec(_Latching):
    """Rolling z-score: a value far from the mean of the last `window` values."""

    kind: Literal["zscore"] = Field(description="`zscore`.")
    window: StrictInt = Field(
        120,
        ge=2,
        le=10_000,
        description="Samples in the rolling window (8 bytes each per point).",
    )
    # 5, not the textbook 3 or 4: 10,000 points at 1 Hz are 36 million samples an hour, and
    # z >= 4 fired ~18 times per 100,000 samples of clean Gaussian noise (z >= 5: none).
    threshold: float = Field(5.0, gt=0, description="Fires at |z| >= threshold.")
    min_samples: StrictInt | None = Field(
        None,
        ge=2,
        description="Samples needed before it judges at all; default: a full window.",
    )
    min_sd: float = Field(
        0.0,
        ge=0,
        description="Floor of the standard deviation, e.g. the sensor's resolution, so that the "
        "first step of a signal that was constant is not an infinite z.",
    )

    @model_validator(mode="after")
    def _min_samples_fit(self) -> ZScoreSpec:
        if self.min_samples is not None and self.min_samples > self.window:
            raise ValueError(
                f"min_samples ({self.min_samples}) is more than window ({self.window}): "
                "lower min_samples or widen the window"
            )
        return self


class EwmaSpec(_Latching):
    """EWMA control chart: a slow drift of the smoothed value away from its target."""

    kind: Literal["ewma"] = Field(description="`ewma`.")
    alpha: float = Field(
        0.1, gt=0, le=1, description="Weight of each new sample (smaller: slower, more sensitive)."
    )
    # The textbook L = 3 (alpha 0.2) fires about every 500 samples of clean noise; L = 4 with
    # alpha 0.1 every ~15,000 and still finds a 1-sigma shift within ~20 samples.
    limit_sigmas: float = Field(
        4.0, gt=0, description="Control limit in sigmas of the EWMA statistic (L)."
    )
    target: float | None = Field(
        None, description="Expected value; default: the mean of the warm-up samples."
    )
    sigma: float | None = Field(
        None,
        gt=0,
        description="Standard deviation of the samples; default: from the warm-up samples.",
    )
    warmup: StrictInt = Field(
        100,
        ge=2,
        le=1_000_000,
        description="Samples that estimate `target` and `sigma` when either is not given; the "
        "chart judges only after them.",
    )
    min_sd: float = Field(
        0.0, ge=0, description="Floor of the estimated sigma, e.g. the sensor's resolution."
    )


class RateOfChangeSpec(_Latching):
    """Rate of change: the value moves faster than a physical process can."""

    kind: Literal["rate_of_change"] = Field(description="`rate_of_change`.")
    max_rate: float = Field(
        gt=0, description="Fires when |change| / seconds between two samples reaches this."
    )


class FlatlineSpec(_Strict):
    """Flatline: a stuck sensor, whose value stays within `tolerance` for `duration_s`."""

    kind: Literal["flatline"] = Field(description="`flatline`.")
    duration_s: float = Field(gt=0, description="Seconds the value must stay flat to fire.")
    tolerance: float = Field(
        0.0, ge=0, description="Movement within ± this of where the flat run began still counts."
    )


class OutOfRangeSpec(_Strict):
    """Out of range: the value leaves an operating range (narrower than the engineering one)."""

    kind: Literal["out_of_range"] = Field(description="`out_of_range`.")
    lo: float | None = Field(None, description="Lowest normal value; none: no lower bound.")
    hi: float | None = Field(None, description="Highest normal value; none: no upper bound.")
    clear_margin: float = Field(
        0.0,
        ge=0,
        description="After firing, the value must come back inside the range by this much "
        "before the detector can fire again (hysteresis).",
    )

    @model_validator(mode="after")
    def _bounds(self) -> OutOfRangeSpec:
        if self.lo is None and self.hi is None:
            raise ValueError("give `lo`, `hi` or both")
        if self.lo is not None and self.hi is not None:
            if self.lo >= self.hi:
                raise ValueError(f"lo ({self.lo:g}) must be below hi ({self.hi:g})")
            if 2 * self.clear_margin >= self.hi - self.lo:
                raise ValueError(
                    f"clear_margin ({self.clear_margin:g}) leaves no room inside "
                    f"[{self.lo:g}, {self.hi:g}] to clear in: make it less than half the range"
                )
        return self


class StaleSpec(_Strict):
    """Stale: no fresh GOOD or UNCERTAIN sample for `max_age_s`."""

    kind: Literal["stale"] = Field(description="`stale`.")
    max_age_s: float = Field(gt=0, description="Seconds without a fresh sample before it fires.")


DetectorSpec = Annotated[
    ZScoreSpec | EwmaSpec | RateOfChangeSpec | FlatlineSpec | OutOfRangeSpec | StaleSpec,
    Field(discriminator="kind"),
]

# Point ids are lower-case path segments (config/model.py); a glob adds `*`, `**` and `?`.
_GLOB_PATTERN = r"^[a-z0-9_.*?-]+(/[a-z0-9_.*?-]+)*$"
Glob = Annotated[str, Field(pattern=_GLOB_PATTERN, max_length=256)]


class AnomalyRule(_Strict):
    """Detectors for the points that match any of the rule's globs."""

    points: list[Glob] = Field(
        min_length=1,
        description="Point-id globs: `*` and `?` match within one segment, `**` across "
        "segments (`line1/**`, `*/oven*/temperature`).",
    )
    detectors: list[DetectorSpec] = Field(
        default_factory=list,
        description="Detector specs, at most one per kind. For a point several rules match, "
        "the last rule naming a kind wins.",
    )
    # Not `off`: YAML 1.1 reads a bare `off:` key as false.
    disable: list[Kind] = Field(
        default_factory=list,
        description="Kinds switched off for these points (exempts them from an earlier rule).",
    )

    @model_validator(mode="after")
    def _kinds(self) -> AnomalyRule:
        kinds = [spec.kind for spec in self.detectors]
        if not kinds and not self.disable:
            raise ValueError("a rule needs `detectors`, `disable` or both")
        twice = sorted({k for k in kinds if kinds.count(k) > 1})
        if twice:
            raise ValueError(f"kind {', '.join(twice)} is given twice: merge the two specs")
        both = sorted(set(kinds) & set(self.disable))
        if both:
            raise ValueError(f"kind {', '.join(both)} is both in `detectors` and in `disable`")
        return self


class AnomalyConfig(_Strict):
    """Anomaly detectors per point."""

    rules: list[AnomalyRule] = Field(
        default_factory=list, description="Rules, applied in order (later ones override)."
    )


def resolve(
    config: AnomalyConfig, points: Iterable[PointDef]
) -> dict[str, tuple[DetectorSpec, ...]]:
    """Which detectors each declared point gets, in point order; ConfigError names every rule
    that matches no point.

    Rules apply in order: for each point and kind the last rule naming the kind wins, so a
    specific rule after a broad one overrides it, and a rule's `disable` removes kinds. Numeric
    kinds go to numeric points only; `stale` to any point.
    """
    declared = list(points)
    by_id = {p.id: p for p in declared}
    chosen: dict[str, dict[str, DetectorSpec]] = {p.id: {} for p in declared}
    unmatched = []
    for number, rule in enumerate(config.rules):
        # An id without wildcards is looked up: a config that lists 10,000 ids one by one
        # would otherwise compare each with every point.
        wild = [glob_matcher(g) for g in rule.points if not _WILDCARDS.isdisjoint(g)]
        named = {g for g in rule.points if _WILDCARDS.isdisjoint(g) and g in by_id}
        matched = [p for p in declared if any(m(p.id) for m in wild)] if wild else []
        matched += [by_id[g] for g in named]
        if not matched:
            unmatched.append(f"rules[{number}] (points {rule.points})")
        for point in matched:
            kinds = chosen[point.id]
            for kind in rule.disable:
                kinds.pop(kind, None)
            for spec in rule.detectors:
                if spec.kind == "stale" or point.datatype in NUMERIC_TYPES:
                    kinds[spec.kind] = spec
    if unmatched:
        raise ConfigError(
            f"anomaly {', '.join(unmatched)} match no declared point: correct the globs "
            "against the point ids of the site config, or remove the rule"
        )
    return {
        point_id: tuple(sorted(kinds.values(), key=lambda s: _RANK[s.kind]))
        for point_id, kinds in chosen.items()
        if kinds
    }


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a point-id glob: `*` and `?` within one `/` segment, `**` across segments."""
    out = []
    for part in re.split(r"(\*\*|\*|\?)", pattern):
        if part == "**":
            out.append(".*")
        elif part == "*":
            out.append("[^/]*")
        elif part == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


def glob_matcher(pattern: str) -> Callable[[str], bool]:
    """A test of point ids against a glob (`glob_regex`'s meaning), in polynomial time.

    The regex of a glob with many stars backtracks exponentially on an id that almost
    matches (`**a**a**a**b` against 250 `a`s: 0.2 s, each further `**a` ~50x that), and a
    glob comes from a config file. Up to two stars the regex runs (worst case ~50 us on a
    256-character id); beyond, a bitset walk (`_StarMatcher`) whose cost is linear in the
    glob. A glob without wildcards is an equality test.
    """
    if _WILDCARDS.isdisjoint(pattern):
        return pattern.__eq__
    parts = [part for part in _GLOB_TOKENS.split(pattern) if part]
    if sum(part in ("*", "**") for part in parts) <= 2:
        regex = glob_regex(pattern)
        return lambda point_id: regex.fullmatch(point_id) is not None
    return _StarMatcher(parts)


class _StarMatcher:
    """A glob run as a set of positions: bit p of `reached` says the glob's tokens so far can
    match the id's first p characters. No backtracking: each token is a few big-int operations
    (a star spreads the set in log2(len) shifts), so the cost is linear in the glob."""

    __slots__ = ("tokens",)

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens

    def __call__(self, point_id: str) -> bool:
        n = len(point_id)
        every = (1 << (n + 1)) - 1
        # Bit p: character p can be matched by `*` or `?` (it is not a `/`).
        step = sum(1 << p for p, char in enumerate(point_id) if char != "/")
        found: dict[str, int] = {}
        reached = 1
        for token in self.tokens:
            if token == "**":  # anything: every position from the first one reached on
                reached = every & ~((reached & -reached) - 1)
            elif token == "*":  # on over non-`/` characters: 1, 2, 4, ... steps at a time
                can, shift = step, 1
                while shift <= n:
                    reached |= (reached & can) << shift
                    can &= can >> shift
                    shift <<= 1
            elif token == "?":
                reached = (reached & step) << 1
            else:
                at = found.get(token)
                if at is None:
                    at = found[token] = _occurrences(point_id, token)
                reached = (reached & at) << len(token)
            reached &= every
            if not reached:
                return False
        return bool(reached >> n & 1)


def _occurrences(text: str, literal: str) -> int:
    """Bit p set where `literal` occurs in `text` at p."""
    out = 0
    at = text.find(literal)
    while at >= 0:
        out |= 1 << at
        at = text.find(literal, at + 1)
    return out


_GLOB_TOKENS = re.compile(r"(\*\*|\*|\?)")
_WILDCARDS = frozenset("*?")


# -- the set ----------------------------------------------------------------------------------


class DetectorSet:
    """The detectors of every point, fed the ingest path's batches; returns their anomalies.

    `specs` maps point ids to their detector specs (`resolve` makes it from config); `start` is
    when watching began (stale counts from it until a point's first fresh sample; default: the
    clock now); `clock` gives `now` when a call does not. `vectorized=False` runs the detector
    objects instead of the column banks: the reference, at ~15x the CPU.

    Anomalies of one call come in sample order, and for one sample in `KINDS` order; those of
    `check` in point order. Not thread-safe: feed it from one thread (the event loop).
    """

    def __init__(
        self,
        specs: Mapping[str, Sequence[DetectorSpec]],
        *,
        start: float | None = None,
        clock: Callable[[], float] = time.time,
        vectorized: bool = True,
    ) -> None:
        self._clock = clock
        self.vectorized = vectorized
        begin = clock() if start is None else start
        rank = _RANK.__getitem__
        self._specs = {
            pid: tuple(sorted(given, key=lambda s: rank(s.kind)))
            for pid, given in specs.items()
            if given
        }
        for point_id, given in self._specs.items():
            kinds = [spec.kind for spec in given]
            if len(set(kinds)) != len(kinds):
                raise ConfigError(f"{point_id}: one detector per kind, got {kinds}")
        self._ids = list(self._specs)
        self._index = _Index({pid: row for row, pid in enumerate(self._ids)}, len(self._ids))
        self._objects: dict[str, tuple[Detector, ...]] = {}
        self._timed: list[TimedDetector] = []
        self._banks: list[_Bank] = []
        if vectorized:
            size = len(self._ids) + 1  # the last row stands for every point without detectors
            for kind in KINDS:
                rows = {
                    row: spec
                    for row, given in enumerate(self._specs.values())
                    for spec in given
                    if spec.kind == kind
                }
                if rows:
                    self._banks.append(_BANKS[kind](rows, size, self._ids, begin))
            self._stamp = np.zeros(size, dtype=np.intp)
            self._order = np.arange(0, dtype=np.intp)
            self._layouts: dict[tuple[int, str, str], _Layout] = {}
        else:
            for point_id, given in self._specs.items():
                made = tuple(make_detector(point_id, spec, start=begin) for spec in given)
                self._objects[point_id] = made
                self._timed += [d for d in made if isinstance(d, FlatlineDetector | StaleDetector)]

    @classmethod
    def from_config(
        cls,
        config: AnomalyConfig,
        points: Iterable[PointDef],
        *,
        start: float | None = None,
        clock: Callable[[], float] = time.time,
        vectorized: bool = True,
    ) -> DetectorSet:
        """Build the detectors `config` gives the declared `points` (see `resolve`)."""
        return cls(resolve(config, points), start=start, clock=clock, vectorized=vectorized)

    @property
    def point_ids(self) -> list[str]:
        """The points that have at least one detector, in declaration order."""
        return list(self._ids)

    def specs(self, point_id: str) -> tuple[DetectorSpec, ...]:
        """The detector specs of one point (empty if it has none)."""
        return self._specs.get(point_id, ())

    def active(self, point_id: str) -> tuple[str, ...]:
        """The kinds latched on a point now: fired, and their condition has not cleared."""
        if not self.vectorized:
            return tuple(d.kind for d in self._objects.get(point_id, ()) if d.active)
        row = self._index[point_id]
        return tuple(b.kind for b in self._banks if b.on[row] and b.active[row])

    def on_samples(self, samples: Iterable[Sample], now: float | None = None) -> list[Anomaly]:
        """Feed one batch of driver samples, arrived at `now` (default: the clock; the samples'
        own `source_ts` is not used, see the module docstring)."""
        batch = samples if isinstance(samples, list | tuple) else list(samples)
        if not batch:
            return []
        at = self._clock() if now is None else now
        # Comprehensions, not map(itemgetter): the interpreter's specialised indexing and
        # attribute loads take a third of the time of a C getter's call per item.
        keys = [s[0] for s in batch]
        return self._feed(keys, [s[1] for s in batch], [s[2] for s in batch], at)

    def on_changes(self, changes: Sequence[PointValue]) -> list[Anomaly]:
        """Feed the changes of one twin ingest (a `TwinStore` listener), at their gateway time.

        The twin stamps one ingest with one clock reading, so the first change's time is the
        batch's.
        """
        if not changes:
            return []
        keys = [c.point_id for c in changes]
        values = [c.value for c in changes]
        return self._feed(keys, values, [c.quality for c in changes], changes[0].gateway_ts)

    def check(self, now: float | None = None) -> list[Anomaly]:
        """Run the time-driven detectors (flatline, stale) at `now`; call it periodically.

        They fire between samples, when no sample comes: a check every quarter of the shortest
        `duration_s` / `max_age_s` finds them at most that late.
        """
        at = self._clock() if now is None else now
        if not self.vectorized:
            return [a for d in self._timed if (a := d.check(at)) is not None]
        found = [hit for bank in self._banks if bank.timed for hit in bank.check(at)]
        if len(found) > 1:
            found.sort(key=lambda hit: (hit[0], _RANK[hit[1].kind]))
        return [anomaly for _, anomaly in found]

    # -- helpers ----------------------------------------------------------------------------

    def _feed(
        self, keys: list[str], values: list[Any], qualities: list[Any], ts: float
    ) -> list[Anomaly]:
        """Feed one batch, given column by column (no object per sample: zip(*batch) made
        10,000 iterators per batch, and the garbage collector then cost more than the
        detectors)."""
        if not self.vectorized:
            out = []
            objects = self._objects
            for point_id, value, quality in zip(keys, values, qualities, strict=True):
                for detector in objects.get(point_id, ()):
                    anomaly = detector.update(ts, value, quality)
                    if anomaly is not None:
                        out.append(anomaly)
            return out
        # A poll that reports the same points as an earlier one (every point of a busy device
        # changes every poll) reuses that batch's layout: comparing keys is ~4x cheaper than
        # looking them up.
        tag = (len(keys), keys[0], keys[-1])
        layout = self._layouts.get(tag)
        if layout is None or keys != layout.keys:
            if len(self._layouts) >= _LAYOUTS:
                self._layouts.clear()
            layout = self._layouts[tag] = self._lay_out(keys)
        if layout.idx is None:
            return []
        n = len(keys)
        x, present = _numbers(values)
        finite = np.isfinite(x)
        if qualities.count(Quality.GOOD) == n:  # the common case: no mask
            num_ok = finite
            fresh = finite if present is None else present
        else:
            usable = np.fromiter(map(USABLE.__contains__, qualities), bool, count=n)
            num_ok = finite & usable
            fresh = (finite if present is None else present) & usable
        if layout.keep is not None:  # points without detectors (positions shift, order stays)
            x, num_ok, fresh = x[layout.keep], num_ok[layout.keep], fresh[layout.keep]
        idx = layout.idx
        with np.errstate(all="ignore"):  # inf and NaN are expected and handled
            if layout.runs is None:
                found = self._update(idx, ts, x, num_ok, fresh, 0)
            else:  # a point twice in one batch: in order, in runs where each point is once
                found = []
                for run in layout.runs:
                    found += self._update(idx[run], ts, x[run], num_ok[run], fresh[run], run.start)
        if len(found) > 1:
            found.sort(key=lambda hit: (hit[0], _RANK[hit[1].kind]))
        return [anomaly for _, anomaly in found]

    def _lay_out(self, keys: list[str]) -> _Layout:
        """Where a batch's keys go: bank rows, which samples to keep, runs if a row repeats."""
        idx = np.fromiter(map(self._index.__getitem__, keys), dtype=np.intp, count=len(keys))
        keep = None
        nobody = idx == self._index.nobody
        if _any(nobody):
            if _all(nobody):
                return _Layout(keys, None, None, None)
            keep = ~nobody
            idx = idx[keep]
        n = len(idx)
        if len(self._order) < n:
            self._order = np.arange(max(n, 2 * len(self._order)), dtype=np.intp)
        order = self._order[:n]
        self._stamp[idx] = order  # a repeated row keeps its last position only
        runs = None if _all(self._stamp[idx] == order) else _runs(idx.tolist())
        idx.flags.writeable = False  # reused by later batches: no bank may write into it
        return _Layout(keys, idx, keep, runs)

    def _update(
        self,
        idx: np.ndarray,
        ts: float,
        x: np.ndarray,
        num_ok: np.ndarray,
        fresh: np.ndarray,
        offset: int,
    ) -> list[tuple[int, Anomaly]]:
        num = None if _all(num_ok) else num_ok
        new = None if _all(fresh) else fresh
        found = []
        for bank in self._banks:
            found += bank.update(idx, ts, x, num, new)
        if offset:
            found = [(pos + offset, a) for pos, a in found]
        return found


# -- one detector per class (the reference; DetectorSet(vectorized=False) uses them) ---------


class Detector(Protocol):
    """What every detector class offers."""

    point_id: str
    active: bool

    @property
    def kind(self) -> str:
        """The detector's kind, one of `KINDS`."""
        ...

    def update(self, ts: float, value: Any, quality: str) -> Anomaly | None:
        """Take one sample; return the anomaly it causes, if any."""
        ...


class TimedDetector(Detector, Protocol):
    """A detector that can fire without a sample (flatline, stale)."""

    def check(self, now: float) -> Anomaly | None:
        """Judge at `now` with no new sample; return the anomaly, if any."""
        ...


class _Base:
    kind: ClassVar[str]
    __slots__ = ("active", "point_id")

    def __init__(self, point_id: str) -> None:
        self.point_id = point_id
        self.active = False

    def _latch(self, firing: bool, clearing: bool) -> bool:
        """Whether to report: only on the transition into the condition (hysteresis)."""
        if self.active:
            if clearing:
                self.active = False
            return False
        if firing:
            self.active = True
            return True
        return False


class ZScoreDetector(_Base):
    """Rolling z-score of each value against the `window` values before it.

    Mean and variance are updated in O(1) (Welford, then a sliding form of it once the window is
    full). They are summed afresh from the stored values after each full pass over the window,
    and at once when an update cancels most of its digits (a huge outlier leaving the window),
    so rounding leaves no residue that would turn the next samples into false alarms.
    """

    kind = "zscore"
    __slots__ = ("_buf", "_clear", "_m2", "_mean", "_min_n", "_min_sd", "_n", "_pos", "_thr", "_w")

    def __init__(self, point_id: str, spec: ZScoreSpec) -> None:
        super().__init__(point_id)
        self._w = spec.window
        self._min_n = spec.window if spec.min_samples is None else spec.min_samples
        self._thr = spec.threshold
        self._clear = spec.clear_ratio
        self._min_sd = spec.min_sd
        self._buf = [0.0] * spec.window
        self._pos = self._n = 0
        self._mean = self._m2 = 0.0

    def update(self, ts: float, value: Any, quality: str) -> Anomaly | None:
        """Take one sample; return an anomaly when |z| reaches the threshold."""
        x = _finite(value, quality)
        if x is None:
            return None
        n, mean = self._n, self._mean
        r = z = sd = _NAN
        if n >= self._min_n:
            sd = math.sqrt(max(self._m2, 0.0) / (n - 1))
            if sd < self._min_sd:
                sd = self._min_sd
            d = x - mean
            # As numpy would divide, but 0/0 is 0 (x at the mean of a constant window).
            z = (0.0 if d == 0.0 else math.copysign(_INF, d)) if sd == 0.0 else d / sd
            r = abs(z) / self._thr
        self._add(x)
        if not self._latch(r >= 1.0, r < self._clear):
            return None
        features: Features = {"value": x, "z": z, "mean": mean, "sd": sd, "samples": float(n)}
        return Anomaly(self.point_id, self.kind, score(r), ts, features)

    def _add(self, x: float) -> None:
        n, w, pos = self._n, self._w, self._pos
        lost = False
        if n < w:
            self._n = n + 1
            self._mean, self._m2 = _welford_add(n + 1, self._mean, self._m2, x)
        else:
            old = self._buf[pos]
            self._mean, self._m2, lost = _welford_slide(w, self._mean, self._m2, x, old)
        self._buf[pos] = x
        pos += 1
        if pos == w:
            pos = 0
        if lost or pos == 0:
            total = 0.0
            for v in self._buf:
                total += v
            mean = total / w
            m2 = 0.0
            for v in self._buf:
                d = v - mean
                m2 += d * d
            self._mean, self._m2 = mean, m2
        self._pos = pos


class EwmaDetector(_Base):
    """EWMA control chart: `e = alpha x + (1 - alpha) e`, starting at `target`; fires when
    |e - target| reaches `limit_sigmas * sigma * sqrt(alpha / (2 - alpha))` (the asymptotic
    control limit). `target` and `sigma` not given are estimated from the warm-up samples."""

    kind = "ewma"
    __slots__ = (
        "_alpha",
        "_clear",
        "_e",
        "_k",
        "_keep",
        "_limit",
        "_m2",
        "_mean",
        "_min_sd",
        "_n",
        "_ready",
        "_sigma",
        "_spec",
        "_target",
        "_warmup",
    )

    def __init__(self, point_id: str, spec: EwmaSpec) -> None:
        super().__init__(point_id)
        self._spec = spec
        self._alpha = spec.alpha
        self._keep = 1.0 - spec.alpha
        self._k = _ewma_k(spec)
        self._clear = spec.clear_ratio
        self._warmup = spec.warmup
        self._min_sd = spec.min_sd
        self._n = 0
        self._mean = self._m2 = 0.0
        self._ready = spec.target is not None and spec.sigma is not None
        self._target = _NAN if spec.target is None else spec.target
        self._sigma = _NAN if spec.sigma is None else spec.sigma
        self._limit = self._k * self._sigma
        self._e = self._target

    def update(self, ts: float, value: Any, quality: str) -> Anomaly | None:
        """Take one sample; return an anomaly when the EWMA leaves its control limits."""
        x = _finite(value, quality)
        if x is None:
            return None
        if not self._ready:
            n = self._n = self._n + 1
            self._mean, self._m2 = _welford_add(n, self._mean, self._m2, x)
            if n >= self._warmup:
                if self._spec.target is None:
                    self._target = self._mean
                if self._spec.sigma is None:
                    sd = math.sqrt(max(self._m2, 0.0) / (n - 1))
                    if sd < self._min_sd:
                        sd = self._min_sd
                    self._sigma = sd
                self._limit = self._k * self._sigma
                self._e = self._target
                self._ready = True
            return None
        e = self._e = self._alpha * x + self._keep * self._e
        dev = e - self._target
        limit = self._limit
        r = (0.0 if dev == 0.0 else _INF) if limit == 0.0 else abs(dev) / limit
        if not self._latch(r >= 1.0, r < self._clear):
            return None
        features: Features = {
            "value": x,
            "ewma": e,
            "target": self._target,
            "sigma": self._sigma,
            "limit": limit,
        }
        return Anomaly(self.point_id, self.kind, score(r), ts, features)


class RateOfChangeDetector(_Base):
    """|change| / seconds between consecutive counted samples against `max_rate`.

    Two samples at the same instant (one batch) give no rate: the later value replaces the
    earlier one.
    """

    kind = "rate_of_change"
    __slots__ = ("_clear", "_last", "_last_ts", "_max")

    def __init__(self, point_id: str, spec: RateOfChangeSpec) -> None:
        super().__init__(point_id)
        self._max = spec.max_rate
        self._clear = spec.clear_ratio
        self._last: float | None = None
        self._last_ts = _NAN

    def update(self, ts: float, value: Any, quality: str) -> Anomaly | None:
        """Take one sample; return an anomaly when the value moves too fast."""
        x = _finite(value, quality)
        if x is None:
            return None
        last = self._last
        self._last = x
        if last is None:
            self._last_ts = ts
            return None
        dt = ts - self._last_ts
        if not dt > 0.0:
            return None
        self._last_ts = ts
        rate = (x - last) / dt
        r = abs(rate) / self._max
        if not self._latch(r >= 1.0, r < self._clear):
            return None
        features: Features = {
            "value": x,
            "previous": last,
            "rate": rate,
            "dt_s": dt,
            "max_rate": self._max,
        }
        return Anomaly(self.point_id, self.kind, score(r), ts, features)


class FlatlineDetector(_Base):
    """A value that stays within `tolerance` of where its run began for `duration_s`.

    A sample that does not count (BAD, STALE, not a finite number) ends the run: the point is
    then broken, not stuck, and the next good value starts a new one.
    """

    kind = "flatline"
    __slots__ = ("_anchor", "_anchor_ts", "_duration", "_tol")

    def __init__(self, point_id: str, spec: FlatlineSpec) -> None:
        super().__init__(point_id)
        self._duration = spec.duration_s
        self._tol = spec.tolerance
        self._anchor = 0.0
        self._anchor_ts: float | None = None

    def update(self, ts: float, value: Any, quality: str) -> Anomaly | None:
        """Take one sample; return an anomaly when the run has lasted `duration_s`."""
        x = _finite(value, quality)
        if x is None:
            self._anchor_ts = None
            self.active = False
            return None
        if self._anchor_ts is None or abs(x - self._anchor) > self._tol:
            self._anchor, self._anchor_ts = x, ts
            self.active = False
            return None
        return self._judge(ts)

    def check(self, now: float) -> Anomaly | None:
        """Judge at `now` (no sample: a change-filtered feed sends none while flat)."""
        if self._anchor_ts is None:
            return None
        return self._judge(now)

    def _judge(self, now: float) -> Anomaly | None:
        assert self._anchor_ts is not None
        flat = now - self._anchor_ts
        r = flat / self._duration
        if not self._latch(r >= 1.0, False):
            return None
        features: Features = {"value": self._anchor, "flat_s": flat, "tolerance": self._tol}
        return Anomaly(self.point_id, self.kind, score(r), now, features)


class OutOfRangeDetector(_Base):
    """A value outside [lo, hi]; score from how far: `1 + excess / span`, span being hi - lo,
    or for a one-sided range the bound's magnitude (at least 1)."""

    kind = "out_of_range"
    __slots__ = ("_hi", "_hi_in", "_lo", "_lo_in", "_span", "_spec")

    def __init__(self, point_id: str, spec: OutOfRangeSpec) -> None:
        super().__init__(point_id)
        self._spec = spec
        self._lo, self._hi, self._lo_in, self._hi_in, self._span = _range_params(spec)

    def update(self, ts: float, value: Any, quality: str) -> Anomaly | None:
        """Take one sample; return an anomaly when it leaves the range."""
        x = _finite(value, quality)
        if x is None:
            return None
        if x < self._lo:
            excess = self._lo - x
        elif x > self._hi:
            excess = x - self._hi
        else:
            excess = 0.0
        inside = self._lo_in <= x <= self._hi_in
        if not self._latch(excess > 0.0, inside):
            return None
        r = 1.0 + excess / self._span
        features: Features = {
            "value": x,
            "lo": self._spec.lo,
            "hi": self._spec.hi,
            "excess": excess,
        }
        return Anomaly(self.point_id, self.kind, score(r), ts, features)


class StaleDetector(_Base):
    """No fresh sample for `max_age_s`, measured from the last one (or from `start`, the time
    the detector began watching; default: the first time it is called)."""

    kind = "stale"
    __slots__ = ("_last", "_max_age", "_start")

    def __init__(self, point_id: str, spec: StaleSpec, start: float | None = None) -> None:
        super().__init__(point_id)
        self._max_age = spec.max_age_s
        self._start = start
        self._last: float | None = None

    def update(self, ts: float, value: Any, quality: str) -> Anomaly | None:
        """Take one sample: a fresh one resets the age, any other is judged at its time."""
        if _is_fresh(value, quality):
            self._last = ts
            self.active = False
            return None
        return self.check(ts)

    def check(self, now: float) -> Anomaly | None:
        """Judge at `now`; return an anomaly when the last fresh sample is too old."""
        ref = self._last if self._last is not None else self._start
        if ref is None:
            self._start = now
            return None
        age = now - ref
        r = age / self._max_age
        if not self._latch(r >= 1.0, False):
            return None
        features: Features = {"age_s": age, "max_age_s": self._max_age, "last_good_ts": self._last}
        return Anomaly(self.point_id, self.kind, score(r), now, features)


def make_detector(point_id: str, spec: DetectorSpec, *, start: float | None = None) -> Detector:
    """Build the detector object for one spec (`start`: when a stale detector began watching)."""
    if isinstance(spec, StaleSpec):
        return StaleDetector(point_id, spec, start)
    if isinstance(spec, ZScoreSpec):
        return ZScoreDetector(point_id, spec)
    if isinstance(spec, EwmaSpec):
        return EwmaDetector(point_id, spec)
    if isinstance(spec, RateOfChangeSpec):
        return RateOfChangeDetector(point_id, spec)
    if isinstance(spec, FlatlineSpec):
        return FlatlineDetector(point_id, spec)
    return OutOfRangeDetector(point_id, spec)


# -- helpers shared by both implementations ---------------------------------------------------

# The two Welford steps work on floats and on numpy arrays alike, so objects and banks compute
# bit for bit the same.


def _welford_add(n: Any, mean: Any, m2: Any, x: Any) -> tuple[Any, Any]:
    """Add x as the n-th sample; return the new mean and sum of squared deviations."""
    delta = x - mean
    mean = mean + delta / n
    return mean, m2 + delta * (x - mean)


def _welford_slide(w: Any, mean: Any, m2: Any, x: Any, old: Any) -> tuple[Any, Any, Any]:
    """Replace `old` by x in a full window of w samples; also return whether the update lost
    most of its digits (a huge value left: m2 is then mostly rounding error, sum afresh)."""
    new_mean = mean + (x - old) / w
    change = (x - old) * (x - new_mean + old - mean)
    new_m2 = m2 + change
    return new_mean, new_m2, abs(change) > _CANCELLED * abs(new_m2)


def _ewma_k(spec: EwmaSpec) -> float:
    return spec.limit_sigmas * math.sqrt(spec.alpha / (2.0 - spec.alpha))


def _range_params(spec: OutOfRangeSpec) -> tuple[float, float, float, float, float]:
    lo = -_INF if spec.lo is None else spec.lo
    hi = _INF if spec.hi is None else spec.hi
    if spec.lo is not None and spec.hi is not None:
        span = spec.hi - spec.lo
    else:
        bound = spec.lo if spec.lo is not None else spec.hi
        span = max(abs(bound or 0.0), 1.0)
    return lo, hi, lo + spec.clear_margin, hi - spec.clear_margin, span


def _number(value: Any) -> float | None:
    """The value as a finite float, or None: missing, not taken by `float()`, NaN or ±inf."""
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return x if math.isfinite(x) else None


def _finite(value: Any, quality: str) -> float | None:
    """What a numeric detector takes from a sample: a finite number of counted quality."""
    return _number(value) if quality in USABLE else None


def _is_fresh(value: Any, quality: str) -> bool:
    """Whether a sample resets a stale detector: counted quality and a value that is neither
    missing nor a non-finite number (text is a value)."""
    return quality in USABLE and _present(value)


def _present(value: Any) -> bool:
    if value is None:
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):
        return True


def _numbers(values: list[Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """The batch's values as float64 (NaN where `_number` gives None) and, when some value is
    no number, which ones are `_present` (None: exactly the finite ones)."""
    n = len(values)
    try:
        # float() semantics, as `_number`: a bool is 0/1, numeric text its number, None NaN.
        return np.fromiter(values, dtype=np.float64, count=n), None
    except (TypeError, ValueError, OverflowError):
        pass
    # Text or other non-numbers in the batch: element by element.
    floats = np.empty(n)
    present = np.empty(n, dtype=bool)
    for k, item in enumerate(values):
        number = _number(item)
        floats[k] = _NAN if number is None else number
        present[k] = _present(item)
    return floats, present


def _runs(rows: list[int]) -> list[slice]:
    """Split a batch into consecutive runs in which no row repeats."""
    runs: list[slice] = []
    seen: set[int] = set()
    begin = 0
    for k, row in enumerate(rows):
        if row in seen:
            runs.append(slice(begin, k))
            seen, begin = set(), k
        seen.add(row)
    runs.append(slice(begin, len(rows)))
    return runs


def _json_number(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return str(value)


class _Layout(NamedTuple):
    """Where the samples of a batch with these keys go (see `DetectorSet._lay_out`)."""

    keys: list[str] | None
    idx: np.ndarray | None  # bank row of each kept sample; None: no sample has detectors
    keep: np.ndarray | None  # which samples have detectors; None: all
    runs: list[slice] | None  # runs without a repeated row; None: no row repeats


class _Index(dict[str, int]):
    """Point id → bank row; any other id → the row of points without detectors."""

    def __init__(self, rows: dict[str, int], nobody: int) -> None:
        super().__init__(rows)
        self.nobody = nobody

    def __missing__(self, key: str) -> int:
        return self.nobody


# -- column banks: one kind, every point, one numpy pass per batch ----------------------------
#
# Each bank mirrors its detector class operation for operation (the same expressions, in the
# same order, on float64), so the two agree exactly. Rows are points; the last row belongs to
# points without detectors and is never `on`. `update` gets the batch's rows (each once), the
# batch time, the values (NaN where not a number) and two masks, None meaning "all": `num`
# (a finite number of counted quality) and `new` (fresh for `stale`). It returns (position in
# the batch, anomaly) pairs. Work is skipped where the common case allows: parameters all rows
# share are plain numbers (no column to gather), and while no row is latched nothing can clear.

Hits: TypeAlias = list[tuple[int, Anomaly]]
_Mask: TypeAlias = "np.ndarray | None"
_Param: TypeAlias = "Any"  # a plain number shared by every row, or one per row (ndarray)


def _at(param: _Param, i: Any) -> Any:
    """The parameter for rows `i`: its column there, or the plain number every row shares."""
    return param[i] if isinstance(param, np.ndarray) else param


def _any(mask: np.ndarray) -> bool:
    # count_nonzero is a plain C call; .any() goes through the ufunc machinery (3x the time on
    # a batch of 100, and a batch makes a few dozen of these calls).
    return int(np.count_nonzero(mask)) > 0


def _all(mask: np.ndarray) -> bool:
    return int(np.count_nonzero(mask)) == len(mask)


def _zero(param: _Param) -> bool:
    return not isinstance(param, np.ndarray) and param == 0.0


class _Bank:
    kind: ClassVar[Kind]
    timed: ClassVar[bool] = False

    def __init__(self, rows: dict[int, Any], size: int, ids: list[str], start: float) -> None:
        self.ids = ids
        self.rows = rows
        self.on = np.zeros(size, dtype=bool)
        self.on[list(rows)] = True
        self.everyone = bool(self.on[:-1].all())
        self.active = np.zeros(size, dtype=bool)
        self.latched = 0  # rows active now

    def param(
        self,
        get: Callable[[Any], Any],
        fill: Any = _NAN,
        dtype: Any = np.float64,
        source: Callable[[Any], Any] = lambda spec: spec,
    ) -> _Param:
        """Each row's `get(source(spec))`: a plain number when every row has the same."""
        values = [get(source(spec)) for spec in self.rows.values()]
        if all(v == values[0] for v in values):
            return values[0]
        out = np.full(len(self.on), fill, dtype=dtype)
        out[list(self.rows)] = values
        return out

    def pick(self, idx: np.ndarray, mask: _Mask) -> _Mask:
        """Which of the batch this bank looks at (None: all of it)."""
        if self.everyone:
            return mask
        on = self.on[idx]
        return on if mask is None else on & mask

    def latch(
        self,
        i: np.ndarray,
        firing: np.ndarray,
        clearing: Callable[[], np.ndarray] | None = None,
    ) -> np.ndarray | None:
        """`_Base._latch` for rows i: which fire (None: none). `clearing` is only called when
        some row is latched."""
        if not self.latched:
            if not _any(firing):
                return None
            self.active[i[firing]] = True
            self.latched = int(np.count_nonzero(self.active))
            return firing
        act = self.active[i]
        fire = firing & ~act
        self.active[i] = (act if clearing is None else act & ~clearing()) | fire
        self.latched = int(np.count_nonzero(self.active))
        return fire if _any(fire) else None

    def release(self, rows: Any) -> None:
        """Unlatch rows whose condition ended outside `latch` (a new run, a fresh sample)."""
        if self.latched:
            self.active[rows] = False
            self.latched = int(np.count_nonzero(self.active))

    def update(
        self, idx: np.ndarray, ts: float, x: np.ndarray, num: _Mask, new: _Mask
    ) -> Hits:  # pragma: no cover - every bank defines it
        raise NotImplementedError

    def check(self, now: float) -> Hits:  # pragma: no cover - timed banks define it
        raise NotImplementedError

    def hits(self, sel: _Mask, fire: np.ndarray, make: Callable[[int], Anomaly]) -> Hits:
        """(position in the batch, make(k)) for each fired element k of the selection `sel`."""
        fired = np.flatnonzero(fire)
        positions = fired if sel is None else np.flatnonzero(sel)[fired]
        return [(int(p), make(int(k))) for p, k in zip(positions, fired, strict=True)]

    def fire_timed(self, r: np.ndarray, make: Callable[[int, float], Anomaly]) -> Hits:
        """`check` for rows whose measure r (one per row) reached 1 and that are not latched."""
        rows = np.flatnonzero(self.on & ~self.active & (r >= 1.0))
        if not len(rows):
            return []
        self.active[rows] = True
        self.latched = int(np.count_nonzero(self.active))
        return [(row, make(row, float(r[row]))) for row in rows.tolist()]


def _select(idx: np.ndarray, x: np.ndarray, sel: _Mask) -> tuple[np.ndarray, np.ndarray] | None:
    if sel is None:
        return idx, x
    if not _any(sel):
        return None
    return idx[sel], x[sel]


def _one(param: _Param, row: int) -> float:
    return float(param[row]) if isinstance(param, np.ndarray) else param


class _ZScoreBank(_Bank):
    kind = "zscore"

    def __init__(self, rows: dict[int, Any], size: int, ids: list[str], start: float) -> None:
        super().__init__(rows, size, ids, start)
        self.w = self.param(lambda s: s.window, 0, np.int64)
        self.min_n = self.param(
            lambda s: s.window if s.min_samples is None else s.min_samples, 0, np.int64
        )
        self.thr = self.param(lambda s: s.threshold)
        self.clear = self.param(lambda s: s.clear_ratio)
        self.min_sd = self.param(lambda s: s.min_sd)
        self.n = np.zeros(size, dtype=np.int64)
        self.pos = np.zeros(size, dtype=np.int64)
        self.mean = np.zeros(size)
        self.m2 = np.zeros(size)
        # One flat ring buffer: row r's window is buf[off[r] : off[r] + w[r]], members only.
        widths = np.where(self.on, self.w, 0)
        self.off = np.zeros(size, dtype=np.int64)
        self.off[1:] = np.cumsum(widths[:-1])
        self.buf = np.zeros(int(widths.sum()))
        self.young = len(rows)  # rows with fewer than min_samples samples
        self.filling = len(rows)  # rows whose window is not full yet

    def update(self, idx: np.ndarray, ts: float, x: np.ndarray, num: _Mask, new: _Mask) -> Hits:
        sel = self.pick(idx, num)
        chosen = _select(idx, x, sel)
        if chosen is None:
            return []
        i, v = chosen
        n, mean, m2 = self.n[i], self.mean[i], self.m2[i]
        sd = np.sqrt(np.maximum(m2, 0.0) / (n - 1))
        if not _zero(self.min_sd):
            sd = np.maximum(sd, _at(self.min_sd, i))
        d = v - mean
        z = d / sd
        zero = sd == 0.0
        if _any(zero):
            z[zero] = np.where(d[zero] == 0.0, 0.0, np.copysign(_INF, d[zero]))
        r = np.abs(z) / _at(self.thr, i)
        if self.young:
            r[n < _at(self.min_n, i)] = _NAN
        self._add(i, v, n, mean, m2)
        fire = self.latch(i, r >= 1.0, lambda: r < _at(self.clear, i))
        if fire is None:
            return []
        ids = self.ids

        def make(k: int) -> Anomaly:
            features: Features = {
                "value": float(v[k]),
                "z": float(z[k]),
                "mean": float(mean[k]),
                "sd": float(sd[k]),
                "samples": float(n[k]),
            }
            return Anomaly(ids[i[k]], self.kind, score(float(r[k])), ts, features)

        return self.hits(sel, fire, make)

    def _add(
        self, i: np.ndarray, v: np.ndarray, n: np.ndarray, mean: np.ndarray, m2: np.ndarray
    ) -> None:
        w, pos = _at(self.w, i), self.pos[i]
        slot = self.off[i] + pos
        if not self.filling:
            new_mean, new_m2, lost = _welford_slide(w, mean, m2, v, self.buf[slot])
        else:
            filling = n < w
            if _all(filling):
                new_mean, new_m2 = _welford_add(n + 1, mean, m2, v)
                lost = np.zeros(len(i), dtype=bool)
            else:
                new_mean, new_m2, lost = _welford_slide(w, mean, m2, v, self.buf[slot])
                if _any(filling):
                    f_mean, f_m2 = _welford_add(n + 1, mean, m2, v)
                    new_mean[filling] = f_mean[filling]
                    new_m2[filling] = f_m2[filling]
                    lost &= ~filling
            self.n[i] = n + filling
            self.filling = int(np.count_nonzero(self.on & (self.n < self.w)))
            if self.young:
                self.young = int(np.count_nonzero(self.on & (self.n < self.min_n)))
        self.buf[slot] = v
        pos = pos + 1
        wrapped = pos == w
        if _any(wrapped):
            pos[wrapped] = 0
        redo = wrapped | lost
        if _any(redo):
            self._exact(i[redo], new_mean, new_m2, redo)
        self.pos[i] = pos
        self.mean[i] = new_mean
        self.m2[i] = new_m2

    def _exact(self, rows: np.ndarray, mean: np.ndarray, m2: np.ndarray, where: np.ndarray) -> None:
        """Sum the windows of `rows` afresh, left to right as the objects do (numpy's sum is
        pairwise, so columns are added one by one); write into mean and m2 at `where`."""
        w = np.broadcast_to(np.asarray(_at(self.w, rows)), rows.shape)
        exact_mean = np.empty(len(rows))
        exact_m2 = np.empty(len(rows))
        for width in np.unique(w).tolist():
            group = np.flatnonzero(w == width)
            chosen = rows[group]
            if self.everyone and not isinstance(self.w, np.ndarray):
                # Every row's window lies at row * width: a 2-D view, no index to build.
                windows = self.buf.reshape(-1, width)
                window = windows if len(chosen) == len(windows) else windows[chosen]
            else:
                window = self.buf[self.off[chosen][:, None] + np.arange(width)]
            mu = _column_sum(window) / width
            d = window - mu[:, None]
            d *= d
            exact_mean[group] = mu
            exact_m2[group] = _column_sum(d)
        mean[where] = exact_mean
        m2[where] = exact_m2


def _column_sum(window: np.ndarray) -> np.ndarray:
    """Each row's sum, adding its columns left to right (as a Python loop over the row would)."""
    if len(window) <= 64:
        # One call, sequential along each row (accumulate, unlike sum, is never pairwise).
        return np.cumsum(window, axis=1)[:, -1]
    total = np.zeros(len(window))  # many rows: a column at a time is twice as fast
    for column in window.T:
        total += column
    return total


class _EwmaBank(_Bank):
    kind = "ewma"

    def __init__(self, rows: dict[int, Any], size: int, ids: list[str], start: float) -> None:
        super().__init__(rows, size, ids, start)
        self.alpha = self.param(lambda s: s.alpha)
        self.keep = self.param(lambda s: 1.0 - s.alpha)
        self.k = self.param(_ewma_k)
        self.clear = self.param(lambda s: s.clear_ratio)
        self.warmup = self.param(lambda s: s.warmup, 0, np.int64)
        self.min_sd = self.param(lambda s: s.min_sd)
        self.given_target = np.zeros(size, dtype=bool)
        self.given_sigma = np.zeros(size, dtype=bool)
        self.target = np.full(size, _NAN)
        self.sigma = np.full(size, _NAN)
        for row, spec in rows.items():
            if spec.target is not None:
                self.given_target[row], self.target[row] = True, spec.target
            if spec.sigma is not None:
                self.given_sigma[row], self.sigma[row] = True, spec.sigma
        self.ready = self.given_target & self.given_sigma
        self.warming = int(np.count_nonzero(self.on & ~self.ready))
        self.limit = self.k * self.sigma
        # Whether some row's limit is 0 (a constant warm-up, an underflow): 0/0 needs fixing.
        self.zero_limit = _any(self.on & (self.limit == 0.0))
        self.e = self.target.copy()
        self.n = np.zeros(size, dtype=np.int64)
        self.mean = np.zeros(size)
        self.m2 = np.zeros(size)

    def update(self, idx: np.ndarray, ts: float, x: np.ndarray, num: _Mask, new: _Mask) -> Hits:
        sel = self.pick(idx, num)
        chosen = _select(idx, x, sel)
        if chosen is None:
            return []
        i, v = chosen
        ready = None
        if self.warming:
            ready = self.ready[i]
            if _all(ready):
                ready = None
            else:
                self._warm(i[~ready], v[~ready])
        e = _at(self.alpha, i) * v + _at(self.keep, i) * self.e[i]
        target, limit = self.target[i], self.limit[i]
        dev = e - target
        r = np.abs(dev) / limit
        if self.zero_limit:
            zero = limit == 0.0
            if _any(zero):
                r[zero] = np.where(dev[zero] == 0.0, 0.0, _INF)
        if ready is None:
            self.e[i] = e
        else:  # samples that warmed up are not judged
            r[~ready] = _NAN
            self.e[i[ready]] = e[ready]
        fire = self.latch(i, r >= 1.0, lambda: r < _at(self.clear, i))
        if fire is None:
            return []
        ids, sigma = self.ids, self.sigma[i]

        def make(k: int) -> Anomaly:
            features: Features = {
                "value": float(v[k]),
                "ewma": float(e[k]),
                "target": float(target[k]),
                "sigma": float(sigma[k]),
                "limit": float(limit[k]),
            }
            return Anomaly(ids[i[k]], self.kind, score(float(r[k])), ts, features)

        return self.hits(sel, fire, make)

    def _warm(self, i: np.ndarray, v: np.ndarray) -> None:
        n = self.n[i] + 1
        mean, m2 = _welford_add(n, self.mean[i], self.m2[i], v)
        self.n[i], self.mean[i], self.m2[i] = n, mean, m2
        done = n >= _at(self.warmup, i)
        if not _any(done):
            return
        rows, n, mean, m2 = i[done], n[done], mean[done], m2[done]
        target = np.where(self.given_target[rows], self.target[rows], mean)
        sd = np.sqrt(np.maximum(m2, 0.0) / (n - 1))
        if not _zero(self.min_sd):
            sd = np.maximum(sd, _at(self.min_sd, rows))
        sigma = np.where(self.given_sigma[rows], self.sigma[rows], sd)
        limit = _at(self.k, rows) * sigma
        self.target[rows], self.sigma[rows], self.limit[rows] = target, sigma, limit
        self.e[rows] = target
        self.ready[rows] = True
        self.warming -= len(rows)
        self.zero_limit = self.zero_limit or _any(limit == 0.0)


class _RateOfChangeBank(_Bank):
    kind = "rate_of_change"

    def __init__(self, rows: dict[int, Any], size: int, ids: list[str], start: float) -> None:
        super().__init__(rows, size, ids, start)
        self.max = self.param(lambda s: s.max_rate)
        self.clear = self.param(lambda s: s.clear_ratio)
        self.last = np.full(size, _NAN)  # NaN: none yet (only finite values are kept)
        self.last_ts = np.full(size, _NAN)

    def update(self, idx: np.ndarray, ts: float, x: np.ndarray, num: _Mask, new: _Mask) -> Hits:
        sel = self.pick(idx, num)
        chosen = _select(idx, x, sel)
        if chosen is None:
            return []
        i, v = chosen
        last, last_ts = self.last[i], self.last_ts[i]
        dt = ts - last_ts
        later = dt > 0.0  # False too where there was no sample before (NaN)
        rate = (v - last) / dt
        r = np.abs(rate) / _at(self.max, i)
        self.last[i] = v
        if _all(later):
            self.last_ts[i] = ts
        else:  # same instant: the time of the earlier value stays
            self.last_ts[i] = np.where(~np.isnan(last) & ~later, last_ts, ts)
        fire = self.latch(i, (r >= 1.0) & later, lambda: (r < _at(self.clear, i)) & later)
        if fire is None:
            return []
        ids = self.ids

        def make(k: int) -> Anomaly:
            features: Features = {
                "value": float(v[k]),
                "previous": float(last[k]),
                "rate": float(rate[k]),
                "dt_s": float(dt[k]),
                "max_rate": _one(self.max, int(i[k])),
            }
            return Anomaly(ids[i[k]], self.kind, score(float(r[k])), ts, features)

        return self.hits(sel, fire, make)


class _FlatlineBank(_Bank):
    kind = "flatline"
    timed = True

    def __init__(self, rows: dict[int, Any], size: int, ids: list[str], start: float) -> None:
        super().__init__(rows, size, ids, start)
        self.duration = self.param(lambda s: s.duration_s)
        self.tol = self.param(lambda s: s.tolerance)
        self.anchor = np.zeros(size)
        self.anchor_ts = np.full(size, _NAN)  # NaN: no run

    def update(self, idx: np.ndarray, ts: float, x: np.ndarray, num: _Mask, new: _Mask) -> Hits:
        if num is not None:  # samples that do not count end the run
            broken = ~num if self.everyone else self.on[idx] & ~num
            if _any(broken):
                rows = idx[broken]
                self.anchor_ts[rows] = _NAN
                self.release(rows)
        sel = self.pick(idx, num)
        chosen = _select(idx, x, sel)
        if chosen is None:
            return []
        i, v = chosen
        anchor_ts = self.anchor_ts[i]
        moved = np.abs(v - self.anchor[i]) > _at(self.tol, i)
        moved |= np.isnan(anchor_ts)
        if _all(moved):  # the usual: a live signal starts a new run with every sample
            self.anchor[i] = v
            self.anchor_ts[i] = ts
            self.release(i)
            return []
        if _any(moved):
            rows = i[moved]
            self.anchor[rows] = v[moved]
            self.anchor_ts[rows] = ts
            self.release(rows)
        r = (ts - anchor_ts) / _at(self.duration, i)
        fire = self.latch(i, (r >= 1.0) & ~moved)
        if fire is None:
            return []
        return self.hits(sel, fire, lambda k: self._make(int(i[k]), float(r[k]), ts))

    def check(self, now: float) -> Hits:
        return self.fire_timed((now - self.anchor_ts) / self.duration, partial(self._make, now=now))

    def _make(self, row: int, r: float, now: float) -> Anomaly:
        features: Features = {
            "value": float(self.anchor[row]),
            "flat_s": now - float(self.anchor_ts[row]),
            "tolerance": _one(self.tol, row),
        }
        return Anomaly(self.ids[row], self.kind, score(r), now, features)


class _OutOfRangeBank(_Bank):
    kind = "out_of_range"

    def __init__(self, rows: dict[int, Any], size: int, ids: list[str], start: float) -> None:
        super().__init__(rows, size, ids, start)
        self.lo, self.hi, self.lo_in, self.hi_in, self.span = (
            self.param(itemgetter(n), source=_range_params) for n in range(5)
        )

    def update(self, idx: np.ndarray, ts: float, x: np.ndarray, num: _Mask, new: _Mask) -> Hits:
        sel = self.pick(idx, num)
        chosen = _select(idx, x, sel)
        if chosen is None:
            return []
        i, v = chosen
        firing = (v < _at(self.lo, i)) | (v > _at(self.hi, i))
        fire = self.latch(i, firing, lambda: (_at(self.lo_in, i) <= v) & (v <= _at(self.hi_in, i)))
        if fire is None:
            return []

        def make(k: int) -> Anomaly:
            row, value = int(i[k]), float(v[k])
            lo, hi = _one(self.lo, row), _one(self.hi, row)
            excess = lo - value if value < lo else value - hi
            spec = self.rows[row]
            r = 1.0 + excess / _one(self.span, row)
            features: Features = {"value": value, "lo": spec.lo, "hi": spec.hi, "excess": excess}
            return Anomaly(self.ids[row], self.kind, score(r), ts, features)

        return self.hits(sel, fire, make)


class _StaleBank(_Bank):
    kind = "stale"
    timed = True

    def __init__(self, rows: dict[int, Any], size: int, ids: list[str], start: float) -> None:
        super().__init__(rows, size, ids, start)
        self.max_age = self.param(lambda s: s.max_age_s)
        self.last = np.full(size, _NAN)  # NaN: no fresh sample yet
        self.start = start

    def update(self, idx: np.ndarray, ts: float, x: np.ndarray, num: _Mask, new: _Mask) -> Hits:
        on = None if self.everyone else self.on[idx]
        fresh = new if on is None else on if new is None else on & new
        if fresh is None:  # every sample fresh, every point watched: the usual
            self.last[idx] = ts
            self.release(idx)
            return []
        rows = idx[fresh]
        self.last[rows] = ts
        self.release(rows)
        stale = ~fresh if on is None else on & ~fresh
        if not _any(stale):
            return []
        i = idx[stale]
        last = self.last[i]
        r = (ts - np.where(np.isnan(last), self.start, last)) / _at(self.max_age, i)
        fire = self.latch(i, r >= 1.0)
        if fire is None:
            return []
        return self.hits(stale, fire, lambda k: self._make(int(i[k]), float(r[k]), ts))

    def check(self, now: float) -> Hits:
        age = now - np.where(np.isnan(self.last), self.start, self.last)
        return self.fire_timed(age / self.max_age, partial(self._make, now=now))

    def _make(self, row: int, r: float, now: float) -> Anomaly:
        last = float(self.last[row])
        fresh = not math.isnan(last)
        features: Features = {
            "age_s": now - (last if fresh else self.start),
            "max_age_s": _one(self.max_age, row),
            "last_good_ts": last if fresh else None,
        }
        return Anomaly(self.ids[row], self.kind, score(r), now, features)


_BANKS: dict[str, type[_Bank]] = {
    bank.kind: bank
    for bank in (
        _ZScoreBank,
        _EwmaBank,
        _RateOfChangeBank,
        _FlatlineBank,
        _OutOfRangeBank,
        _StaleBank,
    )
}
