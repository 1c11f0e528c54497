"""The actor runtime: bounded typed mailboxes, request/reply with deadlines, supervision.

Why actors at all: every subsystem of a node (vault, store, indexer, ...) owns a resource that
must have exactly one writer (a DuckDB file, secret keys, a faiss index). Giving each one a task
and an inbox makes that ownership structural rather than a convention, and Trio's memory channels
give us backpressure for free: a full inbox blocks the sender, nothing is dropped.

Rules the runtime enforces:

* An inbox is bounded. ``Mailbox.address`` is the only thing other code gets; it can send, never
  receive.
* A request carries a one-shot :class:`Reply`. The caller waits with a deadline
  (:func:`call`) and gets a :data:`Result` back: ``Ok(value)`` or ``Err(reason)``. Errors are
  values, never exceptions thrown across actors, so a bug in one actor cannot unwind another.
* A :class:`Supervisor` starts actors in order (each says "ready" with ``task_status.started()``),
  restarts a crashed one with exponential backoff (one-for-one), and shuts the whole node down
  when one crashes too often in a window. A restart builds a fresh actor object (the spec's
  factory); the inbox outlives the crash, so queued requests are served by the new incarnation
  instead of being lost.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar, TypeVarTuple, Unpack

import trio

from dmgn.errors import error_for_code
from wire import sole_error, unwrapped

__all__ = [
    "Actor",
    "ActorCrashLoop",
    "ActorGone",
    "ActorSpec",
    "Address",
    "Err",
    "Mailbox",
    "Ok",
    "Reply",
    "ReplySink",
    "Request",
    "Result",
    "Supervisor",
    "ask",
    "call",
    "deliver",
    "expect",
    "reuse",
]

log = logging.getLogger("dmgn.actors")

T = TypeVar("T")
M = TypeVar("M")
Q = TypeVar("Q")
T_contra = TypeVar("T_contra", contravariant=True)
Ts = TypeVarTuple("Ts")

#: Default inbox size. Big enough to absorb bursts from a few clients, small enough that a stuck
#: actor pushes back on its callers within milliseconds instead of growing memory without bound.
DEFAULT_INBOX_CAPACITY = 64

#: A mailbox looks through the replies it holds for answered ones once it holds this many (and
#: again each time the unanswered ones double): rarely, yet the list stays small.
_PRUNE_AT_LEAST = 16

#: Default deadline for a request. Local actors answer in microseconds to milliseconds; anything
#: near a few seconds means the actor is wedged or gone, and the caller should say so.
DEFAULT_CALL_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Ok(Generic[T]):
    """A successful reply."""

    value: T


@dataclass(frozen=True, slots=True)
class Err:
    """A failed reply: ``reason`` is a sentence a user can read; ``code`` is for programs."""

    reason: str
    code: str = "error"


Result = Ok[T] | Err


class ReplySink(Protocol[T_contra]):
    """Where a :class:`Reply` puts its one result: a memory channel's sending end, or the
    lighter slot :func:`call` waits on."""

    def send_nowait(self, value: T_contra, /) -> None: ...

    def close(self) -> None: ...


class _Slot(Generic[T]):
    """The one result :func:`call` waits for, without a memory channel.

    A call is the hottest path of a node (every message between actors, every frame a peer
    sends us goes through a few): a channel pair per call, and a receive that goes through the
    scheduler even when the answer is already there, were ~4% of a 100-node sim's CPU. The
    slot parks the caller only if the answer has not come yet, and wakes it exactly once.
    """

    __slots__ = ("_abandoned", "_closed", "_result", "_waiter")

    def __init__(self) -> None:
        self._result: Result[T] | None = None
        self._waiter: trio.lowlevel.Task | None = None
        self._closed = False
        self._abandoned = False

    def send_nowait(self, result: Result[T]) -> None:
        if self._abandoned:
            raise trio.BrokenResourceError  # the caller left (deadline): nobody is listening
        self._result = result
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            trio.lowlevel.reschedule(self._waiter)
            self._waiter = None

    def abandon(self) -> None:
        self._abandoned = True

    async def wait(self) -> Result[T] | None:
        """The result, or None if the reply was closed without one. The caller has already
        passed a checkpoint (sending the request), so a result that is already here is
        returned without another trip through the scheduler."""
        if self._result is None and not self._closed:
            self._waiter = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                self._waiter = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        return self._result


class Reply(Generic[T]):
    """A one-shot reply slot carried inside a request message.

    Sending twice is a programming error in the actor, so the second send is ignored (and logged)
    rather than raising into the actor's loop. If the caller has already given up (deadline), the
    send is silently dropped: the actor must not be punished for a slow caller.
    """

    __slots__ = ("_send", "_used")

    def __init__(self, send: ReplySink[Result[T]]) -> None:
        self._send = send
        self._used = False

    @property
    def used(self) -> bool:
        return self._used

    def ok(self, value: T) -> None:
        self.send(Ok(value))

    def err(self, reason: str, code: str = "error") -> None:
        self.send(Err(reason, code))

    def send(self, result: Result[T]) -> None:
        if self._used:
            log.warning("reply sent twice; ignoring the second one")
            return
        self._used = True
        try:
            self._send.send_nowait(result)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the caller timed out and left; nobody is listening
        finally:
            self._send.close()


@dataclass(frozen=True, slots=True)
class Request(Generic[Q, T]):
    """A generic request message: a body the receiver understands, and where to answer.

    Lets an actor serve a request vocabulary declared in the domain layer (``dmgn.api``) without
    its clients importing the actor's module.
    """

    body: Q
    reply: Reply[T]


class Address(Generic[M]):
    """The sending side of an actor's inbox: what other code holds to talk to it."""

    __slots__ = ("_name", "_send")

    def __init__(self, name: str, send: trio.MemorySendChannel[M]) -> None:
        self._name = name
        self._send = send

    @property
    def name(self) -> str:
        return self._name

    async def send(self, message: M) -> None:
        """Deliver a message, waiting while the inbox is full (backpressure).

        Raises :class:`ActorGone` if the actor has stopped for good. See :func:`deliver`.
        """
        try:
            await deliver(self._send, message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ActorGone(self._name) from None

    def try_send(self, message: M) -> bool:
        """Deliver a message if the inbox has room now; False if it is full (nothing sent).

        For senders that would otherwise wait under a deadline of their own: the deadline's
        cancel scope costs more than the send, and the inbox is almost never full.
        Raises :class:`ActorGone` like :meth:`send`.
        """
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ActorGone(self._name) from None
        return True


async def deliver(channel: trio.MemorySendChannel[M], value: M) -> None:
    """``await channel.send(value)``, without a trip through the scheduler when there is room.

    A cancellation point always; a schedule point only when the channel is full and this task
    waits. Every message between actors passes here: with Trio's ``send`` each one cost the
    sender a scheduler pass of its own on top of the receiver's, about a quarter of all task
    steps in a 40-node sim. Fairness does not suffer: an actor yields as it takes its next
    message, and a sender that keeps a channel full waits like before.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        channel.send_nowait(value)
    except trio.WouldBlock:
        await channel.send(value)


class ActorGone(Exception):
    """The actor behind an address has stopped for good."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the {name} actor is not running")
        self.name = name


