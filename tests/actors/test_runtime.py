"""The actor runtime's guarantees, as specifications."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from actors.runtime import (
    ActorCrashLoop,
    ActorGone,
    ActorSpec,
    Err,
    Mailbox,
    Ok,
    Reply,
    Supervisor,
    call,
    deliver,
    reuse,
)


@dataclass(frozen=True, slots=True)
class Echo:
    text: str
    reply: Reply[str]


@dataclass(frozen=True, slots=True)
class Boom:
    reply: Reply[str]


Msg = Echo | Boom


class EchoActor:
    """Echoes; crashes on Boom. Counts its starts and keeps what it echoed, so tests can see
    restarts and what state an incarnation starts with."""

    def __init__(self, mailbox: Mailbox[Msg] | None = None) -> None:
        self.mailbox: Mailbox[Msg] = mailbox or Mailbox("echo", capacity=2)
        self.starts = 0
        self.echoed: list[str] = []
        #: The incarnations built on this one's mailbox by restarts (see `spec`).
        self.restarts: list[EchoActor] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.starts += 1
        task_status.started()
        async for msg in self.mailbox:
            if isinstance(msg, Boom):
                raise RuntimeError("boom")
            self.echoed.append(msg.text)
            msg.reply.ok(msg.text.upper())


def spec(actor: EchoActor, **kw: float) -> ActorSpec[EchoActor]:
    """``actor`` is the first incarnation; each restart builds a fresh one on its mailbox."""
    first = [actor]

    def build() -> EchoActor:
        if first:
            return first.pop()
        fresh = EchoActor(actor.mailbox)
        actor.restarts.append(fresh)
        return fresh

    return ActorSpec("echo", build, actor.mailbox, **kw)  # type: ignore[arg-type]


class Broken:
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise OSError("cannot open store")


async def test_request_reply_returns_ok_value() -> None:
    actor = EchoActor()
    async with Supervisor() as sup:
        await sup.start(spec(actor))
        assert await call(actor.mailbox.address, Echo, "hi") == Ok("HI")


async def test_crashed_actor_is_restarted_and_serves_queued_requests() -> None:
    actor = EchoActor()
    async with Supervisor() as sup:
        await sup.start(spec(actor, backoff_initial=0.01))
        result = await call(actor.mailbox.address, Boom, timeout=1)
        # The caller of the crashing request hears at once why, as a value.
        assert isinstance(result, Err) and result.code == "actor_crashed"
        assert "crashed while handling this request (RuntimeError: boom)" in result.reason
        assert await call(actor.mailbox.address, Echo, "again", timeout=5) == Ok("AGAIN")
        assert actor.starts == 1 and [again.starts for again in actor.restarts] == [1]


async def test_a_restarted_actor_is_a_fresh_object_with_fresh_state() -> None:
    actor = EchoActor()
    async with Supervisor() as sup:
        first = await sup.start(spec(actor, backoff_initial=0.01))
        assert first is actor
        assert await call(actor.mailbox.address, Echo, "before") == Ok("BEFORE")
        crashed = await call(actor.mailbox.address, Boom, timeout=1)
        assert isinstance(crashed, Err) and crashed.code == "actor_crashed"
        assert await call(actor.mailbox.address, Echo, "after", timeout=5) == Ok("AFTER")
    [restarted] = actor.restarts
    assert restarted is not actor
    # Nothing the crashed incarnation held is carried over; only its inbox is.
    assert actor.echoed == ["before"]
    assert restarted.echoed == ["after"]


class ConcurrentActor:
    """Serves each Echo in a task of its own, answering only when released; crashes on Boom."""

    def __init__(self) -> None:
        self.mailbox: Mailbox[Msg] = Mailbox("concurrent", capacity=8)
        self.release = trio.Event()
        self.holding = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with trio.open_nursery() as nursery:
            async for msg in self.mailbox:
                if isinstance(msg, Boom):
                    raise RuntimeError("boom")
                nursery.start_soon(self._serve, msg)

    async def _serve(self, msg: Echo) -> None:
        self.holding += 1
        await self.release.wait()
        msg.reply.ok(msg.text)


async def test_a_crash_answers_every_request_the_actor_held_not_only_the_last() -> None:
    actor = ConcurrentActor()
    results: dict[str, object] = {}

    async def ask_echo(text: str) -> None:
        results[text] = await call(actor.mailbox.address, Echo, text, timeout=30)

    with trio.fail_after(5):  # far below the calls' own deadline: nobody waits for it
        async with Supervisor() as sup:
            concurrent = ActorSpec("concurrent", reuse(actor), actor.mailbox)
            await sup.start(concurrent)
            async with trio.open_nursery() as callers:
                for text in ("one", "two", "three"):
                    callers.start_soon(ask_echo, text)
                await trio.testing.wait_all_tasks_blocked()
                assert actor.holding == 3
                crashed = await call(actor.mailbox.address, Boom, timeout=30)
            sup.shutdown()
    assert isinstance(crashed, Err) and crashed.code == "actor_crashed"
    for text in ("one", "two", "three"):
        answer = results[text]
        assert isinstance(answer, Err) and answer.code == "actor_crashed", (text, answer)
        assert "RuntimeError: boom" in answer.reason


async def test_answered_requests_are_not_held_by_the_mailbox() -> None:
    actor = EchoActor()
    async with Supervisor() as sup:
        await sup.start(spec(actor))
        for n in range(200):
            assert await call(actor.mailbox.address, Echo, str(n)) == Ok(str(n))
        assert len(actor.mailbox._unanswered) <= 1


async def test_too_many_crashes_shut_the_node_down() -> None:
    actor = EchoActor()
    with pytest.raises(ActorCrashLoop, match="echo actor crashed 3 times"):
        async with Supervisor() as sup:
            await sup.start(spec(actor, max_restarts=2, backoff_initial=0.001))
            for _ in range(3):
                await call(actor.mailbox.address, Boom, timeout=1)
            await trio.sleep_forever()


async def test_start_failure_propagates_to_the_starter() -> None:
    with pytest.raises(OSError, match="cannot open store"):
        async with Supervisor() as sup:
            await sup.start(ActorSpec("broken", Broken))


async def test_full_mailbox_blocks_sender_and_drops_nothing() -> None:
    mailbox: Mailbox[int] = Mailbox("slow", capacity=2)
    received: list[int] = []
    async with trio.open_nursery() as nursery:
        sent: list[int] = []

        async def sender() -> None:
            for i in range(5):
                await mailbox.address.send(i)
                sent.append(i)

        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        assert sent == [0, 1]  # third send is blocked by the full inbox
        for _ in range(5):
            received.append(await mailbox.receive.receive())
    assert received == [0, 1, 2, 3, 4]


def test_try_send_delivers_while_there_is_room_and_refuses_without_queueing_when_full() -> None:
    mailbox: Mailbox[int] = Mailbox("small", capacity=2)
    assert mailbox.address.try_send(1) is True
    assert mailbox.address.try_send(2) is True
    assert mailbox.address.try_send(3) is False  # full: refused, not queued behind the others
    assert [mailbox.receive.receive_nowait() for _ in range(2)] == [1, 2]
    with pytest.raises(trio.WouldBlock):
        mailbox.receive.receive_nowait()
    mailbox.close()
    with pytest.raises(ActorGone, match="the small actor is not running"):
        mailbox.address.try_send(4)


async def test_request_to_stopped_actor_fails_fast_with_clear_error() -> None:
    actor = EchoActor()
    actor.mailbox.close()
    with trio.fail_after(1):
        result = await call(actor.mailbox.address, Echo, "x")
    assert result == Err("the echo actor is not running", "actor_gone")


async def test_request_to_wedged_actor_times_out(autojump_clock: trio.testing.MockClock) -> None:
    mailbox: Mailbox[Echo] = Mailbox("wedged", capacity=4)
    result = await call(mailbox.address, Echo, "x", timeout=2)
    assert isinstance(result, Err) and result.code == "timeout"
    assert "did not answer within 2s" in result.reason


async def test_shutdown_leaves_no_task_behind() -> None:
    actor = EchoActor()
    before = len(trio.lowlevel.current_root_task().child_nurseries)
    async with Supervisor() as sup:
        await sup.start(spec(actor))
        nursery = trio.lowlevel.current_task().child_nurseries[-1]
        assert len(nursery.child_tasks) == 1
    assert nursery.child_tasks == frozenset()
    assert len(trio.lowlevel.current_root_task().child_nurseries) == before
    # And the mailbox is closed, so later callers hear "not running" at once.
    result = await call(actor.mailbox.address, Echo, "x")
    assert isinstance(result, Err) and result.code == "actor_gone"


async def test_reply_after_caller_gave_up_does_not_raise() -> None:
    send, receive = trio.open_memory_channel[Ok[int] | Err](1)
    receive.close()
    reply = Reply[int](send)
    reply.ok(1)  # must not raise into the actor (this line raising fails the test)
    assert reply.used
    with pytest.raises(trio.ClosedResourceError):
        send.send_nowait(Ok(2))  # the reply closed its end after its one answer


@pytest.mark.parametrize("way_out", ["normal", "error in the block", "crash loop", "start fails"])
async def test_every_way_out_closes_mailboxes_and_runs_stop_hooks(way_out: str) -> None:
    actor = EchoActor()
    stopped: list[str] = []
    failure = (OSError, ValueError, ActorCrashLoop)
    with pytest.raises(failure) if way_out != "normal" else contextlib.nullcontext():
        async with Supervisor() as sup:
            echo = spec(actor, max_restarts=0, backoff_initial=0.001)
            echo.on_stop = lambda: stopped.append("echo")
            await sup.start(echo)
            if way_out == "error in the block":
                raise ValueError("the caller failed")
            if way_out == "crash loop":
                await call(actor.mailbox.address, Boom, timeout=1)
                await trio.sleep_forever()
            if way_out == "start fails":
                await sup.start(ActorSpec("broken", Broken))
    assert stopped == ["echo"]
    result = await call(actor.mailbox.address, Echo, "late", timeout=1)
    assert isinstance(result, Err) and result.code == "actor_gone"


async def test_a_reply_given_after_the_deadline_is_dropped_and_the_caller_got_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mailbox: Mailbox[Echo] = Mailbox("slow", capacity=4)
    got: list[object] = []

    async def caller() -> None:
        got.append(await call(mailbox.address, Echo, "hi", timeout=1.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        message = await mailbox.receive.receive()
        await trio.sleep(5)  # the caller has given up
        message.reply.ok("late")  # must not raise into the actor, nor reach anyone
    (result,) = got
    assert isinstance(result, Err) and result.code == "timeout"


async def test_a_reply_closed_without_an_answer_is_no_reply() -> None:
    mailbox: Mailbox[Echo] = Mailbox("dropper", capacity=4)

    async def dropper() -> None:
        message = await mailbox.receive.receive()
        message.reply._send.close()  # what a reply left unanswered by a dying actor does

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dropper)
        result = await call(mailbox.address, Echo, "hi")
    assert isinstance(result, Err) and result.code == "no_reply"


async def test_deliver_is_a_cancellation_point_and_waits_only_when_the_channel_is_full() -> None:
    send, receive = trio.open_memory_channel[int](1)
    await deliver(send, 1)  # room: delivered at once
    with trio.move_on_after(0.05) as blocked:
        await deliver(send, 2)  # full: waits (backpressure)
    assert blocked.cancelled_caught
    assert receive.receive_nowait() == 1
    with trio.CancelScope() as scope:
        scope.cancel()
        await deliver(send, 3)  # cancelled before it sends: nothing delivered
    assert scope.cancelled_caught
    with pytest.raises(trio.WouldBlock):
        receive.receive_nowait()
