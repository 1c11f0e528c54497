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
    assert f"lag {metrics.device_label('ab' * 16)}" in text and "7 entries" in text
    assert "indexer 1" in text and "store 3" in text


def test_sync_lag_labels_do_not_carry_device_ids() -> None:
    # metrics_addr may face the LAN, where devices announce their ids: a label holding our
    # other device's id would tell any scraper which nodes are the same person's.
    device = "ab" * 16
    metrics = NodeMetrics(label_key=b"k" * 32)
    metrics.set_sync_lag({device: 7, "cd" * 16: 0})
    text = metrics.render().decode()
    labels = set(metrics.to_json()["dmgn_sync_lag_entries"])
    assert len(labels) == 2 and all(label.startswith("dev-") for label in labels)
    assert not any(device[:8] in label for label in labels) and device not in text
    # Stable while the node runs (a time series), different under another node's key.
    assert metrics.device_label(device) == NodeMetrics(label_key=b"k" * 32).device_label(device)
    assert metrics.device_label(device) != NodeMetrics().device_label(device)
    metrics.set_sync_lag({device: 3})
    assert metrics.to_json()["dmgn_sync_lag_entries"] == {metrics.device_label(device): 3}
