"""Modbus side of the simulator: register maps and codec, PDUs and frames, the TCP server."""
