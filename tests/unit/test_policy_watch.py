"""The anomaly watch on a real twin store: events, the engine's callback, the timer, teardown, and
failures (a raising callback, raising detectors, a closed store, a storm) that must never break
ingest or flood the log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests_support import EPOCH, FakeClock, eventually, plant_config

from drivers.contract import Quality, Sample
from gateway.errors import ConfigError, GatewayError
from gateway.lifecycle import Lifecycle
from gateway.policy.anomaly import EVENT_TYPE, Anomaly, AnomalyConfig, DetectorSet
from gateway.policy.watch import (
    LOG_BURST,
    LOG_WINDOW_S,
    MIN_CHECK_S,
    REPEAT_S,
    AnomalyWatch,
    check_interval,
)
from gateway.twin.model import EventRecord, PointDef, PointValue
from gateway.twin.store import TwinStore

GOOD = Quality.GOOD
TEMP = "line1/oven1/temperature"
LEVEL = "utilities/tank1/level"
MODE = "line1/oven1/mode"
POINTS = [
    PointDef(TEMP, "plc", "float64"),
    PointDef(LEVEL, "tank", "float32"),
    PointDef(MODE, "plc", "string"),
]
# Out of range above 200, faster than 5 per second, stuck for 30 s, silent for 20 s.
RULES: dict[str, Any] = {
    "rules": [
        {
            "points": ["line1/**"],
            "detectors": [
                {"kind": "out_of_range", "lo": 0, "hi": 200},
                {"kind": "rate_of_change", "max_rate": 5},
            ],
        },
        {
            "points": [LEVEL],
            "detectors": [
                {"kind": "flatline", "duration_s": 30, "tolerance": 0.01},
                {"kind": "stale", "max_age_s": 20},
            ],
        },
    ]
}


def config(data: dict[str, Any] = RULES) -> AnomalyConfig:
    return AnomalyConfig.model_validate(data)


def detectors(clock: FakeClock, data: dict[str, Any] = RULES) -> DetectorSet:
    return DetectorSet.from_config(config(data), POINTS, clock=clock)


@pytest.fixture
def store(tmp_path: Path, fake_clock: FakeClock) -> Iterator[TwinStore]:
    # The twin stamps changes with the same fake clock the detectors judge by.
    with TwinStore(tmp_path / "twin.db", POINTS, clock=fake_clock) as twin:
        yield twin


@pytest.fixture
def found() -> list[list[Anomaly]]:
    return []


@pytest.fixture
def watch(store: TwinStore, fake_clock: FakeClock, found: list[list[Anomaly]]) -> AnomalyWatch:
    return AnomalyWatch(
        store,
        detectors(fake_clock),
        on_anomalies=found.append,
        clock=fake_clock,
        log_clock=fake_clock,
    )


def anomaly_events(store: TwinStore) -> list[EventRecord]:
    store.flush()
    return [e for e in store.events_since(0) if e.type == EVENT_TYPE]


def listening(store: TwinStore, watch: AnomalyWatch) -> None:
    """Register the watch's listener as `start` does, without an event loop."""
    store.add_listener(watch.on_changes)


# -- the interval of the periodic check (pure) --------------------------------------------------


@pytest.mark.parametrize(
    ("timed", "expected"),
    [
        ([], None),
        ([{"kind": "stale", "max_age_s": 3600}], 1.0),
        ([{"kind": "flatline", "duration_s": 2}], 0.5),
        ([{"kind": "flatline", "duration_s": 60}, {"kind": "stale", "max_age_s": 1.2}], 0.3),
        ([{"kind": "stale", "max_age_s": 0.001}], MIN_CHECK_S),
    ],
    ids=["none", "long", "quarter", "shortest-wins", "floor"],
)
def test_check_interval(timed: list[dict[str, Any]], expected: float | None) -> None:
    rules = {
        "rules": [
            {"points": [TEMP], "detectors": [{"kind": "out_of_range", "hi": 1}, *timed]},
        ]
    }
    assert check_interval(DetectorSet.from_config(config(rules), POINTS)) == expected


def test_a_config_without_rules_makes_no_watch(store: TwinStore) -> None:
    assert AnomalyWatch.from_config(store, AnomalyConfig(), POINTS) is None
    made = AnomalyWatch.from_config(store, config(), POINTS)
    assert made is not None and made.detectors.point_ids == [TEMP, LEVEL]


