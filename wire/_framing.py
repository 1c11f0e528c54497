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

Byte streams (used for in-memory pipes and anything without message
boundaries) prefix each frame with its length as 2 big-endian bytes; length 0
is invalid because no Noise message is empty.
"""

from __future__ import annotations

import struct

from wire._errors import FrameError
from wire._noise import MAX_NOISE_MESSAGE, TAGLEN

__all__ = [
    "CHUNK_HEADER_BYTES",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "MAX_CHUNK_PAYLOAD",
    "MAX_FRAME_SIZE",
    "LengthPrefixDecoder",
    "Reassembler",
    "chunk_message",
    "length_prefixed",
]

MAX_FRAME_SIZE = MAX_NOISE_MESSAGE  # Noise spec section 3: 65535 bytes per message
CHUNK_HEADER_BYTES = 1
# Largest chunk: a full Noise message minus the Poly1305 tag and our header.
MAX_CHUNK_PAYLOAD = MAX_FRAME_SIZE - TAGLEN - CHUNK_HEADER_BYTES
# 16 MiB: an erasure-coded shard of a large document, or a batch of feed ops,
# fits comfortably; a peer cannot make us buffer more than this per connection.
# (For scale: libp2p's yamux window is 16 MiB, Lightning caps messages at 64 KiB.)
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024

_MORE = 0x01
_LENGTH = struct.Struct(">H")


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


class Reassembler:
    """Collects chunks until a message is complete; enforces the framing rules."""

    __slots__ = ("_max_message_size", "_parts", "_size")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self._max_message_size = max_message_size
        self._parts: list[bytes] = []
        self._size = 0

    @property
    def pending_bytes(self) -> int:
        return self._size

    def feed(self, plaintext: bytes) -> bytes | None:
        """Add one transport plaintext; return the whole message once complete."""
        if len(plaintext) < CHUNK_HEADER_BYTES:
            raise FrameError("empty transport plaintext (no chunk header)")
        header = plaintext[0]
        if header & ~_MORE:
            raise FrameError(f"reserved chunk header bits set: {header:#04x}")
        chunk = plaintext[CHUNK_HEADER_BYTES:]
        more = bool(header & _MORE)
        if more and len(chunk) != MAX_CHUNK_PAYLOAD:
            raise FrameError("non-final chunk is not full size")
        if self._size + len(chunk) > self._max_message_size:
            raise FrameError(f"application message exceeds the {self._max_message_size}-byte cap")
        if not more and not self._parts:
            return chunk  # the common case: a message in one chunk, no copy
        if not more and not chunk:
            raise FrameError("empty final chunk after full chunks (not canonical)")
        self._parts.append(chunk)
        self._size += len(chunk)
        if more:
            return None
        message = b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        return message


def length_prefixed(frame: bytes) -> bytes:
    if not 0 < len(frame) <= MAX_FRAME_SIZE:
        raise FrameError(f"frame of {len(frame)} bytes cannot be sent (1..{MAX_FRAME_SIZE})")
    return _LENGTH.pack(len(frame)) + frame


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
