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
* Per-identity quota: an identity may hold at most ``per_owner_quota`` bytes, and the node at
  most ``quota`` in total (``quota``).
* Per-identity rate limits on requests and bytes (token buckets; ``rate``). A flooder gets
  refusals, and the refusals are counted in the status.
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
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import assert_never

import trio
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from actors import _duckdb
from actors._storage_tables import DuckStorageTables, StorageTables
from actors.runtime import Mailbox, Ok, Reply, Result
from dmgn import storage_protocol as sp
from dmgn.shards import DELETE_CONTEXT, delete_payload
from wire import Message, PeerIdentity, Value

log = logging.getLogger("dmgn.storage")

__all__ = [
    "DEFAULT_QUOTA",
    "StorageLimits",
    "StorageMsg",
    "StorageRequest",
    "StorageService",
    "StorageState",
    "StorageStatus",
]

DEFAULT_QUOTA = 1 << 30
#: Requests per second (sustained, burst) and stored bytes per second one identity may push.
#: A keeper dispersing a bulk import sends a few batched requests per second; restore pulls more.
REQUEST_RATE, REQUEST_BURST = 200.0, 2000.0
BYTE_RATE, BYTE_BURST = 16 * 1024 * 1024.0, 256 * 1024 * 1024.0
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

    @property
    def per_owner(self) -> int:
        return self.per_owner_quota if self.per_owner_quota is not None else self.quota // 4


@dataclass(frozen=True, slots=True)
class StorageRequest:
    """A storage request from an authenticated peer (routed here by peering)."""

    peer: PeerIdentity
    message: Message


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


class _Bucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.tokens = rate, burst, burst
        self.stamp = trio.current_time()

    def take(self, amount: float) -> bool:
        now = trio.current_time()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True


