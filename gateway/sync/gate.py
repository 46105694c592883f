"""`cmd/proposal` into a running gateway: the token resolved as over HTTP (control.db's API
tokens, a refusal audited as `auth.refused` and rationed), the change through the policy
engine like any other proposal (`source: mqtt`).

The broker is one peer however many cloud clients publish through it, so refused tokens are
rationed under one key: a cloud service looping with a revoked token gets "retry in N s"
replies after 30 refusals a minute instead of one audit row per attempt.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from gateway.aiw.auth import LoginRation, audit
from gateway.audit.chain import AuditEntry
from gateway.auth.rbac import Principal
from gateway.control.users import AuthError
from gateway.errors import GatewayError
from gateway.sync.payloads import ProposalCommand
from gateway.sync.service import CommandRefused, ProposalGate

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["gateway_gate"]

_PEER = "mqtt"  # the ration's one key: every command arrives from the broker


def gateway_gate(gateway: Gateway, ration: LoginRation | None = None) -> ProposalGate:
    """The gate of `gateway`: read at each call, since the engine and accounts start later."""
    tokens = ration or LoginRation(max_failures=30, window_s=60.0)

    async def authenticate(token: str) -> Principal:
        accounts = gateway.accounts
        if accounts is None:
            raise GatewayError("the gateway's accounts are not open (starting or stopping)")
        wait = tokens.retry_after(_PEER)
        if wait is not None:
            seconds = math.ceil(wait)
            raise CommandRefused(f"too many refused tokens; retry in {seconds} s")
        tokens.begin(_PEER)
        ok = False
        try:
            principal = await accounts.authenticate_token_async(token)
            ok = True
        except AuthError as exc:
            _audit_refusal(gateway, exc)
            raise
        except GatewayError:
            ok = True  # control.db cannot be read: not the client's failure
            raise
        finally:
            tokens.end(_PEER, ok=ok)
        return principal

    async def propose(principal: Principal, command: ProposalCommand) -> Any:
        engine = gateway.engine
        if engine is None:
            raise GatewayError("the policy engine is not running (starting or stopping)")
        return await engine.propose(
            principal,
            command.point,
            command.value,
            reason=command.reason,
            source="mqtt",
            # QoS 1 may deliver a command twice: the second is the same change, not another.
            idempotency_key=f"mqtt:{principal.name}:{command.request_id}",
        )

    return ProposalGate(authenticate, propose)


def _audit_refusal(gateway: Gateway, exc: AuthError) -> None:
    audit(
        gateway,
        lambda: AuditEntry(
            ts=time.time(),
            actor=(exc.principal or "unknown")[:128],
            actor_kind="token",
            action="auth.refused",
            decision="denied",
            reason=exc.why,
            details={"via": "mqtt"},
        ),
    )
