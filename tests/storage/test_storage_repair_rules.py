"""The shard keeper's repair and durability rules (actors/_keeper_health.py), fed without trio."""

from __future__ import annotations

from actors._keeper_health import RepairPlan, durability, plan_repair

A, B, C, D, E, F = (bytes([i]) * 48 for i in range(6))
#: 3-of-6 coding: repair below k + 2 = 5 live shards.
K, N, BELOW = 3, 6, 5


def plan(
    placements: dict[str, dict[int, bytes]],
    live: set[bytes],
    *,
    down_since: dict[bytes, float] | None = None,
    busy: frozenset[str] = frozenset(),
) -> RepairPlan:
    return plan_repair(
        placements,
        live=live,
        down_since=down_since or {},
        now=1000.0,
        down_grace=600.0,
        busy=busy,
        n=N,
        repair_below=BELOW,
    )


def test_a_complete_memory_on_live_peers_needs_nothing() -> None:
    result = plan({"m": dict(enumerate([A, B, C, D, E, F]))}, {A, B, C, D, E, F})
    assert (result.drop, result.needy, result.gone) == ([], set(), set())


def test_a_briefly_absent_holder_keeps_its_shard_while_enough_are_live() -> None:
    result = plan({"m": dict(enumerate([A, B, C, D, E, F]))}, {A, B, C, D, E})
    assert (result.drop, result.needy) == ([], set())  # it may be back within the grace


def test_a_holder_gone_past_the_grace_loses_its_shards_and_is_forgotten() -> None:
    result = plan(
        {"m": dict(enumerate([A, B, C, D, E, F]))},
        {A, B, C, D, E},
        down_since={F: 100.0},
    )
    assert result.drop == [("m", 5)]
    assert result.gone == {F}


def test_under_k_plus_two_live_every_absent_shard_is_dropped_for_placement_anew() -> None:
    result = plan({"m": dict(enumerate([A, B, C, D, E, F]))}, {A, B, C, D})
    assert result.drop == [("m", 4), ("m", 5)]
    assert result.needy == {"m"}


def test_memories_being_dispersed_or_forgotten_are_left_alone() -> None:
    result = plan({"m": {0: A}}, {A}, busy=frozenset({"m"}))
    assert (result.drop, result.needy) == ([], set())


def test_durability_counts_live_shards_and_waiting_memories() -> None:
    placements = {
        "whole": dict(enumerate([A, B, C, D, E, F])),
        "durable": dict(enumerate([A, B, C, D, E, F])),
        "lost": {0: A, 1: F},
        "gone": {0: A},
    }
    counts = durability(
        placements,
        live={A, B, C, D, E},
        forgotten={"gone"},
        waiting={"new", "lost"},
        k=K,
        n=N,
        repair_below=BELOW,
        storage_peers=5,
        mailbox_items=0,
        peer_scores={},
        repair_bytes=0,
    )
    assert (counts.memories, counts.complete, counts.durable, counts.lost) == (3, 0, 2, 1)
    assert counts.at_risk == 1 and counts.unplaced == 2
    assert counts.durable_fraction == 2 / 4  # three placed, one never placed
