"""`dmgn top`: a live view of a node's metrics (the registry of docs/metrics.md), with rich."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def quantile(histogram: dict[str, Any], q: float) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` (what Prometheus'
    ``histogram_quantile`` approximates); None without observations."""
    count = histogram.get("count", 0)
    if not count:
        return None
    for bound, cumulative in histogram["buckets"].items():
        if cumulative >= q * count:
            return float("inf") if bound == "+Inf" else float(bound)
    return None


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return "> 10 s" if seconds == float("inf") else f"≤ {seconds * 1000:g} ms"


def top_table(status: dict[str, Any]) -> Table:
    m = status["metrics"]
    table = Table(title=f"dmgn {status.get('mode', '')} {status['device_id'][:12]}", box=None)
    table.add_column("metric", style="bold")
    table.add_column("value", overflow="fold")
    queries = m["dmgn_query_seconds"]
    rows: list[tuple[str, str]] = [
        (
            "memories",
            f"{m['dmgn_memories']:g} ({m['dmgn_links']:g} links, {m['dmgn_tombstones']:g} deleted)",
        ),
        ("adds", f"{m['adds_per_s']:g}/s (total {m['dmgn_memories_added_total']:g})"),
        (
            "queries",
            f"{queries['count']:g}; p50 {_ms(quantile(queries, 0.5))}, "
            f"p95 {_ms(quantile(queries, 0.95))}",
        ),
        ("store", f"{m['dmgn_store_bytes'] / 1e6:.1f} MB"),
        ("peers", f"{m['dmgn_peers_connected']:g} connected"),
        ("synced ops", f"{m['dmgn_sync_ops_applied_total']:g}"),
    ]
    lag = m.get("dmgn_sync_lag_entries") or {}
    if isinstance(lag, dict):
        rows += [
            (f"  lag {device[:12]}", f"{entries:g} entries") for device, entries in lag.items()
        ]
    restarts = m.get("dmgn_actor_restarts_total") or {}
    if isinstance(restarts, dict) and restarts:
        rows.append(("restarts", ", ".join(f"{a} {n:g}" for a, n in sorted(restarts.items()))))
    depths = m.get("dmgn_inbox_depth") or {}
    if isinstance(depths, dict):
        busy = {a: n for a, n in depths.items() if n}
        rows.append(
            ("inboxes", ", ".join(f"{a} {n:g}" for a, n in sorted(busy.items())) or "empty")
        )
    rows += [
        ("shards held", f"{m['dmgn_storage_held_bytes'] / 1e6:.1f} MB"),
        ("durability", f"{m['dmgn_shard_durability']:.0%}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table
