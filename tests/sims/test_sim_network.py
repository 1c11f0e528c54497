"""The simulated network: latency in virtual time, partitions, counters."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sims.network import SimNetwork
from wire import ConnectionClosed, MessageStream


async def echo(stream: MessageStream) -> None:
    try:
        while True:
            await stream.send_message(await stream.receive_message())
    except ConnectionClosed:
        pass


async def test_latency_is_applied_each_way_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sim = SimNetwork(seed=1)
    sim.set_latency(0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.node("b").listen, "mem://b", echo)
        async with sim.node("a").dial("mem://b") as stream:
            start = trio.current_time()
            await stream.send_message(b"ping")
            assert await stream.receive_message() == b"ping"
            assert trio.current_time() - start == pytest.approx(0.10)
        nursery.cancel_scope.cancel()
    assert sim.stats[("a", "b")].messages == 1 and sim.stats[("b", "a")].bytes == 4


async def test_partition_cuts_links_and_refuses_dials_until_healed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sim = SimNetwork()
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.node("b").listen, "mem://b", echo)
        async with sim.node("a").dial("mem://b") as stream:
            sim.partition({"a"}, {"b"})
            with pytest.raises(ConnectionClosed):
                await stream.send_message(b"x")
                await stream.receive_message()
        with pytest.raises(ConnectionClosed, match="partition"):
            async with sim.node("a").dial("mem://b"):
                pass
        sim.heal()
        async with sim.node("a").dial("mem://b") as stream:
            await stream.send_message(b"back")
            assert await stream.receive_message() == b"back"
        nursery.cancel_scope.cancel()
