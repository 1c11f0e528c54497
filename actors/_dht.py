"""The discovery actor's Kademlia, made safe to run among strangers (private helper, not an actor).

``kademlia`` 2.2 (with ``rpcudp``) is an open store and a UDP amplifier as shipped (issue 12
item 4): it accepts any STORE of any value for a week, re-sends every key it holds to each node
it sees for the first time (``welcome_if_new``: 133 MB in produced 2.28 GB out), republishes
every stored value hourly, answers a 60-byte FIND_VALUE with up to 8 KiB to whatever source
address a datagram claims, and logs every malformed datagram as an ERROR with a traceback. Here
is what this module changes, all on kademlia's own asyncio thread:

* `RecordTable` (the storage) keeps only valid sealed provider records (`dmgn.peer_record`)
  under the key derived from their signer, so nobody can store under a key that is not theirs
  and a valid record is only ever replaced by a newer one from the same signer. At most
  `MAX_RECORDS` in total and `MAX_RECORDS_PER_SOURCE` per source address; a record leaves when
  it expires. Full means new keys are refused, never that honest records are evicted.
* `GuardedProtocol` checks every request's shape and types before use (a bad one is dropped and
  counted), answers only as many bytes to an address as it sent us plus a small allowance
  (`RESPONSE_ALLOWANCE`), and welcomes a new node only after it answered a ping from us (so a
  spoofed source gets one small ping, not our records), with at most `WELCOME_KEYS` records,
  `MAX_WELCOMES_PER_MINUTE` newcomers a minute and once per address per `WELCOME_REPEAT`.
* `GuardedServer` does not republish other nodes' records (their owners do; we republish ours)
  and, on lookups, prefers the newest *valid* value among those found.
* Protocol noise is counted and logged through `PeerNoise`: WARNING at most, no traceback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kademlia.crawling import NodeSpiderCrawl, RPCFindResponse, ValueSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.storage import IStorage
from kademlia.utils import digest

from actors._peer_noise import PeerNoise
from dmgn.peer_record import MAX_RECORD_BYTES, RecordError, decode_sealed_record
from wire import TokenBucket

__all__ = [
    "MAX_RECORDS",
    "MAX_RECORDS_PER_SOURCE",
    "DhtStats",
    "GuardedServer",
    "RecordTable",
    "record_issued_at",
]

log = logging.getLogger("dmgn.discovery")

#: Records a node holds for others. One per identity in its part of the key space; 2,048 of at
#: most 7 KiB each bound the table to ~14 MiB even when strangers fill it.
MAX_RECORDS = 2048
#: Records one source address may have stored here. An honest node stores one record per
#: identity it belongs to (and caches a few it looked up); 16 leaves room for NAT-shared
#: addresses while 20,000 STOREs from one stranger leave 16 records.
MAX_RECORDS_PER_SOURCE = 16
#: kademlia/rpcudp refuse to *send* more than 8 KiB of request; nothing honest is larger.
MAX_DATAGRAM = 8192 + 64
#: Bytes we may send to an address beyond what it sent us: a few record-sized answers, refilled
#: at `ALLOWANCE_RATE` a second. Beyond that, answers are dropped: a spoofed source address gets
#: at most what the spoofer paid for, plus this (no amplification).
RESPONSE_ALLOWANCE = 16 * 1024
ALLOWANCE_RATE = 256.0
#: Addresses whose byte balance is remembered (least recently heard forgotten first).
TRACKED_ADDRESSES = 4096
#: Records sent to a newcomer (kademlia sends all of them); ours and our closest few suffice.
WELCOME_KEYS = 8
#: Newcomers welcomed per minute over all addresses, and how soon one address is welcomed again.
MAX_WELCOMES_PER_MINUTE = 30
WELCOME_REPEAT = 600.0
#: The RPCs kademlia 2.2 defines, with their argument counts after the sender's address.
_RPC_ARGS = {"ping": 1, "stun": 0, "store": 3, "find_node": 2, "find_value": 2}
_ID_BYTES = 20


def record_issued_at(value: object, now: int | None = None) -> int | None:
    """``issued_at`` of a valid sealed record, or None (for tests and the storage)."""
    if not isinstance(value, bytes):
        return None
    try:
        return decode_sealed_record(value, now=int(time.time()) if now is None else now).issued_at
    except RecordError:
        return None


def _source(ip: str) -> str:
    """The unit a per-source cap counts: the address, or its /64 for IPv6 (one host's share)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if address.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return ip


@dataclass
class DhtStats:
    """Counters for status pages, tests and the attack benchmarks (written on the DHT thread)."""

    bytes_in: int = 0
    bytes_out: int = 0
    datagrams_in: int = 0
    malformed: int = 0
    answers_dropped: int = 0
    stores_accepted: int = 0
    stores_refused: int = 0
    welcomes: int = 0


@dataclass(slots=True)
class _Entry:
    value: bytes
    issued_at: int
    expires_at: int
    source: str
    stored_at: float


class RecordTable(IStorage):  # type: ignore[misc]
    """kademlia's storage interface over validated, capped, expiring sealed records."""

    def __init__(
        self,
        *,
        max_records: int = MAX_RECORDS,
        max_per_source: int = MAX_RECORDS_PER_SOURCE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._per_source: Counter[str] = Counter()
        self._max_records = max_records
        self._max_per_source = max_per_source
        self._clock = clock
        self.refused = 0

    def __len__(self) -> int:
        self._cull()
        return len(self._entries)

    def __bool__(self) -> bool:
        return True  # kademlia tests ``storage or ForgetfulStorage()``: an empty table is one

    def put(self, dkey: bytes, value: object, source: str) -> str | None:
        """Store ``value`` under ``dkey`` for ``source`` ("self" for our own writes); None if
        stored, else why not (one short phrase)."""
        self._cull()
        reason = self._check(dkey, value, source)
        if reason is not None:
            self.refused += 1
            return reason
        assert isinstance(value, bytes)
        record = decode_sealed_record(value, now=int(self._clock()))
        current = self._entries.pop(dkey, None)
        if current is not None:
            self._forget_source(current.source)
        owner = current.source if current is not None and source != "self" else source
        self._entries[dkey] = _Entry(
            value, record.issued_at, record.expires_at, owner, time.monotonic()
        )
        self._per_source[owner] += 1
        return None

    def _check(self, dkey: bytes, value: object, source: str) -> str | None:
        if not isinstance(dkey, bytes) or len(dkey) != _ID_BYTES:
            return "bad key"
        if not isinstance(value, bytes) or len(value) > MAX_RECORD_BYTES:
            return "not a record"
        try:
            record = decode_sealed_record(value, now=int(self._clock()))
        except RecordError as error:
            return str(error)
        if digest(record.key) != dkey:
            return "stored under a key that is not its signer's"
        current = self._entries.get(dkey)
        if current is not None:
            if record.issued_at <= current.issued_at:
                return "not newer than the record held" if value != current.value else "held"
            return None  # an update of a key held: no new slot
        if source != "self":
            if len(self._entries) >= self._max_records:
                return "record table full"
            if self._per_source[source] >= self._max_per_source:
                return "too many records from this address"
        return None

    def _forget_source(self, source: str) -> None:
        self._per_source[source] -= 1
        if self._per_source[source] <= 0:
            del self._per_source[source]

    def _cull(self) -> None:
        now = self._clock()
        expired = [key for key, entry in self._entries.items() if entry.expires_at <= now]
        for key in expired:
            self._forget_source(self._entries.pop(key).source)

    # -- kademlia's IStorage ---------------------------------------------------------------

    def __setitem__(self, key: bytes, value: object) -> None:
        self.put(key, value, "self")

    def __getitem__(self, key: bytes) -> bytes:
        self._cull()
        return self._entries[key].value

    def get(self, key: bytes, default: Any = None) -> Any:
        self._cull()
        entry = self._entries.get(key)
        return default if entry is None else entry.value

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        self._cull()
        cutoff = time.monotonic() - seconds_old
        return [(k, e.value) for k, e in self._entries.items() if e.stored_at <= cutoff]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        self._cull()
        return iter([(key, entry.value) for key, entry in self._entries.items()])

    def own_first(self) -> list[tuple[bytes, bytes]]:
        """Our own records first, then the newest others' (what a newcomer is sent)."""
        self._cull()
        entries = sorted(
            self._entries.items(), key=lambda item: (item[1].source != "self", -item[1].issued_at)
        )
        return [(key, entry.value) for key, entry in entries]


class _CountingTransport:
    """The datagram transport, counting bytes out."""

    def __init__(self, transport: Any, stats: DhtStats) -> None:
        self._transport = transport
        self._stats = stats

    def sendto(self, data: bytes, address: Any = None) -> None:
        self._stats.bytes_out += len(data)
        self._transport.sendto(data, address)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedProtocol(KademliaProtocol):  # type: ignore[misc]
    """kademlia's protocol with checked input, byte budgets and bounded welcomes."""

    def __init__(
        self, source_node: Node, storage: RecordTable, ksize: int, stats: DhtStats
    ) -> None:
        super().__init__(source_node, storage, ksize)
        self.stats = stats
        self._noise = PeerNoise(log)
        self._balance: OrderedDict[str, TokenBucket] = OrderedDict()  # ip -> bytes we may send
        self._welcomed: OrderedDict[str, float] = OrderedDict()  # ip -> when
        self._welcome_times: list[float] = []
        self._tasks: set[asyncio.Future[Any]] = set()

    def _spawn(self, work: Any) -> None:
        """Run ``work`` on the loop, keeping a reference until it is done."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            self._noise.report(
                "dht-task", "dht: a request task failed: %s: %s", type(error).__name__, error
            )

    def connection_made(self, transport: Any) -> None:
        self.transport = _CountingTransport(transport, self.stats)

    # -- input -----------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.stats.bytes_in += len(data)
        self.stats.datagrams_in += 1
        self._credit(addr[0], len(data))
        if len(data) > MAX_DATAGRAM:
            self._malformed(addr, "oversized datagram")
            return
        self._spawn(self._solve(data, addr))

    async def _solve(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            await self._solve_datagram(data, addr)
        except Exception as error:  # umsgpack and rpcudp raise many kinds on junk; all noise
            self._malformed(addr, f"undecodable datagram ({type(error).__name__})")

    def _malformed(self, addr: tuple[str, int], what: str) -> None:
        self.stats.malformed += 1
        self._noise.report("dht-malformed", "dht: ignoring %s from %s", what, addr[0])

    async def _accept_request(self, msg_id: bytes, data: object, address: Any) -> None:
        if not (isinstance(data, list) and len(data) == 2 and isinstance(data[0], str)):
            self._malformed(address, "request of the wrong shape")
            return
        name, args = data
        if name not in _RPC_ARGS or not isinstance(args, list | tuple):
            self._malformed(address, "unknown request")
            return
        if len(args) != _RPC_ARGS[name]:
            self._malformed(address, f"{name} with {len(args)} arguments")
            return
        try:
            response = getattr(self, f"rpc_{name}")(address, *args)
        except (
            Exception
        ) as error:  # whatever a handler raises on a peer's input is that peer's noise
            self._malformed(address, f"bad {name} ({type(error).__name__}: {error})")
            return
        payload = b"\x01" + msg_id + _pack(response)
        if not self._debit(address[0], len(payload)):
            self.stats.answers_dropped += 1
            self._noise.report(
                "dht-budget",
                "dht: not answering %s beyond what it sent (amplification guard)",
                address[0],
            )
            return
        self.transport.sendto(payload, address)

    def _timeout(self, msg_id: bytes) -> None:
        # rpcudp logs each unanswered request as an ERROR; a silent peer is normal here.
        future, _ = self._outstanding.pop(msg_id)
        if not future.done():
            future.set_result((False, None))

    # -- byte balance per address -------------------------------------------------------

    def _balance_of(self, ip: str) -> TokenBucket:
        """What ``ip`` may still be sent: bytes it sent us (`TokenBucket.give`: that credit
        stays), plus the allowance refilling up to `RESPONSE_ALLOWANCE`. Kademlia runs on its
        own asyncio thread, so the bucket is fed `time.monotonic`, not Trio's clock."""
        bucket = self._balance.pop(ip, None)
        if bucket is None:
            bucket = TokenBucket(ALLOWANCE_RATE, float(RESPONSE_ALLOWANCE))
        self._balance[ip] = bucket
        while len(self._balance) > TRACKED_ADDRESSES:
            self._balance.popitem(last=False)
        return bucket

    def _credit(self, ip: str, size: int) -> None:
        self._balance_of(ip).give(size, time.monotonic())

    def _debit(self, ip: str, size: int) -> bool:
        return self._balance_of(ip).take(size, time.monotonic())

    # -- RPCs --------------------------------------------------------------------------

    def rpc_ping(self, sender: tuple[str, int], nodeid: object) -> bytes:
        self.welcome_if_new(Node(_node_id(nodeid), sender[0], sender[1]))
        node_id: bytes = self.source_node.id
        return node_id

    def rpc_store(
        self, sender: tuple[str, int], nodeid: object, key: object, value: object
    ) -> bool:
        source = Node(_node_id(nodeid), sender[0], sender[1])
        self.welcome_if_new(source)
        refusal = self.storage.put(_node_id(key), value, _source(sender[0]))
        if refusal is None:
            self.stats.stores_accepted += 1
            return True
        self.stats.stores_refused += 1
        self._noise.report(
            "dht-store-refused",
            "dht: refused a STORE from %s: %s",
            sender[0],
            refusal,
            level=logging.INFO,
        )
        return False

    def rpc_find_node(self, sender: tuple[str, int], nodeid: object, key: object) -> list[Any]:
        source = Node(_node_id(nodeid), sender[0], sender[1])
        self.welcome_if_new(source)
        neighbors = self.router.find_neighbors(Node(_node_id(key)), exclude=source)
        return list(map(tuple, neighbors))

    def rpc_find_value(self, sender: tuple[str, int], nodeid: object, key: object) -> Any:
        source = Node(_node_id(nodeid), sender[0], sender[1])
        self.welcome_if_new(source)
        value = self.storage.get(_node_id(key), None)
        if value is None:
            return self.rpc_find_node(sender, nodeid, key)
        return {"value": value}

    # -- newcomers -----------------------------------------------------------------------

    def welcome_if_new(self, node: Node) -> None:
        """Add a newcomer to the routing table once it answers a ping from us, then send it a
        few records it should hold (bounded; see the module doc)."""
        if not self.router.is_new_node(node):
            return
        now = time.monotonic()
        last = self._welcomed.get(node.ip)
        self._welcome_times = [t for t in self._welcome_times if now - t < 60.0]
        if (last is not None and now - last < WELCOME_REPEAT) or (
            len(self._welcome_times) >= MAX_WELCOMES_PER_MINUTE
        ):
            return
        self._welcomed[node.ip] = now
        self._welcomed.move_to_end(node.ip)
        while len(self._welcomed) > TRACKED_ADDRESSES:
            self._welcomed.popitem(last=False)
        self._welcome_times.append(now)
        self._spawn(self._welcome(node))

    async def _welcome(self, node: Node) -> None:
        answered, node_id = await self.ping((node.ip, node.port), self.source_node.id)
        if not answered or node_id != node.id:
            return  # a spoofed or lying source: it gets nothing more from us
        self.stats.welcomes += 1
        sent = 0
        for key, value in self.storage.own_first():
            if sent >= WELCOME_KEYS:
                break
            keynode = Node(key)
            neighbors = self.router.find_neighbors(keynode)
            if neighbors:
                last = neighbors[-1].distance_to(keynode)
                first = neighbors[0].distance_to(keynode)
                if not (
                    node.distance_to(keynode) < last
                    and self.source_node.distance_to(keynode) < first
                ):
                    continue
            sent += 1
            self._spawn(self.call_store(node, key, value))
        self.router.add_contact(node)

    def handle_call_response(self, result: Any, node: Node) -> Any:
        if not result[0]:
            self.router.remove_contact(node)
            return result
        if self.router.is_new_node(node):
            # It answered our own request, so its address is real: welcome it at once.
            self.router.add_contact(node)
        return result


class _ValidatingCrawl(ValueSpiderCrawl):  # type: ignore[misc]
    """A lookup that keeps the newest valid record among the values found."""

    async def _nodes_found(self, responses: dict[bytes, Any]) -> Any:
        toremove = []
        found_values: list[bytes] = []
        for peerid, response in responses.items():
            answer = RPCFindResponse(response)
            if not answer.happened():
                toremove.append(peerid)
            elif answer.has_value() and isinstance(response[1], dict):
                value = response[1].get("value")
                if isinstance(value, bytes) and record_issued_at(value) is not None:
                    found_values.append(value)
            else:
                peer = self.nearest.get_node(peerid)
                self.nearest_without_value.push(peer)
                try:
                    self.nearest.push(answer.get_node_list())
                except (TypeError, ValueError):
                    continue  # a peer answering junk contributes nothing
        self.nearest.remove(toremove)
        if found_values:
            return await self._handle_found_values(found_values)
        if self.nearest.have_contacted_all():
            return None
        return await self.find()

    async def _handle_found_values(self, values: list[bytes]) -> bytes:
        value = max(values, key=lambda v: record_issued_at(v) or 0)
        peer = self.nearest_without_value.popleft()
        if peer:
            await self.protocol.call_store(peer, self.node.id, value)
        return value


class GuardedServer(Server):  # type: ignore[misc]
    """kademlia's ``Server`` with `GuardedProtocol`, `RecordTable` and validating lookups."""

    def __init__(self, *, ksize: int, alpha: int, storage: RecordTable) -> None:
        super().__init__(ksize=ksize, alpha=alpha, storage=storage)
        self.stats = DhtStats()

    def _create_protocol(self) -> GuardedProtocol:
        return GuardedProtocol(self.node, self.storage, self.ksize, self.stats)

    async def _refresh_table(self) -> None:
        """Refresh lonely buckets; do not republish others' records (their owners do)."""
        crawls = []
        for node_id in self.protocol.get_refresh_ids():
            node = Node(node_id)
            nearest = self.protocol.router.find_neighbors(node, self.alpha)
            crawls.append(
                NodeSpiderCrawl(self.protocol, node, nearest, self.ksize, self.alpha).find()
            )
        await asyncio.gather(*crawls)

    async def get(self, key: bytes) -> bytes | None:
        dkey = digest(key)
        local = self.storage.get(dkey)
        if local is not None:
            return bytes(local)
        node = Node(dkey)
        nearest = self.protocol.router.find_neighbors(node)
        if not nearest:
            return None
        crawl = _ValidatingCrawl(self.protocol, node, nearest, self.ksize, self.alpha)
        found = await crawl.find()
        return found if isinstance(found, bytes) else None


def _node_id(value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != _ID_BYTES:
        raise TypeError("a node id or key must be 20 bytes")
    return value


def _pack(value: object) -> bytes:
    import umsgpack

    packed: bytes = umsgpack.packb(value)
    return packed
