"""Modbus TCP/RTU driver: pure codec and read planner, pymodbus transport, supervised polling."""

from drivers.modbus.codec import (
    Address,
    DataType,
    Format,
    Order,
    Table,
    decode,
    encode,
    parse_address,
)
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.options import ModbusOptions
from drivers.modbus.plan import Block, plan_reads, split_block
from drivers.modbus.point import ModbusPoint, PointError, validate_point

__all__ = [
    "Address",
    "Block",
    "DataType",
    "Format",
    "ModbusDriver",
    "ModbusOptions",
    "ModbusPoint",
    "Order",
    "PointError",
    "Table",
    "decode",
    "encode",
    "parse_address",
    "plan_reads",
    "split_block",
    "validate_point",
]
