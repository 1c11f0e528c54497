"""The storage service actor: holds other identities' shards and mailbox items, blind.

Every node offers storage (``storage_quota`` in config.json, default 1 GiB; 0 turns it off) to
nodes of *other* identities. What it stores is ciphertext it cannot read (see
:mod:`dmgn.shards`): it keeps opaque objects keyed by (owner key, object id) and mailbox
items keyed by (owner, stream, seq) in its own DuckDB file, ``storage.duckdb``. An owner is an
identity's storage-owner key, never its identity key (issue 20): storage peers only meet us in
storage-mode handshakes, under our per-node storage key.

Rules, each answered with a code and a one-line reason when broken:

* Requests arrive only over authenticated Noise sessions (the transport drops anyone else before
  an application message). Our own devices never store shards with us: a request for our own
  owner key is ``refused``.
* A request names its ``owner`` and carries ``proof``, the owner key's signature over this
  node's storage key (`dmgn.storage_protocol.owner_proof_message`); a proof that does not
  verify is ``refused``: nobody reads, audits or deletes another owner's objects.
* Quotas (``quota``), in *charged* bytes: a row's bytes plus `ROW_OVERHEAD` (what a row costs
  on disk beside its data, so many tiny objects cannot exceed the disk a quota promises). An
  owner key may hold at most ``per_owner_quota``; the owners first stored from one source
  address together at most ``per_address_quota``; the node at most ``quota``.
* Owner keys are free, source addresses are not: requests are metered per source address
  (IPv4: the address; IPv6: its /64, see `source_of`) and per connection as well as per owner
  key (token buckets on requests and bytes; ``rate``), and one address may bring at most
  ``new_owners_per_address`` owner keys it has not used before an hour. Meters are kept for
  the `MAX_METERS` most recently seen of each kind (an evicted one comes back full).
* Reads load at most one batch (`dmgn.storage_protocol.MAX_BATCH_BYTES`) per request: sizes are
  read first, and only the blobs that fit.
* Refusals are counted in the status and logged through `PeerNoise` (one line per kind per
  minute): a stranger's flood of refused requests cannot rotate the logs away.
* Deletes carry the owner's signature over (owner, time, ids) (``refused`` without it).
* Watches: a ``mail.heads`` with ``watch`` = 1 makes the service send that connection a
  ``mail.notify`` whenever another peer pushes new entries for the owner, for `WATCH_SECONDS`
  (renewed by the next such ask). Watches are bounded in all and per owner (the oldest goes),
  a notice that finds no room on its way is skipped, and one that cannot be sent ends its
  watch: the keeper's slower poll finds whatever a lost notice announced.

Requests from one peer are served in arrival order, one at a time (DuckDB in a worker thread).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import assert_never
from urllib.parse import urlsplit

import trio
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from actors import _duckdb
from actors._peer_noise import PeerNoise
from actors._storage_tables import DuckStorageTables, StorageTables
from actors.runtime import Mailbox, Ok, Reply, Result
from dmgn import storage_protocol as sp
from dmgn.shards import DELETE_CONTEXT, MAX_MAIL_ITEM_BYTES, delete_payload
from wire import Message, PeerIdentity, TokenBucket, Value

log = logging.getLogger("dmgn.storage")

__all__ = [
    "DEFAULT_QUOTA",
    "StorageLimits",
    "StorageMsg",
    "StorageRequest",
    "StorageService",
    "StorageState",
    "StorageStatus",
    "source_of",
]

DEFAULT_QUOTA = 1 << 30
#: Requests per second (sustained, burst) and stored bytes per second one owner key may push.
#: A keeper dispersing a bulk import sends a few batched requests per second (`PLACE_ROUND`
#: memories x n shards in batches of up to 256 objects / 768 KiB); a restore's fetches are 8
#: requests in flight; both are far below these.
REQUEST_RATE, REQUEST_BURST = 200.0, 2000.0
BYTE_RATE, BYTE_BURST = 16 * 1024 * 1024.0, 256 * 1024 * 1024.0
#: One connection (a peer's storage key and device): one keeper, so one owner's rates; a
#: connection cycling through owner keys gets no more than that.
CONNECTION_REQUEST_RATE, CONNECTION_REQUEST_BURST = REQUEST_RATE, REQUEST_BURST
#: One source address: a few nodes behind one NAT (the transport admits 8 strangers an
#: address), so twice one owner's rates; a fresh owner key per request gets no more.
ADDRESS_REQUEST_RATE, ADDRESS_REQUEST_BURST = 2 * REQUEST_RATE, 2 * REQUEST_BURST
ADDRESS_BYTE_RATE, ADDRESS_BYTE_BURST = 2 * BYTE_RATE, BYTE_BURST
#: New owner keys one source address may bring in an hour (all at once, then refilled over the
#: hour): a household's identities behind one NAT, a restore or two. One stranger with a fresh
#: key per request got 10,000 of 10,000 requests served in 22 s before this.
NEW_OWNERS_PER_ADDRESS = 16
#: Meters (token buckets) kept per kind: owners, addresses, connections. The least recently
#: used goes for a new one and comes back with full buckets; the address and connection meters
#: bound what that is worth. (A few hundred bytes each; in a node, 20,000 fresh owners cost
#: ~3 KB of RSS each before, all kept.)
MAX_METERS = 4096
#: Charged per stored row beside its bytes: DuckDB spent 105 B (16-byte rows) to 161 B
#: (272-byte shards) of file per row here (keys, size, time, the primary-key index), rounded
#: up. A 272-byte shard (the smallest) is charged 528.
ROW_OVERHEAD = 256
#: RAM DuckDB may use for storage.duckdb: twice the quota, plus 64 MiB. Without a limit DuckDB
#: caches up to 80% of the machine's RAM (a filled 256 MiB quota left the node at 686 MB RSS).
#: Not less: a checkpoint rewrites a table's row group with its blobs, and one that cannot pin
#: them is FATAL (DuckDB invalidates the database until restart). Measured here: 64 MiB failed
#: so at 62.5 MiB of 512 KiB items, 128 MiB at 188 MiB; at twice the data, replacing every item
#: twice passed. Twice: replaced rows stay in their row group until it is rewritten.
DUCKDB_MEMORY_PER_QUOTA_BYTE = 2
DUCKDB_BASE_MEMORY = 64 * 1024 * 1024
#: Source of owners whose data was stored before sources were recorded: not any address's
#: (it counts against the node's quota only).
UNKNOWN_SOURCE = "(before sources were recorded)"
#: Verified owner proofs remembered (one per owner that uses us; 32 + 64 bytes each).
MAX_PROVEN_OWNERS = 4096
#: Answers on their way to peers at once (each holds at most one batch, <= 768 KiB).
ANSWERS_IN_FLIGHT = 32
#: A signed delete older (or newer) than this is a replay, or a badly wrong clock.
DELETE_WINDOW_NS = 3600 * 10**9
#: How long a watch lasts unless renewed (a keeper renews its watches every
#: ``KeeperSettings.mail_poll_interval``, 10 minutes by default).
WATCH_SECONDS = 1800
#: Watches held at once (the oldest is dropped for a new one; ~200 bytes each) and per owner
#: (an identity's devices, and a restore or two).
MAX_WATCHES = 4096
MAX_WATCHES_PER_OWNER = 16
#: Notices on their way at once; one beyond this is skipped (a notice is only a hint).
NOTICES_IN_FLIGHT = 64


@dataclass(frozen=True, slots=True)
class StorageLimits:
    #: Total bytes held for others (0: the node offers no storage).
    quota: int = DEFAULT_QUOTA
    #: Bytes one identity may hold; default a quarter of the quota, so one neighbour cannot
    #: take it all.
    per_owner_quota: int | None = None
    #: Bytes the owners first stored from one source address may hold together; default a
    #: quarter of the quota (one stranger with 4 fresh keys filled the whole node before).
    per_address_quota: int | None = None
    #: New owner keys one source address may bring an hour (`NEW_OWNERS_PER_ADDRESS`; tests
    #: with many identities on 127.0.0.1 raise it).
    new_owners_per_address: int = NEW_OWNERS_PER_ADDRESS

    @property
    def per_owner(self) -> int:
        return self.per_owner_quota if self.per_owner_quota is not None else self.quota // 4

    @property
    def per_address(self) -> int:
        return self.per_address_quota if self.per_address_quota is not None else self.quota // 4

    @property
    def duckdb_memory(self) -> int:
        return DUCKDB_MEMORY_PER_QUOTA_BYTE * self.quota + DUCKDB_BASE_MEMORY


@dataclass(frozen=True, slots=True)
class StorageRequest:
    """A storage request from an authenticated peer (routed here by peering), with the
    connection's remote address (``ws://host:port``; what requests are metered by)."""

    peer: PeerIdentity
    message: Message
    address: str


