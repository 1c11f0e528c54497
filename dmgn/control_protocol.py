"""The control socket protocol between `dmgn` and `dmgn-node`, sans I/O.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack. A request is
``{"v": 1, "id": n, "req": {...}}`` where ``req`` is an :mod:`dmgn.api` request in its wire form
(``to_wire()``) or a daemon control op (``{"op": "daemon.ping"}``, ``{"op": "daemon.shutdown"}``).
The answer carries the same id: ``{"v": 1, "id": n, "ok": response}`` or
``{"v": 1, "id": n, "err": {"code": ..., "message": ...}}``.

Like h11, nothing here touches a socket: :class:`FrameDecoder` is fed bytes and hands back
complete payloads; the encoders return bytes. Both the daemon (trio) and the CLI (blocking
sockets) use it, so the two sides cannot disagree about the format.

Two kinds of bad input are distinguished, because they differ in what can safely happen next:

* A frame whose *length* is impossible (over :data:`MAX_FRAME_BYTES`, or zero) desynchronises
  the stream: we cannot know where the next frame starts. The decoder raises
  :class:`ControlProtocolError` and stays in an error state; the connection must be closed.
* A frame of sane length whose *payload* is not a valid request (bad msgpack, wrong version,
  unknown op, bad fields) leaves the stream intact: :func:`decode_request` raises
  :class:`BadRequest` carrying the id (when it could be read), the server answers with an
  error and keeps reading.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from dmgn.errors import DmgnError, error_for_code

if TYPE_CHECKING:
    # Imported where a request is validated (decode_request): a CLI command that goes through
    # the daemon sends a plain wire dict and never pays for pydantic (issue 17).
    from dmgn import api

__all__ = [
    "MAX_FRAME_BYTES",
    "OP_PING",
    "OP_SHUTDOWN",
    "PROTOCOL_VERSION",
    "BadRequest",
    "ControlProtocolError",
    "ControlRequest",
    "FrameDecoder",
    "decode_request",
    "decode_response",
    "encode_error",
    "encode_ok",
    "encode_request",
]

PROTOCOL_VERSION = 1

#: Largest frame either side accepts. The largest legitimate request is an add with 1 MiB of
#: content (dmgn.memory.MAX_CONTENT_BYTES), 64 metadata entries (~270 KiB) and a 4096-number
#: embedding (~37 KiB): about 1.4 MiB of msgpack. The cap is comfortably above that, so content
#: over its limit is refused by the content check - one sentence, exit 2, on every path - and
#: never by framing; and a buggy local client still cannot make the daemon buffer more than
#: this per connection. (The MCP bridge caps a JSON-RPC line at the same 8 MiB; for comparison,
#: h11 caps headers at 16 KiB, nginx's default body limit is 1 MiB.) Large list responses
#: (``query --limit 1000 --full``) are the one legitimate way to exceed it; the server then
#: answers with an error naming the limit instead of a frame the client refuses.
MAX_FRAME_BYTES = 8 * 1024 * 1024

_LENGTH = struct.Struct(">I")

#: Daemon control ops, served by the control actor itself rather than the memory service.
OP_PING = "daemon.ping"
OP_SHUTDOWN = "daemon.shutdown"
CONTROL_OPS = frozenset({OP_PING, OP_SHUTDOWN})


class ControlProtocolError(DmgnError):
    """The byte stream is broken (impossible frame length): close the connection."""

    code = "protocol_error"


class BadRequest(DmgnError):
    """A well-framed payload that is not a valid request; the connection can go on."""

    def __init__(self, message: str, request_id: int | None, code: str = "bad_request") -> None:
        super().__init__(message)
        self.request_id = request_id
        self.code = code


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """A decoded request: either an API request or a daemon control op (``control``)."""

    id: int
    request: api.AnyRequest | None
    control: str | None = None


class FrameDecoder:
    """Splits a byte stream into frame payloads. Feed it with :meth:`receive_data`."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame
        self._broken: ControlProtocolError | None = None

    def receive_data(self, data: bytes) -> list[bytes]:
        """Add bytes; return every payload now complete. Raises once the stream is broken."""
        if self._broken is not None:
            raise self._broken
        self._buffer += data
        frames: list[bytes] = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if not 0 < length <= self._max_frame:
                self._broken = ControlProtocolError(
                    f"frame of {length} bytes announced; frames must be 1-{self._max_frame} "
                    "bytes, closing the connection"
                )
                raise self._broken
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                break
            frames.append(bytes(self._buffer[_LENGTH.size : end]))
            del self._buffer[:end]
        return frames

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)


