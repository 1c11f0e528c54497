"""The peering actor: connections ↔ gossip sessions, and who to dial.

It turns found peers into dials (and redials peers it was told about while they are not
connected), turns transport events into gossip's ``PeerUp``/``Inbound``/``PeerDown`` (one
forwarding task per peer carries gossip's messages to ``transport.Send``), closes connections
gossip cuts off, and measures each device's latency from gossip's own vector exchange
(ask → answer). Nothing here sleeps except with ``trio.sleep``, and nothing is global, so
simulations can run many nodes in one process under a ``MockClock``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, assert_never

import trio

from actors import discovery as dc
from actors import gossip as gs
from actors import router as qr
from actors import shard_keeper as sk
from actors import storage as sg
from actors import transport as tp
from actors.runtime import Address, Err, Mailbox, Ok, Reply, Result, call
from dmgn import storage_protocol as sp
from dmgn.reputation import NEUTRAL, Reputation
from wire import (
    Message,
)

log = logging.getLogger("dmgn.peering")

#: Storage requests and replies: answered by peer identity (see `Peering._inbound`).
_STORAGE_NAMES = sp.REQUEST_NAMES | {sp.REPLY.name}

__all__ = [
    "AddPeer",
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
#: A connection that ends sooner than this after it came up counts as a failed dial for the
#: backoff: a node that accepts the handshake and then refuses us (full, or we are a stranger
#: to it) must not be redialed at once; issue 12 saw ~120 handshakes a second from that.
STABLE_CONNECTION = 30.0
#: Backoff before the n-th consecutive redial is ``BACKOFF_BASE * 2**(n-1)`` capped at the
#: redial interval, times a random factor in [1 - JITTER, 1]: devices that lost a node at the
#: same moment do not come back in lockstep.
BACKOFF_BASE = 1.0
JITTER = 0.5
#: A storage peer (another identity's node) is needed once a sync round (60 s by default:
#: the keeper's mail heads and pushes), and a shard on a peer away for less than the keeper's
#: ``down_grace`` is not repaired; so one that keeps failing is redialed at most this often,
#: not every redial interval. Our own devices keep the redial interval (an op waits for
#: them). At 100 nodes with 30% churn, storage peers redialed every 5 s made 225,000 refused
#: dials in a virtual hour, the largest item of the run's CPU.
STORAGE_REDIAL_CEILING = 60.0
#: A node that seems to be offline itself (every target failed in turn, no connection) probes
#: one target at a time, first once a redial interval, then at twice the gap after each failed
#: probe up to this ceiling: a laptop without a network dials nothing forever at the redial
#: interval (at 100 nodes with 30% churn, offline nodes' probes were 41% of all dials), and
#: one back on the network finds its peers within this at worst (its own devices dial it
#: sooner: they keep the redial interval). At 30 s, devices that take one-minute turns
#: online (tests/sims/test_sim_faults.py) lost half a turn to it and missed ops.
ALONE_PROBE_CEILING = 15.0
#: Found peers (mDNS, DHT) are forgotten after this long without being found again, unless
#: their record says otherwise; bootstrap peers and ``add_peer`` addresses are never forgotten.
FOUND_PEER_TTL = 3600.0
#: A found peer whose reputation is below this is not dialed (it violated the protocol or
#: failed audits recently; evidence decays, so it is dialed again once that has faded). Bootstrap
#: and added peers are dialed whatever their score: a person asked for them.
DIAL_FLOOR = 25.0
#: While a found peer is held back below the dial floor, the dial loop looks again this
#: often: it comes back above the floor as its record decays, and no event says when.
#: Everything else the loop waits for has a time (a redial, a probe, a found peer's expiry)
#: or wakes it (a peer up or down, a find, a dial's end), so with nobody held back it sleeps
#: until one of those. It looked every redial interval: at 100 nodes a sim hour's 124,643
#: dial-loop passes were a tenth of the run's CPU, most of them finding nothing to do; then
#: every DIAL_RECHECK, a fifth of the passes left (the sim has nobody under the floor).
DIAL_RECHECK = 60.0
#: Dials in flight at once; when more targets are due, the best-reputed go first.
MAX_PARALLEL_DIALS = 8
#: Devices found on the LAN that turned out to be another identity, remembered so that mDNS
#: finds of them are not dialed again (bounded: the oldest are forgotten first).
MAX_FOREIGN = 1024
#: A bootstrap or added address that answered only in storage mode is probed: asked inside
#: its storage session whether it holds our device PSK (`tp.AskOwn`), and dialed in device mode
#: if it does (one of our own devices whose device handshake was broken once must not stay a
#: storage peer): first DEVICE_PROBE_FIRST redial intervals after it connected (a minute at
#: the production 5 s), then doubling up to DEVICE_PROBE_CEILING while it says no: 8 in the
#: first hour, then 6 an hour. Nearly every such address is another identity's storage node.
#: The probe was a device-mode dial until the question existed: with the first after one
#: redial interval and a 300 s ceiling, ~17 refused device handshakes a storage link an hour
#: (most of a 500-node sim hour's 62,500 device-to-storage connections); with this schedule,
#: still half of all connections in a 100-node sim hour. Redials of such an address skip the
#: device handshake (`tp.DialStorage`). The ceiling bounds how long two of our devices stay
#: storage peers after someone on the path forged refusals of their device handshakes (the
#: close code before the handshake ends is not authenticated; the question's answer is):
#: ten minutes after the forging stops.
DEVICE_PROBE_FIRST = 12
DEVICE_PROBE_CEILING = 600.0
#: How often the reputation table is saved when it changed, and the shard keeper's audit
#: findings are folded into it.
REPUTATION_SAVE_INTERVAL = 60.0


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


PeeringMsg = AddPeer | PeeringState | CutOff | Reannounce | OwnAddresses


@dataclass
class _AddressHealth:
    failures: int = 0
    next_dial: float = 0.0
    last_error: str | None = None


@dataclass
class _Target:
    addrs: tuple[str, ...]
    source: str
    device_id: bytes | None = None
    identity: bytes | None = None
    permanent: bool = False
    expires_at: float | None = None  # trio clock
    dialing: bool = False
    failures: int = 0
    next_dial: float = 0.0
    last_error: str | None = None
    is_self: bool = False
    health: dict[str, _AddressHealth] = field(default_factory=dict)
    #: Connected, but in storage mode, and we did not know who it was: probe device mode.
    storage_only: bool = False
    probes: int = 0
    next_probe: float = 0.0
    #: Its last connection ended within STABLE_CONNECTION (it answered, then refused us):
    #: it backs off whatever our own connectivity, unlike a target we could not reach.
    ended_early: bool = False
    #: When a dial of it last started (trio clock).
    last_tried: float = -math.inf


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
    ) -> None:
        """``rng`` draws the backoff jitter; by default it is seeded with the device id, so
        devices differ from each other and a simulation replays exactly."""
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
        #: Messages gossip and the query router handed to our own devices, by message type
        #: (``gossip.ops`` carries ops; ``gossip.vector``/``gossip.want`` are anti-entropy):
        #: sims count messages per op from it. Noise keepalives are the transport's, not here.
        self.sent_to_devices: dict[str, int] = {}
        self._events = events
        self._found = found
        self._redial_interval = redial_interval
        #: When the dial loop last started a dial (trio clock): with no connection at all it
        #: dials something at least once a redial interval.
        self._last_dial_at = -math.inf
        #: Dials that failed while we had no connection, since our last connection.
        self._failed_alone = 0
        self._targets: dict[str, _Target] = {}
        for address in bootstrap:
            self._targets[address] = _Target((address,), "bootstrap", permanent=True)
        self._connections: dict[str, _Connection] = {}  # by peer id
        #: How many of those connections each device id has (kept with ``_connections``): the
        #: dial loop asks on every pass, and storage nodes have dozens of connections.
        self._device_ids: collections.Counter[bytes] = collections.Counter()
        self._wakeup = trio.Event()
        #: The dial loop's sleep (None while it works): a dial that ends only moves its
        #: deadline earlier, instead of waking the loop to look at every target again.
        self._dial_sleep: trio.CancelScope | None = None
        #: Whether due targets waited for a free dial slot in the last pass.
        self._capped = False
        self._nursery: trio.Nursery | None = None
        #: One score per peer (dmgn.reputation), kept in ``reputation_path`` across restarts.
        self._reputation_path = reputation_path
        self._reputation = reputation or Reputation()
        self._reputation_loaded = reputation is not None or reputation_path is None
        self._keeper_scores: dict[str, int] = {}
        #: Addresses that reach ourselves (told by the node, and learnt by dialing ourselves).
        self._own: set[str] = set()
        #: LAN devices that are another identity (never dialed again; see _take_found), by
        #: device id *and* the addresses it was announced at: the refusal that put one here
        #: is a close reason the remote chose, so an attacker announcing one of our devices'
        #: ids at its own address must not make us ignore that device's own announcements.
        self._foreign: dict[tuple[bytes | None, str], None] = {}
        #: Peers a dial of ours reached over a connection they had started, whose PeerUp has
        #: not arrived yet (chosen when it does; see _choose).
        self._chosen_early: set[str] = set()

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
            task_status.started()
            async for message in self.mailbox:
                match message:
                    case AddPeer():
                        self._targets.setdefault(
                            message.address, _Target((message.address,), "added", permanent=True)
                        )
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
                        self._own |= message.addrs
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
        self._failed_alone = 0
        if not self._connections:
            # The first connection after none: we were probably offline ourselves (see the
            # dial loop), not every peer; whatever backed off meanwhile is due again now.
            now = trio.current_time()
            for target in self._targets.values():
                if target.ended_early:
                    continue
                target.next_dial = min(target.next_dial, now)
                for health in target.health.values():
                    health.next_dial = min(health.next_dial, now)
            self._wake()
        replaced = self._connections.get(peer_id)
        if replaced is not None:
            self._count_device(replaced, -1)
        self._connections[peer_id] = connection
        self._count_device(connection, +1)
        self._reputation.connected(peer_id, info.is_device)
        for target in self._targets.values():
            if target.device_id == info.peer.device_id:
                target.last_error = None
        await self._gossip_peer_up(connection)
        if info.direction is tp.Direction.OUTBOUND or peer_id in self._chosen_early:
            self._chosen_early.discard(peer_id)
            await self._choose(connection)
        await self._router_peer_up(connection)

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
        if self._keeper is not None:
            with contextlib.suppress(Exception):  # keeper gone (node stopping)
                await self._keeper.send(sk.StoragePeerUp(connection.info.peer))
            await self._tell_keeper(connection.peer_id)

    async def _chose_connected(self, info: tp.PeerInfo) -> None:
        """Our dial found the connection the peer had started (it dialed us too, and the
        transport kept that one; see ``tp.Dial``): that connection is the one we chose."""
        peer_id = self.peer_id(info)
        connection = self._connections.get(peer_id)
        if connection is not None and connection.info is info:
            await self._choose(connection)
        elif not info.is_device:
            self._chosen_early.add(peer_id)  # its PeerUp is still on the way

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
        with contextlib.suppress(Exception):  # keeper gone (node stopping)
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
        except Exception:  # router gone for good (node stopping): nothing to tell
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
        except Exception:  # gossip gone for good (node stopping): nothing to tell
            send.close()

    async def _peer_down(self, info: tp.PeerInfo, reason: str) -> None:
        peer_id = self.peer_id(info)
        connection = self._connections.get(peer_id)
        if connection is None or connection.info is not info:
            return  # a replaced duplicate: the newer connection is still up
        del self._connections[peer_id]
        self._count_device(connection, -1)
        log.info("disconnected from %s: %s", peer_id, reason)
        self._reputation.disconnected(
            peer_id,
            info.is_device,
            question_open=connection.asked_at is not None,
        )
        lived = trio.current_time() - info.connected_at
        for target in self._targets.values():
            if target.device_id != info.peer.device_id:
                continue
            target.ended_early = lived < STABLE_CONNECTION
            if lived >= STABLE_CONNECTION:
                target.failures = 0
            else:
                target.failures += 1
                target.last_error = f"connection ended after {lived:.1f}s: {reason}"
                target.next_dial = trio.current_time() + self._backoff(
                    target.failures, self._is_storage_target(target)
                )
        with contextlib.suppress(Exception):
            await self._gossip.send(gs.PeerDown(peer_id))
        self._chosen_early.discard(peer_id)
        if self._keeper is not None and connection.chosen:
            with contextlib.suppress(Exception):  # keeper gone (node stopping)
                await self._keeper.send(sk.StoragePeerDown(info.peer))
        if self._router is not None and connection.router_send is not None:
            with contextlib.suppress(Exception):
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
        if message.type.startswith("query."):
            if self._router is not None and connection.router_send is not None:
                with contextlib.suppress(Exception):
                    await self._router.send(qr.Inbound(peer_id, message))
            return  # a storage peer has no query session: dropped
        if message.type in sp.REQUEST_NAMES:
            if self._storage is not None:
                # A storage service that cannot keep up drops requests (the requester retries
                # later) rather than stall this peer's connection and every other peer's.
                request = sg.StorageRequest(info.peer, message)
                with contextlib.suppress(Exception):
                    if self._storage.try_send(request):
                        return  # (the usual case, without the deadline's cancel scope)
                with trio.move_on_after(STORAGE_HANDOFF) as late, contextlib.suppress(Exception):
                    await self._storage.send(request)
                if late.cancelled_caught:
                    log.info("storage service busy: dropped a %s from %s", message.type, peer_id)
            return
        if message.type == sp.REPLY.name:
            if self._keeper is not None:
                with contextlib.suppress(Exception):  # keeper gone (node stopping)
                    await self._keeper.send(sk.StorageReply(info.peer, message))
            return
        if message.type == sp.MAIL_NOTIFY.name:
            # Only from a storage peer we chose: one that dialed us is not the keeper's peer.
            if self._keeper is not None and connection is not None and connection.chosen:
                with contextlib.suppress(Exception):  # keeper gone (node stopping)
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
        with contextlib.suppress(Exception):
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

    # -- found peers → dials ---------------------------------------------------------------

    def _wake(self) -> None:
        self._wakeup.set()

    async def _take_found(self) -> None:
        async for found in self._found:
            if found.source == "mdns" and all(
                (found.device_id, a) in self._foreign for a in found.addrs
            ):
                continue  # a stranger in range: not ours, not chosen as a storage peer
            key = found.device_id.hex() if found.device_id else found.addrs[0]
            target = self._targets.get(key)
            if target is None:
                target = self._targets[key] = _Target(
                    found.addrs, found.source, permanent=found.source == "bootstrap"
                )
            target.addrs = tuple(
                a for a in found.addrs if (found.device_id, a) not in self._foreign
            )
            if any(a not in self._own for a in found.addrs):
                target.is_self = False
            target.device_id = found.device_id or target.device_id
            target.identity = found.identity or target.identity
            if found.source == "mdns":
                # Everyone in radio range announces on mDNS: we dial them only as devices of
                # our own identity. The handshake then checks the responder's certificate
                # before we send ours, so a stranger we found never sees who we are (issue 20;
                # storage peers are chosen: bootstrap, add_peer or the DHT, not the LAN).
                target.identity = self._identity
            if found.source != "bootstrap":
                target.source = found.source
            ttl = FOUND_PEER_TTL
            if found.expires_at is not None:
                ttl = max(0.0, min(ttl, found.expires_at - time.time()))
            target.expires_at = None if target.permanent else trio.current_time() + ttl
            self._wake()

    def _count_device(self, connection: _Connection, change: int) -> None:
        device_id = connection.info.peer.device_id
        self._device_ids[device_id] += change
        if self._device_ids[device_id] <= 0:
            del self._device_ids[device_id]

    def _connected_device(self, device_id: bytes | None) -> bool:
        return device_id is not None and device_id in self._device_ids

    async def _dial_loop(self) -> None:
        assert self._nursery is not None
        while True:
            now = trio.current_time()
            soonest = math.inf
            held_back = False  # a found peer under the dial floor (see DIAL_RECHECK)
            due: list[_Target] = []
            for key, target in list(self._targets.items()):
                if target.expires_at is not None:
                    if now >= target.expires_at:
                        del self._targets[key]
                        continue
                    soonest = min(soonest, target.expires_at)
                if target.is_self or target.dialing:
                    continue
                if self._connected_device(target.device_id):
                    if not target.storage_only:
                        continue
                    if now < target.next_probe:
                        soonest = min(soonest, target.next_probe)
                        continue
                    due.append(target)  # a device-mode probe of a storage-only connection
                    continue
                if now < target.next_dial:
                    soonest = min(soonest, target.next_dial)
                    continue
                if not target.permanent and self._target_score(target) < DIAL_FLOOR:
                    held_back = True
                    continue
                due.append(target)
            if held_back:
                soonest = min(soonest, now + max(self._redial_interval, DIAL_RECHECK))
            # Best reputation first, and a bounded number at once.
            due.sort(key=self._target_score, reverse=True)
            in_flight = sum(t.dialing for t in self._targets.values())
            if not self._connections:
                # No connection at all: perhaps our own network was gone, not every peer, and
                # storage peers back off to a minute. At least one dial per redial interval
                # (the one tried longest ago, due or not) notices that we are back within it
                # (within ALONE_PROBE_CEILING once we seem offline); the first connection
                # then makes every target due again (_peer_up).
                dialable = [
                    t
                    for t in self._targets.values()
                    if not t.is_self and (t.permanent or self._target_score(t) >= DIAL_FLOOR)
                ]
                gap = self._redial_interval
                if dialable and self._failed_alone >= len(dialable):
                    # As many dials failed in a row as we have targets, with no connection:
                    # most likely we are the one offline (a laptop without a network), and
                    # each target's own backoff would keep dialing into nothing: that probe
                    # alone, then, each target in turn, further apart after each failure.
                    # In a sim hour with 30% churn, offline nodes made 57% of all refused
                    # dials; with the probe once a redial interval, still 41%.
                    due = []
                    doubling = min(self._failed_alone - len(dialable), 32)
                    gap = min(max(gap, ALONE_PROBE_CEILING), gap * 2.0**doubling)
                probe_at = self._last_dial_at + gap
                if not due and in_flight == 0 and now >= probe_at:
                    due = sorted(
                        (t for t in dialable if not t.dialing and not t.ended_early),
                        key=lambda t: (t.last_tried, -self._target_score(t)),
                    )[:1]
                if probe_at > now:
                    soonest = min(soonest, probe_at)
                # (Otherwise a dial is in flight, or was just started: its end wakes us.)
            if due:
                self._last_dial_at = now
            room = max(0, MAX_PARALLEL_DIALS - in_flight)
            self._capped = len(due) > room
            for target in due[:room]:
                target.dialing = True
                target.last_tried = now
                self._nursery.start_soon(self._dial, target)
            self._wakeup = trio.Event()
            with trio.move_on_at(soonest) as self._dial_sleep:
                await self._wakeup.wait()
            self._dial_sleep = None

    def _dial_order(self, target: _Target) -> list[str]:
        """The target's addresses worth a try now: never our own; those backing off after
        failures only when nothing else is left; fewest failures first."""
        now = trio.current_time()
        candidates = [a for a in target.addrs if a not in self._own]
        ready = [
            a for a in candidates if target.health.setdefault(a, _AddressHealth()).next_dial <= now
        ]
        return sorted(ready or candidates, key=lambda a: target.health[a].failures)

    async def _dial(self, target: _Target) -> None:
        if target.storage_only and self._connected_device(target.device_id):
            try:
                if trio.current_time() >= target.next_probe:
                    await self._probe_device_mode(target)
            finally:
                self._dial_done(target)
            return
        try:
            errors = []
            order = self._dial_order(target)
            if not order and target.addrs:
                target.is_self = True  # every address it has is one of ours
                return
            for address in order:
                health = target.health[address]
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
                    target.storage_only = not result.value.is_device and target.identity is None
                    if target.storage_only:
                        # Never at the moment it (re)connected, whatever the schedule says.
                        first = trio.current_time() + DEVICE_PROBE_FIRST * self._redial_interval
                        target.next_probe = max(target.next_probe, first)
                    peer = result.value.peer
                    if peer.device_id == self._device_id:
                        # Our own listener (a shared config, an address of ours a peer
                        # announced): remembered, never dialed again.
                        self._own.add(address)
                        target.is_self = not [a for a in target.addrs if a not in self._own]
                        closed = await call(self._transport, tp.Close, peer, "dialed ourselves")
                        if isinstance(closed, Err):  # already gone: nothing left to close
                            log.debug("closing a dial to ourselves: %s", closed.reason)
                        return
                    target.device_id = peer.device_id
                    if result.value.direction is tp.Direction.INBOUND:
                        await self._chose_connected(result.value)
                    target.last_error = None  # failures reset once the connection proves stable
                    health.failures, health.last_error, health.next_dial = 0, None, 0.0
                    # Its PeerUp is still on the way through the events channel: until then
                    # the dial loop would see it unconnected and dial it again (a second
                    # handshake, replacing this connection).
                    target.next_dial = trio.current_time() + self._redial_interval
                    return
                errors.append(result.reason)
                if (
                    target.source == "mdns"
                    and target.device_id is not None
                    and "different identity" in result.reason  # wire's IdentityError text
                ):
                    self._forget_foreign(target, address)
                    continue
                health.failures += 1
                health.last_error = result.reason
                health.next_dial = trio.current_time() + self._backoff(
                    health.failures, self._is_storage_target(target)
                )
            target.failures += 1
            if not self._connections:
                self._failed_alone += 1
            target.ended_early = False  # not reached this time: maybe our network, maybe its
            target.last_error = errors[-1] if errors else "no address"
            backoff = self._backoff(target.failures, self._is_storage_target(target))
            target.next_dial = trio.current_time() + backoff
            log.debug(
                "dial %s failed (%s); next try in %gs", target.addrs, target.last_error, backoff
            )
        finally:
            self._dial_done(target)

    def _dial_done(self, target: _Target) -> None:
        target.dialing = False
        sleep = self._dial_sleep
        if self._capped or not self._connections or sleep is None:
            # A due target waits for this dial's slot, or we are alone (one dial at a time,
            # see the dial loop): look again now.
            self._wake()
            return
        # Otherwise only this target's own next time is new to the loop (it was skipped
        # while dialing): at 40 nodes the loop woke once a node-second, mostly for this.
        again = target.next_dial
        if target.storage_only:
            again = min(again, target.next_probe)
        sleep.deadline = min(sleep.deadline, again)

    async def _probe_device_mode(self, target: _Target) -> None:
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
        for address in self._dial_order(target) if ours else ():
            result = await call(
                self._transport, tp.Dial, address, self._identity, None, timeout=DIAL_DEADLINE
            )
            if isinstance(result, Ok) and result.value.is_device:
                target.device_id = result.value.peer.device_id
                target.storage_only, target.probes = False, 0
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
        target.probes += 1
        first = DEVICE_PROBE_FIRST * self._redial_interval
        wait = min(DEVICE_PROBE_CEILING, first * 2.0 ** min(target.probes, 32))
        target.next_probe = trio.current_time() + wait

    def _forget_foreign(self, target: _Target, address: str) -> None:
        """A device found on the LAN answered at ``address`` as another identity: ignore its
        mDNS finds at that address, and drop the target unless it has other addresses."""
        assert target.device_id is not None
        self._foreign[(target.device_id, address)] = None
        while len(self._foreign) > MAX_FOREIGN:
            del self._foreign[next(iter(self._foreign))]
        target.addrs = tuple(a for a in target.addrs if a != address)
        key = target.device_id.hex()
        if not target.addrs and self._targets.get(key) is target:
            self._targets.pop(key)
        log.info("a LAN peer is another identity; not dialing it again at that address")

    def _target_key(self, target: _Target) -> str | None:
        if target.device_id is None:
            return None
        if target.identity is None or target.identity == self._identity:
            return target.device_id.hex()
        return f"{target.identity.hex()[:16]}/{target.device_id.hex()}"

    def _target_score(self, target: _Target) -> float:
        key = self._target_key(target)
        return self._reputation.score(key) if key else NEUTRAL

    def _is_storage_target(self, target: _Target) -> bool:
        """Another identity's node: connected in storage mode, or known by its identity."""
        return target.storage_only or (
            target.identity is not None and target.identity != self._identity
        )

    def _backoff(self, failures: int, storage: bool) -> float:
        # The exponent is capped: 2.0 ** 1024 overflows, and a bootstrap peer that is down for
        # an hour or two (over 1024 failed dials) crashed this actor until the node shut down.
        doubling = min(max(0, failures - 1), 32)
        limit, base = self._redial_interval, BACKOFF_BASE
        if storage:
            # Needed once a sync round: from the redial interval, not from a second. Each
            # storage peer that went away cost every device that used it a redial at 1, 2
            # and 4 s before this; at 100 nodes with 30% churn, storage dials were more than
            # half of all refused dials.
            limit = max(limit, STORAGE_REDIAL_CEILING)
            base = max(base, self._redial_interval)
        ceiling = min(limit, base * 2.0**doubling)
        return ceiling * self._rng.uniform(1.0 - JITTER, 1.0)

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
            )
            for c in self._connections.values()
        )
        targets = tuple(
            DialTarget(
                t.addrs[0],
                t.source,
                t.device_id.hex() if t.device_id else None,
                self._connected_device(t.device_id),
                t.failures,
                t.last_error,
                t.addrs,
                tuple(
                    (a, f"{h.failures} failed dials: {h.last_error}")
                    for a, h in t.health.items()
                    if h.failures and a in t.addrs
                ),
            )
            for t in self._targets.values()
            if not t.is_self
        )
        return PeeringStatus(
            connected, targets, self._reputation.rows(), tuple(sorted(self._received.items()))
        )
