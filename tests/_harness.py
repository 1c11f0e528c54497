"""The tests' shared harness: waiting for state other actors hold, and in-process nodes online.

One copy of each, so that a change to how tests wait or how a node goes online is made once:

- :func:`eventually` polls a condition until it holds, under a deadline stretched when the
  machine is loaded (`tests._deadlines`). A condition is a plain or an async callable, because
  the state it checks is often observable only by asking an actor.
- :func:`online_node` is a node built in process (`actors.node.open_node` with a hashing
  embedder) and put online on a `MemoryNetwork` (or any `Network`), without discovery, the way
  the sync, retention and metrics tests all want it.

(A free TCP+UDP port is `wire.testing.free_port`, which benchmarks use too.)
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import trio.testing

from tests._deadlines import scaled

if TYPE_CHECKING:
    from actors.node import Networking, RunningNode
    from actors.transport import TransportLimits
    from wire import Network

__all__ = ["DEADLINE", "SEED", "eventually", "online_node"]

#: How long :func:`eventually` waits on an idle machine before it fails the test. A guard
#: against a hang, not a speed assertion (benchmarks measure speed).
DEADLINE = 30.0
#: The identity seed of the tests' devices (one identity: its devices sync with each other).
SEED = bytes(range(32))


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]],
    deadline: float = DEADLINE,
    *,
    every: float = 0.05,
) -> None:
    """Poll ``condition`` every ``every`` seconds until it holds; fail after ``deadline``
    seconds, stretched by the machine's load on the real clock (virtual seconds under a
    ``MockClock`` are not slowed by load, so they are not stretched)."""
    virtual = isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
    with trio.fail_after(deadline if virtual else scaled(deadline)):
        while True:
            value = condition()
            if not isinstance(value, bool):
                value = await value
            if value:
                return
            await trio.sleep(every)


@asynccontextmanager
async def online_node(
    network: Network,
    name: str,
    *,
    seed: bytes = SEED,
    peers: tuple[str, ...] = (),
    data_dir: Path | None = None,
    device_id: bytes | None = None,
    sync_interval: float | None = None,
    redial_interval: float = 0.5,
    transport_limits: TransportLimits | None = None,
    **node_options: Any,
) -> AsyncIterator[tuple[RunningNode, Networking]]:
    """A node listening on ``mem://name`` that dials ``peers``; ``node_options`` go to
    `open_node` (``replica``, ``query_timeout``, ``wall_clock``, ``config``, ...).
    ``sync_interval`` None is the node's default."""
    # Imported here: the wire and gossip tests wait with `eventually` and need no node.
    from actors.node import NetworkSettings, open_node, start_networking
    from dmgn.embedding import HashingEmbedder

    async with open_node(
        seed, device_id or os.urandom(16), data_dir, embedder=HashingEmbedder(), **node_options
    ) as node:
        settings = NetworkSettings(
            listen_addr=f"mem://{name}",
            bootstrap=peers,
            discovery=False,
            redial_interval=redial_interval,
            transport_limits=transport_limits,
        )
        if sync_interval is not None:
            settings = replace(settings, sync_interval=sync_interval)
        online = await start_networking(node, network, settings, data_dir)
        yield node, online
