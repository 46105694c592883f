"""The gateway's own OPC UA server: the twin for SCADA/HMI clients, whose writes to writable
points become proposals for the policy engine (`proposals.py` is the contract between them).

`TwinOpcuaServer` is imported lazily: the site config imports this package for its config model,
and loading a config should not pay for importing asyncua.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.opcua_server.config import OpcuaServerConfig, OpcuaUser
from gateway.opcua_server.users import hash_password

if TYPE_CHECKING:
    from gateway.opcua_server.server import TwinOpcuaServer

__all__ = ["OpcuaServerConfig", "OpcuaUser", "TwinOpcuaServer", "hash_password"]


def __getattr__(name: str) -> Any:
    if name == "TwinOpcuaServer":
        from gateway.opcua_server.server import TwinOpcuaServer

        return TwinOpcuaServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
