"""A simulated internet for sims: `wire.MemoryNetwork` plus latency, partitions and counters.

Each node gets its own view (:meth:`SimNetwork.node`), a `wire.Network` whose connections know
both ends, so the sim can delay their messages, cut them when a partition starts, refuse dials
across it, and count messages and bytes per link. Everything above (transport, real Noise
handshakes, gossip) runs unchanged.

Latency is applied per message by a relay task that delivers each frame at ``sent + latency``
(virtual time under ``MockClock``), so a link has latency without losing throughput. Loss is
modelled the way a reliable stream experiences it: not as missing frames (TCP would retransmit)
but as connections that reset, with probability ``reset_probability`` per message.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from wire import CloseCode, ConnectionClosed, MessageStream
from wire._network import ConnectionHandler, MemoryMessageStream, memory_stream_pair

__all__ = ["LinkStats", "NodeNetwork", "SimNetwork"]


@dataclass
class LinkStats:
    messages: int = 0
    bytes: int = 0


@dataclass
class _Conditions:
    latency: float = 0.0
    jitter: float = 0.0
    reset_probability: float = 0.0


@dataclass
class SimNetwork:
    """One simulated internet shared by every node of a sim."""

    seed: int = 0
    conditions: _Conditions = field(default_factory=_Conditions)
    stats: dict[tuple[str, str], LinkStats] = field(default_factory=dict)
    #: Connections opened (a listener took them) and dials refused (offline, partition,
    #: nobody listening), per (dialer, listener): each opened one costs a Noise handshake.
    opened: dict[tuple[str, str], int] = field(default_factory=dict)
    refused: dict[tuple[str, str], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._listeners: dict[str, trio.MemorySendChannel[MemoryMessageStream]] = {}
        self._random = random.Random(self.seed)
        self._groups: dict[str, int] | None = None
        self._offline: set[str] = set()
        self._open: dict[_SimStream, None] = {}  # insertion order: cuts happen in a fixed order
        #: The same streams by each end's node: a node going offline cuts its own links
        #: without a pass over every link of the sim (~7,000 at 500 nodes, each churn step).
        self._open_by_node: dict[str, dict[_SimStream, None]] = {}

    def node(self, name: str) -> NodeNetwork:
        """The network as seen by node ``name``; its listen address is ``mem://<name>``."""
        return NodeNetwork(self, name)

    def set_latency(self, latency: float, jitter: float = 0.0) -> None:
        self.conditions.latency, self.conditions.jitter = latency, jitter

    def set_reset_probability(self, probability: float) -> None:
        self.conditions.reset_probability = probability

    def partition(self, *groups: set[str]) -> None:
        """Split nodes into groups that cannot reach each other; open links across are cut."""
        self._groups = {name: i for i, group in enumerate(groups) for name in group}
        for stream in list(self._open):
            if not self.reachable(stream.local, stream.remote):
                stream.cut("network partition")

    def heal(self) -> None:
        self._groups = None

    def set_online(self, name: str, online: bool) -> None:
        """Take a node off the network (its links are cut, dials to and from it refused) or
        bring it back. The node keeps running and keeps its disk: a laptop with no network."""
        if online:
            self._offline.discard(name)
            return
        self._offline.add(name)
        for stream in list(self._open_by_node.get(name, {})):
            stream.cut("node went offline")

    def is_online(self, name: str) -> bool:
        return name not in self._offline

    def reachable(self, a: str, b: str) -> bool:
        if a in self._offline or b in self._offline:
            return False
        if self._groups is None:
            return True
        return self._groups.get(a, -1) == self._groups.get(b, -2)

    def total(self) -> LinkStats:
        return LinkStats(
            sum(s.messages for s in self.stats.values()), sum(s.bytes for s in self.stats.values())
        )

    def _delay(self) -> float:
        c = self.conditions
        return max(
            0.0, c.latency + (self._random.uniform(-c.jitter, c.jitter) if c.jitter else 0.0)
        )

    def _should_reset(self) -> bool:
        p = self.conditions.reset_probability
        return p > 0 and self._random.random() < p


def _name(address: str) -> str:
    return address.removeprefix("mem://").split("#", 1)[0]


