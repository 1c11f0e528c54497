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
import logging
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from actors import discovery as dc
from actors import gossip as gs
from actors import indexer as ix
from actors import router as qr
from actors import shard_keeper as sk
from actors import storage as sg
from actors import store as st
from actors import transport as tp
from actors import vault as vt
from actors._addresses import local_addresses, reachable_addresses
from actors._counting_network import CountingNetwork, WireCounters
from actors._keeper_tables import KeeperTables, MemoryKeeperTables
from actors._node_status import discovery_section, peers_rows, sync_section
from actors._service_requests import ServiceMsg
from actors._storage_tables import MemoryStorageTables, StorageTables
from actors._store_tables import MemoryStoreTables, StoreTables
from actors.control import ControlActor
from actors.metrics_http import COLLECT_TIMEOUT, MetricsEndpoint
from actors.peering import (
    AddPeer,
    CutOff,
    OwnAddresses,
    Peering,
    PeeringMsg,
    PeeringState,
    Reannounce,
)
from actors.runtime import (
    ActorGone,
    ActorSpec,
    Address,
    Err,
    Mailbox,
    Ok,
    Result,
    Supervisor,
    ask,
    call,
    expect,
    reuse,
)
from actors.service import (
    RETENTION_INTERVAL,
    AttachNetwork,
    MemoryService,
    NetworkLink,
    NodeInfo,
)
from dmgn import api, backup, feed
from dmgn.api_token import ensure_token
from dmgn.config import (
    DEFAULT_LISTEN_ADDR,
    Config,
    load_config,
    parse_replica,
    split_metrics_address,
)
from dmgn.embedding import Embedder, HashingEmbedder, default_embedder, lazy_default_embedder
from dmgn.errors import ConfigError, DmgnError, InvalidInput
from dmgn.metrics import NodeMetrics
from dmgn.paths import DataDir
from dmgn.peer_record import LOCATOR_PURPOSE, ProviderLocator
from dmgn.retention import RetentionPolicy
from dmgn.shards import MailKeys, ShardKeys
from dmgn.storage_protocol import STORAGE_MESSAGE_TYPES
from wire import (
    CERTIFICATE_CONTEXT,
    DEVICE_ID_BYTES,
    DeviceCertificate,
    DeviceCredentials,
    KeyPair,
    Message,
    Network,
    PeerIdentity,
)

log = logging.getLogger("dmgn.node")

#: What a connection accepts: the base types, gossip's, the storage protocol's and the query
#: router's.
DEVICE_REGISTRY = gs.GOSSIP_REGISTRY.extended(*STORAGE_MESSAGE_TYPES, *qr.QUERY_MESSAGE_TYPES)

__all__ = [
    "NetworkSettings",
    "Networking",
    "NodeInfo",
    "RunningNode",
    "device_credentials",
    "open_node",
    "publish_unsynced",
    "restore_archive",
    "start_local_interfaces",
    "start_metrics_endpoint",
    "start_networking",
]


@dataclass(frozen=True)
class NetworkSettings:
    """How a node goes online. ``from_config`` reads config.json's fields."""

    #: Where to accept connections (``ws://0.0.0.0:4001``; ``mem://name`` in sims); None: dial
    #: out only.
    listen_addr: str | None
    #: When ``listen_addr``'s port is taken, listen on a free port of the same host instead of
    #: failing (config.json left ``listen_addr`` unset). False: the address is strict.
    listen_fallback: bool = False
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
    #: Bytes held for other identities (config ``storage_quota``; 0: no storage service).
    storage_quota: int = sg.DEFAULT_QUOTA
    storage_limits: sg.StorageLimits | None = None
    keeper: sk.KeeperSettings | None = None

    @classmethod
    def from_config(cls, config: Config) -> NetworkSettings:
        return cls(
            listen_addr=config.listen_addr or DEFAULT_LISTEN_ADDR,
            listen_fallback=config.listen_addr is None,
            bootstrap=tuple(config.bootstrap_peers),
            sync_interval=config.sync_interval_seconds,
            max_connections=config.max_connections,
            mdns=config.mdns,
            dht_port=config.dht_port,
            storage_quota=config.storage_quota,
        )


# -- identity for the wire ----------------------------------------------------------------------


async def device_credentials(vault: Address[vt.VaultMsg], device_id: bytes) -> DeviceCredentials:
    """This device's Noise static key (derived in the vault, stable per device), the
    identity's certificate over it and the device-handshake PSK; plus what storage mode shows
    strangers instead (issue 20): another Noise static key, certified by the storage-node
    key, under a storage device id that is not our device id. The signing secrets never leave
    the vault."""
    identity = await expect(await call(vault, vt.Whoami))
    device = device_id.hex()
    private = await expect(await call(vault, vt.DeriveKey, "noise-static:" + device))
    static = KeyPair.from_private(private)
    signature = await expect(await call(vault, vt.Sign, CERTIFICATE_CONTEXT, static.public))
    certificate = DeviceCertificate(
        identity.identity_public_key, device_id, static.public, signature
    )
    storage_static = KeyPair.from_private(
        await expect(await call(vault, vt.DeriveKey, "noise-storage-static:" + device))
    )
    storage_device = await expect(await call(vault, vt.DeriveKey, "storage-device-id:" + device))
    storage_signature = await expect(
        await call(vault, vt.SignAs, vt.STORAGE_NODE, CERTIFICATE_CONTEXT, storage_static.public)
    )
    storage = DeviceCredentials(
        storage_static,
        DeviceCertificate(
            identity.storage_public_key,
            storage_device[:DEVICE_ID_BYTES],
            storage_static.public,
            storage_signature,
        ),
    )
    psk = await expect(await call(vault, vt.DeriveKey, "noise-device-psk"))
    return DeviceCredentials(static, certificate, psk=psk, storage=storage)


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


