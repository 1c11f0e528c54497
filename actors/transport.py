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

Handshake modes (issue 20): the listener accepts both; a dial chooses by what it expects.
A dial to our own identity is a device handshake (Noise XXpsk3, `wire.Mode.DEVICE`); to any
other expected peer a storage handshake (`wire.Mode.STORAGE`, where strangers see our storage
key); a dial that expects nobody in particular (a bootstrap address, ``add_peer``) tries
device mode first and falls back to storage mode when that handshake fails; `DialStorage`
skips the device handshake for an address that refused it before. Only a device handshake
makes a peer one of our devices.

Own devices in storage mode: `AskOwn` asks a storage-mode peer, inside its session, whether it
holds our device PSK (``own.ask`` / ``own.tag``, `actors._own_probe`); the transport answers
such questions itself, as `wire` answers pings, and never hands them to other actors.

Keepalive: a peer we heard nothing from for ``keepalive_interval`` (15 s) is pinged, and one
silent for ``idle_timeout`` is closed; towards strangers every 4 and after 12 minutes (the
network keeps quiet links open: `wire.websocket` pings every 25 s at the WebSocket layer).

Duplicates: two devices may dial each other at the same moment. Both keep the
connection initiated by the device with the smaller Noise static key, so they
agree without talking; a reconnect from the same side replaces the old one.

Strangers and our own devices (issue 12): identities cost nothing, so anything a
stranger can hold is bounded separately from what our devices get, and our
devices can never be locked out:

- ``reserved_device_slots`` of ``max_connections`` are never given to strangers,
  and if the node is full anyway, a device arriving evicts the least active
  stranger;
- at most ``max_strangers_per_ip`` strangers per remote address, and handshakes in
  progress are capped per address and in total (the oldest inbound one is
  dropped for a newcomer, so a handshake flood delays a device, never blocks it);
- a stranger that sends no application message for ``stranger_idle_timeout`` is
  closed (pings do not count: they keep a connection open, not useful), and one quiet for
  ``stranger_evictable_after`` gives its slot to a new stranger when all are taken;
- an unfinished incoming message is capped per peer (``stranger_max_message_size``
  for strangers) and all peers' unfinished messages share one budget per class
  (`ReassemblyBudget`); one that does not complete within its partial-message
  timeout closes the connection;
- what all strangers together send is read at ``stranger_bytes_per_second`` at most
  (a shared token bucket; TCP pushes back on them), so they cannot take the CPU
  our own requests need.
Protocol faults of peers are logged through `PeerNoise` (WARNING at most, one line
per kind per minute, no traceback).
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import assert_never
from urllib.parse import urlsplit

import trio

from actors import _own_probe as own_probe
from actors._own_probe import OWN_PROBE_TYPES
from actors._peer_noise import PeerNoise
from actors.runtime import Address, Mailbox, Reply, deliver
from wire import (
    BASE_REGISTRY,
    DEFAULT_MAX_MESSAGE_SIZE,
    HANDSHAKE_TIMEOUT,
    CloseCode,
    ConnectionClosed,
    DeviceCredentials,
    Message,
    MessageStream,
    Mode,
    Network,
    PeerIdentity,
    ReassemblyBudget,
    SchemaError,
    SchemaRegistry,
    SecureConnection,
    Suite,
    TokenBucket,
    WireError,
    default_suites,
    secure_connection,
)

