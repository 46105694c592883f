"""Anomaly detectors: each on synthetic series (the fault found at the right sample, clean noise
left alone), hysteresis, quality and hostile values, config validation, and the column banks
held to the reference objects by property tests.

No I/O but one test that feeds the detectors from a real twin store's listener.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from tests_support import EPOCH, FakeClock

from drivers.contract import Quality, Sample
from gateway.errors import ConfigError
from gateway.policy.anomaly import (
    KINDS,
    Anomaly,
    AnomalyConfig,
    DetectorSet,
    DetectorSpec,
    EwmaSpec,
    FlatlineDetector,
    FlatlineSpec,
    OutOfRangeSpec,
    RateOfChangeSpec,
    StaleDetector,
    StaleSpec,
    ZScoreSpec,
    glob_regex,
    make_detector,
    resolve,
    score,
)
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore

GOOD, UNCERTAIN, BAD, STALE = Quality.GOOD, Quality.UNCERTAIN, Quality.BAD, Quality.STALE
P = "line1/oven1/temperature"
CLEAN_SAMPLES = 100_000


def feed(detector: Any, values: Sequence[Any], *, t0: float = EPOCH, dt: float = 1.0) -> list:
    """Feed GOOD samples one per `dt`; return (sample index, anomaly) for each firing."""
    found = []
    for k, value in enumerate(values):
        anomaly = detector.update(t0 + k * dt, value, GOOD)
        if anomaly is not None:
            found.append((k, anomaly))
    return found


def noise(n: int, seed: int, level: float = 50.0, sd: float = 1.0) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.gauss(0.0, sd) for _ in range(n)]


# -- score --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [(0.0, 0.0), (1.0, 0.5), (2.0, 0.75), (3.0, 0.875), (math.inf, 1.0), (-1.0, 0.0)],
)
def test_score_is_one_minus_two_to_the_minus_ratio(ratio: float, expected: float) -> None:
    assert score(ratio) == expected


def test_score_of_nan_is_zero() -> None:
    assert score(math.nan) == 0.0


# -- z-score ------------------------------------------------------------------------------------


def test_zscore_stays_quiet_on_clean_noise() -> None:
    detector = make_detector(P, ZScoreSpec(kind="zscore"))
    assert feed(detector, noise(CLEAN_SAMPLES, seed=16)) == []


def test_zscore_false_positive_rate_at_threshold_4_is_bounded() -> None:
    # |z| >= 4 of a t-like statistic: a few per 100,000, never a storm.
    detector = make_detector(P, ZScoreSpec(kind="zscore", threshold=4.0, window=60))
    assert len(feed(detector, noise(CLEAN_SAMPLES, seed=16))) <= 40


def test_zscore_fires_on_the_spike_with_its_features() -> None:
    values = noise(500, seed=1)
    values[300] += 12.0
    found = feed(make_detector(P, ZScoreSpec(kind="zscore")), values)
    assert [k for k, _ in found] == [300]
    anomaly = found[0][1]
    assert anomaly.kind == "zscore" and anomaly.point_id == P and anomaly.ts == EPOCH + 300
    assert anomaly.features["z"] > 5 and anomaly.features["samples"] == 120
    assert anomaly.features["value"] == values[300]
    assert 0.5 <= anomaly.score <= 1.0


def test_zscore_judges_only_after_min_samples() -> None:
    values = [1.0, 1.1, 0.9, 1.0, 100.0]  # the spike comes after 4 samples
    early = ZScoreSpec(kind="zscore", window=20, min_samples=4)
    assert [k for k, _ in feed(make_detector(P, early), values)] == [4]
    late = ZScoreSpec(kind="zscore", window=20, min_samples=5)
    assert feed(make_detector(P, late), values) == []


def test_zscore_latches_through_a_level_shift_until_it_clears() -> None:
    # A shift of 20 sd: the z-score stays high while the window fills with the new level, and
    # must report it once, not once per sample; after it settles, a new spike fires again.
    values = noise(300, seed=2) + noise(300, seed=3, level=70.0)
    values[500] += 15.0
    found = feed(make_detector(P, ZScoreSpec(kind="zscore", window=60)), values)
    assert [k for k, _ in found] == [300, 500]


def test_zscore_of_a_constant_signal_uses_min_sd() -> None:
    values = [5.0] * 30 + [5.01]
    assert [k for k, _ in feed(make_detector(P, ZScoreSpec(kind="zscore", window=20)), values)] == [
        30
    ]
    floored = make_detector(P, ZScoreSpec(kind="zscore", window=20, min_sd=0.01))
    assert feed(floored, values) == []


def test_zscore_forgets_a_huge_outlier_once_it_left_the_window() -> None:
    # 1e12 enters and leaves the window: a sliding sum would keep a residue of ~1e-4 * 1e12 in
    # the variance; the exact re-sum after each pass clears it.
    spec = ZScoreSpec(kind="zscore", window=10, threshold=5.0)
    values = [*noise(30, seed=4), 1e12, *noise(40, seed=5)]
    values[60] += 30.0
    found = feed(make_detector(P, spec), values)
    assert [k for k, _ in found] == [30, 60]


# -- EWMA ---------------------------------------------------------------------------------------


def test_ewma_stays_quiet_on_clean_noise_with_known_target() -> None:
    detector = make_detector(P, EwmaSpec(kind="ewma", target=50.0, sigma=1.0))
    # ~15,000 samples per false alarm at L = 4, alpha = 0.1 (module comment): a handful.
    assert len(feed(detector, noise(CLEAN_SAMPLES, seed=16))) <= 15


def test_ewma_finds_a_slow_drift_that_no_single_sample_shows() -> None:
    # The oven's ambient drifts up by 0.02 sd per sample from sample 200: no sample is an
    # outlier (the z-score detector stays quiet), the EWMA chart sees it within ~60 samples.
    values = [x + max(0, k - 200) * 0.02 for k, x in enumerate(noise(400, seed=6))]
    found = feed(make_detector(P, EwmaSpec(kind="ewma")), values)
    assert len(found) == 1
    k, anomaly = found[0]
    assert 200 < k < 260
    assert anomaly.features["ewma"] - anomaly.features["target"] >= anomaly.features["limit"]
    assert feed(make_detector(P, ZScoreSpec(kind="zscore")), values) == []


def test_ewma_learns_target_and_sigma_in_warmup() -> None:
    detector = make_detector(P, EwmaSpec(kind="ewma", warmup=50))
    values = noise(50, seed=7, level=20.0, sd=2.0) + [50.0] * 5
    found = feed(detector, values)
    assert [k for k, _ in found] == [50]
    features = found[0][1].features
    assert features["target"] == pytest.approx(20.0, abs=1.0)
    assert features["sigma"] == pytest.approx(2.0, rel=0.3)


# -- rate of change -----------------------------------------------------------------------------


def test_rate_of_change_fires_on_a_step_and_once() -> None:
    values = noise(100, seed=8) + noise(100, seed=9, level=80.0)
    found = feed(make_detector(P, RateOfChangeSpec(kind="rate_of_change", max_rate=10.0)), values)
    assert [k for k, _ in found] == [100]
    assert found[0][1].features["rate"] == pytest.approx(30.0, abs=5.0)
    assert found[0][1].features["dt_s"] == 1.0


def test_rate_of_change_divides_by_time() -> None:
    detector = make_detector(P, RateOfChangeSpec(kind="rate_of_change", max_rate=1.0))
    assert detector.update(EPOCH, 0.0, GOOD) is None
    assert detector.update(EPOCH + 10, 5.0, GOOD) is None  # 0.5 per second
    anomaly = detector.update(EPOCH + 11, 7.0, GOOD)  # 2 per second
    assert anomaly is not None and anomaly.score == score(2.0)


def test_rate_of_change_needs_time_between_samples() -> None:
    detector = make_detector(P, RateOfChangeSpec(kind="rate_of_change", max_rate=1.0))
    detector.update(EPOCH, 0.0, GOOD)
    assert detector.update(EPOCH, 100.0, GOOD) is None  # same instant: no rate
    assert detector.update(EPOCH - 5, 0.0, GOOD) is None  # clock stepped back
    assert detector.update(EPOCH + 1, 0.5, GOOD) is None  # against the newest value, 0.0
    assert detector.update(EPOCH + 2, 200.0, GOOD) is not None


def test_rate_of_change_stays_quiet_on_clean_noise() -> None:
    detector = make_detector(P, RateOfChangeSpec(kind="rate_of_change", max_rate=8.0))
    assert feed(detector, noise(CLEAN_SAMPLES, seed=16)) == []


# -- flatline -----------------------------------------------------------------------------------


def test_flatline_fires_when_the_value_sticks() -> None:
    values = noise(100, seed=10) + [42.0] * 100
    spec = FlatlineSpec(kind="flatline", duration_s=30.0)
    found = feed(make_detector(P, spec), values)
    assert [k for k, _ in found] == [130]
    assert found[0][1].features == {"value": 42.0, "flat_s": 30.0, "tolerance": 0.0}


def test_flatline_fires_from_check_when_no_samples_come(fake_clock: FakeClock) -> None:
    # The change-filtered feed sends nothing while the value is stuck.
    detector = make_detector(P, FlatlineSpec(kind="flatline", duration_s=60.0))
    assert isinstance(detector, FlatlineDetector)
    assert detector.update(fake_clock.now, 7.0, GOOD) is None
    assert detector.check(fake_clock.advance(59.0)) is None
    anomaly = detector.check(fake_clock.advance(1.0))
    assert anomaly is not None and anomaly.ts == fake_clock.now
    assert detector.check(fake_clock.advance(100.0)) is None  # latched
    assert detector.update(fake_clock.now, 7.5, GOOD) is None  # moved: a new run
    assert detector.check(fake_clock.advance(60.0)) is not None


def test_flatline_tolerance_lets_a_stuck_sensor_dither() -> None:
    values = noise(50, seed=11) + [20.0 + 0.001 * (k % 3) for k in range(100)]
    spec = FlatlineSpec(kind="flatline", duration_s=50.0, tolerance=0.005)
    assert [k for k, _ in feed(make_detector(P, spec), values)] == [100]
    strict = FlatlineSpec(kind="flatline", duration_s=50.0)
    assert feed(make_detector(P, strict), values) == []


def test_flatline_run_ends_with_a_bad_sample() -> None:
    detector = make_detector(P, FlatlineSpec(kind="flatline", duration_s=10.0))
    detector.update(EPOCH, 3.0, GOOD)
    detector.update(EPOCH + 5, None, BAD)  # broken, not stuck
    assert detector.update(EPOCH + 11, 3.0, GOOD) is None  # a new run starts here
    assert detector.update(EPOCH + 21, 3.0, GOOD) is not None


# -- out of range -------------------------------------------------------------------------------


def test_out_of_range_fires_once_per_excursion_with_clear_margin() -> None:
    spec = OutOfRangeSpec(kind="out_of_range", lo=0.0, hi=100.0, clear_margin=5.0)
    values = [50.0, 101.0, 120.0, 99.0, 101.0, 90.0, 102.0, -10.0]
    found = feed(make_detector(P, spec), values)
    # 99 is inside but not by the margin: 101 after it is the same excursion.
    assert [k for k, _ in found] == [1, 6]
    first = found[0][1]
    assert first.features == {"value": 101.0, "lo": 0.0, "hi": 100.0, "excess": 1.0}
    assert first.score == score(1.0 + 1.0 / 100.0)


def test_out_of_range_one_sided() -> None:
    spec = OutOfRangeSpec(kind="out_of_range", hi=250.0)
    found = feed(make_detector(P, spec), [-1e9, 249.0, 260.0])
    assert [k for k, _ in found] == [2]
    assert found[0][1].score == score(1.0 + 10.0 / 250.0)


def test_out_of_range_sees_uncertain_samples() -> None:
    # Drivers mark values outside the engineering range UNCERTAIN: exactly what this detector
    # is for, so UNCERTAIN counts.
    detector = make_detector(P, OutOfRangeSpec(kind="out_of_range", lo=0.0, hi=10.0))
    assert detector.update(EPOCH, 11.0, UNCERTAIN) is not None


# -- stale --------------------------------------------------------------------------------------


def test_stale_fires_by_time_and_clears_with_a_fresh_sample(fake_clock: FakeClock) -> None:
    detector = make_detector(P, StaleSpec(kind="stale", max_age_s=30.0), start=fake_clock.now)
    assert isinstance(detector, StaleDetector)
    assert detector.check(fake_clock.advance(29.0)) is None
    anomaly = detector.check(fake_clock.advance(1.0))
    assert anomaly is not None
    assert anomaly.features == {"age_s": 30.0, "max_age_s": 30.0, "last_good_ts": None}
    assert detector.check(fake_clock.advance(10.0)) is None  # latched, no storm
    last_good = fake_clock.now
    assert detector.update(last_good, 1.0, GOOD) is None
    assert detector.check(fake_clock.advance(29.0)) is None
    anomaly = detector.check(fake_clock.advance(2.0))
    assert anomaly is not None and anomaly.features["last_good_ts"] == last_good
    assert anomaly.score == score(31.0 / 30.0)


def test_stale_counts_from_the_last_good_sample_not_the_last_sample(
    fake_clock: FakeClock,
) -> None:
    detector = make_detector(P, StaleSpec(kind="stale", max_age_s=10.0), start=fake_clock.now)
    detector.update(fake_clock.now, 1.0, GOOD)
    assert detector.update(fake_clock.advance(5.0), None, BAD) is None
    assert detector.update(fake_clock.advance(4.0), 2.0, STALE) is None
    assert detector.update(fake_clock.advance(1.0), math.nan, GOOD) is not None


def test_stale_without_start_counts_from_the_first_call() -> None:
    detector = StaleDetector(P, StaleSpec(kind="stale", max_age_s=5.0))
    assert detector.check(100.0) is None
    assert detector.check(104.0) is None
    assert detector.check(105.0) is not None


def test_stale_takes_text_as_a_value() -> None:
    detector = make_detector(P, StaleSpec(kind="stale", max_age_s=5.0), start=0.0)
    detector.update(4.0, "RUNNING", GOOD)
    assert detector.update(8.0, "RUNNING", GOOD) is None
    assert detector.update(12.0, None, GOOD) is None  # no value: age from 8
    assert detector.update(13.0, None, GOOD) is not None


# -- quality and hostile values -----------------------------------------------------------------


@pytest.mark.parametrize("quality", [BAD, STALE, "NONSENSE"])
def test_samples_of_bad_quality_do_not_touch_the_statistics(quality: str) -> None:
    values = noise(300, seed=12)
    values[250] += 9.0
    specs: list[DetectorSpec] = [
        ZScoreSpec(kind="zscore", window=50),
        EwmaSpec(kind="ewma", warmup=20),
        RateOfChangeSpec(kind="rate_of_change", max_rate=6.0),
        OutOfRangeSpec(kind="out_of_range", lo=0.0, hi=100.0),
    ]
    for spec in specs:
        clean = feed(make_detector(P, spec), values)
        polluted = make_detector(P, spec)
        found = []
        for k, value in enumerate(values):
            # A wild reading of bad quality between every two good ones.
            assert polluted.update(EPOCH + k + 0.5, 1e9, quality) is None
            anomaly = polluted.update(EPOCH + k, value, GOOD)
            if anomaly is not None:
                found.append((k, anomaly))
        assert found == clean, spec.kind


HOSTILE: list[Any] = [
    None,
    math.nan,
    math.inf,
    -math.inf,
    "12.5x",
    "",
    b"\xff",
    10**400,
    [1, 2],
    {},
    1j,
]


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_hostile_values_are_skipped_without_exceptions(value: Any) -> None:
    values = noise(150, seed=13)
    values[120] += 60.0  # found by zscore, ewma, rate_of_change and out_of_range
    for spec in every_kind():
        detector = make_detector(P, spec, start=EPOCH)
        clean = feed(make_detector(P, spec, start=EPOCH), values)
        assert clean or spec.kind in ("flatline", "stale")
        found = []
        for k, x in enumerate(values):
            detector.update(EPOCH + k + 0.5, value, GOOD)
            anomaly = detector.update(EPOCH + k, x, GOOD)
            if anomaly is not None:
                found.append((k, anomaly))
        if spec.kind != "flatline":  # for which a sample that does not count ends the run
            assert found == clean, spec.kind


def test_numbers_are_what_float_takes() -> None:
    detector = make_detector(P, OutOfRangeSpec(kind="out_of_range", hi=1.0))
    assert detector.update(EPOCH, True, GOOD) is None  # a bool is 0/1
    assert detector.update(EPOCH, "2.5", GOOD) is not None  # numeric text is its number


def test_event_data_is_json_without_nan_or_infinity() -> None:
    detector = make_detector(P, ZScoreSpec(kind="zscore", window=5))
    anomaly = feed(detector, [1.0] * 6 + [2.0])[0][1]
    assert anomaly.features["z"] == math.inf
    data = anomaly.event_data()
    assert json.loads(json.dumps(data, allow_nan=False))["features"]["z"] == "inf"
    assert data["kind"] == "zscore" and data["score"] == 1.0


# -- config -------------------------------------------------------------------------------------


def every_kind() -> list[Any]:
    return [
        ZScoreSpec(kind="zscore", window=30),
        EwmaSpec(kind="ewma", warmup=20),
        RateOfChangeSpec(kind="rate_of_change", max_rate=5.0),
        FlatlineSpec(kind="flatline", duration_s=20.0),
        OutOfRangeSpec(kind="out_of_range", lo=0.0, hi=100.0),
        StaleSpec(kind="stale", max_age_s=20.0),
    ]


EXAMPLE = {
    "rules": [
        {
            "points": ["line1/**"],
            "detectors": [
                {"kind": "zscore"},
                {"kind": "stale", "max_age_s": 60},
            ],
        },
        {
            "points": ["line1/oven1/temperature"],
            "detectors": [
                {"kind": "ewma", "target": 180, "sigma": 1.5},
                {"kind": "rate_of_change", "max_rate": 2.5},
                {"kind": "flatline", "duration_s": 600, "tolerance": 0.05},
                {"kind": "out_of_range", "lo": 20, "hi": 250, "clear_margin": 2},
                {"kind": "zscore", "window": 30, "threshold": 6},
            ],
        },
        {"points": ["line1/*/mode"], "disable": ["stale"]},
    ]
}

POINTS = [
    PointDef("line1/oven1/temperature", "plc1", "float32", lo=0, hi=300),
    PointDef("line1/oven1/heater_sp", "plc1", "float32", writable=True),
    PointDef("line1/oven1/mode", "plc1", "string"),
    PointDef("line1/press1/run", "plc1", "bool"),
    PointDef("utilities/tank1/level", "tank1", "float32"),
]


def test_example_config_resolves_per_point() -> None:
    specs = resolve(AnomalyConfig.model_validate(EXAMPLE, strict=True), POINTS)
    kinds = {pid: [s.kind for s in given] for pid, given in specs.items()}
    assert kinds == {
        # Every kind, in KINDS order; the later rule's zscore replaced the broad one.
        "line1/oven1/temperature": list(KINDS),
        "line1/oven1/heater_sp": ["zscore", "stale"],
        # Text and bools get only `stale`; `disable` took it from the mode.
        "line1/press1/run": ["stale"],
    }
    assert specs["line1/oven1/temperature"][0] == ZScoreSpec(kind="zscore", window=30, threshold=6)


def test_defaults_of_a_minimal_spec() -> None:
    spec = ZScoreSpec.model_validate({"kind": "zscore"}, strict=True)
    assert (spec.window, spec.threshold, spec.min_samples, spec.clear_ratio) == (
        120,
        5.0,
        None,
        0.75,
    )


def test_a_rule_that_matches_nothing_is_an_error_naming_it() -> None:
    config = AnomalyConfig.model_validate(
        {"rules": [*EXAMPLE["rules"], {"points": ["line9/*"], "disable": ["zscore"]}]}, strict=True
    )
    with pytest.raises(ConfigError, match=r"rules\[3\] \(points \['line9/\*'\]\) match"):
        resolve(config, POINTS)


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("line1/*/temperature", ["line1/oven1/temperature"], ["line1/a/b/temperature"]),
        ("line1/**", ["line1/oven1/temperature", "line1/a/b/c"], ["line2/oven1/temperature"]),
        ("**/temperature", ["a/b/temperature", "x/temperature"], ["a/b/temperature2"]),
        ("line?/oven1/*", ["line1/oven1/x", "line2/oven1/y"], ["line10/oven1/x"]),
        ("a.b/c", ["a.b/c"], ["axb/c"]),  # a dot is a dot
    ],
)
def test_glob_semantics(pattern: str, matches: list[str], misses: list[str]) -> None:
    regex = glob_regex(pattern)
    assert all(regex.fullmatch(m) for m in matches)
    assert not any(regex.fullmatch(m) for m in misses)


def rule(*detectors: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"rules": [{"points": ["a/**"], "detectors": list(detectors), **extra}]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (rule({"kind": "zscore", "windw": 10}), "Extra inputs are not permitted"),
        (rule({"kind": "zscor"}), "does not match any of the expected tags"),
        (rule({"kind": "rate_of_change"}), "max_rate"),
        (rule({"kind": "zscore", "threshold": -1}), "greater than 0"),
        (rule({"kind": "zscore", "window": 1}), "greater than or equal to 2"),
        (rule({"kind": "zscore", "window": 10**6}), "less than or equal to 10000"),
        (rule({"kind": "zscore", "window": 10, "min_samples": 20}), "lower min_samples"),
        (rule({"kind": "zscore", "window": True}), "valid integer"),
        (rule({"kind": "zscore", "window": "10"}), "valid integer"),
        (rule({"kind": "zscore", "threshold": "4"}), "valid number"),
        (rule({"kind": "zscore", "threshold": math.nan}), "finite number"),
        (rule({"kind": "stale", "max_age_s": math.inf}), "finite number"),
        (rule({"kind": "zscore", "clear_ratio": 0}), "greater than 0"),
        (rule({"kind": "zscore", "clear_ratio": 1.5}), "less than or equal to 1"),
        (rule({"kind": "ewma", "alpha": 0}), "greater than 0"),
        (rule({"kind": "ewma", "sigma": 0}), "greater than 0"),
        (rule({"kind": "flatline", "duration_s": 0}), "greater than 0"),
        (rule({"kind": "flatline", "duration_s": 5, "tolerance": -1}), "greater than or equal"),
        (rule({"kind": "out_of_range"}), "give `lo`, `hi` or both"),
        (rule({"kind": "out_of_range", "lo": 5, "hi": 5}), "must be below hi"),
        (rule({"kind": "out_of_range", "lo": 0, "hi": 10, "clear_margin": 5}), "half the range"),
        (rule({"kind": "zscore"}, {"kind": "zscore"}), "given twice: merge"),
        (rule({"kind": "zscore"}, disable=["zscore"]), "both in `detectors` and in `disable`"),
        (rule(), "needs `detectors`, `disable` or both"),
        (rule({"kind": "stale", "max_age_s": 1}, disable=["bogus"]), "Input should be"),
        ({"rules": [{"points": [], "disable": ["stale"]}]}, "at least 1 item"),
        ({"rules": [{"points": ["Line1/*"], "disable": ["stale"]}]}, "should match pattern"),
        ({"rules": [{"points": ["/a/b"], "disable": ["stale"]}]}, "should match pattern"),
        ({"rules": [{"points": ["a b"], "disable": ["stale"]}]}, "should match pattern"),
        ({"rules": [{"points": ["a/" * 200], "disable": ["stale"]}]}, "at most 256"),
        ({"rules": [{"points": "a/*", "disable": ["stale"]}]}, "valid list"),
        ({"rules": {"points": ["a/*"]}}, "valid list"),
        ({"rulez": []}, "Extra inputs are not permitted"),
    ],
)
def test_bad_config_is_refused_saying_what_to_do(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AnomalyConfig.model_validate(data, strict=True)


def test_a_set_refuses_two_specs_of_one_kind() -> None:
    with pytest.raises(ConfigError, match="one detector per kind"):
        DetectorSet(
            {P: [StaleSpec(kind="stale", max_age_s=1), StaleSpec(kind="stale", max_age_s=2)]}
        )


# -- the set ------------------------------------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["banks", "objects"])
def vectorized(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def oven_set(vectorized: bool, clock: FakeClock) -> DetectorSet:
    config = AnomalyConfig.model_validate(EXAMPLE, strict=True)
    return DetectorSet.from_config(config, POINTS, clock=clock, vectorized=vectorized)


def test_set_reports_in_sample_order_then_kind_order(
    vectorized: bool, fake_clock: FakeClock
) -> None:
    detectors = oven_set(vectorized, fake_clock)
    temp, sp = "line1/oven1/temperature", "line1/oven1/heater_sp"
    warm = [
        [Sample(temp, 180.0 + (k % 2), GOOD), Sample(sp, 100.0 + (k % 3), GOOD)] for k in range(130)
    ]
    for batch in warm:
        assert detectors.on_samples(batch, fake_clock.advance(1.0)) == []
    found = detectors.on_samples(
        [Sample("nobody/knows/me", 1.0, GOOD), Sample(sp, 500.0, GOOD), Sample(temp, 400.0, GOOD)],
        fake_clock.advance(1.0),
    )
    assert [(a.point_id, a.kind) for a in found] == [
        (sp, "zscore"),
        (temp, "zscore"),
        (temp, "ewma"),
        (temp, "rate_of_change"),
        (temp, "out_of_range"),
    ]
    assert all(a.ts == fake_clock.now for a in found)
    assert detectors.active(temp) == ("zscore", "ewma", "rate_of_change", "out_of_range")
    assert detectors.active("nobody/knows/me") == ()


def test_set_checks_time_driven_detectors(vectorized: bool, fake_clock: FakeClock) -> None:
    detectors = oven_set(vectorized, fake_clock)
    temp, sp, run = "line1/oven1/temperature", "line1/oven1/heater_sp", "line1/press1/run"
    detectors.on_samples([Sample(temp, 180.0, GOOD), Sample(run, True, GOOD)], fake_clock.now)
    assert detectors.check(fake_clock.advance(59.0)) == []
    found = detectors.check(fake_clock.advance(1.0))
    # heater_sp never sent a sample: stale from the set's start.
    assert [(a.point_id, a.kind) for a in found] == [(temp, "stale"), (sp, "stale"), (run, "stale")]
    assert detectors.check(fake_clock.advance(1.0)) == []
    found = detectors.check(fake_clock.advance(540.0))
    assert [(a.point_id, a.kind) for a in found] == [(temp, "flatline")]


def test_set_takes_a_point_twice_in_one_batch_in_order(vectorized: bool) -> None:
    detectors = DetectorSet(
        {P: [RateOfChangeSpec(kind="rate_of_change", max_rate=1.0)]},
        start=0.0,
        vectorized=vectorized,
    )
    assert detectors.on_samples([Sample(P, 0.0, GOOD)], now=0.0) == []
    # One instant: 0.2 is judged (slow), 100 and 0.5 replace it in turn without a rate, the BAD
    # sample does not count; taken out of order, 100 would be the last value.
    batch = [
        Sample(P, 0.2, GOOD),
        Sample(P, 100.0, GOOD),
        Sample(P, 0.5, GOOD),
        Sample(P, 9.0, BAD),
    ]
    assert detectors.on_samples(batch, now=1.0) == []
    assert detectors.on_samples([Sample(P, 0.4, GOOD)], now=2.0) == []  # 0.5 -> 0.4: slow
    found = detectors.on_samples([Sample(P, 5.0, GOOD)], now=3.0)
    assert [(a.features["previous"], a.features["value"]) for a in found] == [(0.4, 5.0)]


def test_set_gives_numeric_kinds_to_numeric_points_only() -> None:
    config = AnomalyConfig.model_validate(
        {"rules": [{"points": ["line1/**"], "detectors": [{"kind": "zscore"}]}]}, strict=True
    )
    assert DetectorSet.from_config(config, POINTS).point_ids == [
        "line1/oven1/temperature",
        "line1/oven1/heater_sp",
    ]


def test_set_is_fed_by_the_twins_listener(tmp_path: Path, fake_clock: FakeClock) -> None:
    # How the gateway wires it: the twin's change listener, at the twin's gateway time.
    points = [PointDef(P, "plc1", "float32", deadband=0.1)]
    spec = OutOfRangeSpec(kind="out_of_range", lo=0.0, hi=250.0)
    detectors = DetectorSet({P: [spec]}, clock=fake_clock)
    found: list[Anomaly] = []
    with TwinStore(tmp_path / "twin.db", points, clock=fake_clock) as store:
        store.add_listener(lambda changes: found.extend(detectors.on_changes(changes)))
        store.ingest([Sample(P, 200.0, GOOD)])
        store.ingest([Sample(P, 260.0, UNCERTAIN)])
        store.ingest([Sample(P, 260.05, UNCERTAIN)])  # within the deadband: no change
    assert [(a.kind, a.features["value"], a.ts) for a in found] == [
        ("out_of_range", 260.0, fake_clock.now)
    ]


def test_an_empty_batch_and_an_empty_set() -> None:
    assert DetectorSet({}).on_samples([]) == []
    assert DetectorSet({}).on_samples([Sample(P, 1.0, GOOD)], now=1.0) == []
    assert DetectorSet({}).check(5.0) == []
    assert DetectorSet({}).on_changes([]) == []


# -- properties ---------------------------------------------------------------------------------

values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e3, max_value=1e3),
    st.floats(min_value=-1e3, max_value=1e3),  # twice: mostly ordinary readings
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.none(),
    st.sampled_from(["1.5", "RUN", "nan", "1_0", " 7 ", "", "1e400"]),
)
qualities = st.sampled_from([GOOD, GOOD, GOOD, UNCERTAIN, BAD, STALE, "bogus"])
positive = st.floats(min_value=1e-3, max_value=1e3)
specs = st.one_of(
    st.builds(
        ZScoreSpec,
        kind=st.just("zscore"),
        window=st.integers(2, 8),
        threshold=positive,
        min_samples=st.none() | st.integers(2, 2),
        min_sd=st.sampled_from([0.0, 0.1]),
        clear_ratio=st.floats(0.1, 1.0),
    ),
    st.builds(
        EwmaSpec,
        kind=st.just("ewma"),
        alpha=st.floats(0.01, 1.0),
        limit_sigmas=positive,
        target=st.none() | st.floats(-100, 100),
        sigma=st.none() | positive,
        warmup=st.integers(2, 6),
        min_sd=st.sampled_from([0.0, 0.5]),
    ),
    st.builds(RateOfChangeSpec, kind=st.just("rate_of_change"), max_rate=positive),
    st.builds(
        FlatlineSpec,
        kind=st.just("flatline"),
        duration_s=positive,
        tolerance=st.sampled_from([0.0, 0.5]),
    ),
    st.builds(
        OutOfRangeSpec,
        kind=st.just("out_of_range"),
        lo=st.just(-10.0),
        hi=st.none() | st.just(10.0),
        clear_margin=st.sampled_from([0.0, 1.0]),
    ),
    st.builds(StaleSpec, kind=st.just("stale"), max_age_s=positive),
)
steps = st.lists(st.tuples(st.floats(-1.0, 50.0), values, qualities), min_size=1, max_size=60)


@given(spec=specs, sequence=steps)
@settings(max_examples=400, deadline=None)
def test_no_sequence_raises_and_scores_stay_in_0_1(spec: Any, sequence: list) -> None:
    detector = make_detector(P, spec, start=0.0)
    ts = 0.0
    for dt, value, quality in sequence:
        ts += dt
        for anomaly in (detector.update(ts, value, quality), getattr(detector, "check", None)):
            if callable(anomaly):
                anomaly = anomaly(ts + dt)
            if anomaly is not None:
                assert 0.0 <= anomaly.score <= 1.0
                assert anomaly.kind == spec.kind and anomaly.point_id == P
                json.dumps(anomaly.event_data(), allow_nan=False)


KEYS = ["a/p0", "a/p1", "a/p2", "a/p3", "b/unknown"]
batches = st.lists(
    st.tuples(
        st.floats(-0.5, 20.0),  # time since the previous batch (the clock may step back)
        st.lists(st.tuples(st.sampled_from(KEYS), values, qualities), max_size=8),
        st.booleans(),  # run check() after it
    ),
    min_size=1,
    max_size=25,
)
per_point = st.lists(specs, max_size=4).map(lambda given: list({s.kind: s for s in given}.values()))


@given(config=st.lists(per_point, min_size=4, max_size=4), sequence=batches)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_banks_agree_with_the_objects_exactly(config: list, sequence: list) -> None:
    specs_of = dict(zip(KEYS, config, strict=False))
    banks = DetectorSet(specs_of, start=0.0)
    objects = DetectorSet(specs_of, start=0.0, vectorized=False)
    now = 0.0
    for dt, samples, check in sequence:
        now += dt
        batch = [Sample(k, v, q) for k, v, q in samples]
        assert same(banks.on_samples(batch, now), objects.on_samples(batch, now))
        if check:
            assert same(banks.check(now + dt), objects.check(now + dt))
        for key in KEYS:
            assert banks.active(key) == objects.active(key)


def test_banks_agree_with_the_objects_on_a_long_noisy_run() -> None:
    # Thousands of samples per point: window wraps, warm-ups ending, hysteresis cycling.
    rng = random.Random(21)
    point_ids = [f"a/p{k}" for k in range(6)]
    windows = [ZScoreSpec(kind="zscore", window=w, threshold=2.5) for w in (5, 7, 5, 9, 5, 7)]
    specs_of: dict[str, list[DetectorSpec]] = {
        pid: [w, *every_kind()[1:]] if k % 2 else [w, EwmaSpec(kind="ewma", warmup=10)]
        for k, (pid, w) in enumerate(zip(point_ids, windows, strict=True))
    }
    banks = DetectorSet(specs_of, start=0.0)
    objects = DetectorSet(specs_of, start=0.0, vectorized=False)
    found = 0
    for poll in range(1500):
        chosen = [p for p in point_ids if rng.random() < 0.8]
        batch = [Sample(p, 50 + rng.gauss(0, 1) + (poll // 300) * 3, GOOD) for p in chosen]
        if rng.random() < 0.05 and batch:
            batch[0] = Sample(batch[0].key, None, BAD)
        a, b = banks.on_samples(batch, float(poll)), objects.on_samples(batch, float(poll))
        assert same(a, b), poll
        assert same(banks.check(poll + 0.5), objects.check(poll + 0.5))
        found += len(a)
    assert found > 100  # the run exercised firing and clearing


def test_changes_and_samples_feed_alike(fake_clock: FakeClock) -> None:
    from gateway.twin.model import PointValue

    specs_of = {P: every_kind()}
    by_samples = DetectorSet(specs_of, start=EPOCH)
    by_changes = DetectorSet(specs_of, start=EPOCH)
    for k, x in enumerate([*noise(200, seed=22), 500.0]):
        ts = EPOCH + k
        a = by_samples.on_samples([Sample(P, x, GOOD)], ts)
        b = by_changes.on_changes([PointValue(P, x, GOOD, None, ts, k + 1)])
        assert same(a, b)


def same(a: list[Anomaly], b: list[Anomaly]) -> bool:
    """Equal anomaly lists, NaN features equal to NaN."""

    def key(anomaly: Anomaly) -> tuple:
        features = tuple(
            (k, "nan" if isinstance(v, float) and math.isnan(v) else v)
            for k, v in anomaly.features.items()
        )
        return (anomaly.point_id, anomaly.kind, anomaly.score, anomaly.ts, features)

    return [key(x) for x in a] == [key(y) for y in b]