# -- starting it all ----------------------------------------------------------------------------


@dataclass
class Networking:
    """Handles to a node's online half."""

    transport: Address[tp.TransportMessage]
    gossip: Address[gs.GossipMsg]
    peering: Address[PeeringMsg]
    discovery: Address[dc.DiscoveryMsg] | None
    credentials: DeviceCredentials
    #: The process facts the tree keeps current (our addresses follow the interfaces).
    info: NodeInfo
    counters: WireCounters
    storage: Address[sg.StorageMsg]
    keeper: Address[sk.KeeperMsg]
    published_at_start: int = 0
    #: Set when the configured port was taken and a free one was used instead (a sentence).
    listen_note: str | None = None
    #: Messages sent to our own devices by type (the peering actor's counts, live).
    sent_to_devices: dict[str, int] = field(default_factory=dict)
    _extra: dict[str, Any] = field(default_factory=dict)

    @property
    def listen_addrs(self) -> tuple[str, ...]:
        """What peers can dial now."""
        return tuple(self.info.listen_addrs)

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

    async def peers_report(self) -> dict[str, Any]:
        """``dmgn peers``: one row per peer (connected, discovered and dialed, merged) and the
        discovery section."""
        peering = await expect(await call(self.peering, PeeringState))
        gossip = await self.gossip_status()
        state, error = await self._discovery_state()
        found = state.found if state is not None else ()
        return {
            "peers": peers_rows(peering, gossip, found),
            "discovery": discovery_section(state, error),
        }

    async def _discovery_state(self) -> tuple[dc.DiscoveryStatus | None, str | None]:
        if self.discovery is None:
            return None, None
        state = await call(self.discovery, dc.DiscoveryState)
        if isinstance(state, Err):
            return None, f"discovery did not answer: {state.reason}"
        return state.value, None

    async def status_report(self) -> dict[str, Any]:
        """The ``peers`` count and the ``sync``, ``durability`` and ``storage`` sections of
        ``dmgn status``."""
        peering = await expect(await call(self.peering, PeeringState))
        gossip = await self.gossip_status()
        durability = await self.durability()
        storage = await expect(await call(self.storage, sg.StorageState))
        return {
            "peers": len(peering.connected),
            "sync": sync_section(gossip, self.counters),
            "discovery": discovery_section(*await self._discovery_state()),
            "durability": {
                "shards": f"{durability.k}-of-{durability.n}",
                "memories_placed": durability.memories,
                "complete": durability.complete,
                "durable": durability.durable,
                "at_risk": durability.at_risk,
                "lost": durability.lost,
                "waiting_for_placement": durability.unplaced,
                "storage_peers": durability.storage_peers,
                "durable_fraction": round(durability.durable_fraction, 6),
            },
            "storage": {
                "bytes_held": storage.bytes_held,
                "identities": storage.identities,
                "quota": storage.quota,
                "refused": storage.refused,
                "readable": False,  # everything held is ciphertext under its owner's keys
            },
            **await self._dht_section(),
        }

    async def _dht_section(self) -> dict[str, Any]:
        """``dht`` in ``dmgn status``: the record table and the UDP traffic (issue 12)."""
        if self.discovery is None:
            return {}
        state = await call(self.discovery, dc.DiscoveryState)
        if isinstance(state, Err) or state.value.dht_stats is None:
            return {}
        stats = state.value.dht_stats
        return {
            "dht": {
                "bound": f"{state.value.dht_bind}:{state.value.dht_port}",
                "records_held": state.value.dht_records,
                "bytes_in": stats.bytes_in,
                "bytes_out": stats.bytes_out,
                "stores_refused": stats.stores_refused,
                "malformed_datagrams": stats.malformed,
                "answers_withheld": stats.answers_dropped,
            }
        }

    async def durability(self) -> sk.Durability:
        return await expect(await call(self.keeper, sk.KeeperState))

    async def wait_for_storage_peers(self, count: int, timeout: float) -> int:
        """Wait until ``count`` storage peers are connected (or ``timeout``); returns how many
        are. A restore asks every connected storage peer, so it should not start alone."""
        with trio.move_on_after(timeout):
            while True:
                connected = (await self.durability()).storage_peers
                if connected >= count:
                    break
                await trio.sleep(0.05)  # polling another actor's state: no event to wait on
        return (await self.durability()).storage_peers

    async def restore(
        self, progress: Callable[[int, int], None] | None = None, timeout: float = 3600.0
    ) -> sk.RecoveryReport:
        """Pull what our feeds lack from the mailbox and rebuild memories from shards."""
        return await expect(await call(self.keeper, sk.Recover, progress, timeout=timeout))


