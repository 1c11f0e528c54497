"""The one error family that leaves `wire`.

Every parser and state machine in this package converts whatever goes wrong
(bad bytes, failed authentication, broken schema, violated limit) into a
`WireError` subclass. Callers therefore need exactly one ``except`` clause to
turn a misbehaving peer into "close the connection with this reason", and a
fuzzer can assert that nothing else ever escapes.

After a `WireError` a channel is in an error state it cannot leave (as in
h11): the only sensible thing left to do is to close the connection.
"""

from __future__ import annotations

__all__ = [
    "ConnectionClosed",
    "DecryptError",
    "FrameError",
    "HandshakeError",
    "IdentityError",
    "NonceExhausted",
    "SchemaError",
    "WireError",
]


class WireError(Exception):
    """A protocol violation or failure; ``str(err)`` is the close reason."""

    @property
    def reason(self) -> str:
        return str(self)


class HandshakeError(WireError):
    """The Noise handshake cannot continue (wrong message, wrong state, bad key)."""


class IdentityError(HandshakeError):
    """The peer's device certificate is invalid or is not the identity we expected."""


class DecryptError(WireError):
    """An AEAD tag did not verify: tampered, truncated, replayed or reordered data."""


class NonceExhausted(WireError):
    """A cipher state used every nonce it may use; the session must be replaced."""


class FrameError(WireError):
    """A frame or a reassembled message breaks the framing rules or a size cap."""


class SchemaError(WireError):
    """An application message is not valid msgpack or does not match its schema."""


class ConnectionClosed(WireError):
    """The peer closed the connection (cleanly or not); ``reason`` says why."""
