"""The transport actor: listener, dialer and one authenticated connection per peer device.

Everything about bytes on the wire lives in `wire`; this actor only owns the
connections: which peers are up, limits, keepalive, and routing messages to and
from them. It works on any `wire.Network` (WebSocket in a node, memory in sims).

Ownership and tasks: each connection lives in exactly one task (the dialer's or
the listener's handler), which also runs that peer's writer and keepalive in a
child nursery. The actor's own loop never awaits the network: `Dial` spawns a
task, `Send` enqueues on the peer's bounded outbox (full -> ``Err("busy")``,
so one slow peer cannot stall the others), `Close` cancels the peer's scope.

What other actors see: inbound authenticated messages and peer up/down events on
the channel given at construction (bounded: a slow consumer slows the readers,
which pushes back on the peers through the stream), and replies to requests.

Duplicates: two devices may dial each other at the same moment. Both keep the
connection initiated by the device with the smaller Noise static key, so they
agree without talking; a reconnect from the same side replaces the old one.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
from dataclasses import dataclass, field
from typing import assert_never

import trio

from actors.runtime import Address, Mailbox, Reply
from wire import (
    BASE_REGISTRY,
    HANDSHAKE_TIMEOUT,
    CloseCode,
    ConnectionClosed,
    DeviceCredentials,
    Message,
    MessageStream,
    Network,
    PeerIdentity,
    SchemaError,
    SchemaRegistry,
    SecureConnection,
    WireError,
    secure_connection,
)

__all__ = [
    "Close",
    "Dial",
    "Direction",
    "Inbound",
    "ListPeers",
    "PeerDown",
    "PeerInfo",
    "PeerUp",
    "Send",
    "TransportActor",
    "TransportEvent",
    "TransportLimits",
    "TransportMessage",
]

log = logging.getLogger("dmgn.transport")


class Direction(enum.Enum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A connected peer device, as reported to other actors."""

    peer: PeerIdentity
    address: str
    direction: Direction
    connected_at: float


# -- requests (the actor's public surface) --------------------------------


@dataclass(frozen=True, slots=True)
class Dial:
    """Connect to ``address``; with ``expected_identity`` the peer must be that identity."""

    address: str
    expected_identity: bytes | None
    expected_device_id: bytes | None
    reply: Reply[PeerInfo]


@dataclass(frozen=True, slots=True)
class Send:
    """Send one application message; the reply comes once it is written to the stream."""

    peer: PeerIdentity
    message: Message
    reply: Reply[None]


@dataclass(frozen=True, slots=True)
class Close:
    peer: PeerIdentity
    reason: str
    reply: Reply[None]


@dataclass(frozen=True, slots=True)
class ListPeers:
    reply: Reply[tuple[PeerInfo, ...]]


TransportMessage = Dial | Send | Close | ListPeers


# -- events (delivered on the channel given at construction) --------------


@dataclass(frozen=True, slots=True)
class PeerUp:
    info: PeerInfo


@dataclass(frozen=True, slots=True)
class PeerDown:
    info: PeerInfo
    reason: str


@dataclass(frozen=True, slots=True)
class Inbound:
    info: PeerInfo
    message: Message


TransportEvent = PeerUp | PeerDown | Inbound


@dataclass(frozen=True, slots=True)
class TransportLimits:
    # A personal node talks to its own few devices and a few dozen storage peers;
    # 128 leaves headroom while bounding memory (each connection may buffer up to
    # one max-size message while reassembling).
    max_connections: int = 128
    # One identity may run several devices, but not take over the node's slots.
    max_connections_per_identity: int = 16
    # Unauthenticated handshakes cost us DH and signature checks; cap them so a
    # flood of half-open dials cannot starve real peers.
    max_pending_handshakes: int = 32
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    # NAT mappings and idle proxies commonly drop silent TCP flows after 30-60 s;
    # a ping every 15 s keeps them open and notices dead peers.
    keepalive_interval: float = 15.0
    # Three missed keepalive rounds: the peer is gone.
    idle_timeout: float = 45.0
    # Messages queued per peer before Send answers "busy" (backpressure to callers).
    send_queue: int = 32
    # How long a PeerDown may wait for a slow events consumer during close.
    event_delivery_timeout: float = 5.0


_DeviceKey = tuple[bytes, bytes]  # (identity public key, device id)


def _key(peer: PeerIdentity) -> _DeviceKey:
    return (peer.identity_public_key, peer.device_id)


@dataclass(eq=False, slots=True)
class _Peer:
    info: PeerInfo
    connection: SecureConnection
    initiator_static: bytes
    outbox: trio.MemorySendChannel[tuple[Message, Reply[None]]]
    inbox: trio.MemoryReceiveChannel[tuple[Message, Reply[None]]]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    close_code: int = CloseCode.NORMAL
    close_reason: str = ""