async def start_networking(
    node: RunningNode,
    network: Network,
    settings: NetworkSettings,
    data_dir: Path | None,
    *,
    feed_log: gs.FeedLog | None = None,
    wall_clock: Callable[[], int] = time.time_ns,
    on_addresses: Callable[[tuple[str, ...]], None] | None = None,
    light_tables: bool = False,
    storage_tables: StorageTables | None = None,
    keeper_tables: KeeperTables | None = None,
) -> Networking:
    """Start gossip, transport, the peering glue and (optionally) discovery under
    ``node.supervisor``; publish store contents that are in no feed; listen; go.

    Returns once the node listens and has announced itself; the actors then run until the
    node's supervisor stops. ``data_dir=None`` keeps the feed log in memory (or pass
    ``feed_log`` to model a disk that survives a simulated restart). ``light_tables`` (sims,
    with ``data_dir=None``) keeps the storage service's and shard keeper's rows in dicts
    instead of in-memory DuckDB databases (same rules, ~5 MiB less each). ``storage_tables``
    and ``keeper_tables`` are those rows, kept by the caller across a simulated restart (as
    ``feed_log``): what the node held for others and where it placed its own shards.
    """
    supervisor = node.supervisor
    whoami = await expect(await call(node.vault, vt.Whoami))
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
    # The mailboxes first: the keeper, gossip and peering each need others' addresses before
    # those actors exist, and an address is its mailbox's.
    transport_mailbox: Mailbox[tp.TransportMessage] = Mailbox("transport")
    peering_mailbox: Mailbox[PeeringMsg] = Mailbox("peering", 32)
    gossip_mailbox: Mailbox[gs.GossipMsg] = Mailbox("gossip", gs.INBOX_CAPACITY)
    vault = _VaultAsks(node.vault)
    transport_address = transport_mailbox.address

    def send(peer: PeerIdentity, message: Message) -> Awaitable[Result[None]]:
        return call(transport_address, tp.Send, peer, message)

    if light_tables and data_dir is None:
        if storage_tables is None:
            storage_tables = MemoryStorageTables()
        if keeper_tables is None:
            keeper_tables = MemoryKeeperTables()
    storage = await _start_storage(
        node, settings, data_dir, whoami, send, wall_clock, tables=storage_tables
    )
    keeper = await _start_keeper(
        node,
        settings,
        data_dir,
        whoami,
        send=send,
        gossip=gossip_mailbox.address,
        transport=transport_address,
        wall_clock=wall_clock,
        tables=keeper_tables,
    )
    # Our feed entries the keeper's outbox lacks, before gossip publishes anything newer: a
    # kill -9 between gossip's durable append and the keeper's outbox insert left them out,
    # and the entries after them went to the mailbox past a hole no device could read beyond.
    # (The keeper skips those it already holds.)
    own_entries = tuple(entry for entry in existing if entry.device_id == device_id)
    if own_entries:
        await keeper.send(sk.MailPush(own_entries))

    async def mail_push(entries: tuple[feed.FeedEntry, ...]) -> None:
        with contextlib.suppress(ActorGone):  # node stopping: pushed at the next start
            await keeper.send(sk.MailPush(entries))

    def cut_off(peer_id: str, reason: str) -> Awaitable[Result[None]]:
        return call(peering_mailbox.address, CutOff, peer_id, reason)

    gossip = gs.GossipActor(
        published=mail_push,
        identity=whoami.identity_public_key,
        device_id=device_id,
        sign=vault.sign,
        sign_feed=vault.sign_feed,
        apply=node.apply,
        log=feed_log,
        sync_interval=settings.sync_interval,
        cut_off=cut_off,
        wall_clock=wall_clock,
        mailbox=gossip_mailbox,
    )
    peering = Peering(
        identity=whoami.identity_public_key,
        device_id=device_id,
        transport=transport_address,
        gossip=gossip_mailbox.address,
        router=node.router,
        events=events_receive,
        found=found_receive,
        bootstrap=settings.bootstrap,
        redial_interval=settings.redial_interval,
        mailbox=peering_mailbox,
        storage=storage,
        keeper=keeper,
        reputation_path=data_dir / "peers" / "reputation.json" if data_dir else None,
    )
    await supervisor.start(
        ActorSpec(
            "gossip",
            reuse(gossip),
            gossip_mailbox,
            on_restart=lambda: call(peering_mailbox.address, Reannounce),
        )
    )
    # From now on local changes are published as they happen; what predates this is found by
    # comparing the store with the feeds (a change in both windows is published twice, which
    # applying ignores).
    await expect(
        await call(
            node.network_link, AttachNetwork, NetworkLink(gossip_mailbox.address, keeper=keeper)
        )
    )
    published = await publish_unsynced(node, gossip_mailbox.address, existing)
    await supervisor.start(ActorSpec("peering", reuse(peering), peering_mailbox))

    limits = settings.transport_limits or tp.TransportLimits()
    limits = replace(limits, max_connections=min(limits.max_connections, settings.max_connections))

    def make_transport(listen_addr: str | None) -> tp.TransportActor:
        return tp.TransportActor(
            counting,
            credentials,
            events_send,
            listen_addr=listen_addr,
            registry=DEVICE_REGISTRY,
            limits=limits,
            mailbox=transport_mailbox,
        )

    bound, listen_note = await _start_transport(
        supervisor, make_transport, transport_mailbox, settings
    )
    addrs = settings.advertise or (reachable_addresses(bound) if bound else ())
    node.info.listen_addrs = list(addrs)
    if bound is not None:
        own = local_addresses(bound) | set(addrs)
        await expect(await call(peering_mailbox.address, OwnAddresses, frozenset(own)))

    discovery: Address[dc.DiscoveryMsg] | None = None
    if settings.discovery and bound is not None:
        discovery = await _start_discovery(
            node,
            settings,
            whoami.identity_public_key,
            credentials,
            vault,
            found_send,
            bound,
            addrs,
            peering_mailbox.address,
            on_addresses,
        )
    else:
        # No discovery: bootstrap addresses are the peering actor's own permanent targets.
        found_send.close()

    online = Networking(
        transport_address,
        gossip_mailbox.address,
        peering_mailbox.address,
        discovery,
        credentials,
        node.info,
        counting.counters,
        storage,
        keeper,
        published,
        listen_note,
        peering.sent_to_devices,
    )
    link = NetworkLink(gossip_mailbox.address, online.peers_report, online.status_report, keeper)
    await expect(await call(node.network_link, AttachNetwork, link))
    log.info(
        "online: listening on %s; %d bootstrap peers; discovery %s",
        ", ".join(addrs) or "(nothing)",
        len(settings.bootstrap),
        "on" if discovery else "off",
    )
    return online