class Mailbox(Generic[M]):
    """A bounded inbox. The actor keeps the mailbox; everyone else gets ``address``."""

    def __init__(self, name: str, capacity: int = DEFAULT_INBOX_CAPACITY) -> None:
        send, receive = trio.open_memory_channel[M](capacity)
        self.name = name
        self._send = send
        self.receive = receive
        self.address: Address[M] = Address(name, send)
        #: The replies of requests taken and maybe not answered yet, oldest first: an actor may
        #: serve several at once (in tasks of its own), and a crash must answer every one, not
        #: leave callers waiting for their deadline. Answered ones are pruned as messages are
        #: taken (the newest at once, the rest when the list doubles), so this stays as long as
        #: the requests the actor really holds.
        self._unanswered: list[Reply[Any]] = []
        self._prune_at = _PRUNE_AT_LEAST

    @property
    def depth(self) -> int:
        """Messages waiting (not counting the one being handled)."""
        return self.receive.statistics().current_buffer_used

    def close(self) -> None:
        """Stop accepting messages: later sends fail fast with :class:`ActorGone`."""
        self.receive.close()
        self._send.close()

    def __aiter__(self) -> Mailbox[M]:
        return self

    async def __anext__(self) -> M:
        """Next message. A request's reply is remembered until it is answered, so that if the
        actor crashes with requests in hand the supervisor can answer their callers at once."""
        unanswered = self._unanswered
        while unanswered and unanswered[-1].used:
            unanswered.pop()  # the usual case: the request before this one was answered
        try:
            message = await self.receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
        reply = getattr(message, "reply", None)
        if isinstance(reply, Reply):
            unanswered.append(reply)
            if len(unanswered) >= self._prune_at:
                self._unanswered = [r for r in unanswered if not r.used]
                self._prune_at = max(_PRUNE_AT_LEAST, 2 * len(self._unanswered))
        return message

    def fail_unanswered(self, reason: str) -> None:
        """Answer every request taken and not yet answered with ``Err(reason)``."""
        replies, self._unanswered = self._unanswered, []
        self._prune_at = _PRUNE_AT_LEAST
        for reply in replies:
            if not reply.used:
                reply.err(reason, "actor_crashed")


