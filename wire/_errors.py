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
    "DeviceRefused",
    "FrameError",
    "HandshakeError",
    "IdentityError",
    "NonceExhausted",
    "SchemaError",
    "SuiteRefused",
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


class DeviceRefused(IdentityError):
    """The responder refuses a device handshake: the initiator did not prove the PSK (message 3
    did not decrypt) or the responder takes no device handshakes at all. It closes with
    `CloseCode.DEVICE_REFUSED`, the one answer after which an initiator that did not know who
    it dialed tries storage mode (any other failure may be a timeout, a full node or someone
    resetting the stream, and one of our own devices must not end up a storage peer)."""


class SuiteRefused(HandshakeError):
    """The responder does not take the cipher suite the initiator chose (AES-GCM on a node
    without fast AES). It closes with `CloseCode.SUITE_REFUSED`; the initiator dials again
    with ChaChaPoly, which every node takes. Says nothing about who either side is."""


class DecryptError(WireError):
    """An AEAD tag did not verify: tampered, truncated, replayed or reordered data."""


class NonceExhausted(WireError):
    """A cipher state used every nonce it may use; the session must be replaced."""


class FrameError(WireError):
    """A frame or a reassembled message breaks the framing rules or a size cap."""


class SchemaError(WireError):
    """An application message is not valid msgpack or does not match its schema."""


class ConnectionClosed(WireError):
    """The peer closed the connection (cleanly or not); ``reason`` says why; ``code`` is the
    close code it ended with, when one is known (None: the stream just broke)."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.code = code
