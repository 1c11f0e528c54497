"""Putting a node online: transport, gossip and discovery wired to the memory service.

Entry-point layer (like :mod:`dmgn.service`): the only code that joins those actors. It works on
any ``wire.Network``: ``WebSocketNetwork`` in `dmgn-node`, ``MemoryNetwork`` (or ``sims``' own)
in simulations and tests, where discovery is usually off and peers are given as addresses.

What runs, all under the node's supervisor so a crash is restarted and shutdown is structured::

    discovery ──PeerFound──► peering ──Dial──► transport ──events──► peering ──► gossip
                               ▲   Send/Close (per-peer forwarder)      │            │
                               └────────────────────────────────────────┘            │
    service ──Publish──► gossip ──ApplyOps──► service (store + index) ◄───────────────┘

``peering`` is the glue actor of this module. It turns found peers into dials (and redials
peers it was told about while they are not connected), turns transport events into gossip's
``PeerUp``/``Inbound``/``PeerDown`` (one forwarding task per peer carries gossip's messages to
``transport.Send``), closes connections gossip cuts off, and measures each device's latency from
gossip's own vector exchange (ask → answer). Nothing here sleeps except with ``trio.sleep``, and
nothing is global, so simulations can run many nodes in one process under a ``MockClock``.

Usage::

    async with open_node(seed, device_id, data_dir) as node:
        online = await start_networking(node, WebSocketNetwork(),
                                        NetworkSettings.from_config(config), data_dir)
        online.listen_addrs      # what peers can dial (also in node.info.listen_addrs)
        online.add_peer("ws://10.0.0.2:4001")   # dialed now and redialed while unreachable
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from actors import discovery as dc
from actors import gossip as gs
from actors import store as st
from actors import transport as tp
from actors import vault as vt
from actors.runtime import ActorSpec, Address, Err, Mailbox, Ok, Reply, Result, call
from dmgn import feed
from dmgn.config import Config
from dmgn.errors import ConfigError
from dmgn.service import RunningNode, expect
from wire import (
    CERTIFICATE_CONTEXT,
    ConnectionHandler,
    DeviceCertificate,
    DeviceCredentials,
    KeyPair,
    Message,
    MessageStream,
    Network,
    PeerIdentity,
)

log = logging.getLogger("dmgn.networking")

__all__ = [
    "CountingNetwork",
    "NetworkSettings",
    "Networking",
    "WireCounters",
    "device_credentials",
    "publish_unsynced",
    "reachable_addresses",
    "start_networking",
]

#: Messages gossip may queue for one peer before its forwarder hands them to the transport.
PEER_QUEUE = 16
#: How long a forwarder waits before retrying a Send the transport refused as "busy".
BUSY_RETRY = 0.02
#: Deadline for one dial (TCP, WebSocket upgrade and Noise; the transport's own is 10 s each).
DIAL_DEADLINE = 25.0
#: Found peers (mDNS, DHT) are forgotten after this long without being found again, unless
#: their record says otherwise; bootstrap peers and ``add_peer`` addresses are never forgotten.
FOUND_PEER_TTL = 3600.0


@dataclass(frozen=True)
class NetworkSettings:
    """How a node goes online. ``from_config`` reads config.json's fields."""

    #: Where to accept connections (``ws://0.0.0.0:4001``; ``mem://name`` in sims); None: dial
    #: out only.
    listen_addr: str | None
    bootstrap: tuple[str, ...] = ()
    #: Addresses to announce; empty: derived from the bound listener (see reachable_addresses).
    advertise: tuple[str, ...] = ()
    sync_interval: float = gs.DEFAULT_SYNC_INTERVAL
    max_connections: int = 64
    #: Discovery actor (DHT and/or Zeroconf). Off for in-memory networks.
    discovery: bool = True
    mdns: bool = True
    #: DHT UDP port: 0 = same number as the WebSocket port; None = no DHT.
    dht_port: int | None = 0
    #: Interfaces Zeroconf uses (None: all); tests pass ``["127.0.0.1"]``.
    mdns_interfaces: list[str] | None = None
    #: Longest wait before an unreachable known peer is dialed again (backoff starts at 1 s).
    redial_interval: float = 5.0
    transport_limits: tp.TransportLimits | None = None

    @classmethod
    def from_config(cls, config: Config) -> NetworkSettings:
        return cls(
            listen_addr=config.listen_addr,
            bootstrap=tuple(config.bootstrap_peers),
            sync_interval=config.sync_interval_seconds,
            max_connections=config.max_connections,
            mdns=config.mdns,
            dht_port=config.dht_port,
        )


