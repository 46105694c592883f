"""Curing-oven physics: a pure, deterministic model advanced by `step(dt)`.

The oven's heater runs from a calibrated curve, open loop, as simple curing ovens with an SCR
power controller do: heater power = (setpoint - 22 °C) / gain. The oven temperature answers that
power as a first-order lag (time constant τ) behind a dead time L (the air has to carry the heat
from the elements to the probe), around an ambient temperature that wanders. Because the loop is
open, anything the curve was not calibrated for shows in the temperature: the ambient, and heater
wear, which lowers the heater's efficiency slowly with its on-time so that the oven settles a
little lower every week for the same setpoint. Nothing here knows about time, sockets or OPC UA:
the same seed and the same sequence of `step` calls give bit-identical values.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

MODES = ("AUTO", "OFF")


@dataclass(frozen=True)
class OvenParams:
    """Coefficients of the oven; the defaults settle within ~2 °C of a 180 °C setpoint."""

    tau_s: float = 120.0
    dead_time_s: float = 10.0
    # Rise over ambient at 100 % power with a new heater; 180 °C takes 45 % power.
    heater_gain_c: float = 350.0
    # The ambient the heater curve was calibrated at, and the centre the ambient wanders around.
    ambient_c: float = 22.0
    ambient_day_amplitude_c: float = 3.0
    ambient_day_s: float = 86400.0
    ambient_sigma_c: float = 0.5
    ambient_tau_s: float = 1800.0
    # The random part of the ambient never strays further than this from the daily cycle.
    ambient_limit_c: float = 6.0
    # Efficiency lost at wear 1.0, and the heater on-time (at 100 % power) that wears it out.
    wear_loss: float = 0.25
    wear_full_power_h: float = 250.0
    noise_sigma_c: float = 0.15
    setpoint_max_c: float = 300.0
    temperature_max_c: float = 400.0
    # A batch is cured after this long within `batch_band_c` of the setpoint.
    batch_s: float = 600.0
    batch_band_c: float = 5.0
    # Share of the heater's rise over ambient lost while the door stands open (a batch being
    # loaded): at 180 °C about 16 °C of target, so a one-minute opening dips the oven ~6 °C.
    door_loss: float = 0.1
    # Integration substep: bounds the step of the ambient random walk for large `dt`.
    max_substep_s: float = 5.0


class OvenModel:
    """The curing oven: temperature, heater power and wear, ambient, batches."""

    def __init__(self, seed: int = 0, params: OvenParams | None = None) -> None:
        """Create the oven running at 180 °C, settled, in a seed-dependent state."""
        self.params = params or OvenParams()
        self._rng = random.Random(f"oven/{seed}")
        self.time_s = 0.0
        self._setpoint_c = 180.0
        self.running = True
        # Set by whoever opens it (a test, the closed-loop bench): the PLC has no door signal.
        self.door_open = False
        self.heater_wear = round(self._rng.uniform(0.0, 0.05), 4)
        self.batch_count = self._rng.randint(1000, 5000)
        self._day_phase = self._rng.uniform(0.0, 2.0 * math.pi)
        self._ambient_dev_c = 0.0
        self._ambient_offset_c = 0.0
        self.ambient_c = self._ambient()
        self._cure_s = 0.0
        # (time from which it applies, heater power %): the dead time reads this history.
        self._history: deque[tuple[float, float]] = deque([(-math.inf, self._command())])
        self.temperature_c = self._target(self.heater_power_pct)
        self._noise_c = 0.0

    @property
    def heater_setpoint_c(self) -> float:
        """Heater setpoint, 0..300 °C."""
        return self._setpoint_c

    @heater_setpoint_c.setter
    def heater_setpoint_c(self, value: float) -> None:
        top = self.params.setpoint_max_c
        if not 0.0 <= value <= top:  # also refuses NaN
            raise ValueError(f"oven: heater setpoint {value} °C outside 0..{top:g} °C")
        self._setpoint_c = float(value)
        self._record()

    @property
    def ambient_offset_c(self) -> float:
        """How far the ambient's centre has moved from `params.ambient_c`, °C (default 0)."""
        return self._ambient_offset_c

    @ambient_offset_c.setter
    def ambient_offset_c(self, value: float) -> None:
        # The hall warming up (summer, a door shut): the ambient moves at once, while the heater
        # curve stays calibrated at `params.ambient_c`, so the open-loop oven drifts with it.
        # 0 keeps every value bit-identical to an oven that never had it set.
        if not math.isfinite(value):
            raise ValueError(f"oven: ambient offset {value} °C is not a finite number")
        self._ambient_offset_c = float(value)
        self.ambient_c = self._ambient()

    @property
    def heater_power_pct(self) -> float:
        """Heater power commanded now, 0..100 %."""
        return self._history[-1][1]

    @property
    def efficiency(self) -> float:
        """Share of the commanded heat the worn heater delivers."""
        return 1.0 - self.params.wear_loss * self.heater_wear

    @property
    def mode(self) -> str:
        """`AUTO` while running, `OFF` otherwise."""
        return MODES[0] if self.running else MODES[1]

    def write(self, signal: str, value: float | bool | int | str) -> None:
        """Apply a command from a client: `heater_setpoint` or `running`."""
        if signal == "heater_setpoint":
            self.heater_setpoint_c = float(value)
        elif signal == "running":
            self.running = bool(value)
            self._record()
        else:
            raise KeyError(f"oven: {signal!r} is not writable (heater_setpoint, running are)")

    def step(self, dt: float) -> None:
        """Advance the oven by `dt` seconds."""
        if dt < 0:
            raise ValueError(f"oven: negative time step {dt}")
        end = self.time_s + dt
        while self.time_s < end:
            h = min(self.params.max_substep_s, end - self.time_s)
            # Split where the delayed power changes, so that each piece integrates exactly.
            change = self._next_delayed_change()
            if change is not None and change < self.time_s + h:
                h = change - self.time_s
            self._advance(h, end)
        self._noise_c = self.params.noise_sigma_c * self._rng.gauss(0.0, 1.0)

    def signals(self) -> dict[str, float | bool | int | str]:
        """Return every signal the oven exposes, by name."""
        measured = self.temperature_c + self._noise_c
        return {
            "temperature": min(max(measured, 0.0), self.params.temperature_max_c),
            "heater_setpoint": self._setpoint_c,
            "heater_power": self.heater_power_pct,
            "ambient": self.ambient_c,
            "heater_wear": self.heater_wear,
            "running": self.running,
            "batch_count": self.batch_count,
            "mode": self.mode,
        }

    def delayed_power_pct(self, at: float | None = None) -> float:
        """Heater power that reaches the probe at time `at` (default now): the dead time."""
        when = self.time_s if at is None else at
        delay = self.params.dead_time_s
        power = self._history[0][1]
        for since, value in self._history:
            # `since + delay`, never `when - delay`: the same sum as in _next_delayed_change, so
            # that a step split exactly at a change sees the new power (no rounding gap).
            if since + delay > when:
                break
            power = value
        return power

    def steady_state_c(self) -> float:
        """Where the temperature settles if nothing changes (ambient, wear held)."""
        return self._target(self.heater_power_pct)

    def _advance(self, h: float, end: float) -> None:
        p = self.params
        power_in = self.delayed_power_pct()
        decay = math.exp(-h / p.ambient_tau_s)
        spread = p.ambient_sigma_c * math.sqrt(1.0 - decay * decay)
        dev = self._ambient_dev_c * decay + spread * self._rng.gauss(0.0, 1.0)
        self._ambient_dev_c = min(max(dev, -p.ambient_limit_c), p.ambient_limit_c)
        # Land exactly on `end`: float sums of substeps would leave a sliver of a step behind.
        self.time_s = end if end - (self.time_s + h) < 1e-9 else self.time_s + h
        self.ambient_c = self._ambient()
        target = self._target(power_in)
        self.temperature_c = target + (self.temperature_c - target) * math.exp(-h / p.tau_s)
        wear = self.heater_wear + self.heater_power_pct / 100.0 * h / (p.wear_full_power_h * 3600)
        self.heater_wear = min(wear, 1.0)
        if self.running and abs(self.temperature_c - self._setpoint_c) <= p.batch_band_c:
            self._cure_s += h
            if self._cure_s >= p.batch_s:
                self._cure_s -= p.batch_s
                self.batch_count = (self.batch_count + 1) % 2**32
        while len(self._history) > 1 and self._history[1][0] + p.dead_time_s <= self.time_s:
            self._history.popleft()

    def _target(self, power_pct: float) -> float:
        rise = self.params.heater_gain_c * self.efficiency * power_pct / 100.0
        if self.door_open:
            # The open door lets the heat out at once: no dead time, the air is right there.
            rise *= 1.0 - self.params.door_loss
        return self.ambient_c + rise

    def _ambient(self) -> float:
        p = self.params
        cycle = math.sin(2.0 * math.pi * self.time_s / p.ambient_day_s + self._day_phase)
        centre = p.ambient_c + self._ambient_offset_c
        return centre + p.ambient_day_amplitude_c * cycle + self._ambient_dev_c

    def _command(self) -> float:
        p = self.params
        if not self.running:
            return 0.0
        return min(max(100.0 * (self._setpoint_c - p.ambient_c) / p.heater_gain_c, 0.0), 100.0)

    def _record(self) -> None:
        power = self._command()
        if power == self._history[-1][1]:
            return
        if self._history[-1][0] == self.time_s:
            self._history.pop()
        self._history.append((self.time_s, power))

    def _next_delayed_change(self) -> float | None:
        delay = self.params.dead_time_s
        for since, _ in self._history:
            if since + delay > self.time_s:
                return since + delay
        return None
