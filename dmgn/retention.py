"""Retention: how long memories of each type are kept (config ``retention``).

A policy maps a memory type to a period (``"365d"``, ``"12w"``, ``"2y"``) or ``"forever"``;
types it does not name are kept forever, so an empty policy (the default) deletes nothing. A
memory expires when its ``created_at`` is older than its type's period. Expired memories are
deleted like any other delete - a tombstone that syncs - by the service (periodically, and on
``dmgn retention``), so every device of the identity loses them, whichever applied the policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from dmgn.config import parse_age
from dmgn.memory import MEMORY_TYPES


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    #: type → seconds a memory of that type is kept (types absent: forever).
    max_age: Mapping[str, float]

    @classmethod
    def from_config(cls, periods: Mapping[str, str]) -> RetentionPolicy:
        ages = {kind: parse_age(text) for kind, text in periods.items() if kind in MEMORY_TYPES}
        return cls({kind: age for kind, age in ages.items() if age is not None})

    def cutoffs(self, now_ns: int) -> dict[str, int]:
        """type → the ``created_at`` (ns) before which a memory of that type has expired."""
        return {kind: now_ns - int(age * 1e9) for kind, age in sorted(self.max_age.items())}

    def describe(self) -> dict[str, str]:
        return {kind: _period(age) for kind, age in sorted(self.max_age.items())}


def _period(seconds: float) -> str:
    for unit, size in (("y", 365 * 86400), ("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
