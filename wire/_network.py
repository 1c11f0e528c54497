"""The `Network` interface, and the in-memory implementation used by tests and sims.

httpx-style: code above this layer (the transport actor) is written against
`Network`, and the same code runs over WebSocket in production
(`wire.websocket.WebSocketNetwork`) and over memory channels in simulation
(`MemoryNetwork`). A connection is a `MessageStream`: ordered, reliable,
message-oriented (one message = one transport frame), closable with a code
and a reason.

Structured concurrency shapes the API: `Network.listen` runs until cancelled
and reports its bound address through ``task_status``; each accepted stream is
handed to a handler running in the listener's nursery and is closed when the
handler returns. `Network.dial` is an async context manager, so a dialed
connection (and any background task it needs) cannot outlive its block.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import trio

from wire._errors import ConnectionClosed, FrameError
from wire._framing import MAX_FRAME_SIZE, LengthPrefixDecoder, length_prefixed
from wire._messages import CloseCode

__all__ = [
    "MEMORY_BUFFER_FRAMES",
    "ConnectionHandler",
    "MemoryMessageStream",
    "MemoryNetwork",
    "MessageStream",
    "Network",
    "StreamMessageStream",
    "memory_stream_pair",
]

# Frames in flight per direction on a memory link before the sender blocks; small,
# like a socket buffer, so backpressure in sims behaves like it does on TCP.
MEMORY_BUFFER_FRAMES = 16
# Bytes read from a byte stream per receive call: one max-size frame plus its prefix.
_STREAM_READ_BYTES = MAX_FRAME_SIZE + 2


class MessageStream(Protocol):
    """One connection: ordered, reliable delivery of binary messages."""

    @property
    def remote_address(self) -> str: ...

    async def send_message(self, data: bytes) -> None:
        """Send one message; raises `ConnectionClosed` if the connection is gone."""

    async def send_messages(self, data: list[bytes]) -> None:
        """Send several messages in order (a secure channel's frames of one application
        message); a medium that can carry several in one unit of its own does (WebSocket,
        see `wire._framing`). Raises like `send_message`."""

    async def receive_message(self) -> bytes | memoryview:
        """Next message (a view where the medium can avoid a copy); raises
        `ConnectionClosed` (with the peer's reason) at the end."""

    async def aclose(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close, telling the peer why when the medium allows it. Idempotent."""


ConnectionHandler = Callable[[MessageStream], Awaitable[None]]


class Network(Protocol):
    """Where connections come from: WebSocket in production, memory in sims."""

    async def listen(
        self,
        address: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections at ``address`` until cancelled.

        ``task_status.started(bound_address)`` reports the address peers can dial
        (with the real port when ``address`` asked for port 0).
        """

    def dial(self, address: str) -> AbstractAsyncContextManager[MessageStream]:
        """Connect to ``address``; raises `ConnectionClosed` if nobody answers."""
        ...


class MemoryLink:
    """Shared close state of one memory connection, so each side learns the other's reason
    (also the sims' links, `sims.network`)."""

    __slots__ = ("close_code", "close_reason")

    def __init__(self) -> None:
        self.close_code: int | None = None
        self.close_reason = ""

    def close(self, code: int, reason: str) -> None:
        """Record why the connection closed; the first side to close decides."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason

    def closed_error(self) -> ConnectionClosed:
        """What either side's next send or receive raises once the connection is closed."""
        if self.close_code is None:
            return ConnectionClosed("connection closed")
        return ConnectionClosed(
            f"connection closed ({self.close_code}): {self.close_reason}", self.close_code
        )


class MemoryMessageStream:
    """One end of an in-memory connection (two bounded memory channels)."""

    def __init__(
        self,
        send: trio.MemorySendChannel[bytes],
        receive: trio.MemoryReceiveChannel[bytes],
        link: MemoryLink,
        remote_address: str,
    ) -> None:
        self._send = send
        self._receive = receive
        self._link = link
        self._remote_address = remote_address

    @property
    def remote_address(self) -> str:
        return self._remote_address

    async def send_message(self, data: bytes) -> None:
        if len(data) > MAX_FRAME_SIZE:
            raise FrameError(f"frame of {len(data)} bytes exceeds {MAX_FRAME_SIZE}")
        try:
            await self._send.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise self._link.closed_error() from None

    async def send_messages(self, data: list[bytes]) -> None:
        for message in data:
            await self.send_message(message)

    async def receive_message(self) -> bytes:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self._link.closed_error() from None

    async def aclose(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        self._link.close(code, reason)
        # Synchronous close: closing must take effect even inside a cancelled scope.
        self._send.close()
        self._receive.close()
        await trio.lowlevel.checkpoint_if_cancelled()


def memory_stream_pair(
    a_address: str = "mem://a", b_address: str = "mem://b", buffer: int = MEMORY_BUFFER_FRAMES
) -> tuple[MemoryMessageStream, MemoryMessageStream]:
    """Two connected streams; each one's ``remote_address`` names the other end."""
    a_to_b_send, a_to_b_receive = trio.open_memory_channel[bytes](buffer)
    b_to_a_send, b_to_a_receive = trio.open_memory_channel[bytes](buffer)
    link = MemoryLink()
    return (
        MemoryMessageStream(a_to_b_send, b_to_a_receive, link, b_address),
        MemoryMessageStream(b_to_a_send, a_to_b_receive, link, a_address),
    )


class MemoryNetwork:
    """A directory of listeners keyed by address; dialing one makes a memory stream pair.

    Addresses are free-form strings (``"mem://laptop"``). One instance is one
    simulated internet: every node of a sim shares it.
    """

    def __init__(self, *, buffer_frames: int = MEMORY_BUFFER_FRAMES) -> None:
        self._buffer_frames = buffer_frames
        self._listeners: dict[str, trio.MemorySendChannel[MemoryMessageStream]] = {}
        self._dialer_ids = itertools.count(1)

    @property
    def addresses(self) -> frozenset[str]:
        return frozenset(self._listeners)

    async def listen(
        self,
        address: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if address in self._listeners:
            raise ConnectionClosed(f"address already in use: {address}")
        send, receive = trio.open_memory_channel[MemoryMessageStream](self._buffer_frames)
        self._listeners[address] = send
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(address)
                async for stream in receive:
                    nursery.start_soon(_serve_one, handler, stream)
        finally:
            del self._listeners[address]
            send.close()

    @asynccontextmanager
    async def dial(self, address: str) -> AsyncIterator[MessageStream]:
        listener = self._listeners.get(address)
        if listener is None:
            raise ConnectionClosed(f"connection refused: nothing listens at {address}")
        dialer_address = f"{address}#dialer-{next(self._dialer_ids)}"
        ours, theirs = memory_stream_pair(dialer_address, address, self._buffer_frames)
        try:
            await listener.send(theirs)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(f"connection refused: {address} stopped listening") from None
        try:
            yield ours
        finally:
            await ours.aclose(CloseCode.GOING_AWAY, "dialer left")


async def _serve_one(handler: ConnectionHandler, stream: MessageStream) -> None:
    try:
        await handler(stream)
    finally:
        await stream.aclose(CloseCode.NORMAL, "")


class StreamMessageStream:
    """Messages over any `trio.abc.Stream` (TCP, ``trio.testing.memory_stream_pair``).

    Frames are length-prefixed (see `wire._framing`). There is no in-band close
    reason: a byte stream only has EOF.
    """

    def __init__(self, stream: trio.abc.Stream, remote_address: str = "stream") -> None:
        self._stream = stream
        self._decoder = LengthPrefixDecoder()
        self._pending: list[bytes] = []
        self._remote_address = remote_address

    @property
    def remote_address(self) -> str:
        return self._remote_address

    async def send_message(self, data: bytes) -> None:
        try:
            await self._stream.send_all(length_prefixed(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed("connection closed") from exc

    async def send_messages(self, data: list[bytes]) -> None:
        try:
            await self._stream.send_all(b"".join(length_prefixed(m) for m in data))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed("connection closed") from exc

    async def receive_message(self) -> bytes:
        while not self._pending:
            try:
                data = await self._stream.receive_some(_STREAM_READ_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionClosed("connection closed") from exc
            if not data:
                if self._decoder.buffered:
                    raise FrameError("connection ended in the middle of a frame")
                raise ConnectionClosed("connection closed")
            self._pending.extend(self._decoder.feed(data))
        return self._pending.pop(0)

    async def aclose(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        await self._stream.aclose()