@dataclass(frozen=True, slots=True)
class StorageStatus:
    bytes_held: int
    identities: int
    objects: int
    mail_items: int
    quota: int
    per_owner_quota: int
    refused: dict[str, int]


@dataclass(frozen=True, slots=True)
class StorageState:
    reply: Reply[StorageStatus]


StorageMsg = StorageRequest | StorageState


class _Refused(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class _Meter:
    """The token buckets of one owner key, source address or connection."""

    __slots__ = ("bytes", "owners", "requests")

    def __init__(
        self, requests: tuple[float, float], bytes_: tuple[float, float], owners: float = 0
    ) -> None:
        self.requests = TokenBucket(*requests)
        self.bytes = TokenBucket(*bytes_)
        #: New owner keys (addresses only): ``owners`` at once, refilled over an hour.
        self.owners = TokenBucket(owners / 3600, owners)


class _Meters:
    """Meters by key, at most `MAX_METERS`, the least recently used evicted first."""

    def __init__(self, make: Callable[[], _Meter]) -> None:
        self._make = make
        self._meters: OrderedDict[object, _Meter] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._meters

    def __len__(self) -> int:
        return len(self._meters)

    def get(self, key: object) -> _Meter:
        meter = self._meters.get(key)
        if meter is None:
            meter = self._meters[key] = self._make()
            while len(self._meters) > MAX_METERS:
                self._meters.popitem(last=False)
        else:
            self._meters.move_to_end(key)
        return meter


def source_of(address: str) -> str:
    """What requests from ``address`` (``ws://host:port``) are metered by.

    IPv4: the address itself (/32). Addresses are scarce; a wider prefix would put a whole
    carrier-grade NAT's or a hosting provider's unrelated customers under one meter, and one
    household already shares its address. IPv6: the /64. Every subscriber gets at least a
    /64 and a host picks any address in it at no cost (SLAAC privacy addresses), so a /128
    would be 2**64 free addresses; a /56 or /48 (also commonly delegated) would lump different
    customers of providers that hand out /64s. An attacker holding a /48 still has 65,536
    /64s: the node quota, not these meters, is what bounds it then. IPv4-mapped IPv6 counts as
    IPv4. Anything else (``mem://...`` in sims, where every dialer has its own) stands for itself.
    """
    try:
        parts = urlsplit(address)
        host = parts.hostname
    except ValueError:
        return address
    if parts.scheme not in ("ws", "wss") or not host:
        return address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


_WatchKey = tuple[bytes, PeerIdentity]  # (owner, the watching connection's peer)


class StorageService:
    """Serves :mod:`dmgn.storage_protocol` requests (see the module docstring).

    ``send(peer, message)`` delivers a reply (or a notice) to the peer (the node passes the
    transport's Send).
    """

    def __init__(
        self,
        path: Path | None,
        *,
        owner: bytes,
        storage_key: bytes,
        send: Callable[[PeerIdentity, Message], Awaitable[Result[None]]],
        limits: StorageLimits | None = None,
        wall_clock: Callable[[], int] = time.time_ns,
        capacity: int = 64,
        tables: StorageTables | None = None,
    ) -> None:
        self.mailbox: Mailbox[StorageMsg] = Mailbox("storage", capacity)
        self._path = path
        #: Given (sims: :class:`~actors._storage_tables.MemoryStorageTables`), or opened at
        #: ``path`` when the actor starts.
        self._given_tables = tables
        #: Our own storage-owner key (our devices do not store with us) and this node's storage
        #: key (what owner proofs must be made for).
        self._owner = owner
        self._storage_key = storage_key
        #: Owner proofs already verified (bounded: cleared when full; a miss costs one verify).
        self._proven: set[tuple[bytes, bytes]] = set()
        self._send = send
        self._limits = limits or StorageLimits()
        self._wall_clock = wall_clock
        self._db: StorageTables | None = None
        #: Charged bytes held per owner (owners holding anything), where each was first stored
        #: from, the sums per source and in all (kept as they change: summing over every
        #: owner on each put cost 40% of the throughput at 20,000 owners).
        self._held: dict[bytes, int] = {}
        self._sources: dict[bytes, str] = {}
        self._held_by_source: dict[str, int] = {}
        self._held_total = 0
        self._owner_meters = _Meters(
            lambda: _Meter((REQUEST_RATE, REQUEST_BURST), (BYTE_RATE, BYTE_BURST))
        )
        self._address_meters = _Meters(
            lambda: _Meter(
                (ADDRESS_REQUEST_RATE, ADDRESS_REQUEST_BURST),
                (ADDRESS_BYTE_RATE, ADDRESS_BYTE_BURST),
                self._limits.new_owners_per_address,
            )
        )
        self._connection_meters = _Meters(
            lambda: _Meter(
                (CONNECTION_REQUEST_RATE, CONNECTION_REQUEST_BURST), (BYTE_RATE, BYTE_BURST)
            )
        )
        self._refused: dict[str, int] = {}
        #: Refusals and unsent answers: one line per kind a minute (strangers choose how many).
        self._noise = PeerNoise(log, clock=trio.current_time)
        self._objects = 0
        self._mail = 0
        self._nursery: trio.Nursery | None = None
        #: Answers being sent at once; beyond this the service waits (bounded memory).
        self._answer_slots = trio.Semaphore(ANSWERS_IN_FLIGHT)
        #: When each watch ends, oldest (least recently renewed) first; and by owner.
        self._watches: dict[_WatchKey, float] = {}
        self._watches_per_owner: dict[bytes, dict[PeerIdentity, float]] = {}
        self._notices_in_flight = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        db, used, sources, self._objects, self._mail = await trio.to_thread.run_sync(self._open)
        self._db = db
        for owner, (size, rows) in used.items():
            # An owner stored before sources were recorded counts against the node only: which
            # address brought it is not known, and guessing would be a lie.
            self._account(owner, sources.get(owner, UNKNOWN_SOURCE), size + rows * ROW_OVERHEAD)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                async for message in self.mailbox:
                    match message:
                        case StorageRequest():
                            await self._serve(message)
                        case StorageState():
                            message.reply.ok(self._status())
                        case _:
                            assert_never(message)
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._db = None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(db.close)

    def _open(
        self,
    ) -> tuple[StorageTables, dict[bytes, tuple[int, int]], dict[bytes, str], int, int]:
        """Open the tables and read what they hold (in a worker thread: DuckDB blocks)."""
        db = self._given_tables or DuckStorageTables(
            self._path, memory_limit=self._limits.duckdb_memory
        )
        used, objects, mail = db.usage()
        return db, used, db.sources(), objects, mail

    @property
    def _conn(self) -> StorageTables:
        assert self._db is not None
        return self._db

    def _status(self) -> StorageStatus:
        return StorageStatus(
            self._held_total,
            len(self._held),
            self._objects,
            self._mail,
            self._limits.quota,
            self._limits.per_owner,
            dict(self._refused),
        )

    # -- serving -----------------------------------------------------------------------------

    async def _serve(self, request: StorageRequest) -> None:
        message = request.message
        rid = message.get_int("rid")
        log.debug(
            "storage: %s %d from %s", message.type, rid, request.peer.identity_public_key.hex()[:8]
        )
        source = source_of(request.address)
        try:
            owner = self._admit(request, source)
            fields = await self._handle(owner, source, message, request.peer)
        except _Refused as refusal:
            self._refused[refusal.code] = self._refused.get(refusal.code, 0) + 1
            self._noise.report(
                f"storage-refused {message.type} {refusal.code}",
                "storage: refused %s from %s at %s: %s",
                message.type,
                request.peer.identity_public_key.hex()[:16],
                source,
                refusal.reason,
                level=logging.INFO,
            )
            fields = {"code": refusal.code, "reason": refusal.reason}
        except _duckdb.Error as error:
            log.error("storage: %s failed: %s", message.type, error)
            fields = {"code": "store_error", "reason": f"the storage file failed: {error}"[:500]}
        else:
            fields = {"code": "", "reason": "", **fields}
        reply = sp.REPLY(rid=rid, **fields)
        # Answers go out from their own task: a peer slow to read its answers must not stall
        # the service for everyone (two services waiting on each other's answers would
        # deadlock through the transports' backpressure).
        assert self._nursery is not None
        await self._answer_slots.acquire()
        self._nursery.start_soon(self._answer, request.peer, message.type, reply)

    async def _answer(self, peer: PeerIdentity, kind: str, reply: Message) -> None:
        try:
            for _ in range(50):
                result = await self._send(peer, reply)
                if isinstance(result, Ok):
                    return
                if result.code != "busy":
                    self._noise.report(
                        "storage-answer-not-sent",
                        "storage: answer to %s not sent: %s",
                        kind,
                        result.reason,
                        level=logging.INFO,
                    )
                    return
                await trio.sleep(0.02)
        finally:
            self._answer_slots.release()

    def _admit(self, request: StorageRequest, source: str) -> bytes:
        owner = request.message.get_bytes("owner")
        if self._limits.quota <= 0:
            raise _Refused("refused", "this node offers no storage (storage_quota is 0)")
        # Address and connection first: they cost a dict lookup, a proof costs a signature
        # check, and fresh owner keys cost the sender nothing.
        address = self._address_meters.get(source)
        if not address.requests.take(1, trio.current_time()):
            raise _Refused(
                "rate", f"more than {ADDRESS_REQUEST_RATE:g} requests/s from {source}; slow down"
            )
        if not self._connection_meters.get(request.peer).requests.take(1, trio.current_time()):
            raise _Refused(
                "rate",
                f"more than {CONNECTION_REQUEST_RATE:g} requests/s on this connection; slow down",
            )
        # The proof first: "that is our own owner key" told anyone who had learnt an owner key
        # which nodes are that owner's other devices, proof or not.
        if not self._proves(owner, request.message.get_bytes("proof")):
            raise _Refused(
                "refused",
                "the owner proof does not verify for this node: those objects belong to "
                "another owner; ask only for your own",
            )
        if owner == self._owner:
            raise _Refused("refused", "our own devices do not store shards with each other")
        if (
            owner not in self._sources
            and owner not in self._owner_meters
            and not address.owners.take(1, trio.current_time())
        ):
            raise _Refused(
                "rate",
                f"more than {self._limits.new_owners_per_address} new owner keys from {source} "
                "this hour; use an owner key this node already knows, or try again later",
            )
        if not self._owner_meters.get(owner).requests.take(1, trio.current_time()):
            raise _Refused("rate", f"more than {REQUEST_RATE:g} requests/s; slow down")
        return owner

    def _proves(self, owner: bytes, proof: bytes) -> bool:
        if (owner, proof) in self._proven:
            return True
        try:
            VerifyKey(owner).verify(
                sp.OWNER_PROOF_CONTEXT + sp.owner_proof_message(self._storage_key), proof
            )
        except (BadSignatureError, ValueError):
            return False
        if len(self._proven) >= MAX_PROVEN_OWNERS:
            self._proven.clear()
        self._proven.add((owner, proof))
        return True

    async def _handle(
        self, owner: bytes, source: str, message: Message, peer: PeerIdentity
    ) -> dict[str, Value]:
        match message.type:
            case sp.PUT.name:
                return await self._put(owner, source, message)
            case sp.GET.name:
                return await self._get(owner, message)
            case sp.AUDIT.name:
                return await self._audit(owner, message)
            case sp.DELETE.name:
                return await self._delete(owner, message)
            case sp.MAIL_PUSH.name:
                return await self._mail_push(owner, source, message, peer)
            case sp.MAIL_HEADS.name:
                return await self._mail_heads(owner, message, peer)
            case sp.MAIL_PULL.name:
                return await self._mail_pull(owner, message)
            case other:
                raise _Refused("bad_request", f"{other} is not a storage request")

    def _check_room(self, owner: bytes, source: str, cost: int, new_bytes: int) -> None:
        """Refuse unless ``cost`` more charged bytes fit every quota ``owner`` is under and
        ``new_bytes`` fit its rate (and that of ``source``, where the request comes from)."""
        if cost > 0:
            used = self._held.get(owner, 0)
            if used + cost > self._limits.per_owner:
                raise _Refused(
                    "quota",
                    f"over quota: your owner key holds {used} of {self._limits.per_owner} "
                    f"bytes here and this adds {cost}",
                )
            # An owner's bytes count against the address that first stored it, wherever it
            # asks from later: moving keys between addresses gains nothing.
            sponsor = self._sources.get(owner, source)
            by_sponsor = self._held_by_source.get(sponsor, 0)
            if sponsor != UNKNOWN_SOURCE and by_sponsor + cost > self._limits.per_address:
                raise _Refused(
                    "quota",
                    f"over quota: owner keys first stored from {sponsor} hold {by_sponsor} of "
                    f"{self._limits.per_address} bytes here and this adds {cost}",
                )
            if self._held_total + cost > self._limits.quota:
                raise _Refused(
                    "quota", f"this node is full ({self._held_total} of {self._limits.quota} bytes)"
                )
        if new_bytes > 0:
            if not self._owner_meters.get(owner).bytes.take(new_bytes, trio.current_time()):
                raise _Refused("rate", f"more than {BYTE_RATE:g} bytes/s; slow down")
            if not self._address_meters.get(source).bytes.take(new_bytes, trio.current_time()):
                raise _Refused(
                    "rate", f"more than {ADDRESS_BYTE_RATE:g} bytes/s from {source}; slow down"
                )

    async def _claim(self, owner: bytes, source: str) -> None:
        """Record (durably, before its first row) that ``owner`` was first stored from
        ``source``, so the per-address quota holds across restarts."""
        if owner not in self._sources:
            await trio.to_thread.run_sync(self._conn.set_source, owner, source)

    def _account(self, owner: bytes, source: str, change: int) -> None:
        """``owner`` holds ``change`` more charged bytes (fewer when negative); ``source`` is
        where it was first stored from, if it held nothing before."""
        sponsor = self._sources.setdefault(owner, source)
        used = self._held.get(owner, 0) + change
        self._held_total += change
        by_sponsor = self._held_by_source.get(sponsor, 0) + change
        if by_sponsor > 0:
            self._held_by_source[sponsor] = by_sponsor
        else:
            self._held_by_source.pop(sponsor, None)
        if used > 0:
            self._held[owner] = used
        else:
            # Holds nothing: forgotten (what is remembered is bounded by what is held), and
            # a new owner again next time.
            self._held.pop(owner, None)
            del self._sources[owner]

    async def _put(self, owner: bytes, source: str, message: Message) -> dict[str, Value]:
        oids = _bytes_list(message["oids"])
        blobs = _bytes_list(message["blobs"])
        if len(oids) != len(blobs) or len(set(oids)) != len(oids):
            raise _Refused("bad_request", "put: oids and blobs must pair up, ids unique")
        if sum(len(b) for b in blobs) > sp.MAX_BATCH_BYTES:
            raise _Refused("bad_request", f"put: more than {sp.MAX_BATCH_BYTES} bytes")

        held = await trio.to_thread.run_sync(self._conn.object_sizes, owner, oids)
        new_rows = sum(1 for o in oids if o not in held)
        delta = sum(len(b) - held.get(o, 0) for o, b in zip(oids, blobs, strict=True))
        self._check_room(owner, source, delta + new_rows * ROW_OVERHEAD, delta)
        now = self._wall_clock()
        await self._claim(owner, source)
        await trio.to_thread.run_sync(self._conn.put_objects, owner, oids, blobs, now)
        self._account(owner, source, delta + new_rows * ROW_OVERHEAD)
        self._objects += new_rows
        return {"used": self._held.get(owner, 0)}

    async def _get(self, owner: bytes, message: Message) -> dict[str, Value]:
        # At most one batch is loaded (the tables pick what fits by size before reading any
        # blob); the rest is asked for again: the answer names what it carries.
        found = await trio.to_thread.run_sync(
            self._conn.read_objects, owner, _bytes_list(message["oids"]), sp.MAX_BATCH_BYTES
        )
        oids: list[Value] = list(found)
        blobs: list[Value] = list(found.values())
        return {"oids": oids, "blobs": blobs}

    async def _audit(self, owner: bytes, message: Message) -> dict[str, Value]:
        nonce = message.get_bytes("nonce")
        wanted = _bytes_list(message["oids"])

        def prove() -> list[tuple[bytes, bytes]]:
            # Every held object is answered (a missing proof fails the audit), with one
            # batch of blobs in memory at a time.
            sizes = self._conn.object_sizes(owner, wanted)
            left = [oid for oid in dict.fromkeys(wanted) if oid in sizes]
            proven: list[tuple[bytes, bytes]] = []
            while left:
                found = self._conn.read_objects(owner, left, sp.MAX_BATCH_BYTES)
                if not found:
                    break
                proven += [(o, hashlib.sha256(nonce + b).digest()) for o, b in found.items()]
                left = [oid for oid in left if oid not in found]
            return proven

        proven = await trio.to_thread.run_sync(prove)
        oids: list[Value] = [oid for oid, _ in proven]
        proofs: list[Value] = [proof for _, proof in proven]
        return {"oids": oids, "proofs": proofs}

    async def _delete(self, owner: bytes, message: Message) -> dict[str, Value]:
        oids = _bytes_list(message["oids"])
        at = message.get_int("at")
        try:
            VerifyKey(owner).verify(
                DELETE_CONTEXT + delete_payload(owner, at, oids), message.get_bytes("sig")
            )
        except (BadSignatureError, ValueError):
            raise _Refused("refused", "delete refused: not signed by the owner key") from None
        if abs(self._wall_clock() - at) > DELETE_WINDOW_NS:
            raise _Refused("refused", "delete refused: signed too long ago (replayed?)")

        count, freed = await trio.to_thread.run_sync(self._conn.delete_objects, owner, oids)
        if count:
            self._account(owner, UNKNOWN_SOURCE, -(freed + count * ROW_OVERHEAD))
            if owner not in self._sources:
                await trio.to_thread.run_sync(self._conn.set_source, owner, None)
        self._objects -= count
        return {"count": count}

    async def _mail_push(
        self, owner: bytes, source: str, message: Message, peer: PeerIdentity
    ) -> dict[str, Value]:
        stream, first = message.get_bytes("stream"), message.get_int("first")
        items = _bytes_list(message["items"])
        size = sum(len(i) for i in items)
        # The schema caps each item and how many; their sum is capped here.
        if size > sp.MAX_BATCH_BYTES:
            raise _Refused("bad_request", f"mail.push: more than {sp.MAX_BATCH_BYTES} bytes")
        # Charged as if every item were new; what replaced items held is given back below.
        self._check_room(owner, source, size + len(items) * ROW_OVERHEAD, size)
        await self._claim(owner, source)
        count, replaced = await trio.to_thread.run_sync(
            self._conn.write_mail, owner, stream, first, items
        )
        self._mail += len(items) - count
        self._account(owner, source, size - replaced + (len(items) - count) * ROW_OVERHEAD)
        if count < len(items):
            self._notify(owner, stream, first + len(items) - 1, peer)
        return {"used": self._held.get(owner, 0)}

    async def _mail_heads(
        self, owner: bytes, message: Message, peer: PeerIdentity
    ) -> dict[str, Value]:
        found = await trio.to_thread.run_sync(self._conn.mail_heads, owner, sp.MAX_STREAMS)
        streams: list[Value] = [s for s, _ in found]
        seqs: list[Value] = [n for _, n in found]
        if message.fields.get("watch") != 1:
            # (Only an ask with ``watch`` gets the field back: a keeper that never asks for
            # watches may not know it.)
            return {"streams": streams, "seqs": seqs}
        self._watch(owner, peer, WATCH_SECONDS)
        return {"streams": streams, "seqs": seqs, "watch": WATCH_SECONDS}

    # -- watches -----------------------------------------------------------------------------

    def _watch(self, owner: bytes, peer: PeerIdentity, seconds: float) -> None:
        key = (owner, peer)
        self._drop_watch(key)  # renewed: it moves to the newest end
        per_owner = self._watches_per_owner.get(owner, {})
        if len(per_owner) >= MAX_WATCHES_PER_OWNER:
            self._drop_watch((owner, min(per_owner, key=per_owner.__getitem__)))
        while len(self._watches) >= MAX_WATCHES:
            self._drop_watch(next(iter(self._watches)))
        until = trio.current_time() + seconds
        self._watches[key] = until
        self._watches_per_owner.setdefault(owner, {})[peer] = until

    def _drop_watch(self, key: _WatchKey) -> None:
        if self._watches.pop(key, None) is None:
            return
        owner, peer = key
        per_owner = self._watches_per_owner[owner]
        del per_owner[peer]
        if not per_owner:
            del self._watches_per_owner[owner]

    def _notify(self, owner: bytes, stream: bytes, seq: int, pusher: PeerIdentity) -> None:
        """Tell every other connection watching ``owner`` that ``stream`` reaches ``seq``."""
        watching = self._watches_per_owner.get(owner)
        if not watching:
            return
        now = trio.current_time()
        notice = sp.MAIL_NOTIFY(owner=owner, stream=stream, seq=seq)
        assert self._nursery is not None
        for peer, until in list(watching.items()):
            if until <= now:
                self._drop_watch((owner, peer))
                continue
            if peer == pusher:
                continue  # it knows what it pushed
            if self._notices_in_flight >= NOTICES_IN_FLIGHT:
                continue  # a hint skipped: the keeper's poll finds the entries
            self._notices_in_flight += 1
            self._nursery.start_soon(self._send_notice, owner, peer, notice)

    async def _send_notice(self, owner: bytes, peer: PeerIdentity, notice: Message) -> None:
        try:
            result = await self._send(peer, notice)
        finally:
            self._notices_in_flight -= 1
        if not isinstance(result, Ok):
            # Gone, or too busy to take a hint: it asks again (and watches anew) when it
            # reconnects or polls.
            self._drop_watch((owner, peer))

    async def _mail_pull(self, owner: bytes, message: Message) -> dict[str, Value]:
        stream, first, last = (
            message.get_bytes("stream"),
            message.get_int("first"),
            message.get_int("last"),
        )
        last = min(last, first + sp.MAX_MAIL_BATCH - 1)
        # At most one batch is loaded: the tables read sizes first, then only what fits (a
        # ~100-byte pull of 256 seqs over 2 MiB items loaded 512 MiB before).
        rows = await trio.to_thread.run_sync(
            self._conn.mail_range, owner, stream, first, last, sp.MAX_BATCH_BYTES
        )
        items: list[Value] = []
        for n, (seq, data) in enumerate(rows):
            if seq != first + n:
                break  # a gap: the answer is the contiguous run from ``first``
            if len(data) > MAX_MAIL_ITEM_BYTES:
                break  # stored before the cap; no answer may carry it
            items.append(data)
        return {"items": items}


def _bytes_list(value: Value) -> list[bytes]:
    assert isinstance(value, list)
    return [item for item in value if isinstance(item, bytes)]
