"""Cooling-water tank physics: a pure, deterministic model advanced by `step(dt)`.

Level follows a mass balance: inflow proportional to the inlet valve position, outflow
proportional to √level while the pump runs (a centrifugal pump on a gravity-fed suction behaves
roughly like an orifice). Nothing here knows about time, sockets or Modbus: the same seed and the
same sequence of `step` calls give bit-identical values.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class TankParams:
    """Dimensions and coefficients of the tank; the defaults settle at 2.5 m with valve 50 %."""

    area_m2: float = 0.8
    height_m: float = 5.0
    inflow_max_m3h: float = 36.0
    # Chosen so that outflow at 2.5 m equals inflow at 50 % valve: 18 / √2.5.
    outflow_coeff_m3h: float = 18.0 / math.sqrt(2.5)
    high_alarm_m: float = 4.5
    low_alarm_m: float = 0.5
    # The float switches sit closer to the rim and the bottom than the alarm thresholds.
    high_switch_m: float = 4.8
    low_switch_m: float = 0.2
    ambient_c: float = 22.0
    pump_heat_c: float = 2.0
    temp_tau_s: float = 1800.0
    temp_sigma_c: float = 0.6
    vibration_base_mm_s: float = 1.2
    wear_mm_s_per_h: float = 0.0005
    vibration_sigma_mm_s: float = 0.08
    # Integration substep: the level ODE is stiff near empty, so large `dt` is split.
    max_substep_s: float = 1.0


class TankModel:
    """The cooling-water tank: level, flow, temperature, pump wear."""

    def __init__(self, seed: int = 0, params: TankParams | None = None) -> None:
        """Create the tank in a seed-dependent, plausible initial state."""
        self.params = params or TankParams()
        self._rng = random.Random(f"tank/{seed}")
        self.time_s = 0.0
        self._valve_pct = 50.0
        self.pump_on = True
        self.level_m = round(2.0 + self._rng.uniform(0.0, 1.0), 3)
        self.water_temp_c = self.params.ambient_c + self.params.pump_heat_c
        self.run_hours = round(2500.0 + self._rng.uniform(0.0, 1000.0), 1)
        self.vibration_mm_s = self._vibration()

    @property
    def valve_pct(self) -> float:
        """Inlet valve position, 0..100 %."""
        return self._valve_pct

    @valve_pct.setter
    def valve_pct(self, value: float) -> None:
        if not 0.0 <= value <= 100.0:
            raise ValueError(f"tank: valve position {value} % outside 0..100 %")
        self._valve_pct = float(value)

    @property
    def inflow_m3h(self) -> float:
        """Inflow through the inlet valve, m³/h."""
        return self.params.inflow_max_m3h * self._valve_pct / 100.0

    @property
    def outflow_m3h(self) -> float:
        """Outflow through the pump, m³/h (zero while the pump is stopped)."""
        if not self.pump_on:
            return 0.0
        return self.params.outflow_coeff_m3h * math.sqrt(max(self.level_m, 0.0))

    def write(self, signal: str, value: float | bool | int | str) -> None:
        """Apply a command from a client: `valve_pct` or `pump_on`."""
        if signal == "valve_pct":
            self.valve_pct = float(value)
        elif signal == "pump_on":
            self.pump_on = bool(value)
        else:
            raise KeyError(f"tank: {signal!r} is not writable (valve_pct, pump_on are)")

    def step(self, dt: float) -> None:
        """Advance the tank by `dt` seconds."""
        if dt < 0:
            raise ValueError(f"tank: negative time step {dt}")
        if dt == 0:
            return
        p = self.params
        n = max(1, math.ceil(dt / p.max_substep_s))
        h = dt / n
        inflow = self.inflow_m3h / 3600.0
        for _ in range(n):
            outflow = self.outflow_m3h / 3600.0
            level = self.level_m + (inflow - outflow) * h / p.area_m2
            self.level_m = min(max(level, 0.0), p.height_m)
        if self.pump_on:
            self.run_hours += dt / 3600.0
        self._step_temperature(dt)
        self.vibration_mm_s = self._vibration()
        self.time_s += dt

    def signals(self) -> dict[str, float | bool]:
        """Return every signal the tank exposes, by name."""
        p = self.params
        return {
            "valve_pct": self._valve_pct,
            "pump_on": self.pump_on,
            "level": self.level_m,
            "outlet_flow": self.outflow_m3h,
            "vibration": self.vibration_mm_s,
            "high_alarm": self.level_m > p.high_alarm_m,
            "low_alarm": self.level_m < p.low_alarm_m,
            "water_temp": self.water_temp_c,
            "run_hours": self.run_hours,
            "high_switch": self.level_m >= p.high_switch_m,
            "low_switch": self.level_m <= p.low_switch_m,
        }

    def _step_temperature(self, dt: float) -> None:
        # Ornstein-Uhlenbeck around ambient (+ pump heat), discretised exactly so any dt is stable.
        p = self.params
        target = p.ambient_c + (p.pump_heat_c if self.pump_on else 0.0)
        decay = math.exp(-dt / p.temp_tau_s)
        spread = p.temp_sigma_c * math.sqrt(1.0 - decay * decay)
        self.water_temp_c = target + (self.water_temp_c - target) * decay
        self.water_temp_c += spread * self._rng.gauss(0.0, 1.0)

    def _vibration(self) -> float:
        p = self.params
        noise = self._rng.gauss(0.0, 1.0)
        if not self.pump_on:
            return abs(0.02 * noise)
        wear = p.vibration_base_mm_s + p.wear_mm_s_per_h * self.run_hours
        return max(0.0, wear + p.vibration_sigma_mm_s * noise)
