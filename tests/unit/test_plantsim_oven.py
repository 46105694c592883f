"""Curing-oven physics: a pure step function, no I/O, no asyncua."""

from __future__ import annotations

import math

import pytest

from plantsim import OvenModel, OvenParams
from plantsim.opcua.bench import BenchSignals

# No ambient wandering and no measurement noise: the step response alone, exactly.
QUIET = OvenParams(ambient_day_amplitude_c=0.0, ambient_sigma_c=0.0, noise_sigma_c=0.0)
STEPS = [0.1] * 50 + [1.0, 7.5, 60.0, 0.25, 3600.0]


def run(model: OvenModel, steps: list[float]) -> list[dict]:
    out = []
    for dt in steps:
        model.step(dt)
        out.append(model.signals())
    return out


def test_same_seed_and_steps_give_bit_identical_values():
    a, b = OvenModel(seed=7), OvenModel(seed=7)
    a.write("heater_setpoint", 210.0)
    b.write("heater_setpoint", 210.0)
    assert run(a, STEPS) == run(b, STEPS)


def test_different_seeds_differ():
    assert run(OvenModel(seed=7), STEPS) != run(OvenModel(seed=8), STEPS)


@pytest.mark.parametrize("seed", range(5))
def test_default_oven_starts_settled_near_180(seed):
    oven = OvenModel(seed=seed)
    s = oven.signals()
    assert s["heater_setpoint"] == 180.0 and s["running"] is True and s["mode"] == "AUTO"
    assert s["heater_power"] == pytest.approx(100 * (180 - 22) / 350)
    assert abs(float(s["temperature"]) - 180.0) < 4.0
    oven.step(600.0)
    assert abs(float(oven.signals()["temperature"]) - 180.0) < 4.0


def step_response(dts: list[float]) -> tuple[OvenModel, float, float, list[float]]:
    """Step the setpoint 180 → 220 °C at t=0; return model, start T, final T, T after each dt."""
    oven = OvenModel(seed=3, params=QUIET)
    start = oven.temperature_c
    oven.write("heater_setpoint", 220.0)
    final = oven.steady_state_c()
    seen = []
    for dt in dts:
        oven.step(dt)
        seen.append(oven.temperature_c)
    return oven, start, final, seen


def test_nothing_happens_during_the_dead_time():
    p = QUIET
    _, start, final, seen = step_response([1.0] * 9 + [p.dead_time_s - 9.0 - 1e-6])
    assert final - start > 30.0
    # Only the heater wear moves it, by micro-degrees.
    assert all(abs(t - start) < 1e-3 for t in seen)


def test_first_order_lag_after_the_dead_time():
    p = QUIET
    _, start, final, (at_tau,) = step_response([p.dead_time_s + p.tau_s])
    assert (at_tau - start) / (final - start) == pytest.approx(1 - math.exp(-1), abs=0.002)
    _, _, _, (at_3tau,) = step_response([p.dead_time_s + 3 * p.tau_s])
    assert (at_3tau - start) / (final - start) == pytest.approx(1 - math.exp(-3), abs=0.002)


def test_step_response_settles_at_the_steady_state():
    _, _, final, (settled,) = step_response([QUIET.dead_time_s + 12 * QUIET.tau_s])
    assert settled == pytest.approx(final, abs=0.05)


def test_integration_does_not_depend_on_the_step_size():
    fine = step_response([0.1] * 1300)[3][-1]
    coarse = step_response([130.0])[3][-1]
    odd = step_response([3.3, 6.7, 0.05, 119.95])[3][-1]
    # Exact but for the heater wear, which moves the target by micro-degrees per step; a step
    # straddling the end of the dead time unsplit would be off by degrees.
    assert fine == pytest.approx(coarse, abs=1e-3) and odd == pytest.approx(coarse, abs=1e-3)


def test_stopping_the_oven_cuts_the_heater_and_it_cools_after_the_dead_time():
    oven = OvenModel(seed=1, params=QUIET)
    hot = oven.temperature_c
    oven.write("running", False)
    s = oven.signals()
    assert s["heater_power"] == 0.0 and s["mode"] == "OFF" and s["running"] is False
    oven.step(QUIET.dead_time_s - 0.5)
    assert oven.temperature_c == pytest.approx(hot, abs=1e-3)
    oven.step(2 * QUIET.tau_s)
    assert oven.temperature_c < hot - 100
    oven.step(20 * QUIET.tau_s)
    assert oven.temperature_c == pytest.approx(oven.ambient_c, abs=0.1)


def test_wear_lowers_the_steady_state_for_the_same_setpoint():
    oven = OvenModel(seed=2, params=QUIET)
    wear, temp, power = oven.heater_wear, oven.temperature_c, oven.heater_power_pct
    oven.step(48 * 3600.0)
    # Open loop: the same power, less heat.
    assert oven.heater_power_pct == power
    grown = oven.heater_wear - wear
    assert grown == pytest.approx(power / 100 * 48 / QUIET.wear_full_power_h, rel=1e-6)
    expected_drop = QUIET.heater_gain_c * QUIET.wear_loss * grown * power / 100
    assert temp - oven.temperature_c == pytest.approx(expected_drop, rel=0.01)
    assert 2.0 < temp - oven.temperature_c < 5.0