def test_a_rule_matching_no_point_is_refused(store: TwinStore) -> None:
    with pytest.raises(ConfigError, match=r"rules\[0\].*no declared point"):
        AnomalyWatch.from_config(
            store, config({"rules": [{"points": ["nowhere/**"], "disable": ["stale"]}]}), POINTS
        )


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_a_check_interval_must_be_a_positive_number(
    store: TwinStore, fake_clock: FakeClock, bad: float
) -> None:
    with pytest.raises(ValueError, match="check_interval_s"):
        AnomalyWatch(store, detectors(fake_clock), check_interval_s=bad)


# -- on ingest ----------------------------------------------------------------------------------


def test_anomalies_become_events_and_reach_the_callback(
    store: TwinStore, watch: AnomalyWatch, fake_clock: FakeClock, found: list[list[Anomaly]]
) -> None:
    listening(store, watch)
    store.ingest([Sample(TEMP, 180.0, GOOD), Sample(LEVEL, 2.0, GOOD)])
    fake_clock.advance(1.0)
    store.ingest([Sample(TEMP, 190.0, GOOD)])  # 10 per second: too fast
    fake_clock.advance(10.0)
    assert store.ingest([Sample(TEMP, 230.0, GOOD)]) == 1  # above 200, 4 per second

    events = anomaly_events(store)
    assert [(e.point_id, e.asset_id, e.data["kind"]) for e in events] == [
        (TEMP, "line1/oven1", "rate_of_change"),
        (TEMP, "line1/oven1", "out_of_range"),
    ]
    rate, high = (e.data for e in events)
    assert rate["score"] == pytest.approx(1 - 0.5**2)  # twice the limit
    assert rate["ts"] == EPOCH + 1.0
    assert rate["features"] == {
        "value": 190.0,
        "previous": 180.0,
        "rate": 10.0,
        "dt_s": 1.0,
        "max_rate": 5.0,
    }
    assert high["features"] == {"value": 230.0, "lo": 0.0, "hi": 200.0, "excess": 30.0}
    assert 0.5 < high["score"] < 1.0
    # One call per ingest that found something, with that ingest's anomalies.
    assert [[(a.point_id, a.kind) for a in batch] for batch in found] == [
        [(TEMP, "rate_of_change")],
        [(TEMP, "out_of_range")],
    ]
    assert watch.stats() == {
        "points": 2,
        "anomalies": {
            "zscore": 0,
            "ewma": 0,
            "rate_of_change": 1,
            "flatline": 0,
            "out_of_range": 1,
            "stale": 0,
        },
        "failures": {"detectors": 0, "events": 0, "callback": 0},
    }


def test_a_quiet_feed_fires_nothing(store: TwinStore, watch: AnomalyWatch, fake_clock) -> None:
    listening(store, watch)
    for k in range(50):
        store.ingest([Sample(TEMP, 180.0 + (k % 3), GOOD), Sample(LEVEL, 2.0 + k / 100, GOOD)])
        fake_clock.advance(1.0)
        watch.check()
    assert anomaly_events(store) == []
    assert sum(watch.counts.values()) == 0