@dataclass(frozen=True, slots=True)
class _VaultAsks:
    """The vault requests the online actors are given as callables (they never see the
    vault's address, only what they may ask of it)."""

    vault: Address[vt.VaultMsg]

    def sign(self, context: bytes, data: bytes) -> Awaitable[Result[bytes]]:
        return call(self.vault, vt.Sign, context, data)

    def owner_sign(self, context: bytes, data: bytes) -> Awaitable[Result[bytes]]:
        return call(self.vault, vt.SignAs, vt.STORAGE_OWNER, context, data)

    def sign_feed(
        self, head: feed.FeedHead | None, device: bytes, items: tuple[tuple[int, feed.Op], ...]
    ) -> Awaitable[Result[list[feed.FeedEntry | Err]]]:
        return call(self.vault, vt.SignFeed, head, device, items)


async def _start_storage(
    node: RunningNode,
    settings: NetworkSettings,
    data_dir: Path | None,
    whoami: vt.Identity,
    send: Callable[[PeerIdentity, Message], Awaitable[Result[None]]],
    wall_clock: Callable[[], int],
    *,
    tables: StorageTables | None,
) -> Address[sg.StorageMsg]:
    """The storage service: what this node holds for other identities."""
    storage = sg.StorageService(
        data_dir / "storage.duckdb" if data_dir else None,
        owner=whoami.owner_public_key,
        storage_key=whoami.storage_public_key,
        send=send,
        limits=settings.storage_limits or sg.StorageLimits(quota=settings.storage_quota),
        wall_clock=wall_clock,
        tables=tables,
    )
    await node.supervisor.start(ActorSpec("storage", reuse(storage), storage.mailbox))
    return storage.mailbox.address


async def _start_keeper(
    node: RunningNode,
    settings: NetworkSettings,
    data_dir: Path | None,
    whoami: vt.Identity,
    *,
    send: Callable[[PeerIdentity, Message], Awaitable[Result[None]]],
    gossip: Address[gs.GossipMsg],
    transport: Address[tp.TransportMessage],
    wall_clock: Callable[[], int],
    tables: KeeperTables | None,
) -> Address[sk.KeeperMsg]:
    """The shard keeper: what other identities' nodes hold for us (shards, the mailbox)."""
    vault = _VaultAsks(node.vault)
    keeper = sk.ShardKeeper(
        data_dir / "shards.duckdb" if data_dir else None,
        owner=whoami.owner_public_key,
        device_id=node.device_id,
        shard_keys=ShardKeys(await expect(await call(node.vault, vt.DeriveKey, "shards"))),
        mail_keys=MailKeys(await expect(await call(node.vault, vt.DeriveKey, "mailbox"))),
        send=send,
        sign=vault.owner_sign,
        envelopes=partial(_envelopes, node.store),
        inventory=partial(_inventory, node.store),
        ingest=lambda entries: call(gossip, gs.Ingest, entries, timeout=120),
        vector=partial(_vector, gossip),
        close=lambda peer, reason: call(transport, tp.Close, peer, reason),
        settings=settings.keeper or sk.KeeperSettings(sync_interval=settings.sync_interval),
        wall_clock=wall_clock,
        tables=tables,
    )
    await node.supervisor.start(ActorSpec("shard_keeper", reuse(keeper), keeper.mailbox))
    return keeper.mailbox.address


