"""The node's metrics: one registry per node, in Prometheus' model (``prometheus-client``).

One registry per node, not the library's global one, so simulations and tests can run many
nodes in one process without their numbers mixing. Whoever produces a number holds the
:class:`NodeMetrics` and updates it (the service counts adds and times queries, the supervisor
counts restarts); gauges that mirror another actor's state (store counts, inbox depths, peers,
sync lag) are filled by :meth:`NodeMetrics.refresh`'s caller just before they are read, so a
scrape always sees current values without anyone polling.

Served two ways: the Prometheus text format on ``metrics_addr`` (``actors/metrics_http.py``) and
a JSON form in ``dmgn status --json`` (:meth:`NodeMetrics.to_json`). The names are documented in
docs/metrics.md; a test scrapes every one of them and checks it moves.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric

#: Query latency buckets (seconds): a local hybrid search takes milliseconds; a fan-out to
#: other devices is bounded by ``query_timeout`` (2 s default).
QUERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: The window over which ``adds_per_s`` in status is averaged.
RATE_WINDOW_SECONDS = 60.0
#: Add times kept for that rate: a bound on memory whatever the add rate (beyond this many adds
#: per window, the rate is reported from the newest ones).
RATE_SAMPLES = 10_000
#: Bytes of keyed hash in a device's label (8 hex digits): unique among a person's handful of
#: devices (a clash between two needs ~65k of them), short enough to read on a dashboard.
DEVICE_LABEL_BYTES = 4


class AddRate:
    """Adds per second over the last :data:`RATE_WINDOW_SECONDS` (bounded samples)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._times: deque[float] = deque(maxlen=RATE_SAMPLES)

    def record(self, count: int = 1) -> None:
        now = self._clock()
        self._times.extend([now] * count)

    def per_second(self) -> float:
        now = self._clock()
        while self._times and now - self._times[0] > RATE_WINDOW_SECONDS:
            self._times.popleft()
        if len(self._times) == RATE_SAMPLES:  # more adds than samples: the newest ones' span
            return len(self._times) / max(now - self._times[0], 1e-3)
        return len(self._times) / RATE_WINDOW_SECONDS


class NodeMetrics:
    """The registry and its metrics.

    Another device appears in a label (``dmgn_sync_lag_entries{device=...}``) as
    :meth:`device_label`, a keyed hash of its id, never the id itself: ``metrics_addr`` may be
    reachable on the LAN, where devices announce their ids (mDNS), so ids in labels would tell
    anyone scraping one node which other nodes are the same person's (issue 30). The key is
    drawn at each start (``label_key`` for tests), so a label cannot be matched to an id, nor
    across this node's restarts or between two of our nodes; it is stable while the node runs,
    which is what a time series needs.
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, *, label_key: bytes | None = None
    ) -> None:
        self._label_key = label_key if label_key is not None else os.urandom(32)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.memories = Gauge("dmgn_memories", "Live memories in the store.", registry=r)
        self.links = Gauge("dmgn_links", "Links between memories in the store.", registry=r)
        self.tombstones = Gauge("dmgn_tombstones", "Deleted memory ids kept.", registry=r)
        self.store_bytes = Gauge("dmgn_store_bytes", "Size of the store file.", registry=r)
        self.adds = Counter(
            "dmgn_memories_added", "Memories added on this node (local adds).", registry=r
        )
        self.deletes = Counter(
            "dmgn_memories_deleted",
            "Memories deleted on this node, by whom.",
            ["reason"],  # "user" (a delete request) or "retention"
            registry=r,
        )
        self.synced_ops = Counter(
            "dmgn_sync_ops_applied", "Ops from other devices that changed the store.", registry=r
        )
        self.query_seconds = Histogram(
            "dmgn_query_seconds", "Query latency.", buckets=QUERY_BUCKETS, registry=r
        )
        self.peers = Gauge("dmgn_peers_connected", "Connected peers.", registry=r)
        self.sync_lag = Gauge(
            "dmgn_sync_lag_entries",
            "Feed entries a connected device has that this node lacks.",
            ["device"],
            registry=r,
        )
        self.restarts = Counter(
            "dmgn_actor_restarts", "Actor crashes followed by a restart.", ["actor"], registry=r
        )
        self.inbox_depth = Gauge(
            "dmgn_inbox_depth", "Messages waiting in an actor's inbox.", ["actor"], registry=r
        )
        self.storage_held = Gauge(
            "dmgn_storage_held_bytes",
            "Bytes of other identities' shards this node holds (set by the shard keeper).",
            registry=r,
        )
        self.shard_durability = Gauge(
            "dmgn_shard_durability",
            "Fraction of this identity's memories with enough live shards to rebuild (set by "
            "the shard keeper).",
            registry=r,
        )
        self.add_rate = AddRate(clock)
        self._known_devices: set[str] = set()

    # -- producers ------------------------------------------------------------------------------

    def added(self, count: int = 1) -> None:
        self.adds.inc(count)
        self.add_rate.record(count)

    def device_label(self, device_id: str) -> str:
        """What a device is called in labels: ``dev-`` and a keyed hash of its id."""
        digest = hashlib.blake2b(
            device_id.encode(), key=self._label_key, digest_size=DEVICE_LABEL_BYTES
        )
        return "dev-" + digest.hexdigest()

    def set_sync_lag(self, lag: dict[str, int]) -> None:
        """Lag per device id; devices no longer reported are dropped (bounded label set)."""
        labelled = {self.device_label(device): entries for device, entries in lag.items()}
        for label in self._known_devices - set(labelled):
            self.sync_lag.remove(label)
        for label, entries in labelled.items():
            self.sync_lag.labels(label).set(entries)
        self._known_devices = set(labelled)

    def set_inbox_depths(self, depths: Iterable[tuple[str, int]]) -> None:
        for actor, depth in depths:
            self.inbox_depth.labels(actor).set(depth)

    # -- readers --------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition format."""
        return generate_latest(self.registry)

    def to_json(self) -> dict[str, Any]:
        """Every metric by name: a number, a map of label value → number, or for a histogram
        its count, sum and cumulative buckets."""
        out: dict[str, Any] = {"adds_per_s": round(self.add_rate.per_second(), 3)}
        for metric in self.registry.collect():
            out[_json_name(metric)] = _json_value(metric)
        return out


def _json_name(metric: Metric) -> str:
    return metric.name + ("_total" if metric.type == "counter" else "")


def _json_value(metric: Metric) -> Any:
    if metric.type == "histogram":
        by_name = {s.name: s.value for s in metric.samples if not s.labels}
        return {
            "count": by_name.get(metric.name + "_count", 0.0),
            "sum": by_name.get(metric.name + "_sum", 0.0),
            "buckets": {
                s.labels["le"]: s.value for s in metric.samples if s.name.endswith("_bucket")
            },
        }
    samples = [s for s in metric.samples if not s.name.endswith("_created")]
    if any(s.labels for s in samples):
        return {"/".join(s.labels.values()): s.value for s in samples}
    return samples[0].value if samples else 0
