"""Engineering units as OPC UA encodes them: UNECE Recommendation 20 codes (OPC 10000-8 §5.6.3).

Pure: no asyncua, so modules that describe a node map without serving it may use it.
"""

from __future__ import annotations

# OPC UA Part 8: EUInformation.NamespaceUri for units that carry a UNECE common code.
UNECE_NAMESPACE = "http://www.opcfoundation.org/UA/units/un/cefact"


def unece_unit_id(code: str) -> int:
    """Return the EUInformation UnitId of a UNECE common code: its ASCII bytes, big-endian."""
    if not 1 <= len(code) <= 3 or not code.isascii():
        raise ValueError(f"UNECE common codes have 1-3 ASCII characters, got {code!r}")
    unit_id = 0
    for char in code:
        unit_id = (unit_id << 8) | ord(char)
    return unit_id
