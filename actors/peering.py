"""The peering actor: connections ↔ gossip sessions, and who to dial.

It turns found peers into dials (and redials peers it was told about while they are not
connected), turns transport events into gossip's ``PeerUp``/``Inbound``/``PeerDown`` (one
forwarding task per peer carries gossip's messages to ``transport.Send``), closes connections
gossip cuts off, and measures each device's latency from gossip's own vector exchange
(ask → answer). Nothing here sleeps except with ``trio.sleep``, and nothing is global, so
simulations can run many nodes in one process under a ``MockClock``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, assert_never

import trio

from actors import discovery as dc
from actors import gossip as gs
from actors import router as qr
from actors import shard_keeper as sk
from actors import storage as sg
from actors import transport as tp
from actors._dial_schedule import DialSchedule, Target
from actors._peer_exchange import EXCHANGE_FIRST, EXCHANGE_INTERVAL, PeerExchange
from actors._peer_noise import PeerNoise
from actors._storage_candidates import Candidate
from actors.runtime import ActorGone, Address, Err, Mailbox, Ok, Reply, Result, call
from dmgn import storage_protocol as sp
from dmgn.reputation import NEUTRAL, Reputation
from dmgn.storage_offer import OFFER_CONTEXT, OFFER_LIFETIME, StorageOffer, address_prefix
from wire import (
    Message,
)

log = logging.getLogger("dmgn.peering")

#: Storage requests and replies: answered by peer identity (see `Peering._inbound`).
_STORAGE_NAMES = sp.REQUEST_NAMES | {sp.REPLY.name}
_EXCHANGE_NAMES = frozenset(t.name for t in sp.EXCHANGE_TYPES)

__all__ = [
    "AddPeer",
    "Advertise",
    "ConnectedPeer",
    "CutOff",
    "DialTarget",
    "OwnAddresses",
    "Peering",
    "PeeringMsg",
    "PeeringState",
    "PeeringStatus",
    "Reannounce",
]

#: Messages gossip may queue for one peer before its forwarder hands them to the transport.
PEER_QUEUE = 16
#: How long a forwarder waits before retrying a Send the transport refused as "busy".
BUSY_RETRY = 0.02
#: How long a storage request may wait for room in the storage service's inbox.
STORAGE_HANDOFF = 0.5
#: Deadline for one dial (TCP, WebSocket upgrade and Noise; the transport's own is 10 s each).
DIAL_DEADLINE = 25.0
#: How often the reputation table is saved when it changed, and the shard keeper's audit
#: findings are folded into it.
REPUTATION_SAVE_INTERVAL = 60.0
#: Storage peers we keep connected by default (the keeper's n + 2 with n = 6): placement
#: needs n of them, and two spare keep it going while one or two are away.
STORAGE_PEERS_WANTED = 8


# -- the glue actor -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddPeer:
    """Dial ``address`` now and again whenever it is not connected."""

    address: str
    reply: Reply[None]


@dataclass(frozen=True, slots=True)
class PeeringState:
    reply: Reply[PeeringStatus]


@dataclass(frozen=True, slots=True)
class ConnectedPeer:
    peer_id: str
    device_id: str
    identity: str
    is_device: bool
    address: str
    direction: str
    connected_at: float  # wall clock
    latency_ms: float | None
    #: How we came to this peer: "device" (one of ours), a storage peer we chose (found by
    #: "bootstrap", "added", "exchange", "dht"), or "dialed us" (a node that connected to us
    #: and that we did not choose: it is served, but holds nothing of ours).
    found: str = "device"


@dataclass(frozen=True, slots=True)
class DialTarget:
    address: str
    source: str
    device_id: str | None
    connected: bool
    failures: int
    last_error: str | None
    #: Every address this target is known by, and those that keep failing (address → why).
    addrs: tuple[str, ...] = ()
    failing: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class PeeringStatus:
    connected: tuple[ConnectedPeer, ...]
    targets: tuple[DialTarget, ...]
    #: peer id → score and evidence (see dmgn.reputation), for ``dmgn peers``.
    reputation: dict[str, dict[str, Any]]
    #: Application message types received since start (all peers), with counts.
    received: tuple[tuple[str, int], ...] = ()
    #: Storage peers wanted, chosen storage peers connected, and storage offers held.
    storage_wanted: int = 0
    storage_live: int = 0
    storage_candidates: int = 0
    #: Peer exchange counters (asked, answered, learnt, bad offers, dropped).
    exchange: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class CutOff:
    """Gossip cut this peer off: close its connection, telling it why."""

    peer_id: str
    reason: str
    reply: Reply[None]


@dataclass(frozen=True, slots=True)
class Reannounce:
    """A restarted gossip actor has no sessions: tell it about every open connection."""

    reply: Reply[None]


@dataclass(frozen=True, slots=True)
class OwnAddresses:
    """Every address at which a dial reaches our own listener (our interfaces, loopback, with
    our port): found addresses among them are never dialed."""

    addrs: frozenset[str]
    reply: Reply[None]


@dataclass(frozen=True, slots=True)
class Advertise:
    """The addresses other nodes can dial us at (announced; empty: none yet). With a storage
    service, our storage offer names them (peer exchange)."""

    addrs: tuple[str, ...]
    reply: Reply[None]


PeeringMsg = AddPeer | PeeringState | CutOff | Reannounce | OwnAddresses | Advertise


@dataclass
class _Connection:
    info: tp.PeerInfo
    peer_id: str
    connected_wall: float
    latency: float | None = None
    asked_at: float | None = None
    send: trio.MemorySendChannel[Message] | None = None
    router_send: trio.MemorySendChannel[Message] | None = None
    #: The score the shard keeper last heard for this connection (None: not told yet).
    told_score: float | None = None
    #: Another identity's node we chose (see Peering._choose): the shard keeper's to use.
    chosen: bool = False


class Peering:
    """The glue actor (see the module docstring)."""

    def __init__(
        self,
        *,
        identity: bytes,
        device_id: bytes,
        transport: Address[tp.TransportMessage],
        gossip: Address[gs.GossipMsg],
        events: trio.MemoryReceiveChannel[tp.TransportEvent],
        found: trio.MemoryReceiveChannel[dc.PeerFound],
        bootstrap: tuple[str, ...],
        redial_interval: float,
        mailbox: Mailbox[PeeringMsg] | None = None,
        rng: random.Random | None = None,
        storage: Address[sg.StorageMsg] | None = None,
        keeper: Address[sk.KeeperMsg] | None = None,
        reputation_path: Path | None = None,
        reputation: Reputation | None = None,
        router: Address[qr.RouterMsg] | None = None,
        storage_key: bytes | None = None,
        storage_device_id: bytes | None = None,
        sign_offer: Callable[[bytes, bytes], Awaitable[Result[bytes]]] | None = None,
        storage_peers_wanted: int = STORAGE_PEERS_WANTED,
        rendezvous: bytes | None = None,
        near: int = 0,
        serving_only: Callable[[], Awaitable[bool]] | None = None,
        exchange: bool = True,
    ) -> None:
        """``rng`` draws the backoff jitter; by default it is seeded with the device id, so
        devices differ from each other and a simulation replays exactly.

        ``storage_key``/``storage_device_id`` are what our storage handshakes show, and
        ``sign_offer(context, payload)`` signs with that key (the vault's storage-node key):
        with a storage service, our offer passes them on in peer exchange. ``rendezvous`` is
        where (XOR distance) our identity's mailbox lives: the ``near`` storage nodes closest
        to it are always among our storage peers (actors/_storage_candidates.py).
        ``serving_only()`` says whether this node holds no memories of its own: only such a
        node (a storage host) offers itself in peer exchange; see `_own_offer_bytes`."""
        self.mailbox: Mailbox[PeeringMsg] = mailbox or Mailbox("peering", 32)
        self._rng = rng or random.Random(device_id)
        self._identity = identity
        self._device_id = device_id
        self._transport = transport
        self._gossip = gossip
        #: Storage requests from other identities go to the storage service, their answers to
        #: our requests to the shard keeper, which also hears which storage peers are up.
        self._storage = storage
        self._keeper = keeper
        self._router = router
        self._received: dict[str, int] = {}
        #: Storage requests dropped for a busy service: one line a minute (strangers choose
        #: how many requests they send).
        self._noise = PeerNoise(log, clock=trio.current_time)
        #: Messages gossip and the query router handed to our own devices, by message type
        #: (``gossip.ops`` carries ops; ``gossip.vector``/``gossip.want`` are anti-entropy):
        #: sims count messages per op from it. Noise keepalives are the transport's, not here.
        self.sent_to_devices: dict[str, int] = {}
        self._events = events
        self._found = found
        self._redial_interval = redial_interval
        self._connections: dict[str, _Connection] = {}  # by peer id
        self._wakeup = trio.Event()
        #: The dial loop's sleep (None while it works): a dial that ends only moves its
        #: deadline earlier, instead of waking the loop to look at every target again.
        self._dial_sleep: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        #: One score per peer (dmgn.reputation), kept in ``reputation_path`` across restarts.
        self._reputation_path = reputation_path
        self._reputation = reputation or Reputation()
        self._reputation_loaded = reputation is not None or reputation_path is None
        self._keeper_scores: dict[str, int] = {}
        #: Who to dial, when and where (sans-IO; see actors/_dial_schedule.py). Its scores
        #: are read through the attribute: the table is replaced when it loads at start.
        self._schedule = DialSchedule(
            identity=identity,
            device_id=device_id,
            redial_interval=redial_interval,
            rng=self._rng,
            score=lambda key: self._reputation.score(key),
            neutral=NEUTRAL,
            bootstrap=bootstrap,
        )
        #: Storage nodes found through peer exchange, and which to make our storage peers.
        self._exchange = PeerExchange(
            want=storage_peers_wanted,
            device_id=storage_device_id or device_id,
            rng=random.Random(self._rng.random()),
            score=self._candidate_score,
            rendezvous=rendezvous,
            near=near,
        )
        self._storage_key = storage_key
        self._storage_device_id = storage_device_id
        self._sign_offer = sign_offer
        self._advertise: tuple[str, ...] = ()
        self._own_offer: StorageOffer | None = None
        self._serving_only = serving_only
        #: Peer exchange on (config ``peer_exchange``): off, we neither ask, offer nor dial
        #: what others pass on (we still answer asks, with what we know: nothing).
        self._exchange_on = exchange
        #: (when we last looked, the answer): the store is asked at most once a minute.
        self._serving_checked: tuple[float, bool] | None = None

    def peer_id(self, info: tp.PeerInfo) -> str:
        """Gossip's name for a peer: the device id for our own devices (a device-handshake
        connection); a stranger's is prefixed with the identity (storage key) it showed, so
        nobody can take over one of our devices' sessions by claiming its device id."""
        peer = info.peer
        if info.is_device:
            return peer.device_id.hex()
        return f"{peer.identity_public_key.hex()[:16]}/{peer.device_id.hex()}"

    async def _cut_off(self, peer_id: str, reason: str) -> None:
        connection = self._connections.get(peer_id)
        if connection is not None:
            closed = await call(
                self._transport, tp.Close, connection.info.peer, f"cut off: {reason}"
            )
            if isinstance(closed, Err):
                log.debug("closing cut-off peer %s: %s", peer_id, closed.reason)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self._reputation_loaded and self._reputation_path is not None:
            self._reputation, problem = await trio.to_thread.run_sync(
                Reputation.load, self._reputation_path
            )
            if problem:
                log.warning("%s", problem)
            self._reputation_loaded = True
        try:
            await self._run(task_status)
        finally:
            with trio.CancelScope(shield=True):
                await self._save_reputation()

    async def _save_reputation(self) -> None:
        if self._reputation_path is None or not self._reputation.dirty:
            return
        try:
            await trio.to_thread.run_sync(self._reputation.save, self._reputation_path)
        except OSError as error:
            log.warning("could not save peer reputation to %s: %s", self._reputation_path, error)

    async def _keep_reputation(self) -> None:
        """Save the table when it changed, and fold in the shard keeper's audit findings (its
        score for a storage peer drops by ``sk.PENALTY`` per failed audit item)."""
        while True:
            await trio.sleep(REPUTATION_SAVE_INTERVAL)
            await self._take_audit_findings()
            await self._save_reputation()

    async def _take_audit_findings(self) -> None:
        if self._keeper is None:
            return
        state = await call(self._keeper, sk.KeeperState)
        if isinstance(state, Err):
            return
        for prefix, score in state.value.peer_scores.items():
            before = self._keeper_scores.get(prefix, 0)
            self._keeper_scores[prefix] = score
            failed = max(0, (before - score) // sk.PENALTY)
            if not failed:
                continue
            for peer_id in [k for k in self._reputation.rows() if k.startswith(prefix + "/")]:
                self._reputation.audited(peer_id, failed=failed)
        for peer_id in list(self._connections):
            await self._tell_keeper(peer_id)

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._keep_reputation)
            nursery.start_soon(self._route_events)
            nursery.start_soon(self._take_found)
            nursery.start_soon(self._dial_loop)
            nursery.start_soon(self._exchange_loop)
            task_status.started()
            async for message in self.mailbox:
                match message:
                    case AddPeer():
                        self._schedule.add(message.address)
                        self._wake()
                        message.reply.ok(None)
                    case PeeringState():
                        message.reply.ok(self._status())
                    case CutOff():
                        self._reputation.violated(
                            message.peer_id, "/" not in message.peer_id, message.reason
                        )
                        nursery.start_soon(self._tell_keeper, message.peer_id)
                        # In a task: closing waits for the transport, and gossip (which asked)
                        # must not wait on this loop while it waits on gossip.
                        nursery.start_soon(self._cut_off, message.peer_id, message.reason)
                        message.reply.ok(None)
                    case Reannounce():
                        nursery.start_soon(self._reannounce)
                        message.reply.ok(None)
                    case OwnAddresses():
                        self._schedule.own_addresses(message.addrs)
                        message.reply.ok(None)
                    case Advertise():
                        if message.addrs != self._advertise:
                            self._advertise, self._own_offer = message.addrs, None
                        message.reply.ok(None)
                    case _:
                        assert_never(message)

    async def _reannounce(self) -> None:
        for connection in list(self._connections.values()):
            await self._gossip_peer_up(connection)

    # -- transport events → gossip ---------------------------------------------------------

    async def _route_events(self) -> None:
        async for event in self._events:
            match event:
                case tp.PeerUp(info):
                    await self._peer_up(info)
                case tp.PeerDown(info, reason):
                    await self._peer_down(info, reason)
                case tp.Inbound(info, message):
                    await self._inbound(info, message)

    async def _peer_up(self, info: tp.PeerInfo) -> None:
        peer_id = self.peer_id(info)
        kind = "device" if info.is_device else "storage peer"
        log.info("connected to %s %s (%s, %s)", kind, peer_id, info.address, info.direction.value)
        connection = _Connection(info, peer_id, time.time())
        replaced = self._connections.get(peer_id)
        if self._schedule.connection_up(
            info.peer.device_id,
            None if replaced is None else replaced.info.peer.device_id,
            now=trio.current_time(),
        ):
            self._wake()
        self._connections[peer_id] = connection
        self._reputation.connected(peer_id, info.is_device)
        await self._gossip_peer_up(connection)
        if info.direction is tp.Direction.OUTBOUND or self._schedule.dials(
            info.peer.device_id, info.peer.identity_public_key
        ):
            # Ours, or the connection a node we dial started (it dialed us too, or it came
            # back before our redial): either way one we chose.
            if self._found_by(info) == "exchange":
                # Heard of from another node: it may be one of our own devices offering its
                # storage (its offer cannot say so). Ask inside the session before it gets
                # anything of ours.
                assert self._nursery is not None
                self._nursery.start_soon(self._vet_and_choose, connection)
            else:
                await self._choose(connection)
        if info.is_device:
            # Our own device may know storage nodes we do not (it is all a device whose only
            # bootstrap address is another of ours has to start from).
            assert self._nursery is not None
            self._nursery.start_soon(self._ask_offers, connection)
        await self._router_peer_up(connection)

    def _found_by(self, info: tp.PeerInfo) -> str:
        if info.is_device:
            return "device"
        source = self._schedule.source_of(info.peer.device_id)
        if source is None or not self._schedule.dials(
            info.peer.device_id, info.peer.identity_public_key
        ):
            return "bootstrap" if info.direction is tp.Direction.OUTBOUND else "dialed us"
        return source

    async def _vet_and_choose(self, connection: _Connection) -> None:
        """A storage peer found through exchange: choose it unless it holds our device key."""
        peer = connection.info.peer
        answer = await call(self._transport, tp.AskOwn, peer, timeout=DIAL_DEADLINE)
        if isinstance(answer, Ok) and answer.value:
            log.info("a storage offer was one of our own devices: not a storage peer")
            self._exchange.own_keys.add(peer.identity_public_key)
            self._exchange.candidates.release(peer.identity_public_key)
            self._schedule.forget_device(peer.device_id)
            closed = await call(self._transport, tp.Close, peer, "one of our devices")
            if isinstance(closed, Err):
                log.debug("closing our own device's storage connection: %s", closed.reason)
            self._top_up()
            return
        if self._connections.get(connection.peer_id) is connection:
            await self._choose(connection)

    async def _choose(self, connection: _Connection) -> None:
        """Hand a connection to the shard keeper: another identity's node that WE dialed
        (bootstrap, add_peer, a DHT provider record), over our connection or, when it dialed
        us as well and the transport kept that one, over its. A stranger that dials us
        without our dialing it is served by the storage service but never becomes one of our
        storage peers: the keeper would send it our owner key (mail heads, puts) within a
        second, and the same owner key from two of our devices pairs them for anyone who
        simply dials both."""
        if connection.info.is_device or connection.chosen:
            return
        connection.chosen = True
        self._exchange.candidates.connected(connection.info.peer.identity_public_key)
        if self._keeper is not None:
            with contextlib.suppress(ActorGone):  # keeper gone (node stopping)
                await self._keeper.send(sk.StoragePeerUp(connection.info.peer))
            await self._tell_keeper(connection.peer_id)
        assert self._nursery is not None
        self._nursery.start_soon(self._ask_offers, connection)

    async def _chose_connected(self, info: tp.PeerInfo) -> None:
        """Our dial found the connection the peer had started (it dialed us too, and the
        transport kept that one; see ``tp.Dial``): that connection is the one we chose."""
        peer_id = self.peer_id(info)
        connection = self._connections.get(peer_id)
        if connection is not None and connection.info is info:
            await self._choose(connection)
        # (Otherwise its PeerUp is still on the way, and chooses it: the schedule now knows
        # the device we dialed.)

    async def _tell_keeper(self, peer_id: str) -> None:
        """Give the shard keeper a connected storage peer's current score (placement)."""
        connection = self._connections.get(peer_id)
        if self._keeper is None or connection is None:
            return
        if not connection.chosen:
            return  # our devices and strangers that dialed us are not the keeper's peers
        score = self._reputation.score(peer_id)
        if score == connection.told_score:
            return  # unchanged: the minutely refresh told it every storage peer again
        connection.told_score = score
        with contextlib.suppress(ActorGone):  # keeper gone (node stopping)
            await self._keeper.send(sk.PeerReputation(connection.info.peer, score))

    async def _router_peer_up(self, connection: _Connection) -> None:
        """Our devices (never storage peers: query text stays within the identity) get a
        query session with the router."""
        peer = connection.info.peer
        if self._router is None or not connection.info.is_device:
            return
        assert self._nursery is not None
        send, receive = trio.open_memory_channel[Message](qr.PEER_QUEUE)
        connection.router_send = send
        self._nursery.start_soon(self._forward, connection, receive)
        try:
            await self._router.send(qr.PeerUp(connection.peer_id, peer.device_id, True, send))
        except ActorGone:  # router gone for good (node stopping): nothing to tell
            send.close()

    async def _gossip_peer_up(self, connection: _Connection) -> None:
        assert self._nursery is not None
        send, receive = trio.open_memory_channel[Message](PEER_QUEUE)
        connection.send = send
        peer = connection.info.peer
        self._nursery.start_soon(self._forward, connection, receive)
        try:
            await self._gossip.send(
                gs.PeerUp(
                    connection.peer_id,
                    peer.identity_public_key,
                    connection.info.is_device,
                    send,
                )
            )
        except ActorGone:  # gossip gone for good (node stopping): nothing to tell
            send.close()

    async def _peer_down(self, info: tp.PeerInfo, reason: str) -> None:
        peer_id = self.peer_id(info)
        connection = self._connections.get(peer_id)
        if connection is None or connection.info is not info:
            return  # a replaced duplicate: the newer connection is still up
        del self._connections[peer_id]
        self._exchange.forget_peer(peer_id)
        log.info("disconnected from %s: %s", peer_id, reason)
        self._reputation.disconnected(
            peer_id,
            info.is_device,
            question_open=connection.asked_at is not None,
        )
        now = trio.current_time()
        self._schedule.connection_down(
            info.peer.device_id, lived=now - info.connected_at, reason=reason, now=now
        )
        with contextlib.suppress(ActorGone):
            await self._gossip.send(gs.PeerDown(peer_id))
        if self._keeper is not None and connection.chosen:
            with contextlib.suppress(ActorGone):  # keeper gone (node stopping)
                await self._keeper.send(sk.StoragePeerDown(info.peer))
        if self._router is not None and connection.router_send is not None:
            with contextlib.suppress(ActorGone):
                await self._router.send(qr.PeerDown(peer_id))
        self._wake()

    async def _inbound(self, info: tp.PeerInfo, message: Message) -> None:
        peer_id = self.peer_id(info)
        connection = self._connections.get(peer_id)
        if message.type in _STORAGE_NAMES and connection is not None:
            # Storage messages are answered by peer identity, whichever of two duplicate
            # connections carried them; dropping one would leave a request unanswered.
            pass
        elif connection is None or connection.info is not info:
            return
        self._received[message.type] = self._received.get(message.type, 0) + 1
        if message.type in _EXCHANGE_NAMES:
            if connection is not None:
                await self._take_exchange(connection, message)
            return
        if message.type.startswith("query."):
            if self._router is not None and connection.router_send is not None:
                with contextlib.suppress(ActorGone):
                    await self._router.send(qr.Inbound(peer_id, message))
            return  # a storage peer has no query session: dropped
        if message.type in sp.REQUEST_NAMES:
            if self._storage is not None:
                # A storage service that cannot keep up drops requests (the requester retries
                # later) rather than stall this peer's connection and every other peer's.
                request = sg.StorageRequest(info.peer, message, info.address)
                with contextlib.suppress(ActorGone):
                    if self._storage.try_send(request):
                        return  # (the usual case, without the deadline's cancel scope)
                with trio.move_on_after(STORAGE_HANDOFF) as late, contextlib.suppress(ActorGone):
                    await self._storage.send(request)
                if late.cancelled_caught:
                    self._noise.report(
                        "storage-busy",
                        "storage service busy: dropped a %s from %s",
                        message.type,
                        peer_id,
                        level=logging.INFO,
                    )
            return
        if message.type == sp.REPLY.name:
            if self._keeper is not None:
                with contextlib.suppress(ActorGone):  # keeper gone (node stopping)
                    await self._keeper.send(sk.StorageReply(info.peer, message))
            return
        if message.type == sp.MAIL_NOTIFY.name:
            # Only from a storage peer we chose: one that dialed us is not the keeper's peer.
            if self._keeper is not None and connection is not None and connection.chosen:
                with contextlib.suppress(ActorGone):  # keeper gone (node stopping)
                    await self._keeper.send(sk.MailNotice(info.peer, message))
            return
        if not message.type.startswith("gossip."):
            return  # no other actor speaks on this connection
        if (
            message.type == "gossip.vector"
            and message["ask"] is False
            and connection.asked_at is not None
        ):
            connection.latency = trio.current_time() - connection.asked_at
            connection.asked_at = None
            self._reputation.answered(peer_id, info.is_device, connection.latency * 1000)
        with contextlib.suppress(ActorGone):
            await self._gossip.send(gs.Inbound(peer_id, message))

    async def _forward(
        self, connection: _Connection, receive: trio.MemoryReceiveChannel[Message]
    ) -> None:
        """Carry gossip's messages for one peer to the transport, in order."""
        own = connection.info.is_device
        sent = self.sent_to_devices
        async with receive:
            async for message in receive:
                if message.type == "gossip.vector" and message["ask"] is True:
                    connection.asked_at = trio.current_time()
                while True:
                    result = await call(self._transport, tp.Send, connection.info.peer, message)
                    if isinstance(result, Ok):
                        if own:
                            sent[message.type] = sent.get(message.type, 0) + 1
                        break
                    if result.code != "busy":
                        return  # connection gone: the transport reports PeerDown
                    await trio.sleep(BUSY_RETRY)

    # -- peer exchange: storage peers found, not configured -----------------------------------

    def _candidate_score(self, candidate: Candidate) -> float:
        offer = candidate.offer
        return self._reputation.score(f"{offer.storage_key.hex()[:16]}/{offer.device_id.hex()}")

    def _live_storage(self) -> list[tuple[bytes, bytes, str]]:
        """The storage peers we chose that are connected: (storage key, device id, network
        prefix)."""
        return [
            (
                c.info.peer.identity_public_key,
                c.info.peer.device_id,
                address_prefix(c.info.address),
            )
            for c in self._connections.values()
            if c.chosen and not c.info.is_device
        ]

    def _top_up(self) -> None:
        """Dial enough found storage nodes to keep ``want`` storage peers (see
        actors/_storage_candidates.py for the choice)."""
        if not self._exchange_on:
            return
        picked = self._exchange.candidates.choose(
            self._live_storage(),
            now=trio.current_time(),
            wall=time.time(),
            # Ours, or a target already (a bootstrap or added address that turned out to be
            # this node): a second target for one node would dial it twice.
            exclude=lambda c: (
                c.key in self._exchange.own_keys
                or self._schedule.source_of(c.offer.device_id) not in (None, "exchange")
            ),
        )
        for candidate in picked:
            offer = candidate.offer
            self._schedule.found(
                offer.addrs,
                "exchange",
                offer.device_id,
                offer.storage_key,
                offer.expires_at,
                now=trio.current_time(),
                wall_now=time.time(),
            )
        if picked:
            log.info("dialing %d storage nodes found through peer exchange", len(picked))
            self._wake()

    async def _own_offer_bytes(self) -> bytes | None:
        """Our signed storage offer (None without a storage service or addresses), re-signed
        when a third of its lifetime has passed.

        Only a node that holds no memories of its own offers itself: a storage host, on all
        day. A person's device (a laptop, a phone) still serves whoever dials it, but is not
        passed around as a storage node: it comes and goes, so shards and mailboxes on it
        would be away half the time, and its addresses would travel to strangers across the
        network."""
        if (
            self._storage is None
            or self._sign_offer is None
            or self._storage_key is None
            or self._storage_device_id is None
            or not self._advertise
            or not self._exchange_on
            or not await self._is_serving_only()
        ):
            return None
        wall = int(time.time())
        offer = self._own_offer
        if offer is None or wall >= offer.issued_at + OFFER_LIFETIME // 3:
            unsigned = StorageOffer(
                self._storage_key,
                self._storage_device_id,
                self._advertise[:4],
                wall,
                wall + OFFER_LIFETIME,
            )
            signed = await self._sign_offer(OFFER_CONTEXT, unsigned.signing_payload())
            if isinstance(signed, Err):
                log.warning("could not sign our storage offer: %s", signed.reason)
                return None
            offer = self._own_offer = unsigned.signed(signed.value)
        return offer.encode()

    async def _is_serving_only(self) -> bool:
        if self._serving_only is None:
            return True
        now = trio.current_time()
        if self._serving_checked is None or now - self._serving_checked[0] >= 60.0:
            self._serving_checked = (now, await self._serving_only())
        return self._serving_checked[1]

    async def _ask_offers(self, connection: _Connection) -> None:
        """Ask a storage peer we chose (or one of our devices) which storage nodes it knows,
        giving our own offer: a storage peer may pass it on, and our device learns that this
        storage key is ours (never to be chosen as its storage peer)."""
        if not self._exchange_on:
            return
        message = self._exchange.ask(connection.peer_id, await self._own_offer_bytes())
        result = await call(self._transport, tp.Send, connection.info.peer, message)
        if isinstance(result, Err):
            self._exchange.forget_peer(connection.peer_id)

    async def _take_exchange(self, connection: _Connection, message: Message) -> None:
        info = connection.info
        if message.type == sp.PEERS_OFFERS.name:
            if self._exchange.answered(connection.peer_id, message, wall=time.time()):
                self._top_up()
            return
        answer = self._exchange.answer(
            connection.peer_id,
            message,
            shown_key=info.peer.identity_public_key,
            dialed_us=not connection.chosen,
            own_device=info.is_device,
            # Our devices learn our storage key from our own ask, not from an answer (where
            # nothing tells which offer is the answerer's).
            own_offer=None if info.is_device else await self._own_offer_bytes(),
            now=trio.current_time(),
            wall=time.time(),
            connected=frozenset(
                c.info.peer.identity_public_key
                for c in self._connections.values()
                if not c.info.is_device
            ),
        )
        if answer is not None:
            sent = await call(self._transport, tp.Send, info.peer, answer)
            if isinstance(sent, Err):
                log.debug(
                    "peer exchange answer to %s not sent: %s", connection.peer_id, sent.reason
                )

    async def _exchange_loop(self) -> None:
        """Now and then, while we want more storage peers or candidates, ask one chosen
        storage peer for more; and look at the choice again (a candidate's cooldown ends)."""
        gap = EXCHANGE_FIRST
        while True:
            await trio.sleep(gap * self._rng.uniform(0.75, 1.0))
            chosen = [c for c in self._connections.values() if c.chosen and not c.info.is_device]
            devices = [c for c in self._connections.values() if c.info.is_device]
            if (chosen or devices) and self._exchange.candidates.wanted(len(chosen)):
                await self._ask_offers(self._rng.choice(chosen or devices))
                gap = min(EXCHANGE_INTERVAL, gap * 2)
            self._top_up()

    # -- found peers → dials ---------------------------------------------------------------

    def _wake(self) -> None:
        self._wakeup.set()

    async def _take_found(self) -> None:
        async for found in self._found:
            if self._schedule.found(
                found.addrs,
                found.source,
                found.device_id,
                found.identity,
                found.expires_at,
                now=trio.current_time(),
                wall_now=time.time(),
            ):
                self._wake()

    async def _dial_loop(self) -> None:
        assert self._nursery is not None
        while True:
            plan = self._schedule.plan(trio.current_time())
            for target in plan.dials:
                self._nursery.start_soon(self._dial, target)
            self._wakeup = trio.Event()
            with trio.move_on_at(plan.wake_at) as self._dial_sleep:
                await self._wakeup.wait()
            self._dial_sleep = None

    async def _dial(self, target: Target) -> None:
        schedule = self._schedule
        try:
            if schedule.wants_probe(target):
                if schedule.probe_due(target, trio.current_time()):
                    await self._probe_device_mode(target)
                return
            errors = []
            order = schedule.dial_order(target, trio.current_time())
            if not order and target.addrs:
                schedule.only_ourselves(target)
                return
            for address in order:
                if target.storage_only:
                    # It refused our device handshake before: storage mode at once (the
                    # device-mode probes keep their own schedule once it is connected).
                    result = await call(
                        self._transport,
                        tp.DialStorage,
                        address,
                        target.device_id,
                        timeout=DIAL_DEADLINE,
                    )
                else:
                    result = await call(
                        self._transport,
                        tp.Dial,
                        address,
                        target.identity,
                        target.device_id,
                        timeout=DIAL_DEADLINE,
                    )
                if isinstance(result, Ok):
                    peer = result.value.peer
                    now = trio.current_time()
                    if not schedule.dialed(
                        target, address, peer.device_id, result.value.is_device, now=now
                    ):
                        closed = await call(self._transport, tp.Close, peer, "dialed ourselves")
                        if isinstance(closed, Err):  # already gone: nothing left to close
                            log.debug("closing a dial to ourselves: %s", closed.reason)
                        return
                    if result.value.direction is tp.Direction.INBOUND:
                        await self._chose_connected(result.value)
                    return
                errors.append(result.reason)
                if schedule.address_failed(target, address, result.reason, now=trio.current_time()):
                    log.info("a LAN peer is another identity; not dialing it again at that address")
            backoff = schedule.dial_failed(
                target, errors[-1] if errors else None, now=trio.current_time()
            )
            if (
                target.source == "exchange"
                and target.identity is not None
                # Alone, we are more likely the one offline: not the candidate's fault.
                and schedule.online
                and self._exchange.candidates.failed(target.identity, now=trio.current_time())
            ):
                # Let go: another candidate takes its place.
                schedule.forget(target)
                self._top_up()
            log.debug(
                "dial %s failed (%s); next try in %gs", target.addrs, target.last_error, backoff
            )
        finally:
            self._dial_done(target)

    def _dial_done(self, target: Target) -> None:
        again = self._schedule.dial_done(target)
        sleep = self._dial_sleep
        if again is None or sleep is None:
            self._wake()
        else:
            sleep.deadline = min(sleep.deadline, again)

    async def _probe_device_mode(self, target: Target) -> None:
        """Ask a storage-only target, inside its storage session, whether it holds our device
        PSK (`tp.AskOwn`); if it does, dial it in device mode (expecting our identity), and
        that connection replaces the storage one.

        The device-mode dial was the probe itself until asking was possible: a connection and
        two Noise messages each time, refused by nearly every such target (another identity's
        storage node); now those cost one question and its answer on the open session."""
        storage_device = target.device_id
        storage_peer = next(
            (
                c.info.peer
                for c in self._connections.values()
                if c.info.peer.device_id == storage_device and not c.info.is_device
            ),
            None,
        )
        answer: Result[bool] | None = None
        if storage_peer is not None:
            answer = await call(self._transport, tp.AskOwn, storage_peer, timeout=DIAL_DEADLINE)
        ours = isinstance(answer, Ok) and answer.value
        order = self._schedule.dial_order(target, trio.current_time()) if ours else []
        for address in order:
            result = await call(
                self._transport, tp.Dial, address, self._identity, None, timeout=DIAL_DEADLINE
            )
            if isinstance(result, Ok) and result.value.is_device:
                self._schedule.probe_answered_ours(target, result.value.peer.device_id)
                for connection in list(self._connections.values()):
                    info = connection.info
                    if info.peer.device_id == storage_device and not info.is_device:
                        closed = await call(
                            self._transport, tp.Close, info.peer, "connected as a device"
                        )
                        if isinstance(closed, Err):  # already gone
                            log.debug("closing a storage connection: %s", closed.reason)
                log.info("%s is one of our devices: connected in device mode", address)
                return
        self._schedule.probe_answered_not_ours(target, now=trio.current_time())

    def _status(self) -> PeeringStatus:
        connected = tuple(
            ConnectedPeer(
                c.peer_id,
                c.info.peer.device_id.hex(),
                c.info.peer.identity_public_key.hex(),
                c.info.is_device,
                c.info.address,
                c.info.direction.value,
                c.connected_wall,
                None if c.latency is None else round(c.latency * 1000, 2),
                self._found_by(c.info) if c.chosen or c.info.is_device else "dialed us",
            )
            for c in self._connections.values()
        )
        targets = tuple(
            DialTarget(
                t.addrs[0],
                t.source,
                t.device_id.hex() if t.device_id else None,
                self._schedule.connected_device(t.device_id),
                t.failures,
                t.last_error,
                t.addrs,
                tuple(
                    (a, f"{h.failures} failed dials: {h.last_error}")
                    for a, h in t.health.items()
                    if h.failures and a in t.addrs
                ),
            )
            for t in self._schedule.targets()
            if not t.is_self
        )
        stats = self._exchange.stats
        return PeeringStatus(
            connected,
            targets,
            self._reputation.rows(),
            tuple(sorted(self._received.items())),
            storage_wanted=self._exchange.candidates.want,
            storage_live=len(self._live_storage()),
            storage_candidates=len(self._exchange.candidates),
            exchange={
                "asked": stats.asked,
                "answered": stats.answered,
                "learnt": stats.learnt,
                "bad_offers": stats.bad_offers,
                "dropped": stats.dropped,
                "refused_full": self._exchange.candidates.refused,
            },
        )