# -- counting bytes on the wire -----------------------------------------------------------------


@dataclass
class WireCounters:
    """Bytes and frames through a network, as the transport wrote and read them (Noise
    ciphertext and framing included; TCP/WebSocket headers not)."""

    bytes_out: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    frames_in: int = 0


class _CountingStream:
    def __init__(self, inner: MessageStream, counters: WireCounters) -> None:
        self._inner = inner
        self._counters = counters

    @property
    def remote_address(self) -> str:
        return self._inner.remote_address

    async def send_message(self, data: bytes) -> None:
        await self._inner.send_message(data)
        self._counters.bytes_out += len(data)
        self._counters.frames_out += 1

    async def receive_message(self) -> bytes:
        data = await self._inner.receive_message()
        self._counters.bytes_in += len(data)
        self._counters.frames_in += 1
        return data

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        await self._inner.aclose(code, reason)


class CountingNetwork:
    """A ``Network`` that counts what passes through another one (for ``dmgn status`` and the
    sync benchmark's bytes per memory)."""

    def __init__(self, inner: Network) -> None:
        self.inner = inner
        self.counters = WireCounters()

    async def listen(
        self,
        address: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async def counted(stream: MessageStream) -> None:
            await handler(_CountingStream(stream, self.counters))

        await self.inner.listen(address, counted, task_status=task_status)

    def dial(self, address: str) -> AbstractAsyncContextManager[MessageStream]:
        return self._dial(address)

    @asynccontextmanager
    async def _dial(self, address: str) -> AsyncIterator[MessageStream]:
        async with self.inner.dial(address) as stream:
            yield _CountingStream(stream, self.counters)


# -- identity for the wire ----------------------------------------------------------------------


async def device_credentials(vault: Address[vt.VaultMsg], device_id: bytes) -> DeviceCredentials:
    """This device's Noise static key (derived in the vault, stable per device) and the
    identity's certificate over it. The identity secret never leaves the vault."""
    identity = await expect(await call(vault, vt.Whoami))
    private = await expect(await call(vault, vt.DeriveKey, "noise-static:" + device_id.hex()))
    static = KeyPair.from_private(private)
    signature = await expect(await call(vault, vt.Sign, CERTIFICATE_CONTEXT, static.public))
    certificate = DeviceCertificate(
        identity.identity_public_key, device_id, static.public, signature
    )
    return DeviceCredentials(static, certificate)


def reachable_addresses(bound: str) -> tuple[str, ...]:
    """Addresses other nodes can dial for a listener bound at ``bound``.

    A wildcard host (``0.0.0.0``) is replaced by this machine's primary IPv4 address (the one
    its default route uses; found without sending anything) and loopback.
    """
    parts = urlsplit(bound)
    host = parts.hostname or ""
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return (bound,)
    if not unspecified or parts.port is None:
        return (bound,)
    hosts: list[str] = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: UDP connect only picks a route
        primary = probe.getsockname()[0]
        if primary and not primary.startswith("127."):
            hosts.append(primary)
    hosts.append("127.0.0.1")
    return tuple(f"{parts.scheme}://{h}:{parts.port}" for h in hosts)


# -- publishing what predates gossip ------------------------------------------------------------


def _feed_contents(
    entries: list[feed.FeedEntry],
) -> tuple[set[str], set[str], set[tuple[str, str, str]]]:
    added: set[str] = set()
    deleted: set[str] = set()
    edges: set[tuple[str, str, str]] = set()
    for entry in entries:
        op = entry.op
        if isinstance(op, feed.AddMemory):
            added.add(op.memory_id)
        elif isinstance(op, feed.Delete):
            deleted.add(op.memory_id)
        else:
            edges.add((op.from_id, op.to_id, op.edge_type))
    return added, deleted, edges


async def publish_unsynced(
    node: RunningNode, gossip: Address[gs.GossipMsg], feed_entries: list[feed.FeedEntry]
) -> int:
    """Publish store contents that are in no feed: memories, links and deletes made before this
    node ran gossip, by an offline `dmgn` command, or lost between a store write and its feed
    append by a crash. Call before any peer connects (so nothing synced meanwhile is mistaken
    for a local change). Returns how many ops were published."""
    added, deleted, edges = _feed_contents(feed_entries)
    inventory = await expect(await call(node.store, st.Inventory, timeout=120))
    ops: list[feed.Op] = []
    missing = sorted(inventory.memories - added)
    for start in range(0, len(missing), 512):
        found = await expect(await call(node.store, st.Get, tuple(missing[start : start + 512])))
        ops.extend(
            feed.AddMemory(s.envelope) for s in sorted(found.values(), key=lambda s: s.created_at)
        )
    ops.extend(
        feed.Link(link.from_id, link.to_id, link.edge_type, link.weight)
        for link in sorted(inventory.links, key=lambda link: link.created_at)
        if (link.from_id, link.to_id, link.edge_type) not in edges
    )
    ops.extend(feed.Delete(memory_id) for memory_id in sorted(inventory.tombstones - deleted))
    if not ops:
        return 0
    log.info("publishing %d local changes that are in no sync feed yet", len(ops))
    # Concurrent publishes share disk syncs (gossip's group commit); a bounded number in flight.
    limit = trio.CapacityLimiter(gs.PUBLISH_GROUP_MAX)
    failures: list[str] = []

    async def publish(op: feed.Op) -> None:
        async with limit:
            result = await call(gossip, gs.Publish, op, timeout=120)
            if isinstance(result, Err):
                failures.append(result.reason)

    # Order matters only between ops on the same memory (add before link/delete), and each
    # kind is published after the previous kind has been logged.
    for kind in (feed.AddMemory, feed.Link, feed.Delete):
        async with trio.open_nursery() as nursery:
            for op in ops:
                if isinstance(op, kind):
                    nursery.start_soon(publish, op)
    if failures:
        log.warning(
            "%d changes could not be published (%s); retried at next start",
            len(failures),
            failures[0],
        )
    return len(ops) - len(failures)


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


@dataclass(frozen=True, slots=True)
class PeeringStatus:
    connected: tuple[ConnectedPeer, ...]
    targets: tuple[DialTarget, ...]


PeeringMsg = AddPeer | PeeringState


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


@dataclass
class _Connection:
    info: tp.PeerInfo
    peer_id: str
    connected_wall: float
    latency: float | None = None
    asked_at: float | None = None
    send: trio.MemorySendChannel[Message] | None = None


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
    ) -> None:
        self.mailbox: Mailbox[PeeringMsg] = Mailbox("peering", 32)
        self._identity = identity
        self._device_id = device_id
        self._transport = transport
        self._gossip = gossip
        self._events = events
        self._found = found
        self._redial_interval = redial_interval
        self._targets: dict[str, _Target] = {}
        for address in bootstrap:
            self._targets[address] = _Target((address,), "bootstrap", permanent=True)
        self._connections: dict[str, _Connection] = {}  # by peer id
        self._wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None

    def peer_id(self, peer: PeerIdentity) -> str:
        """Gossip's name for a peer: the device id for our own devices; a stranger's is prefixed
        with its identity, so nobody can take over one of our devices' sessions by claiming its
        device id under another identity."""
        if peer.identity_public_key == self._identity:
            return peer.device_id.hex()
        return f"{peer.identity_public_key.hex()[:16]}/{peer.device_id.hex()}"

    async def cut_off(self, peer_id: str, reason: str) -> None:
        """Gossip's hook: close the connection of a peer it cut off, with its reason."""
        connection = self._connections.get(peer_id)
        if connection is not None:
            await call(self._transport, tp.Close, connection.info.peer, f"cut off: {reason}")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
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

    async def reannounce(self) -> None:
        """Tell a (re)started gossip actor about every open connection."""
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
        peer_id = self.peer_id(info.peer)
        kind = "device" if info.peer.identity_public_key == self._identity else "storage peer"
        log.info("connected to %s %s (%s, %s)", kind, peer_id, info.address, info.direction.value)
        connection = _Connection(info, peer_id, time.time())
        self._connections[peer_id] = connection
        for target in self._targets.values():
            if target.device_id == info.peer.device_id:
                target.failures, target.last_error = 0, None
        await self._gossip_peer_up(connection)

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
                    peer.identity_public_key == self._identity,
                    send,
                )
            )
        except Exception:  # gossip gone for good (node stopping): nothing to tell
            send.close()

    async def _peer_down(self, info: tp.PeerInfo, reason: str) -> None:
        peer_id = self.peer_id(info.peer)
        connection = self._connections.get(peer_id)
        if connection is None or connection.info is not info:
            return  # a replaced duplicate: the newer connection is still up
        del self._connections[peer_id]
        log.info("disconnected from %s: %s", peer_id, reason)
        with contextlib.suppress(Exception):
            await self._gossip.send(gs.PeerDown(peer_id))
        self._wake()

    async def _inbound(self, info: tp.PeerInfo, message: Message) -> None:
        peer_id = self.peer_id(info.peer)
        connection = self._connections.get(peer_id)
        if connection is None or connection.info is not info:
            return
        if not message.type.startswith("gossip."):
            return  # no other actor speaks on this connection yet
        if (
            message.type == "gossip.vector"
            and message["ask"] is False
            and connection.asked_at is not None
        ):
            connection.latency = trio.current_time() - connection.asked_at
            connection.asked_at = None
        with contextlib.suppress(Exception):
            await self._gossip.send(gs.Inbound(peer_id, message))

    async def _forward(
        self, connection: _Connection, receive: trio.MemoryReceiveChannel[Message]
    ) -> None:
        """Carry gossip's messages for one peer to the transport, in order."""
        async with receive:
            async for message in receive:
                if message.type == "gossip.vector" and message["ask"] is True:
                    connection.asked_at = trio.current_time()
                while True:
                    result = await call(self._transport, tp.Send, connection.info.peer, message)
                    if isinstance(result, Ok):
                        break
                    if result.code != "busy":
                        return  # connection gone: the transport reports PeerDown
                    await trio.sleep(BUSY_RETRY)

    # -- found peers → dials ---------------------------------------------------------------

    def _wake(self) -> None:
        self._wakeup.set()

    async def _take_found(self) -> None:
        async for found in self._found:
            key = found.device_id.hex() if found.device_id else found.addrs[0]
            target = self._targets.get(key)
            if target is None:
                target = self._targets[key] = _Target(
                    found.addrs, found.source, permanent=found.source == "bootstrap"
                )
            target.addrs = found.addrs
            target.device_id = found.device_id or target.device_id
            target.identity = found.identity or target.identity
            if found.source != "bootstrap":
                target.source = found.source
            ttl = FOUND_PEER_TTL
            if found.expires_at is not None:
                ttl = max(0.0, min(ttl, found.expires_at - time.time()))
            target.expires_at = None if target.permanent else trio.current_time() + ttl
            self._wake()

    def _connected_device(self, device_id: bytes | None) -> bool:
        return device_id is not None and any(
            c.info.peer.device_id == device_id for c in self._connections.values()
        )

    async def _dial_loop(self) -> None:
        assert self._nursery is not None
        while True:
            now = trio.current_time()
            soonest = now + self._redial_interval
            for key, target in list(self._targets.items()):
                if target.expires_at is not None and now >= target.expires_at:
                    del self._targets[key]
                    continue
                if target.is_self or target.dialing or self._connected_device(target.device_id):
                    continue
                if now < target.next_dial:
                    soonest = min(soonest, target.next_dial)
                    continue
                target.dialing = True
                self._nursery.start_soon(self._dial, target)
            self._wakeup = trio.Event()
            with trio.move_on_after(max(0.0, soonest - trio.current_time())):
                await self._wakeup.wait()

    async def _dial(self, target: _Target) -> None:
        try:
            errors = []
            for address in target.addrs:
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
                    if peer.device_id == self._device_id:
                        target.is_self = True  # our own listener, e.g. in a shared config
                        await call(self._transport, tp.Close, peer, "dialed ourselves")
                        return
                    target.device_id = peer.device_id
                    target.failures, target.last_error = 0, None
                    return
                errors.append(result.reason)
            target.failures += 1
            target.last_error = errors[-1] if errors else "no address"
            backoff = min(self._redial_interval, 2.0 ** (target.failures - 1))
            target.next_dial = trio.current_time() + backoff
            log.debug(
                "dial %s failed (%s); next try in %gs", target.addrs, target.last_error, backoff
            )
        finally:
            target.dialing = False
            self._wake()

    def _status(self) -> PeeringStatus:
        connected = tuple(
            ConnectedPeer(
                c.peer_id,
                c.info.peer.device_id.hex(),
                c.info.peer.identity_public_key.hex(),
                c.info.peer.identity_public_key == self._identity,
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
            )
            for t in self._targets.values()
            if not t.is_self
        )
        return PeeringStatus(connected, targets)


