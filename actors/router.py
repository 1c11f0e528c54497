"""The query router: a query answered here first, then by our other devices that may hold more.

Who is asked: only **devices** - peers of our own identity, authenticated by the Noise handshake
and told to us by the peering actor. A storage peer (another identity) is never announced to this
actor, and the router refuses to send to a peer that is not a device besides, so query text
never reaches another identity's node (docs/design.md, "Sync, shards, queries").

Which devices: those that may hold what this one lacks. Every device tells the others its
replica policy (``query.hello``): ``full`` keeps every memory, ``recent:<days>`` only the
memories of the last days (older envelopes are dropped from its store and index; their feed
entries still sync). A device asks the devices whose window is wider than its own, and none
when the query's ``after`` filter falls inside its own window. A full device therefore
answers from its own store alone; what it lacks is only what gossip has not delivered yet
(``dmgn status`` shows how far behind it is), and gossip closes that gap on its own.

How answers merge: scores are comparable across devices (same embedder, same scoring), so
the results are merged by score, deduplicated by memory id (the best score wins), and cut to the
request's limit; a ``recent`` listing merges by time instead. The answer names every device
that was asked and whether it answered, and is ``partial`` when a device that may hold more did
not answer in time, is offline, or when no wider device is known at all.

Protocol (registered with ``wire``'s schema registry next to gossip's):

* ``query.hello {replica_days}``: sent to each device when it connects (0 = full).
* ``query.request {qid, request}``: ``request`` is the msgpack of a ``dmgn.api`` query
  (``QueryMemories.to_wire()``), validated on receipt by ``dmgn.api.request_from_wire`` - the
  same validation every other door into the node applies.
* ``query.response {qid, results[, code, error]}``: each result is the msgpack of one result
  map, checked field by field (:func:`check_result`) before it is merged.

Bounds: a device may have :data:`MAX_REMOTE_INFLIGHT` queries running here at once (more are
answered ``busy``); a response carries at most :data:`MAX_RESPONSE_BYTES` (results beyond are
left out and the asker's answer is marked partial).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, assert_never

import msgpack
import trio

from actors.runtime import Address, Err, Mailbox, Reply, Request, call
from dmgn import api
from dmgn.errors import DmgnError
from wire import Bytes, Int, ListOf, Message, MessageType, Str, Value

log = logging.getLogger("dmgn.router")

__all__ = [
    "QUERY_MESSAGE_TYPES",
    "DeviceAnswer",
    "FanOut",
    "Inbound",
    "LocalQuery",
    "PeerDown",
    "PeerUp",
    "QueryRouter",
    "Routed",
    "RouterMsg",
    "RouterState",
    "RouterStatus",
    "check_result",
    "merge_results",
]

# -- limits -------------------------------------------------------------------------------------

#: A query request on the wire: a 10,000-character text and a 4,096-number embedding come to
#: ~50 KiB of msgpack; 256 KiB leaves room without letting a device make us buffer megabytes.
MAX_REQUEST_BYTES = 256 * 1024
#: One result map (a snippet, or a whole memory with ``include_content``: memories are capped at
#: 1 MiB of content by the envelope format, plus field names).
MAX_RESULT_BYTES = 1024 * 1024 + 4096
#: A whole response. Results past this are left out (and the asker says "partial"): 4 MiB is a
#: fraction of wire's 16 MiB reassembly cap and under a second on a slow LAN.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
#: Queries one device may have running on this node at once. An honest device runs one per
#: query its user makes; a few in parallel (an agent and a person) fit under this.
MAX_REMOTE_INFLIGHT = 8
#: Deadline for answering a device's query from the local index. The asker gives up after its
#: own ``query_timeout``; this only bounds the work a stuck local search could pin here.
REMOTE_DEADLINE = 30.0
#: Messages queued to one device's connection (its forwarder drains them to the transport).
PEER_QUEUE = 16
_QID_MAX = 2**62
_DAY_NS = 86_400 * 1_000_000_000

# -- wire messages ------------------------------------------------------------------------------

HELLO = MessageType("query.hello", {"replica_days": Int(0, 1_000_000)})
REQUEST = MessageType(
    "query.request",
    {"qid": Int(0, _QID_MAX), "request": Bytes(MAX_REQUEST_BYTES, 1)},
)
RESPONSE = MessageType(
    "query.response",
    {
        "qid": Int(0, _QID_MAX),
        "results": ListOf(Bytes(MAX_RESULT_BYTES, 1), max_items=api.MAX_LIMIT),
        "code": Str(64),
        "error": Str(512),
    },
    optional=frozenset({"code", "error"}),
)
QUERY_MESSAGE_TYPES = (HELLO, REQUEST, RESPONSE)

# -- messages -----------------------------------------------------------------------------------

#: What the router asks the memory service to answer from this node alone (never routed again,
#: so two devices cannot bounce a query between them).
LocalQuery = Request[api.QueryMemories, api.Response]


@dataclass(frozen=True, slots=True)
class PeerUp:
    """A device connected. ``send`` carries this actor's messages to it; the actor closes it on
    :class:`PeerDown` (or when it replaces the peer)."""

    peer_id: str
    device_id: bytes
    is_device: bool
    send: trio.MemorySendChannel[Message]


@dataclass(frozen=True, slots=True)
class PeerDown:
    peer_id: str


@dataclass(frozen=True, slots=True)
class Inbound:
    """A ``query.*`` message from a peer, decoded and schema-checked by the transport."""

    peer_id: str
    message: Message


@dataclass(frozen=True, slots=True)
class DeviceAnswer:
    device_id: str
    replica: str
    asked: bool
    answered: bool
    results: int
    ms: float | None
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "replica": self.replica,
            "asked": self.asked,
            "answered": self.answered,
            "results": self.results,
            "ms": self.ms,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class Routed:
    results: list[dict[str, Any]]
    devices: tuple[DeviceAnswer, ...]
    partial: bool
    partial_reason: str | None


@dataclass(frozen=True, slots=True)
class FanOut:
    """Ask the devices that may hold more than ``local`` (this node's own answer to
    ``request``) and merge; answered within the router's ``query_timeout``."""

    request: api.QueryMemories
    local: tuple[dict[str, Any], ...]
    reply: Reply[Routed]


