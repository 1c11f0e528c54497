"""What a nursery raised, as the one error it is: the unwrap the WebSocket adapter, the actor
supervisor and the node's entry point all need.

Trio nurseries wrap whatever their tasks raise in an exception group, even a single error. A
caller of a dial catches `WireError`, a person starting a node wants "cannot open store", and a
log line wants the error an actor raised, not a one-leaf exception tree. It lives in `wire`, the
lowest layer that opens nurseries (its WebSocket adapter), so that everything above shares it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio

__all__ = ["sole_error", "unwrapped"]


def sole_error(error: BaseException) -> BaseException:
    """The one real error inside nested exception groups (cancellations aside), or ``error``
    itself when there are several or none."""
    leaves = [e for e in _leaves(error) if not isinstance(e, trio.Cancelled)]
    return leaves[0] if len(leaves) == 1 else error


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


@contextmanager
def unwrapped() -> Iterator[None]:
    """Let an exception group raised in the block leave as its `sole_error` when it has one
    (the group itself when it holds several errors, or only cancellations, so trio still sees
    those)."""
    try:
        yield
    except BaseExceptionGroup as group:
        sole = sole_error(group)
        if sole is not group:
            raise sole from None
        raise