# -- starting it all ----------------------------------------------------------------------------


@dataclass
class Networking:
    """Handles to a node's online half."""

    transport: Address[tp.TransportMessage]
    gossip: Address[gs.GossipMsg]
    peering: Address[PeeringMsg]
    discovery: Address[dc.DiscoveryMsg] | None
    credentials: DeviceCredentials
    listen_addrs: tuple[str, ...]
    counters: WireCounters
    published_at_start: int = 0
    _extra: dict[str, Any] = field(default_factory=dict)

    async def add_peer(self, address: str) -> None:
        """Dial ``address`` now, and again whenever it is not connected."""
        await expect(await call(self.peering, AddPeer, address))

    async def close(self, reason: str = "node shutting down", timeout: float = 2.0) -> None:
        """Close every connection while the node still runs, so peers see a clean close (and
        learn why) instead of waiting for a timeout; bounded by ``timeout``."""
        with trio.move_on_after(timeout):
            peers = await call(self.transport, tp.ListPeers)
            if isinstance(peers, Err):
                return
            async with trio.open_nursery() as nursery:
                for info in peers.value:
                    nursery.start_soon(partial(call, self.transport, tp.Close, info.peer, reason))
            # Done when the transport has reported each connection down, i.e. after its close
            # handshake (the transport forgets a peer as soon as it starts closing it).
            while True:
                left = await call(self.peering, PeeringState)
                if isinstance(left, Err) or not left.value.connected:
                    return
                await trio.sleep(0.01)

    async def sync_now(self) -> int:
        return await expect(await call(self.gossip, gs.SyncNow))

    async def gossip_status(self) -> gs.GossipStatus:
        return await expect(await call(self.gossip, gs.SyncState))

    async def peers_report(self) -> list[dict[str, Any]]:
        """Rows for ``dmgn peers``: connected, discovered and dialed peers, merged."""
        peering = await expect(await call(self.peering, PeeringState))
        gossip = await self.gossip_status()
        found: tuple[dc.FoundPeer, ...] = ()
        if self.discovery is not None:
            state = await call(self.discovery, dc.DiscoveryState)
            if isinstance(state, Ok):
                found = state.value.found
        return peers_rows(peering, gossip, found)

    async def status_report(self) -> dict[str, Any]:
        """The ``peers`` count and ``sync`` section of ``dmgn status``."""
        peering = await expect(await call(self.peering, PeeringState))
        gossip = await self.gossip_status()
        return {"peers": len(peering.connected), "sync": sync_section(gossip, self.counters)}