@dataclass(frozen=True, slots=True)
class RouterStatus:
    replica: str
    devices: tuple[tuple[str, str, bool], ...]  # (device id, replica, connected)
    received: tuple[tuple[str, int], ...]  # query.* message types received, with counts
    served: int  # queries answered for other devices


@dataclass(frozen=True, slots=True)
class RouterState:
    reply: Reply[RouterStatus]


RouterMsg = PeerUp | PeerDown | Inbound | FanOut | RouterState


def replica_name(days: int | None) -> str:
    return "full" if days is None else f"recent:{days}"


# -- validation and merging ---------------------------------------------------------------------

_RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "memory_id": (str,),
    "id": (str,),
    "type": (str,),
    "timestamp": (int,),
    "timestamp_rfc3339": (str,),
    "content": (str,),
    "snippet": (str,),
    "score": (float, int),
    "vector_score": (float, int),
    "text_score": (float, int),
}
#: A ``recent`` listing is not ranked, so its results carry no score.
_REQUIRED = ("id", "type", "timestamp")


class BadResult(ValueError):
    """A device sent a result this node cannot show."""


def check_result(document: object) -> dict[str, Any]:
    """Check one result map from a device (untrusted input, though authenticated).

    Fields this node does not know are dropped rather than refused, so a device running a newer
    version that adds a field still answers an older one; known fields must have their type."""
    if not isinstance(document, dict):
        raise BadResult("a result must be a map")
    kept: dict[str, Any] = {}
    for name, value in document.items():
        kinds = _RESULT_FIELDS.get(name) if isinstance(name, str) else None
        if kinds is None:
            continue
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise BadResult(f"result field {name!r} has the wrong type")
        kept[name] = value
    for name in _REQUIRED:
        if name not in kept:
            raise BadResult(f"result lacks {name!r}")
    memory_id = kept["id"]
    if len(memory_id) != 64 or any(c not in "0123456789abcdef" for c in memory_id):
        raise BadResult("result id is not a memory id")
    if "score" in kept and not math.isfinite(float(kept["score"])):
        raise BadResult("result score is not finite")
    return kept