class NodeNetwork:
    """One node's view of the :class:`SimNetwork` (implements `wire.Network`)."""

    def __init__(self, sim: SimNetwork, name: str) -> None:
        self._sim = sim
        self.name = name
        self.address = f"mem://{name}"

    async def listen(
        self,
        address: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections at this node's address (``address`` is ignored: one per node)."""
        sim = self._sim
        if self.address in sim._listeners:
            raise ConnectionClosed(f"address already in use: {self.address}")
        send, receive = trio.open_memory_channel[MemoryMessageStream](16)
        sim._listeners[self.address] = send

        async def serve(stream: MemoryMessageStream) -> None:
            remote = _name(stream.remote_address)
            try:
                async with _SimStream.wrap(sim, stream, self.name, remote) as wrapped:
                    await handler(wrapped)
            finally:
                await stream.aclose(CloseCode.NORMAL, "")

        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.address)
                async for stream in receive:
                    nursery.start_soon(serve, stream)
        finally:
            del sim._listeners[self.address]
            send.close()

    @asynccontextmanager
    async def dial(self, address: str) -> AsyncIterator[MessageStream]:
        remote = _name(address)
        sim = self._sim
        link = (self.name, remote)
        listener = sim._listeners.get(f"mem://{remote}")
        if not sim.reachable(self.name, remote) or listener is None:
            sim.refused[link] = sim.refused.get(link, 0) + 1
            if listener is None:
                raise ConnectionClosed(f"connection refused: nothing listens at {address}")
            raise ConnectionClosed(f"connection refused: {address} is unreachable (partition)")
        ours, theirs = memory_stream_pair(self.address, f"mem://{remote}")
        try:
            await listener.send(theirs)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            sim.refused[link] = sim.refused.get(link, 0) + 1
            raise ConnectionClosed(f"connection refused: {address} stopped listening") from None
        sim.opened[link] = sim.opened.get(link, 0) + 1
        try:
            async with _SimStream.wrap(self._sim, ours, self.name, remote) as wrapped:
                yield wrapped
        finally:
            await ours.aclose(CloseCode.GOING_AWAY, "dialer left")


class _SimStream:
    """A stream whose outgoing frames are delayed, counted, and cut on partition."""

    def __init__(
        self,
        sim: SimNetwork,
        inner: MessageStream,
        local: str,
        remote: str,
        outbox: trio.MemorySendChannel[tuple[float, bytes]],
    ) -> None:
        self._sim = sim
        self._inner = inner
        self.local = local
        self.remote = remote
        self._outbox = outbox
        self._cut_reason: str | None = None
        self._nursery: trio.Nursery | None = None

    @classmethod
    @asynccontextmanager
    async def wrap(
        cls, sim: SimNetwork, inner: MessageStream, local: str, remote: str
    ) -> AsyncIterator[_SimStream]:
        send, receive = trio.open_memory_channel[tuple[float, bytes]](64)
        stream = cls(sim, inner, local, remote, send)
        sim._open[stream] = None
        for end in (local, remote):
            sim._open_by_node.setdefault(end, {})[stream] = None
        try:
            async with trio.open_nursery() as nursery:
                stream._nursery = nursery
                nursery.start_soon(stream._relay, receive)
                try:
                    yield stream
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The caller's ConnectionClosed (a cut link) came out of our relay nursery wrapped
            # in a group; hand it back as the plain error a real network raises (transport
            # crashed on the group).
            closed, rest = group.split(ConnectionClosed)
            if rest is None and closed is not None:
                first: BaseException = closed
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                raise first from None
            raise
        finally:
            sim._open.pop(stream, None)
            for end in (local, remote):
                ends = sim._open_by_node.get(end)
                if ends is not None:
                    ends.pop(stream, None)
                    if not ends:
                        del sim._open_by_node[end]

    @property
    def remote_address(self) -> str:
        return f"mem://{self.remote}"

    async def _relay(self, receive: trio.MemoryReceiveChannel[tuple[float, bytes]]) -> None:
        async for deliver_at, data in receive:
            await trio.sleep_until(deliver_at)
            try:
                await self._inner.send_message(data)
            except ConnectionClosed:
                return

    def cut(self, reason: str) -> None:
        self._cut_reason = reason
        self._outbox.close()
        if self._nursery is not None:
            self._nursery.start_soon(self._inner.aclose, CloseCode.GOING_AWAY, reason)

    async def send_message(self, data: bytes) -> None:
        if self._cut_reason is not None:
            raise ConnectionClosed(f"connection closed: {self._cut_reason}")
        if self._sim._should_reset():
            self.cut("connection reset (simulated loss)")
            raise ConnectionClosed("connection reset (simulated loss)")
        stats = self._sim.stats.setdefault((self.local, self.remote), LinkStats())
        stats.messages += 1
        stats.bytes += len(data)
        try:
            await self._outbox.send((trio.current_time() + self._sim._delay(), data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(f"connection closed: {self._cut_reason}") from None

    async def send_messages(self, data: list[bytes]) -> None:
        for message in data:
            await self.send_message(message)

    async def receive_message(self) -> bytes | memoryview:
        return await self._inner.receive_message()

    async def aclose(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        self._outbox.close()
        await self._inner.aclose(code, reason)