def test_wear_stops_at_one():
    params = OvenParams(wear_full_power_h=1.0, max_substep_s=60.0)
    oven = OvenModel(seed=2, params=params)
    oven.write("heater_setpoint", 300.0)
    oven.step(10 * 3600.0)
    assert oven.heater_wear == 1.0
    assert oven.efficiency == pytest.approx(1 - params.wear_loss)


def test_ambient_wanders_within_bounds_and_the_oven_follows_it():
    oven = OvenModel(seed=4)
    p = oven.params
    ambients, gaps = [], []
    for _ in range(3 * 24 * 12):  # three days in 5 min steps
        oven.step(300.0)
        ambients.append(oven.ambient_c)
        gaps.append(oven.temperature_c - oven.ambient_c)
    limit = p.ambient_day_amplitude_c + p.ambient_limit_c
    assert all(abs(a - p.ambient_c) <= limit for a in ambients)
    assert max(ambients) - min(ambients) > 3.0, "the ambient really moves"
    # The oven rides on the ambient: the rise over it changes only by the (slow) wear.
    assert max(gaps) - min(gaps) < 6.0


def test_a_warmer_hall_moves_the_oven_by_as_much_and_leaves_the_heater_curve_alone():
    oven, same = OvenModel(seed=2, params=QUIET), OvenModel(seed=2, params=QUIET)
    before = oven.steady_state_c()
    power = oven.heater_power_pct
    oven.ambient_offset_c = 12.0
    assert oven.ambient_c == pytest.approx(same.ambient_c + 12.0), "at once"
    oven.step(0.1)
    same.step(0.1)
    assert oven.ambient_c == pytest.approx(same.ambient_c + 12.0)
    # Open loop: the power the curve commands is the same, so the oven drifts with the hall.
    assert oven.heater_power_pct == power
    assert oven.steady_state_c() == pytest.approx(before + 12.0)
    oven.step(20 * 120.0)
    assert oven.temperature_c == pytest.approx(oven.steady_state_c(), abs=0.01)  # wear creeps
    assert oven.temperature_c > 190.0, "a 180 °C cure leaves its 170..190 °C band"


def test_an_open_door_loses_a_share_of_the_rise_at_once_and_closing_it_recovers():
    oven, same = OvenModel(seed=2, params=QUIET), OvenModel(seed=2, params=QUIET)
    settled = oven.steady_state_c()
    oven.door_open = True
    rise = settled - oven.ambient_c
    assert oven.steady_state_c() == pytest.approx(settled - 0.1 * rise), "no dead time"
    oven.step(60.0)
    same.step(60.0)
    dip = same.temperature_c - oven.temperature_c
    assert dip == pytest.approx(0.1 * rise * (1 - math.exp(-60 / 120)), rel=1e-4)  # wear creeps
    assert oven.heater_power_pct == same.heater_power_pct, "the curve does not know the door"
    oven.door_open = False
    oven.step(20 * 120.0)
    same.step(20 * 120.0)
    assert oven.temperature_c == pytest.approx(same.temperature_c, abs=1e-3)


@pytest.mark.parametrize("offset", [math.nan, math.inf, -math.inf])
def test_an_ambient_offset_that_is_no_number_is_refused(offset):
    oven = OvenModel(seed=2)
    with pytest.raises(ValueError, match="not a finite number"):
        oven.ambient_offset_c = offset
    assert oven.ambient_offset_c == 0.0 and math.isfinite(oven.ambient_c)


def test_measurement_noise_is_seeded_and_small():
    oven = OvenModel(seed=5)
    errors = []
    for _ in range(500):
        oven.step(1.0)
        errors.append(float(oven.signals()["temperature"]) - oven.temperature_c)
    sd = math.sqrt(sum(e * e for e in errors) / len(errors))
    assert sd == pytest.approx(oven.params.noise_sigma_c, rel=0.15)


def test_batches_count_while_at_temperature():
    oven = OvenModel(seed=1, params=QUIET)
    first = oven.batch_count
    oven.step(3600.0)
    assert oven.batch_count == first + 6
    oven.write("running", False)
    oven.step(3600.0)
    assert oven.batch_count == first + 6


def test_writes_are_range_checked():
    oven = OvenModel(seed=1)
    for bad in (-0.1, 300.1, math.nan):
        with pytest.raises(ValueError, match=r"outside 0\.\.300"):
            oven.write("heater_setpoint", bad)
    assert oven.heater_setpoint_c == 180.0
    oven.write("heater_setpoint", 300.0)
    assert oven.signals()["heater_power"] == pytest.approx(100 * (300 - 22) / 350)
    with pytest.raises(KeyError, match="not writable"):
        oven.write("temperature", 20.0)
    with pytest.raises(ValueError, match="negative"):
        oven.step(-1.0)


def test_signals_have_the_served_types():
    s = OvenModel(seed=1).signals()
    assert {k: type(v) for k, v in s.items()} == {
        "temperature": float,
        "heater_setpoint": float,
        "heater_power": float,
        "ambient": float,
        "heater_wear": float,
        "running": bool,
        "batch_count": int,
        "mode": str,
    }


def test_bench_signals_all_change_and_are_seeded():
    bench = BenchSignals(100, seed=1)
    a, b = bench.values(0.0), bench.values(0.1)
    assert len(a) == 100 and all(x != y for x, y in zip(a, b, strict=True))
    assert all(5.0 < v < 95.0 for v in a + b)
    assert BenchSignals(100, seed=1).values(0.0) == a != BenchSignals(100, seed=2).values(0.0)
