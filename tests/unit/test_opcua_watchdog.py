"""The silent-subscription watchdog's timing, with a fake clock."""

from __future__ import annotations

import pytest

from drivers.opcua.watchdog import MIN_SILENCE_S, SubscriptionWatchdog, silence_limit_s


@pytest.mark.parametrize(
    ("interval_ms", "keepalive", "factor", "limit"),
    [
        (500, 6, 2.0, 6.0),  # the defaults: keep-alive every 3 s, lost after 6 s
        (1000, 10, 1.5, 15.0),
        (100, 3, 2.0, 1.0),  # 0.6 s would be below the floor
        (50, 3, 2.0, MIN_SILENCE_S),
        (250, 4, 3.0, 3.0),
    ],
)
def test_limit_is_factor_keepalive_periods_with_a_floor(
    interval_ms: float, keepalive: int, factor: float, limit: float
) -> None:
    assert silence_limit_s(interval_ms, keepalive, factor) == pytest.approx(limit)


def test_floor_can_be_lowered() -> None:
    assert silence_limit_s(50, 3, 2.0, floor_s=0.1) == pytest.approx(0.3)


@pytest.mark.parametrize("args", [(0, 3, 2.0), (100, 0, 2.0), (100, 3, 0)])
def test_nonsense_parameters_are_refused(args: tuple[float, int, float]) -> None:
    with pytest.raises(ValueError):
        silence_limit_s(*args)


def test_silent_only_after_the_limit_without_any_message() -> None:
    now = 1000.0
    wd = SubscriptionWatchdog(limit_s=6.0, last_heard=now)
    assert wd.silent_for(now + 5.9) is None
    assert wd.remaining(now + 5.9) == pytest.approx(0.1)
    assert wd.silent_for(now + 6.0) == pytest.approx(6.0)
    assert wd.remaining(now + 7.0) == 0.0


def test_each_message_restarts_the_clock() -> None:
    wd = SubscriptionWatchdog(limit_s=6.0, last_heard=0.0)
    for t in range(0, 60, 3):  # a keep-alive every 3 s, a minute long
        assert wd.silent_for(float(t)) is None
        wd.heard(float(t))
    assert wd.silent_for(57.0 + 5.0) is None
    assert wd.silent_for(57.0 + 6.5) == pytest.approx(6.5)
