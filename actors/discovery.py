"""The discovery actor: finds peers on the LAN (Zeroconf) and on the Internet (Kademlia DHT).

It owns the Zeroconf announcer/browser and the Kademlia node, and is the only code touching
either library. What it finds goes out as :class:`PeerFound` events on a channel given at
construction; the node hands them to the transport, which dials, and the Noise handshake then
decides what the peer is (one of our devices, a storage peer, or nobody we accept). Discovery
itself trusts nothing it hears:

* Zeroconf (``_dmgn._tcp.local.``) announces only a device id and the WebSocket port (no
  identity in clear on the LAN). Anyone can announce anything there; the handshake sorts it out.
* The DHT is untrusted storage. We merge a signed, expiring :class:`~dmgn.peer_record.PeerRecord`
  for this device into our identity's :class:`~dmgn.peer_record.ProviderRecord`, and publish
  that sealed with our identity's :class:`~dmgn.peer_record.ProviderLocator` (a key only our
  devices can derive): nobody else can find it, read it, or store anything under its key.
  Every read is verified and a record that fails is ignored. Our DHT node stores only valid
  sealed records under their signer's key, with caps, and does not amplify (``actors._dht``).
* The DHT socket binds the host of ``listen_addr`` (a node listening on 127.0.0.1 has no DHT
  on other interfaces).
* Bootstrap peers from config are reported as found (the transport dials them) and seed the DHT.

Kademlia (``kademlia`` 2.2, asyncio over UDP) runs on its own asyncio loop in a daemon thread
(:class:`DhtNode`); trio waits for its results in worker threads. Zeroconf's sync API runs in
threads too; its browser callbacks hop back into trio with ``trio.from_thread``.

Port convention: a node's DHT listens on UDP at the same port number as its WebSocket (TCP)
listener unless ``dht_port`` says otherwise, so one ``ws://host:port`` bootstrap address seeds
both.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, assert_never
from urllib.parse import urlsplit

import trio

from actors._dht import DhtStats, GuardedServer, RecordTable
from actors.runtime import Err, Mailbox, Ok, Reply, Result
from dmgn.peer_record import (
    RECORD_CONTEXT,
    PeerRecord,
    ProviderLocator,
    ProviderRecord,
    RecordError,
    decode_sealed_record,
)

log = logging.getLogger("dmgn.discovery")
T = TypeVar("T")

__all__ = [
    "DEFAULT_RECORD_TTL",
    "SERVICE_TYPE",
    "Announce",
    "DhtNode",
    "DiscoveryActor",
    "DiscoveryMsg",
    "DiscoveryState",
    "DiscoveryStatus",
    "FoundPeer",
    "LookupIdentity",
    "LookupPeer",
    "PeerFound",
]

SERVICE_TYPE = "_dmgn._tcp.local."
#: How long our records stay valid. An hour: a moved laptop's stale address dies out quickly,
#: and republishing every third of it keeps the DHT's copies fresh at ~1 small write per 20 min.
DEFAULT_RECORD_TTL = 3600
#: How often the DHT is asked for our identity's devices (and a first time right after start).
DEFAULT_LOOKUP_INTERVAL = 60.0
#: Soonest retry of a failed publish, or re-publish when our entry went missing from the
#: provider record (two devices merging at once: the last writer wins, the other retries).
MIN_REPUBLISH_INTERVAL = 10.0
#: Deadline for one DHT operation (a lookup crawls several UDP round trips; kademlia's own RPC
#: timeout is 5 s).
DHT_TIMEOUT = 20.0
#: Deadline for resolving one Zeroconf service (the browser saw a name; ask for its records).
MDNS_RESOLVE_MS = 3000
#: How often the interfaces are read for a changed address (DHCP, a Wi-Fi switch, a cable).
ADDRESS_INTERVAL = 5.0


# -- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerFound:
    """Emitted on the ``found`` channel: somewhere worth dialing.

    ``device_id`` is None for a bootstrap address (who is there is learnt by dialing). For a DHT
    find, ``identity`` and ``noise_key`` come from a verified record, so the dialer can expect
    them; for Zeroconf they are None (the LAN is not trusted with identities).
    """

    addrs: tuple[str, ...]
    source: str  # "mdns" | "dht" | "bootstrap"
    device_id: bytes | None = None
    identity: bytes | None = None
    noise_key: bytes | None = None
    expires_at: int | None = None


@dataclass(frozen=True, slots=True)
class Announce:
    """Our reachable addresses changed (or are known for the first time): publish them now."""

    addrs: tuple[str, ...]
    reply: Reply[None]


@dataclass(frozen=True, slots=True)
class LookupIdentity:
    """The verified, unexpired device records an identity's provider record lists.

    Only our own identity can be looked up: provider records are sealed with a key only its
    devices hold. Another identity's answers ``Err(code="blinded")``.
    """

    identity: bytes
    reply: Reply[tuple[PeerRecord, ...]]


@dataclass(frozen=True, slots=True)
class LookupPeer:
    """The record of one of our own devices (from our provider record)."""

    device_id: bytes
    reply: Reply[PeerRecord | None]


@dataclass(frozen=True, slots=True)
class FoundPeer:
    device_id: str
    addrs: tuple[str, ...]
    sources: tuple[str, ...]
    last_seen: float  # wall clock
    expires_at: int | None


@dataclass(frozen=True, slots=True)
class DiscoveryStatus:
    device_id: str
    addrs: tuple[str, ...]
    mdns: bool
    dht_port: int | None
    dht_neighbors: int
    bootstrap: tuple[str, ...]
    found: tuple[FoundPeer, ...]
    last_publish_at: float | None
    last_error: str | None
    dht_records: int = 0
    dht_stats: DhtStats | None = None
    #: The address the DHT's UDP socket is bound to.
    dht_bind: str | None = None
    #: Where Zeroconf listens: "all" or the interface addresses it was given; None: off.
    mdns_interfaces: tuple[str, ...] | None = None
    #: What the last DHT bootstrap got, e.g. "2 of 3 answered" (None: nothing to bootstrap).
    dht_bootstrap: str | None = None


@dataclass(frozen=True, slots=True)
class DiscoveryState:
    reply: Reply[DiscoveryStatus]


DiscoveryMsg = Announce | LookupIdentity | LookupPeer | DiscoveryState


# -- the Kademlia bridge ------------------------------------------------------------------------


class DhtNode:
    """A kademlia ``Server`` on its own asyncio loop in a daemon thread, driven from trio.

    Every call waits in a trio worker thread for the asyncio future, under a deadline. The
    thread and the loop belong to this object; ``stop`` ends both.
    """

    def __init__(self, *, ksize: int = 20, alpha: int = 3) -> None:
        self._ksize, self._alpha = ksize, alpha
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self.table = RecordTable()
        self.host: str | None = None
        self.port: int | None = None

    @property
    def stats(self) -> DhtStats:
        """Bytes and requests in and out, refused stores... (read from any thread)."""
        return self._server.stats if self._server is not None else DhtStats()

    async def start(self, port: int, interface: str = "0.0.0.0") -> int:
        """Listen on UDP ``interface:port`` (0 picks a free port); returns the bound port."""
        for name in ("kademlia", "rpcudp"):
            quiet = logging.getLogger(name)
            if quiet.level == logging.NOTSET:
                # kademlia warns on every lookup while a node has no neighbours (normal when
                # alone) and rpcudp on every stray datagram; ours (actors._dht) summarise.
                quiet.setLevel(logging.ERROR)
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            ready.set()
            loop.run_forever()
            # Requests still in flight (a welcome waiting for its ping...) end here, quietly.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=serve, name="dmgn-kademlia", daemon=True)
        self._thread.start()
        await trio.to_thread.run_sync(ready.wait)
        self._server = GuardedServer(ksize=self._ksize, alpha=self._alpha, storage=self.table)
        await self._run(self._server.listen(port, interface))
        sockname = self._server.transport.get_extra_info("sockname")
        self.host, self.port = str(sockname[0]), int(sockname[1])
        return self.port

    async def _run(self, coroutine: Coroutine[Any, Any, T], timeout: float = DHT_TIMEOUT) -> T:
        assert self._loop is not None, "DhtNode.start() first"
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            with trio.fail_after(timeout):
                return await trio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        finally:
            future.cancel()

    async def bootstrap(self, addrs: list[tuple[str, int]]) -> int:
        """Contact known nodes; returns how many answered."""
        nodes = await self._run(self._server.bootstrap(addrs))
        return len(nodes)

    async def get(self, key: bytes) -> bytes | None:
        value = await self._run(self._server.get(key))
        return value if isinstance(value, bytes) else None

    async def set(self, key: bytes, value: bytes) -> bool:
        """Store on the closest nodes, and always here too: kademlia stores locally only when
        this node is among the closest, and a lone node (the first of a network, or one whose
        peers are gone) must still answer for its own records."""
        return bool(await self._run(self._set(key, value)))

    async def _set(self, key: bytes, value: bytes) -> bool:
        from kademlia.utils import digest

        self._server.storage[digest(key)] = value
        return bool(await self._server.set(key, value))

    def neighbors(self) -> int:
        if self._server is None or self._server.protocol is None:
            return 0
        return len(self._server.bootstrappable_neighbors())

    def local_value(self, key: bytes) -> bytes | None:
        """What this node itself stores for ``key``."""
        from kademlia.utils import digest

        value = self.table.get(digest(key))
        return value if isinstance(value, bytes) else None

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        server = self._server
        if server is not None:
            loop.call_soon_threadsafe(server.stop)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)


# -- the actor ----------------------------------------------------------------------------------


@dataclass
class _Found:
    addrs: tuple[str, ...]
    sources: set[str] = field(default_factory=set)
    last_seen: float = 0.0
    expires_at: int | None = None


class DiscoveryActor:
    """Announces this device and reports the peers it finds.

    ``sign(context, data)`` asks the vault for an identity signature (the node passes
    ``lambda c, d: call(vault, vault.Sign, c, d)``); ``locator`` is derived from the vault's
    ``DeriveKey(LOCATOR_PURPOSE)``. ``dht_interface`` is where the DHT binds (the node passes
    the host of its ``listen_addr``). ``found`` receives :class:`PeerFound`
    events; it is never closed by the actor. ``dht_port=None`` disables the DHT,
    ``mdns=False`` Zeroconf. ``mdns_interfaces`` restricts Zeroconf (tests use loopback).
    """

    def __init__(
        self,
        *,
        identity: bytes,
        device_id: bytes,
        noise_key: bytes,
        sign: Callable[[bytes, bytes], Awaitable[Result[bytes]]],
        locator: ProviderLocator,
        found: trio.MemorySendChannel[PeerFound],
        listen_port: int,
        addrs: tuple[str, ...] = (),
        bootstrap: tuple[str, ...] = (),
        dht_port: int | None = 0,
        dht_interface: str = "0.0.0.0",
        mdns: bool = True,
        mdns_interfaces: list[str] | None = None,
        record_ttl: int = DEFAULT_RECORD_TTL,
        lookup_interval: float = DEFAULT_LOOKUP_INTERVAL,
        capacity: int = 32,
        addresses: Callable[[], tuple[str, ...]] | None = None,
        on_addresses: Callable[[tuple[str, ...]], Awaitable[None]] | None = None,
        address_interval: float = ADDRESS_INTERVAL,
    ) -> None:
        self.mailbox: Mailbox[DiscoveryMsg] = Mailbox("discovery", capacity)
        self._identity = identity
        self._device_id = device_id
        self._noise_key = noise_key
        self._sign = sign
        self._locator = locator
        self._own_records: tuple[PeerRecord, ...] = ()
        self._found_channel = found
        self._listen_port = listen_port
        self._addrs = tuple(addrs)
        self._bootstrap = tuple(bootstrap)
        self._dht_port = dht_port
        self._dht_interface = dht_interface
        self._mdns_enabled = mdns
        self._mdns_interfaces = mdns_interfaces
        self._ttl = record_ttl
        self._lookup_interval = lookup_interval
        self._found: dict[bytes, _Found] = {}
        self._dht: DhtNode | None = None
        self._zeroconf: Any = None
        self._mdns_info: Any = None
        self._publish_wakeup = trio.Event()
        self._last_publish_at: float | None = None
        self._last_error: str | None = None
        self._entry_missing = False
        self._addresses = addresses
        self._on_addresses = on_addresses
        self._address_interval = address_interval
        self._bootstrap_result: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                if self._dht_port is not None:
                    self._dht = DhtNode()
                    port = self._dht_port or self._listen_port
                    try:
                        await self._dht.start(port, self._dht_interface)
                    except OSError as error:
                        # Someone has the conventional port: take any (bootstrap by that peer
                        # then needs dht_port set explicitly, which `dmgn peers` shows).
                        log.warning(
                            "dht: UDP port %d unavailable (%s); using a free port", port, error
                        )
                        await self._dht.start(0, self._dht_interface)
                    log.info("dht: listening on UDP %s:%d", self._dht_interface, self._dht.port)
                if self._mdns_enabled:
                    await self._start_mdns(nursery)
                for addr in self._bootstrap:
                    await self._emit(PeerFound((addr,), "bootstrap"))
                if self._dht is not None:
                    nursery.start_soon(self._dht_loop)
                if self._addresses is not None:
                    nursery.start_soon(self._watch_addresses)
                task_status.started()
                async for message in self.mailbox:
                    await self._handle(message)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._stop_libraries)

    def _stop_libraries(self) -> None:
        if self._zeroconf is not None:
            # zeroconf raises its own kinds (and OSError) when the interface is already gone;
            # saying goodbye on the LAN is best effort at shutdown, closing it below is not.
            with contextlib.suppress(Exception):
                if self._mdns_info is not None:
                    self._zeroconf.unregister_service(self._mdns_info)
            self._zeroconf.close()
            self._zeroconf = None
        if self._dht is not None:
            self._dht.stop()

    async def _handle(self, message: DiscoveryMsg) -> None:
        match message:
            case Announce():
                await self._announce(tuple(message.addrs))
                message.reply.ok(None)
            case LookupIdentity() if message.identity != self._identity:
                message.reply.err(
                    "provider records are sealed: only an identity's own devices can find them",
                    "blinded",
                )
            case LookupIdentity():
                message.reply.send(await self._capture(self._lookup_identity(message.identity)))
            case LookupPeer():
                message.reply.send(await self._capture(self._lookup_peer(message.device_id)))
            case DiscoveryState():
                message.reply.ok(self._status())
            case _:
                assert_never(message)

    async def _announce(self, addrs: tuple[str, ...]) -> None:
        self._addrs = addrs
        if self._zeroconf is not None:
            try:
                await trio.to_thread.run_sync(self._register_mdns)
            except Exception as error:  # zeroconf raises its own kinds; LAN discovery degrades
                self._last_error = f"mdns announce: {error or type(error).__name__}"
                log.warning("zeroconf: could not announce %s: %s", addrs, self._last_error)
        self._publish_wakeup.set()

    async def _watch_addresses(self) -> None:
        """Re-announce (mDNS, DHT, and whoever ``on_addresses`` tells) when the interfaces'
        addresses change."""
        assert self._addresses is not None
        while True:
            await trio.sleep(self._address_interval)
            current = await trio.to_thread.run_sync(self._addresses)
            if current == self._addrs:
                continue
            log.info("addresses changed: %s -> %s", ", ".join(self._addrs), ", ".join(current))
            await self._announce(current)
            if self._on_addresses is not None:
                await self._on_addresses(current)

    async def _capture(self, work: Awaitable[T]) -> Result[T]:
        try:
            return Ok(await work)
        except Exception as error:  # kademlia raises many kinds; a lookup failing is a value
            log.warning("dht lookup failed", exc_info=error)
            return Err(f"DHT lookup failed: {error or type(error).__name__}", "dht_error")

    async def _emit(self, event: PeerFound) -> None:
        if event.device_id == self._device_id:
            return
        key = event.device_id or event.addrs[0].encode()
        known = self._found.get(key)
        if known is None:
            known = self._found[key] = _Found(event.addrs)
        known.addrs = event.addrs
        known.sources.add(event.source)
        known.last_seen = time.time()
        known.expires_at = event.expires_at
        try:
            await self._found_channel.send(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("discovery: nobody listens for found peers any more")

    # -- DHT -------------------------------------------------------------------------------

    async def _dht_loop(self) -> None:
        """Bootstrap, then publish our records and look up our devices, periodically."""
        assert self._dht is not None
        await self._dht_bootstrap()
        next_publish = last_attempt = 0.0
        while True:
            now = trio.current_time()
            if now >= next_publish or self._publish_wakeup.is_set():
                self._publish_wakeup = trio.Event()
                last_attempt = now
                ok = await self._guard("publish", self._publish())
                next_publish = now + (self._ttl / 3 if ok else MIN_REPUBLISH_INTERVAL)
            if await self._guard("lookup", self._find_our_devices()) and self._entry_missing:
                # Another device's read-merge-write raced ours and dropped our entry.
                next_publish = min(next_publish, last_attempt + MIN_REPUBLISH_INTERVAL)
            now = trio.current_time()
            with trio.move_on_after(min(self._lookup_interval, max(0.0, next_publish - now))):
                await self._publish_wakeup.wait()

    async def _guard(self, what: str, work: Awaitable[object]) -> bool:
        try:
            await work
        except Exception as error:  # the DHT is best effort: log, retry later, keep running
            self._last_error = f"{what}: {error or type(error).__name__}"
            log.warning(
                "dht %s failed: %s",
                what,
                self._last_error,
                exc_info=not isinstance(error, OSError | trio.TooSlowError | RecordError),
            )
            return False
        return True

    async def _dht_bootstrap(self) -> None:
        assert self._dht is not None
        targets = []
        for addr in self._bootstrap:
            parts = urlsplit(addr)
            try:
                port = parts.port
            except ValueError:
                continue
            if not parts.hostname or port is None:
                continue
            try:
                infos = await trio.socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_DGRAM)
            except OSError as error:
                log.warning("dht: cannot resolve bootstrap peer %s: %s", addr, error)
                continue
            for info in infos[:1]:
                targets.append((str(info[4][0]), port))
        if targets:
            answered = 0

            async def bootstrap() -> None:
                nonlocal answered
                assert self._dht is not None
                answered = await self._dht.bootstrap(targets)

            ok = await self._guard("bootstrap", bootstrap())
            self._bootstrap_result = (
                f"{answered} of {len(targets)} answered" if ok else f"failed ({self._last_error})"
            )

    async def _signature(self, payload: bytes) -> bytes:
        signed = await self._sign(RECORD_CONTEXT, payload)
        if isinstance(signed, Err):
            raise RuntimeError(f"the vault could not sign our DHT record: {signed.reason}")
        return signed.value

    async def _publish(self) -> None:
        assert self._dht is not None
        if not self._addrs:
            return  # nothing to tell until the transport says where we listen
        now = int(time.time())
        unsigned = PeerRecord(
            self._identity, self._device_id, self._noise_key, self._addrs[:8], now, now + self._ttl
        )
        record = unsigned.signed(await self._signature(unsigned.signing_payload()))
        current: ProviderRecord | None = None
        try:
            current = await self._read_provider()
        except RecordError as error:
            log.warning("dht: our provider record was unreadable (%s); replacing it", error)
        merged = ProviderRecord.merged(self._identity, current, record, now=now, ttl=self._ttl)
        provider = merged.signed(await self._signature(merged.signing_payload()))
        await self._dht.set(self._locator.key, self._locator.seal(provider).encode())
        self._last_publish_at = time.time()

    async def _read_provider(self) -> ProviderRecord | None:
        """Our identity's provider record from the DHT, opened and verified (None: absent)."""
        assert self._dht is not None
        raw = await self._dht.get(self._locator.key)
        if raw is None:
            return None
        now = int(time.time())
        sealed = decode_sealed_record(raw, now=now)
        return self._locator.open(sealed, now=now, identity=self._identity)

    async def _find_our_devices(self) -> None:
        records = await self._lookup_identity(self._identity)
        self._entry_missing = bool(self._addrs) and self._device_id not in {
            r.device_id for r in records
        }
        for record in records:
            await self._emit(
                PeerFound(
                    record.addrs,
                    "dht",
                    record.device_id,
                    record.identity,
                    record.noise_key,
                    record.expires_at,
                )
            )

    async def _lookup_identity(self, identity: bytes) -> tuple[PeerRecord, ...]:
        if self._dht is None or identity != self._identity:
            return ()
        try:
            provider = await self._read_provider()
        except RecordError as error:
            log.warning("dht: ignoring our provider record: %s", error)
            return ()
        self._own_records = () if provider is None else provider.entries
        return self._own_records

    async def _lookup_peer(self, device_id: bytes) -> PeerRecord | None:
        for record in await self._lookup_identity(self._identity):
            if record.device_id == device_id:
                return record
        return None

    # -- Zeroconf --------------------------------------------------------------------------

    async def _start_mdns(self, nursery: trio.Nursery) -> None:
        from zeroconf import IPVersion, ServiceBrowser, Zeroconf

        names_send, names_receive = trio.open_memory_channel[str](64)
        token = trio.lowlevel.current_trio_token()
        own = f"{self._device_id.hex()}.{SERVICE_TYPE}"

        def on_change(zeroconf: object, service_type: str, name: str, state_change: object) -> None:
            # Called in Zeroconf's thread: hop into trio without blocking that thread long.
            if name == own or "Removed" in str(state_change):
                return
            with contextlib.suppress(
                trio.RunFinishedError, trio.WouldBlock, trio.ClosedResourceError
            ):
                trio.from_thread.run_sync(names_send.send_nowait, name, trio_token=token)

        def start() -> None:
            from zeroconf import InterfaceChoice

            interfaces: Any = self._mdns_interfaces or InterfaceChoice.All
            self._zeroconf = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
            self._register_mdns()
            ServiceBrowser(self._zeroconf, SERVICE_TYPE, handlers=[on_change])

        try:
            await trio.to_thread.run_sync(start)
        except OSError as error:
            self._last_error = f"mdns: {error}"
            log.warning("zeroconf unavailable (%s); LAN discovery is off", error)
            return
        nursery.start_soon(self._resolve_mdns, names_receive)

    def _register_mdns(self) -> None:
        """(Re)announce our service: device id and port only (thread)."""
        from zeroconf import ServiceInfo

        addresses = self._mdns_addresses()
        info = ServiceInfo(
            SERVICE_TYPE,
            f"{self._device_id.hex()}.{SERVICE_TYPE}",
            addresses=[
                socket.inet_pton(socket.AF_INET6 if ":" in a else socket.AF_INET, a)
                for a in addresses
            ],
            port=self._listen_port,
            properties={"d": self._device_id.hex(), "v": "1"},
            server=f"dmgn-{self._device_id.hex()[:16]}.local.",
        )
        if self._mdns_info is not None:
            self._zeroconf.update_service(info)
        else:
            self._zeroconf.register_service(info, allow_name_change=False)
        self._mdns_info = info

    def _mdns_addresses(self) -> list[str]:
        hosts = []
        for addr in self._addrs:
            host = urlsplit(addr).hostname or ""
            with contextlib.suppress(ValueError):
                if not ipaddress.ip_address(host).is_unspecified:
                    hosts.append(host)
        if not hosts and self._mdns_interfaces:
            hosts = [i for i in self._mdns_interfaces if i.count(".") == 3]
        return hosts or ["127.0.0.1"]

    async def _resolve_mdns(self, names: trio.MemoryReceiveChannel[str]) -> None:
        async for name in names:
            info = await trio.to_thread.run_sync(
                self._zeroconf.get_service_info, SERVICE_TYPE, name, MDNS_RESOLVE_MS
            )
            if info is None:
                continue
            device_hex = (info.properties or {}).get(b"d", b"")
            try:
                device_id = bytes.fromhex(device_hex.decode())
            except (ValueError, UnicodeDecodeError):
                continue
            if len(device_id) != 16 or not info.port:
                continue
            addrs = tuple(
                f"ws://[{address}]:{info.port}" if ":" in address else f"ws://{address}:{info.port}"
                for address in info.parsed_addresses()[:8]
            )
            if addrs:
                await self._emit(PeerFound(addrs, "mdns", device_id))

    # -- status ----------------------------------------------------------------------------

    def _status(self) -> DiscoveryStatus:
        found = tuple(
            FoundPeer(
                key.hex() if len(key) == 16 else key.decode(errors="replace"),
                f.addrs,
                tuple(sorted(f.sources)),
                f.last_seen,
                f.expires_at,
            )
            for key, f in sorted(self._found.items())
        )
        return DiscoveryStatus(
            self._device_id.hex(),
            self._addrs,
            self._zeroconf is not None,
            self._dht.port if self._dht else None,
            self._dht.neighbors() if self._dht else 0,
            self._bootstrap,
            found,
            self._last_publish_at,
            self._last_error,
            len(self._dht.table) if self._dht else 0,
            replace(self._dht.stats) if self._dht else None,
            self._dht.host if self._dht else None,
            None
            if self._zeroconf is None
            else tuple(self._mdns_interfaces)
            if self._mdns_interfaces
            else ("all",),
            self._bootstrap_result,
        )
