"""Gossip's wire vocabulary: the schemas of ``gossip.vector``, ``gossip.want``, ``gossip.ops``.

Registered with ``wire``'s schema registry, so a peer's message is validated (types, sizes, list
lengths) before gossip reads a field of it. The protocol itself is described in
:mod:`actors.gossip`.
"""

from __future__ import annotations

from collections.abc import Sequence

from actors._gossip_limits import MAX_BATCH_ENTRIES
from dmgn.feed import (
    MAX_ENTRY_BYTES,
    MAX_SEQ,
    MAX_VECTOR_DEVICES,
    VersionVector,
)
from wire import (
    BASE_REGISTRY,
    Bool,
    Bytes,
    Int,
    ListOf,
    MapOf,
    Message,
    MessageType,
    Str,
    Value,
)

# -- wire messages ------------------------------------------------------------------------------

_DEVICE_HEX = Str(32, 32)
VECTOR = MessageType(
    "gossip.vector",
    {
        "heads": MapOf(_DEVICE_HEX, Int(0, MAX_SEQ), MAX_VECTOR_DEVICES),
        "ask": Bool(),
    },
)
WANT = MessageType(
    "gossip.want",
    {
        "device": Bytes(16, 16),
        "first": Int(1, MAX_SEQ),
        "last": Int(1, MAX_SEQ),
    },
)
OPS = MessageType(
    "gossip.ops",
    {
        "entries": ListOf(Bytes(MAX_ENTRY_BYTES, 1), max_items=MAX_BATCH_ENTRIES, min_items=1),
    },
)
GOSSIP_MESSAGE_TYPES = (VECTOR, WANT, OPS)
#: What a transport connection between two devices accepts: the base types plus gossip's.
GOSSIP_REGISTRY = BASE_REGISTRY.extended(*GOSSIP_MESSAGE_TYPES)


def _vector_message(heads: VersionVector | dict[str, int], *, ask: bool) -> Message:
    wire_heads: dict[str, Value] = dict(
        (heads if isinstance(heads, dict) else heads.to_wire()).items()
    )
    return VECTOR(heads=wire_heads, ask=ask)


def _ops_message(entries: Sequence[bytes]) -> Message:
    return OPS(entries=list[Value](entries))
