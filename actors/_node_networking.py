"""How the supervision tree builds each online actor (:func:`actors.node.start_networking`
joins them): the settings, this device's wire credentials, the storage service, the shard keeper
(with the store and gossip requests it is given as callables), the transport's listener (and
its fallback port) and discovery.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import trio

from actors import discovery as dc
from actors import gossip as gs
from actors import shard_keeper as sk
from actors import storage as sg
from actors import store as st
from actors import transport as tp
from actors import vault as vt
from actors._addresses import local_addresses, reachable_addresses
from actors._keeper_tables import KeeperTables
from actors._node_handles import RunningNode
from actors._storage_tables import StorageTables
from actors.peering import Advertise, OwnAddresses, PeeringMsg
from actors.runtime import ActorSpec, Address, Err, Ok, Result, Supervisor, call, expect, reuse
from dmgn import feed
from dmgn.config import DEFAULT_LISTEN_ADDR, Config
from dmgn.errors import ConfigError
from dmgn.peer_record import LOCATOR_PURPOSE, ProviderLocator
from dmgn.shards import MailKeys, ShardKeys
from wire import (
    CERTIFICATE_CONTEXT,
    DEVICE_ID_BYTES,
    DeviceCertificate,
    DeviceCredentials,
    KeyPair,
    Message,
    PeerIdentity,
)

log = logging.getLogger("dmgn.node")

__all__ = [
    "NetworkSettings",
    "VaultAsks",
    "device_credentials",
    "first_os_error",
    "start_discovery",
    "start_keeper",
    "start_storage",
    "start_transport",
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
    #: Find storage peers through peer exchange (config ``peer_exchange``).
    peer_exchange: bool = True
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
            peer_exchange=config.peer_exchange,
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


@dataclass(frozen=True, slots=True)
class VaultAsks:
    """The vault requests the online actors are given as callables (they never see the
    vault's address, only what they may ask of it)."""

    vault: Address[vt.VaultMsg]

    def sign(self, context: bytes, data: bytes) -> Awaitable[Result[bytes]]:
        return call(self.vault, vt.Sign, context, data)

    def owner_sign(self, context: bytes, data: bytes) -> Awaitable[Result[bytes]]:
        return call(self.vault, vt.SignAs, vt.STORAGE_OWNER, context, data)

    def storage_sign(self, context: bytes, data: bytes) -> Awaitable[Result[bytes]]:
        return call(self.vault, vt.SignAs, vt.STORAGE_NODE, context, data)

    def sign_feed(
        self, head: feed.FeedHead | None, device: bytes, items: tuple[tuple[int, feed.Op], ...]
    ) -> Awaitable[Result[list[feed.FeedEntry | Err]]]:
        return call(self.vault, vt.SignFeed, head, device, items)


async def start_storage(
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


async def start_keeper(
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
    vault = VaultAsks(node.vault)
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


async def start_transport(
    supervisor: Supervisor,
    make_transport: Callable[[str | None], tp.TransportActor],
    settings: NetworkSettings,
) -> tuple[str | None, str | None]:
    """Listen on the configured address, or on a free port of the same host when that one is
    taken and nobody chose it: (the bound address, a sentence saying so if it moved)."""
    transport = make_transport(settings.listen_addr)
    try:
        await supervisor.start(ActorSpec("transport", reuse(transport), transport.mailbox))
    except Exception as failure:  # the listener's bind error arrives inside nursery groups
        error = first_os_error(failure)
        if error is None or settings.listen_addr is None:
            raise
        if not settings.listen_fallback:
            raise ConfigError(_listen_error(settings.listen_addr, error)) from None
        # Nobody chose this address: any free port on the same host serves as well, as long
        # as we say so (node_addrs and `dmgn start` show the one we got).
        fallback = _with_port(settings.listen_addr, 0)
        transport = make_transport(fallback)
        try:
            await supervisor.start(ActorSpec("transport", reuse(transport), transport.mailbox))
        except Exception as second:  # as above: the bind error, wrapped
            error = first_os_error(second)
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


async def start_discovery(
    node: RunningNode,
    settings: NetworkSettings,
    identity: bytes,
    credentials: DeviceCredentials,
    vault: VaultAsks,
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
        told = await call(peering, Advertise, tuple(current))
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


def first_os_error(error: BaseException) -> OSError | None:
    if isinstance(error, OSError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = first_os_error(inner)
            if found is not None:
                return found
    return None
