"""Which storage nodes we know of, and which of them to make our storage peers: sans-IO.

A device must spread each memory's n shards over n storage peers, and keeps a few more so a
peer going away does not stall placement: the peering actor wants ``want`` live storage peers
(the keeper's n + 2; 8 by default). A person gives one or two bootstrap addresses; the rest
are *found*, as signed :class:`~dmgn.storage_offer.StorageOffer` records other nodes pass on
(peer exchange). This class holds those offers and picks whom to dial; the peering actor does
the dialing, feeds the outcomes back, and asks chosen peers for more offers.

Rules, each with the attack it answers (docs/security.md has the table):

* **Admission is first come, bounded per network.** At most `MAX_CANDIDATES` offers, at most
  `MAX_PER_PREFIX` from one /24 (IPv4) or /48 (IPv6). A known offer is refreshed in place; a
  new one is turned away when its network or the table is full, and an admitted offer leaves
  only when it expires or keeps failing. So a flood of fresh keys (one attacker, many keys)
  fills at most its own networks' share and never pushes out what we already hold.
* **Relay-only offers.** A node that dialed *us* and offered itself is passed on to others
  but never chosen by us: a stranger must not choose to hold our shards (docs/security.md,
  "who holds what"). Those who hear of it from us decide for themselves.
* **Rendezvous.** The identity's mailbox lives on the storage peers XOR-closest to a blinded
  target only its devices can compute (the shard keeper's ``mailbox_target``); so the
  ``near`` known storage nodes closest to it are always chosen, even beyond ``want``. A device
  that knows only the seed and one address (a restore, or a device that was never online
  with the others) then meets the nodes the other devices used, without asking everyone: the
  mailbox's address is a distance, not a list.
* **Choice.** Candidates are then chosen to fill ``want`` one at a time: a network with fewest
  chosen or live peers first (so one /24 holds as few of a memory's shards as the network
  allows), then the best reputation, then a seeded random draw (load spreads over the
  storage nodes, and a simulation replays exactly).
* **Failure.** A chosen candidate that fails `DROP_AFTER` dials in a row (one, if we never
  reached it: offers outlive the nodes' time online, and a slot held by an offline node is a
  storage peer missing for minutes of backoff) is let go, not chosen again for `COOLDOWN`
  seconds, and forgotten after `FORGET_AFTER` failures: its place goes to another.

Times: ``now`` is the caller's monotonic clock; offers' validity is wall-clock seconds
(``wall``).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from dmgn.storage_offer import StorageOffer, address_prefix

__all__ = [
    "COOLDOWN",
    "DROP_AFTER",
    "FORGET_AFTER",
    "MAX_CANDIDATES",
    "MAX_PER_PREFIX",
    "Candidate",
    "StorageCandidates",
]

#: Offers held at most (~300 bytes each): enough to replace every storage peer many times over.
MAX_CANDIDATES = 256
#: Offers held at most from one /24 or /48. High enough for a few storage nodes on one host
#: or LAN (a test's loopback, an office), low enough that one network cannot fill the table.
MAX_PER_PREFIX = 16
#: Dials of a chosen candidate that fail in a row before it is let go for another.
DROP_AFTER = 3
#: How long a candidate let go is not chosen again.
COOLDOWN = 600.0
#: Failures after which a candidate is forgotten altogether (a node gone for good).
FORGET_AFTER = 9


@dataclass
class Candidate:
    offer: StorageOffer
    #: How we heard of it: "exchange" (a peer passed it on), "dialed us" (it offered itself
    #: over a connection it started: relay only), "dht".
    source: str
    prefix: str
    failures: int = 0
    chosen: bool = False
    cool_until: float = 0.0
    #: We reached it at least once (a node that was there backs off before it is let go).
    reached: bool = False

    @property
    def key(self) -> bytes:
        return self.offer.storage_key

    @property
    def relay_only(self) -> bool:
        return self.source == "dialed us"


class StorageCandidates:
    """The offers we hold and the choice among them (see the module docstring).

    ``score(candidate)`` is the candidate's reputation (the peering actor's table; neutral for
    one never seen); ``rng`` breaks ties, seeded by the caller.
    """

    def __init__(
        self,
        *,
        want: int,
        device_id: bytes,
        rng: random.Random,
        score: Callable[[Candidate], float],
        max_candidates: int = MAX_CANDIDATES,
        max_per_prefix: int = MAX_PER_PREFIX,
        rendezvous: bytes | None = None,
        near: int = 0,
    ) -> None:
        self.want = want
        self._rendezvous = rendezvous
        self._near = near if rendezvous is not None else 0
        self._device_id = device_id
        self._rng = rng
        self._score = score
        self._max = max_candidates
        self._max_per_prefix = max_per_prefix
        self._by_key: dict[bytes, Candidate] = {}
        self._per_prefix: Counter[str] = Counter()
        #: Offers turned away because their network or the table was full (for status).
        self.refused = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[Candidate]:
        return iter(self._by_key.values())

    def get(self, storage_key: bytes) -> Candidate | None:
        return self._by_key.get(storage_key)

    def chosen(self) -> list[Candidate]:
        return [c for c in self._by_key.values() if c.chosen]

    # -- admission ---------------------------------------------------------------------------

    def learn(self, offer: StorageOffer, source: str, *, wall: float) -> bool:
        """Hold a verified offer (the caller verified its signature). True if it is new or
        newer than the one held; False if ignored (ours, expired, older, or no room)."""
        if offer.device_id == self._device_id or offer.expires_at <= wall:
            return False
        held = self._by_key.get(offer.storage_key)
        if held is not None:
            if offer.issued_at <= held.offer.issued_at:
                if held.relay_only and source != "dialed us":
                    held.source = source  # now also heard of from someone we chose
                return False
            prefix = address_prefix(offer.addrs[0])
            self._per_prefix[held.prefix] -= 1
            self._per_prefix[prefix] += 1
            held.offer, held.prefix = offer, prefix
            if held.relay_only and source != "dialed us":
                held.source = source
            return True
        self._expire(wall)
        prefix = address_prefix(offer.addrs[0])
        if self._per_prefix[prefix] >= self._max_per_prefix or len(self._by_key) >= self._max:
            self.refused += 1
            return False
        self._by_key[offer.storage_key] = Candidate(offer, source, prefix)
        self._per_prefix[prefix] += 1
        return True

    def _expire(self, wall: float) -> None:
        for key, candidate in list(self._by_key.items()):
            if candidate.offer.expires_at <= wall and not candidate.chosen:
                self._drop(key)

    def _drop(self, key: bytes) -> None:
        candidate = self._by_key.pop(key)
        self._per_prefix[candidate.prefix] -= 1
        if self._per_prefix[candidate.prefix] <= 0:
            del self._per_prefix[candidate.prefix]

    # -- choice ------------------------------------------------------------------------------

    def choose(
        self,
        live: Iterable[tuple[bytes, bytes, str]],
        *,
        now: float,
        wall: float,
        exclude: Callable[[Candidate], bool] = lambda c: False,
    ) -> list[Candidate]:
        """Candidates to dial now so that chosen-or-live storage peers reach ``want``.

        ``live`` names the storage peers connected and chosen, as (storage key, device id,
        network prefix): bootstrap peers and chosen candidates alike. ``exclude`` skips
        candidates the caller knows better about (one of our own devices). Each returned
        candidate is marked chosen; the caller dials it until it connects or `failed` lets it
        go. The rendezvous's nearest are chosen whatever ``want`` says."""
        self._expire(wall)
        live_nodes = {key: (device, prefix) for key, device, prefix in live}
        live_keys = {key: prefix for key, (_, prefix) in live_nodes.items()}
        taken = set(live_keys)
        networks: Counter[str] = Counter(live_keys.values())
        for candidate in self._by_key.values():
            if candidate.chosen and candidate.key not in live_keys:
                taken.add(candidate.key)
                networks[candidate.prefix] += 1
        need = self.want - len(taken)
        pool = [
            c
            for c in self._by_key.values()
            if c.key not in taken
            and not c.relay_only
            and not c.chosen
            and c.cool_until <= now
            and c.offer.expires_at > wall
            and not exclude(c)
        ]
        picked = self._nearest(pool, live_nodes)
        for candidate in picked:
            pool.remove(candidate)
            candidate.chosen = True
            networks[candidate.prefix] += 1
        draws = {c.key: self._rng.random() for c in sorted(pool, key=lambda c: c.key)}
        while pool and len(picked) < need:
            best = min(pool, key=lambda c: (networks[c.prefix], -self._score(c), draws[c.key]))
            pool.remove(best)
            best.chosen = True
            networks[best.prefix] += 1
            picked.append(best)
        return picked

    def _nearest(
        self, pool: list[Candidate], live: dict[bytes, tuple[bytes, str]]
    ) -> list[Candidate]:
        """The candidates in ``pool`` among the ``near`` storage nodes (live, chosen or
        candidates) XOR-closest to the rendezvous."""
        if self._rendezvous is None or not self._near:
            return []
        target = int.from_bytes(self._rendezvous, "big")
        nodes = {key: device for key, (device, _) in live.items()}
        for candidate in self._by_key.values():
            if candidate.chosen or candidate in pool:
                nodes.setdefault(candidate.key, candidate.offer.device_id)
        closest = sorted(nodes, key=lambda key: _node_id(key, nodes[key]) ^ target)
        near = set(closest[: self._near])
        return sorted((c for c in pool if c.key in near), key=lambda c: c.key)

    def connected(self, storage_key: bytes) -> None:
        """A chosen candidate's dial connected: its failures start over."""
        candidate = self._by_key.get(storage_key)
        if candidate is not None:
            candidate.failures = 0
            candidate.reached = True

    def failed(self, storage_key: bytes, *, now: float) -> bool:
        """A dial of a chosen candidate failed. True when it is let go (the caller stops
        dialing it; `choose` picks another)."""
        candidate = self._by_key.get(storage_key)
        if candidate is None:
            return True
        candidate.failures += 1
        if candidate.reached and candidate.failures % DROP_AFTER:
            return False
        candidate.chosen = False
        candidate.cool_until = now + COOLDOWN
        if candidate.failures >= FORGET_AFTER:
            self._drop(storage_key)
        return True

    def release(self, storage_key: bytes) -> None:
        """Stop counting a candidate as chosen (it turned out to be one of our devices, or we
        no longer need it); it may be chosen again later."""
        candidate = self._by_key.get(storage_key)
        if candidate is not None:
            candidate.chosen = False

    # -- exchange ----------------------------------------------------------------------------

    def sample(
        self,
        count: int,
        *,
        wall: float,
        exclude: bytes | None = None,
        connected: frozenset[bytes] = frozenset(),
    ) -> list[StorageOffer]:
        """Up to ``count`` unexpired offers to pass on to a peer that asked (not its own):
        those of nodes ``connected`` to us now first (they are there: an offer outlives its
        node's time online), each group a seeded random sample, so asking again (or asking
        another) finds others."""
        offers = [
            c.offer
            for c in self._by_key.values()
            if c.offer.expires_at > wall and c.key != exclude and c.failures == 0
        ]
        offers.sort(key=lambda o: o.storage_key)
        here = [o for o in offers if o.storage_key in connected]
        away = [o for o in offers if o.storage_key not in connected]
        picked = self._rng.sample(here, min(count, len(here)))
        return picked + self._rng.sample(away, min(count - len(picked), len(away)))

    def wanted(self, live: int) -> bool:
        """Whether more offers would help: fewer unchosen, choosable candidates than ``want``,
        or fewer live peers than ``want``."""
        spare = sum(1 for c in self._by_key.values() if not c.chosen and not c.relay_only)
        return live < self.want or spare < self.want


def _node_id(storage_key: bytes, device_id: bytes) -> int:
    """A storage node's place in XOR space: the shard keeper's (sha256 of the key it shows and
    the device id its storage handshakes show), so both sides measure the same distance."""
    return int.from_bytes(hashlib.sha256(storage_key + device_id).digest(), "big")
