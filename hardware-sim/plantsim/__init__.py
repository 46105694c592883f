"""The simulated plant: process physics behind real protocol servers, with fault injection.

Tests start devices in-process on free ports; the demo runs `python -m plantsim`. Imports
nothing from `gateway` or `drivers`: it is the plant, not the product.
"""

from __future__ import annotations

from .device import Device, Model
from .devices import MeterDevice, OvenDevice, Plant, TankDevice
from .faults import Faults, ModbusFaults, OpcUaFaults
from .meter import MeterModel, MeterParams
from .modbus.device import ModbusDevice
from .opcua.device import OpcUaDevice
from .oven import OvenModel, OvenParams
from .tank import TankModel, TankParams

__all__ = [
    "Device",
    "Faults",
    "MeterDevice",
    "MeterModel",
    "MeterParams",
    "ModbusDevice",
    "ModbusFaults",
    "Model",
    "OpcUaDevice",
    "OpcUaFaults",
    "OvenDevice",
    "OvenModel",
    "OvenParams",
    "Plant",
    "TankDevice",
    "TankModel",
    "TankParams",
]
