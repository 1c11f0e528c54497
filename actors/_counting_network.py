"""Counting the bytes a node sends and receives on any ``wire.Network`` (``dmgn status``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import trio

from wire import (
    ConnectionHandler,
    MessageStream,
    Network,
)

__all__ = [
    "CountingNetwork",
    "WireCounters",
]

# -- counting bytes on the wire -----------------------------------------------------------------


@dataclass
class WireCounters:
    """Bytes and frames through a network, as the transport wrote and read them (Noise
    ciphertext and framing included; TCP/WebSocket headers not)."""

    bytes_out: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    frames_in: int = 0


class _CountingStream:
    def __init__(self, inner: MessageStream, counters: WireCounters) -> None:
        self._inner = inner
        self._counters = counters

    @property
    def remote_address(self) -> str:
        return self._inner.remote_address

    async def send_message(self, data: bytes) -> None:
        await self._inner.send_message(data)
        self._counters.bytes_out += len(data)
        self._counters.frames_out += 1

    async def send_messages(self, data: list[bytes]) -> None:
        await self._inner.send_messages(data)
        self._counters.bytes_out += sum(len(d) for d in data)
        self._counters.frames_out += len(data)

    async def receive_message(self) -> bytes | memoryview:
        data = await self._inner.receive_message()
        self._counters.bytes_in += len(data)
        self._counters.frames_in += 1
        return data

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        await self._inner.aclose(code, reason)


class CountingNetwork:
    """A ``Network`` that counts what passes through another one (for ``dmgn status`` and the
    sync benchmark's bytes per memory)."""

    def __init__(self, inner: Network) -> None:
        self.inner = inner
        self.counters = WireCounters()

    async def listen(
        self,
        address: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async def counted(stream: MessageStream) -> None:
            await handler(_CountingStream(stream, self.counters))

        await self.inner.listen(address, counted, task_status=task_status)

    def dial(self, address: str) -> AbstractAsyncContextManager[MessageStream]:
        return self._dial(address)

    @asynccontextmanager
    async def _dial(self, address: str) -> AsyncIterator[MessageStream]:
        async with self.inner.dial(address) as stream:
            yield _CountingStream(stream, self.counters)