async def call(
    address: Address[M],
    make_request: Callable[[Unpack[Ts], Reply[T]], M],
    *args: *Ts,
    timeout: float = DEFAULT_CALL_TIMEOUT,
) -> Result[T]:
    """Send ``make_request(*args, reply)`` with a fresh :class:`Reply` and wait for the answer.

    Message classes take their reply last, so ``await call(store, Get, ids)`` is typed end to
    end: the result type comes from the message's ``Reply[T]`` field.

    Never raises for actor-side trouble: a stopped actor, a deadline passed, or an actor that
    dropped the reply all come back as :class:`Err` with a sentence saying which.
    """
    slot: _Slot[T] = _Slot()
    try:
        with trio.move_on_after(timeout) as scope:
            try:
                await address.send(make_request(*args, Reply(slot)))
            except ActorGone as gone:
                return Err(str(gone), "actor_gone")
            result = await slot.wait()
            if result is None:
                return Err(
                    f"the {address.name} actor dropped the request without answering", "no_reply"
                )
            return result
    finally:
        slot.abandon()
    assert scope.cancelled_caught
    return Err(f"the {address.name} actor did not answer within {timeout:g}s", "timeout")


class Actor(Protocol):
    """What a supervisor runs: ``run`` serves until cancelled and says "ready" through
    ``task_status``."""

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


A = TypeVar("A", bound=Actor)


@dataclass(slots=True)
class ActorSpec(Generic[A]):
    """How to supervise one actor.

    ``factory`` builds each incarnation: the first when the supervisor starts it, a fresh one on
    every restart, so a crash leaves no half-updated state behind for the next incarnation to
    trip on. The ``mailbox`` belongs to the spec, not to an incarnation: it outlives the crash,
    which is what lets queued requests wait out a restart, so the factory builds its actor on
    that mailbox. (`reuse` is the factory for an actor that cannot yet be rebuilt.)
    """

    name: str
    factory: Callable[[], A]
    mailbox: Mailbox[Any] | None = None
    max_restarts: int = 5
    window: float = 60.0
    backoff_initial: float = 0.05
    backoff_max: float = 5.0
    on_stop: Callable[[], None] | None = None
    #: Run (in the supervisor's nursery) each time a *restarted* incarnation says it is ready:
    #: e.g. give a restarted gossip actor the connections that outlived its crash.
    on_restart: Callable[[], Awaitable[object]] | None = None
    _crashes: deque[float] = field(default_factory=deque)


