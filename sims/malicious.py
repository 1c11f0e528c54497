"""A malicious node for sims: a storage node that turns bad, and the attacks it makes.

From the fault's ``at_min`` the node (the production actors, placed shards and mailbox items
like any storage node until then):

* **serves corrupt shards and forged mailbox items**: its storage tables flip a byte of every
  object and mailbox item they hand out (storage gets, audits, mail pulls), claim
  :data:`FORGED_AHEAD` more mailbox items per stream than they hold and make those up;
* **sends forged ops**: it dials a device of a victim identity and, over a Noise session of its
  own identity, sends gossip ops in the victim's feed (tombstones of the victim's live memories,
  so an accepted one would delete them everywhere), once signed by its own key (wrong identity)
  and once with random signature bytes (bad signature);
* **sends garbage frames**: random bytes instead of a Noise handshake;
* **floods**: opens :data:`FLOOD_SESSIONS` sessions at once to one device, each as a fresh
  identity (more strangers than one address may hold).

Each attack is booked in a :class:`Ledger` by kind: sent, and rejected (the honest node closed
the connection within :data:`REJECT_WITHIN` virtual seconds). The honest side's own counts
(reputation violations, keepers' scores of the bad storage peer) are collected by the engine.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nacl.signing
import trio

from actors import storage as sg
from actors._gossip_wire import OPS
from actors._storage_tables import StorageTables
from actors.node import DEVICE_REGISTRY, RunningNode
from dmgn.feed import FEED_ENTRY_CONTEXT, Delete, UnsignedEntry
from sims.devices import virtual_wall_clock
from sims.network import NodeNetwork
from wire import ConnectionClosed, Message, WireError
from wire._connection import secure_connection
from wire.testing import TestIdentity

#: Mailbox items a bad storage node claims beyond what it holds, per stream.
FORGED_AHEAD = 3
#: Sessions a flood opens at once (the transport admits 8 strangers per address).
FLOOD_SESSIONS = 12
#: An attack counts as rejected if the honest node closed the connection within this long.
REJECT_WITHIN = 30.0
#: A flood session still open after this long was admitted (strangers idle out after 60 s).
FLOOD_ADMITTED_AFTER = 5.0


def _flip(data: bytes) -> bytes:
    if not data:
        return data
    return bytes([data[0] ^ 0xFF]) + data[1:]


class CorruptTables:
    """Storage tables that hand out every object and mailbox item with a byte flipped."""

    def __init__(self, inner: StorageTables, rng: random.Random) -> None:
        self._inner = inner
        self._rng = rng
        self.corrupt_objects_served = 0
        self.forged_mail_served = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def read_objects(self, owner: bytes, oids: list[bytes], max_bytes: int) -> dict[bytes, bytes]:
        held = self._inner.read_objects(owner, oids, max_bytes)
        self.corrupt_objects_served += len(held)
        return {oid: _flip(data) for oid, data in held.items()}

    def mail_heads(self, owner: bytes, limit: int) -> list[tuple[bytes, int]]:
        # Claims more than it holds, so that devices come asking for the forged rest.
        return [
            (stream, head + FORGED_AHEAD) for stream, head in self._inner.mail_heads(owner, limit)
        ]

    def mail_range(
        self, owner: bytes, stream: bytes, first: int, last: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        held = dict(self._inner.mail_range(owner, stream, first, last, max_bytes))
        top = max(held, default=first - 1)
        out = [(seq, _flip(data)) for seq, data in sorted(held.items())]
        # The seqs it claimed but never held: made-up items (the size of a real one).
        size = len(next(iter(held.values()), b"x" * 200))
        out += [(seq, self._rng.randbytes(size)) for seq in range(top + 1, last + 1)]
        self.forged_mail_served += len(out)
        return out


def corrupt_storage(node: RunningNode, rng: random.Random) -> CorruptTables:
    """Make the node's running storage service serve corrupt data from now on."""
    service = node.supervisor.running("storage")
    if isinstance(service, sg.StorageService):
        assert service._db is not None
        tables = CorruptTables(service._db, rng)
        service._db = tables
        service._given_tables = tables  # also after a restart (the node reuses the object)
        return tables
    raise LookupError("this node runs no storage service")


