"""Peer exchange: how storage nodes tell each other of storage nodes, sans-IO.

The peering actor owns the connections; this class owns the rules of ``peers.exchange`` and
``peers.offers`` (:mod:`dmgn.storage_protocol`) and the table of offers they fill
(:class:`~actors._storage_candidates.StorageCandidates`), fed messages and the time:

* **Asking.** We ask a storage peer we chose, and our own devices (a device whose only
  bootstrap address is another of our devices finds storage through it), at their first
  connection and later while we want more candidates, giving our own signed offer when we
  hold storage for others (not to our own devices: they must not choose us). An
  answer counts only from a peer we asked and once per ask: offers nobody asked for are
  dropped unread (they cost signature checks).
* **Answering.** Anyone connected may ask (storage is a public service), at most once per
  `ANSWER_GAP` per connection; the answer is a random sample of what we hold plus our own
  offer, never the asker's own.
* **Learning.** Each offer is verified (signature, expiry, shape) before it is held. The
  offer an asker gives of itself is held only if it is signed by the very key its handshake
  showed, and then as *relay only* when it dialed us (see `StorageCandidates`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from actors._storage_candidates import Candidate, StorageCandidates
from dmgn import storage_protocol as sp
from dmgn.storage_offer import OfferError, StorageOffer, decode_storage_offer
from wire import Message, Value

__all__ = ["ANSWER_GAP", "EXCHANGE_FIRST", "EXCHANGE_INTERVAL", "ExchangeStats", "PeerExchange"]

#: A connection's asks are answered at most this often (each answer is a sample and up to 16
#: records on the wire; a peer asking in a loop gets silence, not work).
ANSWER_GAP = 10.0
#: While we want more candidates, one chosen storage peer (or one of our devices) is asked
#: again: first after EXCHANGE_FIRST (what a peer knew at our first ask is what had reached it
#: by then; a network starting together knows little of itself in its first seconds), then
#: at twice the gap, up to EXCHANGE_INTERVAL.
EXCHANGE_FIRST = 15.0
EXCHANGE_INTERVAL = 300.0


@dataclass
class ExchangeStats:
    asked: int = 0
    answered: int = 0
    learnt: int = 0
    #: Offers that failed verification, and answers or asks dropped (unasked, too soon).
    bad_offers: int = 0
    dropped: int = 0


class PeerExchange:
    """The exchange's state (see the module docstring); peers are named by the caller's
    connection key (the peering actor's peer id)."""

    def __init__(
        self,
        *,
        want: int,
        device_id: bytes,
        rng: random.Random,
        score: Callable[[Candidate], float],
        rendezvous: bytes | None = None,
        near: int = 0,
    ) -> None:
        #: ``device_id``: the device id our storage handshakes show (our own offers carry it).
        self.candidates = StorageCandidates(
            want=want,
            device_id=device_id,
            rng=rng,
            score=score,
            rendezvous=rendezvous,
            near=near,
        )
        #: Storage keys of our own devices (they offered themselves over a device session):
        #: never chosen as storage peers.
        self.own_keys: set[bytes] = set()
        self.stats = ExchangeStats()
        self._asked: set[str] = set()
        self._answered_at: dict[str, float] = {}

    def ask(self, peer: str, own_offer: bytes | None) -> Message:
        """The ``peers.exchange`` to send ``peer`` (remembered: its answer is then taken)."""
        self._asked.add(peer)
        self.stats.asked += 1
        offers: list[Value] = [own_offer] if own_offer is not None else []
        return sp.PEERS_EXCHANGE(offers=offers)

    def answer(
        self,
        peer: str,
        message: Message,
        *,
        shown_key: bytes,
        dialed_us: bool,
        own_device: bool = False,
        own_offer: bytes | None,
        now: float,
        wall: float,
        connected: frozenset[bytes] = frozenset(),
    ) -> Message | None:
        """Take ``peer``'s ask (its own offer, if any, is held when ``shown_key`` signed it) and
        say what to answer; None when it asked too soon."""
        last = self._answered_at.get(peer)
        if last is not None and now - last < ANSWER_GAP:
            self.stats.dropped += 1
            return None
        self._answered_at[peer] = now
        if len(self._answered_at) > 4 * len(self.candidates) + 1024:
            # Bounded: forget the oldest connections' times (they may ask again sooner).
            for key in sorted(self._answered_at, key=self._answered_at.__getitem__)[:512]:
                del self._answered_at[key]
        for offer in self._verified(message, wall):
            if own_device:
                self.own_keys.add(offer.storage_key)
            elif offer.storage_key == shown_key:
                self._learn(offer, "dialed us" if dialed_us else "exchange", wall)
        room = sp.MAX_EXCHANGE_OFFERS - (own_offer is not None)
        offers: list[Value] = [
            o.encode()
            for o in self.candidates.sample(room, wall=wall, exclude=shown_key, connected=connected)
        ]
        if own_offer is not None:
            offers.append(own_offer)
        self.stats.answered += 1
        return sp.PEERS_OFFERS(offers=offers)

    def answered(self, peer: str, message: Message, *, wall: float) -> int:
        """``peer``'s answer to our ask: how many offers were new to us."""
        if peer not in self._asked:
            self.stats.dropped += 1
            return 0
        self._asked.discard(peer)
        return sum(self._learn(offer, "exchange", wall) for offer in self._verified(message, wall))

    def forget_peer(self, peer: str) -> None:
        """The connection closed: an answer it still sends is not ours to take."""
        self._asked.discard(peer)

    def _learn(self, offer: StorageOffer, source: str, wall: float) -> bool:
        learnt = self.candidates.learn(offer, source, wall=wall)
        self.stats.learnt += learnt
        return learnt

    def _verified(self, message: Message, wall: float) -> list[StorageOffer]:
        raw = message["offers"]
        offers: list[StorageOffer] = []
        for data in raw if isinstance(raw, list) else []:
            if not isinstance(data, bytes):
                continue
            try:
                offers.append(decode_storage_offer(data, now=int(wall)))
            except OfferError:
                self.stats.bad_offers += 1
        return offers
