"""A nursery's one error leaves as itself; several errors, or only cancellations, stay a group."""

from __future__ import annotations

import pytest
import trio

from wire import ConnectionClosed, sole_error, unwrapped


async def _fail(error: BaseException) -> None:
    raise error


async def test_the_one_error_of_a_nursery_leaves_as_itself() -> None:
    error = ConnectionClosed("refused")
    with pytest.raises(ConnectionClosed) as caught, unwrapped():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_fail, error)
    assert caught.value is error


async def test_nested_groups_unwrap_to_their_one_leaf() -> None:
    error = ValueError("deep")
    with pytest.raises(ValueError) as caught, unwrapped():
        async with trio.open_nursery() as outer:
            outer.start_soon(_nested, error)
    assert caught.value is error


async def _nested(error: BaseException) -> None:
    async with trio.open_nursery() as inner:
        inner.start_soon(_fail, error)


async def test_several_errors_stay_a_group() -> None:
    with pytest.raises(BaseExceptionGroup) as caught, unwrapped():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_fail, ValueError("one"))
            nursery.start_soon(_fail, KeyError("two"))
    assert len(caught.value.exceptions) == 2


async def test_cancellations_are_not_the_error() -> None:
    error = OSError("cannot listen")
    group = BaseExceptionGroup("", [error, BaseExceptionGroup("", [await _a_cancellation()])])
    assert sole_error(group) is error
    only_cancelled = BaseExceptionGroup("", [await _a_cancellation()])
    assert sole_error(only_cancelled) is only_cancelled


async def _a_cancellation() -> trio.Cancelled:
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as cancelled:
            return cancelled
    raise AssertionError("a cancelled scope raises Cancelled at its first checkpoint")