class TransportActor:
    """Owns the node's listener, dialed connections and per-peer secure channels."""

    def __init__(
        self,
        network: Network,
        credentials: DeviceCredentials,
        events: trio.MemorySendChannel[TransportEvent],
        *,
        listen_addr: str | None = None,
        registry: SchemaRegistry = BASE_REGISTRY,
        limits: TransportLimits | None = None,
        mailbox: Mailbox[TransportMessage] | None = None,
    ) -> None:
        self._network = network
        self._credentials = credentials
        self._events = events
        self._listen_addr = listen_addr
        self._registry = registry
        self._limits = limits or TransportLimits()
        self.mailbox: Mailbox[TransportMessage] = mailbox or Mailbox("transport")
        self.bound_address: str | None = None
        self._peers: dict[_DeviceKey, _Peer] = {}
        self._pending_handshakes = 0
        self._nursery: trio.Nursery | None = None
        self._stopping = False
        self._ids = itertools.count(1)

    @property
    def address(self) -> Address[TransportMessage]:
        return self.mailbox.address

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._listen_addr is not None:
                    self.bound_address = await nursery.start(
                        self._network.listen, self._listen_addr, self._accept
                    )
                task_status.started()
                async for request in self.mailbox:
                    self._dispatch(request)
                nursery.cancel_scope.cancel()
        finally:
            self._stopping = True
            self._nursery = None

    def _dispatch(self, request: TransportMessage) -> None:
        match request:
            case Dial():
                assert self._nursery is not None
                self._nursery.start_soon(self._dial, request)
            case Send():
                self._handle_send(request)
            case Close():
                self._handle_close(request)
            case ListPeers():
                request.reply.ok(tuple(peer.info for peer in self._peers.values()))
            case _:
                assert_never(request)

    # -- requests -------------------------------------------------------------

    def _handle_send(self, request: Send) -> None:
        peer = self._peers.get(_key(request.peer))
        if peer is None:
            request.reply.err(f"not connected to {request.peer!r}", "not_connected")
            return
        try:
            peer.outbox.send_nowait((request.message, request.reply))
        except trio.WouldBlock:
            request.reply.err("send queue to this peer is full; retry later", "busy")
        except trio.ClosedResourceError:
            request.reply.err("the connection to this peer is closing", "not_connected")

    def _handle_close(self, request: Close) -> None:
        peer = self._peers.get(_key(request.peer))
        if peer is None:
            request.reply.err(f"not connected to {request.peer!r}", "not_connected")
            return
        self._stop_peer(peer, CloseCode.NORMAL, request.reason)
        request.reply.ok(None)

    async def _dial(self, request: Dial) -> None:
        existing = self._find_connected(request.expected_identity, request.expected_device_id)
        if existing is not None:
            request.reply.ok(existing.info)
            return
        if len(self._peers) >= self._limits.max_connections:
            request.reply.err("too many connections", "limit")
            return
        try:
            async with self._network.dial(request.address) as stream:
                connection = await self._handshake(
                    stream,
                    initiator=True,
                    expected_identity=request.expected_identity,
                    expected_device_id=request.expected_device_id,
                )
                if connection is None:
                    request.reply.err(f"handshake with {request.address} failed", "handshake")
                    return
                await self._serve(connection, Direction.OUTBOUND, request.reply)
        except WireError as error:
            if not request.reply.used:
                request.reply.err(f"cannot connect to {request.address}: {error}", "dial_failed")

    def _find_connected(self, identity: bytes | None, device_id: bytes | None) -> _Peer | None:
        if identity is None or device_id is None:
            return None
        return self._peers.get((identity, device_id))

    # -- connections -------------------------------------------------------

    async def _accept(self, stream: MessageStream) -> None:
        connection = await self._handshake(stream, initiator=False)
        if connection is not None:
            await self._serve(connection, Direction.INBOUND, None)

    async def _handshake(
        self,
        stream: MessageStream,
        *,
        initiator: bool,
        expected_identity: bytes | None = None,
        expected_device_id: bytes | None = None,
    ) -> SecureConnection | None:
        if self._pending_handshakes >= self._limits.max_pending_handshakes:
            await stream.aclose(CloseCode.GOING_AWAY, "too many handshakes in progress")
            return None
        self._pending_handshakes += 1
        try:
            return await secure_connection(
                stream,
                self._credentials,
                initiator=initiator,
                expected_identity=expected_identity,
                expected_device_id=expected_device_id,
                registry=self._registry,
                handshake_timeout=self._limits.handshake_timeout,
            )
        except WireError as error:
            if initiator:
                raise
            log.info("inbound handshake from %s failed: %s", stream.remote_address, error)
            return None
        finally:
            self._pending_handshakes -= 1

    def _admission_error(self, peer: PeerIdentity) -> str | None:
        if len(self._peers) >= self._limits.max_connections:
            return "too many connections"
        same_identity = sum(
            1 for key in self._peers if key[0] == peer.identity_public_key and key != _key(peer)
        )
        if same_identity >= self._limits.max_connections_per_identity:
            return "too many connections from this identity"
        return None

    async def _serve(
        self, connection: SecureConnection, direction: Direction, reply: Reply[PeerInfo] | None
    ) -> None:
        """Run one authenticated connection until it ends (this task owns it)."""
        refusal = self._admission_error(connection.peer)
        if refusal is not None:
            if reply is not None:
                reply.err(refusal, "limit")
            await connection.aclose(CloseCode.POLICY_VIOLATION, refusal)
            return
        ours_static = self._credentials.static_key.public
        initiator_static = (
            ours_static
            if direction is Direction.OUTBOUND
            else connection.peer.noise_static_public_key
        )
        outbox, inbox = trio.open_memory_channel[tuple[Message, Reply[None]]](
            self._limits.send_queue
        )
        info = PeerInfo(connection.peer, connection.remote_address, direction, trio.current_time())
        peer = _Peer(info, connection, initiator_static, outbox, inbox)
        if not self._install(peer):
            if reply is not None:
                reply.err("already connected to this device", "duplicate")
            await connection.aclose(CloseCode.NORMAL, "duplicate connection")
            return
        if reply is not None:
            reply.ok(info)
        await self._emit(PeerUp(info))
        reason = ""
        try:
            with peer.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write, peer)
                    nursery.start_soon(self._keepalive, peer)
                    reason = await self._read(peer)
                    nursery.cancel_scope.cancel()
        finally:
            reason = reason or peer.close_reason or "closed"
            if self._peers.get(_key(info.peer)) is peer:
                del self._peers[_key(info.peer)]
            outbox.close()
            self._fail_queued(peer, reason)
            await connection.aclose(peer.close_code, peer.close_reason)
            if not self._stopping:
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(self._limits.event_delivery_timeout),
                ):
                    await self._emit(PeerDown(info, reason))

    def _install(self, peer: _Peer) -> bool:
        """Register ``peer``; resolve a duplicate; False if ``peer`` is the one to drop."""
        key = _key(peer.info.peer)
        existing = self._peers.get(key)
        if existing is not None:
            if existing.initiator_static == peer.initiator_static:
                self._stop_peer(existing, CloseCode.NORMAL, "replaced by a newer connection")
            elif existing.initiator_static < peer.initiator_static:
                return False
            else:
                self._stop_peer(existing, CloseCode.NORMAL, "duplicate connection")
        self._peers[key] = peer
        return True

    def _stop_peer(self, peer: _Peer, code: int, reason: str) -> None:
        peer.close_code, peer.close_reason = code, reason
        if self._peers.get(_key(peer.info.peer)) is peer:
            del self._peers[_key(peer.info.peer)]
        peer.scope.cancel()

    async def _read(self, peer: _Peer) -> str:
        """Deliver inbound messages until the connection ends; return why it ended."""
        try:
            while True:
                message = await peer.connection.receive()
                await self._emit(Inbound(peer.info, message))
        except ConnectionClosed as closed:
            return str(closed)
        except WireError as error:
            # The connection already closed itself with this reason (see SecureConnection).
            log.warning("protocol error from %r: %s", peer.info.peer, error)
            return f"protocol error: {error}"

    async def _write(self, peer: _Peer) -> None:
        async for message, reply in peer.inbox:
            try:
                await peer.connection.send(message)
            except SchemaError as error:
                reply.err(f"message does not match its schema: {error}", "invalid_message")
                continue
            except WireError as error:
                reply.err(f"send failed: {error}", "send_failed")
                self._stop_peer(peer, CloseCode.GOING_AWAY, f"send failed: {error}")
                return
            reply.ok(None)

    async def _keepalive(self, peer: _Peer) -> None:
        limits = self._limits
        while True:
            await trio.sleep(limits.keepalive_interval)
            idle = trio.current_time() - peer.connection.last_received_at
            if idle >= limits.idle_timeout:
                self._stop_peer(
                    peer, CloseCode.TIMEOUT, f"no traffic for {idle:.0f}s (idle timeout)"
                )
                return
            if idle >= limits.keepalive_interval:
                try:
                    await peer.connection.ping()
                except WireError:
                    return  # the reader will notice and report why

    def _fail_queued(self, peer: _Peer, reason: str) -> None:
        while True:
            try:
                _, reply = peer.inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            reply.err(f"connection closed before sending: {reason}", "not_connected")

    async def _emit(self, event: TransportEvent) -> None:
        # A closed consumer means the node is shutting down: nobody needs the event.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._events.send(event)
