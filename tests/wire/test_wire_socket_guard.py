"""The WebSocket listener counts its sockets from accept on (issue 12 item 6), on loopback."""

from __future__ import annotations

import trio

from tests._harness import eventually
from wire import ConnectionClosed, MessageStream
from wire.websocket import WebSocketNetwork, socket_budget


async def _echo(stream: MessageStream) -> None:
    try:
        while True:
            await stream.send_message(await stream.receive_message())
    except ConnectionClosed:
        return


async def _silent_tcp(port: int, source: str, sockets: list[trio.socket.SocketType]) -> None:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    sockets.append(sock)  # connected, never speaks HTTP


async def test_a_silent_tcp_flood_never_takes_more_than_the_socket_budget_and_a_peer_gets_in() -> (
    None
):
    network = WebSocketNetwork(
        max_sockets=16, max_upgrading=8, max_upgrading_per_ip=4, upgrade_timeout=1.0
    )
    flood: list[trio.socket.SocketType] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(network.listen, "ws://127.0.0.1:0", _echo)
            port = int(address.rsplit(":", 1)[1])
            most = 0
            for _ in range(6):  # 6 rounds x 10 addresses x 1 connection = 60 silent sockets
                for host in range(10):
                    await _silent_tcp(port, f"127.0.0.{10 + host}", flood)
                await trio.sleep(0.05)
                most = max(most, network.guard.open)
            assert most <= 16
            assert network.guard.evicted > 0
            # An honest peer dials during the flood: it evicts an upgrading socket, not waits.
            async with WebSocketNetwork().dial(address) as stream:
                await stream.send_message(b"still here")
                assert await stream.receive_message() == b"still here"
            assert network.guard.open <= 16
            for sock in flood:
                sock.close()
            await eventually(lambda: network.guard.open == 0)
            nursery.cancel_scope.cancel()


async def test_one_address_cannot_hold_more_than_its_share_of_upgrading_sockets() -> None:
    network = WebSocketNetwork(max_sockets=64, max_upgrading=32, max_upgrading_per_ip=4)
    flood: list[trio.socket.SocketType] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(network.listen, "ws://127.0.0.1:0", _echo)
            port = int(address.rsplit(":", 1)[1])
            for _ in range(12):
                await _silent_tcp(port, "127.0.0.9", flood)
            await eventually(lambda: network.guard.refused >= 8)
            assert network.guard.upgrading == 4
            for sock in flood:
                sock.close()
            nursery.cancel_scope.cancel()


def test_socket_budget_keeps_a_reserve_of_descriptors_below_the_process_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    budget = socket_budget(max_sockets=10**6, reserve=128)
    assert budget == max(16, soft - 128) or soft == resource.RLIM_INFINITY
    assert socket_budget(max_sockets=20, reserve=128) <= 20


def test_new_connections_from_one_address_are_paced_after_a_burst() -> None:
    from wire.websocket import CONNECTIONS_PER_IP_BURST, CONNECTIONS_PER_IP_RATE, SocketGuard

    guard = SocketGuard(64)
    admitted = [guard.admit("192.0.2.7", now=0.0) for _ in range(CONNECTIONS_PER_IP_BURST + 3)]
    assert sum(slot is not None for slot in admitted) == CONNECTIONS_PER_IP_BURST
    assert guard.paced == 3
    assert guard.admit("192.0.2.8", now=0.0) is not None  # another address has its own burst
    assert guard.admit("192.0.2.7", now=1 / CONNECTIONS_PER_IP_RATE) is not None  # refilled
    assert all(guard.admit("127.0.0.1", now=0.0) is not None for _ in range(6))  # not paced


async def test_a_server_that_closes_the_socket_at_once_fails_the_dial_at_once() -> None:
    """A full node closes a refused connection straight away (the guard above). trio-websocket's
    client upgrade does not notice a closed socket, so the dialer used to wait out its whole
    dial timeout (10 s by default) for every such node; it now fails when the socket ends."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def close_at_once(stream: trio.SocketStream) -> None:
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, close_at_once, listeners)
        network = WebSocketNetwork(dial_timeout=60)
        with trio.fail_after(20):  # well under the dial timeout; generous for a loaded machine
            try:
                async with network.dial(f"ws://127.0.0.1:{port}"):
                    raise AssertionError("a server that closed the socket cannot be connected")
            except ConnectionClosed as refused:
                assert "closed the connection during the upgrade" in str(refused)
        nursery.cancel_scope.cancel()
