"""A ``recent:<days>`` replica: the service keeps only memories inside the window.

A private helper of :mod:`actors.service` (it sends the store's and the indexer's messages, so
it sits between the service and the leaf actors). Memories older than the window are dropped
from this device's store and index, not deleted: they stay live on our full devices, reached
through the router, and their feed entries stay in the gossip log, so this device still syncs
and relays every op (docs/queries.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from actors import indexer as ix
from actors import store as st
from actors.runtime import Address, call, expect
from dmgn.errors import DmgnError

__all__ = ["EVICT_INTERVAL", "ReplicaWindow"]

# The service's logger: these lines are the service's, wherever the code sits.
log = logging.getLogger("dmgn.service")

#: How often a ``recent:<days>`` replica drops memories that left its window (and at start).
EVICT_INTERVAL = 3600.0
_DAY_NS = 86_400 * 1_000_000_000


class ReplicaWindow:
    """The window of a ``recent:<days>`` replica (``days`` None: a full replica, no window)."""

    def __init__(
        self,
        days: int | None,
        store: Address[st.StoreMsg],
        indexer: Address[ix.Msg],
        wall_clock: Callable[[], int],
        page_size: int,
    ) -> None:
        self.days = days
        self._store = store
        self._indexer = indexer
        self._wall_clock = wall_clock
        self._page_size = page_size

    def start(self) -> int | None:
        """The oldest ``created_at`` (ns) kept now; None for a full replica."""
        if self.days is None:
            return None
        return self._wall_clock() - self.days * _DAY_NS

    async def evict(self) -> int:
        """Drop envelopes (and index entries) older than the window. Not tombstones: see the
        module's docstring. Returns how many were dropped."""
        window_start = self.start()
        if window_start is None:
            return 0
        dropped = await expect(await call(self._store, st.Evict, window_start, timeout=120))
        if dropped:
            log.info(
                "replica recent:%d: dropped %d memories older than the window",
                self.days,
                len(dropped),
            )
            for start in range(0, len(dropped), self._page_size):
                await expect(
                    await call(self._indexer, ix.Unindex, dropped[start : start + self._page_size])
                )
        return len(dropped)

    async def evict_periodically(self) -> None:
        while True:
            await trio.sleep(EVICT_INTERVAL)
            try:
                await self.evict()
            except DmgnError as error:
                log.warning("could not drop memories outside the replica window: %s", error)
