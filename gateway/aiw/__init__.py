"""The AIW protocol (DESIGN §5): what AI agents and the cloud see of the twin."""
