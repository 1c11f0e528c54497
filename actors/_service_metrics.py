"""The gauges ``dmgn status`` and ``GET /metrics`` read that mirror other actors' state.

A private helper of :mod:`actors.service` (it reads the store's figures, so it sits between
the service and the leaf actors). Counters are bumped where things happen (adds, deletes,
synced ops, query time); these gauges are filled here instead, from the figures the service
gathers for status just before anything reads them (docs/metrics.md).
"""

from __future__ import annotations

from typing import Any

from actors import store as st
from dmgn.metrics import NodeMetrics

__all__ = ["refresh_metrics"]


def refresh_metrics(
    metrics: NodeMetrics,
    stats: st.StoreStats,
    network: dict[str, Any],
    inbox_depths: list[tuple[str, int]],
) -> None:
    """Set the gauges from the store's ``stats``, the online half's ``network`` section of
    status (empty while offline) and each actor's inbox depth."""
    metrics.memories.set(stats.memories)
    metrics.links.set(stats.links)
    metrics.tombstones.set(stats.tombstones)
    metrics.store_bytes.set(stats.file_bytes)
    metrics.peers.set(network.get("peers", 0))
    devices = network.get("sync", {}).get("devices", [])
    metrics.set_sync_lag(
        {d["device_id"]: d["ahead_of_us"] for d in devices if d.get("ahead_of_us") is not None}
    )
    metrics.set_inbox_depths(inbox_depths)
    storage = network.get("storage")
    if storage is not None:
        metrics.storage_held.set(storage["bytes_held"])
    durability = network.get("durability")
    if durability is not None:
        metrics.shard_durability.set(durability["durable_fraction"])
