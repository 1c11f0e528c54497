"""Handles to a running node's two halves, for the entry points: the local actors
(:class:`RunningNode`, from :func:`actors.node.open_node`) and the online ones
(:class:`Networking`, from :func:`actors.node.start_networking`), with the reports built from
their states (``dmgn peers``, the online sections of ``dmgn status``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

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
from actors._counting_network import WireCounters
from actors._node_status import discovery_section, peers_rows, sync_section
from actors._service_requests import ServiceMsg
from actors.peering import AddPeer, PeeringMsg, PeeringState, PeeringStatus
from actors.runtime import Address, Err, Supervisor, ask, call, expect
from actors.service import AttachNetwork, NodeInfo
from dmgn import api
from dmgn.metrics import NodeMetrics
from wire import DeviceCredentials

__all__ = ["Networking", "RunningNode"]


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
    #: Where the online half attaches itself to the service (:func:`actors.node.start_networking`).
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
                # Storage peers are found, not configured: how many we keep, and how many
                # storage nodes we know of (peer exchange) to replace one that goes away.
                "storage_peers_wanted": peering.storage_wanted,
                "storage_candidates": peering.storage_candidates,
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

    async def peering_status(self) -> PeeringStatus:
        return await expect(await call(self.peering, PeeringState))

    async def settle_storage_peers(self, timeout: float, quiet: float = 5.0) -> int:
        """After the first storage peers answered, give peer exchange time to find the rest:
        wait until we have as many as we keep, or none came for ``quiet`` seconds, or
        ``timeout``. A restore asks the peers it has; one started with the bootstrap peers
        alone would miss the shards and mailbox items the others hold."""
        wanted = (await self.peering_status()).storage_wanted
        best = (await self.durability()).storage_peers
        last_change = trio.current_time()
        with trio.move_on_after(timeout):
            while best < wanted and trio.current_time() - last_change < quiet:
                await trio.sleep(0.25)  # polling another actor's state: no event to wait on
                now = (await self.durability()).storage_peers
                if now > best:
                    best, last_change = now, trio.current_time()
        return (await self.durability()).storage_peers

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
