"""Framing: application messages <-> Noise transport plaintexts <-> transport frames.

Rules:
- One transport frame (a WebSocket binary message, or a length-prefixed
  record on a byte stream) carries exactly one Noise message. Noise caps a
  message at 65535 bytes (spec section 3), so that is our frame cap too.
- A Noise transport plaintext is ``header (1 byte) || chunk``. Header bit 0 is
  MORE: another chunk of the same application message follows. Other bits are
  reserved and must be zero.
- Chunking is canonical: every chunk but the last is exactly
  `MAX_CHUNK_PAYLOAD` bytes. That makes the encoding unique and bounds the
  number of chunks by the message cap (no floods of empty chunks).
- A reassembled application message is at most `max_message_size` bytes; the
  reassembler refuses the chunk that would cross the cap, before buffering it.
- Several reassemblers may share one `ReassemblyBudget`: the bytes all of them
  hold in unfinished messages. A chunk that would cross the shared total is
  refused like one that crosses the per-message cap, so many peers each holding
  a partial message cannot add up to more than the budget. The caller sizes the
  budget (the transport gives strangers a small one); the reassembler returns
  its bytes on completion and on `Reassembler.discard`.

Byte streams (used for in-memory pipes and anything without message
boundaries) prefix each frame with its length as 2 big-endian bytes; length 0
is invalid because no Noise message is empty.

A WebSocket message carries 1 to `MAX_FRAMES_PER_WS_MESSAGE` Noise messages,
each with the same 2-byte length prefix, back to back (docs/design.md, "Wire"): a
64 KiB application message, two Noise messages, costs one WebSocket message.
`pack_frames` / `unpack_frames` are that encoding; unpacking is strict (no
empty frame, no truncated or trailing bytes, no more frames than allowed).
"""

from __future__ import annotations

import struct

from wire._errors import FrameError
from wire._noise import MAX_NOISE_MESSAGE, TAGLEN

__all__ = [
    "CHUNK_HEADER_BYTES",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "MAX_CHUNK_PAYLOAD",
    "MAX_FRAMES_PER_WS_MESSAGE",
    "MAX_FRAME_SIZE",
    "MAX_WS_MESSAGE_SIZE",
    "LengthPrefixDecoder",
    "Reassembler",
    "ReassemblyBudget",
    "chunk_encoded",
    "chunk_message",
    "length_prefixed",
    "pack_frames",
    "unpack_frames",
]

MAX_FRAME_SIZE = MAX_NOISE_MESSAGE  # Noise spec section 3: 65535 bytes per message
CHUNK_HEADER_BYTES = 1
# Largest chunk: a full Noise message minus the 16-byte AEAD tag and our header.
MAX_CHUNK_PAYLOAD = MAX_FRAME_SIZE - TAGLEN - CHUNK_HEADER_BYTES
# 16 MiB: an erasure-coded shard of a large document, or a batch of feed ops,
# fits comfortably; a peer cannot make us buffer more than this per connection.
# (For scale: libp2p's yamux window is 16 MiB, Lightning caps messages at 64 KiB.)
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024

#: Noise messages one WebSocket message may carry: two, so an application message
#: of up to 2 * MAX_CHUNK_PAYLOAD bytes (64 KiB and a little more) is one WebSocket
#: message. Larger ones take one WebSocket message per two chunks; the cap bounds
#: what one queued WebSocket message can make a receiver hold (128 KiB).
MAX_FRAMES_PER_WS_MESSAGE = 2
MAX_WS_MESSAGE_SIZE = MAX_FRAMES_PER_WS_MESSAGE * (2 + MAX_FRAME_SIZE)

_MORE = 0x01
_LENGTH = struct.Struct(">H")


def pack_frames(frames: list[bytes]) -> list[bytes]:
    """Frames -> WebSocket message payloads, at most `MAX_FRAMES_PER_WS_MESSAGE` each.

    Each payload is one join of its length prefixes and frames: every frame's bytes are
    copied once (not once into a prefixed frame and again into the payload)."""
    out = []
    for start in range(0, len(frames), MAX_FRAMES_PER_WS_MESSAGE):
        parts: list[bytes] = []
        for frame in frames[start : start + MAX_FRAMES_PER_WS_MESSAGE]:
            parts += (_prefix(frame), frame)
        out.append(b"".join(parts))
    return out


def unpack_frames(payload: bytes) -> list[memoryview]:
    """One WebSocket message payload -> its frames; `FrameError` if it is not exactly
    1 to `MAX_FRAMES_PER_WS_MESSAGE` non-empty length-prefixed frames."""
    frames: list[memoryview] = []
    offset = 0
    view = memoryview(payload)
    while offset < len(payload):
        if len(frames) == MAX_FRAMES_PER_WS_MESSAGE:
            raise FrameError(
                f"a WebSocket message carries at most {MAX_FRAMES_PER_WS_MESSAGE} frames"
            )
        if offset + _LENGTH.size > len(payload):
            raise FrameError("truncated frame length in a WebSocket message")
        (length,) = _LENGTH.unpack_from(payload, offset)
        offset += _LENGTH.size
        if length == 0:
            raise FrameError("zero-length frame")
        if offset + length > len(payload):
            raise FrameError("a frame runs past the end of its WebSocket message")
        frames.append(view[offset : offset + length])
        offset += length
    if not frames:
        raise FrameError("empty WebSocket message")
    return frames