async def _start_transport(
    supervisor: Supervisor,
    make_transport: Callable[[str | None], tp.TransportActor],
    mailbox: Mailbox[tp.TransportMessage],
    settings: NetworkSettings,
) -> tuple[str | None, str | None]:
    """Listen on the configured address, or on a free port of the same host when that one is
    taken and nobody chose it: (the bound address, a sentence saying so if it moved)."""
    try:
        transport = await supervisor.start(
            ActorSpec("transport", partial(make_transport, settings.listen_addr), mailbox)
        )
    except Exception as failure:  # the listener's bind error arrives inside nursery groups
        error = _first_os_error(failure)
        if error is None or settings.listen_addr is None:
            raise
        if not settings.listen_fallback:
            raise ConfigError(_listen_error(settings.listen_addr, error)) from None
        # Nobody chose this address: any free port on the same host serves as well, as long
        # as we say so (node_addrs and `dmgn start` show the one we got).
        fallback = _with_port(settings.listen_addr, 0)
        try:
            transport = await supervisor.start(
                ActorSpec("transport", partial(make_transport, fallback), mailbox)
            )
        except Exception as second:  # as above: the bind error, wrapped
            error = _first_os_error(second)
            if error is None:
                raise
            raise ConfigError(_listen_error(fallback, error)) from None
        note = (
            f"{settings.listen_addr} is in use ({error.strerror or error}); listening on "
            f"{transport.bound_address} instead. Set listen_addr in config.json to choose "
            "the address yourself."
        )
        log.warning("%s", note)
        return transport.bound_address, note
    return transport.bound_address, None


async def _start_discovery(
    node: RunningNode,
    settings: NetworkSettings,
    identity: bytes,
    credentials: DeviceCredentials,
    vault: _VaultAsks,
    found: trio.MemorySendChannel[dc.PeerFound],
    bound: str,
    addrs: tuple[str, ...],
    peering: Address[PeeringMsg],
    on_addresses: Callable[[tuple[str, ...]], None] | None,
) -> Address[dc.DiscoveryMsg]:
    """mDNS and the DHT: finds our devices and storage peers, announces us."""

    def current_addresses() -> tuple[str, ...]:
        return reachable_addresses(bound)

    async def addresses_changed(current: tuple[str, ...]) -> None:
        """The interfaces changed (DHCP, Wi-Fi): discovery re-announced; tell the rest."""
        node.info.listen_addrs = list(current)
        own_now = frozenset(local_addresses(bound) | set(current))
        told = await call(peering, OwnAddresses, own_now)
        if isinstance(told, Err):
            log.warning("peering did not take our new addresses: %s", told.reason)
        if on_addresses is not None:
            on_addresses(current)

    locator_secret = await expect(await call(node.vault, vt.DeriveKey, LOCATOR_PURPOSE))
    discovery = dc.DiscoveryActor(
        identity=identity,
        device_id=node.device_id,
        noise_key=credentials.static_key.public,
        sign=vault.sign,
        locator=ProviderLocator(locator_secret),
        dht_interface=_bind_host(settings.listen_addr),
        found=found,
        listen_port=urlsplit(bound).port or 0,
        addrs=addrs,
        bootstrap=settings.bootstrap,
        dht_port=settings.dht_port,
        mdns=settings.mdns,
        mdns_interfaces=settings.mdns_interfaces,
        # Fixed addresses (advertise) are announced as they are; derived ones follow the
        # interfaces.
        addresses=None if settings.advertise else current_addresses,
        on_addresses=addresses_changed,
    )
    await node.supervisor.start(ActorSpec("discovery", reuse(discovery), discovery.mailbox))
    return discovery.mailbox.address


def _with_port(address: str, port: int) -> str:
    parts = urlsplit(address)
    host = parts.hostname or "0.0.0.0"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}:{port}"


def _free_port(address: str) -> int | None:
    """A port the host of ``address`` has free right now (for a suggestion, not a promise)."""
    host = urlsplit(address).hostname or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port: int = probe.getsockname()[1]
            return port
    except OSError:
        return None


def _listen_error(address: str, error: OSError) -> str:
    """The one line for a strict listen address that cannot be bound."""
    reason = error.strerror or str(error)
    free = _free_port(address)
    suggestion = (
        f"set listen_addr in config.json to a free one, e.g. {_with_port(address, free)}"
        if free is not None
        else f"check that {urlsplit(address).hostname} is an address of this machine"
    )
    return (
        f"cannot listen on {address}: {reason}; another program (or another dmgn-node) may "
        f"use that port: {suggestion}, or remove listen_addr to let dmgn pick a free port"
    )


async def _envelopes(store: Address[st.StoreMsg], ids: tuple[str, ...]) -> Result[dict[str, bytes]]:
    found = await call(store, st.Get, ids, timeout=60)
    if isinstance(found, Err):
        return found
    return Ok({mid: stored.envelope for mid, stored in found.value.items()})


async def _inventory(
    store: Address[st.StoreMsg],
) -> Result[tuple[frozenset[str], frozenset[str]]]:
    found = await call(store, st.Inventory, timeout=120)
    if isinstance(found, Err):
        return found
    return Ok((frozenset(found.value.memories), frozenset(found.value.tombstones)))


async def _vector(gossip: Address[gs.GossipMsg]) -> Result[feed.VersionVector]:
    return await call(gossip, gs.Heads)


def _bind_host(listen_addr: str | None) -> str:
    """Where the DHT binds: the host ``listen_addr`` names (issue 12: the DHT bound 0.0.0.0
    while the node listened on 127.0.0.1); every interface only when it says so."""
    host = urlsplit(listen_addr or "").hostname if listen_addr else None
    return host or "0.0.0.0"


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


