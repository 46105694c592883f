"""OPC UA client driver: subscriptions (or polling) with a keep-alive watchdog, verified writes."""

from drivers.opcua.convert import (
    ConversionError,
    sample_of,
    source_time,
    status_name,
    status_quality,
    to_variant,
    twin_value,
    values_match,
    variant_type_of,
)
from drivers.opcua.driver import OpcuaDriver
from drivers.opcua.options import OpcuaOptions
from drivers.opcua.point import NodeRef, OpcuaPoint, PointError, parse_node_id, validate_point
from drivers.opcua.watchdog import SubscriptionWatchdog, silence_limit_s

__all__ = [
    "ConversionError",
    "NodeRef",
    "OpcuaDriver",
    "OpcuaOptions",
    "OpcuaPoint",
    "PointError",
    "SubscriptionWatchdog",
    "parse_node_id",
    "sample_of",
    "silence_limit_s",
    "source_time",
    "status_name",
    "status_quality",
    "to_variant",
    "twin_value",
    "validate_point",
    "values_match",
    "variant_type_of",
]