def chunk_message(data: bytes) -> list[bytes]:
    """Split an encoded application message into transport plaintexts."""
    if len(data) <= MAX_CHUNK_PAYLOAD:
        return [b"\x00" + data]
    view = memoryview(data)
    chunks = []
    for start in range(0, len(data), MAX_CHUNK_PAYLOAD):
        piece = view[start : start + MAX_CHUNK_PAYLOAD]
        more = start + MAX_CHUNK_PAYLOAD < len(data)
        chunks.append((b"\x01" if more else b"\x00") + piece)
    return chunks


def chunk_encoded(buffer: memoryview) -> list[bytes | memoryview]:
    """Transport plaintexts of ``buffer``: one chunk header byte, then the encoded message
    (`wire._messages.SchemaRegistry.encode_behind`).

    The first plaintext is ``buffer`` itself (one chunk, header 0) or its first full chunk
    (header 1: the caller knew the message needs several) without a copy; every other chunk
    is copied once behind its own header. Same chunks as `chunk_message`, byte for byte."""
    size = len(buffer) - CHUNK_HEADER_BYTES
    first_header = buffer[0]
    if size <= MAX_CHUNK_PAYLOAD:
        return [buffer if first_header == 0 else b"\x00" + buffer[CHUNK_HEADER_BYTES:]]
    end = CHUNK_HEADER_BYTES + MAX_CHUNK_PAYLOAD
    chunks: list[bytes | memoryview] = [
        buffer[:end] if first_header == _MORE else b"\x01" + buffer[CHUNK_HEADER_BYTES:end]
    ]
    for start in range(end, len(buffer), MAX_CHUNK_PAYLOAD):
        more = start + MAX_CHUNK_PAYLOAD < len(buffer)
        chunks.append((b"\x01" if more else b"\x00") + buffer[start : start + MAX_CHUNK_PAYLOAD])
    return chunks


class ReassemblyBudget:
    """Bytes that all reassemblers sharing this budget may hold in unfinished messages."""

    __slots__ = ("_used", "limit")

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("a reassembly budget cannot be negative")
        self.limit = limit
        self._used = 0

    @property
    def used(self) -> int:
        return self._used

    def reserve(self, size: int) -> bool:
        if self._used + size > self.limit:
            return False
        self._used += size
        return True

    def release(self, size: int) -> None:
        self._used = max(0, self._used - size)


class Reassembler:
    """Collects chunks until a message is complete; enforces the framing rules."""

    __slots__ = ("_budget", "_max_message_size", "_parts", "_size")

    def __init__(
        self,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        budget: ReassemblyBudget | None = None,
    ) -> None:
        self._max_message_size = max_message_size
        self._budget = budget
        self._parts: list[memoryview] = []
        self._size = 0

    @property
    def pending_bytes(self) -> int:
        return self._size

    @property
    def max_message_size(self) -> int:
        return self._max_message_size

    def restrict(self, max_message_size: int, budget: ReassemblyBudget | None) -> None:
        """Lower the cap and join a shared budget (once the peer is known, before its data)."""
        if self._parts:
            raise FrameError("cannot change reassembly limits in the middle of a message")
        self._max_message_size = min(self._max_message_size, max_message_size)
        self._budget = budget

    def discard(self) -> None:
        """Drop a partial message and return its bytes to the budget (connection ends)."""
        if self._budget is not None:
            self._budget.release(self._size)
        self._parts.clear()
        self._size = 0

    def feed(self, plaintext: bytes) -> bytes | memoryview | None:
        """Add one transport plaintext; return the whole message once complete.

        A message of one chunk comes back as a view of ``plaintext`` behind its header, and
        the chunks of a longer one are joined once: the chunk bytes are never copied on their
        own (msgpack reads the view as it reads bytes)."""
        if len(plaintext) < CHUNK_HEADER_BYTES:
            raise FrameError("empty transport plaintext (no chunk header)")
        header = plaintext[0]
        if header & ~_MORE:
            raise FrameError(f"reserved chunk header bits set: {header:#04x}")
        chunk = memoryview(plaintext)[CHUNK_HEADER_BYTES:]
        more = bool(header & _MORE)
        if more and len(chunk) != MAX_CHUNK_PAYLOAD:
            raise FrameError("non-final chunk is not full size")
        if self._size + len(chunk) > self._max_message_size:
            raise FrameError(f"application message exceeds the {self._max_message_size}-byte cap")
        if not more and not self._parts:
            return chunk  # the common case: a message in one chunk, no copy
        if not more and not chunk:
            raise FrameError("empty final chunk after full chunks (not canonical)")
        if more and self._budget is not None and not self._budget.reserve(len(chunk)):
            # The final chunk is never buffered (it completes the message and is handed over
            # at once), so only the chunks that wait count against the shared budget.
            raise FrameError("too many bytes in unfinished messages on this node; retry later")
        if not more:
            message = b"".join([*self._parts, chunk])
            self.discard()
            return message
        self._parts.append(chunk)
        self._size += len(chunk)
        return None


def length_prefixed(frame: bytes) -> bytes:
    return _prefix(frame) + frame


def _prefix(frame: bytes) -> bytes:
    """The 2-byte length of ``frame``; `FrameError` if no Noise message can be that long."""
    if not 0 < len(frame) <= MAX_FRAME_SIZE:
        raise FrameError(f"frame of {len(frame)} bytes cannot be sent (1..{MAX_FRAME_SIZE})")
    return _LENGTH.pack(len(frame))


class LengthPrefixDecoder:
    """Turns an arbitrary split of a byte stream back into frames (sans-IO)."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length == 0:
                raise FrameError("zero-length frame")
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                break
            frames.append(bytes(self._buffer[_LENGTH.size : end]))
            del self._buffer[:end]
        return frames
