"""Errors raised by drivers; each names the device and, where it applies, the address."""

from __future__ import annotations


class DriverError(Exception):
    """Root of every error a driver raises."""


class ConfigurationError(DriverError):
    """A point or device option the driver cannot work with."""


class PointError(ConfigurationError, ValueError):
    """A point definition the driver cannot work with; `field` names the offending key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class NotConnectedError(DriverError):
    """The request needs a connection the driver does not have right now."""


class ConnectionLostError(DriverError):
    """The connection dropped while the request was pending."""


class DeviceResponseError(DriverError):
    """The device answered, but with an error (exception code, bad status)."""


class WriteRejectedError(DriverError):
    """A write the driver refused to send: not writable, outside the point's limits, bad type."""


class WriteVerifyError(DriverError):
    """The value read back after a write differs from the value written."""
