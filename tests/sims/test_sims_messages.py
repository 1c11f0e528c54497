"""Messages per op: gossip payload counted apart from anti-entropy and every wire frame."""

from __future__ import annotations

from sims import engine
from sims.__main__ import run_scenario


def test_gossip_payload_per_op_is_counted_apart_and_within_two_per_device() -> None:
    scenario = engine._replace(
        engine.load("steady"), identities=2, devices_per_identity=3, storage_nodes=2, minutes=3
    )
    document = run_scenario(scenario, 3)
    g = document["gossip"]
    ops = document["ops"]["total"]
    assert document["converged"] and ops > 0
    by_type = g["device_messages_by_type"]
    # Each op reached the other devices as gossip.ops messages, counted by type ...
    assert by_type["gossip.ops"] > 0 and g["messages_per_op"] == round(
        by_type["gossip.ops"] / ops, 2
    )
    # ... and no more of them than the goal (flooding would be d x (d - 1) per op).
    assert g["messages_per_op"] <= g["limit_messages_per_op"] == 2 * 3
    assert g["flooding_messages_per_op"] == 3 * 2
    # Anti-entropy (vector exchanges, wants) is its own figure, and every wire frame between
    # the devices (Noise, keepalives too) is at least all of those messages together.
    assert g["anti_entropy_messages_per_op"] > 0
    assert g["wire_messages_per_op"] >= g["messages_per_op"] + g["anti_entropy_messages_per_op"]
    assert "gossip.ops" in g["counts"]
