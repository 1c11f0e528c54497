"""Fault scenarios at small scale: a lost device restored from the storage nodes, devices never
online together, and the engine's own checks (from what storage nodes and devices hold)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from actors._storage_tables import DuckStorageTables, MemoryStorageTables, StorageTables
from dmgn.memory import memory_id
from dmgn.shards import ShardKeys, ShardParams, encode_shards
from sims import checks, engine
from sims.__main__ import run_scenario


def test_a_device_that_lost_its_disk_is_restored_from_the_storage_nodes_and_converges() -> None:
    scenario = engine._replace(
        engine.load("lose_device"),
        identities=2,
        storage_nodes=4,
        minutes=4,
        faults=(engine.Fault("lose_device", at_min=1.5, until_min=2.5, fraction=0.5),),
    )
    document = run_scenario(scenario, 3)
    (restore,) = document["restores"]
    # Restored from the storage nodes alone (its seed only), before it met its own devices.
    assert restore["device"].endswith("-new")
    assert restore["gossip_with_own_devices"] == 0
    assert restore["storage_peers"] >= 3
    assert restore["wanted"] > 0
    assert restore["restored"] == restore["wanted"]
    assert restore["unrecoverable"] == 0
    assert document["restore_success"] == 1.0
    kinds = [e["kind"] for e in document["events"]]
    assert kinds.index("lose_device") < kinds.index("restore")
    # Then it converged with the others: every device of every identity holds the ops made.
    assert document["converged"]
    assert document["stores"]["holds_the_ops_made"]
    assert document["stores"]["devices"] == 6
    assert document["shards"]["every_memory_durable_or_reported_lost"]


def test_devices_never_online_together_converge_through_the_storage_nodes() -> None:
    scenario = engine._replace(
        engine.load("never_together"),
        identities=2,
        storage_nodes=4,
        minutes=5,
        adds_per_min=2.0,
        faults=(engine.Fault("never_together", at_min=0.5, until_min=5, period_min=1),),
    )
    document = run_scenario(scenario, 3)
    (apart,) = document["never_together"]
    assert apart["max_devices_of_an_identity_online_together"] == 1
    assert apart["device_to_device_messages"] == 0
    # Every op made two turns or more before the end reached every device while they were
    # apart: the only way was the storage nodes' mailbox (and shards).
    assert apart["ops_due"] > 5
    assert apart["ops_converged_apart"] == apart["ops_due"]
    assert document["converged"]
    assert document["stores"]["holds_the_ops_made"]


@pytest.mark.xfail(
    strict=True,
    reason="issue 32, open: with storage peers found by peer exchange (no hand-wiring), the "
    "restoring device asks only the storage peers it connected to; one memory whose shards "
    "sit on nodes outside that set is reported unrecoverable. Restore must ask the nodes "
    "likely to hold each shard (not yet built).",
)
def test_storage_nodes_restarted_from_their_disks_keep_and_serve_every_shard() -> None:
    # Every storage node stops at minute 1 and starts again from its disk at 1.5 (issue 30: a
    # storage node holding anything could not start again); at minute 3 a device that lost its
    # disk restores from them alone. Nothing is repaired meanwhile (a holder is replaced after
    # ten minutes away), so what was placed before minute 1 exists only on the restarted disks.
    scenario = engine.load("restart_storage")
    document = run_scenario(scenario, 4)
    restarts = document["storage_restarts"]
    assert sorted(r["node"] for r in restarts) == [f"storage-{i}" for i in range(4)]
    for restart in restarts:
        assert restart["held_after"] == restart["held_before"], restart
        assert restart["held_before"]["objects"] > 0 and restart["held_before"]["mail_items"] > 0
    kinds = [e["kind"] for e in document["events"]]
    assert kinds.index("restart_storage") < kinds.index("restart_storage_end")
    assert kinds.index("restart_storage_end") < kinds.index("restore")
    # Served after the restart: the new device rebuilt every live memory and its identity's
    # feed from the restarted nodes' shards and mailboxes.
    (restore,) = document["restores"]
    assert restore["gossip_with_own_devices"] == 0 and restore["storage_peers"] >= 3
    assert restore["wanted"] > 0 and restore["restored"] == restore["wanted"]
    assert restore["unrecoverable"] == 0
    assert document["converged"] and document["stores"]["holds_the_ops_made"]
    final = document["shards"]["final"]
    assert final["lost"] == 0 and final["durable"] == final["memories_placed"] > 0
    from_storage = document["shards"]["from_storage"]
    assert from_storage["durable"] == from_storage["memories"] > 0
    assert document["shards"]["every_memory_durable_or_reported_lost"]
    # New actors on old rows, and still one run per seed.
    again = run_scenario(scenario, 4)
    assert json.dumps(again, sort_keys=True) == json.dumps(document, sort_keys=True)


BACKENDS: dict[str, Callable[[], StorageTables]] = {
    "memory": MemoryStorageTables,
    "duckdb": lambda: DuckStorageTables(None),
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_the_durability_check_counts_verified_shards_on_storage_nodes(backend: str) -> None:
    def _tables_with(keys: ShardKeys, owner: bytes, shards: dict[bytes, bytes]) -> StorageTables:
        tables = BACKENDS[backend]()
        tables.put_objects(owner, list(shards), list(shards.values()), 0)
        return tables

    params = ShardParams(k=3, n=6)
    keys = ShardKeys(bytes(range(32)))
    envelope = b"an envelope" * 20
    mid = memory_id(envelope)
    shards = encode_shards(envelope, keys, params)
    ids = [keys.shard_id(mid, i) for i in range(6)]
    owner = b"o" * 32
    three = [_tables_with(keys, owner, {ids[i]: shards[i]}) for i in range(3)]
    check = checks.durability_from_storage(3, 6, {0: (keys, frozenset({mid}))}, three)
    assert (check.memories, check.durable, check.corrupt_shards) == (1, 1, 0)
    # One of the three holders flips a byte: two good shards, not durable, and found corrupt.
    bad = bytearray(shards[2])
    bad[0] ^= 1
    three[2] = _tables_with(keys, owner, {ids[2]: bytes(bad)})
    check = checks.durability_from_storage(3, 6, {0: (keys, frozenset({mid}))}, three)
    assert (check.durable, check.corrupt_shards) == (0, 1)
    assert check.short == {0: [mid]}
    assert not check.as_json(reported_lost=0, reported_unplaced=0)[
        "every_memory_durable_or_reported_lost"
    ]
    assert check.as_json(reported_lost=1, reported_unplaced=0)[
        "every_memory_durable_or_reported_lost"
    ]
    # Two shards of one memory on one node count once per index, not per node.
    doubled = [_tables_with(keys, owner, {ids[0]: shards[0], ids[1]: shards[1]})] * 2
    assert checks.durability_from_storage(3, 6, {0: (keys, frozenset({mid}))}, doubled).durable == 0


def test_the_store_check_finds_a_missing_and_a_resurrected_memory() -> None:
    same = checks.StoreView(frozenset({"a", "b"}), frozenset({"c"}), frozenset())
    assert checks.stores_agree({0: [same, same]}, {0: ["a", "b", "c"]}, {0: {"c"}})[
        "holds_the_ops_made"
    ]
    short = checks.StoreView(frozenset({"a"}), frozenset({"c"}), frozenset())
    report = checks.stores_agree({0: [same, short]}, {0: ["a", "b", "c"]}, {0: {"c"}})
    assert report["differing_identities"] == [0] and report["live_memories_missing"] == 1
    back = checks.StoreView(frozenset({"a", "b", "c"}), frozenset(), frozenset())
    report = checks.stores_agree({0: [back, back]}, {0: ["a", "b", "c"]}, {0: {"c"}})
    assert report["identical"] and report["deleted_memories_present"] == 2
    assert not report["holds_the_ops_made"]


def test_a_malicious_storage_node_is_rejected_and_restores_use_the_honest_shards() -> None:
    scenario = engine._replace(
        engine.load("malicious"),
        identities=2,
        storage_nodes=5,
        minutes=5,
        faults=(
            engine.Fault("malicious", at_min=1, until_min=4, fraction=0.2, period_min=1),
            engine.Fault("lose_device", at_min=2, until_min=3, fraction=0.5),
        ),
    )
    document = run_scenario(scenario, 3)
    m = document["malicious"]
    by_kind = m["attacks"]["by_kind"]
    for kind in ("garbage_frames", "forged_ops_wrong_identity", "forged_ops_bad_signature"):
        assert by_kind[kind]["sent"] >= 3
        assert by_kind[kind]["rejected"] == by_kind[kind]["sent"], kind
    # A flood of 12 sessions at once from one address: the ones beyond the limit are refused.
    assert by_kind["flood"]["rejected"] == by_kind["flood"]["sent"] >= 3
    assert 0 < by_kind["flood_sessions"]["rejected"] < by_kind["flood_sessions"]["sent"]
    assert m["every_attack_rejected"]
    # The honest side's own books: the stranger's gossip counted as violations, the corrupt
    # shards and forged mailbox items it served scored it down with the keepers.
    assert m["corrupt_objects_served"] > 0 and m["forged_mail_items_served"] > 0
    honest = m["honest_side"]
    assert honest["violations_recorded"] >= by_kind["forged_ops_wrong_identity"]["sent"]
    assert honest["keepers_scoring_bad_storage_down"] > 0
    assert honest["lowest_keeper_score_of_bad_storage"] < 0
    # Nothing forged was applied (a forged tombstone would have deleted a live memory), the
    # restore rebuilt everything from honest shards, and the honest shards alone suffice.
    assert document["converged"]
    assert document["stores"]["holds_the_ops_made"]
    (restore,) = document["restores"]
    assert restore["restored"] == restore["wanted"] > 0 and restore["unrecoverable"] == 0
    assert document["shards"]["from_storage"]["not_durable"] == 0