@dataclass
class RunningNode:
    """Handles to a started node's actors, for the entry points."""

    service: Address[ServiceMsg]
    vault: Address[vt.VaultMsg]
    store: Address[st.StoreMsg]
    indexer: Address[ix.Msg]
    supervisor: Supervisor
    info: NodeInfo
    #: Where the gossip actor sends verified remote ops (served by the service).
    apply: Address[gs.ApplyMsg]
    #: Where the online half attaches itself to the service (:func:`start_networking`).
    network_link: Address[AttachNetwork]
    device_id: bytes = b""
    #: The node's metrics registry (docs/metrics.md); the metrics endpoint serves it.
    metrics: NodeMetrics = field(default_factory=NodeMetrics)
    #: The query router (fan-out of queries to our other devices).
    router: Address[qr.RouterMsg] | None = None

    async def request(self, request: api.AnyRequest, timeout: float = 60.0) -> api.Response:
        """Run a request and return its response, raising the typed error on failure."""
        result = await ask(self.service, request, request.deadline or timeout)
        return await expect(result)


#: Best alpha per kind of embedder on our evaluation (benchmarks/results/search.quality.md).
ALPHA_WITH_MODEL = 0.7
ALPHA_WITH_LEXICAL = 0.3


def default_alpha(config: Config | None, embedder: Embedder) -> float:
    """The configured ``search_alpha``, or the best one for this embedder when unset."""
    if config is not None and config.search_alpha is not None:
        return config.search_alpha
    return ALPHA_WITH_LEXICAL if isinstance(embedder, HashingEmbedder) else ALPHA_WITH_MODEL


def embedder_from_environment(*, lazy: bool = False) -> Embedder:
    """``DMGN_EMBEDDER=hashing`` picks the lexical embedder (fast start; tests and benchmarks
    that run many processes); unset or ``model``, the semantic model when it loads. ``lazy``
    (the offline CLI) loads the model only when something is embedded."""
    choice = os.environ.get("DMGN_EMBEDDER", "model").strip().lower()
    if choice == "hashing":
        return HashingEmbedder()
    if choice not in ("", "model"):
        raise InvalidInput(f"DMGN_EMBEDDER={choice!r}: use 'model' (default) or 'hashing'")
    return lazy_default_embedder() if lazy else default_embedder()


@asynccontextmanager
async def open_node(
    seed: bytes,
    device_id: bytes,
    data_dir: Path | None,
    info: NodeInfo | None = None,
    *,
    embedder: Embedder | None = None,
    config: Config | None = None,
    retention_interval: float | None = None,
    replica: str | None = None,
    query_timeout: float | None = None,
    wall_clock: Callable[[], int] = time.time_ns,
    light_tables: bool = False,
    store_tables: StoreTables | None = None,
) -> AsyncIterator[RunningNode]:
    """Start the local actors (vault, store, indexer, service, query router) under one
    supervisor.

    ``data_dir=None`` keeps everything in memory (sims and tests). On a normal exit from the
    block the search index snapshot is saved before the actors stop.
    ``config`` replaces the data dir's config.json (tests: a retention policy for in-memory
    nodes); ``retention_interval`` shortens the period between retention runs (tests);
    ``replica`` and ``query_timeout`` override the config's. ``light_tables`` (sims, with
    ``data_dir=None``) keeps the store's rows in dicts instead of an in-memory DuckDB database
    (the same rules; ~5 MiB and a millisecond a statement less per node); ``store_tables`` are
    those rows, kept by the caller across a simulated restart.
    """
    info = info or NodeInfo(data_dir)
    if config is None and data_dir is not None:
        config = load_config(data_dir / "config.json")
    settings = config or Config()
    replica_days = parse_replica(replica) if replica is not None else settings.replica_days
    if query_timeout is None:
        query_timeout = settings.query_timeout_seconds
    vault = vt.VaultActor(seed, device_id)
    store = st.StoreActor(
        data_dir / "memories.duckdb" if data_dir else None,
        tables=store_tables
        if store_tables is not None
        else (MemoryStoreTables() if light_tables and data_dir is None else None),
    )
    metrics = NodeMetrics()
    restarts = metrics.restarts
    async with Supervisor(on_crash=lambda name: restarts.labels(name).inc()) as supervisor:
        await supervisor.start(ActorSpec("vault", reuse(vault), vault.mailbox))
        await supervisor.start(ActorSpec("store", reuse(store), store.mailbox))
        index_key = await expect(await call(vault.mailbox.address, vt.DeriveKey, "index"))
        if embedder is None:
            embedder = await trio.to_thread.run_sync(embedder_from_environment)
        indexer = ix.IndexerActor(embedder, data_dir, index_key if data_dir else None)
        await supervisor.start(ActorSpec("indexer", reuse(indexer), indexer.mailbox))
        # The router and the service address each other: the router's inbox exists first.
        router_mailbox: Mailbox[qr.RouterMsg] = Mailbox("router", 64)
        service = MemoryService(
            vault.mailbox.address,
            store.mailbox.address,
            indexer.mailbox.address,
            info,
            device_id,
            default_alpha=default_alpha(config, embedder),
            metrics=metrics,
            inbox_depths=supervisor.inbox_depths,
            retention=RetentionPolicy.from_config(
                {str(kind): period for kind, period in (config.retention if config else {}).items()}
            ),
            retention_interval=retention_interval or RETENTION_INTERVAL,
            router=router_mailbox.address,
            replica_days=replica_days,
            wall_clock=wall_clock,
        )
        make_router = partial(
            qr.QueryRouter,
            service.local_mailbox.address,
            replica_days=replica_days,
            query_timeout=query_timeout,
            wall_clock=wall_clock,
            mailbox=router_mailbox,
        )
        router = await supervisor.start(ActorSpec("router", make_router, router_mailbox))

        await supervisor.start(
            ActorSpec(
                "service", reuse(service), service.mailbox, on_stop=service.close_side_mailboxes
            )
        )
        yield RunningNode(
            service.mailbox.address,
            vault.mailbox.address,
            store.mailbox.address,
            indexer.mailbox.address,
            supervisor,
            info,
            service.apply_mailbox.address,
            service.link_mailbox.address,
            device_id,
            metrics,
            router.address,
        )
        if data_dir is not None:
            await service.persist_index()