@dataclass
class Ledger:
    sent: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    unreachable: int = 0
    #: Why the honest side closed (first words of each distinct reason).
    reasons: dict[str, int] = field(default_factory=dict)

    #: [virtual minute, kind, rejected] per attack.
    timeline: list[list[Any]] = field(default_factory=list)

    def book(self, kind: str, rejected: bool, reason: str | None = None) -> None:
        self.timeline.append([round(trio.current_time() / 60.0, 3), kind, rejected])
        self.sent[kind] = self.sent.get(kind, 0) + 1
        self.rejected[kind] = self.rejected.get(kind, 0) + (1 if rejected else 0)
        if reason:
            short = " ".join(reason.split()[:8])
            self.reasons[short] = self.reasons.get(short, 0) + 1

    def as_json(self) -> dict[str, Any]:
        return {
            "by_kind": {
                kind: {"sent": self.sent[kind], "rejected": self.rejected[kind]}
                for kind in sorted(self.sent)
            },
            "unreachable_attempts": self.unreachable,
            "close_reasons": dict(sorted(self.reasons.items())),
            "timeline": self.timeline,
        }


@dataclass
class Attacker:
    name: str
    net: NodeNetwork
    seed: bytes
    rng: random.Random
    ledger: Ledger = field(default_factory=Ledger)
    identities: list[bytes] = field(default_factory=list)  # public keys it used
    _count: int = 0

    def identity(self) -> TestIdentity:
        self._count += 1
        digest = hashlib.sha256(self.seed + self._count.to_bytes(4, "big")).digest()
        identity = TestIdentity(nacl.signing.SigningKey(digest))
        self.identities.append(identity.public_key)
        return identity

    async def garbage(self, target: str) -> None:
        try:
            async with self.net.dial(f"mem://{target}") as stream:
                for _ in range(3):
                    await stream.send_message(self.rng.randbytes(self.rng.randrange(16, 200)))
                closed = await _closed_within(stream.receive_message, REJECT_WITHIN)
        except ConnectionClosed as error:
            if "refused" in str(error):
                self.ledger.unreachable += 1
                return
            closed = str(error)
        self.ledger.book("garbage_frames", closed is not None, closed)

    async def forged_ops(self, target: str, victim_device: bytes, memory_ids: list[str]) -> None:
        """Tombstones of the victim's memories in a victim device's feed: signed by our own key
        (``wrong_identity``), then with random signature bytes (``bad_signature``)."""
        me = self.identity()
        for kind in ("forged_ops_wrong_identity", "forged_ops_bad_signature"):
            entries: list[bytes] = []
            previous = None
            for mid in memory_ids[:3] or ["0" * 64]:
                unsigned = UnsignedEntry.after(
                    previous, victim_device, virtual_wall_clock(), Delete(mid)
                )
                if kind == "forged_ops_wrong_identity":
                    signature = me.sign(FEED_ENTRY_CONTEXT + unsigned.signing_payload())
                else:
                    signature = self.rng.randbytes(64)
                previous = unsigned.signed(signature)
                entries.append(previous.encoded)
            await self._session(kind, target, me, OPS(entries=list(entries)))

    async def flood(self, target: str) -> None:
        results: list[str | None] = []

        async def one() -> None:
            identity = self.identity()
            try:
                async with self.net.dial(f"mem://{target}") as stream:
                    connection = await secure_connection(
                        stream,
                        identity.new_device(),
                        initiator=True,
                        registry=DEVICE_REGISTRY,
                    )
                    results.append(await _closed_within(connection.receive, FLOOD_ADMITTED_AFTER))
                    await connection.aclose()
            except WireError as error:
                results.append(str(error))

        async with trio.open_nursery() as nursery:
            for _ in range(FLOOD_SESSIONS):
                nursery.start_soon(one)
        refused = [r for r in results if r is not None]
        # The flood is rejected when the node refused the sessions beyond its limit.
        self.ledger.book("flood", len(refused) > 0, refused[0] if refused else None)
        self.ledger.sent["flood_sessions"] = self.ledger.sent.get("flood_sessions", 0) + len(
            results
        )
        self.ledger.rejected["flood_sessions"] = self.ledger.rejected.get(
            "flood_sessions", 0
        ) + len(refused)

    async def _session(self, kind: str, target: str, me: TestIdentity, message: Message) -> None:
        try:
            async with self.net.dial(f"mem://{target}") as stream:
                connection = await secure_connection(
                    stream, me.new_device(), initiator=True, registry=DEVICE_REGISTRY
                )
                await connection.send(message)
                closed = await _closed_within(connection.receive, REJECT_WITHIN)
                await connection.aclose()
        except WireError as error:
            if "refused" in str(error) and "unreachable" in str(error):
                self.ledger.unreachable += 1
                return
            closed = str(error)
        self.ledger.book(kind, closed is not None, closed)


async def _closed_within(receive: Callable[[], Any], seconds: float) -> str | None:
    """Read (and drop) whatever arrives until the other side closes: its reason, or None if it
    kept the connection open for ``seconds``."""
    with trio.move_on_after(seconds):
        try:
            while True:
                await receive()
        except WireError as error:
            return str(error) or "closed"
    return None
