"""Peer reputation: one bounded score per peer, from what this node has seen it do.

Evidence, each kept as a count that decays with a half-life of :data:`HALF_LIFE` (a week), so a
peer is judged on its recent behaviour and old sins (or merits) fade:

* **uptime** - seconds connected (a peer that stays is worth dialing);
* **latency** - an average of the ask → answer time of sync exchanges;
* **sync** - exchanges answered vs. connections that ended with a question unanswered;
* **audits** - shard audits passed vs. failed (the shard keeper's findings);
* **violations** - protocol violations (malformed messages, bad signatures, floods: whatever
  made gossip cut the peer off).

The score is 0-100, :data:`NEUTRAL` (50) for a peer never seen: up to +20 for uptime, -20..+20
for sync, up to -10 for latency, up to +5 for passed audits and -25 per failed one, -35 per
violation (see :meth:`PeerRecord.score`). One violation or one failed audit puts a peer below
every honest one; the shard keeper places nothing on a peer under 40, the peering actor does not
dial a found peer under 25.

Bounded: at most :data:`MAX_DEVICES` of our own devices and :data:`MAX_STRANGERS` other peers;
beyond that the stranger seen least recently (and not connected) is forgotten, so ten thousand
identities minted to flood the table cost us a bounded amount of memory and disk. Kept across
restarts in ``peers/reputation.json`` (0600; a damaged file is started afresh, since it is only
our judgement, not data).
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dmgn.paths import write_private

NEUTRAL = 50.0
#: Evidence halves every week: a peer that misbehaved a month ago has mostly been forgiven; one
#: that misbehaved today has not.
HALF_LIFE = 7 * 86400.0
#: Our own devices: a person has a handful; the cap only guards against a bug.
MAX_DEVICES = 256
#: Other identities' nodes (storage peers): far more than the dozens a node talks to, small
#: enough that the table stays a few hundred KiB on disk.
MAX_STRANGERS = 1024
#: Uptime that earns most of its bonus (the bonus approaches +20 over a few of these).
UPTIME_SCALE = 6 * 3600.0
#: Latency that costs the full latency penalty.
SLOW_MS = 1000.0
FILE_VERSION = 1


@dataclass
class PeerRecord:
    is_device: bool
    uptime_s: float = 0.0
    latency_ms: float | None = None
    sync_ok: float = 0.0
    sync_failed: float = 0.0
    audits_ok: float = 0.0
    audits_failed: float = 0.0
    violations: float = 0.0
    last_reason: str | None = None
    updated_at: float = 0.0  # wall clock of the last decay
    last_seen: float = 0.0

    def decay(self, now: float) -> None:
        if self.updated_at and now > self.updated_at:
            factor = 0.5 ** ((now - self.updated_at) / HALF_LIFE)
            self.uptime_s *= factor
            self.sync_ok *= factor
            self.sync_failed *= factor
            self.audits_ok *= factor
            self.audits_failed *= factor
            self.violations *= factor
        self.updated_at = max(self.updated_at, now)

    def score(self) -> float:
        uptime = 20.0 * (1.0 - math.exp(-self.uptime_s / UPTIME_SCALE))
        sync = 40.0 * ((self.sync_ok + 1.0) / (self.sync_ok + self.sync_failed + 2.0) - 0.5)
        latency = -10.0 * min(1.0, (self.latency_ms or 0.0) / SLOW_MS)
        audits = min(5.0, 0.5 * self.audits_ok) - 25.0 * self.audits_failed
        violations = -35.0 * self.violations
        return max(0.0, min(100.0, NEUTRAL + uptime + sync + latency + audits + violations))


@dataclass
class Reputation:
    """The table (not thread-safe: owned by one actor, the peering actor)."""

    #: ``time.time`` as it is when the table is made (not when this module was imported: the
    #: sims make it virtual for a run).
    clock: Callable[[], float] = field(default_factory=lambda: time.time)
    max_devices: int = MAX_DEVICES
    max_strangers: int = MAX_STRANGERS
    _devices: OrderedDict[str, PeerRecord] = field(default_factory=OrderedDict)
    _strangers: OrderedDict[str, PeerRecord] = field(default_factory=OrderedDict)
    _connected: dict[str, float] = field(default_factory=dict)  # key → connected since
    dirty: bool = False

    def __len__(self) -> int:
        return len(self._devices) + len(self._strangers)

    def _record(self, key: str, is_device: bool) -> PeerRecord:
        table = self._devices if is_device else self._strangers
        record = table.get(key)
        now = self.clock()
        if record is None:
            record = table[key] = PeerRecord(is_device, updated_at=now)
            self._prune(table, self.max_devices if is_device else self.max_strangers)
        table.move_to_end(key)
        record.decay(now)
        record.last_seen = now
        self.dirty = True
        return record

    def _prune(self, table: OrderedDict[str, PeerRecord], limit: int) -> None:
        # Least recently seen first; a connected peer is never forgotten while connected.
        for key in list(table):
            if len(table) <= limit:
                return
            if key not in self._connected:
                del table[key]

    # -- evidence -------------------------------------------------------------------------------

    def connected(self, key: str, is_device: bool) -> None:
        self._record(key, is_device)
        self._connected[key] = self.clock()

    def disconnected(self, key: str, is_device: bool, *, question_open: bool = False) -> None:
        since = self._connected.pop(key, None)
        record = self._record(key, is_device)
        if since is not None:
            record.uptime_s += max(0.0, self.clock() - since)
        if question_open:
            record.sync_failed += 1

    def answered(self, key: str, is_device: bool, latency_ms: float) -> None:
        """A sync question answered (in ``latency_ms``)."""
        record = self._record(key, is_device)
        record.sync_ok += 1
        previous = record.latency_ms
        record.latency_ms = latency_ms if previous is None else 0.8 * previous + 0.2 * latency_ms

    def audited(self, key: str, *, passed: int = 0, failed: int = 0) -> None:
        record = self._record(key, False)
        record.audits_ok += passed
        record.audits_failed += failed
        if failed:
            record.last_reason = f"failed {failed} shard audit(s)"

    def violated(self, key: str, is_device: bool, reason: str) -> None:
        record = self._record(key, is_device)
        record.violations += 1
        record.last_reason = reason

    # -- reading --------------------------------------------------------------------------------

    def score(self, key: str) -> float:
        record = self._devices.get(key) or self._strangers.get(key)
        if record is None:
            return NEUTRAL
        if key in self._connected:  # the current connection counts as uptime too
            live = replace(record)  # a copy (asdict's deep copy cost ~1% of a sim's CPU)
            live.uptime_s += max(0.0, self.clock() - self._connected[key])
            live.decay(self.clock())
            return round(live.score(), 1)
        record.decay(self.clock())
        return round(record.score(), 1)

    def rows(self) -> dict[str, dict[str, Any]]:
        out = {}
        for table in (self._devices, self._strangers):
            for key, record in table.items():
                out[key] = {
                    "score": self.score(key),
                    "uptime_s": round(record.uptime_s, 1),
                    "latency_ms": None
                    if record.latency_ms is None
                    else round(record.latency_ms, 1),
                    "sync_ok": round(record.sync_ok, 2),
                    "sync_failed": round(record.sync_failed, 2),
                    "audits_ok": round(record.audits_ok, 2),
                    "audits_failed": round(record.audits_failed, 2),
                    "violations": round(record.violations, 2),
                    "last_reason": record.last_reason,
                }
        return out

    # -- persistence ----------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        document = {
            "version": FILE_VERSION,
            "peers": {
                key: asdict(record)
                for table in (self._devices, self._strangers)
                for key, record in table.items()
            },
        }
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(path, json.dumps(document, separators=(",", ":")).encode())
        self.dirty = False

    @classmethod
    def load(cls, path: Path, **options: Any) -> tuple[Reputation, str | None]:
        """The table from ``path`` (empty if absent); a damaged file gives an empty table and
        a sentence saying why."""
        table = cls(**options)
        if not path.exists():
            return table, None
        try:
            document = json.loads(path.read_text())
            if document.get("version") != FILE_VERSION:
                raise ValueError(f"version {document.get('version')!r}")
            records = sorted(
                ((str(k), PeerRecord(**v)) for k, v in document["peers"].items()),
                key=lambda item: item[1].last_seen,
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            return table, f"{path} is unreadable ({error}); peer scores start afresh"
        for key, record in records:
            target = table._devices if record.is_device else table._strangers
            target[key] = record
        table._prune(table._devices, table.max_devices)
        table._prune(table._strangers, table.max_strangers)
        return table, None
