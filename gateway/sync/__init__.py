"""Cloud sync over MQTT (DESIGN §6): the wire contract (`payloads`), one paho connection on the
event loop (`mqtt`), and the store-and-forward task (`service`)."""

from gateway.sync.service import HOLD, ProposalGate, SyncService

__all__ = ["HOLD", "ProposalGate", "SyncService"]
