"""The dial scheduler's rules, fed events and the time: no trio, no sockets, no clock.

Each test drives :class:`actors._dial_schedule.DialSchedule` as the peering actor does (plan,
dial results, connections up and down) and checks who is dialed when.
"""

from __future__ import annotations

import itertools
import random

import pytest

from actors import _dial_schedule as ds
from actors._dial_schedule import DialSchedule, Target

ME, OTHER = b"m" * 32, b"o" * 32


def device(n: int) -> bytes:
    return bytes([n]) * 16


def schedule(
    bootstrap: tuple[str, ...] = (), scores: dict[str, float] | None = None
) -> DialSchedule:
    table = scores if scores is not None else {}
    return DialSchedule(
        identity=ME,
        device_id=device(0),
        redial_interval=5.0,
        rng=random.Random(7),
        score=lambda key: table.get(key, 50.0),
        neutral=50.0,
        bootstrap=bootstrap,
    )


def fail(plan: DialSchedule, target: Target, now: float) -> float:
    """Every address of ``target`` refused at ``now``; returns the target's next try."""
    for address in plan.dial_order(target, now):
        plan.address_failed(target, address, "connection refused", now=now)
    plan.dial_failed(target, "connection refused", now=now)
    plan.dial_done(target)
    return target.next_dial


def addresses(dials: tuple[Target, ...]) -> list[str]:
    return [t.addrs[0] for t in dials]


def test_a_failing_target_waits_out_its_backoff_and_the_loop_sleeps_until_then() -> None:
    plan = schedule(("ws://a",))
    plan.connection_up(device(9), None, now=0.0)  # not alone: no probe of its own
    (target,) = plan.plan(0.0).dials
    next_try = fail(plan, target, 0.0)
    assert 0.5 <= next_try <= 1.0  # 1 s, less at most half of jitter
    idle = plan.plan(0.1)
    assert idle.dials == () and idle.wake_at == next_try
    assert addresses(plan.plan(next_try).dials) == ["ws://a"]


def test_a_found_peer_under_the_dial_floor_is_held_back_and_looked_at_again() -> None:
    scores: dict[str, float] = {device(1).hex(): ds.DIAL_FLOOR - 1}
    plan = schedule(scores=scores)
    plan.connection_up(device(9), None, now=0.0)
    plan.found(("ws://b",), "dht", device(1), ME, None, now=0.0, wall_now=0.0)
    held = plan.plan(0.0)
    assert held.dials == () and held.wake_at == ds.DIAL_RECHECK
    scores[device(1).hex()] = ds.DIAL_FLOOR + 1  # its record decayed above the floor
    assert addresses(plan.plan(held.wake_at).dials) == ["ws://b"]


def test_a_bootstrap_peer_is_dialed_whatever_its_score() -> None:
    scores: dict[str, float] = {}
    plan = schedule(("ws://a",), scores)
    (target,) = plan.plan(0.0).dials
    assert plan.dialed(target, "ws://a", device(1), True, now=0.0)
    plan.dial_done(target)
    plan.connection_up(device(1), None, now=0.0)
    plan.connection_down(device(1), lived=100.0, reason="bye", now=100.0)
    scores[device(1).hex()] = 0.0  # a violator now
    assert addresses(plan.plan(200.0).dials) == ["ws://a"]


def test_alone_and_failing_everywhere_it_probes_one_target_at_a_time_further_apart() -> None:
    plan = schedule(tuple(f"ws://{n}" for n in "abc"))
    now = 0.0
    for target in plan.plan(now).dials:  # all three, at once
        fail(plan, target, now)
    starts = []
    while now < 300:
        step = plan.plan(now)
        assert len(step.dials) <= 1  # one probe at a time
        for target in step.dials:
            starts.append(now)
            fail(plan, target, now)
        if not step.dials:  # (a dial's end wakes the loop at once: it looks again then)
            assert step.wake_at > now
            now = step.wake_at
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert starts[0] == pytest.approx(5.0)  # a redial interval after they all failed
    assert gaps[0] == pytest.approx(10.0)  # then twice that after the probe failed
    assert max(gaps) == pytest.approx(ds.ALONE_PROBE_CEILING)  # then up to the ceiling
    assert gaps == sorted(gaps)  # never closer again while it fails


def test_the_first_connection_makes_every_backed_off_target_due_again() -> None:
    plan = schedule(("ws://a", "ws://b"))
    for target in plan.plan(0.0).dials:
        fail(plan, target, 0.0)
    assert all(t.next_dial > 0.0 for t in plan.targets())
    assert plan.connection_up(device(9), None, now=0.2)  # the loop must look again now
    assert sorted(addresses(plan.plan(0.2).dials)) == ["ws://a", "ws://b"]


