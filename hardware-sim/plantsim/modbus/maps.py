"""The register maps of hardware-sim/README.md, in code. Change both together."""

from __future__ import annotations

from .codec import Point, RegisterMap, WordOrder

TANK_TAG = "TANK-01"


def tank_map() -> RegisterMap:
    """Return the cooling-water tank's register map (32-bit values ABCD)."""
    return RegisterMap(
        [
            Point(
                "holding", 0, "uint16", "valve_pct", scale=0.1, writable=True, raw_range=(0, 1000)
            ),
            Point("holding", 10, "string", length=16, const=TANK_TAG),
            Point("holding", 20, "uint32", "run_hours", scale=0.1, word_order="big"),
            Point("input", 0, "float32", "level"),
            Point("input", 2, "int16", "outlet_flow", scale=0.01),
            Point("input", 3, "float32", "vibration"),
            Point("input", 5, "uint16", bits=("high_alarm", "low_alarm")),
            Point("input", 6, "int16", "water_temp", scale=0.1),
            Point("coil", 0, "bool", "pump_on", writable=True),
            Point("discrete", 0, "bool", "high_switch"),
            Point("discrete", 1, "bool", "low_switch"),
        ],
        word_order="big",
    )


def meter_map(word_order: WordOrder = "little") -> RegisterMap:
    """Return the energy meter's register map with the given word order of 32/64-bit values."""
    return RegisterMap(
        [
            Point("input", 0, "float32", "power"),
            Point("input", 2, "float64", "energy"),
            Point("input", 6, "float32", "demand"),
            Point("input", 8, "uint16", "voltage", scale=0.1),
            Point("input", 9, "int16", "power_factor", scale=0.001),
            Point("holding", 100, "uint16", "demand_window_min", writable=True, raw_range=(1, 60)),
        ],
        word_order=word_order,
    )
