"""`SecureConnection`: a `SecureChannel` driven over a `MessageStream`.

This is the thin I/O shell around the sans-IO channel: it moves frames between
the stream and the channel, applies the handshake deadline, answers pings, and
turns every failure into "close the stream with a code and a reason, then
raise". It is network-agnostic, so the same code runs over WebSocket and over
memory streams in sims.

Cancellation: if a send is cancelled after the channel encrypted a message but
before every frame reached the stream, the two nonce counters no longer agree
and the connection is unusable; it is marked broken and later calls raise
`ConnectionClosed`. A cancelled `receive` loses nothing (frames are processed
whole, between checkpoints).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import trio

from wire._errors import (
    ConnectionClosed,
    DeviceRefused,
    FrameError,
    IdentityError,
    SuiteRefused,
    WireError,
)
from wire._framing import DEFAULT_MAX_MESSAGE_SIZE, ReassemblyBudget
from wire._handshake import DeviceCredentials, PeerIdentity
from wire._messages import BASE_REGISTRY, PING, PONG, CloseCode, Message, SchemaRegistry
from wire._network import MessageStream
from wire._secure_channel import (
    ChannelState,
    CloseReceived,
    HandshakeComplete,
    MessageReceived,
    Mode,
    SecureChannel,
    Suite,
)

__all__ = ["HANDSHAKE_TIMEOUT", "SecureConnection", "secure_connection"]

# The handshake is 1.5 round trips plus two ed25519 verifications: milliseconds
# on a LAN, well under a second across the Internet. 10 s covers very slow links
# while a silent or stalling peer cannot hold a connection slot for long.
HANDSHAKE_TIMEOUT = 10.0


def close_code_for(error: WireError) -> int:
    """The close code that tells the peer what kind of fault it committed."""
    if isinstance(error, DeviceRefused):
        return CloseCode.DEVICE_REFUSED
    if isinstance(error, SuiteRefused):
        return CloseCode.SUITE_REFUSED
    if isinstance(error, IdentityError):
        return CloseCode.POLICY_VIOLATION
    if isinstance(error, FrameError):
        return CloseCode.MESSAGE_TOO_BIG
    return CloseCode.PROTOCOL_ERROR


class SecureConnection:
    """An authenticated, encrypted connection to one peer device."""

    def __init__(self, stream: MessageStream, channel: SecureChannel) -> None:
        assert channel.peer is not None and channel.state is ChannelState.OPEN
        self._stream = stream
        self._channel = channel
        self._send_lock = trio.Lock()
        self._broken: str | None = None
        self.peer: PeerIdentity = channel.peer
        assert channel.mode is not None
        #: The handshake this connection was made with: device (our own identity) or storage.
        self.mode: Mode = channel.mode
        assert channel.suite is not None
        #: The cipher suite the initiator chose.
        self.suite: Suite = channel.suite
        self.remote_address = stream.remote_address
        self.last_received_at = trio.current_time()
        #: When the last application message arrived (pings and pongs do not count): how a
        #: peer that keeps a connection open without using it is told apart.
        self.last_message_at = self.last_received_at
        #: When the unfinished incoming message now being reassembled began (None: none).
        self.partial_since: float | None = None
        #: Called when an unfinished message begins (``partial_since`` is set), so whoever
        #: times out unfinished messages can sleep until one begins instead of polling.
        self.on_partial: Callable[[], None] | None = None
        #: Awaited with each received frame's size before the next is read (see `throttle`).
        self._throttle: Callable[[int], Awaitable[None]] | None = None
        self._owed = 0

    def throttle(self, take: Callable[[int], Awaitable[None]] | None) -> None:
        """Pace reading: ``take(size)`` is awaited after each frame and may sleep, so a peer
        sending faster than it is allowed finds the stream (and TCP) pushing back."""
        self._throttle = take

    @property
    def pending_bytes(self) -> int:
        """Bytes of an unfinished incoming message held for this connection."""
        return self._channel.pending_bytes

    def restrict_reassembly(self, max_message_size: int, budget: ReassemblyBudget | None) -> None:
        """Lower the cap on incoming messages and share ``budget`` (see `Reassembler`).

        Call before the first `receive`."""
        self._channel.restrict_reassembly(max_message_size, budget)

    @property
    def handshake_hash(self) -> bytes:
        """The Noise handshake hash: the same 32 bytes on both ends of this session and on no
        other, so people can compare it to rule out a man in the middle."""
        assert self._channel.handshake_hash is not None  # set once the channel is OPEN
        return self._channel.handshake_hash

    @property
    def is_open(self) -> bool:
        return self._broken is None and self._channel.state is ChannelState.OPEN

    async def send(self, message: Message) -> None:
        """Send one application message (chunked if large). Raises `WireError`."""
        try:
            # Uncontended (the common case): no extra trip through the scheduler.
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            if self._broken is not None:
                raise ConnectionClosed(self._broken)
            await self._send_frames(self._channel.send(message))
        finally:
            self._send_lock.release()

    async def _send_frames(self, frames: list[bytes]) -> None:
        sent = 0
        try:
            # All frames of one application message at once: over WebSocket they share
            # WebSocket messages (two Noise messages each, see wire._framing).
            await self._stream.send_messages(frames)
            sent = len(frames)
        except BaseException as exc:
            if sent < len(frames):
                self._broken = f"send interrupted ({type(exc).__name__}); session unusable"
                with trio.CancelScope(shield=True):
                    await self._stream.aclose(CloseCode.PROTOCOL_ERROR, "send interrupted")
            raise

    async def receive(self) -> Message:
        """Next application message from the peer.

        Pings are answered here and never returned. A close from the peer, the
        end of the stream, or any protocol fault raise `WireError` (a protocol
        fault also closes the stream with a reason first).
        """
        while True:
            if self._broken is not None:
                raise ConnectionClosed(self._broken)
            if self._owed and self._throttle is not None:
                # Paced before reading the next frame, never between a frame and its events, so
                # a cancelled receive still loses nothing.
                owed, self._owed = self._owed, 0
                await self._throttle(owed)
            try:
                frame = await self._stream.receive_message()
                self.last_received_at = now = trio.current_time()
                events = self._channel.receive_frame(frame)
            except ConnectionClosed as closed:
                self._broken = str(closed)
                self._channel.discard_partial()
                raise
            except WireError as error:
                await self._abort(error)
                raise
            if self._channel.pending_bytes == 0:
                self.partial_since = None
            elif self.partial_since is None:
                self.partial_since = now
                if self.on_partial is not None:
                    self.on_partial()
            self._owed += len(frame)
            for event in events:
                if isinstance(event, CloseReceived):
                    self._broken = f"peer closed ({event.code}): {event.reason}"
                    with trio.CancelScope(shield=True):
                        await self._stream.aclose(CloseCode.NORMAL, "")
                    raise ConnectionClosed(self._broken)
                if isinstance(event, MessageReceived):
                    message = event.message
                    if message.type == PING.name:
                        await self.send(PONG(nonce=message.get_bytes("nonce")))
                        continue
                    if message.type == PONG.name:
                        continue
                    self.last_message_at = now
                    return message

    async def ping(self) -> None:
        """Send a ping; the peer's pong (or any traffic) refreshes `last_received_at`."""
        await self.send(PING(nonce=os.urandom(8)))

    async def aclose(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Tell the peer why (inside the encrypted channel), then close the stream."""
        with trio.CancelScope(shield=True):
            try:
                async with self._send_lock:
                    if self._broken is None and self._channel.state is ChannelState.OPEN:
                        await self._send_frames(self._channel.close(code, reason))
            except WireError:
                pass  # the peer is already gone; closing the stream is all that is left
            finally:
                self._broken = self._broken or "closed locally"
                self._channel.discard_partial()
                await self._stream.aclose(code, reason)

    async def _abort(self, error: WireError) -> None:
        self._broken = f"protocol error: {error}"
        self._channel.discard_partial()
        with trio.CancelScope(shield=True):
            await self._stream.aclose(close_code_for(error), str(error))


async def secure_connection(
    stream: MessageStream,
    credentials: DeviceCredentials,
    *,
    initiator: bool,
    mode: Mode = Mode.STORAGE,
    suite: Suite | None = None,
    accept_suites: frozenset[Suite] | None = None,
    expected_identity: bytes | None = None,
    expected_device_id: bytes | None = None,
    registry: SchemaRegistry = BASE_REGISTRY,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> SecureConnection:
    """Run the identity-bound handshake over ``stream`` (as initiator: in ``mode``, with
    ``suite`` or the machine's `preferred_suite`; as responder: in the mode and suite the
    initiator asks for, if the suite is in ``accept_suites``, by default `default_suites`).

    Returns once the peer is authenticated (and matches ``expected_identity`` /
    ``expected_device_id`` if given). On timeout or any fault, the stream is
    closed with a reason and `WireError` is raised (`ConnectionClosed` for a
    timeout); the caller still owns the stream object but it is closed.
    """
    channel = SecureChannel(
        credentials,
        initiator=initiator,
        mode=mode,
        suite=suite,
        accept_suites=accept_suites,
        expected_identity=expected_identity,
        expected_device_id=expected_device_id,
        registry=registry,
        max_message_size=max_message_size,
    )
    with trio.move_on_after(handshake_timeout):
        try:
            if initiator:
                await stream.send_message(channel.initiate())
            while channel.state is ChannelState.HANDSHAKING:
                events = channel.receive_frame(await stream.receive_message())
                for frame in channel.frames_to_send():
                    await stream.send_message(frame)
                if any(isinstance(event, HandshakeComplete) for event in events):
                    return SecureConnection(stream, channel)
        except ConnectionClosed:
            raise
        except WireError as error:
            with trio.CancelScope(shield=True):
                await stream.aclose(close_code_for(error), str(error))
            raise
    reason = f"handshake did not finish within {handshake_timeout:g}s"
    with trio.CancelScope(shield=True):
        await stream.aclose(CloseCode.TIMEOUT, reason)
    raise ConnectionClosed(reason)