def _ago(wall: float | None) -> float | None:
    return None if wall is None else round(max(0.0, time.time() - wall), 1)


def peers_rows(
    peering: PeeringStatus, gossip: gs.GossipStatus, found: tuple[dc.FoundPeer, ...]
) -> list[dict[str, Any]]:
    by_peer = {p.peer_id: p for p in gossip.peers}
    rows: dict[str, dict[str, Any]] = {}
    for c in peering.connected:
        g = by_peer.get(c.peer_id)
        rows[c.device_id] = {
            "device_id": c.device_id,
            "kind": "device" if c.is_device else "storage",
            "state": "connected",
            "identity": c.identity,
            "addrs": [c.address],
            "direction": c.direction,
            "sources": [],
            "latency_ms": c.latency_ms,
            "connected_s_ago": _ago(c.connected_at),
            "last_sync_s_ago": _ago(g.last_sync_at) if g else None,
            "behind_us": g.behind_us if g else None,
            "ahead_of_us": g.ahead_of_us if g else None,
            "score": g.score if g else 0,
            "bytes_in": g.bytes_in if g else 0,
            "bytes_out": g.bytes_out if g else 0,
            "cut_off_reason": g.cut_off_reason if g else None,
        }
    for g in gossip.peers:
        device = g.peer_id.rsplit("/", 1)[-1]
        if device in rows or g.connected:
            continue
        rows[device] = {
            "device_id": device,
            "kind": "device" if g.is_device else "storage",
            "state": "cut off" if g.cut_off_reason else "disconnected",
            "identity": g.identity,
            "addrs": [],
            "direction": None,
            "sources": [],
            "latency_ms": None,
            "connected_s_ago": None,
            "last_sync_s_ago": None,
            "behind_us": None,
            "ahead_of_us": None,
            "score": g.score,
            "bytes_in": 0,
            "bytes_out": 0,
            "cut_off_reason": g.cut_off_reason,
        }
    for f in found:
        row = rows.get(f.device_id)
        if row is None:
            row = rows[f.device_id] = {
                "device_id": f.device_id if len(f.device_id) == 32 else None,
                "kind": "unknown",
                "state": "discovered",
                "identity": None,
                "addrs": list(f.addrs),
                "direction": None,
                "sources": [],
                "latency_ms": None,
                "connected_s_ago": None,
                "last_sync_s_ago": None,
                "behind_us": None,
                "ahead_of_us": None,
                "score": 0,
                "bytes_in": 0,
                "bytes_out": 0,
                "cut_off_reason": None,
            }
        row["sources"] = sorted(set(row["sources"]) | set(f.sources))
        for addr in f.addrs:
            if addr not in row["addrs"]:
                row["addrs"].append(addr)
    for t in peering.targets:
        if t.connected or (t.device_id and t.device_id in rows) or t.address in rows:
            continue
        rows[t.address] = {
            "device_id": t.device_id,
            "kind": "unknown",
            "state": f"unreachable ({t.failures} tries)" if t.failures else "dialing",
            "identity": None,
            "addrs": [t.address],
            "direction": None,
            "sources": [t.source],
            "latency_ms": None,
            "connected_s_ago": None,
            "last_sync_s_ago": None,
            "behind_us": None,
            "ahead_of_us": None,
            "score": 0,
            "bytes_in": 0,
            "bytes_out": 0,
            "cut_off_reason": t.last_error,
        }
    order = {"connected": 0, "discovered": 1}
    return sorted(
        rows.values(),
        key=lambda r: (order.get(r["state"], 2), r["kind"] != "device", str(r["device_id"])),
    )


