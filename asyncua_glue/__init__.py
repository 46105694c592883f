"""What the gateway's OPC UA server and the simulated PLC both need from asyncua, kept once.

Both serve an address space with asyncua and met the same gaps in it: a fix for asyncua 2.1, a
DataValue that subscriptions may keep without copying, the standard properties of an analog
variable. The plant may not import the gateway, nor the gateway the plant (DESIGN.md §2), so
these live here, in a package that imports only asyncua and the standard library: two copies of
a workaround drift apart within weeks.

Nothing is imported here, so `asyncua_glue.units` loads without asyncua.
"""
