"""Physics of the simulated plant: pure step functions, no I/O."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from plantsim import MeterModel, MeterParams, TankModel, TankParams


def run(model, steps: list[float]) -> list[dict]:
    out = []
    for dt in steps:
        model.step(dt)
        out.append(model.signals())
    return out


STEPS = [0.1] * 50 + [1.0, 7.5, 60.0, 0.25, 3600.0]


@pytest.mark.parametrize("model_type", [TankModel, MeterModel])
def test_same_seed_and_steps_give_bit_identical_values(model_type):
    assert run(model_type(seed=7), STEPS) == run(model_type(seed=7), STEPS)


@pytest.mark.parametrize("model_type", [TankModel, MeterModel])
def test_different_seeds_differ(model_type):
    assert run(model_type(seed=7), STEPS) != run(model_type(seed=8), STEPS)


# -- tank -------------------------------------------------------------------------------------


def test_tank_falls_with_valve_closed_and_pump_on():
    tank = TankModel(seed=1)
    tank.valve_pct, tank.pump_on = 0.0, True
    before = tank.level_m
    tank.step(60.0)
    assert tank.level_m < before
    assert tank.signals()["outlet_flow"] > 0


def test_tank_rises_with_valve_open_and_pump_off():
    tank = TankModel(seed=1)
    tank.valve_pct, tank.pump_on = 100.0, False
    before = tank.level_m
    tank.step(60.0)
    # Pump off: all inflow stays in the tank, exactly inflow * t / area.
    expected = before + 36.0 / 3600.0 * 60.0 / tank.params.area_m2
    assert tank.level_m == pytest.approx(expected)
    assert tank.signals()["outlet_flow"] == 0.0


def test_tank_level_clamps_at_empty_and_full():
    tank = TankModel(seed=1)
    tank.valve_pct, tank.pump_on = 100.0, False
    tank.step(4 * 3600.0)
    assert tank.level_m == 5.0
    s = tank.signals()
    assert s["high_alarm"] and s["high_switch"] and not s["low_alarm"]
    tank.valve_pct, tank.pump_on = 0.0, True
    tank.step(10 * 3600.0)
    assert tank.level_m == 0.0
    s = tank.signals()
    assert s["low_alarm"] and s["low_switch"] and not s["high_alarm"]
    assert s["outlet_flow"] == 0.0


def test_tank_defaults_settle_mid_range():
    tank = TankModel(seed=3)
    assert (tank.valve_pct, tank.pump_on) == (50.0, True)
    tank.step(4 * 3600.0)
    assert tank.level_m == pytest.approx(2.5, abs=0.05)
    # At equilibrium the pump carries away what the valve lets in.
    assert tank.outflow_m3h == pytest.approx(tank.inflow_m3h, rel=0.01)


@pytest.mark.parametrize(
    ("level", "high_alarm", "high_switch", "low_alarm", "low_switch"),
    [
        (4.6, True, False, False, False),
        (4.9, True, True, False, False),
        (2.5, False, False, False, False),
        (0.4, False, False, True, False),
        (0.1, False, False, True, True),
    ],
)
def test_tank_alarms_and_switches_follow_thresholds(
    level, high_alarm, high_switch, low_alarm, low_switch
):
    tank = TankModel(seed=1)
    tank.level_m = level
    s = tank.signals()
    assert (s["high_alarm"], s["high_switch"], s["low_alarm"], s["low_switch"]) == (
        high_alarm,
        high_switch,
        low_alarm,
        low_switch,
    )


def test_tank_run_hours_accumulate_only_while_pump_runs():
    tank = TankModel(seed=1)
    start = tank.run_hours
    tank.step(1800.0)
    assert tank.run_hours == pytest.approx(start + 0.5)
    tank.pump_on = False
    tank.step(1800.0)
    assert tank.run_hours == pytest.approx(start + 0.5)


def test_tank_vibration_rises_with_wear():
    def mean_vibration(run_hours: float) -> float:
        tank = TankModel(seed=2)
        tank.run_hours = run_hours
        return statistics.fmean(s["vibration"] for s in run(tank, [1.0] * 300))

    assert mean_vibration(10_000.0) > mean_vibration(1_000.0) + 3.0
    assert 1.0 < mean_vibration(3_000.0) < 4.0


def test_tank_vibration_is_noisy_and_near_zero_when_stopped():
    tank = TankModel(seed=2)
    values = [s["vibration"] for s in run(tank, [1.0] * 100)]
    assert statistics.stdev(values) > 0.01
    tank.pump_on = False
    assert all(s["vibration"] < 0.2 for s in run(tank, [1.0] * 100))


def test_tank_water_temperature_drifts_in_a_plausible_band():
    tank = TankModel(seed=4)
    temps = [s["water_temp"] for s in run(tank, [10.0] * 2000)]
    assert all(15.0 < t < 35.0 for t in temps)
    assert max(temps) - min(temps) > 0.3


def test_tank_rejects_a_valve_position_out_of_range():
    tank = TankModel()
    with pytest.raises(ValueError, match=r"0\.\.100"):
        tank.write("valve_pct", 100.1)
    with pytest.raises(KeyError, match="not writable"):
        tank.write("level", 1.0)


def test_tank_large_steps_match_small_steps_closely():
    coarse, fine = TankModel(seed=5), TankModel(seed=5)
    coarse.valve_pct = fine.valve_pct = 80.0
    coarse.step(600.0)
    for _ in range(6000):
        fine.step(0.1)
    assert coarse.level_m == pytest.approx(fine.level_m, abs=0.01)


def test_tank_params_are_configurable():
    tank = TankModel(seed=1, params=TankParams(area_m2=0.4))
    tank.valve_pct, tank.pump_on = 100.0, False
    before = tank.level_m
    tank.step(60.0)
    assert tank.level_m - before == pytest.approx(2 * 36.0 / 3600.0 * 60.0 / 0.8)


# -- meter ------------------------------------------------------------------------------------


def test_meter_energy_integrates_power():
    meter = MeterModel(seed=1)
    start = meter.energy_kwh
    expected = start
    for _ in range(3600):
        meter.step(1.0)
        expected += meter.power_kw / 3600.0
    assert meter.energy_kwh == pytest.approx(expected, rel=1e-12)
    # An hour of a ~45 kW feeder: tens of kWh, never negative.
    assert 20.0 < meter.energy_kwh - start < 80.0


def test_meter_energy_never_decreases():
    meter = MeterModel(seed=2)
    energies = [s["energy"] for s in run(meter, [5.0] * 1000)]
    assert all(b >= a for a, b in itertools.pairwise(energies))


def test_meter_demand_is_the_mean_power_over_the_window():
    meter = MeterModel(seed=3)
    meter.demand_window_min = 1
    powers = [s["power"] for s in run(meter, [1.0] * 300)]
    assert meter.demand_kw == pytest.approx(statistics.fmean(powers[-60:]), rel=1e-9)
    meter.demand_window_min = 2
    # Lengthening the window cannot bring back samples already dropped from it.
    assert meter.demand_kw == pytest.approx(statistics.fmean(powers[-60:]), rel=1e-9)
    powers += [s["power"] for s in run(meter, [1.0] * 120)]
    assert meter.demand_kw == pytest.approx(statistics.fmean(powers[-120:]), rel=1e-9)


def test_meter_demand_counts_only_the_part_of_a_step_inside_the_window():
    meter = MeterModel(seed=3)
    meter.demand_window_min = 1
    powers = [s["power"] for s in run(meter, [7.0] * 20)]
    # 60 s = 8 whole steps of 7 s + 4 s of the ninth newest.
    expected = (7.0 * sum(powers[-8:]) + 4.0 * powers[-9]) / 60.0
    assert meter.demand_kw == pytest.approx(expected, rel=1e-9)


def test_meter_demand_before_the_window_fills_is_the_mean_so_far():
    meter = MeterModel(seed=4)
    powers = [s["power"] for s in run(meter, [1.0] * 10)]
    assert meter.demand_kw == pytest.approx(statistics.fmean(powers), rel=1e-9)


def test_meter_power_varies_plausibly_over_a_compressed_day():
    meter = MeterModel(seed=5)
    day = int(MeterParams().day_s)
    powers = [s["power"] for s in run(meter, [1.0] * day)]
    assert all(0.0 <= p < 100.0 for p in powers)
    assert max(powers) - min(powers) > 15.0
    assert statistics.fmean(powers) == pytest.approx(45.0, abs=8.0)


def test_meter_voltage_and_power_factor_stay_in_range():
    meter = MeterModel(seed=6)
    samples = run(meter, [1.0] * 1200)
    assert all(220.0 < s["voltage"] < 240.0 for s in samples)
    assert all(0.7 <= s["power_factor"] <= 0.99 for s in samples)


@pytest.mark.parametrize("minutes", [0, 61, 1.5])
def test_meter_rejects_a_demand_window_out_of_range(minutes):
    meter = MeterModel()
    with pytest.raises(ValueError, match=r"1\.\.60"):
        meter.demand_window_min = minutes


def test_models_reject_negative_steps():
    for model in (TankModel(), MeterModel()):
        with pytest.raises(ValueError, match="negative"):
            model.step(-1.0)
        before = model.signals()
        model.step(0.0)
        assert model.signals() == before
        assert not math.isnan(model.time_s)