def test_a_raising_callback_never_breaks_ingest(
    store: TwinStore, fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def engine(anomalies: list[Anomaly]) -> None:
        calls.append(anomalies)
        raise RuntimeError("engine is broken")

    watch = AnomalyWatch(store, detectors(fake_clock), on_anomalies=engine, clock=fake_clock)
    listening(store, watch)
    caplog.set_level(logging.WARNING)
    assert store.ingest([Sample(TEMP, 250.0, GOOD)]) == 1
    assert store.ingest([Sample(LEVEL, 1.0, GOOD)]) == 1  # ingest goes on
    fake_clock.advance(1.0)
    store.ingest([Sample(TEMP, 50.0, GOOD)])  # -200 per second: another anomaly, another call
    assert len(calls) == 2
    assert store.get(LEVEL).value == 1.0
    assert [e.data["kind"] for e in anomaly_events(store)] == ["out_of_range", "rate_of_change"]
    assert watch.failures["callback"] == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, "a failing callback is logged once per interval, not every time"
    assert "engine is broken" in errors[0] and "ingest goes on" in errors[0]


def test_the_callback_can_be_set_after_start(store: TwinStore, watch: AnomalyWatch) -> None:
    later: list[list[Anomaly]] = []
    listening(store, watch)
    watch.on_anomalies = later.append
    store.ingest([Sample(TEMP, 250.0, GOOD)])
    assert [a.kind for batch in later for a in batch] == ["out_of_range"]


def test_raising_detectors_never_break_ingest(
    store: TwinStore, watch: AnomalyWatch, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    def broken(changes: Any) -> list[Anomaly]:
        raise ValueError("a bug in a bank")

    monkeypatch.setattr(watch.detectors, "on_changes", broken)
    listening(store, watch)
    caplog.set_level(logging.WARNING)
    for k in range(100):
        assert store.ingest([Sample(TEMP, 100.0 + k, GOOD)]) == 1
    assert store.get(TEMP).value == 199.0
    assert watch.failures["detectors"] == 100
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.policy.watch"]
    assert len(lines) == 1 and "a bug in a bank" in lines[0]
    assert not any(r.exc_info for r in caplog.records), "no traceback per batch"


def test_an_event_the_store_refuses_is_counted_and_logged(
    tmp_path: Path, fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = TwinStore(tmp_path / "twin.db", POINTS, clock=fake_clock)
    found: list[list[Anomaly]] = []
    watch = AnomalyWatch(store, detectors(fake_clock), on_anomalies=found.append)
    caplog.set_level(logging.WARNING)
    # A store that is not open refuses events; the engine still hears of the anomaly.
    watch.on_changes([PointValue(TEMP, 300.0, GOOD, None, fake_clock.now, 1)])
    assert watch.failures["events"] == 1
    assert [a.kind for batch in found for a in batch] == ["out_of_range"]
    assert any("not recorded" in r.getMessage() for r in caplog.records)


def test_a_storm_is_recorded_in_full_and_logged_in_brief(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    points = [PointDef(f"area/line/dev/p{k}", "dev", "float64") for k in range(500)]
    rules = AnomalyConfig.model_validate(
        {"rules": [{"points": ["area/**"], "detectors": [{"kind": "out_of_range", "hi": 1}]}]}
    )
    caplog.set_level(logging.WARNING, logger="gateway.policy.watch")
    with TwinStore(tmp_path / "twin.db", points, clock=clock) as store:
        watch = AnomalyWatch(
            store, DetectorSet.from_config(rules, points, clock=clock), log_clock=clock
        )
        listening(store, watch)
        store.ingest([Sample(p.id, 5.0, GOOD) for p in points])  # every point at once
        assert len(anomaly_events(store)) == 500
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == LOG_BURST
        assert all(line.startswith("anomaly on area/line/dev/p") for line in lines)

        caplog.clear()
        clock.advance(LOG_WINDOW_S)
        watch.check()  # the periodic check closes the window: one line sums up the rest
        assert [r.getMessage() for r in caplog.records] == [
            f"{500 - LOG_BURST} further anomalies were not logged (at most {LOG_BURST} lines "
            f"per {LOG_WINDOW_S:g} s); the AnomalyDetected events hold every one"
        ]
    assert watch.counts["out_of_range"] == 500


def test_one_point_firing_again_and_again_is_one_line_per_interval(
    store: TwinStore, watch: AnomalyWatch, fake_clock: FakeClock, caplog
) -> None:
    listening(store, watch)
    caplog.set_level(logging.WARNING, logger="gateway.policy.watch")
    for _ in range(10):  # fires, clears, fires again: ten episodes within a minute
        store.ingest([Sample(TEMP, 250.0, GOOD)])
        fake_clock.advance(REPEAT_S / 40)
        store.ingest([Sample(TEMP, 150.0, GOOD)])
        fake_clock.advance(REPEAT_S / 40)
    assert watch.counts["out_of_range"] == 10

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "out_of_range" in r.getMessage()]

    assert len(lines()) == 1
    fake_clock.advance(REPEAT_S)
    store.ingest([Sample(TEMP, 250.0, GOOD)])
    assert len(lines()) == 2
    assert "(9 more like this" in lines()[-1]


# -- the time-driven detectors -------------------------------------------------------------------


def test_check_fires_stale_and_flatline_on_the_clock(
    store: TwinStore, watch: AnomalyWatch, fake_clock: FakeClock, found: list[list[Anomaly]]
) -> None:
    listening(store, watch)
    store.ingest([Sample(LEVEL, 2.0, GOOD)])
    fake_clock.advance(19.0)
    store.ingest([Sample(LEVEL, 2.005, GOOD)])  # within the flatline's tolerance: still flat
    assert watch.check() == []
    fake_clock.advance(10.0)  # 29 s flat, 10 s since the last sample
    assert watch.check() == []
    fake_clock.advance(2.0)  # 31 s flat
    flat = watch.check()
    assert [(a.point_id, a.kind) for a in flat] == [(LEVEL, "flatline")]
    fake_clock.advance(9.0)  # 21 s since the last sample
    stale = watch.check()
    assert [(a.point_id, a.kind) for a in stale] == [(LEVEL, "stale")]
    fake_clock.advance(60.0)
    assert watch.check() == [], "latched: one anomaly per episode"
    events = anomaly_events(store)
    assert [(e.point_id, e.data["kind"]) for e in events] == [
        (LEVEL, "flatline"),
        (LEVEL, "stale"),
    ]
    assert events[0].data["features"] == {"value": 2.0, "flat_s": 31.0, "tolerance": 0.01}
    assert events[1].data["features"] == {
        "age_s": 21.0,
        "max_age_s": 20.0,
        "last_good_ts": EPOCH + 19.0,
    }
    assert events[1].data["ts"] == EPOCH + 40.0
    assert found == [flat, stale]


async def test_start_listens_checks_periodically_and_teardown_undoes_both(
    store: TwinStore, fake_clock: FakeClock, found: list[list[Anomaly]]
) -> None:
    watch = AnomalyWatch(
        store,
        detectors(fake_clock),
        on_anomalies=found.append,
        check_interval_s=MIN_CHECK_S,
        clock=fake_clock,
    )
    life = Lifecycle()
    watch.start(life)
    with pytest.raises(GatewayError, match="already running"):
        watch.start(Lifecycle())
    assert _check_tasks() == 1

    store.ingest([Sample(TEMP, 250.0, GOOD)])  # the listener, inside ingest
    assert [a.kind for batch in found for a in batch] == ["out_of_range"]
    fake_clock.advance(25.0)  # the level never reported: stale, found by the timer
    await eventually(lambda: len(found) == 2, what="the periodic check to find the stale level")
    assert [(a.point_id, a.kind) for a in found[1]] == [(LEVEL, "stale")]

    await life.aclose()
    assert _check_tasks() == 0
    store.ingest([Sample(TEMP, 20.0, GOOD)])
    store.ingest([Sample(TEMP, 260.0, GOOD)])  # would fire again, were anyone listening
    assert len(found) == 2

    life = Lifecycle()  # a gateway stopped and started again watches again
    watch.start(life)
    store.ingest([Sample(TEMP, 20.0, GOOD)])
    store.ingest([Sample(TEMP, 270.0, GOOD)])
    assert [a.kind for a in found[-1]] == ["out_of_range"]
    await life.aclose()


async def test_without_timed_detectors_there_is_no_periodic_task(
    store: TwinStore, fake_clock: FakeClock
) -> None:
    rules = {"rules": [{"points": [TEMP], "detectors": [{"kind": "out_of_range", "hi": 1}]}]}
    watch = AnomalyWatch(store, detectors(fake_clock, rules), clock=fake_clock)
    assert watch.check_interval_s is None
    life = Lifecycle()
    watch.start(life)
    assert _check_tasks() == 0
    await life.aclose()


def _check_tasks() -> int:
    return sum(t.get_name() == "anomaly:check" and not t.done() for t in asyncio.all_tasks())


# -- wired into the gateway, against the simulated plant over Modbus TCP ------------------------


async def test_a_running_gateway_records_a_real_devices_spike(tmp_path: Path) -> None:
    from gateway.app import Gateway
    from plantsim import MeterDevice, TankDevice

    vibration = "utilities/cooling/tank1/pump_vibration"

    def recorded() -> list[tuple[str | None, str]]:
        return [
            (e.point_id, e.data["kind"])
            for e in gateway.store.events_since(0)
            if e.type == EVENT_TYPE
        ]

    async with (
        TankDevice(seed=3, tick_hz=0) as tank,
        MeterDevice(seed=3, tick_hz=0, word_order="little") as meter,
    ):
        # The demo's config, with its anomaly rules: out of range above 4.5 mm/s.
        gateway = Gateway(plant_config(tmp_path, tank.port, meter.port))
        assert gateway.anomaly_watch is not None
        await gateway.start()
        try:
            await eventually(
                lambda: gateway.store.get(vibration).quality is GOOD, what="a first reading"
            )
            assert recorded() == []
            tank.faults.spike("vibration", 10.0, 60.0)  # a transmitter fault: +10 mm/s
            await eventually(
                lambda: (vibration, "out_of_range") in recorded(), what="the anomaly event"
            )
            assert gateway.anomaly_watch.counts["out_of_range"] == 1
        finally:
            await gateway.stop()
    assert _check_tasks() == 0
