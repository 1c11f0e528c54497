"""`Network` over WebSocket (trio-websocket). The only module that imports it.

One WebSocket binary message carries one Noise message, so WebSocket already
gives us framing; this adapter only maps names and errors:

- addresses are ``ws://host:port`` (``host:port`` is accepted when listening);
- the WebSocket message cap is `MAX_FRAME_SIZE`, so an oversize frame is refused
  by the WebSocket layer (close code 1009) before it is buffered;
- a text message is a protocol error (we only speak binary);
- every trio-websocket/OS failure becomes `ConnectionClosed` with the reason.

No TLS: Noise provides confidentiality and authentication end to end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
import trio_websocket

from wire._errors import ConnectionClosed, FrameError
from wire._framing import MAX_FRAME_SIZE
from wire._messages import CloseCode
from wire._network import ConnectionHandler, MessageStream

__all__ = ["DIAL_TIMEOUT", "WebSocketMessageStream", "WebSocketNetwork", "parse_ws_address"]

# TCP connect + HTTP upgrade on a LAN or the Internet takes well under a second;
# 10 s tolerates bad links without letting a dead address stall a dialer for long
# (trio-websocket's own default is 60 s).
DIAL_TIMEOUT = 10.0
# Time to wait for the peer's close handshake before dropping the TCP connection.
DISCONNECT_TIMEOUT = 5.0
# RFC 6455 5.5: control frame payload <= 125 bytes, minus the 2-byte close code.
_MAX_WS_CLOSE_REASON_BYTES = 123
# Bytes per socket read. trio-websocket's default (4 KiB) costs 16 reads per 64 KiB
# frame; one read per frame is measurably faster (see benchmarks/wire.py).
RECEIVE_BUFFER_BYTES = MAX_FRAME_SIZE + 16
# Messages trio-websocket queues before it stops reading the socket (backpressure).
MESSAGE_QUEUE_SIZE = 4


def parse_ws_address(address: str) -> tuple[str, int]:
    """``ws://host:port`` or ``host:port`` -> (host, port)."""
    url = urlsplit(address if "://" in address else f"ws://{address}")
    if url.scheme != "ws" or not url.hostname or url.port is None:
        raise ValueError(f"not a ws://host:port address: {address!r}")
    return url.hostname, url.port


def _dial_failure(error: BaseException) -> str:
    """Why a dial failed, in words. trio-websocket's ``HandshakeError`` has no message of its
    own and trio's "all attempts failed" hides each attempt's errno in its cause, so walk the
    causes (and the attempts) for the most specific reason: "Connection refused", a timeout."""
    reasons: list[str] = []
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            reasons.append(current.strerror)
        elif isinstance(current, trio_websocket.ConnectionTimeout):
            reasons.append("timed out")
        elif isinstance(current, trio_websocket.ConnectionRejected):
            reasons.append(f"the server refused the WebSocket upgrade ({current})")
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        if current.__cause__ is not None:
            pending.append(current.__cause__)
    if reasons:
        return "; ".join(dict.fromkeys(reasons))
    return str(error) or type(error).__name__


def _close_reason(reason: trio_websocket.CloseReason | None) -> str:
    if reason is None:
        return "connection closed"
    return f"connection closed ({reason.code} {reason.name}): {reason.reason or ''}".rstrip(": ")


class WebSocketMessageStream:
    """A `MessageStream` over one trio-websocket connection."""

    def __init__(self, connection: trio_websocket.WebSocketConnection) -> None:
        self._connection = connection
        remote = connection.remote
        self._remote_address = (
            f"ws://{remote.address}:{remote.port}"
            if isinstance(remote, trio_websocket.Endpoint)
            else str(remote)
        )

    @property
    def remote_address(self) -> str:
        return self._remote_address

    async def send_message(self, data: bytes) -> None:
        if len(data) > MAX_FRAME_SIZE:
            raise FrameError(f"frame of {len(data)} bytes exceeds {MAX_FRAME_SIZE}")
        try:
            await self._connection.send_message(data)
        except trio_websocket.ConnectionClosed as exc:
            raise ConnectionClosed(_close_reason(exc.reason)) from exc

    async def receive_message(self) -> bytes:
        try:
            message = await self._connection.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise ConnectionClosed(_close_reason(exc.reason)) from exc
        if isinstance(message, str):
            raise FrameError("text WebSocket message (only binary frames are allowed)")
        return message

    async def aclose(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        short = reason.encode("utf-8")[:_MAX_WS_CLOSE_REASON_BYTES].decode("utf-8", "ignore")
        # trio-websocket waits for the peer's close frame without a deadline, and that frame is
        # read by a task that may already be cancelled (node shutdown): callers close under a
        # shield, so without this bound the close would hang forever. The TCP stream is closed
        # either way.
        with trio.move_on_after(DISCONNECT_TIMEOUT):
            await self._connection.aclose(code, short)


class WebSocketNetwork:
    """Production `Network`: plain WebSocket on TCP, Noise inside."""

    def __init__(
        self,
        *,
        dial_timeout: float = DIAL_TIMEOUT,
        receive_buffer_bytes: int = RECEIVE_BUFFER_BYTES,
        message_queue_size: int = MESSAGE_QUEUE_SIZE,
    ) -> None:
        self._dial_timeout = dial_timeout
        self._receive_buffer_bytes = receive_buffer_bytes
        self._message_queue_size = message_queue_size

    async def listen(
        self,
        address: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        host, port = parse_ws_address(address)

        async def accept(request: trio_websocket.WebSocketRequest) -> None:
            try:
                connection = await request.accept()
            except trio_websocket.ConnectionClosed:
                return  # the dialer left during the HTTP upgrade
            stream = WebSocketMessageStream(connection)
            try:
                await handler(stream)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(DISCONNECT_TIMEOUT):
                    await stream.aclose()

        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: trio_websocket.serve_websocket(
                    accept,
                    host,
                    port,
                    ssl_context=None,
                    max_message_size=MAX_FRAME_SIZE,
                    receive_buffer_size=self._receive_buffer_bytes,
                    message_queue_size=self._message_queue_size,
                    connect_timeout=self._dial_timeout,
                    disconnect_timeout=DISCONNECT_TIMEOUT,
                    task_status=task_status,
                )
            )
            task_status.started(f"ws://{host}:{server.port}")

    @asynccontextmanager
    async def dial(self, address: str) -> AsyncIterator[MessageStream]:
        host, port = parse_ws_address(address)
        connected = False
        try:
            async with trio_websocket.open_websocket(
                host,
                port,
                "/",
                use_ssl=False,
                max_message_size=MAX_FRAME_SIZE,
                receive_buffer_size=self._receive_buffer_bytes,
                message_queue_size=self._message_queue_size,
                connect_timeout=self._dial_timeout,
                disconnect_timeout=DISCONNECT_TIMEOUT,
            ) as connection:
                connected = True
                yield WebSocketMessageStream(connection)
        except (OSError, trio_websocket.HandshakeError) as exc:
            if connected:
                raise
            raise ConnectionClosed(f"cannot connect to {address}: {_dial_failure(exc)}") from exc
