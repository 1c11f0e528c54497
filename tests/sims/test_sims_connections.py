"""Connections at the production intervals: a quiet link stays up between sync rounds."""

from __future__ import annotations

from sims import engine
from sims.__main__ import run_scenario


def test_storage_links_stay_open_between_sync_rounds_at_the_production_intervals() -> None:
    # One identity's two devices, three storage nodes, nothing but the periodic rounds: sync
    # 60 s (the keepers ask their storage peers for mail heads once a round) and redial 5 s.
    scenario = engine._replace(
        engine.load("steady"),
        identities=1,
        devices_per_identity=2,
        storage_nodes=3,
        minutes=12,
        sync_interval_s=60.0,
        redial_interval_s=5.0,
    )
    document = run_scenario(scenario, 3)
    assert document["converged"]
    opened = {round(s["t_min"]): s["connections_opened"] for s in document["samples"]}
    kinds = document["connections"]["opened_by_kind"]
    # Links: each device to its 3 storage peers, storage-1 and -2 to storage-0, dev1 to dev0.
    links = 2 * 3 + 2 + 1
    assert kinds["device_to_device"] == 1
    # From minute 6 to 12 a storage link opens at most one connection: the device-mode probe
    # of a storage-only peer (backing off to every 300 s). A stranger idle timeout shorter
    # than the sync interval closed every storage link before each round instead, and the
    # redial cost two handshakes (device mode refused, then storage mode).
    assert opened[12] - opened[6] <= links - 1
