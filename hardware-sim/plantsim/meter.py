"""Energy meter physics: a pure, deterministic model advanced by `step(dt)`.

Active power is a base load plus a slow "daily" cycle compressed into minutes plus correlated
noise; energy integrates power; demand is the mean power over a sliding window, as a meter's
sliding-demand register reports it. The same seed and the same `step` calls give bit-identical
values.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class MeterParams:
    """Load profile and electrical constants of the metered feeder."""

    base_kw: float = 45.0
    cycle_kw: float = 15.0
    # One "day" of load swing, compressed so that a demo shows it within minutes.
    day_s: float = 600.0
    noise_kw: float = 2.0
    noise_tau_s: float = 30.0
    jitter_kw: float = 0.3
    nominal_v: float = 231.0
    v_drop_per_kw: float = 0.03
    v_sigma: float = 0.3
    demand_window_min: int = 15


class MeterModel:
    """The energy meter: power, energy, demand, voltage, power factor."""

    DEMAND_WINDOW_RANGE = (1, 60)

    def __init__(self, seed: int = 0, params: MeterParams | None = None) -> None:
        """Create the meter in a seed-dependent initial state."""
        self.params = params or MeterParams()
        self._rng = random.Random(f"meter/{seed}")
        self.time_s = 0.0
        self._phase_s = self._rng.uniform(0.0, self.params.day_s)
        self._slow_noise_kw = 0.0
        self.energy_kwh = round(self._rng.uniform(10_000.0, 100_000.0), 1)
        self._window_min = self.params.demand_window_min
        # (duration_s, power_kw) of each step inside the demand window, oldest first.
        self._window: deque[tuple[float, float]] = deque()
        self._window_s = 0.0
        self._window_kws = 0.0
        self.power_kw = self._power()
        self.voltage_v = self._voltage()
        self.power_factor = self._power_factor()

    @property
    def demand_window_min(self) -> int:
        """Demand averaging window, minutes (1..60)."""
        return self._window_min

    @demand_window_min.setter
    def demand_window_min(self, minutes: int) -> None:
        lo, hi = self.DEMAND_WINDOW_RANGE
        if int(minutes) != minutes or not lo <= minutes <= hi:
            raise ValueError(f"meter: demand window {minutes} min outside {lo}..{hi} min")
        self._window_min = int(minutes)
        self._trim_window()

    @property
    def demand_kw(self) -> float:
        """Mean power over the demand window (over what there is, until the window has filled)."""
        if self._window_s <= 0.0:
            return self.power_kw
        excess = self._window_s - self._window_min * 60.0
        kws = self._window_kws
        seconds = self._window_s
        if excess > 0.0:
            # The oldest step straddles the window's start: count only its inside part.
            _, oldest_kw = self._window[0]
            kws -= excess * oldest_kw
            seconds -= excess
        return kws / seconds

    def write(self, signal: str, value: float | bool | int | str) -> None:
        """Apply a command from a client: `demand_window_min`."""
        if signal != "demand_window_min":
            raise KeyError(f"meter: {signal!r} is not writable (demand_window_min is)")
        self.demand_window_min = int(value)

    def step(self, dt: float) -> None:
        """Advance the meter by `dt` seconds."""
        if dt < 0:
            raise ValueError(f"meter: negative time step {dt}")
        if dt == 0:
            return
        p = self.params
        self.time_s += dt
        decay = math.exp(-dt / p.noise_tau_s)
        self._slow_noise_kw = self._slow_noise_kw * decay + p.noise_kw * math.sqrt(
            1.0 - decay * decay
        ) * self._rng.gauss(0.0, 1.0)
        self.power_kw = self._power()
        # Rectangle rule with the step's end value: exactly what the demand window averages.
        self.energy_kwh += self.power_kw * dt / 3600.0
        self._window.append((dt, self.power_kw))
        self._window_s += dt
        self._window_kws += dt * self.power_kw
        self._trim_window()
        self.voltage_v = self._voltage()
        self.power_factor = self._power_factor()

    def signals(self) -> dict[str, float | bool]:
        """Return every signal the meter exposes, by name."""
        return {
            "power": self.power_kw,
            "energy": self.energy_kwh,
            "demand": self.demand_kw,
            "voltage": self.voltage_v,
            "power_factor": self.power_factor,
            "demand_window_min": float(self._window_min),
        }

    def _power(self) -> float:
        p = self.params
        cycle = math.sin(2.0 * math.pi * (self.time_s + self._phase_s) / p.day_s)
        jitter = p.jitter_kw * self._rng.gauss(0.0, 1.0)
        return max(0.0, p.base_kw + p.cycle_kw * cycle + self._slow_noise_kw + jitter)

    def _voltage(self) -> float:
        p = self.params
        return p.nominal_v - p.v_drop_per_kw * self.power_kw + p.v_sigma * self._rng.gauss(0, 1)

    def _power_factor(self) -> float:
        # Lightly loaded motors run at a poorer power factor; clamp to what meters report.
        p = self.params
        load = self.power_kw / (p.base_kw + p.cycle_kw)
        pf = 0.82 + 0.12 * load + 0.005 * self._rng.gauss(0.0, 1.0)
        return min(max(pf, 0.7), 0.99)

    def _trim_window(self) -> None:
        limit = self._window_min * 60.0
        while self._window:
            dt, kw = self._window[0]
            if self._window_s - dt < limit:
                break
            self._window.popleft()
            self._window_s -= dt
            self._window_kws -= dt * kw
        if not self._window:
            self._window_s = 0.0
            self._window_kws = 0.0
