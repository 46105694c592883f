"""The OPC UA side of the plant: node maps, an asyncua server with fault hooks, the device."""
