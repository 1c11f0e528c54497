"""The shard keeper's storage peers: who is live, how far each is trusted, and how we ask them.

Every part of the keeper (:mod:`actors.shard_keeper`: placement, audits, the mailbox, recovery)
talks to storage peers through :class:`StoragePeers`: it keeps the live table (from peering's
``StoragePeerUp``/``StoragePeerDown``), the keeper's own score per peer (lowered by failed audits,
corrupt shards, undecryptable mailbox items) beside peering's reputation, and the request/answer
exchange of :mod:`dmgn.storage_protocol` (a request id per request, the owner key's proof for
the peer's storage key, a deadline). Which peer is fit for new data is decided here too
(:meth:`StoragePeers.usable`, :meth:`StoragePeers.closest`, :meth:`StoragePeers.nearest`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from actors.runtime import Err, Ok, Result
from dmgn import storage_protocol as sp
from wire import Message, MessageType, PeerIdentity, Value

log = logging.getLogger("dmgn.shards")

__all__ = [
    "AVOID_SCORE",
    "PENALTY",
    "REFUSAL_BACKOFF",
    "Failure",
    "PeerKey",
    "StoragePeer",
    "StoragePeers",
    "blist",
    "distance",
    "ilist",
    "peer_key",
]

#: Reputation (0-100, from the peering actor: uptime, latency, sync, audits, violations) below
#: which a peer gets no new shards or mailbox items; one protocol violation or failed audit puts
#: a peer under it for days (dmgn/reputation.py). 50 is a peer never seen.
PLACEMENT_FLOOR = 40.0
NEUTRAL_REPUTATION = 50.0
#: A peer at or below this score gets no new shards or mailbox items (it still serves reads).
AVOID_SCORE = -20
#: Score lost per failed audit item, corrupt shard or undecryptable mailbox item.
PENALTY = 5
#: How long a peer that refused a put (quota, rate) is left alone.
REFUSAL_BACKOFF = 60.0
#: Owner proofs remembered (one per storage key; the cache is cleared when full).
MAX_PROOFS = 1024

PeerKey = bytes  # identity public key (32) || device id (16)


def peer_key(peer: PeerIdentity) -> PeerKey:
    return peer.identity_public_key + peer.device_id


def distance(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def blist(value: Value) -> list[bytes]:
    return [v for v in value if isinstance(v, bytes)] if isinstance(value, list) else []


def ilist(value: Value) -> list[int]:
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


@dataclass
class StoragePeer:
    peer: PeerIdentity
    node_id: bytes
    mail_head: int | None = None  # how much of our stream it holds, once asked
    refusing_until: float = 0.0
    #: When to ask it for heads next (0: at once), and when we last did.
    heads_due: float = 0.0
    heads_asked: float = -math.inf
    #: Streams it told us (``mail.notify``) it holds up to a seq, not yet looked at.
    notices: dict[bytes, int] = field(default_factory=dict)


@dataclass
class _Slot:
    peer: PeerKey
    event: trio.Event = field(default_factory=trio.Event)
    message: Message | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    code: str
    reason: str


class StoragePeers:
    """The live storage peers, their scores, and requests to them with their answers."""

    def __init__(
        self,
        *,
        owner: bytes,
        send: Callable[[PeerIdentity, Message], Awaitable[Result[None]]],
        sign: Callable[[bytes, bytes], Awaitable[Result[bytes]]],
        close: Callable[[PeerIdentity, str], Awaitable[object]] | None,
        request_timeout: float,
    ) -> None:
        self._owner = owner
        self._send = send
        self._sign = sign
        self._close = close
        self._request_timeout = request_timeout
        #: Owner proofs per storage key (one signature each, made once; bounded by clearing).
        self._proofs: dict[bytes, bytes] = {}
        self.live: dict[PeerKey, StoragePeer] = {}
        self.down_since: dict[PeerKey, float] = {}
        self.scores: dict[PeerKey, int] = {}
        #: Reputation of live peers, from the peering actor (dropped when a peer goes down).
        self._reputation: dict[PeerKey, float] = {}
        self._waiting: dict[int, _Slot] = {}
        self._rids = itertools.count(random.randrange(sp.MAX_RID // 2))
        #: The keeper's nursery while it runs: a peer scored under :data:`AVOID_SCORE` is cut
        #: off from a task there.
        self.nursery: trio.Nursery | None = None

    # -- the live table ----------------------------------------------------------------------

    def up(self, peer: PeerIdentity) -> None:
        # Peering hands over only storage-mode connections we dialed (never our own devices,
        # and never the owner key, which no peer presents as its certificate key).
        key = peer_key(peer)
        self.live[key] = StoragePeer(peer, hashlib.sha256(key).digest())
        self.down_since.pop(key, None)

    def down(self, peer: PeerIdentity) -> None:
        key = peer_key(peer)
        self._reputation.pop(key, None)
        if self.live.pop(key, None) is not None:
            self.down_since[key] = trio.current_time()

    def set_reputation(self, peer: PeerIdentity, score: float) -> None:
        self._reputation[peer_key(peer)] = score

    # -- requests ----------------------------------------------------------------------------

    def answer(self, peer: PeerIdentity, reply: Message) -> None:
        """A ``storage.reply``: wakes the request waiting for it, if any."""
        slot = self._waiting.get(reply.get_int("rid"))
        if slot is not None and slot.peer == peer_key(peer) and slot.message is None:
            slot.message = reply
            slot.event.set()
        else:
            log.info(
                "shards: late or unexpected answer %d from %s",
                reply.get_int("rid"),
                peer_key(peer).hex()[:16],
            )

    async def request(
        self, peer: PeerIdentity, kind: MessageType, **fields: Value
    ) -> Message | Failure:
        proof = await self._proof(peer.identity_public_key)
        if isinstance(proof, Failure):
            return proof
        rid = next(self._rids) % sp.MAX_RID
        slot = _Slot(peer_key(peer))
        self._waiting[rid] = slot
        try:
            message = kind(rid=rid, proof=proof, **fields)
            while True:
                sent = await self._send(peer, message)
                if isinstance(sent, Ok):
                    break
                if sent.code != "busy":
                    return Failure("not_connected", sent.reason)
                await trio.sleep(0.02)
            with trio.move_on_after(self._request_timeout):
                await slot.event.wait()
            if slot.message is None:
                log.warning(
                    "storage peer %s: no answer to %s in time",
                    peer_key(peer).hex()[:16],
                    kind.name,
                )
                return Failure("timeout", f"no answer to {kind.name} in time")
            code, reason = sp.reply_fields(slot.message)
            if code:
                return Failure(code, reason)
            return slot.message
        finally:
            del self._waiting[rid]

    async def _proof(self, storage_key: bytes) -> bytes | Failure:
        proof = self._proofs.get(storage_key)
        if proof is None:
            signed = await self._sign(sp.OWNER_PROOF_CONTEXT, sp.owner_proof_message(storage_key))
            if isinstance(signed, Err):
                return Failure("sign_failed", signed.reason)
            if len(self._proofs) >= MAX_PROOFS:
                self._proofs.clear()
            proof = self._proofs[storage_key] = signed.value
        return proof

    # -- trust -------------------------------------------------------------------------------

    def penalize(self, key: PeerKey, why: str, times: int = 1) -> None:
        before = self.scores.get(key, 0)
        score = before - PENALTY * times
        self.scores[key] = score
        log.warning("storage peer %s scored down to %d: %s", key.hex()[:16], score, why)
        peer = self.live.get(key)
        if score <= AVOID_SCORE < before and peer is not None and self._close is not None:
            # Cut off, as gossip cuts off a misbehaving device; it gets no new shards even if
            # it reconnects (the score outlives the connection).
            assert self.nursery is not None
            self.nursery.start_soon(self._close, peer.peer, f"cut off: {why} (score {score})")

    def usable(self, key: PeerKey) -> bool:
        peer = self.live.get(key)
        return (
            peer is not None
            and self.scores.get(key, 0) > AVOID_SCORE
            and self._reputation.get(key, NEUTRAL_REPUTATION) >= PLACEMENT_FLOOR
            and peer.refusing_until <= trio.current_time()
        )

    def closest(self, oid: bytes, exclude: set[PeerKey]) -> PeerKey | None:
        """The usable peer XOR-closest to ``oid``, not in ``exclude``."""
        best: tuple[int, PeerKey] | None = None
        for key, peer in self.live.items():
            if key in exclude or not self.usable(key):
                continue
            d = distance(peer.node_id, oid)
            if best is None or d < best[0]:
                best = (d, key)
        return None if best is None else best[1]

    def nearest(self, target: bytes, count: int) -> list[StoragePeer]:
        """The ``count`` usable peers XOR-closest to ``target``, closest first."""
        usable = [p for k, p in self.live.items() if self.usable(k)]
        usable.sort(key=lambda p: distance(p.node_id, target))
        return usable[:count]
