"""SecureConnection over the Network implementations: memory, byte streams, WebSocket."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
import trio_websocket

from wire import (
    BASE_REGISTRY,
    HANDSHAKE_TIMEOUT,
    Bytes,
    ConnectionClosed,
    DecryptError,
    DeviceCredentials,
    FrameError,
    IdentityError,
    MemoryNetwork,
    Message,
    MessageStream,
    MessageType,
    Network,
    SecureConnection,
    StreamMessageStream,
    secure_connection,
)
from wire._framing import MAX_WS_MESSAGE_SIZE
from wire.testing import TestIdentity, new_device
from wire.websocket import WebSocketMessageStream, WebSocketNetwork

BLOB = MessageType("test.blob", {"data": Bytes(1 << 20)})
REGISTRY = BASE_REGISTRY.extended(BLOB)


async def _echo_server(
    network: Network,
    address: str,
    credentials: DeviceCredentials,
    nursery: trio.Nursery,
    on_error: Callable[[BaseException], None] | None = None,
) -> str:
    """Listen at ``address``; echo every message back. Returns the bound address."""

    async def handle(stream: MessageStream) -> None:
        try:
            connection = await secure_connection(
                stream, credentials, initiator=False, registry=REGISTRY
            )
            while True:
                await connection.send(await connection.receive())
        except ConnectionClosed:
            pass
        except Exception as error:
            if on_error is None:
                raise
            on_error(error)

    bound: str = await nursery.start(network.listen, address, handle)
    return bound


async def _dial(
    network: Network,
    address: str,
    credentials: DeviceCredentials,
    body: Callable[[SecureConnection], Awaitable[None]],
    expected_identity: bytes | None = None,
) -> None:
    async with network.dial(address) as stream:
        connection = await secure_connection(
            stream,
            credentials,
            initiator=True,
            registry=REGISTRY,
            expected_identity=expected_identity,
        )
        await body(connection)


async def test_memory_network_carries_authenticated_messages() -> None:
    network = MemoryNetwork()
    alice = TestIdentity.generate()
    server = alice.new_device()
    async with trio.open_nursery() as nursery:
        address = await _echo_server(network, "mem://server", server, nursery)

        async def body(connection: SecureConnection) -> None:
            assert connection.peer.identity_public_key == alice.public_key
            assert connection.peer.device_id == server.certificate.device_id
            for size in (0, 10, 200_000):
                await connection.send(BLOB(data=b"z" * size))
                echoed = await connection.receive()
                assert echoed.get_bytes("data") == b"z" * size
            await connection.ping()  # answered inside the server's receive(), never echoed
            await connection.send(BLOB(data=b"after ping"))
            assert (await connection.receive()).get_bytes("data") == b"after ping"
            await connection.aclose()

        await _dial(network, address, new_device(), body, expected_identity=alice.public_key)
        nursery.cancel_scope.cancel()


async def test_close_reason_reaches_the_peer() -> None:
    network = MemoryNetwork()
    server_creds = new_device()
    received: list[str] = []

    async def handle(stream: MessageStream) -> None:
        connection = await secure_connection(stream, server_creds, initiator=False)
        with pytest.raises(ConnectionClosed) as closed:
            await connection.receive()
        received.append(str(closed.value))

    async with trio.open_nursery() as nursery:
        await nursery.start(network.listen, "mem://s", handle)

        async def body(connection: SecureConnection) -> None:
            await connection.aclose(1001, "laptop going to sleep")

        await _dial(network, "mem://s", new_device(), body)
        nursery.cancel_scope.cancel()
    assert received == ["peer closed (1001): laptop going to sleep"]


async def _never_called(connection: SecureConnection) -> None:
    raise AssertionError("the body must not run for an unauthenticated peer")


async def test_dialing_the_wrong_identity_fails_and_tells_the_listener() -> None:
    network = MemoryNetwork()
    listener_errors: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        await _echo_server(
            network, "mem://s", new_device(), nursery, on_error=listener_errors.append
        )
        with pytest.raises(IdentityError):
            await _dial(
                network,
                "mem://s",
                new_device(),
                _never_called,
                expected_identity=TestIdentity.generate().public_key,
            )
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert listener_errors == []  # the listener saw a plain close, not a crash


async def test_handshake_times_out_when_the_peer_is_silent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    listener_outcome: list[str] = []

    async def silent(stream: MessageStream) -> None:
        with pytest.raises(ConnectionClosed) as closed:
            await stream.receive_message()  # reads message 1, never answers
            await stream.receive_message()
        listener_outcome.append(str(closed.value))

    async with trio.open_nursery() as nursery:
        await nursery.start(network.listen, "mem://silent", silent)
        start = trio.current_time()
        async with network.dial("mem://silent") as stream:
            with pytest.raises(ConnectionClosed, match="did not finish within 10s"):
                await secure_connection(stream, new_device(), initiator=True)
        assert trio.current_time() - start == pytest.approx(HANDSHAKE_TIMEOUT)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert listener_outcome and "4000" in listener_outcome[0]


async def test_listener_drops_a_dialer_that_never_starts_the_handshake(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    outcome: list[BaseException] = []

    async def handle(stream: MessageStream) -> None:
        try:
            await secure_connection(stream, new_device(), initiator=False, handshake_timeout=3)
        except ConnectionClosed as closed:
            outcome.append(closed)

    async with trio.open_nursery() as nursery:
        await nursery.start(network.listen, "mem://s", handle)
        async with network.dial("mem://s") as stream:
            with pytest.raises(ConnectionClosed, match="4000"):
                await stream.receive_message()
        nursery.cancel_scope.cancel()
    assert len(outcome) == 1 and "within 3s" in str(outcome[0])


async def test_tampered_frame_closes_the_connection_with_a_reason() -> None:
    network = MemoryNetwork()
    errors: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        await _echo_server(network, "mem://s", new_device(), nursery, on_error=errors.append)
        async with network.dial("mem://s") as stream:
            await secure_connection(stream, new_device(), initiator=True, registry=REGISTRY)
            await stream.send_message(b"\x00" * 40)  # not a valid transport message
            with pytest.raises(ConnectionClosed, match="1002"):
                await stream.receive_message()
        nursery.cancel_scope.cancel()
    assert len(errors) == 1 and isinstance(errors[0], DecryptError)


async def test_dialing_nowhere_is_connection_closed() -> None:
    with pytest.raises(ConnectionClosed, match="refused"):
        async with MemoryNetwork().dial("mem://nobody"):
            pass


async def test_secure_connection_over_a_byte_stream() -> None:
    left, right = trio.testing.memory_stream_pair()
    a_creds, b_creds = new_device(), new_device()
    results: list[Message] = []

    async def responder() -> None:
        connection = await secure_connection(
            StreamMessageStream(right), b_creds, initiator=False, registry=REGISTRY
        )
        results.append(await connection.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder)
        connection = await secure_connection(
            StreamMessageStream(left), a_creds, initiator=True, registry=REGISTRY
        )
        await connection.send(BLOB(data=b"x" * 150_000))
    assert results[0].get_bytes("data") == b"x" * 150_000


async def test_websocket_loopback_end_to_end() -> None:
    network = WebSocketNetwork()
    bob = TestIdentity.generate()
    async with trio.open_nursery() as nursery:
        address = await _echo_server(network, "ws://127.0.0.1:0", bob.new_device(), nursery)
        assert address.startswith("ws://127.0.0.1:") and not address.endswith(":0")

        async def body(connection: SecureConnection) -> None:
            assert connection.peer.identity_public_key == bob.public_key
            await connection.send(BLOB(data=b"y" * 300_000))
            assert (await connection.receive()).get_bytes("data") == b"y" * 300_000
            await connection.aclose()

        await _dial(network, address, new_device(), body, expected_identity=bob.public_key)
        nursery.cancel_scope.cancel()


async def test_websocket_refuses_oversize_and_text_frames() -> None:
    network = WebSocketNetwork()
    seen: list[BaseException] = []

    async def handle(stream: MessageStream) -> None:
        try:
            await stream.receive_message()
        except (FrameError, ConnectionClosed) as error:
            seen.append(error)

    async with trio.open_nursery() as nursery:
        address: str = await nursery.start(network.listen, "ws://127.0.0.1:0", handle)
        host, port = address.removeprefix("ws://").split(":")
        async with trio_websocket.open_websocket(host, int(port), "/", use_ssl=False) as ws:
            await ws.send_message(bytes(MAX_WS_MESSAGE_SIZE + 1))
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason is not None
            assert closed.value.reason.code == 1009
        async with trio_websocket.open_websocket(host, int(port), "/", use_ssl=False) as ws:
            await ws.send_message("text is not allowed")
            with pytest.raises(trio_websocket.ConnectionClosed):
                await ws.get_message()
        nursery.cancel_scope.cancel()
    assert isinstance(seen[0], ConnectionClosed) and "1009" in str(seen[0])
    assert isinstance(seen[1], FrameError)


async def test_a_64_kib_message_costs_one_websocket_message() -> None:
    network = WebSocketNetwork()
    bob = TestIdentity.generate()
    async with trio.open_nursery() as nursery:
        address = await _echo_server(network, "ws://127.0.0.1:0", bob.new_device(), nursery)
        async with network.dial(address) as stream:
            assert isinstance(stream, WebSocketMessageStream)
            connection = await secure_connection(
                stream, new_device(), initiator=True, registry=REGISTRY
            )
            for size, ws_messages in ((100, 1), (64 * 1024, 1), (200_000, 2)):
                before = (stream.ws_messages_sent, stream.ws_messages_received)
                await connection.send(BLOB(data=b"q" * size))
                assert (await connection.receive()).get_bytes("data") == b"q" * size
                after = (stream.ws_messages_sent, stream.ws_messages_received)
                assert after[0] - before[0] == ws_messages == after[1] - before[1], size
            await connection.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # empty
        b"\x00",  # a truncated length
        b"\x00\x00",  # a zero-length frame
        b"\x00\x05abc",  # runs past the end
        b"\x00\x01a\x00\x01b\x00\x01c",  # three frames: more than allowed
        b"\x00\x01a\x00",  # trailing bytes
    ],
)
async def test_malformed_websocket_messages_are_refused(payload: bytes) -> None:
    network = WebSocketNetwork()
    seen: list[BaseException] = []
    refused = trio.Event()

    async def handle(stream: MessageStream) -> None:
        try:
            await stream.receive_message()
        except (FrameError, ConnectionClosed) as error:
            seen.append(error)
        refused.set()

    async with trio.open_nursery() as nursery:
        address: str = await nursery.start(network.listen, "ws://127.0.0.1:0", handle)
        host, port = address.removeprefix("ws://").split(":")
        async with trio_websocket.open_websocket(host, int(port), "/", use_ssl=False) as ws:
            await ws.send_message(payload)
            with trio.fail_after(30):
                await refused.wait()
        nursery.cancel_scope.cancel()
    assert isinstance(seen[0], FrameError), seen


async def test_websocket_dial_to_a_closed_port_is_connection_closed() -> None:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionClosed, match="cannot connect"):
        async with WebSocketNetwork().dial(f"ws://127.0.0.1:{port}"):
            pass
