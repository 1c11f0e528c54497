"""Retention: the service deletes memories past their type's period (docs/retention.md).

A private helper of :mod:`actors.service` (it sends the store's messages, so it sits between
the service and the leaf actors). The policy itself is domain (:mod:`dmgn.retention`); this
module is the run that applies it: which memories to page through, how many per run, and what
the answer to ``dmgn retention`` lists. Deleting goes through the service's one delete path
(handed in as ``delete``), so retention's tombstones sync like the user's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from actors import store as st
from actors.runtime import Address, call, expect
from dmgn import api
from dmgn.errors import DmgnError
from dmgn.retention import RetentionPolicy

__all__ = [
    "RETENTION_EXAMPLES",
    "RETENTION_MAX_PER_RUN",
    "Delete",
    "Retention",
]

# The service's logger: these lines are the service's, wherever the code sits.
log = logging.getLogger("dmgn.service")

#: Deletes per retention run (each is a store commit and a feed op): a first run over years of
#: backlog is spread over several runs rather than holding the store for minutes.
RETENTION_MAX_PER_RUN = 10_000
#: Expired memories listed by id in a retention answer (the counts cover all of them).
RETENTION_EXAMPLES = 20

#: The service's delete path: (memory id, reason for the deletes metric) → whether it was live.
Delete = Callable[[str, str], Awaitable[bool]]


class Retention:
    """The service's retention runs: on ``dmgn retention`` and every ``interval`` seconds."""

    def __init__(
        self,
        policy: RetentionPolicy,
        store: Address[st.StoreMsg],
        delete: Delete,
        interval: float,
        page_size: int,
    ) -> None:
        self.policy = policy
        self._store = store
        self._delete = delete
        self._interval = interval
        self._page_size = page_size

    async def apply_periodically(self) -> None:
        """Apply the policy every ``interval``; a failed run is logged and tried at the next."""
        while True:
            await trio.sleep(self._interval)
            try:
                outcome = await self.apply(dry_run=False)
            except DmgnError as error:
                log.warning("retention: %s; tried again in %gs", error, self._interval)
                continue
            if outcome["deleted"]:
                log.info(
                    "retention deleted %d expired memories",
                    outcome["deleted"],
                    extra={"expired": outcome["expired"]},
                )

    async def apply(self, dry_run: bool) -> api.Response:
        """Find memories past their type's period (oldest first) and delete them through the
        ordinary delete path, so the tombstones sync. At most RETENTION_MAX_PER_RUN per run:
        a long backlog is worked off over several runs instead of holding the store."""
        cutoffs = self.policy.cutoffs(time.time_ns())
        expired: dict[str, int] = {}
        examples: list[dict[str, Any]] = []
        deleted = 0
        budget = RETENTION_MAX_PER_RUN
        for kind, cutoff in cutoffs.items():
            expired[kind] = 0
            offset = 0
            while budget > 0:
                page = await expect(
                    await call(
                        self._store,
                        st.Recent,
                        min(self._page_size, budget),
                        (kind,),
                        None,
                        cutoff,
                        offset,
                        False,
                    )
                )
                if not page:
                    break
                budget -= len(page)
                expired[kind] += len(page)
                examples.extend(
                    {
                        "id": s.id,
                        "type": s.type,
                        "timestamp": s.created_at,
                        "timestamp_rfc3339": api.rfc3339(s.created_at),
                    }
                    for s in page[: max(0, RETENTION_EXAMPLES - len(examples))]
                )
                if dry_run:
                    offset += len(page)
                    continue
                for stored in page:
                    deleted += await self._delete(stored.id, "retention")
        return {
            "dry_run": dry_run,
            "policy": self.policy.describe(),
            "expired": expired,
            "deleted": deleted,
            "more": budget <= 0,
            "examples": examples,
        }
