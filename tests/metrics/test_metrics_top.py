"""`dmgn top`'s view of the metrics registry."""

from __future__ import annotations

from rich.console import Console

from dmgn.app.top import quantile, top_table
from dmgn.metrics import NodeMetrics


def test_top_shows_rates_latency_quantiles_lag_and_restarts() -> None:
    metrics = NodeMetrics()
    metrics.added(30)
    for seconds in (0.002, 0.002, 0.002, 0.2):
        metrics.query_seconds.observe(seconds)
    metrics.set_sync_lag({"ab" * 16: 7})
    metrics.restarts.labels("indexer").inc()
    metrics.inbox_depth.labels("store").set(3)
    snapshot = metrics.to_json()
    assert quantile(snapshot["dmgn_query_seconds"], 0.5) == 0.0025
    assert quantile(snapshot["dmgn_query_seconds"], 0.95) == 0.25
    out = Console(record=True, width=100)
    out.print(top_table({"metrics": snapshot, "device_id": "cd" * 16, "mode": "daemon"}))
    text = out.export_text()
    assert "0.5/s (total 30)" in text
    assert "p50 ≤ 2.5 ms" in text and "p95 ≤ 250 ms" in text
    assert "lag abababababab" in text and "7 entries" in text
    assert "indexer 1" in text and "store 3" in text
