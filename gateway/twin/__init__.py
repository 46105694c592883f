"""The digital twin: in-memory current state in front of a SQLite event log and history."""
