"""Pushed points (gateway/aiw/push.py): values checked against datatypes, and staleness on a
fake clock (time is the subject here; the integration test sees a real point go STALE)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import yaml
from tests_support import FakeClock

from drivers.contract import Quality
from gateway.aiw.push import PushSources, check_value
from gateway.config import parse_config
from gateway.devices import point_defs
from gateway.twin.model import PointValue

# -- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "value", "kept"),
    [
        ("bool", True, True),
        ("bool", False, False),
        ("string", "", ""),
        ("string", "Auto", "Auto"),
        ("float64", 21.5, 21.5),
        ("float64", 3, 3.0),
        ("float32", -3.4e38, -3.4e38),
        ("int16", -32768, -32768),
        ("int16", 12.0, 12),  # JSON has one number type: an integral one is an integer
        ("uint16", 65535, 65535),
        ("uint32", 2**32 - 1, 2**32 - 1),
        ("int64", -(2**63), -(2**63)),
        ("uint64", 2**64 - 1, 2**64 - 1),
    ],
)
def test_values_of_the_points_datatype_are_kept(datatype, value, kept):
    out = check_value(datatype, value)
    assert out == kept and type(out) is type(kept)


@pytest.mark.parametrize(
    ("datatype", "value", "says"),
    [
        ("bool", 1, "true or false"),
        ("bool", "true", "true or false"),
        ("string", 5, "text"),
        ("string", None, "null"),
        ("float64", "21.5", "number"),
        ("float64", True, "number"),
        ("float64", math.nan, "finite"),
        ("float64", math.inf, "finite"),
        ("float32", 1e39, "float32's range"),
        ("int16", 32768, "[-32768, 32767]"),
        ("uint16", -1, "[0, 65535]"),
        ("uint16", 70000, "[0, 65535]"),
        ("uint64", 2**64, "uint64"),
        ("int64", 2**63, "int64"),
        ("int32", 1.5, "whole number"),
        ("int32", [1], "an array"),
        ("int32", {"v": 1}, "an object"),
    ],
)
def test_values_outside_the_points_datatype_are_refused_saying_why(datatype, value, says):
    with pytest.raises(ValueError) as refused:
        check_value(datatype, value)
    assert says in str(refused.value)


# -- staleness ------------------------------------------------------------------------------------

CONFIG = """
site_id: s1
gateway_id: g1
opcua_server: {enabled: false}
devices:
  - name: lab
    driver: http
    stale_after_s: 10
    points:
      - {id: lab/bench/temp, datatype: float64}
      - {id: lab/bench/hum, datatype: float64}
  - name: slow
    driver: http
    points:
      - {id: lab/slow/x, datatype: float64}
  - name: retired
    driver: http
    enabled: false
    stale_after_s: 1
    points:
      - {id: lab/retired/x, datatype: float64}
  - name: tank
    driver: modbus
    endpoint: tcp://127.0.0.1:5020
    points:
      - {id: utilities/tank/level, address: 'holding:0', datatype: uint16}
"""


@pytest.fixture
def sources(fake_clock: FakeClock) -> PushSources:
    config = parse_config(CONFIG, source="test")
    points = {p.id: p for p in point_defs(config)}
    return PushSources(config, points, clock=fake_clock)


class Twin:
    """The twin's current values, as `stale_samples` reads them."""

    def __init__(self) -> None:
        self.values: dict[str, PointValue] = {}

    def set(self, point_id: str, value: Any) -> None:
        self.values[point_id] = PointValue(point_id, value, Quality.GOOD, None, 1.0, 1)

    def get(self, point_id: str) -> PointValue:
        return self.values.get(point_id) or PointValue(point_id, None, Quality.BAD, None, 0.0, 0)


def test_only_enabled_http_devices_points_take_ingest(sources: PushSources):
    assert sources.refusal("lab/bench/temp") is None
    assert sources.refusal("lab/slow/x") is None
    assert "disabled" in (sources.refusal("lab/retired/x") or "")
    modbus = sources.refusal("utilities/tank/level") or ""
    assert "device tank over modbus" in modbus and "driver: http" in modbus
    assert "unknown point" in (sources.refusal("lab/nope/x") or "")


def test_a_silent_point_turns_stale_once_and_a_push_makes_it_current(
    sources: PushSources, fake_clock: FakeClock
):
    twin = Twin()
    twin.set("lab/bench/temp", 21.5)
    sources.pushed(["lab/bench/temp"])
    fake_clock.advance(9.0)
    assert sources.stale_samples(twin.get) == []
    assert sources.device_states()["lab"]["state"] == "RECEIVING"

    fake_clock.advance(2.0)
    (sample,) = sources.stale_samples(twin.get)  # hum never had a value: nothing to be stale
    assert (sample.key, sample.value, sample.quality) == ("lab/bench/temp", None, Quality.STALE)
    assert "stale_after_s 10" in (sample.reason or "")
    assert sources.stale_samples(twin.get) == [], "once per silence"
    lab = sources.device_states()["lab"]
    assert lab["state"] == "STALE" and "no push for 11 s" in lab["last_error"]

    sources.pushed(["lab/bench/temp"])
    assert sources.device_states()["lab"]["state"] == "RECEIVING"
    fake_clock.advance(10.5)
    assert [s.key for s in sources.stale_samples(twin.get)] == ["lab/bench/temp"]


def test_a_source_that_never_pushes_after_the_start_goes_stale_too(
    sources: PushSources, fake_clock: FakeClock
):
    twin = Twin()
    twin.set("lab/bench/hum", 40.0)  # a value from before the restart
    assert sources.device_states()["lab"]["state"] == "WAITING"
    fake_clock.advance(10.5)
    assert [s.key for s in sources.stale_samples(twin.get)] == ["lab/bench/hum"]
    lab = sources.device_states()["lab"]
    assert lab["state"] == "STALE" and "since the gateway started" in lab["last_error"]


def test_devices_without_stale_after_s_never_go_stale_and_disabled_ones_are_not_listed(
    sources: PushSources, fake_clock: FakeClock
):
    twin = Twin()
    twin.set("lab/slow/x", 1.0)
    sources.pushed(["lab/slow/x"])
    fake_clock.advance(1e6)
    assert all(s.key != "lab/slow/x" for s in sources.stale_samples(twin.get))
    states = sources.device_states()
    assert states["slow"]["state"] == "RECEIVING" and "retired" not in states
    assert set(states) == {"lab", "slow"}, "a modbus device's state is its driver's"
    assert yaml.safe_dump(states)  # plain data, as /health sends it
