"""Who to dial, when, and at which address: the peering actor's dial scheduler, sans-IO.

The peering actor (:mod:`actors.peering`) owns the I/O: it asks the transport to dial, hears
connections come and go, and sleeps. Every decision about dialing lives here instead, in a
class fed events and the time (as :class:`wire.SecureChannel` is fed bytes), so that the rules
below can be read in one place and tested without trio, sockets or a clock:

* **Targets.** A target is somewhere worth dialing: a bootstrap or ``add_peer`` address (never
  forgotten), or a peer found on the LAN or in the DHT (forgotten `FOUND_PEER_TTL` after its
  last find, or when its record expires). A target is not dialed while one of its device's
  connections is up, while it is being dialed, or when all its addresses are our own.
* **Backoff.** After the n-th consecutive failure a target (and each of its addresses) waits
  ``BACKOFF_BASE * 2**(n-1)``, capped at the redial interval, times a jitter in [1 - JITTER, 1];
  another identity's node (a storage peer, needed once a sync round) starts at the redial
  interval and caps at `STORAGE_REDIAL_CEILING`. A connection that ends within
  `STABLE_CONNECTION` of coming up counts as a failure.
* **Reputation.** Found peers under `DIAL_FLOOR` are held back and looked at again every
  `DIAL_RECHECK`; bootstrap and added peers are dialed whatever their score. Due targets are
  dialed best-reputed first, at most `MAX_PARALLEL_DIALS` at once.
* **Alone.** With no connection at all, at least one dial per redial interval (the target
  tried longest ago); after as many failures in a row as there are targets, one probe at a
  time, further apart up to `ALONE_PROBE_CEILING`. The first connection makes every target due.
* **Storage-only targets.** An address we did not know that answered only in storage mode is
  asked, inside that session, whether it is one of our devices (the actor's ``AskOwn``), on a
  schedule of its own (`DEVICE_PROBE_FIRST`, doubling to `DEVICE_PROBE_CEILING`).

Times are the caller's monotonic clock (the actor passes ``trio.current_time()``); found
peers' record expiry is wall-clock seconds, given with the wall time.
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

__all__ = [
    "ALONE_PROBE_CEILING",
    "BACKOFF_BASE",
    "DEVICE_PROBE_CEILING",
    "DEVICE_PROBE_FIRST",
    "DIAL_FLOOR",
    "DIAL_RECHECK",
    "FOUND_PEER_TTL",
    "JITTER",
    "MAX_FOREIGN",
    "MAX_PARALLEL_DIALS",
    "STABLE_CONNECTION",
    "STORAGE_REDIAL_CEILING",
    "AddressHealth",
    "DialSchedule",
    "Plan",
    "Target",
]

#: A connection that ends sooner than this after it came up counts as a failed dial for the
#: backoff: a node that accepts the handshake and then refuses us (full, or we are a stranger
#: to it) must not be redialed at once; issue 12 saw ~120 handshakes a second from that.
STABLE_CONNECTION = 30.0
#: Backoff before the n-th consecutive redial is ``BACKOFF_BASE * 2**(n-1)`` capped at the
#: redial interval, times a random factor in [1 - JITTER, 1]: devices that lost a node at the
#: same moment do not come back in lockstep.
BACKOFF_BASE = 1.0
JITTER = 0.5
#: A storage peer (another identity's node) is needed once a sync round (60 s by default:
#: the keeper's mail heads and pushes), and a shard on a peer away for less than the keeper's
#: ``down_grace`` is not repaired; so one that keeps failing is redialed at most this often,
#: not every redial interval. Our own devices keep the redial interval (an op waits for
#: them). At 100 nodes with 30% churn, storage peers redialed every 5 s made 225,000 refused
#: dials in a virtual hour, the largest item of the run's CPU.
STORAGE_REDIAL_CEILING = 60.0
#: A node that seems to be offline itself (every target failed in turn, no connection) probes
#: one target at a time, first once a redial interval, then at twice the gap after each failed
#: probe up to this ceiling: a laptop without a network dials nothing forever at the redial
#: interval (at 100 nodes with 30% churn, offline nodes' probes were 41% of all dials), and
#: one back on the network finds its peers within this at worst (its own devices dial it
#: sooner: they keep the redial interval). At 30 s, devices that take one-minute turns
#: online (tests/sims/test_sim_faults.py) lost half a turn to it and missed ops.
ALONE_PROBE_CEILING = 15.0
#: Found peers (mDNS, DHT) are forgotten after this long without being found again, unless
#: their record says otherwise; bootstrap peers and ``add_peer`` addresses are never forgotten.
FOUND_PEER_TTL = 3600.0
#: A found peer whose reputation is below this is not dialed (it violated the protocol or
#: failed audits recently; evidence decays, so it is dialed again once that has faded). Bootstrap
#: and added peers are dialed whatever their score: a person asked for them.
DIAL_FLOOR = 25.0
#: While a found peer is held back below the dial floor, the dial loop looks again this
#: often: it comes back above the floor as its record decays, and no event says when.
#: Everything else the loop waits for has a time (a redial, a probe, a found peer's expiry)
#: or wakes it (a peer up or down, a find, a dial's end), so with nobody held back it sleeps
#: until one of those. It looked every redial interval: at 100 nodes a sim hour's 124,643
#: dial-loop passes were a tenth of the run's CPU, most of them finding nothing to do; then
#: every DIAL_RECHECK, a fifth of the passes left (the sim has nobody under the floor).
DIAL_RECHECK = 60.0
#: Dials in flight at once; when more targets are due, the best-reputed go first.
MAX_PARALLEL_DIALS = 8
#: Devices found on the LAN that turned out to be another identity, remembered so that mDNS
#: finds of them are not dialed again (bounded: the oldest are forgotten first).
MAX_FOREIGN = 1024
#: A bootstrap or added address that answered only in storage mode is probed: asked inside
#: its storage session whether it holds our device PSK, and dialed in device mode if it does
#: (one of our own devices whose device handshake was broken once must not stay a storage
#: peer): first DEVICE_PROBE_FIRST redial intervals after it connected (a minute at the
#: production 5 s), then doubling up to DEVICE_PROBE_CEILING while it says no: 8 in the first
#: hour, then 6 an hour. Nearly every such address is another identity's storage node. The
#: probe was a device-mode dial until the question existed: with the first after one redial
#: interval and a 300 s ceiling, ~17 refused device handshakes a storage link an hour (most
#: of a 500-node sim hour's 62,500 device-to-storage connections); with this schedule, still
#: half of all connections in a 100-node sim hour. Redials of such an address skip the device
#: handshake. The ceiling bounds how long two of our devices stay storage peers after someone
#: on the path forged refusals of their device handshakes (the close code before the handshake
#: ends is not authenticated; the question's answer is): ten minutes after the forging stops.
DEVICE_PROBE_FIRST = 12
DEVICE_PROBE_CEILING = 600.0

#: wire's IdentityError says this when the responder is not the identity we expected.
_DIFFERENT_IDENTITY = "different identity"


@dataclass
class AddressHealth:
    failures: int = 0
    next_dial: float = 0.0
    last_error: str | None = None


@dataclass
class Target:
    addrs: tuple[str, ...]
    source: str
    device_id: bytes | None = None
    identity: bytes | None = None
    permanent: bool = False
    expires_at: float | None = None
    dialing: bool = False
    failures: int = 0
    next_dial: float = 0.0
    last_error: str | None = None
    is_self: bool = False
    health: dict[str, AddressHealth] = field(default_factory=dict)
    #: Connected, but in storage mode, and we did not know who it was: probe device mode.
    storage_only: bool = False
    probes: int = 0
    next_probe: float = 0.0
    #: Its last connection ended within STABLE_CONNECTION (it answered, then refused us):
    #: it backs off whatever our own connectivity, unlike a target we could not reach.
    ended_early: bool = False
    #: When a dial of it last started.
    last_tried: float = -math.inf


@dataclass(frozen=True, slots=True)
class Plan:
    """What the dial loop does now: start these dials (each marked dialing), then sleep until
    ``wake_at`` unless an event comes first."""

    dials: tuple[Target, ...]
    wake_at: float


class DialSchedule:
    """The dial scheduler's state and rules (see the module docstring).

    ``score(key)`` is a peer's reputation (the actor's table); ``rng`` draws the backoff
    jitter, so a seeded one replays exactly.
    """

    def __init__(
        self,
        *,
        identity: bytes,
        device_id: bytes,
        redial_interval: float,
        rng: random.Random,
        score: Callable[[str], float],
        neutral: float,
        bootstrap: Iterable[str] = (),
    ) -> None:
        self._identity = identity
        self._device_id = device_id
        self._redial_interval = redial_interval
        self._rng = rng
        self._score = score
        self._neutral = neutral
        self._targets: dict[str, Target] = {}
        for address in bootstrap:
            self._targets[address] = Target((address,), "bootstrap", permanent=True)
        #: Connections up, by device id: "any connection at all" is this being non-empty.
        self._device_ids: collections.Counter[bytes] = collections.Counter()
        #: When a dial last started: with no connection at all, one at least every interval.
        self._last_dial_at = -math.inf
        #: Dials that failed while we had no connection, since our last connection.
        self._failed_alone = 0
        #: Whether due targets waited for a free dial slot in the last plan.
        self._capped = False
        #: Addresses that reach ourselves (told, and learnt by dialing ourselves).
        self._own: set[str] = set()
        #: LAN devices that are another identity (never dialed again), by device id *and* the
        #: addresses it was announced at: the refusal that put one here is a close reason the
        #: remote chose, so an attacker announcing one of our devices' ids at its own address
        #: must not make us ignore that device's own announcements.
        self._foreign: dict[tuple[bytes | None, str], None] = {}

    # -- what we know ------------------------------------------------------------------------

    def targets(self) -> Iterator[Target]:
        return iter(self._targets.values())

    @property
    def online(self) -> bool:
        """Whether any connection is up (with none, a failed dial says more about our own
        network than about the target)."""
        return bool(self._device_ids)

    def connected_device(self, device_id: bytes | None) -> bool:
        return device_id is not None and device_id in self._device_ids

    def dials(self, device_id: bytes, identity: bytes) -> bool:
        """Whether the node ``device_id`` (showing ``identity``) is one we dial ourselves: a
        target we reached at that device, or found with that identity in a verified record.
        A node that connects to us is then one we chose, whichever side's connection was kept;
        a stranger that only dials us is not (an mDNS find names our own identity, so a
        stranger announcing a device id on the LAN is not one either)."""
        return any(
            t.device_id == device_id and (t.identity is None or t.identity == identity)
            for t in self._targets.values()
        )

    def own(self, address: str) -> bool:
        return address in self._own

    def target_score(self, target: Target) -> float:
        key = self._target_key(target)
        return self._score(key) if key else self._neutral

    def is_storage_target(self, target: Target) -> bool:
        """Another identity's node: connected in storage mode, or known by its identity."""
        return target.storage_only or (
            target.identity is not None and target.identity != self._identity
        )

    def _target_key(self, target: Target) -> str | None:
        if target.device_id is None:
            return None
        if target.identity is None or target.identity == self._identity:
            return target.device_id.hex()
        return f"{target.identity.hex()[:16]}/{target.device_id.hex()}"

    # -- events ------------------------------------------------------------------------------

    def add(self, address: str) -> None:
        """``add_peer``: dial it now and again whenever it is not connected, for good."""
        self._targets.setdefault(address, Target((address,), "added", permanent=True))

    def forget(self, target: Target) -> None:
        """Stop dialing a found target (a storage candidate let go for another); bootstrap and
        added targets are never forgotten."""
        if target.permanent:
            return
        for key, held in list(self._targets.items()):
            if held is target:
                del self._targets[key]

    def forget_device(self, device_id: bytes) -> None:
        """Stop dialing the found targets at ``device_id`` (a storage offer that was one of our
        own devices: it is found again as a device, by mDNS, the DHT or its own dial)."""
        for target in [t for t in self._targets.values() if t.device_id == device_id]:
            self.forget(target)

    def source_of(self, device_id: bytes) -> str | None:
        """How the target at ``device_id`` was found (None: no target has it)."""
        for target in self._targets.values():
            if target.device_id == device_id:
                return target.source
        return None

    def own_addresses(self, addrs: Iterable[str]) -> None:
        self._own |= set(addrs)

    def found(
        self,
        addrs: tuple[str, ...],
        source: str,
        device_id: bytes | None,
        identity: bytes | None,
        expires_at: float | None,
        *,
        now: float,
        wall_now: float,
    ) -> bool:
        """A peer found (mDNS, DHT, bootstrap); False if it is ignored (a LAN stranger)."""
        if source == "mdns" and all((device_id, a) in self._foreign for a in addrs):
            return False  # a stranger in range: not ours, not chosen as a storage peer
        key = device_id.hex() if device_id else addrs[0]
        target = self._targets.get(key)
        if target is None:
            target = self._targets[key] = Target(addrs, source, permanent=source == "bootstrap")
        target.addrs = tuple(a for a in addrs if (device_id, a) not in self._foreign)
        if any(a not in self._own for a in addrs):
            target.is_self = False
        target.device_id = device_id or target.device_id
        target.identity = identity or target.identity
        if source == "mdns":
            # Everyone in radio range announces on mDNS: we dial them only as devices of our
            # own identity. The handshake then checks the responder's certificate before we
            # send ours, so a stranger we found never sees who we are (issue 20; storage peers
            # are chosen: bootstrap, add_peer or the DHT, not the LAN).
            target.identity = self._identity
        if source != "bootstrap":
            target.source = source
        ttl = FOUND_PEER_TTL
        if expires_at is not None:
            ttl = max(0.0, min(ttl, expires_at - wall_now))
        target.expires_at = None if target.permanent else now + ttl
        return True

    def connection_up(self, device_id: bytes, replaced: bytes | None, *, now: float) -> bool:
        """A connection came up (``replaced``: the device id of the duplicate it replaces).
        True when the dial loop must look again now."""
        self._failed_alone = 0
        wake = False
        if not self._device_ids:
            # The first connection after none: we were probably offline ourselves (see
            # `plan`), not every peer; whatever backed off meanwhile is due again now.
            for target in self._targets.values():
                if target.ended_early:
                    continue
                target.next_dial = min(target.next_dial, now)
                for health in target.health.values():
                    health.next_dial = min(health.next_dial, now)
            wake = True
        if replaced is not None:
            self._count(replaced, -1)
        self._count(device_id, +1)
        for target in self._targets.values():
            if target.device_id == device_id:
                target.last_error = None
        return wake

    def connection_down(self, device_id: bytes, *, lived: float, reason: str, now: float) -> None:
        """A connection of ``device_id`` ended after ``lived`` seconds."""
        self._count(device_id, -1)
        for target in self._targets.values():
            if target.device_id != device_id:
                continue
            target.ended_early = lived < STABLE_CONNECTION
            if lived >= STABLE_CONNECTION:
                target.failures = 0
            else:
                target.failures += 1
                target.last_error = f"connection ended after {lived:.1f}s: {reason}"
                target.next_dial = now + self.backoff(
                    target.failures, self.is_storage_target(target)
                )

    def _count(self, device_id: bytes, change: int) -> None:
        self._device_ids[device_id] += change
        if self._device_ids[device_id] <= 0:
            del self._device_ids[device_id]

    # -- the dial loop -----------------------------------------------------------------------

    def plan(self, now: float) -> Plan:
        """Forget expired targets, pick the dials to start now (marked dialing), and say when
        to look again."""
        soonest = math.inf
        held_back = False  # a found peer under the dial floor (see DIAL_RECHECK)
        due: list[Target] = []
        for key, target in list(self._targets.items()):
            if target.expires_at is not None:
                if now >= target.expires_at:
                    del self._targets[key]
                    continue
                soonest = min(soonest, target.expires_at)
            if target.is_self or target.dialing:
                continue
            if self.connected_device(target.device_id):
                if not target.storage_only:
                    continue
                if now < target.next_probe:
                    soonest = min(soonest, target.next_probe)
                    continue
                due.append(target)  # a device-mode probe of a storage-only connection
                continue
            if now < target.next_dial:
                soonest = min(soonest, target.next_dial)
                continue
            if not target.permanent and self.target_score(target) < DIAL_FLOOR:
                held_back = True
                continue
            due.append(target)
        if held_back:
            soonest = min(soonest, now + max(self._redial_interval, DIAL_RECHECK))
        # Best reputation first, and a bounded number at once.
        due.sort(key=self.target_score, reverse=True)
        in_flight = sum(t.dialing for t in self._targets.values())
        if not self._device_ids:
            # No connection at all: perhaps our own network was gone, not every peer, and
            # storage peers back off to a minute. At least one dial per redial interval (the
            # one tried longest ago, due or not) notices that we are back within it (within
            # ALONE_PROBE_CEILING once we seem offline); the first connection then makes
            # every target due again (`connection_up`).
            dialable = [
                t
                for t in self._targets.values()
                if not t.is_self and (t.permanent or self.target_score(t) >= DIAL_FLOOR)
            ]
            gap = self._redial_interval
            if dialable and self._failed_alone >= len(dialable):
                # As many dials failed in a row as we have targets, with no connection: most
                # likely we are the one offline (a laptop without a network), and each
                # target's own backoff would keep dialing into nothing: that probe alone,
                # then, each target in turn, further apart after each failure. In a sim hour
                # with 30% churn, offline nodes made 57% of all refused dials; with the probe
                # once a redial interval, still 41%.
                due = []
                doubling = min(self._failed_alone - len(dialable), 32)
                gap = min(max(gap, ALONE_PROBE_CEILING), gap * 2.0**doubling)
            probe_at = self._last_dial_at + gap
            if not due and in_flight == 0 and now >= probe_at:
                due = sorted(
                    (t for t in dialable if not t.dialing and not t.ended_early),
                    key=lambda t: (t.last_tried, -self.target_score(t)),
                )[:1]
            if probe_at > now:
                soonest = min(soonest, probe_at)
            # (Otherwise a dial is in flight, or was just started: its end wakes the loop.)
        if due:
            self._last_dial_at = now
        room = max(0, MAX_PARALLEL_DIALS - in_flight)
        self._capped = len(due) > room
        dials = tuple(due[:room])
        for target in dials:
            target.dialing = True
            target.last_tried = now
        return Plan(dials, soonest)

    def dial_done(self, target: Target) -> float | None:
        """A dial of ``target`` ended: the time its own next try is due, or None when the loop
        must look again now (a due target waits for this slot, or we are alone)."""
        target.dialing = False
        if self._capped or not self._device_ids:
            return None
        # Otherwise only this target's own next time is new to the loop (it was skipped while
        # dialing): at 40 nodes the loop woke once a node-second, mostly for this.
        again = target.next_dial
        if target.storage_only:
            again = min(again, target.next_probe)
        return again

    # -- dialing one target ------------------------------------------------------------------

    def wants_probe(self, target: Target) -> bool:
        """The dial is a device-mode probe of a connected storage-only target."""
        return target.storage_only and self.connected_device(target.device_id)

    def dial_order(self, target: Target, now: float) -> list[str]:
        """The target's addresses worth a try now: never our own; those backing off after
        failures only when nothing else is left; fewest failures first."""
        candidates = [a for a in target.addrs if a not in self._own]
        ready = [
            a for a in candidates if target.health.setdefault(a, AddressHealth()).next_dial <= now
        ]
        return sorted(ready or candidates, key=lambda a: target.health[a].failures)

    def only_ourselves(self, target: Target) -> None:
        """Every address ``target`` has is one of ours: it is not dialed again (until found at
        another address)."""
        target.is_self = True

    def dialed(
        self, target: Target, address: str, device_id: bytes, is_device: bool, *, now: float
    ) -> bool:
        """A dial of ``target`` at ``address`` connected to ``device_id``. False if that is our
        own listener (remembered, never dialed again: the caller closes it)."""
        target.storage_only = not is_device and target.identity is None
        if target.storage_only:
            # Never at the moment it (re)connected, whatever the schedule says.
            first = now + DEVICE_PROBE_FIRST * self._redial_interval
            target.next_probe = max(target.next_probe, first)
        if device_id == self._device_id:
            # Our own listener (a shared config, an address of ours a peer announced).
            self._own.add(address)
            target.is_self = not [a for a in target.addrs if a not in self._own]
            return False
        target.device_id = device_id
        target.last_error = None  # failures reset once the connection proves stable
        health = target.health.setdefault(address, AddressHealth())
        health.failures, health.last_error, health.next_dial = 0, None, 0.0
        # Its connection event is still on its way to the actor: until then the loop would
        # see it unconnected and dial it again (a second handshake, replacing this one).
        target.next_dial = now + self._redial_interval
        return True

    def address_failed(self, target: Target, address: str, reason: str, *, now: float) -> bool:
        """A dial at one of the target's addresses failed. True if that was a LAN device
        that turned out to be another identity there (forgotten at that address, not a
        failure)."""
        if (
            target.source == "mdns"
            and target.device_id is not None
            and _DIFFERENT_IDENTITY in reason
        ):
            self._forget_foreign(target, address)
            return True
        health = target.health.setdefault(address, AddressHealth())
        health.failures += 1
        health.last_error = reason
        health.next_dial = now + self.backoff(health.failures, self.is_storage_target(target))
        return False

    def dial_failed(self, target: Target, last_error: str | None, *, now: float) -> float:
        """Every address of ``target`` failed this time: its backoff (returned) starts."""
        target.failures += 1
        if not self._device_ids:
            self._failed_alone += 1
        target.ended_early = False  # not reached this time: maybe our network, maybe its
        target.last_error = "no address" if last_error is None else last_error
        backoff = self.backoff(target.failures, self.is_storage_target(target))
        target.next_dial = now + backoff
        return backoff

    def probe_due(self, target: Target, now: float) -> bool:
        return now >= target.next_probe

    def probe_answered_ours(self, target: Target, device_id: bytes) -> None:
        """A device-mode dial after the probe reached one of our devices."""
        target.device_id = device_id
        target.storage_only, target.probes = False, 0

    def probe_answered_not_ours(self, target: Target, *, now: float) -> None:
        target.probes += 1
        first = DEVICE_PROBE_FIRST * self._redial_interval
        wait = min(DEVICE_PROBE_CEILING, first * 2.0 ** min(target.probes, 32))
        target.next_probe = now + wait

    def _forget_foreign(self, target: Target, address: str) -> None:
        """A device found on the LAN answered at ``address`` as another identity: ignore its
        mDNS finds at that address, and drop the target unless it has other addresses."""
        assert target.device_id is not None
        self._foreign[(target.device_id, address)] = None
        while len(self._foreign) > MAX_FOREIGN:
            del self._foreign[next(iter(self._foreign))]
        target.addrs = tuple(a for a in target.addrs if a != address)
        key = target.device_id.hex()
        if not target.addrs and self._targets.get(key) is target:
            self._targets.pop(key)

    def backoff(self, failures: int, storage: bool) -> float:
        # The exponent is capped: 2.0 ** 1024 overflows, and a bootstrap peer that is down for
        # an hour or two (over 1024 failed dials) crashed the actor until the node shut down.
        doubling = min(max(0, failures - 1), 32)
        limit, base = self._redial_interval, BACKOFF_BASE
        if storage:
            # Needed once a sync round: from the redial interval, not from a second. Each
            # storage peer that went away cost every device that used it a redial at 1, 2 and
            # 4 s before this; at 100 nodes with 30% churn, storage dials were more than half
            # of all refused dials.
            limit = max(limit, STORAGE_REDIAL_CEILING)
            base = max(base, self._redial_interval)
        ceiling = min(limit, base * 2.0**doubling)
        return ceiling * self._rng.uniform(1.0 - JITTER, 1.0)
