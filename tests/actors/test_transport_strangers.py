"""What strangers can hold on a node, and that our own devices always get in (issue 12, 2-3).

Strangers are other identities; identities cost nothing, so these tests make many. Per-address
limits are tested over real WebSocket on loopback, each stranger leaving from its own 127.0.0.x
address (all of 127/8 is loopback on Linux); the rest runs on the memory network.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import trio
import trio.testing

from actors.runtime import Err, Ok, call
from actors.transport import (
    Dial,
    ListPeers,
    PeerDown,
    PeerInfo,
    PeerUp,
    TransportActor,
    TransportEvent,
    TransportLimits,
)
from tests._harness import eventually
from wire import (
    MAX_CHUNK_PAYLOAD,
    ConnectionClosed,
    DeviceCredentials,
    MemoryNetwork,
    Network,
)
from wire.testing import TestIdentity, open_raw_channel, unfinished_message_frames
from wire.websocket import WebSocketNetwork


@dataclass
class Node:
    actor: TransportActor
    credentials: DeviceCredentials
    events: trio.MemoryReceiveChannel[TransportEvent]

    @property
    def identity(self) -> bytes:
        return self.credentials.certificate.identity_public_key

    async def peers(self) -> tuple[PeerInfo, ...]:
        result = await call(self.actor.address, ListPeers)
        assert isinstance(result, Ok)
        return result.value


@asynccontextmanager
async def node(
    network: Network,
    address: str | None,
    limits: TransportLimits | None = None,
    credentials: DeviceCredentials | None = None,
) -> AsyncIterator[Node]:
    credentials = credentials or TestIdentity.generate().new_device()
    send, receive = trio.open_memory_channel[TransportEvent](256)
    actor = TransportActor(network, credentials, send, listen_addr=address, limits=limits)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        yield Node(actor, credentials, receive)
        nursery.cancel_scope.cancel()


async def _drain(events: trio.MemoryReceiveChannel[TransportEvent]) -> None:
    async for _ in events:
        pass


async def test_own_device_gets_in_while_strangers_hold_every_slot_they_may() -> None:
    limits = TransportLimits(max_connections=8, max_strangers_per_ip=2)  # 6 stranger slots
    me = TestIdentity.generate()
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            home = await stack.enter_async_context(
                node(WebSocketNetwork(), "ws://127.0.0.1:0", limits, me.new_device())
            )
            address = home.actor.bound_address
            assert address is not None
            strangers = []
            # Five addresses, two strangers each would take 10 slots; only 6 are theirs.
            for host in range(2, 7):
                for _ in range(2):
                    stranger = await stack.enter_async_context(
                        node(WebSocketNetwork(source_address=f"127.0.0.{host}"), None)
                    )
                    strangers.append(stranger)
                    await call(stranger.actor.address, Dial, address, None, None)
            # A third from an address that already has two is refused. Home closes its
            # socket at once, but the dialer only gives up at its dial timeout (10 s by
            # default: the suite waited that long here), so this one waits 2 s.
            extra = await stack.enter_async_context(
                node(WebSocketNetwork(source_address="127.0.0.2", dial_timeout=2.0), None)
            )
            refused = await call(extra.actor.address, Dial, address, None, None)
            assert isinstance(refused, Err), refused
            device = await stack.enter_async_context(
                node(WebSocketNetwork(), None, credentials=me.new_device())
            )
            async with trio.open_nursery() as nursery:
                for stranger in [*strangers, extra]:
                    nursery.start_soon(_drain, stranger.events)

                async def six() -> bool:
                    return len(await home.peers()) >= 6

                await eventually(six)
                await trio.testing.wait_all_tasks_blocked(0.2)
                held = await home.peers()
                assert len(held) == 6
                per_host: dict[str, int] = {}
                for info in held:
                    host = info.address.split("//")[1].split(":")[0]
                    per_host[host] = per_host.get(host, 0) + 1
                assert max(per_host.values()) <= 2
                # Our second device, from the same machine as everyone else, still gets in.
                home_device = home.credentials.certificate.device_id
                result = await call(device.actor.address, Dial, address, me.public_key, home_device)
                assert isinstance(result, Ok), result

                async def device_in() -> bool:
                    held = await home.peers()
                    return any(p.peer.identity_public_key == me.public_key for p in held)

                await eventually(device_in)
                assert len(await home.peers()) == 7
                nursery.cancel_scope.cancel()


async def test_own_device_evicts_the_idlest_stranger_when_the_node_is_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    me = TestIdentity.generate()
    limits = TransportLimits(max_connections=3, reserved_device_slots=0)
    async with AsyncExitStack() as stack:
        home = await stack.enter_async_context(node(network, "mem://home", limits, me.new_device()))
        strangers = [await stack.enter_async_context(node(network, None)) for _ in range(3)]
        for stranger in strangers:
            dialed = await call(stranger.actor.address, Dial, "mem://home", None, None)
            assert isinstance(dialed, Ok)
            await trio.sleep(1)  # the first is the idlest
        await trio.testing.wait_all_tasks_blocked()
        assert len(await home.peers()) == 3
        device = await stack.enter_async_context(node(network, None, credentials=me.new_device()))
        result = await call(device.actor.address, Dial, "mem://home", me.public_key, None)
        assert isinstance(result, Ok), result
        await trio.testing.wait_all_tasks_blocked()
        held = {p.peer.identity_public_key for p in await home.peers()}
        assert me.public_key in held and len(held) == 3
        assert strangers[0].identity not in held
        up = await strangers[0].events.receive()
        down = await strangers[0].events.receive()
        assert isinstance(up, PeerUp) and isinstance(down, PeerDown)
        assert "own device" in down.reason


async def _park_partial(network: MemoryNetwork, size: int) -> str:
    """A stranger that starts a message of ``size`` bytes and never finishes it; returns why
    the node closed the connection (or "open" if it is still open at cancellation)."""
    credentials = TestIdentity.generate().new_device()
    async with network.dial("mem://home") as stream:
        channel = await open_raw_channel(stream, credentials)
        try:
            for frame in unfinished_message_frames(channel, size):
                await stream.send_message(frame)
            while True:
                await stream.receive_message()  # pings, until the node closes
        except ConnectionClosed as closed:
            return str(closed)


async def test_stranger_partial_messages_are_capped_per_peer_in_total_and_in_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    chunks = 14  # 917 KB: under the per-stranger cap
    limits = TransportLimits(
        stranger_max_message_size=1024 * 1024,
        stranger_partial_timeout=20,
        stranger_reassembly_budget=3 * chunks * MAX_CHUNK_PAYLOAD,
    )
    async with node(network, "mem://home", limits) as home:
        reasons: list[str] = []

        async def park(size: int) -> None:
            reasons.append(await _park_partial(network, size))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, home.events)
            # Too big for a stranger at all: closed as soon as it crosses the cap.
            await park(2 * limits.stranger_max_message_size)
            assert f"{limits.stranger_max_message_size}-byte cap" in reasons[-1]
            # Three fit the shared budget, the fourth does not.
            for _ in range(3):
                nursery.start_soon(park, chunks * MAX_CHUNK_PAYLOAD)
                await trio.testing.wait_all_tasks_blocked()
            assert home.actor.reassembly_bytes == (3 * chunks * MAX_CHUNK_PAYLOAD, 0)
            await park(chunks * MAX_CHUNK_PAYLOAD)
            assert "unfinished messages on this node" in reasons[-1]
            assert home.actor.reassembly_bytes[0] <= limits.stranger_reassembly_budget
            # The three that hold theirs are closed within 1.5 x the partial timeout.
            start = trio.current_time()
            await eventually(lambda: len(reasons) >= 5, deadline=60)
            assert trio.current_time() - start <= 1.5 * limits.stranger_partial_timeout
            assert all("not completed within" in reason for reason in reasons[2:]), reasons
            assert home.actor.reassembly_bytes == (0, 0)
            nursery.cancel_scope.cancel()


async def test_what_strangers_send_is_read_no_faster_than_their_shared_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    rate = 1024 * 1024
    limits = TransportLimits(
        stranger_bytes_per_second=rate,
        stranger_burst_bytes=rate,
        stranger_max_message_size=16 * 1024 * 1024,
        stranger_reassembly_budget=16 * 1024 * 1024,
        stranger_partial_timeout=120,
    )
    size = 5 * rate
    async with node(network, "mem://home", limits) as home, trio.open_nursery() as nursery:
        nursery.start_soon(_drain, home.events)
        for _ in range(2):  # two strangers share the rate
            nursery.start_soon(_park_partial, network, size // 2)
        start = trio.current_time()
        await eventually(lambda: home.actor.reassembly_bytes[0] >= size - MAX_CHUNK_PAYLOAD * 2)
        elapsed = trio.current_time() - start
        # 5 MiB at 1 MiB/s after a 1 MiB burst: at least 4 s, and not much more.
        assert 3.5 <= elapsed <= 6, elapsed
        nursery.cancel_scope.cancel()
