"""The dialer of a WebSocket connection pings at the WebSocket layer (`wire.websocket`): a quiet
link keeps traffic on the path (NAT mappings, idle proxies), and one whose pongs stop coming
is closed. Real sockets on loopback, with a TCP relay in the middle that counts the bytes and
can swallow the answers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import trio

from wire import ConnectionClosed, MessageStream
from wire.websocket import WebSocketNetwork


@dataclass
class _Relay:
    target_port: int
    towards_server: int = 0  # bytes the dialer sent
    answers_dropped: bool = False
    port: int = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._one, listeners)
            task_status.started()

    async def _one(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, server, True)
            nursery.start_soon(self._pump, server, client, False)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream, up: bool) -> None:
        try:
            while data := await source.receive_some(65536):
                if up:
                    self.towards_server += len(data)
                elif self.answers_dropped:
                    continue  # a path that swallows the server's frames (pongs included)
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _hold(stream: MessageStream) -> None:
    await trio.sleep_forever()  # a peer that has nothing to say


async def _through_relay(
    nursery: trio.Nursery, interval: float, pong_timeout: float
) -> tuple[_Relay, WebSocketNetwork, str]:
    server = WebSocketNetwork()
    address: str = await nursery.start(server.listen, "ws://127.0.0.1:0", _hold)
    relay = _Relay(int(address.rsplit(":", 1)[1]))
    await nursery.start(relay.serve)
    dialer = WebSocketNetwork(keepalive_interval=interval, pong_timeout=pong_timeout)
    return relay, dialer, f"ws://127.0.0.1:{relay.port}"


async def test_a_quiet_dialed_connection_is_pinged_and_stays_open() -> None:
    async with trio.open_nursery() as nursery:
        relay, dialer, address = await _through_relay(nursery, interval=0.2, pong_timeout=5.0)
        async with dialer.dial(address) as stream:
            upgraded = relay.towards_server
            await trio.sleep(1.1)
            # Five pings of at least 6 bytes each (2 header + 4 mask + payload), nothing else.
            assert relay.towards_server - upgraded >= 5 * 6
            await stream.send_message(b"\x00still open")  # the link is up
        nursery.cancel_scope.cancel()


async def test_a_connection_whose_pongs_stop_coming_is_closed() -> None:
    async with trio.open_nursery() as nursery:
        relay, dialer, address = await _through_relay(nursery, interval=0.2, pong_timeout=0.5)
        async with dialer.dial(address) as stream:
            relay.answers_dropped = True
            with trio.fail_after(5), pytest.raises(ConnectionClosed):
                await stream.receive_message()
        nursery.cancel_scope.cancel()
