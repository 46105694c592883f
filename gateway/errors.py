"""The gateway's error hierarchy: one root, a subclass per kind of failure a user tells apart."""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A site config that cannot be used; the message names the file, key path and line."""


class StoreError(GatewayError):
    """The twin store cannot do what was asked (closed, unknown point, bad query)."""


class DatabaseFault(StoreError):
    """The twin database itself failed: corrupt, full, read-only, an I/O error."""

    def __init__(self, message: str, *, corrupt: bool = False) -> None:
        super().__init__(message)
        self.corrupt = corrupt


class UnknownPointError(StoreError, KeyError):
    """A point id the twin does not declare."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown point"


class DeviceError(GatewayError):
    """A device-side failure surfaced to a gateway caller (write refused, read-back mismatch)."""