@dataclass
class _Owner:
    used: int = 0
    requests: _Bucket = field(default_factory=lambda: _Bucket(REQUEST_RATE, REQUEST_BURST))
    bytes: _Bucket = field(default_factory=lambda: _Bucket(BYTE_RATE, BYTE_BURST))


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
        self._owners: dict[bytes, _Owner] = {}
        self._refused: dict[str, int] = {}
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
        db, used, self._objects, self._mail = await trio.to_thread.run_sync(self._open)
        self._db = db
        # Built here, not in the worker thread: an owner's rate buckets read Trio's clock, which
        # only answers in the Trio thread (a node holding anything for others could not start).
        self._owners = {owner: _Owner(n) for owner, n in used.items()}
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

    def _open(self) -> tuple[StorageTables, dict[bytes, int], int, int]:
        """Open the tables and read what they hold (in a worker thread: DuckDB blocks)."""
        db = self._given_tables or DuckStorageTables(self._path)
        return (db, *db.usage())

    @property
    def _conn(self) -> StorageTables:
        assert self._db is not None
        return self._db

    def _status(self) -> StorageStatus:
        held = sum(o.used for o in self._owners.values())
        return StorageStatus(
            held,
            sum(1 for o in self._owners.values() if o.used),
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
        try:
            owner = self._admit(request)
            fields = await self._handle(owner, message, request.peer)
        except _Refused as refusal:
            self._refused[refusal.code] = self._refused.get(refusal.code, 0) + 1
            log.info(
                "storage: refused %s from %s: %s",
                message.type,
                request.peer.identity_public_key.hex()[:16],
                refusal.reason,
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
                    log.info("storage: answer to %s not sent: %s", kind, result.reason)
                    return
                await trio.sleep(0.02)
        finally:
            self._answer_slots.release()

    def _admit(self, request: StorageRequest) -> bytes:
        owner = request.message.get_bytes("owner")
        if self._limits.quota <= 0:
            raise _Refused("refused", "this node offers no storage (storage_quota is 0)")
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
        state = self._owners.setdefault(owner, _Owner())
        if not state.requests.take(1):
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

    async def _handle(self, owner: bytes, message: Message, peer: PeerIdentity) -> dict[str, Value]:
        match message.type:
            case sp.PUT.name:
                return await self._put(owner, message)
            case sp.GET.name:
                return await self._get(owner, message)
            case sp.AUDIT.name:
                return await self._audit(owner, message)
            case sp.DELETE.name:
                return await self._delete(owner, message)
            case sp.MAIL_PUSH.name:
                return await self._mail_push(owner, message, peer)
            case sp.MAIL_HEADS.name:
                return await self._mail_heads(owner, message, peer)
            case sp.MAIL_PULL.name:
                return await self._mail_pull(owner, message)
            case other:
                raise _Refused("bad_request", f"{other} is not a storage request")

    def _charge(self, owner: bytes, new_bytes: int) -> None:
        state = self._owners[owner]
        if new_bytes <= 0:
            return
        if state.used + new_bytes > self._limits.per_owner:
            raise _Refused(
                "quota",
                f"over quota: your owner key holds {state.used} of {self._limits.per_owner} "
                f"bytes here and this adds {new_bytes}",
            )
        total = sum(o.used for o in self._owners.values())
        if total + new_bytes > self._limits.quota:
            raise _Refused("quota", f"this node is full ({total} of {self._limits.quota} bytes)")
        if not state.bytes.take(new_bytes):
            raise _Refused("rate", f"more than {BYTE_RATE:g} bytes/s; slow down")

    async def _put(self, owner: bytes, message: Message) -> dict[str, Value]:
        oids = _bytes_list(message["oids"])
        blobs = _bytes_list(message["blobs"])
        if len(oids) != len(blobs) or len(set(oids)) != len(oids):
            raise _Refused("bad_request", "put: oids and blobs must pair up, ids unique")
        if sum(len(b) for b in blobs) > sp.MAX_BATCH_BYTES:
            raise _Refused("bad_request", f"put: more than {sp.MAX_BATCH_BYTES} bytes")

        held = await trio.to_thread.run_sync(self._conn.object_sizes, owner, oids)
        delta = sum(len(b) - held.get(o, 0) for o, b in zip(oids, blobs, strict=True))
        self._charge(owner, delta)
        now = self._wall_clock()
        await trio.to_thread.run_sync(self._conn.put_objects, owner, oids, blobs, now)
        self._owners[owner].used += delta
        self._objects += sum(1 for o in oids if o not in held)
        return {"used": self._owners[owner].used}

    async def _read(self, owner: bytes, oids: list[bytes]) -> dict[bytes, bytes]:
        return await trio.to_thread.run_sync(self._conn.read_objects, owner, oids)

    async def _get(self, owner: bytes, message: Message) -> dict[str, Value]:
        found = await self._read(owner, _bytes_list(message["oids"]))
        oids: list[Value] = []
        blobs: list[Value] = []
        size = 0
        for oid, blob in found.items():
            if oids and size + len(blob) > sp.MAX_BATCH_BYTES:
                break  # the rest is asked for again: the answer names what it carries
            oids.append(oid)
            blobs.append(blob)
            size += len(blob)
        return {"oids": oids, "blobs": blobs}

    async def _audit(self, owner: bytes, message: Message) -> dict[str, Value]:
        nonce = message.get_bytes("nonce")
        found = await self._read(owner, _bytes_list(message["oids"]))
        oids: list[Value] = list(found)
        proofs: list[Value] = [hashlib.sha256(nonce + blob).digest() for blob in found.values()]
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
        self._owners[owner].used -= freed
        self._objects -= count
        return {"count": count}

    async def _mail_push(
        self, owner: bytes, message: Message, peer: PeerIdentity
    ) -> dict[str, Value]:
        stream, first = message.get_bytes("stream"), message.get_int("first")
        items = _bytes_list(message["items"])
        self._charge(owner, sum(len(i) for i in items))

        count, replaced = await trio.to_thread.run_sync(
            self._conn.write_mail, owner, stream, first, items
        )
        self._mail += len(items) - count
        self._owners[owner].used += sum(len(i) for i in items) - replaced
        if count < len(items):
            self._notify(owner, stream, first + len(items) - 1, peer)
        return {"used": self._owners[owner].used}

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

        def pull() -> list[bytes]:
            rows = self._conn.mail_range(owner, stream, first, last)
            items: list[bytes] = []
            size = 0
            for n, (seq, data) in enumerate(rows):
                if seq != first + n:
                    break  # a gap: the answer is the contiguous run from ``first``
                if items and size + len(data) > sp.MAX_BATCH_BYTES:
                    break  # the rest is pulled by the next request
                items.append(bytes(data))
                size += len(data)
            return items

        items: list[Value] = list(await trio.to_thread.run_sync(pull))
        return {"items": items}


def _bytes_list(value: Value) -> list[bytes]:
    assert isinstance(value, list)
    return [item for item in value if isinstance(item, bytes)]