__all__ = [
    "AskOwn",
    "Close",
    "Dial",
    "DialStorage",
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
    #: Made with the device handshake (the PSK and a certificate of our identity): one of our
    #: devices. The one test of that everywhere (peering, gossip, the router, reputation, the
    #: shard keeper); a certificate naming our identity alone proves nothing.
    is_device: bool
    #: The Noise cipher suite of the session (the initiator's choice among what both take).
    suite: Suite = Suite.CHACHAPOLY


# -- requests (the actor's public surface) --------------------------------


@dataclass(frozen=True, slots=True)
class Dial:
    """Connect to ``address``; with ``expected_identity`` the peer must be that identity (ours:
    a device handshake; another: a storage handshake and that storage key; None: device
    handshake, then storage handshake). Answers the connection to the device found there:
    one it had dialed us over already (``Direction.INBOUND``) when both sides dialed and the
    tie-break kept the other one."""

    address: str
    expected_identity: bytes | None
    expected_device_id: bytes | None
    reply: Reply[PeerInfo]


@dataclass(frozen=True, slots=True)
class DialStorage:
    """Connect to ``address`` in storage mode only, whoever answers there.

    For an address that refused our device handshake before (a storage node we know by its
    address alone, such as a bootstrap peer): a plain `Dial` would spend a device handshake
    it refuses again on every redial. The peering actor still asks such a peer now and then
    whether it is one of ours (`AskOwn`), so one of our own devices is not kept a storage peer
    for long."""

    address: str
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


@dataclass(frozen=True, slots=True)
class AskOwn:
    """Whether the connected ``peer`` holds our device PSK: one of our own devices, though the
    connection is in storage mode (asked inside the session, `actors._own_probe`). True at once
    for a device-mode connection; ``Err`` if it is not connected or does not answer."""

    peer: PeerIdentity
    reply: Reply[bool]


TransportMessage = Dial | DialStorage | Send | Close | ListPeers | AskOwn


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
    #: A personal node talks to its own few devices and a few dozen storage peers;
    #: 128 leaves headroom while bounding memory (see the reassembly budgets).
    max_connections: int = 128
    #: One identity may run several devices, but not take over the node's slots.
    max_connections_per_identity: int = 16
    #: Slots of ``max_connections`` strangers never get (at most a quarter of them, so a
    #: tiny ``max_connections`` still admits someone): room for every device of ours.
    reserved_device_slots: int = 16
    #: Authenticated strangers per remote address: a few nodes behind one NAT, not a farm of
    #: free identities on one machine.
    max_strangers_per_ip: int = 8
    #: Unauthenticated handshakes cost us DH and signature checks; cap them so a
    #: flood of half-open dials cannot starve real peers (the oldest is dropped for a new one).
    max_pending_handshakes: int = 32
    #: Handshakes in progress from one remote address (an honest node runs one at a time).
    max_pending_handshakes_per_ip: int = 4
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    #: NAT mappings and idle proxies commonly drop silent TCP flows after 30-60 s;
    #: a ping every 15 s keeps them open and notices dead peers.
    keepalive_interval: float = 15.0
    #: Three missed keepalive rounds: the peer is gone.
    idle_timeout: float = 45.0
    #: Towards a stranger (a storage link) a ping every 4 minutes: only to notice a peer that
    #: is gone. Keeping the path open (NAT mappings, proxies that drop flows silent for 60 s)
    #: is the network's job, where it is cheap: a WebSocket dialer pings every 25 s in control
    #: frames and closes a link whose pong does not come (`wire.websocket.KEEPALIVE_INTERVAL`).
    #: At 15 s, pings and pongs were 43% of all frames in a 100-node sim hour, nearly all of
    #: them on storage links; at 50 s (when this ping also kept the path open) still ~40% of a
    #: 500-node hour's, where storage links are quiet but for the keeper's mail heads every
    #: 10 min. What our own devices need (an op waits for a dead device to be noticed) is the
    #: faster check above.
    stranger_keepalive_interval: float = 240.0
    #: Three missed rounds towards a stranger.
    stranger_silence_timeout: float = 720.0
    #: A stranger with nothing to say for this long gives its slot back (it may reconnect when
    #: it has something to store or fetch); our own devices stay connected while idle. Longer
    #: than a shard keeper's mail poll (``KeeperSettings.mail_poll_interval``, 10 min): a
    #: device keeps its storage links open to hear ``mail.notify``, and asks each for heads
    #: that often. (At 60 s, shorter than the sync round of the time, every storage link was
    #: closed just before the keeper's next request and redialed for it: two Noise handshakes,
    #: 8 a storage link in 6 virtual minutes.)
    stranger_idle_timeout: float = 900.0
    #: A stranger quiet this long (no application message) gives its slot to a new stranger
    #: when every stranger slot is taken: connecting and saying nothing holds a slot for no
    #: longer than this against newcomers. (A device arriving at a full node takes the slot of
    #: the stranger idle longest, however briefly.)
    stranger_evictable_after: float = 150.0
    #: Largest incoming message from a stranger: a storage put or get answer carries at most
    #: 2 MiB of shards (dmgn.storage_protocol.MAX_BATCH_BYTES); twice that leaves room for the
    #: framing, and stays far below our devices' 16 MiB feed batches.
    stranger_max_message_size: int = 4 * 1024 * 1024
    #: Bytes all strangers together may hold in unfinished messages (issue 12: 70 strangers
    #: each parking a 16 MiB partial message took the node to 1.24 GB): eight max-size ones.
    stranger_reassembly_budget: int = 32 * 1024 * 1024
    #: Bytes all our devices together may hold in unfinished messages: four max-size ones.
    device_reassembly_budget: int = 4 * DEFAULT_MAX_MESSAGE_SIZE
    #: A stranger's message must arrive whole within this once it began (4 MiB in 60 s is
    #: 560 kbit/s, a slow link).
    stranger_partial_timeout: float = 60.0
    #: A device's 16 MiB message within two minutes (~1.1 Mbit/s).
    device_partial_timeout: float = 120.0
    #: Bytes a second all strangers together may make us read, decrypt and parse (our devices
    #: are not paced). 8 MiB/s (64 Mbit/s) serves a storage peer's batches at link speed for
    #: most home links, and bounds the CPU strangers can take: in issue 12's attack, strangers
    #: streaming partial messages pushed `dmgn status` from 0.02 s to 3 s.
    stranger_bytes_per_second: float = 8 * 1024 * 1024
    #: Bytes strangers may send at once above that rate (one storage batch and its framing).
    stranger_burst_bytes: int = 4 * 1024 * 1024
    #: Messages queued per peer before Send answers "busy" (backpressure to callers).
    send_queue: int = 32
    #: How long a PeerDown may wait for a slow events consumer during close.
    event_delivery_timeout: float = 5.0
    #: How long `AskOwn` waits for the peer's ``own.tag`` (actors._own_probe).
    own_ask_timeout: float = 10.0

    @property
    def stranger_slots(self) -> int:
        """Connections strangers may hold together."""
        reserved = min(self.reserved_device_slots, self.max_connections // 4)
        return self.max_connections - reserved


_DeviceKey = tuple[bytes, bytes]  # (identity public key, device id)
_OWN_PROBE_NAMES = frozenset(t.name for t in OWN_PROBE_TYPES)


def _key(peer: PeerIdentity) -> _DeviceKey:
    return (peer.identity_public_key, peer.device_id)


@dataclass(eq=False, slots=True)
class _Peer:
    info: PeerInfo
    connection: SecureConnection
    initiator_static: bytes
    outbox: trio.MemorySendChannel[tuple[Message, Reply[None]]]
    inbox: trio.MemoryReceiveChannel[tuple[Message, Reply[None]]]
    is_device: bool
    ip: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    close_code: int = CloseCode.NORMAL
    close_reason: str = ""
    #: Set when an unfinished incoming message begins (the keepalive then wakes at once).
    partial_begun: trio.Event = field(default_factory=trio.Event)
    #: Our `AskOwn` questions waiting for their ``own.tag``, by nonce (at most MAX_OWN_ASKS).
    own_asks: dict[bytes, _OwnAsk] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class _OwnAsk:
    answered: trio.Event = field(default_factory=trio.Event)
    reply: Message | None = None


#: `AskOwn` questions in flight per connection (peering asks one at a time per target).
MAX_OWN_ASKS = 4


@dataclass(eq=False, slots=True)
class _Handshake:
    ip: str
    inbound: bool
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class _Pace:
    """The byte budget strangers' connections share: ``take(n)`` spends it and sleeps off any
    debt (the connection waits; nothing is refused)."""

    def __init__(self, rate: float, burst: int) -> None:
        self._bucket = TokenBucket(rate, float(burst))

    async def take(self, size: int) -> None:
        debt = self._bucket.overdraw(size, trio.current_time())
        if debt > 0:
            await trio.sleep(debt)


def _host(address: str) -> str:
    """The remote host of a ``ws://host:port`` address, for per-address caps; any other
    address (``mem://...`` in sims: every dialer has its own) stands for itself."""
    try:
        parts = urlsplit(address)
    except ValueError:
        return address
    if parts.scheme in ("ws", "wss") and parts.hostname:
        return parts.hostname
    return address


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
        suites: tuple[Suite, ...] | None = None,
    ) -> None:
        """``suites``: the Noise cipher suites this node takes, the first is the one it dials
        with (None: `wire.default_suites`, measured on this CPU). ChaChaPoly must be among
        them: it is the suite every node takes, the one a refused dial falls back to."""
        self._suites = default_suites() if suites is None else suites
        if Suite.CHACHAPOLY not in self._suites:
            raise ValueError("ChaChaPoly is the suite every node takes; it cannot be left out")
        self._network = network
        self._credentials = credentials
        self._events = events
        self._listen_addr = listen_addr
        # Our own-device questions are the transport's business, whatever the node's
        # registry (actors._own_probe).
        self._registry = registry.extended(*(t for t in OWN_PROBE_TYPES if t.name not in registry))
        self._limits = limits or TransportLimits()
        self.mailbox: Mailbox[TransportMessage] = mailbox or Mailbox("transport")
        self.bound_address: str | None = None
        self._peers: dict[_DeviceKey, _Peer] = {}
        self._identity = credentials.certificate.identity_public_key
        self._handshakes: dict[int, _Handshake] = {}  # insertion order = oldest first
        self._handshakes_per_ip: Counter[str] = Counter()
        self._stranger_budget = ReassemblyBudget(self._limits.stranger_reassembly_budget)
        self._device_budget = ReassemblyBudget(self._limits.device_reassembly_budget)
        self._stranger_pace = _Pace(
            self._limits.stranger_bytes_per_second, self._limits.stranger_burst_bytes
        )
        self._noise = PeerNoise(log, clock=trio.current_time)
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
            case Dial() | DialStorage():
                assert self._nursery is not None
                self._nursery.start_soon(self._dial, request)
            case Send():
                self._handle_send(request)
            case Close():
                self._handle_close(request)
            case ListPeers():
                request.reply.ok(tuple(peer.info for peer in self._peers.values()))
            case AskOwn():
                assert self._nursery is not None
                self._nursery.start_soon(self._ask_own, request)
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

    async def _ask_own(self, request: AskOwn) -> None:
        peer = self._peers.get(_key(request.peer))
        psk = self._credentials.psk
        if peer is None:
            request.reply.err(f"not connected to {request.peer!r}", "not_connected")
            return
        if peer.is_device or psk is None:  # proven by the handshake / no devices of ours
            request.reply.ok(peer.is_device)
            return
        if len(peer.own_asks) >= MAX_OWN_ASKS:
            request.reply.err("questions to this peer are already waiting", "busy")
            return
        question = own_probe.ask()
        nonce = question.get_bytes("nonce")
        pending = peer.own_asks[nonce] = _OwnAsk()
        try:
            with trio.move_on_after(self._limits.own_ask_timeout):
                try:
                    # Straight onto the connection, as its answer goes (`_own_message`): the
                    # connection's send lock keeps it whole beside the writer's frames.
                    await peer.connection.send(question)
                except WireError as error:
                    request.reply.err(f"the question could not be sent: {error}", "send_failed")
                    return
                await pending.answered.wait()
            if pending.reply is None:
                request.reply.err("no answer to our question", "timeout")
                return
            we_dialed = peer.info.direction is Direction.OUTBOUND
            hash_ = peer.connection.handshake_hash
            request.reply.ok(own_probe.is_ours(question, pending.reply, psk, hash_, we_dialed))
        finally:
            peer.own_asks.pop(nonce, None)

    async def _own_message(self, peer: _Peer, message: Message) -> None:
        """An ``own.ask`` is answered at once (like a ping); an ``own.tag`` ends our question
        with that nonce (one for no question of ours is dropped)."""
        if message.type == own_probe.OWN_ASK.name:
            dialed = peer.info.direction is Direction.OUTBOUND
            hash_ = peer.connection.handshake_hash
            await peer.connection.send(
                own_probe.answer(message, self._credentials.psk, hash_, dialed)
            )
            return
        pending = peer.own_asks.get(message.get_bytes("nonce"))
        if pending is not None and pending.reply is None:
            pending.reply = message
            pending.answered.set()

    @property
    def reassembly_bytes(self) -> tuple[int, int]:
        """Bytes held in unfinished incoming messages: (strangers, devices)."""
        return self._stranger_budget.used, self._device_budget.used

    async def _dial(self, request: Dial | DialStorage) -> None:
        expected_identity = request.expected_identity if isinstance(request, Dial) else None
        existing = self._find_connected(expected_identity, request.expected_device_id)
        if existing is not None:
            request.reply.ok(existing.info)
            return
        if expected_identity != self._identity and (
            self._strangers() >= self._limits.stranger_slots
        ):
            # Our own devices are dialed whatever the count (they may evict a stranger).
            request.reply.err("too many connections", "limit")
            return
        if isinstance(request, DialStorage):
            modes = [Mode.STORAGE]
        else:
            modes = list(self._modes_for(expected_identity))
        suite = self._suites[0]
        while modes:
            mode = modes[0]
            dialed = connected = False
            try:
                async with self._network.dial(request.address) as stream:
                    dialed = True
                    connection = await self._handshake(
                        stream,
                        initiator=True,
                        mode=mode,
                        suite=suite,
                        expected_identity=expected_identity,
                        expected_device_id=request.expected_device_id,
                    )
                    connected = True
                    if connection is None:
                        request.reply.err(f"handshake with {request.address} failed", "handshake")
                        return
                    await self._serve(connection, Direction.OUTBOUND, request.reply)
                    return
            except WireError as error:
                if request.reply.used:
                    return
                code = error.code if isinstance(error, ConnectionClosed) else None
                if (
                    dialed
                    and not connected
                    and code == CloseCode.SUITE_REFUSED
                    and suite is not Suite.CHACHAPOLY
                ):
                    # A responder without fast AES: the same handshake again in the suite
                    # every node takes (once: ChaChaPoly is never refused).
                    log.debug("suite %s refused by %s", suite.cipher_name, request.address)
                    suite = Suite.CHACHAPOLY
                    continue
                refused = code == CloseCode.DEVICE_REFUSED
                modes.pop(0)
                if not dialed or connected or not modes or not refused:
                    # Only the responder's explicit refusal sends us on to storage mode: a
                    # timeout, a full node or a reset stream is an ordinary failed dial, retried
                    # in device mode (one of our own devices must not become a storage peer).
                    request.reply.err(
                        f"cannot connect to {request.address}: {error}", "dial_failed"
                    )
                    return
                # A peer that is not one of our devices refuses the device handshake (it
                # cannot read message 3): try it as a storage peer.
                log.debug("device handshake with %s refused (%s)", request.address, error)

    def _modes_for(self, expected_identity: bytes | None) -> tuple[Mode, ...]:
        device = (Mode.DEVICE,) if self._credentials.psk is not None else ()
        if expected_identity is None:
            return (*device, Mode.STORAGE)
        if expected_identity == self._identity:
            return device or (Mode.STORAGE,)
        return (Mode.STORAGE,)

    def _find_connected(self, identity: bytes | None, device_id: bytes | None) -> _Peer | None:
        if identity is None or device_id is None:
            return None
        return self._peers.get((identity, device_id))

    # -- connections -------------------------------------------------------

    async def _accept(self, stream: MessageStream) -> None:
        connection = await self._handshake(stream, initiator=False)
        if connection is not None:
            await self._serve(connection, Direction.INBOUND, None)

    def _begin_handshake(self, ip: str, inbound: bool) -> _Handshake | None:
        limits = self._limits
        if inbound and self._handshakes_per_ip[ip] >= limits.max_pending_handshakes_per_ip:
            return None
        if len(self._handshakes) >= limits.max_pending_handshakes:
            oldest = next((h for h in self._handshakes.values() if h.inbound), None)
            if oldest is None or not inbound:
                return None
            oldest.scope.cancel()  # its task ends the handshake and forgets it
            self._end_handshake(oldest)
        handshake = _Handshake(ip, inbound)
        self._handshakes[id(handshake)] = handshake
        self._handshakes_per_ip[ip] += 1
        return handshake

    def _end_handshake(self, handshake: _Handshake) -> None:
        if self._handshakes.pop(id(handshake), None) is None:
            return
        self._handshakes_per_ip[handshake.ip] -= 1
        if self._handshakes_per_ip[handshake.ip] <= 0:
            del self._handshakes_per_ip[handshake.ip]

    async def _handshake(
        self,
        stream: MessageStream,
        *,
        initiator: bool,
        mode: Mode = Mode.STORAGE,
        suite: Suite | None = None,
        expected_identity: bytes | None = None,
        expected_device_id: bytes | None = None,
    ) -> SecureConnection | None:
        handshake = self._begin_handshake(_host(stream.remote_address), not initiator)
        if handshake is None:
            if not initiator:
                self._noise.report(
                    "handshake-limit",
                    "refusing handshakes beyond the limit (last from %s)",
                    stream.remote_address,
                )
            await stream.aclose(CloseCode.GOING_AWAY, "too many handshakes in progress")
            if initiator:
                raise ConnectionClosed("too many handshakes in progress on this node")
            return None
        try:
            with handshake.scope:
                return await secure_connection(
                    stream,
                    self._credentials,
                    initiator=initiator,
                    mode=mode,
                    suite=suite,
                    accept_suites=frozenset(self._suites),
                    expected_identity=expected_identity,
                    expected_device_id=expected_device_id,
                    registry=self._registry,
                    handshake_timeout=self._limits.handshake_timeout,
                )
            # Cancelled: a newer handshake needed the slot.
            with trio.CancelScope(shield=True):
                await stream.aclose(CloseCode.GOING_AWAY, "too many handshakes in progress")
            return None
        except WireError as error:
            if initiator:
                raise
            self._noise.report(
                "handshake-failed",
                "inbound handshake from %s failed: %s",
                stream.remote_address,
                error,
            )
            return None
        finally:
            self._end_handshake(handshake)

    def _strangers(self) -> int:
        return sum(1 for peer in self._peers.values() if not peer.is_device)

    def _admission_error(self, peer: PeerIdentity, ip: str, is_device: bool) -> str | None:
        limits = self._limits
        same_identity = sum(
            1 for key in self._peers if key[0] == peer.identity_public_key and key != _key(peer)
        )
        if same_identity >= limits.max_connections_per_identity:
            return "too many connections from this identity"
        if is_device:
            if len(self._peers) >= limits.max_connections and not self._evict_a_stranger():
                return "too many connections"
            return None
        same_ip = sum(1 for p in self._peers.values() if not p.is_device and p.ip == ip)
        if same_ip >= limits.max_strangers_per_ip:
            return "too many connections from this address"
        full = len(self._peers) >= limits.max_connections or (
            self._strangers() >= limits.stranger_slots
        )
        if full and not self._evict_a_stranger(idle_for=limits.stranger_evictable_after):
            return "too many connections"
        return None

    def _evict_a_stranger(self, idle_for: float = 0.0) -> bool:
        """Make room: close the stranger idle the longest, if it has been idle ``idle_for``
        (our devices take a slot from any stranger; a new stranger only from an idle one that
        dialed us, never from a storage link we chose and keep open for its notices)."""
        strangers = [
            peer
            for peer in self._peers.values()
            if not peer.is_device and not (idle_for and peer.info.direction is Direction.OUTBOUND)
        ]
        if not strangers:
            return False
        victim = min(strangers, key=lambda peer: peer.connection.last_message_at)
        quiet = trio.current_time() - victim.connection.last_message_at
        if quiet < idle_for:
            return False
        reason = (
            f"node full: slot given to a new peer after {quiet:.0f}s without a request"
            if idle_for
            else "node full: slot taken by its own device"
        )
        self._stop_peer(victim, CloseCode.GOING_AWAY, reason)
        return True

    async def _serve(
        self, connection: SecureConnection, direction: Direction, reply: Reply[PeerInfo] | None
    ) -> None:
        """Run one authenticated connection until it ends (this task owns it)."""
        ip = _host(connection.remote_address)
        # Only a device handshake (the PSK, and a certificate of our identity) makes a device.
        is_device = connection.mode is Mode.DEVICE
        refusal = self._admission_error(connection.peer, ip, is_device)
        if refusal is not None:
            if reply is not None:
                reply.err(refusal, "limit")
            if direction is Direction.INBOUND:
                self._noise.report(
                    "admission", "refused %s from %s: %s", connection.peer, ip, refusal
                )
            await connection.aclose(CloseCode.POLICY_VIOLATION, refusal)
            return
        if is_device:
            connection.restrict_reassembly(DEFAULT_MAX_MESSAGE_SIZE, self._device_budget)
        else:
            connection.restrict_reassembly(
                self._limits.stranger_max_message_size, self._stranger_budget
            )
            connection.throttle(self._stranger_pace.take)
        ours_static = self._credentials.static_key.public
        initiator_static = (
            ours_static
            if direction is Direction.OUTBOUND
            else connection.peer.noise_static_public_key
        )
        outbox, inbox = trio.open_memory_channel[tuple[Message, Reply[None]]](
            self._limits.send_queue
        )
        info = PeerInfo(
            connection.peer,
            connection.remote_address,
            direction,
            trio.current_time(),
            is_device,
            connection.suite,
        )
        peer = _Peer(info, connection, initiator_static, outbox, inbox, is_device, ip)
        kept = self._install(peer)
        if kept is not peer:
            if reply is not None:
                # The device dialed us too, and its connection won the tie-break: ours is
                # connected to it all the same, over that one (its ``direction`` says so). An
                # error here left a node whose storage peer also chose it without that peer.
                reply.ok(kept.info)
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

    def _install(self, peer: _Peer) -> _Peer:
        """Register ``peer`` and resolve a duplicate; return the connection kept (``peer``, or
        the one already there when ``peer`` is the one to drop)."""
        key = _key(peer.info.peer)
        existing = self._peers.get(key)
        if existing is not None:
            if existing.initiator_static == peer.initiator_static:
                self._stop_peer(existing, CloseCode.NORMAL, "replaced by a newer connection")
            elif existing.initiator_static < peer.initiator_static:
                return existing
            else:
                self._stop_peer(existing, CloseCode.NORMAL, "duplicate connection")
        self._peers[key] = peer
        return peer

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
                if message.type in _OWN_PROBE_NAMES:
                    await self._own_message(peer, message)
                    continue
                await self._emit(Inbound(peer.info, message))
        except ConnectionClosed as closed:
            return str(closed)
        except WireError as error:
            # The connection already closed itself with this reason (see SecureConnection).
            self._noise.report(
                "protocol-device" if peer.is_device else "protocol-stranger",
                "protocol error from %r (%s): %s",
                peer.info.peer,
                "own device" if peer.is_device else "stranger",
                error,
            )
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
        """Ping a quiet peer; close one that is gone, idle (a stranger) or stuck mid-message.

        Wakes at the next deadline, and when a partial message begins (the connection's
        ``on_partial``) to take that message's deadline; it used to wake every half partial
        timeout to look for one (most of its wake-ups on a quiet link).

        Every check compares the clock with the same deadline sum the wake-up was computed
        from (``now >= since + timeout``, never ``now - since >= timeout``), and the clock is
        read as at least the deadline slept to: in floating point ``(a + 60) - a`` is below
        60 for ~2% of ``a``, and then a loop that woke at its deadline found nothing due,
        slept 0 s and spun. Under a virtual clock the spin never ends (time only moves when
        every task waits), so a sim froze at that instant.
        """
        limits = self._limits
        connection = peer.connection
        if peer.is_device:
            partial_timeout = limits.device_partial_timeout
            interval, silence = limits.keepalive_interval, limits.idle_timeout
        else:
            partial_timeout = limits.stranger_partial_timeout
            interval = limits.stranger_keepalive_interval
            silence = limits.stranger_silence_timeout
        if peer.info.direction is Direction.INBOUND:
            # The dialer pings (its side needs the NAT mapping kept open) and we answer; we
            # ping only if it falls silent for two of its intervals. Both sides pinging made
            # four frames an interval on every quiet link where two do the same work.
            interval *= 2
        next_ping = trio.current_time() + interval
        connection.on_partial = lambda: peer.partial_begun.set()
        while True:
            wake = min(next_ping, connection.last_received_at + silence)
            if connection.partial_since is not None:
                wake = min(wake, connection.partial_since + partial_timeout)
            if not peer.is_device:
                wake = min(wake, connection.last_message_at + limits.stranger_idle_timeout)
            with trio.move_on_at(wake):
                await peer.partial_begun.wait()
            if peer.partial_begun.is_set():
                peer.partial_begun = trio.Event()
                continue  # a new deadline: the partial message's
            now = max(trio.current_time(), wake)
            received = connection.last_received_at
            if now >= received + silence:
                idle = now - received
                self._stop_peer(
                    peer, CloseCode.TIMEOUT, f"no traffic for {idle:.0f}s (idle timeout)"
                )
                return
            last_message = connection.last_message_at
            if not peer.is_device and now >= last_message + limits.stranger_idle_timeout:
                quiet = now - last_message
                self._stop_peer(
                    peer, CloseCode.TIMEOUT, f"no request for {quiet:.0f}s (stranger idle timeout)"
                )
                return
            started = connection.partial_since
            if started is not None and now >= started + partial_timeout:
                self._noise.report(
                    "partial-timeout",
                    "closing %r: a message begun %.0fs ago is still unfinished",
                    peer.info.peer,
                    now - started,
                )
                self._stop_peer(
                    peer,
                    CloseCode.TIMEOUT,
                    f"message not completed within {partial_timeout:g}s",
                )
                return
            if now >= next_ping:
                next_ping = now + interval
                if now >= received + interval:
                    try:
                        await connection.ping()
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
            await deliver(self._events, event)
