"""Everything a sim run needs to be the same run twice for one seed.

:func:`deterministic` is entered around ``trio.run`` by :func:`sims.__main__.run_scenario`.
Inside it:

* **Blocking work runs inline.** In production the store (DuckDB), the indexer (faiss, the
  embedder), the storage service, the shard keeper and gossip's feed log hand blocking calls to
  worker threads with ``trio.to_thread.run_sync``. Under ``MockClock(autojump_threshold=0)`` the
  clock would jump while a thread works, and when threads finish depends on the machine. Here
  each such call runs in the calling task after a checkpoint: the same code, sequenced.
* **Trio schedules in a fixed order.** Trio breaks ties between deadlines that expire at one
  instant by ``id(cancel_scope)`` (a memory address) and wakes the waiters of an ``Event`` or a
  cancelled scope from a ``set`` of tasks (ordered by address too); normally each batch of
  runnable tasks keeps that order (maybe reversed). Under ``MockClock`` many tasks wake at the
  very same virtual instant (every device's 30 s sync round), so which one sent first depended
  on where the allocator had put their objects: the same seed gave runs that differed by ~2% of
  their wire messages (always between a process's first and later runs, and between
  processes). Inside the block Trio's own deterministic mode is on: each batch is sorted by task
  creation order, then reversed or not on a coin flip of a seeded random (Trio would shuffle
  it, a Python loop with a draw per task; outside that mode Trio only does the coin flip).
  (Importing Hypothesis turns that mode on for the whole process, which is why the runs agreed
  under pytest but not from ``python -m sims``.)
* **Randomness comes from the seed**: Trio's scheduler shuffle, the ``random`` module, and the
  bytes behind ``os.urandom`` / ``nacl.utils.random`` (nonces, keys, memory ids, request ids).
  This makes the sims' cryptography predictable, which is the point for a simulation and would
  be fatal anywhere else: the context is only ever entered by sims.
* **The kernel is asked for I/O only now and then.** Trio polls epoll once per scheduler
  pass, even with a zero timeout (under ``MockClock(autojump_threshold=0)`` it is always
  zero); a sim has no sockets, and in a 100-node run that poll was ~6% of the CPU, one system
  call per task step. Inside the block a zero-timeout poll reaches the kernel once in
  ``_POLL_EVERY`` passes (Trio's own wake-up socket, which Ctrl-C and ``run_sync_soon`` use,
  is still read within a few milliseconds); any other poll is passed through.
* **Time is virtual**: ``time.monotonic`` (rate limits) is the MockClock; ``time.time`` /
  ``time.time_ns`` follow the MockClock from
  2026-01-01T00:00:00Z (memory ``created_at``, peers' ``last_seen``). Clocks that the
  actors take as defaults (the reputation table's, the supervisor's crash window) look these
  up when they are made, so a node built inside the block runs on the virtual clock.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import nacl.utils
import trio
import trio.lowlevel
import trio.to_thread

from sims.devices import EPOCH_NS

T = TypeVar("T")

#: A zero-timeout I/O poll reaches the kernel once in this many scheduler passes.
_POLL_EVERY = 256


class _SeededReversal(random.Random):
    """Trio's scheduler random for sims: a batch "shuffle" that reverses it or not.

    In its deterministic mode Trio sorts each batch of runnable tasks by creation order and
    then shuffles it; ``random.shuffle`` is a Python loop with a draw per task, ~1.5% of a
    500-node run. Outside that mode Trio itself only reverses each batch on a coin flip, and
    that is what this does to the sorted batch, with the seeded coin: the order is still fixed
    by the seed, and it is the kind of order a production node sees.
    """

    def shuffle(self, x: list[Any]) -> None:  # type: ignore[override]  # lists only, as Trio
        if self.random() < 0.5:
            x.reverse()


async def _run_inline(
    function: Callable[..., T],
    *args: Any,
    abandon_on_cancel: bool = False,
    cancellable: bool | None = None,
    limiter: Any = None,
    thread_name: str | None = None,
) -> T:
    await trio.lowlevel.checkpoint()
    return function(*args)


def _virtual_time_ns() -> int:
    try:
        return EPOCH_NS + int(trio.current_time() * 1e9)
    except RuntimeError:  # outside trio.run (start-up, teardown)
        return EPOCH_NS


def _virtual_monotonic() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # outside trio.run
        return 0.0


def _rare_polls(get_events: Callable[[Any, float], Any]) -> Callable[[Any, float], Any]:
    passes = 0

    def get_events_now_and_then(self: Any, timeout: float) -> Any:
        nonlocal passes
        if timeout <= 0:
            passes += 1
            if passes % _POLL_EVERY:
                return []  # no events: what epoll and kqueue answer when nothing is ready
        return get_events(self, timeout)

    return get_events_now_and_then


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Within the block: blocking calls inline, randomness from ``seed``, virtual wall clock."""
    bytes_source = random.Random(f"sims bytes {seed}")

    def seeded_bytes(size: int = 32) -> bytes:  # os.urandom(size), nacl.utils.random(size=32)
        return bytes_source.randbytes(size)

    saved = (
        trio.to_thread.run_sync,
        os.urandom,
        nacl.utils.random,
        time.time,
        time.time_ns,
        time.monotonic,
        random.getstate(),
    )
    # Trio shuffles each batch of runnable tasks with its own random.Random; a seeded one and
    # sorting each batch by task creation order first (Trio's mode for Hypothesis) fixes the
    # order in which tasks run whatever their addresses (private, but the only handles Trio
    # offers; see the module docstring).
    trio_run = trio._core._run
    saved_sorting: bool = trio_run._ALLOW_DETERMINISTIC_SCHEDULING
    # The I/O managers whose get_events answers a list (epoll, kqueue); Windows' is left alone.
    io_manager: Any = trio_run.TheIOManager  # type: ignore[attr-defined]  # private, as above
    saved_get_events = io_manager.get_events
    if io_manager.__name__ in {"EpollIOManager", "KqueueIOManager"}:
        io_manager.get_events = _rare_polls(saved_get_events)
    saved_random: random.Random = trio_run._r
    trio_run._r = _SeededReversal(seed)
    trio_run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]  # Final in Trio
    random.seed(seed)
    trio.to_thread.run_sync = _run_inline  # type: ignore[assignment]
    os.urandom = seeded_bytes
    nacl.utils.random = seeded_bytes
    time.time_ns = _virtual_time_ns
    time.time = lambda: _virtual_time_ns() / 1e9
    time.monotonic = _virtual_monotonic
    try:
        yield
    finally:
        (
            trio.to_thread.run_sync,
            os.urandom,
            nacl.utils.random,
            time.time,
            time.time_ns,
            time.monotonic,
            state,
        ) = saved
        random.setstate(state)
        trio_run._ALLOW_DETERMINISTIC_SCHEDULING = saved_sorting  # type: ignore[misc]
        trio_run._r = saved_random
        io_manager.get_events = saved_get_events
