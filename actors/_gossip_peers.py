"""Gossip's per-peer state: rate buckets, the outbox queue, what a peer is known to have, and
the reputation that outlives its connections."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import trio

from actors._gossip_limits import MESSAGE_BURST, MESSAGE_RATE, WASTE_BURST, WASTE_RATE
from wire import Message, TokenBucket

# -- peers --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Serve:
    device: bytes
    first: int
    last: int


@dataclass
class _Peer:
    peer_id: str
    identity: bytes
    is_device: bool
    send: trio.MemorySendChannel[Message]
    connected_at: float
    known: dict[bytes, int] = field(default_factory=dict)  # what it has, as far as we know
    told: dict[bytes, int] = field(default_factory=dict)  # what it has told us it has
    queue: deque[Message | _Serve] = field(default_factory=deque)
    wakeup: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    pending_wants: int = 0
    overflowed: bool = False
    messages: TokenBucket = field(default_factory=lambda: TokenBucket(MESSAGE_RATE, MESSAGE_BURST))
    waste: TokenBucket = field(default_factory=lambda: TokenBucket(WASTE_RATE, WASTE_BURST))
    last_sync_at: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    entries_in: int = 0

    def enqueue(self, item: Message | _Serve) -> None:
        self.queue.append(item)
        self.wakeup.set()


@dataclass
class _Reputation:
    """What outlives a connection: the peer's score and why it was last cut off."""

    score: int = 0
    cut_off_reason: str | None = None
    identity: bytes = b""
    is_device: bool = False


class _Misbehaved(Exception):
    """Internal: the peer broke the protocol; ``str()`` is the logged reason."""
