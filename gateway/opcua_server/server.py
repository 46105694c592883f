"""The gateway's own OPC UA server: the twin for SCADA/HMI clients, and their writes as proposals.

The address space is planned in `address_space.py` from the point definitions. Values follow the
twin through `TwinStore.add_listener`: the listener only queues the batch (it runs inside
ingest), and one task writes each change into asyncua's address space directly, which also
feeds the subscriptions; nothing awaits the network per change.

Writes: a client write to a point's value never reaches a device from here.
- A Value write to a writable point by a session whose role may propose changes (`WRITER_ROLES`)
  becomes a `ClientWrite` for `on_propose` (the policy engine, proposals.py), and the client gets
  the status the engine answers: Good when it was executed, BadRequestNotComplete when it waits
  for approval, BadOutOfRange, BadUserAccessDenied, … . The wait is bounded: `propose_timeout_s`
  per request (then BadTimeout; the engine is not interrupted, a device write must not be cut in
  half, and its outcome is in the event log), at most one write being decided per session and
  `max_proposals_in_flight` for the server (more get BadTooManyOperations at once, and a call
  that timed out keeps its place until the engine returns, so a hung engine holds a bounded
  number of them). An engine that raises or answers an unknown status gives BadInternalError;
  both are logged, at most one line per kind per interval. Points in one request are answered
  in order. Such Writes run beside the session's other requests (concurrent_writes.py), so its
  reads and subscriptions are not held up while the engine decides.
- Without `on_propose`, and for sessions whose role may not propose (viewers, anonymous), such a
  write is refused with BadUserAccessDenied, logged with user, role, node and value, and handed
  to `on_write` as a WriteRefusal. Writes to any other point are refused with BadNotWritable
  (logged only).
Refusals go through RefusalLimiters (refusals.py), BadTooManyOperations included: repeats are
coalesced into one record with a count, and a session or user that keeps writing is capped, so
a client cannot flood the event log or the log file. UserAccessLevel follows the session: a
writable point is said to be writable exactly to sessions whose grants let them propose a change
to it.

Who may connect: clients whose certificate is in the trust list (trust.py), logging in as a
configured user or a control.db user (users.py); at most `max_connections` connections at a
time (more are closed as they arrive, before they cost a session), and a connection that has not
logged in within `handshake_timeout_s` is closed. asyncua's per-client log records become
rate-limited lines of ours (quiet.py).

The certificate and key are made on first start in `pki_dir/opcua-server/` and reused after, so
clients that trusted the server keep trusting it; they are remade only when the certificate has
expired or no longer names the configured application URI.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import socket
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.address_space import AttributeService
from asyncua.server.internal_session import InternalSession
from asyncua.server.user_managers import UserManager
from cryptography.x509.oid import ExtendedKeyUsageOID

from asyncua_glue import fixes
from drivers.errors import ConfigurationError
from drivers.opcua.security import ensure_app_certificate
from gateway import __version__
from gateway.auth.rbac import Principal, check, roles_granting
from gateway.errors import GatewayError
from gateway.opcua_server import concurrent_writes, quiet
from gateway.opcua_server.address_space import (
    NAMESPACE_URI,
    add_nodes_items,
    datavalue,
    plan_address_space,
)
from gateway.opcua_server.config import OpcuaServerConfig
from gateway.opcua_server.proposals import ClientWrite, InFlight, ProposeHook, WriteAnswer
from gateway.opcua_server.refusals import RefusalLimiter, WriteRefusal
from gateway.opcua_server.trust import ClientTrust, UntrustedCertificate
from gateway.opcua_server.users import (
    ANONYMOUS,
    ANONYMOUS_ROLE,
    Account,
    AccountLookup,
    UserStore,
)
from gateway.ratelog import RateLimitedLog
from gateway.twin.model import PointDef, PointValue
from gateway.twin.store import TwinStore

log = logging.getLogger(__name__)
fixes.apply()
quiet.install()
concurrent_writes.install()

__all__ = [
    "ClientWrite",
    "GatewayUser",
    "ProposeHook",
    "TwinOpcuaServer",
    "TwinUserManager",
    "WriteAnswer",
    "WriteHook",
    "WriteRefusal",
    "default_app_uri",
]

WriteHook = Callable[[WriteRefusal], None]

PRODUCT_URI = "urn:opstwin:gateway"
CERT_DAYS = 5 * 365
# The follower yields to the loop after this many writes, so a burst of changes cannot hold
# client requests back for long.
_YIELD_EVERY = 2000
_POLICIES = {
    "None": ua.SecurityPolicyType.NoSecurity,
    "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}
_INTERNAL = User(role=UserRole.Admin)
_TYPE_MISMATCH = ua.StatusCode(ua.StatusCodes.BadTypeMismatch)
# The roles that may propose a setpoint change (DESIGN.md, RBAC): every role but `viewer`.
WRITER_ROLES = frozenset(roles_granting("propose"))  # who may propose a change (RBAC)
_READ_WRITE = ua.AccessLevel.CurrentRead.mask | ua.AccessLevel.CurrentWrite.mask
# Coalesced refusal records are written when their window ends; checked this often.
_REFUSAL_FLUSH_S = 1.0
# A failing engine (timeouts, exceptions, unknown answers) costs one line per kind this often.
_PROBLEM_LOG_S = 10.0
# Values in log lines are cut to this many characters: a client chooses them, up to megabytes.
_SHOWN_VALUE = 80
_S = ua.StatusCodes


def default_app_uri() -> str:
    """The application URI used when the config names none."""
    return f"urn:{socket.gethostname()}:opstwin:gateway"


class TwinOpcuaServer:
    """Serves the twin's points as OPC UA variables that follow the twin live."""

    def __init__(
        self,
        config: OpcuaServerConfig,
        store: TwinStore,
        points: Mapping[str, PointDef],
        *,
        pki_dir: Path,
        on_write: WriteHook | None = None,
        on_propose: ProposeHook | None = None,
        accounts: AccountLookup | None = None,
    ) -> None:
        """`on_propose` decides client writes (the policy engine; without it they are refused),
        `on_write` hears of refused ones, `accounts` finds control.db users by name."""
        if not config.users and not config.allow_anonymous and accounts is None:
            raise GatewayError(
                "OPC UA server: nobody could log in: add `opcua_server.users` (see `opstwin "
                "hash-password`) or set `opcua_server.allow_anonymous: true`"
            )
        self.config = config
        self.store = store
        self.points = dict(points)
        self.pki_dir = Path(pki_dir)
        self.on_write = on_write
        self.on_propose = on_propose
        self.accounts = accounts
        self.application_uri = config.application_uri or default_app_uri()
        # Planned now: a point set that cannot be served fails at construction, not at start.
        self.plan = plan_address_space(self.points.values())
        self.namespace_index = 2
        self.certificate_thumbprint: str | None = None
        self.changes_applied = 0
        # Read at start(); `opstwin run` may lower it to fit the process's descriptor limit.
        self.max_connections = config.max_connections
        self.trust = ClientTrust(self.pki_dir / "opcua-server", trust_all=config.trust_all_clients)
        # Refused writes to writable points (events and log), to read-only points (log only),
        # and writes refused because the engine is busy with others (events and log).
        self._denied = RefusalLimiter(status="BadUserAccessDenied")
        self._read_only = RefusalLimiter(status="BadNotWritable")
        self._busy = RefusalLimiter(status="BadTooManyOperations")
        self._in_flight = InFlight(config.max_proposals_in_flight)
        self._write_tasks: set[asyncio.Task[Any]] = set()  # Write requests taken aside
        self._engine_calls: set[asyncio.Future[WriteAnswer]] = set()
        self._problems = RateLimitedLog(log, _PROBLEM_LOG_S)
        # How client writes that went to the engine were answered, by status name.
        self.write_answers: collections.Counter[str] = collections.Counter()
        self._users: UserStore | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._writable: set[ua.NodeId] = set()
        self._endpoint = config.endpoint
        self._server: Server | None = None
        self._slots: dict[str, _Slot] = {}
        self._point_of: dict[ua.NodeId, str] = {}
        self._pending: collections.deque[list[PointValue]] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._follower: asyncio.Task[None] | None = None
        self._unlisten: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._listening = False
        self._warned: set[str] = set()

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Build the address space from the twin, then listen; GatewayError if it cannot."""
        if self._server is not None:
            raise GatewayError("OPC UA server is already started")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        cert_path, key_path, self.certificate_thumbprint = await asyncio.to_thread(
            ensure_certificate,
            self.pki_dir / "opcua-server",
            self.application_uri,
            self.config.server_name,
            _san_hosts(self.config.endpoint),
        )
        await asyncio.to_thread(self.trust.prepare)
        self._users = self._user_store()
        server = Server(user_manager=TwinUserManager(self._users, self.trust))
        self._server = server
        try:
            await self._configure(server, cert_path, key_path)
            self._follow_twin()
            await self._apply_pending()  # the snapshot, before any client can read
            await server.start()
            self._flusher = asyncio.create_task(
                self._flush_refusals(), name="opcua-server:refusals"
            )
        except BaseException as exc:
            await self._teardown()
            if isinstance(exc, OSError):
                raise GatewayError(
                    f"OPC UA server: cannot listen on {self.config.endpoint}: {exc.strerror or exc}"
                ) from exc
            raise
        self._listening = True
        self._endpoint = self._resolve_port(server)
        log.info(
            "OPC UA server on %s (%s; %s; certificate %s; %d points; at most %d connections)",
            self._endpoint,
            ", ".join(self.config.security_policies),
            "anonymous allowed" if self.config.allow_anonymous else "no anonymous access",
            self.certificate_thumbprint,
            len(self._slots),
            self.max_connections,
        )
        if self.config.trust_all_clients:
            log.warning(
                "OPC UA server: trust_all_clients is set: any client certificate is accepted "
                "(demos only; put client certificates in %s instead)",
                self.trust.trusted_dir,
            )
        else:
            log.info(
                "OPC UA server: clients are accepted when their certificate is in %s; refused "
                "ones are copied to %s",
                self.trust.trusted_dir,
                self.trust.rejected_dir,
            )

    async def stop(self) -> None:
        """Stop following the twin, close client connections and stop listening."""
        if self._server is None:
            return
        await self._teardown()
        log.info("OPC UA server on %s stopped", self._endpoint)

    async def __aenter__(self) -> TwinOpcuaServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def endpoint(self) -> str:
        """The endpoint URL; after start, a configured port 0 is replaced by the real one."""
        return self._endpoint

    @property
    def open_connections(self) -> int:
        """Client connections open now, logged in or not."""
        bserver = self._server.bserver if self._server is not None else None
        return len(bserver.clients) if bserver is not None else 0

    def nodeid(self, point_id: str) -> str:
        """The NodeId string of a point's variable, e.g. `ns=2;s=area/line/asset/signal`."""
        if point_id not in self.points:
            raise KeyError(point_id)
        return f"ns={self.namespace_index};s={point_id}"

    # -- start-up ---------------------------------------------------------------------------------

    def _user_store(self) -> UserStore:
        accounts = self.accounts
        if accounts is not None and self.config.security_policies == ["None"]:
            # The config refuses `users` with only `None` for the same reason.
            log.warning(
                "OPC UA server: control.db users cannot log in: with only the `None` security "
                "policy their passwords would cross the network in plain text; add "
                "`Basic256Sha256_SignAndEncrypt` to opcua_server.security_policies"
            )
            accounts = None
        return UserStore(
            self.config.users,
            accounts=accounts,
            allow_anonymous=self.config.allow_anonymous,
            allow_unsecured="None" in self.config.security_policies,
        )

    async def _configure(self, server: Server, cert_path: Path, key_path: Path) -> None:
        server.name = self.config.server_name
        server.manufacturer_name = "OpsTwin"
        server.product_uri = PRODUCT_URI
        server.application_type = ua.ApplicationType.Server
        await server.init()
        await server.set_application_uri(self.application_uri)
        await server.set_build_info(
            PRODUCT_URI,
            "OpsTwin",
            self.config.server_name,
            __version__,
            __version__,
            dt.datetime.now(dt.UTC),
        )
        server.set_endpoint(self.config.endpoint)
        iserver = server.iserver
        # asyncua refuses connections over the cap as they are accepted (before a session
        # exists) and closes those that have not activated a session in time: a slow-loris
        # on this port holds at most max_connections descriptors, each for handshake_timeout_s.
        iserver.max_connections = self.max_connections
        iserver.max_pending_activation_seconds = self.config.handshake_timeout_s
        # asyncua 2.1 has no hook for the session class: the instance's factory is replaced.
        iserver.create_session = self._create_session
        server.set_security_policy([_POLICIES[p] for p in self.config.security_policies])
        tokens: list[type] = []
        if self.config.users or (self._users is not None and self._users.accounts is not None):
            tokens.append(ua.UserNameIdentityToken)
        if self.config.allow_anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        await server.load_certificate(str(cert_path))
        await server.load_private_key(str(key_path))

        ns = await server.register_namespace(NAMESPACE_URI)
        if ns != self.namespace_index:
            # Clients store ns=2 in their tags; another index would break every one of them.
            raise GatewayError(f"OPC UA server: namespace {NAMESPACE_URI} got index {ns}, not 2")

        # Planning and adding nodes is plain Python at ~0.25 ms per node (three per analog point):
        # seconds for a big site. Nothing else touches the address space before the server
        # listens, so a worker thread fills it while the loop keeps serving the drivers.
        def fill() -> tuple[list[ua.AddNodesItem], list[ua.AddNodesResult]]:
            items = add_nodes_items(self.plan, ns)
            return items, server.iserver.node_mgt_service.add_nodes(items)

        items, results = await asyncio.to_thread(fill)
        for item, result in zip(items, results, strict=True):
            if not result.StatusCode.is_good():
                raise GatewayError(
                    f"OPC UA server: cannot add node {item.RequestedNewNodeId.to_string()}: "
                    f"{result.StatusCode.name}"
                )
        for var in self.plan.variables:
            point = self.points[var.point_id]
            nodeid = ua.NodeId(var.point_id, ns)
            self._slots[var.point_id] = _Slot(nodeid, var.variant_type, point.lo, point.hi)
            self._point_of[nodeid] = var.point_id
            if point.writable:
                self._writable.add(nodeid)
        iserver.attribute_service = _GuardedAttributeService(iserver.aspace, self._guard_write)

    def _create_session(
        self, name: Any, user: User | None = None, external: bool = False
    ) -> InternalSession:
        # Replaces InternalServer.create_session (asyncua 2.1 has no factory hook for it).
        assert self._server is not None
        iserver = self._server.iserver
        return _TwinSession(
            self._user_access,
            self._spawn_write,
            iserver,
            iserver.aspace,
            iserver.subscription_service,
            name,
            # asyncua's default: nobody in particular until the session is activated.
            user=user or User(role=UserRole.Anonymous),
            external=external,
        )

    def _user_access(
        self, params: ua.ReadParameters, results: list[ua.DataValue], user: User | None
    ) -> None:
        """Answer UserAccessLevel of a writable point for the session's grants, in `results`."""
        # The stored attribute says CurrentRead (what anything that bypasses this sees); a
        # session whose grants let it propose a change to the point is told it may also write.
        principal = getattr(user, "principal", None)
        if principal is None or getattr(user, "gateway_role", None) not in WRITER_ROLES:
            return
        user_access = ua.AttributeIds.UserAccessLevel
        for i, item in enumerate(params.NodesToRead):
            if item.AttributeId != user_access or item.NodeId not in self._writable:
                continue
            if check(principal, "propose", self._point_of[item.NodeId]).allowed:
                results[i] = ua.DataValue(ua.Variant(_READ_WRITE, ua.VariantType.Byte))

    def _follow_twin(self) -> None:
        # Snapshot and registration happen in one synchronous step: every change after the
        # snapshot reaches the listener, none before it is applied twice out of order.
        self._wake = asyncio.Event()
        _, values = self.store.snapshot()
        self._pending.append([values[p] for p in self._slots if p in values])
        self._unlisten = self.store.add_listener(self._on_changes)
        self._follower = asyncio.create_task(self._follow(), name="opcua-server:follow")

    def _resolve_port(self, server: Server) -> str:
        parts = urlsplit(self.config.endpoint)
        if parts.port != 0:
            return self.config.endpoint
        bserver = server.bserver
        port = bserver.port if bserver is not None else 0
        if not port and bserver is not None and bserver._server is not None:
            port = bserver._server.sockets[0].getsockname()[1]
        host = parts.hostname or ""
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        url = urlunsplit(parts._replace(netloc=netloc))
        # The endpoint descriptions were made before the socket was bound and say port 0.
        for edp in server.iserver.endpoints:
            edp.EndpointUrl = url
            edp.Server.DiscoveryUrls = [url]
        server.set_endpoint(url)
        return url

    async def _teardown(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        self._pending.clear()
        server, self._server = self._server, None
        if server is not None and self._listening:
            self._listening = False
            await server.stop()
        await self._settle_writes()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        # No client can write any more: what was still being coalesced is recorded now.
        self._emit_refusals(
            self._denied.flush_all(), self._read_only.flush_all(), self._busy.flush_all()
        )
        self._slots.clear()
        self._point_of.clear()
        self._writable.clear()

    # -- following the twin -----------------------------------------------------------------------

    def _on_changes(self, changes: list[PointValue]) -> None:
        """Queue a batch of twin changes (runs inside TwinStore.ingest: must stay cheap)."""
        if threading.get_ident() != self._loop_thread and self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_changes, changes)
            return
        self._pending.append(changes)
        if self._wake is not None:
            self._wake.set()

    async def _follow(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._apply_pending()
            except Exception:
                log.exception("OPC UA server: applying twin changes failed; continuing")

    async def _apply_pending(self) -> None:
        assert self._server is not None
        write = self._server.iserver.aspace.write_attribute_value
        value_attr = ua.AttributeIds.Value
        slots = self._slots
        pending = self._pending
        now = time.time()
        since_yield = 0
        while pending:
            for change in pending.popleft():
                slot = slots.get(change.point_id)
                if slot is None:
                    continue
                dv = datavalue(
                    change,
                    slot.vtype,
                    lo=slot.lo,
                    hi=slot.hi,
                    last_source=slot.last_source,
                    now=now,
                )
                if change.source_ts is not None:
                    slot.last_source = dv.SourceTimestamp
                result = await write(slot.nodeid, value_attr, dv)
                if not result.is_good() or dv.StatusCode == _TYPE_MISMATCH:
                    self._warn_once(change, result)
                self.changes_applied += 1
                since_yield += 1
                if since_yield >= _YIELD_EVERY:
                    since_yield = 0
                    await asyncio.sleep(0)

    def _warn_once(self, change: PointValue, result: ua.StatusCode) -> None:
        if change.point_id in self._warned:
            return
        self._warned.add(change.point_id)
        point = self.points[change.point_id]
        log.warning(
            "OPC UA server: %s (%s) holds %r, which its OPC UA variable cannot carry; it is "
            "served as Bad (%s). Was the point declared with its raw type but scaled?",
            change.point_id,
            point.datatype,
            change.value,
            result.name if not result.is_good() else "BadTypeMismatch",
        )

    # -- client writes ----------------------------------------------------------------------------

    async def _guard_write(
        self, wv: ua.WriteValue, user: User, started: float
    ) -> ua.StatusCode | None:
        """The result of a client write to a point, or None to let asyncua handle it.

        `started` is when the request began (loop time): its proposals share one timeout.
        """
        point_id = self._point_of.get(wv.NodeId)
        if (
            point_id is None
            or wv.AttributeId != ua.AttributeIds.Value
            or user.role is UserRole.Admin
        ):
            return None
        variant = wv.Value.Value if wv.Value is not None else None
        value = variant.Value if variant is not None else None
        if not self.points[point_id].writable:
            self._refuse(self._read_only, user, point_id, value)
            return ua.StatusCode(_S.BadNotWritable)
        if self.on_propose is None or getattr(user, "gateway_role", None) not in WRITER_ROLES:
            self._refuse(self._denied, user, point_id, value)
            return ua.StatusCode(_S.BadUserAccessDenied)
        if wv.IndexRange:
            # Points are scalars: a part of one is not a value the engine could propose.
            return ua.StatusCode(_S.BadIndexRangeInvalid)
        return await self._propose(point_id, value, user, started)

    async def _propose(
        self, point_id: str, value: Any, user: User, started: float
    ) -> ua.StatusCode:
        """Hand one write to the engine and return the status its answer names."""
        assert self.on_propose is not None
        session = str(getattr(user, "session", "?"))
        if self._in_flight.take(session) is not None:
            self._refuse(self._busy, user, point_id, value)
            return self._answer(_S.BadTooManyOperations, "BadTooManyOperations")
        # From here the session's slot is held until the engine returns (_engine_returned), or
        # freed below when the engine is not called at all.
        try:
            write = ClientWrite(
                point_id=point_id,
                value=value,
                user=user.name or ANONYMOUS,
                role=str(getattr(user, "gateway_role", ANONYMOUS_ROLE)),
                principal=self._principal_now(user),
                session=session,
                client=str(getattr(user, "client", "?")),
            )
        except BaseException:
            self._in_flight.release(session)
            raise
        remaining = started + self.config.propose_timeout_s - asyncio.get_running_loop().time()
        if remaining <= 0:
            # Earlier points of the same request used up its time: the client has given up.
            self._in_flight.release(session)
            self._problem("timeout", write, "not proposed: its request ran out of time")
            return self._answer(_S.BadTimeout, "BadTimeout")
        try:
            call: asyncio.Future[WriteAnswer] = asyncio.ensure_future(self.on_propose(write))
        except Exception as exc:
            self._in_flight.release(session)
            self._problem("error", write, "on_propose failed", exc)
            return self._answer(_S.BadInternalError, "BadInternalError")
        self._engine_calls.add(call)
        call.add_done_callback(lambda done: self._engine_returned(done, write))
        try:
            # Shielded: a timeout answers the client, it does not cut the engine short.
            answer = await asyncio.wait_for(asyncio.shield(call), remaining)
        except asyncio.CancelledError:
            # The request is dropped (the server stops): the engine goes on without a listener.
            call.add_done_callback(lambda done: self._decided_late(done, write, "dropped"))
            raise
        except TimeoutError:
            call.add_done_callback(lambda done: self._decided_late(done, write, "BadTimeout"))
            self._problem(
                "timeout",
                write,
                f"no answer within {self.config.propose_timeout_s:g} s (opcua_server."
                "propose_timeout_s); the engine may still decide it: see the event log",
            )
            return self._answer(_S.BadTimeout, "BadTimeout")
        except Exception as exc:
            self._problem("error", write, "the engine failed", exc)
            return self._answer(_S.BadInternalError, "BadInternalError")
        return self._status_of(answer, write)

    def _status_of(self, answer: Any, write: ClientWrite) -> ua.StatusCode:
        name = getattr(answer, "status", None) if isinstance(answer, WriteAnswer) else None
        code = _status_code(name)
        if code is None:
            self._problem(
                "answer",
                write,
                f"the engine answered {_shown(answer)}: not a WriteAnswer naming a status of "
                "asyncua's ua.StatusCodes",
            )
            return self._answer(_S.BadInternalError, "BadInternalError")
        assert isinstance(name, str)
        log.debug(
            "OPC UA write by %r (role %s) of %s to %s, session %s from %s: %s (%s; proposal %s)",
            write.user,
            write.role,
            _shown(write.value),
            self.nodeid(write.point_id),
            write.session,
            write.client,
            name,
            answer.text,
            answer.proposal_id,
        )
        return self._answer(code, name)

    def _answer(self, code: int, name: str) -> ua.StatusCode:
        self.write_answers[name] += 1
        return ua.StatusCode(code)

    def _principal_now(self, user: User) -> Principal | None:
        account = getattr(user, "account", None)
        if self._users is None or not isinstance(account, Account):
            return getattr(user, "principal", None)
        return self._users.current_principal(account)

    def _engine_returned(self, call: asyncio.Future[WriteAnswer], write: ClientWrite) -> None:
        """Free the session's slot when the engine returns, answered in time or not."""
        self._engine_calls.discard(call)
        self._in_flight.release(write.session)

    def _decided_late(
        self, call: asyncio.Future[WriteAnswer], write: ClientWrite, answered: str
    ) -> None:
        """Log what the engine decided for a write whose client was answered without it."""
        if call.cancelled():
            return
        exc = call.exception()  # also marks it retrieved: nobody else waits for it now
        if exc is not None:
            self._problem("error", write, "the engine failed after the client was answered", exc)
        else:
            answer = call.result()
            log.info(
                "OPC UA write by %r to %s, already answered %s, was decided: %s (%s)",
                write.user,
                self.nodeid(write.point_id),
                answered,
                answer.status if isinstance(answer, WriteAnswer) else _shown(answer),
                answer.text if isinstance(answer, WriteAnswer) else "not a WriteAnswer",
            )

    def _spawn_write(self, session: _TwinSession, request: Coroutine[Any, Any, Any]) -> bool:
        """Take a Write request aside if it may wait for the engine; whether it was taken."""
        user = session.user
        if (
            self.on_propose is None
            or self._server is None
            or getattr(user, "gateway_role", None) not in WRITER_ROLES
        ):
            return False
        task = asyncio.create_task(request, name=f"opcua-server:write {session.session_id}")
        self._write_tasks.add(task)
        task.add_done_callback(self._write_tasks.discard)
        return True

    async def _settle_writes(self) -> None:
        """At stop: drop Write requests of gone clients; give the engine time to finish."""
        for task in list(self._write_tasks):
            task.cancel()
        if self._write_tasks:
            await asyncio.gather(*self._write_tasks, return_exceptions=True)
        calls = list(self._engine_calls)
        if not calls:
            return
        # A decision may be writing to a device: let it end (and roll back if it must).
        _, pending = await asyncio.wait(calls, timeout=self.config.propose_timeout_s)
        if pending:
            log.warning(
                "OPC UA server: %d client writes were still being decided %g s after stop; "
                "cancelled",
                len(pending),
                self.config.propose_timeout_s,
            )
            for call in pending:
                call.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _problem(
        self, kind: str, write: ClientWrite, what: str, exc: BaseException | None = None
    ) -> None:
        """Log a failure of the engine call, at most one line per kind per interval."""
        trace = "".join(traceback.format_exception(exc)) if exc is not None else ""
        self._problems.log(
            logging.ERROR if exc is not None else logging.WARNING,
            kind,
            "OPC UA write by %r (role %s) of %s to %s, session %s from %s: %s%s",
            write.user,
            write.role,
            _shown(write.value),
            self.nodeid(write.point_id),
            write.session,
            write.client,
            what,
            f"\n{trace}" if trace else "",
        )

    def _refuse(self, limiter: RefusalLimiter, user: User, point_id: str, value: Any) -> None:
        records = limiter.record(
            session=getattr(user, "session", "?"),
            client=getattr(user, "client", "?"),
            user=user.name or ANONYMOUS,
            role=str(getattr(user, "gateway_role", ANONYMOUS_ROLE)),
            point_id=point_id,
            value=value,
        )
        if limiter is self._read_only:
            self._emit_refusals([], records, [])
        elif limiter is self._busy:
            self._emit_refusals([], [], records)
        else:
            self._emit_refusals(records, [], [])

    async def _flush_refusals(self) -> None:
        while True:
            await asyncio.sleep(_REFUSAL_FLUSH_S)
            self._emit_refusals(self._denied.flush(), self._read_only.flush(), self._busy.flush())

    def _emit_refusals(
        self,
        denied: list[WriteRefusal],
        read_only: list[WriteRefusal],
        busy: list[WriteRefusal],
    ) -> None:
        for refusal in read_only:
            log.info(*_refusal_line(refusal, self._node_name(refusal), "a read-only point"))
        for refusal in [*denied, *busy]:
            log.warning(*_refusal_line(refusal, self._node_name(refusal), self._why(refusal)))
            if self.on_write is None:
                continue
            try:
                self.on_write(refusal)
            except Exception:
                # Bounded like the records themselves: the limiter caps how often this runs.
                log.exception("OPC UA server: on_write hook failed for %s", refusal.point_id)

    def _why(self, refusal: WriteRefusal) -> str:
        if refusal.status == "BadTooManyOperations":
            return (
                "the policy engine was still deciding a write of the same session, or "
                f"{self._in_flight.cap} in all (opcua_server.max_proposals_in_flight)"
            )
        if self.on_propose is None:
            return "no policy engine takes OPC UA writes on this gateway"
        return f"role {refusal.role} may not propose setpoint changes"

    def _node_name(self, refusal: WriteRefusal) -> str:
        if refusal.point_id is None:
            return f"{refusal.points} points"
        return f"ns={self.namespace_index};s={refusal.point_id}"


def _status_code(name: Any) -> int | None:
    """The code of a status name of ua.StatusCodes (`"BadOutOfRange"`), or None if unknown."""
    if not isinstance(name, str) or not name[:1].isupper():
        return None  # also keeps dunders and other attributes of the class out
    code = getattr(ua.StatusCodes, name, None)
    return code if type(code) is int else None


def _shown(value: Any) -> str:
    """`repr(value)`, cut for a log line."""
    text = repr(value)
    if len(text) <= _SHOWN_VALUE:
        return text
    return f"{text[: _SHOWN_VALUE - 3]}... ({len(text)} characters)"


def _refusal_line(refusal: WriteRefusal, node: str, why: str) -> tuple[object, ...]:
    """The log call (format and args) for one refusal record."""
    status = refusal.status
    where = f"session {', '.join(refusal.sessions)} from {', '.join(refusal.clients)}"
    span = refusal.last_ts - refusal.first_ts
    if refusal.suppressed:
        return (
            "OPC UA writes refused (%s): user %r (role %s) made %d more write attempts to %s "
            "within %.0f s (%s); not recorded one by one: each session and user gets a few "
            "records a minute",
            status,
            refusal.user,
            refusal.role,
            refusal.count,
            node,
            span,
            where,
        )
    repeats = f" ({refusal.count} attempts within {span:.0f} s; the last shown)"
    return (
        "OPC UA write refused (%s): user %r (role %s) wrote %s to %s%s, %s; %s",
        status,
        refusal.user,
        refusal.role,
        _shown(refusal.value),
        node,
        repeats if refusal.count > 1 else "",
        where,
        why,
    )


# -- asyncua glue -------------------------------------------------------------------------------


@dataclass
class GatewayUser(User):
    """An asyncua session user that also carries the gateway role.

    asyncua's role is always `User`, never `Admin`: asyncua's Admin may add and delete nodes,
    which no client of the twin may do, whatever its gateway role.
    """

    role: UserRole = UserRole.User
    gateway_role: str = ANONYMOUS_ROLE
    session: str = "?"  # the server's name for the session, e.g. `#12`
    client: str = "?"  # the client's IP address
    account: Account | None = None  # who logged in (None: not through a UserStore)

    @property
    def principal(self) -> Principal | None:
        """The session's Principal as it logged in (None: anonymous)."""
        return self.account.principal if self.account is not None else None


@dataclass(frozen=True, slots=True)
class _LoginContext:
    address: str
    session: str


class TwinUserManager(UserManager):
    """asyncua's hook for session activation, answered from a trust list and a UserStore."""

    def __init__(self, store: UserStore, trust: ClientTrust) -> None:
        self.store = store
        self.trust = trust
        # Set by the session around each activation: asyncua does not pass it to get_user.
        self.context: _LoginContext | None = None

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        """Return the session's user, or None to refuse the login (BadUserAccessDenied).

        Raises ServiceError(BadCertificateUntrusted, …) for a client certificate not trusted.
        """
        context = self.context or _LoginContext("an unknown address", "?")
        # asyncua passes the secure channel's peer certificate with username and anonymous
        # tokens: it is empty (b"") exactly when the channel is neither signed nor encrypted.
        # That is how a `None` channel is refused when the `None` policy is not configured:
        # asyncua lets any client open one (to read the endpoints) and then create a session on
        # it, whatever the configured policies. It is also the certificate to check against the
        # trust list: the one the client proved it holds the key of, whatever it claimed in
        # CreateSession. Checked before the password, so an untrusted client costs no argon2.
        if certificate:
            try:
                self.trust.check(certificate)
            except UntrustedCertificate as exc:
                raise ServiceError(getattr(ua.StatusCodes, exc.status)) from exc
        account = self.store.authenticate(
            username, password, secured=bool(certificate), address=context.address
        )
        if account is None:
            return None
        return GatewayUser(
            name=account.username,
            gateway_role=account.role,
            session=context.session,
            client=context.address,
            account=account,
        )


class _TwinSession(InternalSession):
    """asyncua's session, telling the user manager who logs in, reading UserAccessLevel, and
    offering its Write requests to run aside (concurrent_writes.py)."""

    def __init__(
        self,
        user_access: Callable[[ua.ReadParameters, list[ua.DataValue], User | None], None],
        spawn: Callable[[_TwinSession, Coroutine[Any, Any, Any]], bool],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._user_access = user_access
        self._spawn = spawn

    def spawn_write(self, request: Coroutine[Any, Any, Any]) -> bool:
        """Run a Write request as a task of its own if the server wants it; whether it does."""
        return self._spawn(self, request)

    def activate_session(
        self, params: ua.ActivateSessionParameters, peer_certificate: bytes | None
    ) -> ua.ActivateSessionResult:
        manager = self.iserver.user_manager
        if not isinstance(manager, TwinUserManager):
            return super().activate_session(params, peer_certificate)
        # `name` is the transport's peer name: (host, port, …) for TCP.
        peer = self.name
        address = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        # Synchronous from here to get_user: no other login can interleave on the loop.
        manager.context = _LoginContext(address, f"#{self.session_id.Identifier}")
        try:
            return super().activate_session(params, peer_certificate)
        finally:
            manager.context = None

    async def read(self, params: ua.ReadParameters) -> list[ua.DataValue]:
        results = await super().read(params)
        self._user_access(params, results, self.user)
        return results


class _GuardedAttributeService(AttributeService):
    """asyncua's attribute service with the twin's write rules in front of it."""

    def __init__(
        self,
        aspace: Any,
        guard: Callable[[ua.WriteValue, User, float], Coroutine[Any, Any, ua.StatusCode | None]],
    ) -> None:
        super().__init__(aspace)
        self._guard = guard

    async def write(
        self, params: ua.WriteParameters, user: User | None = None
    ) -> list[ua.StatusCode]:
        user = user or _INTERNAL
        started = asyncio.get_running_loop().time()
        results: list[ua.StatusCode] = []
        for wv in params.NodesToWrite:
            refused = await self._guard(wv, user, started)
            if refused is not None:
                results.append(refused)
            else:
                one = ua.WriteParameters(NodesToWrite=[wv])
                results.extend(await super().write(one, user=user))
        return results


@dataclass(slots=True)
class _Slot:
    nodeid: ua.NodeId
    vtype: ua.VariantType
    lo: float | None
    hi: float | None
    last_source: dt.datetime | None = None


# -- certificate ----------------------------------------------------------------------------------


def ensure_certificate(
    folder: Path, application_uri: str, common_name: str, hosts: list[str]
) -> tuple[Path, Path, str]:
    """Return (cert, key, SHA-1 thumbprint), making them in `folder` on first use (blocking)."""
    try:
        made = ensure_app_certificate(
            folder,
            application_uri,
            common_name=common_name,
            hosts=hosts,
            usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        )
    except ConfigurationError as exc:
        raise GatewayError(f"cannot read the OPC UA server's private key: {exc}") from exc
    # Lower-case hex, as the server has always logged and reported it.
    return made.cert, made.key, made.thumbprint.lower()


def _san_hosts(endpoint: str) -> list[str]:
    hosts = [socket.gethostname(), "localhost"]
    host = urlsplit(endpoint).hostname
    if host and host not in ("0.0.0.0", "::") and host not in hosts:
        hosts.append(host)
    return hosts
