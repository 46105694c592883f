"""One MQTT connection, a paho-mqtt 2.x client driven by the asyncio event loop.

paho does its own socket I/O but lets an external loop say when: its socket callbacks register
the socket with `loop.add_reader` / `add_writer`, which call `loop_read` / `loop_write` when the
socket is ready, and a 1 s timer calls `loop_misc` (keep-alive pings). No thread per message and
no polling: a publish queues the packet and registers the writer; the loop writes it when the
socket can take it. (paho's own `examples/loop_asyncio.py` is the model.)

The one blocking step is opening the connection: paho resolves the name, connects TCP and does
the TLS handshake synchronously (up to `connect_timeout`), so `open()` runs that in a worker
thread; the socket callbacks paho calls there are handed to the loop thread. Everything else
happens on the loop thread.

A connection is used once: a new session makes a new `MqttConnection` (and paho client). paho
would otherwise resend the previous connection's unacknowledged messages on reconnect, while
the sync resends from its cursor under a new session id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from gateway.errors import GatewayError

log = logging.getLogger(__name__)

__all__ = ["ConnectionLost", "Message", "MqttConnection", "MqttError"]

MISC_INTERVAL_S = 1.0  # keep-alive bookkeeping; paho's example uses the same


class MqttError(GatewayError):
    """The broker could not be reached, refused us, or the connection broke."""


class ConnectionLost(MqttError):
    """The connection is gone (a publish on it cannot be sent)."""


Message = paho.MQTTMessage
MessageHandler = Callable[[paho.MQTTMessage], None]
PublishedHandler = Callable[[int], None]


class MqttConnection:
    """A single MQTT connection; `open()` it, publish and subscribe, then `close()` or `abort()`.

    `lost` resolves (with a sentence saying why) once the connection is gone for any reason.
    `will` is published retained (QoS 1) by the broker if the connection dies without a
    DISCONNECT.
    `on_published(mid)` is called on the loop thread when a QoS 1 publish is acknowledged
    (PUBACK); `on_message(msg)` for every inbound message. Neither may raise.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        keepalive_s: int,
        will: tuple[str, bytes] | None = None,
        clean_session: bool = True,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        tls_check_hostname: bool = True,
        on_message: MessageHandler | None = None,
        on_published: PublishedHandler | None = None,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._on_message = on_message
        self._on_published = on_published
        self.lost: asyncio.Future[str] = self._loop.create_future()
        self._connack: asyncio.Future[None] = self._loop.create_future()
        self._sock: Any = None
        self._closed = False
        self._reading = False
        self._misc: asyncio.TimerHandle | None = None

        client = self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            # The sync keeps its own cursor: a clean session. A consumer that wants the broker
            # to queue for it while it is away (the mirror) asks for a persistent one.
            clean_session=clean_session,
            protocol=paho.MQTTv311,
            reconnect_on_failure=False,
        )
        # The sync bounds its diffs in flight itself; paho's own limit (20) would queue the
        # birth and the replies behind them.
        client.max_inflight_messages_set(0)
        client.connect_timeout = connect_timeout_s
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        if username is not None:
            client.username_pw_set(username, password)
        if tls is not None:
            client.tls_set_context(tls)
            # With check_hostname off in the context, paho would check the name itself.
            client.tls_insecure_set(not tls_check_hostname)
        client.suppress_exceptions = True  # a callback bug is logged, never kills the reader
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        client.on_publish = self._published
        client.on_message = self._message
        client.connect_async(host, port, keepalive_s)

    # -- lifecycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and wait for the broker's CONNACK; MqttError saying why it failed."""
        try:
            # Name resolution, TCP connect and TLS handshake block: a worker thread.
            rc = await asyncio.to_thread(self.client.reconnect)
        except asyncio.CancelledError:
            self.abort()
            raise
        except (OSError, ssl.SSLError, ssl.CertificateError, ValueError) as exc:
            self.abort()
            raise MqttError(f"cannot connect to {self.host}:{self.port}: {_os_error(exc)}") from exc
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.abort()
            raise MqttError(f"cannot connect to {self.host}:{self.port}: {paho.error_string(rc)}")
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await asyncio.shield(self._connack)
        except TimeoutError:
            self.abort()
            raise MqttError(
                f"{self.host}:{self.port} accepted the connection but did not answer the MQTT "
                f"CONNECT within {self.connect_timeout_s:g} s"
            ) from None
        except BaseException:
            self.abort()
            raise

    async def close(self, timeout_s: float = 2.0) -> None:
        """Disconnect cleanly (DISCONNECT: the broker does not publish the Last Will)."""
        if self._closed:
            return
        if self._sock is not None and not self.lost.done():
            self.client.disconnect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await asyncio.shield(self.lost)
        self.abort()

    def abort(self) -> None:
        """Drop the connection without a DISCONNECT (the broker publishes the Last Will)."""
        self._closed = True
        sock, self._sock = self._sock, None
        if sock is not None:
            self._forget(sock)
            with contextlib.suppress(OSError):
                sock.close()
        self._lose("connection closed")

    # -- publishing -------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Queue a message; return its mid (its PUBACK calls `on_published(mid)`)."""
        if self._closed or self.lost.done():
            raise ConnectionLost(self.lost.result() if self.lost.done() else "connection closed")
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionLost(f"publish on {topic} failed: {paho.error_string(info.rc)}")
        if self._sock is not None and not self._reading:
            # Written now rather than on the writer callback's next loop iteration: the socket
            # almost always has room, and a change reaches the broker that much sooner. What
            # does not fit stays queued, and paho re-registers the writer for it. Not from
            # inside loop_read (a callback publishing): paho's callback lock is not reentrant.
            self.client.loop_write()
        return int(info.mid)

    def subscribe(self, topics: list[str], qos: int = 1) -> None:
        """Subscribe to `topics` (the SUBACK is not waited for)."""
        rc, _ = self.client.subscribe([(topic, qos) for topic in topics])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionLost(f"subscribe failed: {paho.error_string(rc)}")

    # -- paho callbacks (on the loop thread, except socket callbacks during open) ----------------

    def _on_loop(self, call: Callable[..., None], *args: Any) -> bool:
        """Run `call` on the loop thread; True when it ran now (already there)."""
        if threading.get_ident() == self._loop_thread:
            return True
        with contextlib.suppress(RuntimeError):  # loop closed: nobody listens any more
            self._loop.call_soon_threadsafe(call, *args)
        return False

    def _socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if not self._on_loop(self._socket_open, client, userdata, sock):
            return
        if self._closed:
            with contextlib.suppress(OSError):
                sock.close()  # abandoned while the worker thread was connecting
            return
        self._sock = sock
        self._loop.add_reader(sock, self._readable)
        self._misc = self._loop.call_later(MISC_INTERVAL_S, self._tick)

    def _socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if not self._on_loop(self._socket_close, client, userdata, sock):
            return
        self._forget(sock)
        if sock is self._sock:
            self._sock = None

    def _register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if not self._on_loop(self._register_write, client, userdata, sock):
            return
        if not self._closed and sock is self._sock:
            self._loop.add_writer(sock, self._writable)

    def _unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if not self._on_loop(self._unregister_write, client, userdata, sock):
            return
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(sock)

    def _readable(self) -> None:
        self._reading = True
        try:
            self.client.loop_read()
        finally:
            self._reading = False
        sock = self._sock
        # TLS can hold decrypted bytes the socket no longer signals as readable.
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            self._loop.call_soon(self._readable)

    def _writable(self) -> None:
        self.client.loop_write()

    def _tick(self) -> None:
        self._misc = None
        if self._sock is None:
            return
        if self.client.loop_misc() == MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None:
            self._misc = self._loop.call_later(MISC_INTERVAL_S, self._tick)

    def _connected(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if self._connack.done():
            return
        if reason.is_failure:
            self._connack.set_exception(
                MqttError(f"the broker at {self.host}:{self.port} refused the connection: {reason}")
            )
        else:
            self._connack.set_result(None)

    def _disconnected(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        why = "disconnected by the broker" if flags.is_disconnect_packet_from_server else "lost"
        self._lose(f"connection to {self.host}:{self.port} {why} ({reason})")

    def _published(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        if self._on_published is not None:
            try:
                self._on_published(mid)
            except Exception:
                # paho would swallow it without a word (suppress_exceptions, no logger).
                log.exception("MQTT: the PUBACK handler failed")

    def _message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if self._on_message is not None:
            try:
                self._on_message(message)
            except Exception:
                log.exception("MQTT: the handler of a message on %s failed", message.topic)

    # -- helpers ----------------------------------------------------------------------------------

    def _lose(self, why: str) -> None:
        if not self.lost.done():
            self.lost.set_result(why)
        if not self._connack.done():
            self._connack.set_exception(MqttError(why))
            self._connack.exception()  # retrieved: open() may have given up on it already

    def _forget(self, sock: Any) -> None:
        for remove in (self._loop.remove_reader, self._loop.remove_writer):
            with contextlib.suppress(ValueError, OSError):
                remove(sock)
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None


def _os_error(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running, and on this port?)"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the broker's TLS certificate was refused: {exc.verify_message}"
    return f"{type(exc).__name__}: {exc}"
