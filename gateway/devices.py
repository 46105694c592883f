"""Turn the site config into twin point definitions and protocol drivers."""

from __future__ import annotations

from pathlib import Path

from drivers.base import Driver
from drivers.modbus import ModbusDriver, ModbusPoint
from drivers.modbus.options import ModbusOptions
from drivers.opcua import OpcuaDriver, OpcuaPoint
from drivers.opcua.options import OpcuaOptions
from gateway.config.model import (
    DeviceConfig,
    HttpDeviceConfig,
    HttpPointConfig,
    ModbusDeviceConfig,
    ModbusPointConfig,
    OpcuaDeviceConfig,
    OpcuaPointConfig,
    SiteConfig,
)
from gateway.twin.model import PointDef

__all__ = [
    "build_driver",
    "build_drivers",
    "modbus_driver",
    "modbus_point",
    "opcua_driver",
    "opcua_point",
    "point_defs",
    "twin_datatype",
]


def point_defs(config: SiteConfig) -> list[PointDef]:
    """Every declared point, enabled device or not (a disabled device's points stay in the twin)."""
    return [
        PointDef(
            id=p.id,
            device=d.name,
            datatype=twin_datatype(p),
            unit=p.unit,
            lo=p.range.lo if p.range else None,
            hi=p.range.hi if p.range else None,
            writable=p.writable,
            deadband=p.deadband,
            description=p.description,
        )
        for d in config.devices
        for p in d.points
    ]


def twin_datatype(point: ModbusPointConfig | OpcuaPointConfig | HttpPointConfig) -> str:
    """The datatype of the value the twin holds: the engineering value, not the raw register.

    A Modbus int16 with scale 0.01 carries 18.09 °C, so the twin (and the OPC UA variable
    serving it) holds a float64.
    """
    scaled = isinstance(point, ModbusPointConfig) and (point.scale != 1 or point.offset != 0)
    if scaled and point.datatype not in ("bool", "string", "float32", "float64"):
        return "float64"
    return point.datatype


def build_drivers(config: SiteConfig) -> dict[str, Driver]:
    """One driver per enabled Modbus or OPC UA device, keyed by device name (`http` devices
    are pushed to, not read)."""
    drivers: dict[str, Driver] = {}
    for device in config.devices:
        driver = build_driver(device, pki_dir=config.storage.pki_path)
        if driver is not None:
            drivers[device.name] = driver
    return drivers


def build_driver(device: DeviceConfig, *, pki_dir: Path | None) -> Driver | None:
    """The driver of one device, or None for a disabled or `http` device (pushed to, not read);
    raises the driver's validation errors, does no I/O. Start-up and a reload share it."""
    if not device.enabled or isinstance(device, HttpDeviceConfig):
        return None
    if isinstance(device, ModbusDeviceConfig):
        return modbus_driver(device)
    return opcua_driver(device, pki_dir=pki_dir)


def modbus_point(point: ModbusPointConfig, options: ModbusOptions) -> ModbusPoint:
    """The driver's view of a configured point; raises the driver's own validation errors."""
    return ModbusPoint(
        key=point.id,
        address=point.address,
        datatype=point.datatype,
        length=point.length,
        byte_order=point.byte_order,
        word_order=point.word_order,
        scale=point.scale,
        offset=point.offset,
        lo=point.range.lo if point.range else None,
        hi=point.range.hi if point.range else None,
        writable=point.writable,
    )


def opcua_point(point: OpcuaPointConfig, options: OpcuaOptions) -> OpcuaPoint:
    """The OPC UA driver's view of a configured point; raises its validation errors."""
    return OpcuaPoint(
        key=point.id,
        node_id=point.address,
        lo=point.range.lo if point.range else None,
        hi=point.range.hi if point.range else None,
        writable=point.writable,
        # Unset on the point: the device's `deadband` option applies to the server-side filter.
        deadband=point.deadband if "deadband" in point.model_fields_set else None,
        sampling_interval_ms=point.sampling_interval_ms,
        queue_size=point.queue_size,
        # Checked against the node's DataType at each connect: a lossy mismatch is BAD.
        datatype=point.datatype,
    )


def opcua_driver(device: OpcuaDeviceConfig, *, pki_dir: Path | None) -> Driver:
    """The driver of one OPC UA server; raises the driver's validation errors, does no I/O."""
    points = [opcua_point(p, device.options) for p in device.points]
    return OpcuaDriver(device.name, device.endpoint, device.options, points, pki_dir=pki_dir)


def modbus_driver(device: ModbusDeviceConfig, *, pki_dir: Path | None = None) -> Driver:
    """The driver of one Modbus device; raises the driver's validation errors, does no I/O."""
    del pki_dir  # Modbus has no security layer
    points = [modbus_point(p, device.options) for p in device.points]
    return ModbusDriver(device.name, device.endpoint, device.options, points)