def _score(result: dict[str, Any]) -> float:
    return float(result.get("score", 0.0))


def is_listing(request: api.QueryMemories) -> bool:
    """A query without text or embedding lists the most recent memories (no ranking)."""
    return request.recent or (not (request.text and request.text.strip()) and not request.embedding)


def merge_results(
    answers: list[list[dict[str, Any]]], limit: int, *, recent: bool
) -> list[dict[str, Any]]:
    """Merge result lists: dedupe by id (best score, then the first list's copy), order by score
    (highest first, newer first on ties) - or by time for a ``recent`` listing, which is shown
    oldest first like ``tail`` - and keep ``limit``."""
    best: dict[str, dict[str, Any]] = {}
    for results in answers:
        for result in results:
            held = best.get(result["id"])
            if held is None or _score(result) > _score(held):
                best[result["id"]] = result
    if recent:
        newest = sorted(best.values(), key=lambda r: (r["timestamp"], r["id"]), reverse=True)
        return list(reversed(newest[:limit]))
    ranked = sorted(best.values(), key=lambda r: (_score(r), r["timestamp"], r["id"]), reverse=True)
    return ranked[:limit]


# -- the actor ----------------------------------------------------------------------------------


@dataclass
class _Device:
    peer_id: str
    device_id: bytes
    send: trio.MemorySendChannel[Message] | None
    #: None until its hello arrives; then 0 for full, else its window in days.
    replica_days: int | None = None
    hello: bool = False
    inflight: int = 0

    @property
    def window_days(self) -> float:
        if not self.hello:
            return math.inf  # not told yet: it may hold anything
        return math.inf if self.replica_days == 0 else float(self.replica_days or 0)

    @property
    def replica(self) -> str:
        if not self.hello:
            return "unknown"
        return replica_name(None if self.replica_days == 0 else self.replica_days)


@dataclass
class _Pending:
    device: str
    started: float
    done: trio.Event = field(default_factory=trio.Event)
    results: list[dict[str, Any]] | None = None
    error: str | None = None
    truncated: bool = False


