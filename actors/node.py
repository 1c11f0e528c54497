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

This module builds the tree (:func:`open_node`, :func:`start_networking`,
:func:`restore_from_network`) and is the face the entry points import; the pieces are private
helpers beside it: :mod:`actors._node_handles` (``RunningNode``, ``Networking`` and its reports),
:mod:`actors._node_networking` (settings, credentials, each online actor's construction, the
listener's fallback), :mod:`actors._node_publish` (what predates gossip),
:mod:`actors._node_interfaces` (metrics endpoint, MCP bridge, REST API, control socket) and
:mod:`actors._node_restore` (restoring a backup archive).

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
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import trio

from actors import discovery as dc
from actors import gossip as gs
from actors import indexer as ix
from actors import router as qr
from actors import shard_keeper as sk
from actors import store as st
from actors import transport as tp
from actors import vault as vt
from actors._addresses import local_addresses, reachable_addresses
from actors._counting_network import CountingNetwork
from actors._keeper_tables import KeeperTables, MemoryKeeperTables
from actors._node_handles import Networking, RunningNode
from actors._node_interfaces import start_local_interfaces, start_metrics_endpoint
from actors._node_networking import (
    NetworkSettings,
    VaultAsks,
    device_credentials,
    start_discovery,
    start_keeper,
    start_storage,
    start_transport,
)
from actors._node_publish import load_feed, publish_unsynced
from actors._node_restore import restore_archive
from actors._storage_tables import MemoryStorageTables, StorageTables
from actors._store_tables import MemoryStoreTables, StoreTables
from actors.peering import Advertise, CutOff, OwnAddresses, Peering, PeeringMsg, Reannounce
from actors.runtime import (
    ActorGone,
    ActorSpec,
    Address,
    Mailbox,
    Ok,
    Result,
    Supervisor,
    call,
    expect,
    reuse,
)
from actors.service import RETENTION_INTERVAL, AttachNetwork, MemoryService, NetworkLink, NodeInfo
from dmgn import feed
from dmgn.config import Config, load_config, parse_replica
from dmgn.embedding import Embedder, HashingEmbedder, default_embedder, lazy_default_embedder
from dmgn.errors import InvalidInput
from dmgn.metrics import NodeMetrics
from dmgn.retention import RetentionPolicy
from dmgn.shards import MailKeys
from dmgn.storage_protocol import STORAGE_MESSAGE_TYPES
from wire import Message, Network, PeerIdentity

log = logging.getLogger("dmgn.node")

#: What a connection accepts: the base types, gossip's, the storage protocol's and the query
#: router's.
DEVICE_REGISTRY = gs.GOSSIP_REGISTRY.extended(*STORAGE_MESSAGE_TYPES, *qr.QUERY_MESSAGE_TYPES)

__all__ = [
    "DEVICE_REGISTRY",
    "NetworkSettings",
    "Networking",
    "NodeInfo",
    "RunningNode",
    "default_alpha",
    "device_credentials",
    "embedder_from_environment",
    "expect",
    "open_node",
    "publish_unsynced",
    "restore_archive",
    "restore_from_network",
    "start_local_interfaces",
    "start_metrics_endpoint",
    "start_networking",
]


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
        router = qr.QueryRouter(
            service.local_mailbox.address,
            replica_days=replica_days,
            query_timeout=query_timeout,
            wall_clock=wall_clock,
            mailbox=router_mailbox,
        )
        await supervisor.start(ActorSpec("router", reuse(router), router.mailbox))

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
    existing = [entry for entry, _ in await load_feed(feed_log)]

    events_send, events_receive = trio.open_memory_channel[tp.TransportEvent](64)
    found_send, found_receive = trio.open_memory_channel[dc.PeerFound](64)
    # The mailboxes first: the keeper, gossip and peering each need others' addresses before
    # those actors exist, and an address is its mailbox's.
    transport_mailbox: Mailbox[tp.TransportMessage] = Mailbox("transport")
    peering_mailbox: Mailbox[PeeringMsg] = Mailbox("peering", 32)
    gossip_mailbox: Mailbox[gs.GossipMsg] = Mailbox("gossip", gs.INBOX_CAPACITY)
    vault = VaultAsks(node.vault)
    transport_address = transport_mailbox.address

    def send(peer: PeerIdentity, message: Message) -> Awaitable[Result[None]]:
        return call(transport_address, tp.Send, peer, message)

    if light_tables and data_dir is None:
        if storage_tables is None:
            storage_tables = MemoryStorageTables()
        if keeper_tables is None:
            keeper_tables = MemoryKeeperTables()
    storage = await start_storage(
        node, settings, data_dir, whoami, send, wall_clock, tables=storage_tables
    )
    keeper = await start_keeper(
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
    keeper_settings = settings.keeper or sk.KeeperSettings()
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
        # Peer exchange: our storage offer is signed by the key our storage handshakes show.
        storage_key=None if credentials.storage is None else whoami.storage_public_key,
        storage_device_id=(
            None if credentials.storage is None else credentials.storage.certificate.device_id
        ),
        sign_offer=vault.storage_sign,
        storage_peers_wanted=keeper_settings.params.n + 2,
        # Where our mailbox lives (the keeper's target): its nearest storage nodes are always
        # among our storage peers, so a device with the seed alone finds them.
        rendezvous=MailKeys(
            await expect(await call(node.vault, vt.DeriveKey, "mailbox"))
        ).mailbox_target(whoami.owner_public_key),
        near=keeper_settings.mailbox_replicas,
        serving_only=partial(_holds_no_memories, node.store),
        exchange=settings.peer_exchange,
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

    bound, listen_note = await start_transport(supervisor, make_transport, settings)
    addrs = settings.advertise or (reachable_addresses(bound) if bound else ())
    node.info.listen_addrs = list(addrs)
    if bound is not None:
        own = local_addresses(bound) | set(addrs)
        await expect(await call(peering_mailbox.address, OwnAddresses, frozenset(own)))
    await expect(await call(peering_mailbox.address, Advertise, tuple(addrs)))

    discovery: Address[dc.DiscoveryMsg] | None = None
    if settings.discovery and bound is not None:
        discovery = await start_discovery(
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


async def _holds_no_memories(store: Address[st.StoreMsg]) -> bool:
    """Whether the store holds no memory (live or deleted) of our own: a storage host."""
    stats = await call(store, st.Stats)
    return isinstance(stats, Ok) and stats.value.memories == 0 and stats.value.tombstones == 0


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
            waited = trio.current_time()
            peers = await online.wait_for_storage_peers(min_peers, wait)
            if peers:
                left = max(0.0, wait - (trio.current_time() - waited))
                peers = await online.settle_storage_peers(left)
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