async def start_metrics_endpoint(node: RunningNode, address: str) -> tuple[str, int]:
    """Serve ``GET /metrics`` on ``address`` (config ``metrics_addr``); returns what it bound.

    A scrape first asks the service for its status, which refreshes the gauges that mirror
    other actors (store counts, peers, sync lag, inbox depths), then renders the registry.
    """
    host, port = split_metrics_address(address)

    async def collect() -> bytes:
        result = await ask(node.service, api.Status(), COLLECT_TIMEOUT)
        if isinstance(result, Err):
            log.warning("metrics scrape: status failed: %s", result.reason)
        return node.metrics.render()

    try:
        endpoint = await node.supervisor.start(
            ActorSpec("metrics", partial(MetricsEndpoint, host, port, collect))
        )
    except OSError as error:
        raise ConfigError(
            f"cannot serve metrics on {address}: {error.strerror or error}; set metrics_addr "
            "in config.json to a free port (or null to turn metrics off)"
        ) from None
    assert endpoint.bound is not None
    return endpoint.bound


async def start_local_interfaces(
    node: RunningNode,
    data_dir: DataDir,
    describe: Callable[[], dict[str, object]],
    request_shutdown: Callable[[], None],
    *,
    config: Config | None = None,
) -> None:
    """Start the daemon's local interfaces: the MCP bridge, the REST API (when ``api_port``
    is set), then the control socket.

    The control socket comes last, so a `dmgn` that can reach it finds every actor up.
    """
    # Imported here, not at the top: the MCP SDK (hundreds of pydantic models) and hypercorn
    # cost an offline `dmgn add` or `dmgn status` most of its start-up, and only the daemon
    # serves these interfaces.
    from actors.mcp_bridge import McpBridge
    from actors.rest import RestActor

    await node.supervisor.start(
        ActorSpec("mcp_bridge", partial(McpBridge, node.service, data_dir.mcp_socket))
    )
    if config is not None and config.api_port:
        # Data dirs made before the REST API existed get their token now.
        ensure_token(data_dir.api_token)
        make_rest = partial(
            RestActor, node.service, data_dir.api_token, host=config.api_host, port=config.api_port
        )
        try:
            rest = await node.supervisor.start(ActorSpec("rest", make_rest))
        except Exception as failure:  # the bind error arrives inside nursery groups
            error = _first_os_error(failure)
            if error is None:
                raise
            raise ConfigError(
                f"cannot serve the REST API on {config.api_host}:{config.api_port}: "
                f"{error.strerror or error}; another program may use that port: set "
                "api_port in config.json to a free one (or 0 for no REST API)"
            ) from None
        node.info.api_urls = list(rest.urls)
    make_control = partial(
        ControlActor,
        data_dir.control_socket,
        node.service,
        describe=describe,
        request_shutdown=request_shutdown,
    )
    await node.supervisor.start(ActorSpec("control", make_control))


# -- restoring a backup -------------------------------------------------------------------------

#: Where a restore builds the new store before it replaces the old one (same file system, so
#: the final rename is atomic).
RESTORE_WORK_DIR = "restore.tmp"