class QueryRouter:
    def __init__(
        self,
        local: Address[LocalQuery],
        *,
        replica_days: int | None = None,
        query_timeout: float = 2.0,
        wall_clock: Callable[[], int] = time.time_ns,
        mailbox: Mailbox[RouterMsg] | None = None,
    ) -> None:
        self.mailbox: Mailbox[RouterMsg] = mailbox or Mailbox("router", 64)
        self._local = local
        self._replica_days = replica_days
        self._timeout = query_timeout
        self._wall_clock = wall_clock
        #: Every device seen since start, by peer id; ``send`` is None while it is offline.
        self._devices: dict[str, _Device] = {}
        self._pending: dict[int, _Pending] = {}
        self._next_qid = 1
        self._received: dict[str, int] = {}
        self._served = 0
        self._nursery: trio.Nursery | None = None

    @property
    def address(self) -> Address[RouterMsg]:
        return self.mailbox.address

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            # After a crash the devices' channels are still open (peering holds the other end),
            # so sessions carry on; the fan-outs and answers in flight died with the nursery.
            for device in self._devices.values():
                device.inflight = 0
            self._pending.clear()
            task_status.started()
            async for message in self.mailbox:
                match message:
                    case PeerUp():
                        self._peer_up(message)
                    case PeerDown():
                        self._peer_down(message.peer_id)
                    case Inbound():
                        self._inbound(message)
                    case FanOut():
                        nursery.start_soon(self._fan_out, message)
                    case RouterState():
                        message.reply.ok(self._status())
                    case _:
                        assert_never(message)

    # -- peers -----------------------------------------------------------------------------

    def _peer_up(self, message: PeerUp) -> None:
        if not message.is_device:
            # Peering announces devices only; this is the second fence.
            log.warning("router: refusing storage peer %s", message.peer_id)
            message.send.close()
            return
        device = self._devices.get(message.peer_id)
        if device is None:
            device = self._devices[message.peer_id] = _Device(
                message.peer_id, message.device_id, None
            )
        if device.send is not None:
            device.send.close()
        device.send = message.send
        device.inflight = 0
        days = 0 if self._replica_days is None else self._replica_days
        self._offer(device, HELLO(replica_days=days))

    def _peer_down(self, peer_id: str) -> None:
        device = self._devices.get(peer_id)
        if device is None or device.send is None:
            return
        device.send.close()
        device.send = None
        for pending in self._pending.values():
            if pending.device == peer_id and not pending.done.is_set():
                pending.error = "disconnected"
                pending.done.set()

    def _offer(self, device: _Device, message: Message) -> bool:
        if device.send is None:
            return False
        try:
            device.send.send_nowait(message)
        except trio.WouldBlock:
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            device.send = None
            return False
        return True

    # -- inbound ---------------------------------------------------------------------------

    def _inbound(self, message: Inbound) -> None:
        kind = message.message.type
        self._received[kind] = self._received.get(kind, 0) + 1
        device = self._devices.get(message.peer_id)
        if device is None or device.send is None:
            log.warning(
                "router: ignoring %s from %s, not a connected device", kind, message.peer_id
            )
            return
        fields = message.message.fields
        match kind:
            case HELLO.name:
                device.replica_days = message.message.get_int("replica_days")
                device.hello = True
            case REQUEST.name:
                qid = message.message.get_int("qid")
                if device.inflight >= MAX_REMOTE_INFLIGHT:
                    self._offer(device, _error(qid, "busy", "too many queries at once"))
                    return
                device.inflight += 1
                assert self._nursery is not None
                self._nursery.start_soon(
                    self._serve, device, qid, message.message.get_bytes("request")
                )
            case RESPONSE.name:
                self._on_response(device, fields)
            case _:
                log.warning("router: unexpected message type %r from %s", kind, device.peer_id)

    async def _serve(self, device: _Device, qid: int, raw: bytes) -> None:
        try:
            try:
                request = api.request_from_wire(msgpack.unpackb(raw, raw=False))
            except (DmgnError, ValueError, msgpack.UnpackException) as error:
                self._offer(device, _error(qid, "invalid_input", str(error)[:500]))
                return
            if not isinstance(request, api.QueryMemories):
                self._offer(device, _error(qid, "invalid_input", "only queries are routed"))
                return
            result = await _ask_local(self._local, request, REMOTE_DEADLINE)
            if isinstance(result, Err):
                self._offer(device, _error(qid, result.code[:64], result.reason[:500]))
                return
            blobs: list[Value] = []
            size = 0
            for item in result.value.get("results", []):
                blob = msgpack.packb(item, use_bin_type=True)
                size += len(blob)
                if size > MAX_RESPONSE_BYTES or len(blob) > MAX_RESULT_BYTES:
                    break
                blobs.append(blob)
            truncated = len(blobs) < len(result.value.get("results", []))
            response = RESPONSE(qid=qid, results=blobs)
            if truncated:
                response = RESPONSE(
                    qid=qid, results=blobs, code="truncated", error="response size cap"
                )
            self._served += 1
            if device.send is not None:
                # Wait for room rather than drop: the answer is what the asker waits for.
                # (A closed channel: the device left and nobody waits for this answer.)
                with (
                    trio.move_on_after(REMOTE_DEADLINE),
                    contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
                ):
                    await device.send.send(response)
        finally:
            device.inflight = max(0, device.inflight - 1)

    def _on_response(self, device: _Device, fields: Any) -> None:
        pending = self._pending.get(fields["qid"])
        if pending is None or pending.device != device.peer_id or pending.done.is_set():
            return  # late (we gave up) or not ours to answer
        if "error" in fields and fields.get("code") != "truncated":
            pending.error = f"{fields.get('code', 'error')}: {fields['error']}"
            pending.done.set()
            return
        try:
            pending.results = [
                check_result(msgpack.unpackb(blob, raw=False)) for blob in fields["results"]
            ]
        except (BadResult, ValueError, msgpack.UnpackException) as error:
            log.warning("router: bad answer from device %s: %s", device.peer_id, error)
            pending.error = f"bad answer: {error}"
        pending.truncated = fields.get("code") == "truncated"
        pending.done.set()

    # -- fan-out ---------------------------------------------------------------------------

    def _window_days(self) -> float:
        return math.inf if self._replica_days is None else float(self._replica_days)

    def _needs_others(self, request: api.QueryMemories) -> bool:
        if self._replica_days is None:
            return False
        window_start = self._wall_clock() - self._replica_days * _DAY_NS
        return request.after is None or request.after < window_start

    async def _fan_out(self, message: FanOut) -> None:
        request = message.request
        local = DeviceAnswer(
            "local",
            replica_name(self._replica_days),
            True,
            True,
            len(message.local),
            None,  # not timed: the same query must print the same document every time
            None,
        )
        wider = [d for d in self._devices.values() if d.window_days > self._window_days()]
        if not self._needs_others(request):
            message.reply.ok(Routed(list(message.local), (local,), False, None))
            return
        targets = [d for d in wider if d.send is not None]
        blob = msgpack.packb(request.to_wire(), use_bin_type=True)
        asked: dict[str, _Pending] = {}
        qids: list[int] = []
        for device in targets:
            qid = self._next_qid
            self._next_qid = qid % _QID_MAX + 1
            pending = _Pending(device.peer_id, trio.current_time())
            if len(blob) <= MAX_REQUEST_BYTES and self._offer(
                device, REQUEST(qid=qid, request=blob)
            ):
                self._pending[qid] = pending
                qids.append(qid)
            else:
                pending.error = "could not send (connection busy)"
                pending.done.set()
            asked[device.peer_id] = pending
        with trio.move_on_after(self._timeout):
            for pending in asked.values():
                await pending.done.wait()
        for qid in qids:
            self._pending.pop(qid, None)
        answers = [list(message.local)]
        rows = [local]
        missing: list[str] = []
        now = trio.current_time()
        for device in wider:
            name = device.device_id.hex()
            if device.peer_id not in asked:
                rows.append(DeviceAnswer(name, device.replica, False, False, 0, None, "offline"))
                missing.append(f"{name[:8]} offline")
                continue
            pending = asked[device.peer_id]
            if pending.results is not None:
                answers.append(pending.results)
                ms = round((now - pending.started) * 1000, 3)
                rows.append(
                    DeviceAnswer(name, device.replica, True, True, len(pending.results), ms, None)
                )
                if pending.truncated:
                    missing.append(f"{name[:8]} answer truncated")
                continue
            error = pending.error or f"no answer within {self._timeout:g}s"
            rows.append(DeviceAnswer(name, device.replica, True, False, 0, None, error))
            missing.append(f"{name[:8]} {error}")
        if not wider:
            missing.append(
                f"this device keeps only {self._replica_days} days and no device with more is known"
            )
        merged = merge_results(answers, request.limit, recent=is_listing(request))
        reason = "; ".join(missing) if missing else None
        message.reply.ok(Routed(merged, tuple(rows), bool(missing), reason))

    def _status(self) -> RouterStatus:
        return RouterStatus(
            replica_name(self._replica_days),
            tuple(
                (d.device_id.hex(), d.replica, d.send is not None) for d in self._devices.values()
            ),
            tuple(sorted(self._received.items())),
            self._served,
        )


def _error(qid: int, code: str, reason: str) -> Message:
    return RESPONSE(qid=qid, results=[], code=code, error=reason)


async def _ask_local(
    address: Address[LocalQuery], request: api.QueryMemories, timeout: float
) -> Any:
    make: Callable[[api.QueryMemories, Reply[api.Response]], LocalQuery] = Request
    return await call(address, make, request, timeout=timeout)
