"""Redials back off, with jitter, when a node accepts the handshake and then refuses us (issue 12
item 2: the user's device redialed ~120 times a second while strangers filled the node)."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio
import trio.testing

from actors._dial_schedule import STORAGE_REDIAL_CEILING, DialSchedule
from actors.peering import PeeringState
from actors.runtime import Ok, call
from actors.transport import TransportLimits
from tests._harness import online_node
from wire import MemoryNetwork, MessageStream


class CountingNetwork(MemoryNetwork):
    """The memory network, counting dials per address."""

    def __init__(self) -> None:
        super().__init__()
        self.dials: dict[str, list[float]] = {}

    def dial(self, address: str) -> AbstractAsyncContextManager[MessageStream]:
        self.dials.setdefault(address, []).append(trio.current_time())
        return super().dial(address)


@asynccontextmanager
async def online(
    network: MemoryNetwork, name: str, bootstrap: tuple[str, ...], limits: TransportLimits
) -> AsyncIterator[object]:
    async with online_node(
        network,
        name,
        seed=os.urandom(32),
        peers=bootstrap,
        redial_interval=8.0,
        transport_limits=limits,
    ) as (_, net):
        yield net
        await net.close(timeout=1.0)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # Not zero: the store works in a worker thread, and virtual time must not run ahead of it.
    return trio.testing.MockClock(autojump_threshold=0.03)


async def test_a_node_that_refuses_us_after_the_handshake_is_redialed_with_backoff(
    clock: trio.testing.MockClock,
) -> None:
    network = CountingNetwork()
    refuses_strangers = TransportLimits(max_strangers_per_ip=0)
    async with (
        online(network, "full", (), refuses_strangers),
        online(network, "me", ("mem://full",), TransportLimits()) as me,
    ):
        await trio.sleep(600)
        # A bootstrap dial tries a device handshake, then a storage handshake (issue 20): two
        # connections at one instant are one dial.
        dials = sorted(set(network.dials["mem://full"]))
        # It answered in storage mode (another identity's node): backoff 1, 2, 4, ... 32, then
        # STORAGE_REDIAL_CEILING (60 s, times 0.5-1 jitter) over ten minutes: a dozen dials or
        # so, not one per handshake time, nor one per redial interval (8 s here).
        assert 8 <= len(dials) <= 25, len(dials)
        gaps = [later - earlier for earlier, later in itertools.pairwise(dials)]
        assert max(gaps[-3:]) <= STORAGE_REDIAL_CEILING + 1
        # At the cap, jittered down by at most half.
        assert min(gaps[-3:]) >= STORAGE_REDIAL_CEILING * 0.5 - 0.1
        assert len({round(gap, 3) for gap in gaps[-4:]}) > 1  # jitter: not in lockstep
        state = await call(me.peering, PeeringState)  # type: ignore[attr-defined]
        assert isinstance(state, Ok)
        (target,) = state.value.targets
        assert target.failures >= 4 and "connection ended after" in (target.last_error or "")


def schedule(redial_interval: float, seed: int) -> DialSchedule:
    return DialSchedule(
        identity=b"i" * 32,
        device_id=b"d" * 16,
        redial_interval=redial_interval,
        rng=random.Random(seed),
        score=lambda key: 50.0,
        neutral=50.0,
    )


def test_the_backoff_after_thousands_of_failed_dials_stays_at_the_redial_interval() -> None:
    # 2.0 ** 1024 overflowed: a sim's device offline for 20 virtual minutes (redial 1 s) crashed
    # its peering actor until the node shut down; a bootstrap peer down for ~1.5 h would too.
    node = schedule(5.0, seed=1)
    for failures in (1, 2, 10, 1024, 1025, 10**6):
        delay = node.backoff(failures, False)
        assert 0 < delay <= 5.0
        storage = node.backoff(failures, True)
        assert 0 < storage <= STORAGE_REDIAL_CEILING
    assert node.backoff(10**6, False) >= 5.0 * 0.5  # jitter takes at most half
    # A storage peer that keeps failing waits up to a sync round, our devices a redial interval.
    assert node.backoff(10**6, True) >= STORAGE_REDIAL_CEILING * 0.5


def test_storage_peers_are_first_redialed_after_a_redial_interval_devices_after_1s() -> None:
    # A storage peer is needed once a sync round: every device that used a storage node that
    # went away redialed it at 1, 2 and 4 s first (at 100 nodes with 30% churn, storage dials
    # were more than half of all refused dials). Our own devices keep the quick first redials.
    node = schedule(5.0, seed=1)
    for _ in range(50):
        own = node.backoff(1, False)
        assert 0.5 <= own <= 1.0
        first, second = (node.backoff(n, True) for n in (1, 2))
        assert 5.0 * 0.5 <= first <= 5.0
        assert 10.0 * 0.5 <= second <= 10.0
    # The first storage redial follows the redial interval (here 8 s, jittered by at most half).
    assert schedule(8.0, seed=2).backoff(1, True) >= 4.0


async def test_a_node_whose_every_dial_fails_probes_one_target_at_a_time_in_turn_backing_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No connection, and every target failed since: most likely we are the one offline. One
    dial at a time, in turn, instead of every target on its own backoff, further apart after
    each failure up to ALONE_PROBE_CEILING; the first connection makes the others due at
    once."""
    from actors import _dial_schedule as pr
    from actors import transport as tp
    from tests._peering import peering_under_test
    from wire import PeerIdentity

    redial = 5.0
    addresses = ("mem://a", "mem://b", "mem://c", "mem://d")
    peering, transport, found_send, events_send, _gossip = peering_under_test(
        os.urandom(32), redial_interval=redial, bootstrap=addresses, events_buffer=8
    )
    back_at = 300.0  # our network returns: b answers from then on
    dials: list[tuple[float, str]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(peering.run)
        with trio.fail_after(600):
            async for message in transport.receive:
                match message:
                    case tp.Dial() | tp.DialStorage():
                        now = trio.current_time()
                        dials.append((now, message.address))
                        if now >= back_at and message.address == "mem://b":
                            peer = PeerIdentity(os.urandom(32), os.urandom(16), os.urandom(32))
                            info = tp.PeerInfo(
                                peer, message.address, tp.Direction.OUTBOUND, now, False
                            )
                            message.reply.ok(info)
                            await events_send.send(tp.PeerUp(info))
                        else:
                            message.reply.err(
                                "connection refused: network unreachable", "dial_failed"
                            )
                        if now >= back_at + 4 * pr.ALONE_PROBE_CEILING + 30:
                            break
                    case _:
                        message.reply.err("not in this test", "unsupported")  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()
    found_send.close()
    # Every target is tried at the start, and each fails.
    assert {a for t, a in dials if t < 1} == set(addresses)
    offline = [(t, a) for t, a in dials if 60 <= t < back_at]
    # Alone: one dial at a time, at the ceiling's pace by now (each backoff alone would dial
    # the four every ~5 s; one probe a redial interval would be 48 dials).
    ceiling = pr.ALONE_PROBE_CEILING
    assert len(offline) <= (back_at - 60) / ceiling + 1
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(offline)]
    assert all(ceiling * 0.99 <= gap <= ceiling * 1.01 for gap in gaps)
    assert {a for _, a in offline} == set(addresses)  # in turn: whichever answers is found
    first_b = min(t for t, a in dials if a == "mem://b" and t >= back_at)
    assert first_b - back_at <= ceiling * len(addresses) + 1
    # Connected again: the other three are dialed at once, not at their next turn.
    others = {a for t, a in dials if first_b <= t <= first_b + 1 and a != "mem://b"}
    assert others == {"mem://a", "mem://c", "mem://d"}