async def restore_from_network(
    seed: bytes,
    device_id: bytes,
    data_dir: Path,
    network: Network,
    *,
    settings: NetworkSettings,
    min_peers: int = 3,
    wait: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """``dmgn restore --from-network``: go online with ``data_dir``'s identity, wait for
    ``min_peers`` storage peers (at most ``wait`` seconds), pull every feed entry the mailbox
    holds and rebuild the memories from shards (``progress(done, total)`` per memory). The
    store and feed log then hold what was restored; the caller holds the data dir."""
    keeper = replace(
        settings.keeper or sk.KeeperSettings(sync_interval=settings.sync_interval),
        auto_pull=False,
    )
    async with open_node(seed, device_id, data_dir) as node:
        online = await start_networking(node, network, replace(settings, keeper=keeper), data_dir)
        try:
            peers = await online.wait_for_storage_peers(min_peers, wait)
            if peers == 0:
                raise InvalidInput(
                    "no storage peer answered within "
                    f"{wait:g}s; add bootstrap_peers to config.json (or check the network) "
                    "and try again"
                )
            report = await online.restore(progress)
        finally:
            with trio.CancelScope(shield=True):
                await online.close("restore done")
        stats = await expect(await call(node.store, st.Stats))
    return {
        "from": "network",
        "storage_peers": report.storage_peers,
        "feeds": report.streams,
        "entries": report.entries,
        "memories_rebuilt": report.memories,
        "memories": stats.memories,
        "links": stats.links,
        "tombstones": stats.tombstones,
        "unrecoverable": list(report.unrecoverable),
        "seconds": round(report.seconds, 3),
    }


async def restore_archive(
    seed: bytes,
    device_id: bytes,
    data_dir: Path,
    source: Path,
    *,
    merge: bool,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Restore a `dmgn backup` archive into ``data_dir`` (no daemon may run; the caller holds
    the data dir).

    1. verify the whole archive (identity, every tag, counts, checksums, envelope hashes) -
       any problem raises :class:`~dmgn.errors.BackupRefused` and nothing was written;
    2. build the new store in ``restore.tmp/``: empty (replace) or a copy of the current
       store (``merge``: union, deletes win), and load the archive into it;
    3. rename it over ``memories.duckdb`` - one atomic step, so the data dir holds either the
       old store or the new one, never half of each.

    The search index is a cache: the next start re-indexes what changed. ``progress`` gets
    ``(phase, bytes read)`` with phase ``verify`` then ``load``.
    """
    store_path = data_dir / "memories.duckdb"
    work = data_dir / RESTORE_WORK_DIR
    vault = vt.VaultActor(seed, device_id)
    async with Supervisor() as supervisor:
        await supervisor.start(ActorSpec("vault", reuse(vault), vault.mailbox))
        key = await expect(await call(vault.mailbox.address, vt.DeriveKey, backup.KEY_PURPOSE))
        identity = await expect(await call(vault.mailbox.address, vt.Whoami))

    def phase(name: str) -> Callable[[int], None] | None:
        return None if progress is None else partial(progress, name)

    verified = await trio.to_thread.run_sync(
        partial(backup.verify, source, key, identity.identity_id, progress=phase("verify"))
    )
    await trio.to_thread.run_sync(partial(shutil.rmtree, work, ignore_errors=True))
    work.mkdir(mode=0o700)
    try:
        staged = work / "memories.duckdb"
        if store_path.exists():
            # Opening and closing the store checkpoints it: a write-ahead log left by a crash is
            # folded into the file, so the file alone is the store (to copy, or to replace).
            await _with_store(store_path, None)
            if store_path.with_name(store_path.name + ".wal").exists():
                raise DmgnError(
                    f"{store_path} still has a write-ahead log after a checkpoint; "
                    "nothing restored (start and stop the node once, then retry)"
                )
            if merge:
                await trio.to_thread.run_sync(shutil.copyfile, store_path, staged)
        loaded = await _with_store(
            staged, partial(_load_archive, source, key, identity.identity_id, phase("load"))
        )
        assert loaded is not None
        if not merge and (loaded.memories, loaded.links, loaded.tombstones) != (
            verified["counts"]["memories"],
            verified["counts"]["links"],
            verified["counts"]["tombstones"],
        ):
            raise DmgnError(
                f"the restored store holds {loaded.memories} memories, {loaded.links} links and "
                f"{loaded.tombstones} tombstones, not what {source} lists; nothing restored"
            )
        os.replace(staged, store_path)
        _fsync_directory(data_dir)
    finally:
        await trio.to_thread.run_sync(partial(shutil.rmtree, work, ignore_errors=True))
    return {
        "file": str(source),
        "mode": "merge" if merge else "replace",
        "archive": verified,
        "memories": loaded.memories,
        "links": loaded.links,
        "tombstones": loaded.tombstones,
    }


async def _with_store(
    path: Path,
    work: Callable[[Address[st.StoreMsg]], Awaitable[None]] | None,
) -> st.StoreStats | None:
    """Run ``work`` against a store actor on ``path``, then stop it (closing = checkpoint)."""
    store = st.StoreActor(path)
    async with Supervisor() as supervisor:
        await supervisor.start(ActorSpec("store", reuse(store), store.mailbox))
        if work is None:
            return None
        await work(store.mailbox.address)
        return await expect(await call(store.mailbox.address, st.Stats))
    return None  # not reached: the supervisor re-raises what stopped the block


async def _load_archive(
    source: Path,
    key: bytes,
    identity_id: str,
    progress: Callable[[int], None] | None,
    store: Address[st.StoreMsg],
) -> None:
    """Load every chunk of a (verified) archive, one store transaction per chunk. Reading
    checks the archive again, so a file changed since the verify pass fails here, before the
    staged store replaces anything."""
    rows = backup.iter_archive(source, key, identity_id, progress=progress)
    while True:
        chunk = await trio.to_thread.run_sync(next, rows, None)
        if chunk is None:
            return
        kind, items = chunk
        memories: tuple[st.StoredEnvelope, ...] = ()
        links: tuple[st.Link, ...] = ()
        tombstones: tuple[st.TombstoneRow, ...] = ()
        if kind == "memories":
            memories = tuple(st.StoredEnvelope(*r) for r in items)
        elif kind == "links":
            links = tuple(st.Link(*r) for r in items)
        else:
            tombstones = tuple(st.TombstoneRow(*r) for r in items)
        await expect(await call(store, st.Load, memories, links, tombstones, timeout=600))


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
