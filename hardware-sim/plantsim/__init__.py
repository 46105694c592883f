"""The simulated plant: process physics behind real protocol servers, with fault injection.

Tests start devices in-process on free ports; the demo runs `python -m plantsim`. Imports
nothing from `gateway` or `drivers`: it is the plant, not the product.
"""

from __future__ import annotations

from .device_base import Device, Model
from .faults import Faults, ModbusFaults, OpcuaFaults
from .meter import MeterModel, MeterParams
from .modbus.bench import BenchModbusDevice, BenchModel
from .modbus.modbus_device import ModbusDevice
from .opcua.opcua_device import OpcuaDevice
from .oven import OvenModel, OvenParams
from .plant import MeterDevice, OvenDevice, Plant, TankDevice
from .tank import TankModel, TankParams

__all__ = [
    "BenchModbusDevice",
    "BenchModel",
    "Device",
    "Faults",
    "MeterDevice",
    "MeterModel",
    "MeterParams",
    "ModbusDevice",
    "ModbusFaults",
    "Model",
    "OpcuaDevice",
    "OpcuaFaults",
    "OvenDevice",
    "OvenModel",
    "OvenParams",
    "Plant",
    "TankDevice",
    "TankModel",
    "TankParams",
]
