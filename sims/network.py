"""A simulated internet for sims: `wire.MemoryNetwork` plus latency, partitions and counters.

Each node gets its own view (:meth:`SimNetwork.node`), a `wire.Network` whose connections know
both ends, so the sim can delay their messages, cut them when a partition starts, refuse dials
across it, and count messages and bytes per link. Everything above (transport, real Noise
handshakes, gossip) runs unchanged.

Latency is applied per message: each frame carries the time it is due (``sent + latency``,
virtual time under ``MockClock``) and the receiver waits until then before it reads it, so a
link has latency without losing throughput, and in order. No relay task stands between the
two ends: with one, every frame woke three tasks instead of two, and the sims' CPU is mostly
Trio's scheduler. Loss is modelled the way a reliable stream experiences it: not as missing
frames (TCP would retransmit) but as connections that reset, with probability
``reset_probability`` per message.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from actors.runtime import deliver
from wire import MAX_FRAME_SIZE, CloseCode, ConnectionClosed, FrameError, MessageStream
from wire._network import ConnectionHandler, MemoryLink

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
        self._listeners: dict[str, trio.MemorySendChannel[_SimStream]] = {}
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
        send, receive = trio.open_memory_channel[_SimStream](16)
        sim._listeners[self.address] = send

        async def serve(stream: _SimStream) -> None:
            try:
                await handler(stream)
            finally:
                stream.forget()
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
        ours, theirs = _SimStream.pair(sim, self.name, remote)
        try:
            await listener.send(theirs)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            ours.forget()
            theirs.forget()
            sim.refused[link] = sim.refused.get(link, 0) + 1
            raise ConnectionClosed(f"connection refused: {address} stopped listening") from None
        sim.opened[link] = sim.opened.get(link, 0) + 1
        try:
            yield ours
        finally:
            ours.forget()
            await ours.aclose(CloseCode.GOING_AWAY, "dialer left")


#: Frames one direction of a link holds in flight before the sender waits (backpressure).
_IN_FLIGHT = 64


class _SimStream:
    """One end of a simulated connection: outgoing frames are counted, stamped with the time
    they are due at the other end, and refused once the link is cut."""

    def __init__(
        self,
        sim: SimNetwork,
        local: str,
        remote: str,
        send: trio.MemorySendChannel[tuple[float, bytes]],
        receive: trio.MemoryReceiveChannel[tuple[float, bytes]],
        link: MemoryLink,
    ) -> None:
        self._sim = sim
        self.local = local
        self.remote = remote
        self._send = send
        self._receive = receive
        self._link = link
        self._cut_reason: str | None = None
        #: A frame taken from the channel whose delivery the receiver was still waiting for
        #: when it was cancelled: the next receive returns it, so nothing is lost.
        self._held: tuple[float, bytes] | None = None
        self._stats = sim.stats.setdefault((local, remote), LinkStats())

    @classmethod
    def pair(cls, sim: SimNetwork, dialer: str, listener: str) -> tuple[_SimStream, _SimStream]:
        """The dialer's end and the listener's, both registered as open (cuts find them)."""
        to_listener, from_dialer = trio.open_memory_channel[tuple[float, bytes]](_IN_FLIGHT)
        to_dialer, from_listener = trio.open_memory_channel[tuple[float, bytes]](_IN_FLIGHT)
        link = MemoryLink()
        ours = cls(sim, dialer, listener, to_listener, from_listener, link)
        theirs = cls(sim, listener, dialer, to_dialer, from_dialer, link)
        for stream in (ours, theirs):
            sim._open[stream] = None
            for end in (dialer, listener):
                sim._open_by_node.setdefault(end, {})[stream] = None
        return ours, theirs

    def forget(self) -> None:
        """No longer open: partitions and nodes going offline do not look at it again."""
        sim = self._sim
        sim._open.pop(self, None)
        for end in (self.local, self.remote):
            ends = sim._open_by_node.get(end)
            if ends is not None:
                ends.pop(self, None)
                if not ends:
                    del sim._open_by_node[end]

    @property
    def remote_address(self) -> str:
        return f"mem://{self.remote}"

    def _closed_error(self) -> ConnectionClosed:
        if self._cut_reason is not None:
            return ConnectionClosed(f"connection closed: {self._cut_reason}")
        return self._link.closed_error()

    def cut(self, reason: str) -> None:
        """The network lost this connection (partition, a node offline, a reset): frames in
        flight are gone, and both ends' next send or receive fails."""
        self._cut_reason = reason
        self._link.close(CloseCode.GOING_AWAY, reason)
        self._send.close()
        self._receive.close()
        self.forget()

    async def send_message(self, data: bytes) -> None:
        if self._cut_reason is not None:
            raise self._closed_error()
        if len(data) > MAX_FRAME_SIZE:
            raise FrameError(f"frame of {len(data)} bytes exceeds {MAX_FRAME_SIZE}")
        sim = self._sim
        if sim._should_reset():
            self.cut("connection reset (simulated loss)")
            raise ConnectionClosed("connection reset (simulated loss)")
        stats = self._stats
        stats.messages += 1
        stats.bytes += len(data)
        try:
            # No trip through the scheduler unless the link is full: the sims' CPU is mostly
            # Trio's scheduler, and the frame's delivery wakes the receiver anyway.
            await deliver(self._send, (trio.current_time() + sim._delay(), data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise self._closed_error() from None

    async def send_messages(self, data: list[bytes]) -> None:
        for message in data:
            await self.send_message(message)

    async def receive_message(self) -> bytes:
        if self._held is None:
            try:
                self._held = await self._receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise self._closed_error() from None
        due, data = self._held
        if due > trio.current_time():
            await trio.sleep_until(due)  # cancelled: the frame stays held for the next call
        self._held = None
        return data

    async def aclose(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        self._link.close(code, reason)
        # Synchronous close: closing must take effect even inside a cancelled scope.
        self._send.close()
        self._receive.close()
        await trio.lowlevel.checkpoint_if_cancelled()