def sync_section(gossip: gs.GossipStatus, counters: WireCounters) -> dict[str, Any]:
    devices = []
    for p in gossip.peers:
        if not p.is_device:
            continue
        devices.append(
            {
                "device_id": p.peer_id,
                "connected": p.connected,
                "behind_us": p.behind_us if p.connected else None,
                "ahead_of_us": p.ahead_of_us if p.connected else None,
                "last_sync_s_ago": _ago(p.last_sync_at),
                "vector": {d.hex(): s for d, s in sorted(p.vector.items())},
            }
        )
    return {
        "device_id": gossip.device_id,
        "vector": {d.hex(): s for d, s in sorted(gossip.vector.items())},
        "feed_entries": gossip.entries,
        "devices": devices,
        "last_apply_error": gossip.last_apply_error,
        "wire_bytes_out": counters.bytes_out,
        "wire_bytes_in": counters.bytes_in,
    }


async def start_networking(
    node: RunningNode,
    network: Network,
    settings: NetworkSettings,
    data_dir: Path | None,
    *,
    feed_log: gs.FeedLog | None = None,
    wall_clock: Callable[[], int] = time.time_ns,
) -> Networking:
    """Start gossip, transport, the peering glue and (optionally) discovery under
    ``node.supervisor``; publish store contents that are in no feed; listen; go.

    Returns once the node listens and has announced itself; the actors then run until the
    node's supervisor stops. ``data_dir=None`` keeps the feed log in memory (or pass
    ``feed_log`` to model a disk that survives a simulated restart).
    """
    supervisor = node.supervisor
    identity = (await expect(await call(node.vault, vt.Whoami))).identity_public_key
    device_id = node.device_id
    credentials = await device_credentials(node.vault, device_id)
    counting = CountingNetwork(network)
    if feed_log is None:
        feed_log = gs.FeedLog(data_dir / "gossip" / "feeds.log" if data_dir else None)

    # What the feeds already hold, read before gossip opens the log (it is gossip's file once
    # it runs), to find local changes that were never published.
    existing = [entry for entry, _ in await _load(feed_log)]

    events_send, events_receive = trio.open_memory_channel[tp.TransportEvent](64)
    found_send, found_receive = trio.open_memory_channel[dc.PeerFound](64)
    transport_mailbox: Mailbox[tp.TransportMessage] = Mailbox("transport")
    gossip_holder: dict[str, Peering] = {}

    async def cut_off(peer_id: str, reason: str) -> None:
        peering = gossip_holder.get("peering")
        if peering is not None:
            await peering.cut_off(peer_id, reason)

    vault = node.vault

    def sign(context: bytes, data: bytes) -> Awaitable[Result[bytes]]:
        return call(vault, vt.Sign, context, data)

    gossip = gs.GossipActor(
        identity=identity,
        device_id=device_id,
        sign=sign,
        apply=node.apply,
        log=feed_log,
        sync_interval=settings.sync_interval,
        cut_off=cut_off,
        wall_clock=wall_clock,
    )
    peering = Peering(
        identity=identity,
        device_id=device_id,
        transport=transport_mailbox.address,
        gossip=gossip.mailbox.address,
        events=events_receive,
        found=found_receive,
        bootstrap=settings.bootstrap,
        redial_interval=settings.redial_interval,
    )
    gossip_holder["peering"] = peering
    started = {"gossip": False}

    async def run_gossip(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(gossip.run)
            if started["gossip"]:
                # A restarted gossip actor has no sessions: give it the open connections.
                await peering.reannounce()
            started["gossip"] = True
            task_status.started()

    await supervisor.start(ActorSpec("gossip", run_gossip, gossip.mailbox))
    # From now on local changes are published as they happen; what predates this is found by
    # comparing the store with the feeds (a change in both windows is published twice, which
    # applying ignores).
    node.sync.gossip = gossip.mailbox.address
    published = await publish_unsynced(node, gossip.mailbox.address, existing)
    limits = settings.transport_limits or tp.TransportLimits()
    limits = replace(limits, max_connections=min(limits.max_connections, settings.max_connections))
    transport = tp.TransportActor(
        counting,
        credentials,
        events_send,
        listen_addr=settings.listen_addr,
        registry=gs.GOSSIP_REGISTRY,
        limits=limits,
        mailbox=transport_mailbox,
    )
    await supervisor.start(ActorSpec("peering", peering.run, peering.mailbox))
    try:
        await supervisor.start(ActorSpec("transport", transport.run, transport.mailbox))
    except Exception as failure:  # the listener's bind error arrives inside nursery groups
        error = _first_os_error(failure)
        if error is None:
            raise
        raise ConfigError(
            f"cannot listen on {settings.listen_addr}: {error.strerror or error}; "
            "another program (or another dmgn-node) may use that port: set "
            "listen_addr in config.json to a free one, e.g. ws://0.0.0.0:4002"
        ) from None
    bound = transport.bound_address
    addrs = settings.advertise or (reachable_addresses(bound) if bound else ())
    node.info.listen_addrs = list(addrs)

    discovery_address: Address[dc.DiscoveryMsg] | None = None
    if settings.discovery and bound is not None:
        port = urlsplit(bound).port or 0
        discovery = dc.DiscoveryActor(
            identity=identity,
            device_id=device_id,
            noise_key=credentials.static_key.public,
            sign=sign,
            found=found_send,
            listen_port=port,
            addrs=addrs,
            bootstrap=settings.bootstrap,
            dht_port=settings.dht_port,
            mdns=settings.mdns,
            mdns_interfaces=settings.mdns_interfaces,
        )
        await supervisor.start(ActorSpec("discovery", discovery.run, discovery.mailbox))
        discovery_address = discovery.mailbox.address
    else:
        # No discovery: bootstrap addresses are the peering actor's own permanent targets.
        found_send.close()

    online = Networking(
        transport_mailbox.address,
        gossip.mailbox.address,
        peering.mailbox.address,
        discovery_address,
        credentials,
        addrs,
        counting.counters,
        published,
    )
    node.sync.peers = online.peers_report
    node.sync.status = online.status_report
    log.info(
        "online: listening on %s; %d bootstrap peers; discovery %s",
        ", ".join(addrs) or "(nothing)",
        len(settings.bootstrap),
        "on" if discovery_address else "off",
    )
    return online


def _first_os_error(error: BaseException) -> OSError | None:
    if isinstance(error, OSError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _first_os_error(inner)
            if found is not None:
                return found
    return None


async def _load(feed_log: gs.FeedLog) -> list[tuple[feed.FeedEntry, int]]:
    def load() -> list[tuple[feed.FeedEntry, int]]:
        try:
            return feed_log.load()
        finally:
            feed_log.close()

    if feed_log.blocking:
        return await trio.to_thread.run_sync(load)
    return load()
