"""Node maps: which OPC UA variable serves which model signal, with its type, unit and range.

Pure data, no asyncua: the server builds its address space from a `NodeMap`, the README's node
table is checked against `oven_map()`, and the bench signals' names come from here too.
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncua_glue.units import unece_unit_id

NAMESPACE_URI = "urn:opstwin:plantsim"
# The server registers NAMESPACE_URI first, right after the standard namespace (0) and its own
# application URI (1), so that the index is 2 on every start; it refuses to serve otherwise.
NAMESPACE_INDEX = 2
DATATYPES = ("Double", "Boolean", "UInt32", "String")
BENCH_OBJECT = "Bench"


@dataclass(frozen=True)
class Unit:
    """An engineering unit: UNECE common code, display name, description."""

    code: str
    display: str
    description: str

    @property
    def unit_id(self) -> int:
        """The code packed into an Int32 as OPC UA Part 8 says: one byte per character."""
        return unece_unit_id(self.code)


CELSIUS = Unit("CEL", "°C", "degree Celsius")
PERCENT = Unit("P1", "%", "percent")
ONE = Unit("C62", "1", "one (dimensionless ratio)")


@dataclass(frozen=True)
class NodeSpec:
    """One variable: browse name, the model signal it serves, type, unit, range, writability."""

    name: str
    signal: str
    datatype: str
    description: str = ""
    unit: Unit | None = None
    eu_range: tuple[float, float] | None = None
    writable: bool = False

    def __post_init__(self) -> None:
        """Refuse what the server could not build."""
        if self.datatype not in DATATYPES:
            raise ValueError(f"{self.name}: datatype {self.datatype!r}; use one of {DATATYPES}")
        analog = self.unit is not None or self.eu_range is not None
        if analog and self.datatype != "Double":
            raise ValueError(f"{self.name}: unit/EURange need datatype Double (an analog item)")
        if (self.unit is None) != (self.eu_range is None):
            raise ValueError(f"{self.name}: an analog item has both a unit and an EURange")

    @property
    def analog(self) -> bool:
        """Whether the variable is an AnalogItemType with EngineeringUnits and EURange."""
        return self.unit is not None


@dataclass(frozen=True)
class NodeMap:
    """The variables of one object (e.g. `Oven1`), string node ids `<object>.<name>`."""

    object_name: str
    nodes: tuple[NodeSpec, ...]

    def __post_init__(self) -> None:
        """Refuse duplicate names or signals."""
        for attr in ("name", "signal"):
            seen = [getattr(n, attr) for n in self.nodes]
            dupes = sorted({s for s in seen if seen.count(s) > 1})
            if dupes:
                raise ValueError(f"{self.object_name}: duplicate {attr}s {dupes}")

    def identifier(self, spec: NodeSpec) -> str:
        """The string part of the node id, e.g. `Oven1.Temperature`."""
        return f"{self.object_name}.{spec.name}"

    def node_id(self, signal: str, ns: int = NAMESPACE_INDEX) -> str:
        """The node id of a signal as text, e.g. `ns=2;s=Oven1.Temperature`."""
        return f"ns={ns};s={self.identifier(self.by_signal(signal))}"

    def by_signal(self, signal: str) -> NodeSpec:
        """The variable serving `signal`."""
        for spec in self.nodes:
            if spec.signal == signal:
                return spec
        raise KeyError(f"{self.object_name}: no node serves signal {signal!r}")

    def signals(self) -> list[str]:
        """Every model signal the map serves."""
        return [n.signal for n in self.nodes]


def oven_map() -> NodeMap:
    """The curing oven's variables under `Oven1` (the table in hardware-sim/README.md)."""
    return NodeMap(
        "Oven1",
        (
            NodeSpec(
                "Temperature",
                "temperature",
                "Double",
                "oven air temperature",
                CELSIUS,
                (0.0, 400.0),
            ),
            NodeSpec(
                "HeaterSetpoint",
                "heater_setpoint",
                "Double",
                "heater setpoint",
                CELSIUS,
                (0.0, 300.0),
                writable=True,
            ),
            NodeSpec(
                "HeaterPower",
                "heater_power",
                "Double",
                "heater power commanded",
                PERCENT,
                (0.0, 100.0),
            ),
            NodeSpec(
                "Ambient", "ambient", "Double", "ambient (hall) temperature", CELSIUS, (-10.0, 50.0)
            ),
            NodeSpec(
                "HeaterWear",
                "heater_wear",
                "Double",
                "heater wear, 0 new .. 1 worn out",
                ONE,
                (0.0, 1.0),
            ),
            NodeSpec(
                "Running", "running", "Boolean", "oven running (heater enabled)", writable=True
            ),
            NodeSpec("BatchCount", "batch_count", "UInt32", "batches cured since commissioning"),
            NodeSpec("Mode", "mode", "String", "AUTO while running, OFF otherwise"),
        ),
    )


def bench_identifier(i: int) -> str:
    """The string part of bench signal `i`'s node id, e.g. `Bench.Signal00042`."""
    if not 0 <= i <= 99999:
        raise ValueError(f"bench signal {i} outside 0..99999")
    return f"{BENCH_OBJECT}.Signal{i:05d}"