def frame(payload: bytes) -> bytes:
    if not 0 < len(payload) <= MAX_FRAME_BYTES:
        raise ControlProtocolError(
            f"a {len(payload)}-byte message does not fit in a frame (limit {MAX_FRAME_BYTES} bytes)"
        )
    return _LENGTH.pack(len(payload)) + payload


def _pack(document: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(document, use_bin_type=True)
    return packed


def encode_request(request_id: int, body: api.AnyRequest | dict[str, Any] | str) -> bytes:
    """Frame an API request, a request already in its wire form (``{"op": "status"}``: the
    daemon validates it), or a control op given by name (:data:`OP_PING`...)."""
    if isinstance(body, str):
        req = {"op": body}
    elif isinstance(body, dict):
        req = body
    else:
        req = body.to_wire()
    return frame(_pack({"v": PROTOCOL_VERSION, "id": request_id, "req": req}))


def encode_ok(request_id: int | None, response: dict[str, Any]) -> bytes:
    """Frame a success; a response too big for one frame becomes an error naming the limit."""
    payload = _pack({"v": PROTOCOL_VERSION, "id": request_id, "ok": response})
    if len(payload) > MAX_FRAME_BYTES:
        return encode_error(
            request_id,
            "response_too_large",
            f"the answer is {len(payload)} bytes, over the control socket's "
            f"{MAX_FRAME_BYTES}-byte limit; ask for fewer results (--limit) or without --full",
        )
    return frame(payload)


def encode_error(request_id: int | None, code: str, message: str) -> bytes:
    return frame(
        _pack({"v": PROTOCOL_VERSION, "id": request_id, "err": {"code": code, "message": message}})
    )


def decode_request(payload: bytes) -> ControlRequest:
    """Parse and validate one request payload; raises :class:`BadRequest` with a sentence."""
    try:
        document = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as error:  # msgpack raises several unrelated types for garbage
        raise BadRequest(
            f"the request is not valid msgpack ({type(error).__name__})", None
        ) from None
    if not isinstance(document, dict):
        raise BadRequest("a request must be a msgpack map", None)
    request_id = document.get("id")
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        raise BadRequest("a request needs an integer 'id'", None)
    if document.get("v") != PROTOCOL_VERSION:
        raise BadRequest(
            f"unsupported control protocol version {document.get('v')!r}; this dmgn-node "
            f"speaks version {PROTOCOL_VERSION} (are `dmgn` and `dmgn-node` from the same "
            "install?)",
            request_id,
            "unsupported_version",
        )
    if set(document) - {"v", "id", "req"}:
        raise BadRequest(
            f"unexpected field(s) in request: "
            f"{', '.join(sorted(map(str, set(document) - {'v', 'id', 'req'})))}",
            request_id,
        )
    body = document.get("req")
    if not isinstance(body, dict) or not isinstance(body.get("op"), str):
        # Checked before any use of the value: a list or map as ``op`` is unhashable, and a
        # membership test with it raised inside the control actor (issue 12, item 7).
        raise BadRequest("'req' must be a map with an 'op' string", request_id, "invalid_input")
    if body["op"] in CONTROL_OPS:
        if len(body) != 1:
            raise BadRequest(f"{body['op']} takes no arguments", request_id)
        return ControlRequest(request_id, None, body["op"])
    from dmgn import api

    try:
        return ControlRequest(request_id, api.request_from_wire(body))
    except DmgnError as error:
        raise BadRequest(str(error), request_id, error.code) from None


def decode_response(payload: bytes) -> tuple[int | None, dict[str, Any] | DmgnError]:
    """Parse a response: ``(id, response)`` or ``(id, typed error)``."""
    try:
        document = msgpack.unpackb(payload, raw=False)
    except Exception as error:  # msgpack raises several unrelated types for bad input
        raise ControlProtocolError(
            f"the daemon sent an unreadable answer ({type(error).__name__})"
        ) from None
    if not isinstance(document, dict) or document.get("v") != PROTOCOL_VERSION:
        raise ControlProtocolError(
            "the daemon answered in an unknown format (are `dmgn` and "
            "`dmgn-node` from the same install?)"
        )
    request_id = document.get("id")
    if "ok" in document and isinstance(document["ok"], dict):
        return request_id, document["ok"]
    err = document.get("err")
    if (
        isinstance(err, dict)
        and isinstance(err.get("code"), str)
        and isinstance(err.get("message"), str)
    ):
        return request_id, error_for_code(err["code"], err["message"])
    raise ControlProtocolError("the daemon's answer has neither 'ok' nor 'err'")