def test_a_connection_that_ends_early_counts_as_a_failure_a_stable_one_does_not() -> None:
    plan = schedule(("ws://a",))
    (target,) = plan.plan(0.0).dials
    plan.dialed(target, "ws://a", device(1), True, now=0.0)
    plan.dial_done(target)
    plan.connection_up(device(1), None, now=0.0)
    plan.connection_down(device(1), lived=2.0, reason="full", now=2.0)
    assert target.failures == 1 and target.ended_early
    assert target.next_dial > 2.0 and "connection ended after 2.0s: full" in str(target.last_error)
    plan.connection_up(device(1), None, now=10.0)
    plan.connection_down(device(1), lived=ds.STABLE_CONNECTION, reason="bye", now=40.0)
    assert target.failures == 0 and not target.ended_early


def test_at_most_the_parallel_cap_is_dialed_at_once_best_reputed_first() -> None:
    count = ds.MAX_PARALLEL_DIALS + 2
    scores = {device(n).hex(): 30.0 + n for n in range(1, count + 1)}
    plan = schedule(scores=scores)
    plan.connection_up(device(99), None, now=0.0)
    for n in range(1, count + 1):
        plan.found((f"ws://{n}",), "dht", device(n), ME, None, now=0.0, wall_now=0.0)
    first = plan.plan(0.0).dials
    assert addresses(first) == [f"ws://{n}" for n in range(count, 2, -1)]
    assert fail(plan, first[0], 0.0) > 0.0
    assert plan.dial_done(first[0]) is None  # capped: the loop looks again at once
    assert addresses(plan.plan(0.0).dials) == ["ws://2"]


def test_a_found_peer_is_forgotten_after_its_ttl_or_its_record_expiry() -> None:
    plan = schedule()
    plan.connection_up(device(99), None, now=0.0)
    plan.found(("ws://x",), "dht", device(1), ME, None, now=0.0, wall_now=0.0)
    plan.found(("ws://y",), "dht", device(2), ME, 1000.0 + 60, now=0.0, wall_now=1000.0)
    assert plan.plan(0.0).wake_at == 60.0  # the record's expiry comes first
    assert [t.addrs for t in plan.targets()] == [("ws://x",), ("ws://y",)]
    plan.plan(60.0)
    assert [t.addrs for t in plan.targets()] == [("ws://x",)]
    plan.plan(ds.FOUND_PEER_TTL)
    assert list(plan.targets()) == []


def test_a_lan_device_of_another_identity_is_ignored_at_that_address_from_then_on() -> None:
    plan = schedule()
    plan.connection_up(device(99), None, now=0.0)
    assert plan.found(("ws://lan",), "mdns", device(3), None, None, now=0.0, wall_now=0.0)
    (target,) = plan.plan(0.0).dials
    assert target.identity == ME  # dialed only as one of our devices
    refused = "the peer is a different identity than expected"
    assert plan.address_failed(target, "ws://lan", refused, now=0.0)
    assert target.failures == 0  # not a failure to back off from: a stranger
    assert list(plan.targets()) == []
    assert not plan.found(("ws://lan",), "mdns", device(3), None, None, now=1.0, wall_now=1.0)
    # The same device id announced at another address is still ours to try.
    assert plan.found(("ws://elsewhere",), "mdns", device(3), None, None, now=1.0, wall_now=1.0)


def test_dialing_our_own_listener_is_remembered_and_never_dialed_again() -> None:
    plan = schedule(("ws://me",))
    (target,) = plan.plan(0.0).dials
    assert not plan.dialed(target, "ws://me", device(0), True, now=0.0)
    plan.dial_done(target)
    assert target.is_self and plan.own("ws://me")
    assert plan.plan(1000.0).dials == ()


def test_a_node_we_dial_is_ours_to_choose_whichever_side_connected_a_stranger_is_not() -> None:
    plan = schedule(("ws://boot",))
    (boot,) = plan.plan(0.0).dials
    assert not plan.dials(device(5), OTHER)  # not reached yet: who is there is unknown
    plan.dialed(boot, "ws://boot", device(5), False, now=0.0)
    assert plan.dials(device(5), OTHER)  # the node at our bootstrap address
    plan.found(("ws://dht",), "dht", device(6), OTHER, None, now=0.0, wall_now=0.0)
    assert plan.dials(device(6), OTHER)  # found with that key in a verified record
    assert not plan.dials(device(6), b"x" * 32)  # the same device id under another key
    # A LAN announcement names only a device id: a stranger claiming it is not chosen.
    plan.found(("ws://lan",), "mdns", device(7), None, None, now=0.0, wall_now=0.0)
    assert not plan.dials(device(7), OTHER)
    assert not plan.dials(device(8), OTHER)  # never heard of