def reuse(actor: A) -> Callable[[], A]:
    """A factory that gives the same object at every restart, for an actor that others still
    reach other than through its mailbox (by its attributes, or a mailbox it made itself and
    others already address), so a fresh object would leave them talking to the dead one. Its
    ``run()`` must itself rebuild whatever a crash can leave half-updated."""
    return lambda: actor


class ActorCrashLoop(Exception):
    """An actor crashed more than its budget allows; the node is being shut down."""

    def __init__(self, name: str, count: int, window: float, last: BaseException) -> None:
        super().__init__(
            f"the {name} actor crashed {count} times within {window:g}s "
            f"(last error: {type(last).__name__}: {last}); shutting the node down"
        )
        self.name = name
        self.last = last


class Supervisor:
    """Starts actors in dependency order and keeps them running.

    Use as ``async with Supervisor() as sup: await sup.start(spec)``. Leaving the block (or
    calling :meth:`shutdown`) cancels every actor at once; Trio gives no stop order, so actors
    make their state durable before acknowledging anything rather than at shutdown. ``on_stop``
    hooks then run in reverse start order (to close mailboxes, so late callers fail fast).
    """

    def __init__(
        self,
        clock: Callable[[], float] | None = None,
        *,
        on_crash: Callable[[str], None] | None = None,
    ) -> None:
        # time.monotonic looked up now, not at import (the sims make it virtual for a run).
        self._clock = clock if clock is not None else time.monotonic
        #: Told the actor's name on each crash that is followed by a restart (metrics).
        self._on_crash = on_crash
        self._nursery: trio.Nursery | None = None
        self._lifetime_cm: AbstractAsyncContextManager[Supervisor] | None = None
        self._specs: list[ActorSpec[Any]] = []
        self._running: dict[str, Actor] = {}  # name -> the incarnation built last
        self.failure: ActorCrashLoop | None = None

    async def __aenter__(self) -> Supervisor:
        self._lifetime_cm = self._lifetime()
        return await self._lifetime_cm.__aenter__()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._lifetime_cm is not None
        return await self._lifetime_cm.__aexit__(kind, error, traceback)

    @asynccontextmanager
    async def _lifetime(self) -> AsyncIterator[Supervisor]:
        """One nursery for every actor; on *every* way out (normal exit, an exception in the
        block, a crash loop, cancellation) the actors are cancelled, then mailboxes are closed
        and ``on_stop`` hooks run in reverse start order."""
        try:
            # Callers of a node want "cannot open store", not a one-leaf exception tree.
            with unwrapped():
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    try:
                        yield self
                    finally:
                        # Leaving the block means "stop the node", not "wait for actors to
                        # finish": actors run forever by design.
                        nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._run_stop_hooks()
        if self.failure is not None:
            raise self.failure

    def _run_stop_hooks(self) -> None:
        for spec in reversed(self._specs):
            if spec.mailbox is not None:
                spec.mailbox.close()
            if spec.on_stop is not None:
                try:
                    spec.on_stop()
                except Exception:  # one hook's bug must not keep the others from running
                    log.exception("stop hook of the %s actor failed", spec.name)

    async def start(self, spec: ActorSpec[A]) -> A:
        """Start an actor and wait until it says it is ready (a failure to start raises);
        the first incarnation, for what the caller reads from it (a bound address)."""
        assert self._nursery is not None, "use Supervisor as an async context manager"
        self._specs.append(spec)
        actor = self._running[spec.name] = spec.factory()
        await self._nursery.start(self._supervise, spec, actor)
        return actor

    def running(self, name: str) -> Actor | None:
        """The incarnation of the actor ``name`` built last (sims inspect a node's state
        through it); None if no actor of that name was started."""
        return self._running.get(name)

    def shutdown(self) -> None:
        """Cancel every actor; the ``async with`` block then exits."""
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _supervise(
        self,
        spec: ActorSpec[A],
        actor: A,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        status = _TrackingStatus(task_status)
        backoff = spec.backoff_initial
        incarnation: A | None = actor
        while True:
            try:
                # The actor runs inline in this supervising task, so its exceptions arrive here
                # unwrapped. Before it says "started", a failure belongs to whoever called
                # `start` (a node that cannot open its store should say so, not spin); after,
                # it is a crash to restart (a factory that fails to rebuild it is one too).
                if incarnation is None:
                    incarnation = self._running[spec.name] = spec.factory()
                await incarnation.run(task_status=status)
                return
            except Exception as error:  # any crash is the supervisor's to restart or report
                if not status.started_once:
                    raise
                if not self._record_crash(spec, error):
                    return
            incarnation = None
            await trio.sleep(backoff)
            backoff = min(spec.backoff_max, backoff * 2)
            status = _TrackingStatus(
                trio.TASK_STATUS_IGNORED, started_once=True, on_ready=self._restart_hook(spec)
            )

    def _restart_hook(self, spec: ActorSpec[Any]) -> Callable[[], None] | None:
        hook, nursery = spec.on_restart, self._nursery
        if hook is None or nursery is None:
            return None
        return lambda: nursery.start_soon(hook)

    def inbox_depths(self) -> list[tuple[str, int]]:
        """Messages waiting in each supervised actor's inbox (for metrics)."""
        return [(s.name, s.mailbox.depth) for s in self._specs if s.mailbox is not None]

    def _record_crash(self, spec: ActorSpec[Any], crash: Exception) -> bool:
        """Log a crash; return False (and stop the node) when the crash budget is spent."""
        error = sole_error(crash)  # an actor's own nursery wraps what its tasks raised
        if spec.mailbox is not None:
            spec.mailbox.fail_unanswered(
                f"the {spec.name} actor crashed while handling this request "
                f"({type(error).__name__}: {error}); it is being restarted"
            )
        now = self._clock()
        spec._crashes.append(now)
        while spec._crashes and now - spec._crashes[0] > spec.window:
            spec._crashes.popleft()
        log.error(
            "actor %s crashed: %s: %s", spec.name, type(error).__name__, error, exc_info=error
        )
        if len(spec._crashes) > spec.max_restarts:
            self.failure = ActorCrashLoop(spec.name, len(spec._crashes), spec.window, error)
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()
            return False
        if self._on_crash is not None:
            self._on_crash(spec.name)
        return True


class _TrackingStatus:
    """Wraps a ``TaskStatus`` to remember whether the actor has said it is ready."""

    def __init__(
        self,
        inner: trio.TaskStatus[None],
        started_once: bool = False,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self._inner = inner
        self.started_once = started_once
        self._on_ready = on_ready

    def started(self, value: None = None) -> None:
        if self._inner is not trio.TASK_STATUS_IGNORED and not self.started_once:
            self._inner.started(value)
        self.started_once = True
        on_ready, self._on_ready = self._on_ready, None
        if on_ready is not None:
            on_ready()


async def ask(
    address: Address[Request[Q, T]], body: Q, timeout: float = DEFAULT_CALL_TIMEOUT
) -> Result[T]:
    """:func:`call` for actors that serve :class:`Request` messages."""
    # Plain `Request`, not `Request[Q, T]`: instantiating a subscripted generic sets
    # `__orig_class__`, which a frozen slotted dataclass refuses.
    make: Callable[[Q, Reply[T]], Request[Q, T]] = Request
    return await call(address, make, body, timeout=timeout)


async def expect(result: Result[T]) -> T:
    """Unwrap an actor reply, turning ``Err`` back into the typed user-facing error."""
    if isinstance(result, Err):
        raise error_for_code(result.code, result.reason)
    return result.value
